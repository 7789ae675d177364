"""What a saved or exported adapter carries beside its own tensors (the trained task head), and the file modes
of everything vbshare writes.

The head: a MiniLM classifier trained a few steps (adapter and head) must give the same logits after
`export_peft` -> `PeftModel.from_pretrained(fresh_base, dir)` and after `save_adapter(..., topk_only=True)` ->
`load_adapter(fresh_base, dir)`; the fresh base's head is drawn from another seed, so only the saved head can
make them agree. PEFT's own `modules_to_save` folders load back through `import_peft`.
"""
from __future__ import annotations

import json
import os
import stat

import peft  # the reference (dev extra); missing must fail, not skip
import pytest
import torch
from torch import nn

import vbshare
from vbshare.files import atomic_torch_save, atomic_write
from vbshare.models import load_minilm_classifier

from adapter_cases import TwoLinear

NUM_LABELS = 5
TARGETS = ["query", "value", "intermediate.dense", "output.dense"]
VB = dict(r=4, num_vectors=64, vector_length=128, topk=2)


def minilm(seed: int) -> nn.Module:
    return load_minilm_classifier(num_labels=NUM_LABELS, seed=seed)[0].eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, 5000, (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="module")
def trained_classifier() -> nn.Module:
    """MiniLM + VB-LoRA, adapter and classifier head trained three steps."""
    model = vbshare.inject(minilm(seed=0), "vblora", targets=TARGETS, **VB)
    model.classifier.requires_grad_(True)
    optimizer = torch.optim.AdamW(vbshare.param_groups(model, lr={"logits": 1e-2, "bank": 1e-2, "head": 5e-2}))
    model.train()
    for step in range(3):
        labels = torch.arange(4) % NUM_LABELS
        model(**batch(step), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(9)).logits


def test_head_detection(trained_classifier):
    assert vbshare.head_modules(trained_classifier) == ["classifier"]


@pytest.mark.parametrize("as_lora,topk_only", [(False, False), (False, True), (True, False)],
                         ids=["vblora", "vblora-topk", "as-lora"])
def test_peft_export_carries_the_trained_head(trained_classifier, tmp_path, as_lora, topk_only):
    expected = logits(trained_classifier)
    fresh = minilm(seed=1)
    assert (logits(fresh) - expected).abs().max() > 1e-2  # another head: only the export can make them agree
    vbshare.export_peft(trained_classifier, tmp_path, as_lora=as_lora, topk_only=topk_only)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]
    theirs = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(logits(theirs), expected, atol=1e-4, rtol=0)


def test_topk_save_keeps_the_head(trained_classifier, tmp_path):
    expected = logits(trained_classifier)
    vbshare.save_adapter(trained_classifier, tmp_path, topk_only=True, modules=["classifier"])
    loaded = vbshare.load_adapter(minilm(seed=1), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, atol=1e-4, rtol=0)
    # the head stays with the adapter when it is saved again (it is frozen after loading)
    vbshare.save_adapter(loaded, tmp_path / "again", topk_only=True)
    torch.testing.assert_close(logits(vbshare.load_adapter(minilm(seed=2), tmp_path / "again")), expected,
                               atol=1e-4, rtol=0)


def test_peft_modules_to_save_are_imported(tmp_path):
    torch.manual_seed(3)
    config = peft.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                             init_lora_weights=False)
    theirs = peft.get_peft_model(minilm(seed=0), config).eval()
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "modules_to_save" in name:
                param.normal_()
    theirs.save_pretrained(tmp_path)
    ours = vbshare.import_peft(minilm(seed=1), tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), atol=1e-4, rtol=0)
    assert vbshare.head_modules(ours) == ["classifier"]


# -- file modes ----------------------------------------------------------------------------------------------
@pytest.fixture
def umask():
    """Set the process umask for one test and restore it afterwards."""
    previous = os.umask(0o022)
    try:
        yield os.umask
    finally:
        os.umask(previous)


def write_everything(root) -> list:
    """Every kind of file vbshare writes: adapter folders (training and top-k form), PEFT exports (native and
    plain LoRA), a run-style JSON and YAML through atomic_write, and a torch checkpoint."""
    model = vbshare.inject(TwoLinear(), "vblora", targets=["lin0", "lin1"], r=2, num_vectors=16, vector_length=8)
    vbshare.save_adapter(model, root / "adapter")
    vbshare.save_adapter(model, root / "adapter_topk", topk_only=True)
    vbshare.export_peft(model, root / "peft")
    vbshare.export_peft(model, root / "peft_lora", as_lora=True)
    atomic_write(root / "run" / "summary.json", b"{}")
    atomic_write(root / "run" / "config.yaml", b"seed: 0\n")
    atomic_torch_save({"step": 1}, root / "run" / "checkpoint.pt")
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_open_would_give(tmp_path, umask, mask):
    umask(mask)
    with open(tmp_path / "plain", "w"):
        pass
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert plain == 0o666 & ~mask
    files = write_everything(tmp_path / "written")
    assert len(files) == 4 * 2 + 3
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(plain)}, modes
    if mask == 0o022:  # colleagues (group and others) can read every result
        assert all(int(mode, 8) & 0o044 == 0o044 for mode in modes.values())
    assert not [p for p in (tmp_path / "written").rglob("*.tmp")]


def test_a_method_peft_lacks_exports_as_plain_lora_by_default(tmp_path):
    torch.manual_seed(0)
    model = vbshare.inject(TwoLinear(), "aslora", targets=["lin0", "lin1"], r=2)
    with torch.no_grad():
        for name, param in model.vbshare.named_parameters():
            param.normal_()  # B starts at zero: give the adapter an effect
    vbshare.export_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    torch.manual_seed(0)
    theirs = peft.PeftModel.from_pretrained(TwoLinear(), tmp_path).eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(vbshare.VBShareError, match="a plain-LoRA export has no top-k form; drop topk_only=True"):
        vbshare.export_peft(model, tmp_path / "topk", topk_only=True)
