"""`vbshare.evaluate`: a finished run scored again on a fresh base reproduces the scores the training run
recorded in summary.json, leaves every file of the run byte-identical, and writes predictions only where told.

The training run's own predictions.jsonl is checked against the summary's accuracy by counting its `correct`
column by hand (not through the metrics code).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vbshare.errors import VBShareError
from vbshare.evaluate import evaluate_run, main
from helpers import FAST, read_jsonl, train

# (adapter override, model): every run mode on tiny BERT; VB-LoRA also on MiniLM (its stored top-k form)
CASES = [("+adapter=lora", "tiny_bert"), ("+adapter=vblora", "tiny_bert"), ("+adapter=sora", "tiny_bert"),
         ("+adapter=head_only", "tiny_bert"), (None, "tiny_bert"), ("+adapter=vblora", "minilm")]


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("adapter, model", CASES, ids=[f"{a or 'full'}-{m}" for a, m in CASES])
def test_evaluate_reproduces_summary_and_leaves_run_untouched(adapter, model, tmp_path):
    run_dir = tmp_path / "run"
    summary = train([*([adapter] if adapter else []), *FAST, f"model={model}"], run_dir)
    before = file_hashes(run_dir)

    result = evaluate_run(run_dir, split="test", predictions_path=tmp_path / "eval" / "predictions.jsonl")

    assert file_hashes(run_dir) == before  # nothing in the run directory changed, nothing added
    expected = summary["final"]["test"]
    assert result["scores"]["accuracy"] == expected["accuracy"]
    assert result["scores"]["macro_f1"] == pytest.approx(expected["macro_f1"], abs=1e-12)
    fresh, recorded = read_jsonl(tmp_path / "eval" / "predictions.jsonl"), read_jsonl(run_dir / "predictions.jsonl")
    assert [r["prediction"] for r in fresh] == [r["prediction"] for r in recorded]
    assert [r["loss"] for r in fresh] == pytest.approx([r["loss"] for r in recorded], abs=1e-5)


def test_training_predictions_match_the_summary(tmp_path):
    """<run>/predictions.jsonl: one row per test example, in order, whose hand-counted accuracy is the
    summary's, with the prediction the arg-max of the class probabilities."""
    summary = train(["+adapter=lora", *FAST], tmp_path)
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert [r["index"] for r in rows] == list(range(len(rows))) and len(rows) == 16  # trainer=debug caps at 16
    for row in rows:
        assert row["correct"] == (row["prediction"] == row["label"])
        assert row["prediction"] == max(range(len(row["scores"])), key=row["scores"].__getitem__)
        assert sum(row["scores"]) == pytest.approx(1.0)
    assert sum(r["correct"] for r in rows) / len(rows) == summary["final"]["test"]["accuracy"]


def test_overrides_and_cli_outputs(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(["+adapter=lora", *FAST], run_dir)
    before = file_hashes(run_dir)
    capped = evaluate_run(run_dir, split="validation", overrides=["data=bbc_news", "trainer.max_examples=8"])
    assert capped["examples"] == 8 and capped["split"] == "validation" and capped["predictions"] is None

    main([f"run_dir={run_dir}", "split=test", "predictions=true", f"out={tmp_path / 'out'}"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "out" / "scores.json").read_text())
    assert len(read_jsonl(tmp_path / "out" / "predictions.jsonl")) == printed["examples"] == 16
    assert file_hashes(run_dir) == before


def test_bad_input_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(["+adapter=lora", *FAST], run_dir)
    with pytest.raises(VBShareError, match="inside the run directory"):
        evaluate_run(run_dir, predictions_path=run_dir / "mine.jsonl")
    with pytest.raises(VBShareError, match="trainer.max_exampels"):
        evaluate_run(run_dir, overrides=["trainer.max_exampels=3"])
    with pytest.raises(VBShareError, match="config.yaml"):
        evaluate_run(tmp_path / "nowhere")
    with pytest.raises(SystemExit) as exited:
        main([f"run_dir={run_dir}", "split=nope"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "nope" in err[-1]


def test_data_with_other_labels_is_refused(tmp_path):
    """Class ids come from the sorted label names: a file with another label set must not be scored silently."""
    def write(path: Path, labels: tuple[str, str]) -> Path:
        rows = [f"{'a lovely great film' if k == 0 else 'a dull awful film'} number {i},{labels[k]}"
                for i in range(20) for k in (0, 1)]
        path.write_text("review,stars\n" + "\n".join(rows) + "\n")
        return path

    trained_on = write(tmp_path / "good_bad.csv", ("good", "bad"))
    other = write(tmp_path / "good_meh.csv", ("good", "meh"))
    run_dir = tmp_path / "run"
    data = ["data=files", "data.text_column=review", "data.label_column=stars"]
    summary = train(["+adapter=lora", *FAST, *data, f"data.path={trained_on}"], run_dir)
    assert summary["label_names"] == ["bad", "good"]
    same = evaluate_run(run_dir, split="test")
    assert same["scores"]["accuracy"] == summary["final"]["test"]["accuracy"]
    with pytest.raises(VBShareError, match=r"not the labels this run trained on \['bad', 'good'\]"):
        evaluate_run(run_dir, split="test", overrides=[f"data.path={other}"])
