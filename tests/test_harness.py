"""The lm-evaluation-harness bridge, on CPU with two tiny lm-eval tasks defined on local files.

The references are computed here, independently of lm-eval and of the bridge: each choice's log-likelihood from
a float64 log-softmax over the adapted model's logits, and greedy continuations from transformers' `generate`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="the harness extra (pip install .[harness])")

from vbshare.errors import VBShareError  # noqa: E402
from vbshare.evaluate import main as evaluate_main  # noqa: E402
from vbshare.evaluate import evaluate_with_harness, rebuild_trained, run_config  # noqa: E402
from vbshare.harness import HarnessSettings, read_harness_settings  # noqa: E402
from vbshare.train.engine import Engine  # noqa: E402
from vbshare.train.settings import read_settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("the market rose because", ["shares gained", "rain fell"], 0),
             ("the team won the", ["match", "election"], 1),
             ("ministers said the plan", ["will cost more", "is a film"], 0),
             ("the film was", ["a hit", "a goal"], 1),
             ("police said the man", ["was arrested", "scored twice"], 0)]
HITS = (0, 2)  # questions whose generation target is the adapted model's own greedy text


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A LoRA run of the tiny Llama on BBC News text (a few steps, so the adapter's B is no longer zero)."""
    from hydra import compose, initialize_config_dir

    from vbshare.train.app import run_training

    folder = tmp_path_factory.mktemp("harness")
    overrides = ["+adapter=lora", "model=tiny_llama", "data=bbc_lm", "trainer=debug", "data.max_length=16",
                 "trainer.max_steps=2", "trainer.checkpoint_every=null", "adapter.lr.B=0.05"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run_training(cfg, folder / "run", overrides)
    return folder / "run"


def greedy_continuations(model, tokenizer, max_new_tokens: int = 5) -> list[str]:
    """transformers' greedy decoding of each question (no special tokens), cut at the first newline."""
    texts = []
    for question, _, _ in QUESTIONS:
        ids = torch.tensor([tokenizer(question, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            generated = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                       pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0])
    return texts


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, lm_run):
    """Two lm-eval tasks on local JSON-lines files: a two-way multiple choice and a greedy generation whose
    targets are, for questions 0 and 2, what the adapted model decodes (hits), else the right choice (misses)."""
    folder = tmp_path_factory.mktemp("tasks")
    greedy = greedy_continuations(*adapted_model(lm_run))
    targets = [greedy[i] if i in HITS else choices[answer] for i, (_, choices, answer) in enumerate(QUESTIONS)]
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a, "target": t}) + "\n"
                            for (q, c, a), t in zip(QUESTIONS, targets)))
    source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}}, "test_split": "test"}
    (folder / "choice.yaml").write_text(json.dumps({
        "task": "vbshare_tiny_choice", **source, "output_type": "multiple_choice", "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc"}]}))
    (folder / "generate.yaml").write_text(json.dumps({
        "task": "vbshare_tiny_generate", **source, "output_type": "generate_until", "doc_to_text": "{{question}}",
        "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["\n"], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return folder


def adapted_model(run_dir: Path):
    cfg = run_config(run_dir)
    engine = Engine(read_settings(cfg).trainer)
    _, model, tokenizer, _ = rebuild_trained(cfg, run_dir, engine)
    return model.eval(), tokenizer


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) in float64: the continuation's tokens are those the whole string adds after
    the context's (no special tokens), each scored by the log-softmax of the logits one position before it."""
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    continuation_ids = whole[len(context_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]])).logits[0].double()  # (len(whole) - 1, vocab)
    log_probs = torch.log_softmax(logits, dim=-1)[len(context_ids) - 1:]  # (len(continuation), vocab)
    return float(log_probs.gather(1, torch.tensor(continuation_ids)[:, None]).sum())


def flat(nested: list[list[float]]) -> list[float]:
    return [value for inner in nested for value in inner]


def samples(folder: Path, task: str) -> list[dict]:
    rows = [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda row: row["doc_id"])


def test_multiple_choice_scores_are_the_adapted_models_loglikelihoods(lm_run, tasks, tmp_path):
    settings = HarnessSettings(tasks=("vbshare_tiny_choice",), include_path=str(tasks), add_bos_token=False,
                               batch_size=2)
    result = evaluate_with_harness(lm_run, settings, samples_dir=tmp_path / "unmerged")
    model, tokenizer = adapted_model(lm_run)
    ours = [[loglikelihood(model, tokenizer, q, " " + choice) for choice in choices] for q, choices, _ in QUESTIONS]
    rows = samples(tmp_path / "unmerged", "vbshare_tiny_choice")
    theirs = [[float(resp[0][0]) for resp in row["resps"]] for row in rows]
    assert flat(theirs) == pytest.approx(flat(ours), abs=1e-4)
    correct = [max(range(2), key=lambda k: lls[k]) == answer for lls, (_, _, answer) in zip(ours, QUESTIONS)]
    assert result["results"]["vbshare_tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(correct))
    assert result["n_samples"]["vbshare_tiny_choice"] == len(QUESTIONS)

    import vbshare
    with vbshare.disabled(model):  # the base alone scores differently: the adapter was applied
        base = [[loglikelihood(model, tokenizer, q, " " + c) for c in choices] for q, choices, _ in QUESTIONS]
    assert max(abs(a - b) for a, b in zip(flat(base), flat(ours))) > 1e-3

    merged = evaluate_with_harness(lm_run, HarnessSettings(**{**settings.__dict__, "merge": True}),
                              samples_dir=tmp_path / "merged")
    merged_rows = samples(tmp_path / "merged", "vbshare_tiny_choice")
    assert flat([[float(r[0][0]) for r in row["resps"]] for row in merged_rows]) == pytest.approx(flat(theirs), abs=1e-4)
    assert merged["results"] == result["results"]


def test_generation_is_transformers_greedy_decoding_and_the_command_line(lm_run, tasks, tmp_path, capsys):
    out = tmp_path / "out"
    evaluate_main([f"run_dir={lm_run}", "harness.tasks=[vbshare_tiny_gen*]", f"harness.include_path={tasks}",
                   "harness.add_bos_token=false", "harness.batch_size=3", f"out={out}"])
    printed = json.loads(capsys.readouterr().out)
    assert json.loads((out / "harness.json").read_text()) == printed
    assert printed["tasks"] == ["vbshare_tiny_generate"]  # the glob, resolved
    expected = greedy_continuations(*adapted_model(lm_run))
    rows = samples(out, "vbshare_tiny_generate")
    assert [row["filtered_resps"][0] for row in rows] == expected
    assert set(expected[i] for i in range(len(QUESTIONS)) if i not in HITS).isdisjoint(
        {choices[answer] for _, choices, answer in QUESTIONS})  # the misses really miss
    assert printed["results"]["vbshare_tiny_generate"]["exact_match,none"] == pytest.approx(len(HITS) / len(QUESTIONS))


@pytest.mark.parametrize("values, message", [
    ({}, "harness.tasks must be a non-empty list"),
    ({"tasks": []}, "harness.tasks must be a non-empty list"),
    ({"tasks": ["gsm8k"], "limit": 0}, "harness.limit must be"),
    ({"tasks": ["gsm8k"], "limit": 1.5}, "harness.limit must be"),
    ({"tasks": ["gsm8k"], "limit": 1.0}, "harness.limit must be"),  # lm-eval reads 1.0 as one document
    ({"tasks": ["gsm8k"], "batch_size": 0}, "harness.batch_size must be an integer >= 1"),
    ({"tasks": ["gsm8k"], "merge": "yes"}, "harness.merge must be true or false"),
    ({"tasks": ["gsm8k"], "include_path": "/no/such/folder"}, "is not a folder"),
    ({"tasks": ["gsm8k"], "fewshot": 5}, "harness.fewshot is not a harness setting"),
])
def test_bad_settings_are_one_line(values, message):
    with pytest.raises(VBShareError, match=message) as err:
        read_harness_settings(values)
    assert "\n" not in str(err.value)


def test_unknown_and_unreachable_tasks_and_a_classifier_run_are_refused_in_one_line(lm_run, tasks, tmp_path, capsys,
                                                                                      monkeypatch):
    import datasets
    import huggingface_hub

    with pytest.raises(SystemExit) as code:
        evaluate_main([f"run_dir={lm_run}", "harness.tasks=[no_such_task_anywhere]"])
    assert code.value.code == 2
    assert "lm-eval knows no task" in capsys.readouterr().err

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # an empty cache, and no Hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as code:
        evaluate_main([f"run_dir={lm_run}", "harness.tasks=[gsm8k]", "harness.limit=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code.value.code == 2 and err[-1].startswith("error: lm-eval could not load the data of gsm8k")

    from hydra import compose, initialize_config_dir

    from vbshare.train.app import run_training
    overrides = ["+adapter=lora", "model=tiny_bert", "trainer=debug", "trainer.max_steps=1", "data.max_length=16",
                 "trainer.checkpoint_every=null"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run_training(cfg, tmp_path / "classifier", overrides)
    with pytest.raises(VBShareError, match="lm-eval tasks score a causal language model"):
        evaluate_with_harness(tmp_path / "classifier", HarnessSettings(tasks=("vbshare_tiny_choice",),
                                                                  include_path=str(tasks)))
