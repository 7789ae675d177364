"""`trainer.sparsify`: SoRA's sparsifying stages run by the training app after its dense training.

Tiny BERT (seconds): the stage records against a float64 soft-threshold reference computed from the dense
stage's gates, the files a run leaves, resuming, and the one-line refusals. MiniLM + few-shot BBC News (the
real small task, under a minute): retained ranks at the end differ between modules.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from vbshare.analysis import sora as S
from vbshare.errors import VBShareError
from helpers import FAST, read_jsonl, train

STAGES = ["+trainer/sparsify=default", "trainer.sparsify.stage_steps=3", "trainer.sparsify.num_stages=4"]


def gates_of(folder: Path) -> dict[str, np.ndarray]:
    """Module -> its gate values, read straight from a training-form adapter folder."""
    tensors = safetensors.torch.load_file(str(folder / "adapter_model.safetensors"))
    return {key.removesuffix(".gate"): t.double().numpy() for key, t in tensors.items() if key.endswith(".gate")}


def in_plus_out(module: str) -> int:
    """Tiny BERT (hidden 64, FFN 128): the FFN's two linears are 64 <-> 128, the attention ones 64 -> 64."""
    ffn = "intermediate" in module or (module.endswith("output.dense") and "attention" not in module)
    return 64 + 128 if ffn else 64 + 64


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny BERT: the mechanics against a hand-computed reference ------------------------------------------------
def test_stages_shrink_gates_by_the_scheduled_xi(tmp_path):
    """Constant threshold ξ and a frozen gate lr: each stage i shrinks every gate by exactly stage_steps · ξ_i,
    so the ranks each stage keeps follow from the dense stage's gates in float64 (|g| > Σ steps · ξ)."""
    xi_max, n, steps = 0.3, 4, 3
    summary = train([*FAST, "+adapter=sora", "adapter.threshold=constant", "adapter.lam=0", "adapter.lr.gate=0",
                     *STAGES, f"trainer.sparsify.max={xi_max}", "trainer.sparsify.lr_factor=0.5"], tmp_path)
    records = read_jsonl(tmp_path / "sora_stages.jsonl")
    assert [r["stage"] for r in records] == list(range(n + 1))
    xis = [xi_max * i / n for i in range(1, n + 1)]  # linear: max · i / n
    assert [r["lam"] for r in records] == pytest.approx([0.0, *xis])
    assert [r["total_steps"] for r in records] == [steps * i for i in range(n + 1)]

    dense_gates = gates_of(tmp_path / "snapshots" / "stage_00")
    r_max = 8
    assert all(int((g != 0).sum()) == r_max for g in dense_gates.values()), "ξ = 0 in the dense stage prunes nothing"
    shrink = 0.0
    for record, xi in zip(records, [0.0, *xis]):
        shrink += steps * xi
        expected = {name: int((np.abs(g) > shrink).sum()) for name, g in dense_gates.items()}
        assert record["ranks"] == expected, f"stage {record['stage']} (total shrink {shrink:.2f})"
        # the surviving gates moved by exactly the total shrink towards zero
        snap = gates_of(tmp_path / "snapshots" / f"stage_{record['stage']:02d}")
        for name, g in dense_gates.items():
            reference = np.sign(g) * np.maximum(np.abs(g) - shrink, 0.0)
            assert np.abs(snap[name] - reference).max() < 1e-5
        assert record["nonzero_params"] == sum(k * in_plus_out(m) for m, k in record["ranks"].items())
    final_ranks = records[-1]["ranks"]
    assert len(set(final_ranks.values())) > 1, f"this seed's gates should leave uneven ranks: {final_ranks}"

    # the run saved and summarised the final stage: sharing, the pruned LoRA's ranks, the headline
    assert summary["sharing"]["retained_ranks"] == final_ranks
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == "lora"  # SoRA's saved form: the pruned LoRA
    pruned = {m: saved["config"]["rank_pattern"].get(m, saved["config"]["r"]) for m in saved["targets"]}
    assert pruned == {m: k for m, k in final_ranks.items() if k}
    assert summary["steps"] == 4 + n * steps  # trainer=debug's 4 dense steps, then the stages
    assert [s["retained_rank"] for s in summary["sparsify"]["stages"]] == [r["retained_rank"] for r in records]
    assert summary["sparsify"]["stages"][-1]["generalisation_accuracy"] == records[-1]["generalisation"]["accuracy"]
    assert {s["knob"] for s in summary["sparsify"]["stages"]} == {"xi"}  # threshold=constant: ξ, named by the method

    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    stage_rows = [m for m in metrics if m.get("split") == "sparsify_stage"]
    assert [m["retained_rank"] for m in stage_rows] == [r["retained_rank"] for r in records]
    stage_steps = [m for m in metrics if "loss" in m and "split" not in m and m["step"] > 4]
    assert [m["step"] for m in stage_steps] == list(range(5, 5 + n * steps))  # the app's own steps, logged
    assert [m["lr"] for m in stage_steps] == pytest.approx([1.0e-3 * 0.5] * n * steps)  # adapter.lr.default · lr_factor

    # the analysis reads the app's run directory: one row per stage, the task metric picked by default
    table = S.stage_table(S.stage_records(tmp_path), metric=S.score_name(S.stage_records(tmp_path)))
    assert table["retained_rank"].tolist() == [r["retained_rank"] for r in records]
    assert table["generalisation"].tolist() == [r["generalisation"]["accuracy"] for r in records]


def test_memorisation_is_scored_on_a_fixed_training_subset(tmp_path):
    """memorise_examples = the whole (debug) training split: stage 0's memorisation equals a fresh
    evaluation of the dense model on the training split, so it is the train split that was scored."""
    train([*FAST, "+adapter=sora", "adapter.lam=0", *STAGES, "trainer.sparsify.memorise_examples=1000",
           "trainer.sparsify.num_stages=1", "trainer.max_steps=2"], tmp_path)
    records = read_jsonl(tmp_path / "sora_stages.jsonl")
    metrics = read_jsonl(tmp_path / "metrics.jsonl")
    validation_at_2 = next(m for m in metrics if m.get("split") == "validation" and m["step"] == 2)
    assert records[0]["generalisation"]["accuracy"] == pytest.approx(validation_at_2["accuracy"])
    assert records[0]["memorisation_rel"]["accuracy"] == 1.0


def test_interrupted_run_resumes_then_runs_every_stage(tmp_path):
    train([*FAST, "+adapter=sora", *STAGES, "trainer.stop_at_step=2"], tmp_path)
    assert not (tmp_path / "sora_stages.jsonl").exists()  # stopped inside the dense stage: no stage yet
    summary = train([*FAST, "+adapter=sora", *STAGES, f"trainer.resume={tmp_path}"], tmp_path)
    records = read_jsonl(tmp_path / "sora_stages.jsonl")
    assert [r["stage"] for r in records] == [0, 1, 2, 3, 4]
    assert summary["steps"] == 4 + 4 * 3
    assert summary["sharing"]["retained_ranks"] == records[-1]["ranks"]


@pytest.mark.parametrize("overrides, message", [
    (["+adapter=lora"], "lora has no sparsity knob"),
    ([], "trains no adapter"),
    (["+adapter=sora", "+trainer.sparsify.ramp=1"], "unknown sparsifying-schedule key"),
    (["+adapter=sora", "trainer.sparsify.schedule=cosine"], "schedule must be one of"),
    (["+adapter=sora", "+trainer.sparsify.dense_steps=3"], "dense stage is the normal training"),
    (["+adapter=sora", "trainer.sparsify.memorise_examples=0"], "memorise_examples"),
])
def test_bad_sparsify_settings_are_refused_before_training(tmp_path, overrides, message):
    with pytest.raises(VBShareError, match=message):
        train([*FAST, *overrides, *STAGES], tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists(), "refused before the first step"


def test_score_vs_retained_plots_one_point_per_stage():
    """Hand-built records: the figure's points are (retained rank, score) and (non-zero params, score)."""
    ranks = [{"a": 4, "b": 4}, {"a": 3, "b": 1}, {"a": 1, "b": 0}]
    records = [{"stage": i, "lam": lam, "total_steps": 5 * i, "ranks": r, "r_max": 4,
                "retained_rank": sum(r.values()), "nonzero_params": 10 * sum(r.values()),
                "param_fraction": sum(r.values()) / 8, "memorisation": {"f1": mem, "accuracy": 0.0},
                "generalisation": {"f1": gen, "accuracy": 0.0}}
               for i, (lam, r, mem, gen) in enumerate(zip([0, 1, 2], ranks, [0.9, 0.95, 0.5], [0.7, 0.75, 0.4]))]
    assert S.score_name(records) == "f1"
    fig = S.plot_score_vs_retained(S.stage_table(records, metric="f1"), metric="f1")
    by_rank, by_params = fig.axes[0], fig.axes[1]
    generalisation = [line for line in by_rank.lines if line.get_label() == "generalisation"][0]
    assert generalisation.get_xydata().tolist() == [[8, 0.7], [4, 0.75], [1, 0.4]]
    memorisation = [line for line in by_params.lines if line.get_label() == "memorisation"][0]
    assert memorisation.get_xydata().tolist() == [[80, 0.9], [40, 0.95], [10, 0.5]]
    assert by_rank.get_xlim()[0] == 0 and by_params.get_xlim()[0] == 0 and by_rank.get_ylim() == (0, 1.08)


# -- MiniLM + few-shot BBC News: the real small task -----------------------------------------------------------
def test_minilm_bbc_news_ranks_differ_between_modules(tmp_path):
    """Pretrained MiniLM, 16 articles per topic, SoRA with gate_init=normal (the default) on layers 3-5:
    10 dense steps, then 3 stages of 5 steps with λ rising linearly to 60 (τ = lr_gate · λ = up to 0.06 per
    step). The ranks kept at the end differ between modules: neither all equal nor all zero."""
    summary = train(["+adapter=sora", "+adapter.layers=[3,4,5]", "data.train_per_class=16", "trainer.max_steps=10",
                     "trainer.eval_every=1000", "trainer.checkpoint_every=null", "trainer.max_examples=64",
                     "trainer.eval_test=false", "trainer.progress_bar=false", "trainer.num_threads=1",
                     "+trainer/sparsify=default", "trainer.sparsify.num_stages=3", "trainer.sparsify.stage_steps=5",
                     "trainer.sparsify.max=60", "trainer.sparsify.memorise_examples=32",
                     "trainer.sparsify.snapshots=false"], tmp_path)
    records = read_jsonl(tmp_path / "sora_stages.jsonl")
    totals = [r["retained_rank"] for r in records]
    assert all(a >= b for a, b in zip(totals, totals[1:])), f"retained rank should not grow as λ rises: {totals}"
    final = records[-1]["ranks"]
    assert len(final) == 18  # 6 module kinds × layers 3-5
    assert len(set(final.values())) > 1, f"every module kept the same rank: {final}"
    assert any(final.values()), "every rank was pruned"
    assert summary["sharing"]["retained_ranks"] == final
