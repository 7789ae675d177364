"""Adapter-only checkpoints: `adapter_model.safetensors` + `adapter_config.json`.

The JSON names the method, its hyperparameters, the targets with their base shapes (the fingerprint a
loading model must match), a small sample of the base's weights (`base_sample`, below), the method's own
metadata (e.g. ASLoRA tie-sets) and the SHA-256 of the weights file. Every file is written to a temporary name
and renamed into place, the JSON last, so a crash leaves either the old checkpoint or the new one; a weights
file that does not match its JSON is refused. Modules trained beside the adapter (a task head) go into
`modules.safetensors` in the same folder.

Loading is strict and refuses, in one line, anything that does not fit: a JSON entry missing or of the wrong
type, a method config that does not validate, a target that is not a linear layer of the model or has another
shape, a tensor missing, unexpected or of another shape, out-of-range indices, a head tensor that matches no
tensor of the model's head (or the other way round). A refused load into a plain base model leaves it plain.

The base-weight sample: `BASE_SAMPLE_SIZE` values of every adapted module's unmerged base weight (out, in) at
fixed positions (`sample_positions`). On load each module's sample is compared with the model's: refused when
their correlation is below `MIN_CORRELATION` or the RMS of their difference exceeds `MAX_RELATIVE_DIFFERENCE`
times the saved sample's RMS. The same weights in bf16 / fp16 differ by < 1 % and 4-bit NF4 quantisation by
about 10 % (correlation ≈ 0.995); two independent initialisations differ by ≈ 140 % (correlation ≈ 0), so the
thresholds leave a wide margin on both sides. A bitsandbytes-quantized base is sampled from its dequantized
weight, so an adapter trained on a 4-bit base loads into the full-precision one and back. Weights that cannot be
read (the meta device, a sharded flat parameter) record null and are not compared; folders without a sample
(older vbshare) load unchecked.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .adapters.base import LowRankAdapter, adapters, state_of
from .checks import refuse_nonfinite
from .core import (check_adapter_tensors, check_module_tensors, freeze_adapter, head_modules, inject,
                   injected_or_undone, module_tensors, stored_tensors)
from .errors import VBShareError
from .files import atomic_torch_save, atomic_write
from .quantization import dequantized_weight, quantization_of
from .registry import get_method
from .targets import is_linear, linear_shape

__all__ = ["CONFIG_FILE", "MODULES_FILE", "WEIGHTS_FILE", "atomic_torch_save", "atomic_write", "base_sample",
           "fingerprint", "load_adapter", "read_adapter_config", "sample_positions", "save_adapter", "serialise"]

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
MODULES_FILE = "modules.safetensors"
FORMAT = "vbshare-adapter"
FORMAT_VERSION = 1
BASE_SAMPLE_SIZE = 16  # base-weight values recorded per adapted module
MIN_CORRELATION = 0.95  # below: the base's weights are not those the adapter was trained on
MAX_RELATIVE_DIFFERENCE = 0.35  # above (RMS of the difference / RMS of the saved sample): likewise
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0  # 0.618…: spreads the sampled columns evenly over any width


def fingerprint(shapes: dict[str, Sequence[int]]) -> str:
    """SHA-256 of the targeted modules' names and (out, in) shapes."""
    canonical = json.dumps({k: list(v) for k, v in sorted(shapes.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def serialise(tensors: dict[str, Tensor]) -> bytes:
    """The safetensors bytes of `tensors` (detached, contiguous, on the CPU)."""
    return safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


# -- the base-weight sample ------------------------------------------------------------------------------------
def sample_positions(out_features: int, in_features: int, n: int = BASE_SAMPLE_SIZE) -> tuple[list[int], list[int]]:
    """(rows, columns) of the n sampled entries of an (out, in) weight: row i = ⌊(i + ½)·out / n⌋ (a fixed stride
    over the rows), column i = ⌊frac(i·0.618…)·in⌋ (spread evenly over the columns). A weight with at most n
    entries is taken whole."""
    if out_features * in_features <= n:
        return ([i // in_features for i in range(out_features * in_features)],
                [i % in_features for i in range(out_features * in_features)])
    rows = [int((i + 0.5) * out_features / n) for i in range(n)]
    columns = [int(math.modf(i * _GOLDEN)[0] * in_features) for i in range(n)]
    return rows, columns


@torch.no_grad()
def _layer_sample(layer: nn.Module, merged: LowRankAdapter | None = None) -> list[float] | None:
    """The sampled entries of a linear layer's weight in (out, in) orientation, the merged adapter's ΔW taken
    out; None when the weight cannot be read as an (out, in) float tensor (meta device, packed quantised
    storage, a sharded flat parameter) or holds non-finite values."""
    out_features, in_features, transposed = linear_shape(layer)
    weight = getattr(layer, "weight", None)
    if quantization_of(layer) and isinstance(weight, Tensor) and not weight.is_meta:
        weight = dequantized_weight(layer)  # (out, in): a quantized base is compared by the weights it computes with
    shape = (in_features, out_features) if transposed else (out_features, in_features)
    if not isinstance(weight, Tensor) or weight.is_meta or not weight.is_floating_point() or tuple(weight.shape) != shape:
        return None
    if isinstance(weight, DTensor):  # an FSDP shard: reading it whole is a collective that only rank 0 would join
        return None
    rows, columns = sample_positions(out_features, in_features)
    values = (weight.T if transposed else weight)[rows, columns].double()  # (n,)
    if merged is not None:
        values = values - merged.delta_weight()[rows, columns].double().to(values.device)
    values = values.cpu()
    return [float(v) for v in values] if bool(torch.isfinite(values).all()) else None


def base_sample(model: nn.Module) -> dict[str, list[float] | None] | None:
    """Adapted module -> its base weight's sample (`sample_positions`), unmerged; None when no module's weight
    can be read (a model planned on the meta device)."""
    sample = {name: _layer_sample(a.base_layer, a if a.merged else None) for name, a in adapters(model).items()}
    return sample if any(v is not None for v in sample.values()) else None


def sample_difference(saved: Sequence[float], current: Sequence[float]) -> tuple[float, float]:
    """(correlation, relative difference) of two samples: Pearson's r (1.0 when either sample is constant, so
    that the difference decides) and RMS(current − saved) / RMS(saved) (0 when equal, inf against an all-zero
    saved sample)."""
    a, b = torch.tensor(list(saved), dtype=torch.float64), torch.tensor(list(current), dtype=torch.float64)
    difference = float((b - a).pow(2).mean().sqrt())
    scale = float(a.pow(2).mean().sqrt())
    relative = 0.0 if difference == 0 else difference / scale if scale > 0 else math.inf
    a, b = a - a.mean(), b - b.mean()
    spread = float(a.norm() * b.norm())
    correlation = float(a @ b) / spread if spread > 0 else 1.0
    return correlation, relative


def _check_base_weights(layers: dict[str, tuple[nn.Module, LowRankAdapter | None]], described: dict[str, Any],
                        directory: Path) -> None:
    """Refuse, in one line, a base whose sampled weights differ from those recorded at save time."""
    saved = described.get("base_sample")
    if not saved:
        return  # saved by a vbshare without the sample, or planned on the meta device
    differing, compared = [], 0
    for name, values in saved.items():
        if values is None or name not in layers:
            continue
        current = _layer_sample(*layers[name])
        if current is None or len(current) != len(values):
            continue
        compared += 1
        correlation, relative = sample_difference(values, current)
        if correlation < MIN_CORRELATION or relative > MAX_RELATIVE_DIFFERENCE:
            differing.append((name, correlation, relative))
    if differing:
        name, correlation, relative = differing[0]
        raise VBShareError(
            f"this base model's weights are not those the adapter in {directory} was trained on ({len(differing)} of "
            f"{compared} adapted modules differ; {name}: correlation {correlation:.2f}, relative difference "
            f"{relative:.2f} over {len(saved[name])} sampled weights); load it into its own base model, or pass "
            "check_base=False to load it anyway"
        )


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    topk_only: bool = False,
    modules: Sequence[str] | None = None,
    stored_form: bool = True,
) -> Path:
    """Save the adapter (weights only) and its JSON description into `directory`.

    Args:
        topk_only: VB-LoRA's compact inference form (indices + k−1 weights per sub-vector); it cannot be
            trained further.
        modules: names of modules to save beside the adapter in `modules.safetensors` (a classifier head);
            None (default) saves every module that trains outside the adapter (`vbshare.core.head_modules`),
            [] saves none.
        stored_form: write the method's stored form (`AdapterState.saved_form`: SoRA saves its pruned LoRA);
            False writes the training form, from which training resumes exactly (SoRA keeps its gates).
    A tensor holding NaN or infinity is refused (one VBShareError line) before anything is written.
    """
    modules = head_modules(model) if modules is None else list(modules)
    if stored_form:
        model = state_of(model).saved_form(model)
    state = state_of(model)
    directory = Path(directory)
    tensors = stored_tensors(model, topk_only=topk_only, stored_form=False)
    head = module_tensors(model, modules) if modules else {}
    refuse_nonfinite({**tensors, **head}, f"the adapter to {directory}")  # a diverged run saves nothing
    weights = serialise(tensors)
    described: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "method": state.method,
        "config": state.config.to_dict(),
        "target_spec": getattr(state, "target_spec", None),
        "targets": {k: list(v) for k, v in state.targets.items()},
        "fingerprint": fingerprint(state.targets),
        "base_sample": base_sample(model),
        "topk_only": topk_only,
        "state": state.metadata(),
        "files": {WEIGHTS_FILE: hashlib.sha256(weights).hexdigest()},
    }
    atomic_write(directory / WEIGHTS_FILE, weights)
    if modules:
        blob = serialise(head)
        atomic_write(directory / MODULES_FILE, blob)
        described["files"][MODULES_FILE] = hashlib.sha256(blob).hexdigest()
        described["modules"] = list(modules)
    atomic_write(directory / CONFIG_FILE, json.dumps(described, indent=2).encode())
    return directory


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's JSON description, validated entry by entry (`_check_schema`); one line naming the entry
    when missing, corrupt or malformed."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise VBShareError(f"{path} does not exist; point at a folder written by vbshare.save_adapter")
    try:
        described = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise VBShareError(f"{path} is corrupt ({err.msg if hasattr(err, 'msg') else err}); save the adapter again") from None
    if not isinstance(described, dict) or described.get("format") != FORMAT:
        raise VBShareError(
            f"{path} is not a vbshare adapter config (for a PEFT adapter folder use vbshare.import_peft)"
        )
    _check_schema(described, path)
    return described


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_schema(described: dict[str, Any], path: Path) -> None:
    """Every entry `save_adapter` writes, with its type; `modules` and `base_sample` may be absent (no head, an
    older folder)."""
    def bad(key: str, what: str) -> VBShareError:
        if key not in described:
            return VBShareError(f"{path} has no {key!r} entry; it is incomplete or was edited, save the adapter again")
        shown = json.dumps(described[key])
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        return VBShareError(f"{path}: {key!r} must be {what}, got {shown}; the file was edited, save the adapter again")

    if not _is_int(described.get("version")):
        raise bad("version", "an integer")
    if described["version"] > FORMAT_VERSION:
        raise VBShareError(f"{path} has format version {described['version']}, newer than this vbshare's "
                           f"{FORMAT_VERSION}; upgrade vbshare to load it")
    if not isinstance(described.get("method"), str) or not described["method"]:
        raise bad("method", "a method name")
    if not isinstance(described.get("config"), dict):
        raise bad("config", "an object of hyperparameters")
    targets = described.get("targets")
    if not (isinstance(targets, dict) and targets and all(
            isinstance(name, str) and name and isinstance(shape, list) and len(shape) == 2
            and all(_is_int(d) and d > 0 for d in shape) for name, shape in targets.items())):
        raise bad("targets", "an object mapping module names to [out, in] positive integers")
    if not isinstance(described.get("fingerprint"), str):
        raise bad("fingerprint", "a SHA-256 hex string")
    if described["fingerprint"] != fingerprint(targets):
        raise VBShareError(f"{path}: 'targets' do not match the 'fingerprint' recorded with them; the file was edited, "
                           "save the adapter again")
    if not isinstance(described.get("topk_only"), bool):
        raise bad("topk_only", "true or false")
    if not isinstance(described.get("state"), dict):
        raise bad("state", "an object (the method's metadata)")
    if "target_spec" in described and described["target_spec"] is not None and not isinstance(described["target_spec"], dict):
        raise bad("target_spec", "an object or null")
    files = described.get("files")
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                                            for k, v in files.items()) and WEIGHTS_FILE in files):
        raise bad("files", f"an object mapping file names (at least {WEIGHTS_FILE}) to SHA-256 hex strings")
    if "modules" in described:
        modules = described["modules"]
        if not (isinstance(modules, list) and all(isinstance(m, str) and m for m in modules)):
            raise bad("modules", "a list of module names")
        if modules and MODULES_FILE not in files:
            raise VBShareError(f"{path} names head modules but no {MODULES_FILE} in 'files'; save the adapter again")
    sample = described.get("base_sample")
    if sample is not None:
        if not (isinstance(sample, dict) and set(sample) <= set(targets) and all(
                values is None or (isinstance(values, list) and values and all(_is_number(v) for v in values)
                                   and len(values) == len(sample_positions(*targets[name])[0]))
                for name, values in sample.items())):
            raise bad("base_sample", "null or an object mapping targets to their sampled base weights")


def _read_checked(directory: Path, name: str, described: dict[str, Any]) -> dict[str, Tensor]:
    path = directory / name
    if not path.is_file():
        raise VBShareError(f"{path} is missing; the checkpoint is incomplete, save the adapter again")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != described["files"].get(name):
        raise VBShareError(
            f"{path} does not match the checksum in {CONFIG_FILE} (corrupt or half-written); save the adapter again"
        )
    try:
        return safetensors.torch.load(blob)
    except Exception as err:  # safetensors raises its own error types
        raise VBShareError(f"{path} is not a readable safetensors file ({err}); save the adapter again") from None


def load_adapter(model: nn.Module, directory: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Load a `save_adapter` folder into `model` (in place); injects the adapters first if needed.

    The targeted modules must exist as linear layers with the saved shapes, and (`check_base`) their weights
    must be those the adapter was saved on (the base-weight sample in the module docstring); every tensor of the
    adapter and of its head must fit the model exactly. Anything else is refused in one line, and a plain model
    is then left plain.

    Args:
        check_base: False skips the base-weight comparison, to load an adapter into another base knowingly.
    Returns the model.
    """
    directory = Path(directory)
    described = read_adapter_config(directory)
    saved_shapes = {k: tuple(v) for k, v in described["targets"].items()}
    config_path = directory / CONFIG_FILE
    adapter_class = get_method(described["method"])
    try:
        adapter_class.config_class.from_dict(described["config"], described["method"])
    except (VBShareError, TypeError) as err:
        raise VBShareError(f"{config_path}: 'config' is not a valid {described['method']} config ({err}); the file "
                           "was edited, save the adapter again") from None
    modules = dict(model.named_modules())
    state = state_of(model, required=False)
    if state is None:
        _check_base_shapes(modules, saved_shapes)
        layers = {name: (modules[name], None) for name in saved_shapes}
    elif state.method != described["method"] or state.config.to_dict() != described["config"]:
        raise VBShareError(
            f"the model carries {state.method} adapters with other hyperparameters than {directory} "
            f"({described['method']}); load into a fresh base model instead"
        )
    elif fingerprint(state.targets) != described["fingerprint"]:
        _check_base_shapes({n: a.base_layer for n, a in adapters(model).items()}, saved_shapes)
        raise VBShareError(f"the model's adapted modules differ from those of {directory}; load into a fresh base model")
    else:
        layers = {name: (a.base_layer, a if a.merged else None) for name, a in adapters(model).items()}
    if check_base:
        _check_base_weights(layers, described, directory)
    weights = _read_checked(directory, WEIGHTS_FILE, described)
    heads = list(described.get("modules") or [])
    head = _read_checked(directory, MODULES_FILE, described) if heads else {}

    with injected_or_undone(model):
        if state is None:
            inject(model, described["method"], targets=list(saved_shapes), **described["config"])
            state = state_of(model)
            if list(state.targets) != list(saved_shapes):
                raise VBShareError(f"{config_path}: 'targets' are not this model's modules in model order; load it "
                                   "into the base model it was trained on")
            state.target_spec = described.get("target_spec")
        try:
            state.load_metadata(described["state"])
        except VBShareError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:  # the method's own reader
            raise VBShareError(f"{config_path}: 'state' is not valid {described['method']} metadata "
                               f"({type(err).__name__}: {err}); the file was edited, save the adapter again") from None
        tensors = state.unpack(weights, topk_only=described["topk_only"])
        check_adapter_tensors(model, tensors, str(directory / WEIGHTS_FILE))
        check_module_tensors(model, heads, head, str(directory / MODULES_FILE))
        model.load_state_dict(tensors, strict=False)  # exactly the adapter's tensors (checked above)
        if described["topk_only"]:
            freeze_adapter(model)
        if heads:
            model.load_state_dict(head, strict=False)  # exactly the heads' tensors (checked above)
            state.head_modules = heads
    return model


def _check_base_shapes(modules: dict[str, nn.Module], saved_shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise a one-line error naming the first targeted module that is absent, not linear or shaped differently."""
    for name, shape in saved_shapes.items():
        module = modules.get(name)
        if module is None or not name:
            raise VBShareError(
                f"the adapter targets {name}, which this model does not have; load it into the base model it was trained on"
            )
        if not is_linear(module):
            raise VBShareError(
                f"the adapter targets {name}, of type {type(module).__name__}, which is not a linear layer; vbshare "
                "adapts linear layers only, load it into the base model it was trained on"
            )
        if tuple(linear_shape(module)[:2]) != tuple(shape):
            raise VBShareError(
                f"module {name} has shape (out, in) = {tuple(linear_shape(module)[:2])} but the adapter was trained on "
                f"{tuple(shape)}; load it into the base model it was trained on"
            )
