"""Settings are checked before anything starts, a diverging run stops (or skips the step) without writing a
non-finite tensor anywhere, and a failed write is one line with the last checkpoint intact.

The command lines run in-process (`vbshare.train.app.main`, `vbshare.compare.main` with sys.argv set) on tiny
BERT with trainer=debug; the settings and the step are also tested as functions.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file
from torch import nn

import vbshare
from vbshare.files import read_tensors
from vbshare import compare as compare_app
from vbshare.adapters.lora import LoRA
from vbshare.errors import VBShareError, WriteError
from vbshare.train import CONFIG_DIR, run_training, train_step
from vbshare.train import app as train_app
from vbshare.train import loop as train_loop
from vbshare.train.checkpoints import read_trainer_state
from vbshare.train.loop import Diverged
from vbshare.train.settings import TrainerSettings, read_settings
from vbshare.train.step import NonFiniteStep

FAST = ["model=tiny_bert", "trainer=debug", "data.max_length=32"]
def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(name, overrides=overrides)


def cli(entry, args: list[str], monkeypatch, capsys) -> tuple[int, list[str]]:
    """Run a console entry in-process: (exit status, stderr lines)."""
    monkeypatch.delenv("VBSHARE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # restored after the test (main() sets it)
    monkeypatch.setattr(sys, "argv", ["vbshare", *args])
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as stopped:
            entry()
    finally:
        GlobalHydra.instance().clear()
    return stopped.value.code, capsys.readouterr().err.strip().splitlines()


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor in every .safetensors and .pt file under `folder` (read without unpickling code)."""
    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        found.update({f"{path}:{k}": v for k, v in load_file(str(path)).items()})
    for path in sorted(folder.rglob("*.pt")):
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
        assert not names, f"{path} needs {names} to load: a checkpoint must hold tensors and plain values only"
        state = torch.load(path, map_location="cpu", weights_only=True)
        stack = [(str(path), state)]
        while stack:
            name, value = stack.pop()
            if isinstance(value, torch.Tensor):
                found[name] = value
            elif isinstance(value, dict):
                stack.extend((f"{name}.{k}", v) for k, v in value.items())
            elif isinstance(value, (list, tuple)):
                stack.extend((f"{name}.{i}", v) for i, v in enumerate(value))
    return found


def assert_all_finite(folder: Path) -> int:
    tensors = saved_tensors(folder)
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, bad[:5]
    return len(tensors)


# -- the settings ------------------------------------------------------------------------------------------------
def test_settings_are_the_yaml_values_and_the_yaml_is_their_only_default():
    """Every trainer / optim key as configs/ writes it (read with yaml, not through the app), no key missing from
    the dataclass, and a key taken out of the config is an error rather than a default from the code."""
    settings = read_settings(compose_config("train", ["+adapter=lora"]))
    trainer_yaml = yaml.safe_load((CONFIG_DIR / "trainer" / "default.yaml").read_text())
    optim_yaml = yaml.safe_load((CONFIG_DIR / "optim" / "adamw.yaml").read_text())
    assert {k: getattr(settings.trainer, k) for k in trainer_yaml} == trainer_yaml
    assert {k: getattr(settings.optim, k) for k in optim_yaml} == optim_yaml
    assert settings.trainer.nonfinite == "stop"
    assert settings.adapter_lr == {"A": 1e-3, "B": 1e-3, "head": 5e-3}
    assert settings.seed == 0 and settings.data.max_length == 64 and settings.data.fractions is None
    with pytest.raises(VBShareError, match=r"^trainer.nonfinite is missing from the config"):
        read_settings(compose_config("train", ["~trainer.nonfinite"]))
    with pytest.raises(VBShareError, match=r"^trainer.typo is not a setting; the trainer keys are: max_steps, "):
        read_settings(compose_config("train", ["+trainer.typo=1"]))


@pytest.mark.parametrize("seeds, expected", [("3", [0, 1, 2]), ("1", [0]), ("[4,2]", [4, 2])])
def test_compare_seeds_a_count_means_zero_to_n_minus_one(seeds, expected):
    assert read_settings(compose_config("compare", [f"compare.seeds={seeds}"])).compare.seeds == expected


@pytest.mark.parametrize("override, message", [
    ("compare.seeds=0", "compare.seeds must be a number of seeds N >= 1 (seeds 0 to N-1) or a list of distinct"),
    ("compare.seeds=[1,1]", "compare.seeds must be a number of seeds N >= 1"),
    ("compare.seeds=[a]", "compare.seeds must be an integer from 0 to 4294967295, got 'a'"),
    ("compare.trials=0", "compare.trials must be a positive integer, got 0"),
    ("compare.workers=0", "compare.workers must be a whole number >= 1 (runs trained at a time), got 0"),
    ("compare.methods=[lora,lora]", "compare.methods lists a method twice: ['lora', 'lora']"),
    ("compare.control=nope", "compare.control=nope is not in compare.methods"),
])
def test_bad_compare_settings(override, message):
    with pytest.raises(VBShareError, match=re.escape(message)) as info:
        read_settings(compose_config("compare", [override]))
    assert "\n" not in str(info.value)


# Every bad setting: (overrides, the exact error line). All are refused before a model is built, except the two
# adapter hyperparameters, which vbshare.inject refuses before it allocates anything.
BAD_SETTINGS = {
    "batch_size=0": (["trainer.batch_size=0"], "trainer.batch_size must be a positive integer, got 0"),
    "batch_size=-4": (["trainer.batch_size=-4"], "trainer.batch_size must be a positive integer, got -4"),
    "eval_every=0": (["trainer.eval_every=0"], "trainer.eval_every must be a positive integer, got 0"),
    "log_every=0": (["trainer.log_every=0"], "trainer.log_every must be a positive integer, got 0"),
    "eval_batch_size=0": (["trainer.eval_batch_size=0"], "trainer.eval_batch_size must be a positive integer, got 0"),
    "max_steps=-5": (["trainer.max_steps=-5"], "trainer.max_steps must be a positive integer, got -5"),
    "seed=abc": (["seed=abc"], "seed must be an integer from 0 to 4294967295, got 'abc'"),
    "warmup_ratio=-1": (["optim.warmup_ratio=-1"], "optim.warmup_ratio must be a number in [0, 1], got -1"),
    "lr.A=-1e-3": (["adapter.lr.A=-1e-3"], "adapter.lr.A must be a finite number >= 0, got -0.001"),
    "lr.A=inf": (["adapter.lr.A=inf"], "adapter.lr.A must be a finite number >= 0, got inf"),
    "lr.A=nan": (["adapter.lr.A=nan"], "adapter.lr.A must be a finite number >= 0, got nan"),
    "lr=-1": (["adapter.lr=-1"], "adapter.lr must be a finite number >= 0 or a mapping role -> number, got -1"),
    "full_finetune_lr=-1e-4": (["optim.full_finetune_lr=-1e-4"],
                               "optim.full_finetune_lr must be a finite number >= 0, got -0.0001"),
    "grad_accum_steps=0": (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps must be a positive integer, got 0"),
    "nonfinite=ignore": (["trainer.nonfinite=ignore"], "trainer.nonfinite must be one of stop, skip_step, got 'ignore'"),
    "precision=fp8": (["trainer.precision=fp8"], "trainer.precision must be one of fp32, bf16, fp16, got 'fp8'"),
    "dropout=1": (["trainer.dropout=1"], "trainer.dropout must be null or in [0, 1), got 1"),
    "lr_factor=0": (["+trainer/sparsify=default", "trainer.sparsify.lr_factor=0"],
                    "trainer.sparsify.lr_factor must be a number > 0, got 0"),
    "alpha=big": (["adapter.alpha=big"], "alpha must be positive (a finite number > 0) or None, got 'big'"),
    "forgetting_eval on a classifier": (["trainer.forgetting_eval=true"],
                                        "trainer.forgetting_eval=true scores a causal LM on general text; this run's "
                                        "model is a classification model, set trainer.forgetting_eval=false"),
    "r=1000000000": (["adapter.r=1000000000"],
                     "r=1000000000 is larger than any target can use: the largest, "
                     "bert.encoder.layer.0.intermediate.dense (out=128, in=64), has 8192 weights; choose r <= 8192"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_cli_bad_setting_is_one_line_before_training(case, tmp_path, monkeypatch, capsys):
    overrides, message = BAD_SETTINGS[case]
    status, lines = cli(train_app.main, ["+adapter=lora", *FAST, *overrides, f"hydra.run.dir={tmp_path}"],
                        monkeypatch, capsys)
    assert status == 2 and lines == [f"error: {message}"]
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint").exists()


# -- adapter hyperparameters ---------------------------------------------------------------------------------
class TwoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(16, 32), nn.Linear(32, 16)  # (out, in) = (32, 16), (16, 32)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def two_linear() -> nn.Module:
    torch.manual_seed(0)
    return TwoLinear()


@pytest.mark.parametrize("method, bad, message", [
    *[(m, {"alpha": "big"}, r"^alpha must be positive \(a finite number > 0\) or None, got 'big'$")
      for m in ("lora", "sora", "tied_lora", "nola", "aslora")],
    ("lora", {"alpha": float("nan")}, "alpha must be positive"),
    ("lora", {"rslora": "yes"}, "rslora must be true or false, got 'yes'"),
    ("lora", {"alpha_pattern": {"0": 0}}, r"alpha_pattern\['0'\] must be a finite number > 0, got 0"),
    ("lora", {"dropout": "x"}, r"dropout must be in \[0, 1\), got 'x'"),
    ("lora", {"r": True}, "r must be a positive integer, got True"),
    ("sora", {"lam": True}, "lam must be a finite number >= 0, got True"),
    ("aslora", {"share_ratio": "x"}, r"share_ratio must be in \[0, 1\] or None, got 'x'"),
    ("aslora", {"merge_every": True}, "merge_every must be a positive integer, got True"),
    ("aslora", {"seed": 1.5}, "seed must be an integer, got 1.5"),
    ("vblora", {"vector_length": 8, "init_logits_std": "x"}, "init_logits_std must be a finite number >= 0"),
    ("vblora", {"vector_length": 8, "scale": float("inf")}, "scale must be a finite number, got inf"),
    ("tied_lora", {"seed": "x"}, "seed must be an integer, got 'x'"),
])
def test_bad_hyperparameter_is_one_line(method, bad, message):
    with pytest.raises(VBShareError, match=message) as info:
        vbshare.inject(two_linear(), method, targets="all-linear", **bad)
    assert "\n" not in str(info.value)


def test_a_rank_no_target_can_use_is_refused_before_allocating():
    """Above the largest target's out x in (here 32 x 16 = 512) nothing is allocated, whatever the method."""
    vbshare.inject(two_linear(), "lora", targets="all-linear", r=512)  # the largest rank still accepted
    for method in vbshare.METHODS:
        extra = {"vector_length": 8} if method == "vblora" else {}
        with pytest.raises(VBShareError, match=r"^r=513 is larger than any target can use: the largest, lin0 \(out=32, "
                                                r"in=16\), has 512 weights; choose r <= 512$"):
            vbshare.inject(two_linear(), method, targets="all-linear", r=513, **extra)


def test_an_allocation_failure_during_inject_is_one_line_and_leaves_the_model_as_it_was(monkeypatch):
    model = two_linear()
    model.lin1.requires_grad_(False)  # a frozen layer stays frozen, a trainable one trainable
    x = torch.randn(4, 16)
    before = model(x).detach()
    built = []

    def fail_second(self, base_layer, name, config, state):
        if built:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 262144000000 bytes.")
        built.append(name)
        original(self, base_layer, name, config, state)

    original = LoRA.__init__
    monkeypatch.setattr(LoRA, "__init__", fail_second)
    with pytest.raises(VBShareError, match=r"^lora adapters with .* do not fit in memory \(\[enforce fail .*you tried "
                                           r"to allocate 262144000000 bytes\.\); choose smaller hyperparameters") as info:
        vbshare.inject(model, "lora", targets="all-linear")
    assert "\n" not in str(info.value)
    assert isinstance(model.lin0, nn.Linear) and vbshare.state_of(model, required=False) is None
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False]
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


# -- the numeric guard in the step ---------------------------------------------------------------------------
class ScalingEngine:
    """The engine surface train_step uses, with fp16's gradient scaler on (no processes, no real scaling)."""

    num_processes, scales_gradients = 1, True

    def __init__(self):
        self.skipped = 0

    def no_sync(self):
        import contextlib
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def sum_over_processes(self, value):
        return value

    def skip_update(self):
        self.skipped += 1


def lora_model() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = vbshare.inject(two_linear(), "lora", targets="all-linear", r=2)
    with torch.no_grad():
        for adapter in vbshare.adapters(model).values():
            adapter.lora_B.normal_()  # so A's gradient is not zero either
    return model, torch.optim.AdamW(vbshare.param_groups(model, lr=1e-2))


def test_a_nonfinite_loss_or_gradient_changes_nothing_then_stops_or_skips():
    model, optimizer = lora_model()
    x = torch.randn(8, 16)
    weights = {k: v.clone() for k, v in vbshare.adapter_state_dict(model).items()}
    with pytest.raises(NonFiniteStep, match=r"^loss became nan at step 3; lower the learning rate"):
        train_step(model, optimizer, lambda: model(x).pow(2).mean() * float("nan"), 3)
    name, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: grad * float("inf"))
    stats = train_step(model, optimizer, lambda: model(x).pow(2).mean(), 4, nonfinite="skip_step")
    hook.remove()
    assert stats.skipped and math.isinf(stats.grad_norm) and math.isfinite(stats.loss)
    assert not optimizer.state, "optimizer.step() never ran"
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in vbshare.adapter_state_dict(model).items())
    stats = train_step(model, optimizer, lambda: model(x).pow(2).mean(), 5)  # a finite step goes through
    assert not stats.skipped and math.isfinite(stats.grad_norm) and len(optimizer.state) > 0


def test_gradient_norm_without_clipping_equals_the_float64_norm():
    model, optimizer = lora_model()
    x = torch.randn(8, 16)
    model(x).pow(2).mean().backward()
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.zero_grad()
    stepped = []
    optimizer.step = lambda: stepped.append({n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None})
    stats = train_step(model, optimizer, lambda: model(x).pow(2).mean(), 1)
    assert float(stats.grad_norm) == pytest.approx(expected, rel=1e-6)
    assert all(torch.equal(stepped[0][n], g) for n, g in grads.items())  # measured, not changed


def test_under_a_gradient_scaler_infinite_gradients_are_its_normal_skipped_steps():
    model, optimizer = lora_model()
    x = torch.randn(8, 16)
    engine, stepped = ScalingEngine(), []
    optimizer.step = lambda: stepped.append(True)  # the scaler's step would skip the update itself
    _, param = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    hook = param.register_hook(lambda grad: grad * float("inf"))
    stats = train_step(model, optimizer, lambda: model(x).pow(2).mean(), 1, engine=engine)
    hook.remove()
    assert not stats.skipped and stepped == [True] and engine.skipped == 0
    with pytest.raises(NonFiniteStep, match="^loss became inf at step 2"):  # the loss is still checked
        train_step(model, optimizer, lambda: model(x).pow(2).mean() * float("inf"), 2, engine=engine)
    assert engine.skipped == 1 and stepped == [True]  # the scaler's step closed, no update


def test_save_adapter_refuses_nonfinite_tensors(tmp_path):
    model, _ = lora_model()
    with torch.no_grad():
        vbshare.adapters(model)["lin1"].lora_A[0, 0] = float("nan")
    with pytest.raises(VBShareError, match=r"^not writing the adapter to .*: lin1\.lora_A holds NaN or infinite values"):
        vbshare.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


# -- a diverging run -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, lr_key", [
    (["+adapter=lora", "adapter.lr.A=1e30"], "adapter.lr"),
    (["+adapter=lora", "adapter.lr.A=1e30", "trainer.checkpoint_every=1", "trainer.snapshot_every=1"], "adapter.lr"),
    (["optim.full_finetune_lr=1e30", "trainer.checkpoint_every=1"], "optim.full_finetune_lr"),
])
def test_cli_diverging_run_stops_with_one_line_and_saves_nothing_nonfinite(overrides, lr_key, tmp_path,
                                                                         monkeypatch, capsys):
    status, lines = cli(train_app.main, [*FAST, *overrides, f"hydra.run.dir={tmp_path}"], monkeypatch, capsys)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and f"; lower the learning rate ({lr_key}) or set trainer.nonfinite=" \
        "skip_step" in lines[0], lines
    assert Diverged.said_in(lines[0])  # what vbshare.compare reads from a run's output: a failed trial
    step = int(lines[0].split(" at step ")[1].split(";")[0])
    assert lines[0].startswith(("error: loss became nan at step", "error: loss became inf at step",
                                "error: gradient norm became"))
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "adapter").exists()
    assert_all_finite(tmp_path)
    if "trainer.checkpoint_every=1" in overrides and step > 1:  # the last good step's checkpoint is kept
        assert read_trainer_state(tmp_path)["step"] == step - 1


def test_a_diverged_job_of_a_sweep_is_a_failed_trial_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["-m", "+adapter=lora", *FAST, "adapter.lr.A=1e30,1e-3", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    monkeypatch.delenv("VBSHARE_DEBUG", raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["vbshare.train", *args])
    try:
        train_app.main()  # returns: no job ended the process
    finally:
        GlobalHydra.instance().clear()
    assert not (tmp_path / "sweep" / "0" / "summary.json").exists()
    assert json.loads((tmp_path / "sweep" / "1" / "summary.json").read_text())["steps"] == 4
    assert Diverged.said_in((tmp_path / "sweep" / "0" / "train.log").read_text())


def nan_at(step_index: int, monkeypatch) -> None:
    """Optimiser step `step_index` (from 0) computes a NaN loss."""
    original = train_loop.micro_losses

    def poisoned(run, step):
        losses = original(run, step)
        return [lambda f=f: f() * float("nan") for f in losses] if step == step_index else losses

    monkeypatch.setattr(train_loop, "micro_losses", poisoned)


def test_skip_step_drops_the_update_and_counts_it(tmp_path, monkeypatch):
    nan_at(1, monkeypatch)
    with pytest.raises(VBShareError, match=r"^loss became nan at step 2; lower the learning rate \(adapter.lr\) or "
                                           r"set trainer.nonfinite=skip_step$"):
        run_training(compose_config("train", ["+adapter=lora", *FAST]), tmp_path / "stop")
    assert not (tmp_path / "stop" / "checkpoint").exists()  # stopped before step 2's checkpoint: none written
    assert not (tmp_path / "stop" / "adapter").exists() and not (tmp_path / "stop" / "summary.json").exists()

    summary = run_training(compose_config("train", ["+adapter=lora", *FAST, "trainer.nonfinite=skip_step"]),
                           tmp_path / "skip")
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    state = read_trainer_state(tmp_path / "skip")
    assert state["skipped_steps"] == 1
    tensors = read_tensors(tmp_path / "skip" / "checkpoint" / "trainer_tensors.pt")
    assert {int(s["step"]) for s in tensors["optimizer"]["state"].values()} == {3}  # AdamW stepped 3 times of 4
    rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    train_rows = {r["step"]: r for r in rows if "split" not in r}
    assert train_rows[2]["loss"] is None and train_rows[2]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for s, r in train_rows.items() if s != 2)
    assert assert_all_finite(tmp_path / "skip") > 0


class DivergingRunner(compare_app.Runner):
    """A learning rate above 1e-2 diverges; below, the score is a fixed function of it."""

    def run(self, overrides, run_dir):
        lr = float(next(o for o in overrides if o.startswith("++adapter.lr.A=")).split("=")[1])
        if lr > 1e-2:
            raise Diverged(f"the run in {run_dir} diverged: loss became nan at step 2; lower the learning rate "
                           "(adapter.lr) or set trainer.nonfinite=skip_step")
        return {"metric": "accuracy", "final": {"validation": {"accuracy": -abs(math.log10(lr) + 2.5)}}}


def test_compare_tells_a_diverged_trial_as_failed_and_goes_on(tmp_path):
    from tqdm import tqdm

    settings = read_settings(compose_config("compare", ["compare.methods=[lora]", "compare.trials=8"])).compare
    point = compare_app.Point("lora", "lora", {"lr.A": {"low": 1.0e-4, "high": 1.0, "log": True}})
    with tqdm(disable=True) as bar:
        trials = compare_app.tune(point, settings, 0, [], DivergingRunner(isolate=True), tmp_path, bar)
    diverged = [t for t in trials if t.params["lr.A"] > 1e-2]
    assert len(trials) == 8 and diverged and all(math.isnan(t.score) and not t.best for t in diverged)
    best = [t for t in trials if t.best]
    assert len(best) == 1 and best[0].score == max(t.score for t in trials if t.finite)


# -- failed writes ---------------------------------------------------------------------------------------------
def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_is_one_line_and_the_last_checkpoint_stays(tmp_path, monkeypatch):
    common = ["+adapter=lora", *FAST]
    assert run_training(compose_config("train", [*common, "trainer.stop_at_step=2"]), tmp_path) is None
    before = (tmp_path / "checkpoint" / "adapter" / "adapter_model.safetensors").read_bytes()
    monkeypatch.setattr(os, "fsync", no_space)  # every atomic write fails from here on, as on a full disk
    with pytest.raises(VBShareError) as info:
        run_training(compose_config("train", [*common, f"trainer.resume={tmp_path}"]), tmp_path)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value.__cause__, WriteError)
    assert message.startswith(f"cannot write {tmp_path}/") and ": No space left on device; free space on that " \
        f"disk, or write to another one; then continue with trainer.resume={tmp_path} (its last checkpoint is " \
        "intact)" in message, message
    monkeypatch.undo()
    assert read_trainer_state(tmp_path)["step"] == 2
    assert (tmp_path / "checkpoint" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_compare_unwritable_folder_is_one_line(tmp_path, monkeypatch, capsys):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "fsync", denied)
    out = tmp_path / "cmp"
    status, lines = cli(compare_app.main, [*FAST, "compare.methods=[lora]", "compare.trials=1", "compare.seeds=1",
                                           "compare.isolate=false", f"compare.out={out}"], monkeypatch, capsys)
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]  # the rest: progress bars
    # the first write is the folder's owner record, taken before Hydra writes there (one writer per folder)
    assert status == 2 and errors == lines[-1:] == [
        f"error: cannot write {out}/.writer.json: Permission denied; make the folder writable for you, or write "
        "elsewhere"]


def test_compare_write_failure_mid_run_says_how_to_continue(tmp_path, monkeypatch, capsys):
    calls = []

    def denied_after_the_owner_record(fd):  # the owner record is written first, then the first run's request
        calls.append(fd)
        if len(calls) > 1:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "fsync", denied_after_the_owner_record)
    out = tmp_path / "cmp"
    status, lines = cli(compare_app.main, [*FAST, "compare.methods=[lora]", "compare.trials=1", "compare.seeds=1",
                                           "compare.isolate=false", f"compare.out={out}"], monkeypatch, capsys)
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert status == 2 and errors == lines[-1:] == [
        f"error: cannot write {out}/stage1/lora/trial_000/request.json: Permission denied; make the folder writable "
        f"for you, or write elsewhere; then run the comparison again with compare.out={out}: finished runs are reused"]


def test_write_error_is_still_the_os_error():
    err = None
    try:
        vbshare.files.atomic_write(Path("/proc/vbshare-cannot-write/x.json"), b"{}")
    except OSError as caught:
        err = caught
    assert isinstance(err, WriteError) and isinstance(err, VBShareError) and err.errno is not None
    assert str(err).startswith("cannot write /proc/vbshare-cannot-write/x.json: ")


def test_every_precision_setting_has_an_engine_precision():
    from vbshare.train.engine import ACCELERATE_PRECISION
    from vbshare.train.settings import PRECISIONS

    assert set(ACCELERATE_PRECISION) == set(PRECISIONS)


def test_trainer_settings_fields_follow_the_yaml_order():
    """One field per key of configs/trainer/default.yaml, in its order (the YAML is the reference)."""
    keys = list(yaml.safe_load((CONFIG_DIR / "trainer" / "default.yaml").read_text()))
    assert [f for f in TrainerSettings.__dataclass_fields__] == keys
