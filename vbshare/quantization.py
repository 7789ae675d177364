"""Quantized frozen bases (QLoRA-style): which linear layers are quantized, their weight as a plain tensor, and
the two ways a base gets quantized (transformers' `BitsAndBytesConfig` while loading a folder, `quantize` for a
model built in memory).

bitsandbytes keeps a 4-bit layer (`Linear4bit`, NF4 or FP4) as packed uint8 codes, two a byte, with an absmax
scale per block of 64 weights in the parameter's `quant_state`; an 8-bit layer (`Linear8bitLt`) as int8 rows
with one absmax scale per output row (`SCB`). Both subclass `nn.Linear` and keep `in_features` /
`out_features`, so target selection treats them as linear layers; their forward dequantizes on the fly (the
"compute dtype"), and so does the gradient to their input, so adapters around and before them train. (On a CPU
with AVX512-BF16, bitsandbytes computes an eval-mode 4-bit forward without gradients with a bf16 kernel, so
inference there differs from a training-mode forward by bf16 rounding.) What a
quantized layer cannot do is take ΔW into its weight: re-quantizing W + ΔW loses most of ΔW, so vbshare merges
only into a dequantized copy (`plain_linear`, through `vbshare.merge(model, dequantize=True)`).

bitsandbytes is imported only when a quantized base is asked for (the `quant` extra); it runs on CPU too
(0.49+: NF4, FP4 and int8 forward and backward). Nothing here knows an adapter method.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .errors import VBShareError
from .targets import _head_names

QUANTIZATIONS = ("nf4", "fp4", "int8")  # model.quantization: 4-bit NormalFloat, 4-bit float, 8-bit rows
_LAYER_CLASSES = {"Linear4bit", "Linear8bitLt"}  # the bitsandbytes layers a quantized base holds


def check_quantization(name: Any) -> str | None:
    """model.quantization: None (a full-precision base) or one of `QUANTIZATIONS`, with bitsandbytes importable."""
    if name is None:
        return None
    if name not in QUANTIZATIONS:
        raise VBShareError(f"model.quantization={name!r} is not supported; use one of {', '.join(QUANTIZATIONS)} "
                           "or null (no quantization)")
    bitsandbytes()
    return name


def bitsandbytes():
    """The bitsandbytes module, or one line saying how to install it."""
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken native library (OSError / RuntimeError)
        raise VBShareError(f"a quantized base needs bitsandbytes, which does not import here ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); pip install 'vbshare[quant]' "
                           "(or set model.quantization=null)") from None
    return bnb


def is_quantized(layer: nn.Module) -> bool:
    """True for a bitsandbytes quantized linear layer (found by class, so bitsandbytes need not be imported)."""
    kind = type(layer)
    return kind.__name__ in _LAYER_CLASSES and kind.__module__.startswith("bitsandbytes")


def quantization_of(layer: nn.Module) -> str | None:
    """"nf4" | "fp4" | "int8" for a quantized linear layer, None for any other module."""
    if not is_quantized(layer):
        return None
    if type(layer).__name__ == "Linear8bitLt":
        return "int8"
    return getattr(layer.weight, "quant_type", None) or "nf4"


def describe(layers: Iterable[nn.Module]) -> str | None:
    """The quantization of some layers (e.g. `model.modules()`): "nf4" when all quantized ones agree,
    "int8+nf4" when they mix, None when none is quantized."""
    kinds = sorted({q for q in map(quantization_of, layers) if q is not None})
    return "+".join(kinds) or None


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> Tensor:
    """A quantized layer's weight as a new plain (out, in) float tensor, on the layer's device: 4-bit in the dtype
    it was quantized from, int8 in float32 (its codes times the row scales / 127). A weight on the meta device
    (planning) gives an empty (out, in) meta tensor."""
    weight = layer.weight
    shape = (layer.out_features, layer.in_features)
    if weight.is_meta:
        return torch.empty(shape, device="meta")
    bnb = bitsandbytes()
    if quantization_of(layer) == "int8":
        # the row scales sit on the weight until the first forward, which moves them to the layer's state
        scales = getattr(weight, "SCB", None)
        scales = scales if scales is not None else getattr(getattr(layer, "state", None), "SCB", None)
        if scales is None or weight.dtype != torch.int8:  # not quantized yet (a float weight still)
            return weight.detach().float().clone()
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float().reshape(shape)  # (out, in)
    if getattr(weight, "quant_state", None) is None:  # not quantized yet
        return weight.detach().clone()
    codes, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacked the codes for its CPU inference kernel (an eval-mode forward on a CPU with
        # AVX512-BF16; the block scales are bf16 from then on): undo the layout on a copy of the state, as
        # bitsandbytes does before saving, leaving the layer as it is
        codes, state = bnb.functional._convert_weight_packed_for_cpu_inverse(codes, copy.copy(state))
    return bnb.functional.dequantize_4bit(codes, state).reshape(shape)  # (out, in)


@torch.no_grad()
def plain_linear(layer: nn.Module) -> nn.Linear:
    """An `nn.Linear` holding a quantized layer's dequantized weight (and its bias), frozen, on its device."""
    weight = dequantized_weight(layer)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.copy_(weight)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    linear.requires_grad_(False)
    return linear.train(layer.training)


# -- quantizing a base ------------------------------------------------------------------------------------------
def bnb_config(name: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' `BitsAndBytesConfig` for model.quantization=`name`: 4-bit with double quantization of the
    block scales (QLoRA's choice) computing in `compute_dtype`, or 8-bit with the default outlier threshold."""
    check_quantization(name)
    from transformers import BitsAndBytesConfig

    if name == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


@torch.no_grad()
def quantize(model: nn.Module, name: str, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace (in place) every `nn.Linear` of a model built in memory by its bitsandbytes quantized form, the
    task / LM heads left as they are (as transformers does); the quantized weights are frozen. For models that
    have no folder to load from (tiny test models); a folder loads through `bnb_config` instead. Returns model."""
    check_quantization(name)
    bnb = bitsandbytes()
    heads = _head_names(model)
    chosen = [(n, m) for n, m in model.named_modules()
              if type(m) is nn.Linear and n not in heads and m.weight.device.type != "meta"]
    for module_name, linear in chosen:
        device, has_bias = linear.weight.device, linear.bias is not None
        if name == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                        has_fp16_weights=False, threshold=6.0)
            layer.weight = bnb.nn.Int8Params(linear.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias,
                                      compute_dtype=compute_dtype, quant_type=name, compress_statistics=True)
            layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type=name,
                                             compress_statistics=True)
        if has_bias:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        layer = layer.to(device)  # bitsandbytes quantizes the weight when it is first placed on a device
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer.train(linear.training))
    return model
