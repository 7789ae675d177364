"""`python -m vbshare.export`: a finished run folder to a PEFT folder.

The reference is PEFT itself: `PeftModel.from_pretrained` on a fresh base must give the logits of the run's
adapter loaded by vbshare (the loading `vbshare.evaluate` uses, which reproduces the run's recorded test scores
in tests/test_evaluate.py). Bad input is one line.
"""
from __future__ import annotations

import hashlib
import json

import peft  # the reference (dev extra); missing must fail, not skip
import pytest
import torch

from vbshare.evaluate import rebuild_trained, run_config
from vbshare.export import export_run, main
from vbshare.train.engine import Engine
from vbshare.train.settings import read_settings
from vbshare.train.setup import build_task_and_model

from helpers import FAST, train

SENTENCES = ["Shares fell sharply after the bank's results.", "The striker scored twice in the final.",
             "Parliament votes on the budget today."]
# (method, export options, the PEFT type PEFT must read from the folder)
CASES = [("lora", {}, "LORA"), ("vblora", {"topk_only": True}, "VBLORA"), ("aslora", {}, "LORA"),
         ("vblora", {"as_lora": True}, "LORA")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """method -> the folder of a finished tiny-BERT debug run."""
    root = tmp_path_factory.mktemp("runs")
    for method in sorted({m for m, _, _ in CASES}):
        train([f"+adapter={method}", *FAST], root / method)
    return {method: root / method for method in sorted({m for m, _, _ in CASES})}


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("method, options, peft_type", CASES, ids=[f"{m}-{'-'.join(o) or 'native'}" for m, o, _ in CASES])
def test_export_loads_in_peft_with_the_runs_outputs(runs, method, options, peft_type, tmp_path):
    run_dir = runs[method]
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    out = export_run(run_dir, tmp_path / "peft", **options)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()} == before
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == peft_type

    cfg = run_config(run_dir)
    engine = Engine(read_settings(cfg).trainer)
    _, ours, tokenizer, _ = rebuild_trained(cfg, run_dir, engine)
    _, fresh, _, _ = build_task_and_model(cfg)  # the base the run started from, its head not trained
    theirs = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    expected, got = logits(ours.eval(), tokenizer), logits(theirs, tokenizer)
    assert not torch.allclose(logits(build_task_and_model(cfg)[1].eval(), tokenizer), expected, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args, message", [
    ([], "run_dir= is required"),
    (["run_dir=RUN"], "out= is required"),
    (["run_dir=RUN", "out=OUT", "as_lora=maybe"], "as_lora must be true or false"),
    (["run_dir=RUN", "out=OUT", "topk=true"], "unknown key topk"),
    (["run_dir=MISSING", "out=OUT"], "config.yaml is missing"),
    (["run_dir=RUN", "out=RUN/peft"], "lies inside the run directory"),
    (["run_dir=HEAD", "out=OUT"], "trained no adapter (method head_only)"),
])
def test_bad_input_is_one_line(runs, args, message, tmp_path, capsys):
    head = tmp_path / "head"
    if any("HEAD" in a for a in args):
        train(["+adapter=head_only", *FAST], head)
    names = {"RUN": str(runs["lora"]), "OUT": str(tmp_path / "out"), "MISSING": str(tmp_path / "missing"),
             "HEAD": str(head)}
    for key, value in names.items():
        args = [a.replace(key, value) for a in args]
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_refuses_a_folder_that_is_not_empty(runs, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main([f"run_dir={runs['lora']}", f"out={tmp_path / 'out'}"])
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
