"""vbshare.report on hand-made run directories: means, 95 % t-intervals and paired t-tests checked against values
worked out by hand; tasks and metrics never mixed; labels, order and the written files."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from vbshare import report
from vbshare.report import plots
from vbshare.errors import VBShareError


def make_run(root: Path, name: str, method: str, seed: int, score: float, stored: float,
             hyper: dict | None = None, wall: float = 10.0, adapter_bytes: int | None = 1000,
             sharing: dict | None = None, task: str = "bbc_news", metric: str = "accuracy",
             size_key: str | None = None, curve: list[tuple[int, float]] = (), predictions: list[dict] | None = None,
             stages: list[dict] | None = None, sparsify: dict | None = None) -> Path:
    """A finished run's folder; `predictions`: predictions.jsonl rows; `stages` with `sparsify` (the schedule in
    config.yaml): summary.json's sparsify.stages."""
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "method": method, "task": task, "model": "minilm", "metric": metric,
        "hyperparameters": {"targets": ["query"], **(hyper or {})},
        "final": {"validation": {metric: score - 0.01}, "test": {metric: score}},
        "best": None, "steps": 300, "trainable_parameters": int(stored) + 5, "head_parameters": 5,
        "stored_parameters": stored, "sharing": sharing, "adapter_bytes": adapter_bytes,
        "wall_time_s": wall, "peak_memory_mb": 500.0 + seed,
    }
    if stages is not None:
        summary["sparsify"] = {"stages": stages}
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"seed": seed, "trainer": {"max_steps": 300, "batch_size": 16, "max_examples": None, "sparsify": sparsify},
              "data": {"_target_": "vbshare.data.tasks.bbc_news", "seed": 0, "max_length": 64,
                       "train_subset_seed": seed},  # follows the run seed: must not split the configuration
              "optim": {"full_finetune_lr": 1e-4},
              "adapter": {"method": method, **({"size_key": size_key} if size_key else {})}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": step, "split": "validation", metric: value} for step, value in curve]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if predictions is not None:
        (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in predictions))
    return run


# Hand computation (no scipy): t quantiles from the closed forms of Student's t with 1 and 2 degrees of freedom,
#   df=1 (Cauchy):  t_{0.975} = tan(pi * (0.975 - 0.5)) = 12.706205,   two-sided p(t) = 1 - (2/pi) * atan(|t|)
#   df=2:           t_{0.975} = (2*0.975 - 1) * sqrt(2 / (4*0.975*0.025)) = 4.302653,   p(t) = 1 - |t| / sqrt(t^2 + 2)
T975_DF2, T975_DF1 = 4.302653, 12.706205
# lora (control), seeds 0,1,2: 0.88 0.91 0.90 -> mean 0.896667, deviations (-5, 4, 1)/300, SS = 42/90000,
#   std = sqrt(SS/2) = 0.0152753, half-width = 4.302653 * 0.0152753 / sqrt(3) = 0.0379460
# vblora, seeds 0,1,2: 0.90 0.92 0.94 -> mean 0.92, std 0.02, half-width = 4.302653 * 0.02 / sqrt(3) = 0.0496828
#   paired differences vs lora (0.02, 0.01, 0.04): mean 7/300, sd sqrt(7/3)/100, t = sqrt(7) = 2.6457513,
#   p = 1 - sqrt(7)/3 = 0.1180829; difference CI: 7/300 ± 4.302653 * 0.0152753 / sqrt(3) = 0.0233333 ± 0.0379460
# sora, seeds 0,1: 0.85 0.87 -> mean 0.86, std 0.0141421, half-width = 12.706205 * 0.0141421 / sqrt(2) = 0.1270621
#   paired differences vs lora seeds 0,1 (-0.03, -0.04): mean -0.035, sd 0.0070711, t = -7,
#   p = 1 - (2/pi) atan(7) = 0.0903344; difference CI: -0.035 ± 12.706205 * 0.0070711 / sqrt(2) = -0.035 ± 0.0635310
LORA = [0.88, 0.91, 0.90]
VBLORA = [0.90, 0.92, 0.94]
SORA = [0.85, 0.87]


@pytest.fixture
def runs_root(tmp_path):
    root = tmp_path / "sweep"
    for seed, acc in enumerate(LORA):
        make_run(root, f"lora_{seed}", "lora", seed, acc, 1000.0, {"r": 8, "lr": {"A": 1e-3}}, wall=10 + seed,
                 size_key="r", curve=[(100, 0.5 + seed / 10), (200, 0.8)])
    for seed, acc in enumerate(VBLORA):
        make_run(root, f"vblora_{seed}", "vblora", seed, acc, 50.0, {"r": 4, "num_vectors": 64, "lr": {"bank": 0.01}},
                 size_key="num_vectors", curve=[(100, 0.6), (200, 0.85)])
    make_run(root, "vblora_big", "vblora", 0, 0.80, 80.0, {"r": 4, "num_vectors": 128, "lr": {"bank": 0.002}},
             size_key="num_vectors")  # dominated, one seed
    for seed, acc in enumerate(SORA):
        make_run(root, f"sora_{seed}", "sora", seed, acc, 600.0, {"r": 8, "lam": 3},
                 sharing={"retained_rank": 5, "retained_ranks": {"a": 3, "b": 2}})  # as SoRA reports it
    make_run(root, "full_0", "full_finetune", 0, 0.95, 2.0e7, {"lr": 1e-4}, adapter_bytes=None)
    make_run(root, "head_0", "head_only", 0, 0.70, 0.0, {"lr": {"head": 5e-3}})
    make_run(root, "head_1", "head_only", 1, 0.72, 0.0, {"lr": {"head": 5e-3}})
    return root


def test_mean_ci_and_paired_p_by_hand():
    mean, std, low, high = report.mean_ci(VBLORA)
    assert (mean, std) == (pytest.approx(0.92), pytest.approx(0.02))
    assert (low, high) == (pytest.approx(0.92 - 0.0496828, abs=1e-6), pytest.approx(0.92 + 0.0496828, abs=1e-6))
    mean, std, low, high = report.mean_ci(SORA)
    assert (low, high) == (pytest.approx(0.86 - 0.1270621, abs=1e-6), pytest.approx(0.86 + 0.1270621, abs=1e-6))
    assert report.paired_p(VBLORA, LORA) == pytest.approx(1 - math.sqrt(7) / 3, abs=1e-6)
    assert report.paired_p(SORA, LORA[:2]) == pytest.approx(1 - 2 / math.pi * math.atan(7), abs=1e-6)
    one = report.mean_ci([0.5])
    assert one[:2] == (0.5, 0.0) and math.isnan(one[2]) and math.isnan(one[3])
    assert math.isnan(report.paired_p([0.5], [0.4]))                 # one pair: no test
    assert math.isnan(report.paired_p([0.5, 0.6], [0.4, 0.5]))       # constant differences: t undefined


def test_summarise_columns_by_hand(runs_root):
    table = report.summarise(report.collect_runs(runs_root), control="lora").set_index("label")
    assert len(table) == 6  # train_subset_seed differs per seed but does not split a configuration
    lora, vblora, sora = table.loc["lora"], table.loc["vblora num_vectors=64"], table.loc["sora"]
    assert lora["n_seeds"] == 3 and lora["metric_mean"] == pytest.approx(0.896667, abs=1e-6)
    assert lora["metric_std"] == pytest.approx(0.0152753, abs=1e-6)
    assert lora["ci95_low"] == pytest.approx(0.896667 - 0.0379460, abs=1e-6)
    assert lora["ci95_high"] == pytest.approx(0.896667 + 0.0379460, abs=1e-6)
    assert math.isnan(lora["p_vs_control"]) and lora["pct_of_control"] == pytest.approx(100.0)
    assert vblora["ci95_low"] == pytest.approx(0.92 - 0.0496828, abs=1e-6)
    assert vblora["n_pairs"] == 3 and vblora["diff_vs_control"] == pytest.approx(7 / 300)
    assert vblora["p_vs_control"] == pytest.approx(0.1180829, abs=1e-6)
    assert vblora["diff_ci95_low"] == pytest.approx(7 / 300 - 0.0379460, abs=1e-6)
    assert vblora["diff_ci95_high"] == pytest.approx(7 / 300 + 0.0379460, abs=1e-6)
    assert sora["diff_ci95_low"] == pytest.approx(-0.035 - 0.0635310, abs=1e-6)
    assert sora["diff_ci95_high"] == pytest.approx(-0.035 + 0.0635310, abs=1e-6)
    assert math.isnan(lora["diff_ci95_low"])  # the control itself
    assert vblora["pct_of_control"] == pytest.approx(5.0) and vblora["control"] == "lora"
    assert sora["n_pairs"] == 2 and sora["p_vs_control"] == pytest.approx(0.0903344, abs=1e-6)
    assert sora["retained_rank"] == 5.0
    big = table.loc["vblora num_vectors=128"]
    assert big["metric_std"] == 0.0 and math.isnan(big["ci95_low"]) and math.isnan(big["p_vs_control"])
    assert table.loc["head_only", "pct_of_control"] == 0.0 and table.loc["head_only", "n_seeds"] == 2
    assert math.isnan(table.loc["full_finetune", "adapter_bytes"])
    assert lora["wall_time_s"] == pytest.approx(11.0) and lora["peak_memory_mb"] == pytest.approx(501.0)


def test_order_follows_baselines_then_registry(runs_root):
    table = report.summarise(report.collect_runs(runs_root))
    assert list(table["method"]) == ["head_only", "full_finetune", "lora", "vblora", "vblora", "sora"]
    assert list(table["label"])[3:5] == ["vblora num_vectors=64", "vblora num_vectors=128"]  # by stored params


def test_control_from_argument(runs_root):
    table = report.summarise(report.collect_runs(runs_root), control="vblora").set_index("label")
    assert table.loc["lora", "control"] == "vblora num_vectors=64"  # the control configuration with most seeds
    assert table.loc["lora", "diff_vs_control"] == pytest.approx(-7 / 300)
    assert math.isnan(table.loc["vblora num_vectors=64", "p_vs_control"])


def test_size_labels_when_the_size_tells_configurations_apart(tmp_path):
    for r, lr in ((4, 1e-3), (8, 3e-3)):  # tuned lrs differ too, yet the size alone names the point
        make_run(tmp_path, f"lora_r{r}", "lora", 0, 0.9, 100.0 * r, {"r": r, "lr": {"A": lr}}, size_key="r")
    labels = set(report.collect_runs(tmp_path)["label"])
    assert labels == {"lora r=4", "lora r=8"}


def test_mixed_tasks_and_metrics_refused_or_split(tmp_path):
    root = tmp_path / "mixed"
    for seed in (0, 1):
        make_run(root, f"acc_{seed}", "lora", seed, 0.9 + seed / 100, 100.0)
        make_run(root, f"ppl_{seed}", "lora", seed, 30.0 + seed, 100.0, task="bbc_lm", metric="perplexity")
        make_run(root, f"mcc_{seed}", "lora", seed, 0.5, 100.0, task="bbc_news", metric="mcc")
    runs = report.collect_runs(root)
    with pytest.raises(VBShareError, match=r"mix tasks or metrics \(bbc_news/accuracy \(2 runs\), "
                                           r"bbc_news/mcc \(2 runs\), bbc_lm/perplexity \(2 runs\)\)"):
        report.summarise(runs)
    assert report.main([str(root), "--out", str(tmp_path / "out")]) == 0
    folders = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert folders == ["bbc_lm-perplexity", "bbc_news-accuracy", "bbc_news-mcc"]
    import pandas as pd

    ppl = pd.read_csv(tmp_path / "out" / "bbc_lm-perplexity" / "report.csv")
    acc = pd.read_csv(tmp_path / "out" / "bbc_news-accuracy" / "report.csv")
    assert list(ppl["metric"]) == ["perplexity"] and not ppl["higher_is_better"].item()
    assert ppl["metric_mean"].item() == pytest.approx(30.5)  # never averaged with the accuracies
    assert acc["metric_mean"].item() == pytest.approx(0.905) and acc["higher_is_better"].item()


def test_pareto_front_membership(runs_root):
    table = report.summarise(report.collect_runs(runs_root))
    front = dict(zip(table["label"], report.pareto_front(table)))
    assert front == {"head_only": True, "vblora num_vectors=64": True, "full_finetune": True,
                     "lora": False, "vblora num_vectors=128": False, "sora": False}


def test_pareto_lower_is_better():
    import pandas as pd

    table = pd.DataFrame({"metric": ["perplexity"] * 3, "stored_params": [10.0, 20.0, 30.0],
                          "metric_mean": [30.0, 20.0, 25.0]})
    assert report.pareto_front(table).tolist() == [True, True, False]


def test_counts_print_as_integers():
    assert report.count_text(21568.0) == "21,568"
    assert report.count_text(21568.5) == "21,568.5"


def test_main_writes_table_and_plots(runs_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(runs_root), "--out", str(out)]) == 0
    csv_lines = (out / "report.csv").read_text().strip().splitlines()
    assert len(csv_lines) == 1 + 6
    for column in ("ci95_low", "ci95_high", "diff_ci95_low", "diff_ci95_high", "p_vs_control", "stored_params", "adapter_bytes", "trainable_params",
                   "wall_time_s", "peak_memory_mb"):
        assert column in csv_lines[0].split(",")
    md = (out / "report.md").read_text()
    assert "| vblora num_vectors=64 | 3 | 0.9200 ± 0.0200 | [0.8703, 0.9697] | +0.0233 [-0.0146, +0.0613] | 0.118 |  |  | 50 | 5.0 % |" in md
    for name in ("pareto.png", "bars.png", "curves.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "stages.csv").exists() and not (out / "sparsity_stages.png").exists()  # no run has stages
    assert "12 runs, 6 configurations" in capsys.readouterr().out


def test_reference_run_is_a_labelled_line_and_a_caption(runs_root, tmp_path, capsys, monkeypatch):
    untrained = make_run(tmp_path / "refs", "untrained", "lora", 0, 0.41, 100.0)
    drawn = {}
    real = plots._reference_lines

    def spy(ax, references):
        drawn.setdefault("calls", []).append(dict(references))
        real(ax, references)
    monkeypatch.setattr(plots, "_reference_lines", spy)
    out = tmp_path / "out"
    assert report.main([str(runs_root), "--out", str(out), "--reference", f"zero-shot={untrained}"]) == 0
    assert "Reference: zero-shot, accuracy = 0.4100." in (out / "report.md").read_text()
    assert drawn["calls"] == [{"zero-shot": 0.41}, {"zero-shot": 0.41}]  # the Pareto plot and the bars
    capsys.readouterr()
    assert report.main([str(runs_root), "--out", str(out), "--reference", str(untrained)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --reference")
    assert report.main([str(runs_root), "--out", str(out), "--reference", f"x={tmp_path / 'none'}"]) == 2
    assert "has not finished" in capsys.readouterr().err
    other_task = make_run(tmp_path / "refs", "lm", "lora", 0, 30.0, 100.0, task="bbc_lm", metric="perplexity")
    assert report.main([str(runs_root), "--out", str(out), "--reference", f"lm={other_task}"]) == 2
    assert "scored another task than these runs (bbc_news)" in capsys.readouterr().err
    assert report.main([str(runs_root), "--out", str(out), "--reference", f"a={untrained}",
                        "--reference", f"a={untrained}"]) == 2
    assert "given twice" in capsys.readouterr().err


def test_validation_curve_mean_over_seeds(runs_root):
    curve = report.validation_curve(sorted(runs_root.glob("lora_*")), "accuracy")
    assert curve.to_dict() == {100: pytest.approx(0.6), 200: pytest.approx(0.8)}  # (0.5 + 0.6 + 0.7) / 3


def test_main_no_runs_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert report.main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no finished runs")
    assert report.main([str(tmp_path / "missing")]) == 2


# ================================================================================= per-example tests by hand
# Exact McNemar: under the null each discordant example falls either way with probability 1/2, so with b examples
# better and c worse, p = min(1, 2 * P(X <= min(b, c))), X ~ Binomial(b + c, 1/2):
#   b=1, c=6: P(X <= 1 | 7) = (1 + 7) / 128,  p = 16/128 = 0.125;   b=0, c=5: p = 2 / 32 = 0.0625;
#   b=3, c=3: 2 * P(X <= 3 | 6) = 2 * 42/64 > 1, so p = 1.
def test_mcnemar_p_by_hand():
    assert report.mcnemar_p(1, 6) == pytest.approx(0.125)
    assert report.mcnemar_p(6, 1) == pytest.approx(0.125)
    assert report.mcnemar_p(0, 5) == pytest.approx(0.0625)
    assert report.mcnemar_p(3, 3) == pytest.approx(1.0)
    assert report.mcnemar_p(0, 0) == 1.0  # no discordant example: the two agree everywhere


# Wilcoxon signed-rank, exact: differences (1, 2, 3, -4, 5) have ranks 1..5 and W- = 4 (the one negative rank).
#   Of the 2^5 = 32 equally likely sign patterns, 7 give W- <= 4 (subsets of {1..5} summing to <= 4: {}, {1}, {2},
#   {3}, {4}, {1,2}, {1,3}), so p = 2 * 7/32 = 0.4375.
# Normal approximation (n > 50): d_i = ±i for i = 1..60, negative when i % 3 == 1, so W- = sum of those i = 590;
#   z = (W- - n(n+1)/4) / sqrt(n(n+1)(2n+1)/24), p = erfc(|z| / sqrt 2).
def test_wilcoxon_p_by_hand():
    control = [10.0] * 5
    assert report.wilcoxon_p([11.0, 12.0, 13.0, 6.0, 15.0], control) == pytest.approx(14 / 32)
    n = 60
    diffs = [-i if i % 3 == 1 else i for i in range(1, n + 1)]
    w_minus = sum(i for i in range(1, n + 1) if i % 3 == 1)
    z = (w_minus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert report.wilcoxon_p(diffs, [0.0] * n) == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert report.wilcoxon_p([1.0, 2.0], [1.0, 2.0]) == 1.0  # no difference anywhere
    assert math.isnan(report.wilcoxon_p([], []))


def classification_rows(correct: list[int], labels: list[int] | None = None) -> list[dict]:
    """predictions.jsonl rows of a 2-class classifier: right where correct[i], label i % 2 unless given."""
    labels = labels or [i % 2 for i in range(len(correct))]
    return [{"index": i, "label": y, "prediction": y if ok else 1 - y, "correct": bool(ok), "loss": 0.1 if ok else 2.0,
             "scores": [0.5, 0.5]} for i, (ok, y) in enumerate(zip(correct, labels))]


# vblora against the lora control over the seeds both ran (0 and 1; lora's seed 2 has no partner). Each example's
# correctness is averaged over the two seeds first (the example, not the seed copy, is the unit):
#   vblora right on seed 0 (0, 3), seed 1 (0,)       -> per example 1, 0, 0, 0.5, 0
#   lora right on seed 0 (all),    seed 1 (1, 2, 3)  -> per example 0.5, 1, 1, 1, 0.5
#   lead = vblora - lora = 0.5, -1, -1, -0.5, -0.5   -> 5 examples, better 1 (example 0), worse 4
#   exact sign test: 2 * P(X <= 1 | 5, 1/2) = 2 * 6/32 = 0.375
# (pooling the 10 seed copies as independent pairs would give better 1, worse 6, p = 0.125.)
VBLORA_CORRECT = {0: [1, 0, 0, 1, 0], 1: [1, 0, 0, 0, 0]}
LORA_CORRECT = {0: [1, 1, 1, 1, 1], 1: [0, 1, 1, 1, 0], 2: [1, 1, 1, 1, 1]}


@pytest.fixture
def predictions_root(tmp_path):
    root = tmp_path / "paired"
    for seed, correct in LORA_CORRECT.items():
        make_run(root, f"lora_{seed}", "lora", seed, 0.9, 1000.0, {"r": 8}, predictions=classification_rows(correct))
    for seed, correct in VBLORA_CORRECT.items():
        make_run(root, f"vblora_{seed}", "vblora", seed, 0.9, 50.0, {"r": 4}, predictions=classification_rows(correct))
    for seed in (0, 1):
        make_run(root, f"sora_{seed}", "sora", seed, 0.9, 600.0, {"r": 8})  # no predictions.jsonl
    return root


def test_mcnemar_columns_through_the_report(predictions_root, tmp_path):
    import pandas as pd

    written = report.write_report(report.collect_runs(predictions_root), tmp_path / "out")
    table = pd.read_csv(tmp_path / "out" / "report.csv").set_index("label")
    vblora = table.loc["vblora"]
    assert vblora["examples_test"] == "mcnemar" and vblora["examples_paired"] == 5
    assert (vblora["examples_better"], vblora["examples_worse"]) == (1, 4)
    assert vblora["p_examples_vs_control"] == pytest.approx(0.375)
    for label in ("lora", "sora"):  # the control itself; a configuration without predictions: empty, no error
        assert table.loc[label, ["examples_test", "examples_paired", "p_examples_vs_control"]].isna().all()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 1 / 4 (5) | 0.375 |" in md and "exact McNemar (sign) test on correctness" in md
    assert tmp_path / "out" / "stages.csv" not in written


def test_per_example_columns_empty_when_the_report_scores_validation(predictions_root):
    table = report.summarise(report.collect_runs(predictions_root, split="validation"))
    assert table["examples_test"].isna().all() and table["examples_paired"].isna().all()


# Language model runs (no label, loss per example), each example's loss averaged over the seeds that scored it:
#   example 0: vblora (3 + -1)/2 = 1 vs lora (2 + 3)/2 = 2.5 -> -1.5;  example 1: (4 + 8)/2 = 6 vs 2.5 -> +3.5;
#   example 2 (seed 0 only): 5 vs 2 -> +3.  Differences (-1.5, 3.5, 3): ranks 1, 3, 2, W- = 1; of the 2^3 = 8 sign
#   patterns 2 give W- <= 1 ({}, {1}), so p = 2 * 2/8 = 0.5; better (lower loss) 1, worse 2.
def test_wilcoxon_columns_for_a_language_model(tmp_path):
    control = {0: [2.0, 2.0, 2.0], 1: [3.0, 3.0]}
    losses = {0: [3.0, 4.0, 5.0], 1: [-1.0, 8.0]}  # per-example losses need not be realistic here
    # (the runs of one seed score the same examples; seed 1 scored fewer only to make the averaging visible)
    for seed in (0, 1):
        make_run(tmp_path, f"lora_{seed}", "lora", seed, 30.0, 1000.0, {"r": 8}, task="bbc_lm", metric="perplexity",
                 predictions=[{"index": i, "loss": v, "tokens": 10} for i, v in enumerate(control[seed])])
        make_run(tmp_path, f"vblora_{seed}", "vblora", seed, 31.0, 50.0, {"r": 4}, task="bbc_lm", metric="perplexity",
                 predictions=[{"index": i, "loss": v, "tokens": 10} for i, v in enumerate(losses[seed])])
    row = report.summarise(report.collect_runs(tmp_path)).set_index("label").loc["vblora"]
    assert row["examples_test"] == "wilcoxon" and row["examples_paired"] == 3
    assert (row["examples_better"], row["examples_worse"]) == (1, 2)
    assert row["p_examples_vs_control"] == pytest.approx(0.5)


# The same 6 examples wrong for vblora and right for lora in each of 3 seeds are 6 examples, not 18: better 0,
# worse 6, p = 2 * (1/2)^6 = 0.03125 (18 pooled copies would claim p = 2^-17 = 7.6e-6). An example right for each
# in a different seed (lead 0) counts neither way.
def test_per_example_test_counts_each_example_once():
    import pandas as pd

    rows = [{"seed": seed, "index": i, "loss": 1.0, "loss_control": 1.0, "correct": False, "correct_control": True}
            for seed in (0, 1, 2) for i in range(6)]
    rows += [{"seed": seed, "index": 6, "loss": 1.0, "loss_control": 1.0, "correct": seed == 0,
              "correct_control": seed == 1} for seed in (0, 1, 2)]
    result = report.examples_vs_control(pd.DataFrame(rows))
    assert (result["examples_paired"], result["examples_better"], result["examples_worse"]) == (7, 0, 6)
    assert result["p_examples_vs_control"] == pytest.approx(2 / 64)


def test_paired_examples_refuses_different_data(tmp_path):
    a = make_run(tmp_path, "a", "lora", 0, 0.9, 10.0, predictions=classification_rows([1, 1, 1, 1]))
    b = make_run(tmp_path, "b", "vblora", 0, 0.9, 10.0, predictions=classification_rows([1, 1, 1, 1], [0, 1, 0, 0]))
    pairs = report.paired_examples({0: a}, {0: a, 1: b})  # seed 1 is the control's only: left out
    assert list(pairs["index"]) == [0, 1, 2, 3] and set(pairs["seed"]) == {0}
    with pytest.raises(VBShareError, match=r"^different data: test example 3 of seed 0 has label 0 in .*/b but 1 in "
                                           r".*/a; [^\n]*$"):
        report.paired_examples({0: b}, {0: a})
    lm = [make_run(tmp_path, f"lm{t}", "lora", 0, 30.0, 10.0, predictions=[{"index": 0, "loss": 1.0, "tokens": t}])
          for t in (5, 6)]
    with pytest.raises(VBShareError, match="has tokens 5"):
        report.paired_examples({0: lm[0]}, {0: lm[1]})
    fewer = make_run(tmp_path, "c", "vblora", 0, 0.9, 10.0, predictions=classification_rows([1, 1, 1]))
    with pytest.raises(VBShareError, match=r"^different data: seed 0 scored 3 test examples in .*/c but 4 "):
        report.paired_examples({0: fewer}, {0: a})
    assert report.read_predictions(tmp_path / "missing") is None


def test_report_goes_on_without_the_per_example_test_when_data_differs(tmp_path, caplog):
    make_run(tmp_path, "lora_0", "lora", 0, 0.9, 1000.0, {"r": 8}, predictions=classification_rows([1, 1, 1, 1]))
    make_run(tmp_path, "vblora_0", "vblora", 0, 0.8, 50.0, {"r": 4},
             predictions=classification_rows([1, 1, 1, 1], [0, 1, 0, 0]))
    with caplog.at_level("WARNING", logger="vbshare.report"):
        row = report.summarise(report.collect_runs(tmp_path)).set_index("label").loc["vblora"]
    assert row[["examples_test", "examples_paired", "p_examples_vs_control"]].isna().all()
    assert row["metric_mean"] == pytest.approx(0.8)  # the rest of the row is there
    assert "vblora: no per-example test against the control: different data" in caplog.text


# ======================================================================================= sparsifying stages
def stage_records(ranks: list[int], scores: list[float], lams: list[float], knob: str = "lambda") -> list[dict]:
    """summary.json's sparsify.stages as vbshare.train.sparsify writes them (flat_record, metric accuracy)."""
    return [{"stage": i, "lam": lam, "knob": knob, "steps": 10, "total_steps": 10 * i, "r_max": 8, "retained_rank": r,
             "nonzero_params": 100 * r, "param_fraction": r / ranks[0], "memorisation_accuracy": 1.0,
             "generalisation_accuracy": score, "memorisation_accuracy_rel": 1.0,
             "generalisation_accuracy_rel": score / scores[0]}
            for i, (r, score, lam) in enumerate(zip(ranks, scores, lams))]


SCHEDULE = {"schedule": "linear", "num_stages": 2, "stage_steps": 10, "max": 20.0, "lr_factor": 1.0,
            "memorise_examples": 64, "snapshots": True}


def test_stages_csv_and_plot(tmp_path):
    import pandas as pd

    root = tmp_path / "runs"
    hyper = {"r": 8, "lam": 0, "threshold": "lr_lambda"}  # summary.json lists every hyperparameter
    make_run(root, "sora_0", "sora", 0, 0.8, 600.0, hyper, sparsify=SCHEDULE,
             stages=stage_records([16, 9, 4], [0.9, 0.85, 0.8], [0.0, 10.0, 20.0]))
    make_run(root, "sora_1", "sora", 1, 0.7, 600.0, hyper, sparsify={**SCHEDULE, "snapshots": False},
             stages=stage_records([16, 12, 2], [0.88, 0.8, 0.7], [0.0, 10.0, 20.0]))
    make_run(root, "sora_xi", "sora", 0, 0.8, 600.0, {**hyper, "threshold": "constant"}, sparsify=SCHEDULE,
             stages=stage_records([16, 3], [0.9, 0.6], [0.0, 0.5], knob="xi"))
    make_run(root, "lora_0", "lora", 0, 0.9, 1000.0, {"r": 8})  # no stages: no rows
    runs = report.collect_runs(root)
    assert len(report.summarise(runs)) == 3  # lora and two sora configurations: snapshots=false does not split one
    written = report.write_report(runs, tmp_path / "out")
    assert tmp_path / "out" / "stages.csv" in written and tmp_path / "out" / "sparsity_stages.png" in written
    stages = pd.read_csv(tmp_path / "out" / "stages.csv")
    assert list(stages.columns) == ["label", "method", "seed", "stage", "knob", "lam", "retained_rank", "r_max",
                                    "nonzero_params", "metric", "generalisation", "memorisation", "run_dir"]
    got = stages[["label", "seed", "stage", "knob", "lam", "retained_rank", "metric", "generalisation"]]
    assert got.values.tolist() == [  # the snapshots setting does not split a configuration
        ["sora threshold=constant", 0, 0, "xi", 0.0, 16, "accuracy", 0.9],
        ["sora threshold=constant", 0, 1, "xi", 0.5, 3, "accuracy", 0.6],
        ["sora threshold=lr_lambda", 0, 0, "lambda", 0.0, 16, "accuracy", 0.9],
        ["sora threshold=lr_lambda", 0, 1, "lambda", 10.0, 9, "accuracy", 0.85],
        ["sora threshold=lr_lambda", 0, 2, "lambda", 20.0, 4, "accuracy", 0.8],
        ["sora threshold=lr_lambda", 1, 0, "lambda", 0.0, 16, "accuracy", 0.88],
        ["sora threshold=lr_lambda", 1, 1, "lambda", 10.0, 12, "accuracy", 0.8],
        ["sora threshold=lr_lambda", 1, 2, "lambda", 20.0, 2, "accuracy", 0.7],
    ]
    assert (stages["memorisation"] == 1.0).all() and stages.loc[4, "nonzero_params"] == 400
    assert (tmp_path / "out" / "sparsity_stages.png").read_bytes()[:4] == b"\x89PNG"


def test_stages_plot_axes_from_zero(tmp_path, monkeypatch):
    make_run(tmp_path, "sora_0", "sora", 0, 0.8, 600.0, {"r": 8}, sparsify=SCHEDULE,
             stages=stage_records([16, 9], [0.9, 0.85], [0.0, 10.0]))
    stages = report.stage_table(report.collect_runs(tmp_path))
    captured = {}
    original = plots._figure

    def spy(figsize):
        fig, ax = original(figsize)
        captured["ax"] = ax
        return fig, ax

    monkeypatch.setattr(plots, "_figure", spy)
    report.stages_plot(stages, tmp_path / "stages.png")
    ax = captured["ax"]
    assert ax.get_xlim()[0] == 0.0 and ax.get_ylim()[0] == 0.0
    assert "retained rank" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
    assert [t.get_text() for t in ax.texts] == ["λ=0", "λ=10"]


def test_sparsified_runs_are_their_own_configuration(tmp_path):
    make_run(tmp_path, "dense", "sora", 0, 0.9, 600.0, {"r": 8})
    make_run(tmp_path, "staged", "sora", 0, 0.8, 300.0, {"r": 8}, sparsify=SCHEDULE,
             stages=stage_records([16, 9], [0.9, 0.85], [0.0, 10.0]))
    table = report.summarise(report.collect_runs(tmp_path))
    assert sorted(table["label"]) == ["sora sparsify=linear 2x10 to 20", "sora sparsify=off"]
    assert report.stage_table(report.collect_runs(tmp_path))["label"].unique().tolist() == [
        "sora sparsify=linear 2x10 to 20"]
    # a second schedule whose short name is the same (only lr_factor differs): numbered, never two equal labels
    make_run(tmp_path, "staged_slow", "sora", 0, 0.7, 300.0, {"r": 8}, sparsify={**SCHEDULE, "lr_factor": 0.5},
             stages=stage_records([16, 12], [0.9, 0.88], [0.0, 10.0]))
    labels = sorted(report.summarise(report.collect_runs(tmp_path))["label"])
    assert labels == ["sora sparsify=linear 2x10 to 20 config 2", "sora sparsify=linear 2x10 to 20 config 3",
                      "sora sparsify=off"]


# ========================================================================================= what the report shows
def _captured_axes(monkeypatch) -> list:
    """The axes of every figure the report draws from now on."""
    drawn, original = [], plots._figure

    def spy(figsize):
        fig, ax = original(figsize)
        drawn.append(ax)
        return fig, ax

    monkeypatch.setattr(plots, "_figure", spy)
    return drawn


def test_single_seed_rows_show_no_spread(runs_root):
    md = report.markdown_table(report.summarise(report.collect_runs(runs_root)))
    assert "| vblora num_vectors=128 | 1 | 0.8000 |  |" in md  # one seed: the value alone, no "± 0.0000"
    assert "± 0.0000" not in md
    assert "| lora | 3 | 0.8967 ± 0.0153 |" in md


def test_pareto_legend_names_only_what_is_drawn(tmp_path, monkeypatch):
    axes = _captured_axes(monkeypatch)
    make_run(tmp_path, "lora", "lora", 0, 0.90, 100.0, {"r": 8})
    make_run(tmp_path, "vblora", "vblora", 0, 0.95, 50.0, {"r": 4})  # fewer parameters, better: the front alone
    report.pareto_plot(report.summarise(report.collect_runs(tmp_path)), tmp_path / "pareto.png")
    labels = [text.get_text() for text in axes[-1].get_legend().get_texts()]
    assert labels == ["lora", "vblora"]  # a front of one point is not drawn, so not named
    lines = [line for line in axes[-1].get_lines() if line.get_label() == "Pareto front"]
    assert lines == []


def test_pareto_legend_names_a_drawn_front(runs_root, tmp_path, monkeypatch):
    axes = _captured_axes(monkeypatch)
    report.pareto_plot(report.summarise(report.collect_runs(runs_root)), tmp_path / "pareto.png")
    (front,) = [line for line in axes[-1].get_lines() if line.get_label() == "Pareto front"]
    assert list(front.get_xdata()) == [50.0, 2.0e7]  # vblora num_vectors=64, then full fine-tuning
    assert "Pareto front" in [text.get_text() for text in axes[-1].get_legend().get_texts()]


def test_overlapping_curves_stay_visible_on_whole_steps(tmp_path, monkeypatch):
    axes = _captured_axes(monkeypatch)
    same = [(1, 0.5), (2, 0.7), (3, 0.8)]  # three configurations with identical curves
    make_run(tmp_path, "lora_8", "lora", 0, 0.9, 100.0, {"r": 8}, size_key="r", curve=same)
    make_run(tmp_path, "lora_4", "lora", 0, 0.9, 50.0, {"r": 4}, size_key="r", curve=same)
    make_run(tmp_path, "vera", "vera", 0, 0.9, 10.0, {"r": 4}, curve=same)
    runs = report.collect_runs(tmp_path)
    report.curves_plot(runs, report.summarise(runs), tmp_path / "curves.png")
    lines = axes[-1].get_lines()
    assert len(lines) == 3
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 3  # each its own style
    assert all(line.get_alpha() < 1 and line.get_markerfacecolor() == "none" for line in lines)  # see-through
    ticks = [t for t in axes[-1].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)  # optimiser steps: no 1.5, 2.5


@pytest.mark.slow
def test_reading_runs_loads_no_training_code():
    import subprocess
    import sys

    code = ("import sys, vbshare.report; "
            "assert 'vbshare.train' not in sys.modules and 'accelerate' not in sys.modules, "
            "sorted(m for m in sys.modules if m.startswith(('vbshare.train', 'accelerate')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
