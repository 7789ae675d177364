"""Generation-scored tasks: text metrics against hand-computed values and the reference libraries, GSM8K answer
extraction on hand-made answers, decoding (left padding, stop strings, merged == unmerged adapters), the
bbc_headlines task's encoding, and the report's per-example test on generated text."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from scipy import stats

import vbshare
from vbshare.assets import minilm_dir
from vbshare.data.chat import IGNORE_INDEX
from vbshare.data.encoding import tokenize_task
from vbshare.data.examples import Decoding, Split, Task
from vbshare.errors import VBShareError
from vbshare.train import text_metrics as T
from vbshare.train.generation import cut_at_stop, generate_batch, left_padded
from vbshare.metrics import higher_is_better

ROOT = Path(__file__).resolve().parents[1]


# -- metrics ------------------------------------------------------------------------------------------------------
def test_rouge_matches_hand_counts_and_the_library():
    # reference "the cat sat on the mat" (6 tokens), prediction "the cat lay on the mat" (6): 5 shared unigrams,
    # 3 shared bigrams (the cat, on the, the mat), LCS 5 (the cat on the mat) -> F = 2PR/(P+R) with P = R
    rows = T.per_example_scores(["the cat lay on the mat"], ["the cat sat on the mat"], ("rouge1", "rouge2", "rouge_l"))
    assert rows[0]["rouge1"] == pytest.approx(5 / 6)
    assert rows[0]["rouge2"] == pytest.approx(3 / 5)
    assert rows[0]["rouge_l"] == pytest.approx(5 / 6)
    from rouge_score import rouge_scorer

    pairs = [("Police arrest man after city centre stabbing", "Man held over stabbing in city centre"),
             ("Stocks fall", "Shares rise sharply in early trading")]
    rows = T.per_example_scores([p for _, p in pairs], [r for r, _ in pairs], ("rouge_l",))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert [r["rouge_l"] for r in rows] == [scorer.score(r, p)["rougeL"].fmeasure for r, p in pairs]
    assert T.corpus_scores([p for _, p in pairs], [r for r, _ in pairs], rows, ("rouge_l",))["rouge_l"] == \
        pytest.approx((rows[0]["rouge_l"] + rows[1]["rouge_l"]) / 2)


def test_bleu_and_chrf_are_sacrebleus():
    import sacrebleu

    predictions = ["the cat is on the mat", "a quick brown fox jumps", "completely different"]
    references = ["the cat sat on the mat", "the quick brown fox jumps over", "nothing in common here"]
    rows = T.per_example_scores(predictions, references, ("bleu", "chrf"))
    corpus = T.corpus_scores(predictions, references, rows, ("bleu", "chrf"))
    assert corpus["bleu"] == pytest.approx(sacrebleu.corpus_bleu(predictions, [references]).score)
    assert corpus["chrf"] == pytest.approx(sacrebleu.corpus_chrf(predictions, [references]).score)
    assert rows[1]["bleu"] == pytest.approx(sacrebleu.sentence_bleu(predictions[1], [references[1]]).score)
    assert T.per_example_scores(["same words here"], ["same words here"], ("bleu", "chrf"))[0] == \
        {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}


@pytest.mark.parametrize("text, number", [
    ("She has 3 apples and buys 39 more, so the answer is 42.", Decimal(42)),
    ("Janet sells the eggs.\n#### 1,000", Decimal(1000)),
    ("The temperature drops 8 degrees to -3.5", Decimal("-3.5")),
    ("The answer is: 20/8", Decimal("2.5")),
    ("#### -7\n\nQuestion: what about 5?", Decimal(-7)),  # the marker wins over a later number
    ("It costs $1,234.50.", Decimal("1234.50")),
    ("I do not know.", None),
])
def test_numeric_answer_extraction(text, number):
    assert T.extract_number(text) == number


def test_exact_match_compares_numbers_not_strings():
    assert T.exact_match("so the answer is 1000.", "#### 1,000")
    assert T.exact_match("The answer is: 2.50", "#### 2.5")
    assert not T.exact_match("no idea", "#### 3")
    assert not T.exact_match("the answer is 4", "#### -4")
    row = T.per_example_scores(["... so the answer is 42."], ["#### 42"], ("exact_match",))[0]
    assert row == {"exact_match": 1.0}


def test_every_generation_metric_is_better_when_higher():
    assert all(higher_is_better(m) for m in T.TEXT_METRICS + T.MATH_METRICS)
    assert not higher_is_better("perplexity") and not higher_is_better("loss")


def test_decoding_refuses_unknown_metrics():
    with pytest.raises(VBShareError, match="data.metrics"):
        Decoding(metrics=("meteor",))


# -- decoding -------------------------------------------------------------------------------------------------------
def test_left_padding_and_stop_strings():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert cut_at_stop(" Headline here\nmore text", ("\n",)) == "Headline here"
    assert cut_at_stop("a. Question: b", ("Question:", ".")) == "a"
    assert cut_at_stop("no stop", ()) == "no stop"


@pytest.fixture(scope="module")
def tiny_lm():
    """A 2-layer random Llama over MiniLM's tokenizer (no files beyond the packaged tokenizer)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_greedy_text_is_the_same_merged_and_unmerged_and_batched(tiny_lm):
    model, tokenizer = tiny_lm
    vbshare.inject(model, "lora", r=4)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for param in model.parameters():
            if param.requires_grad:  # LoRA's B starts at zero: give the adapter a real update
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    prompts = [tokenizer("the news today", add_special_tokens=False)["input_ids"],
               tokenizer("a much longer prompt about the markets and the weather", add_special_tokens=False)["input_ids"]]
    decoding = Decoding(metrics=("rouge_l",), max_new_tokens=8)
    unmerged = generate_batch(model, tokenizer, prompts, decoding, seed=0, device="cpu")
    one_by_one = [generate_batch(model, tokenizer, [p], decoding, seed=0, device="cpu")[0] for p in prompts]
    vbshare.merge(model)
    merged = generate_batch(model, tokenizer, prompts, decoding, seed=0, device="cpu")
    vbshare.unmerge(model)
    assert unmerged == merged == one_by_one  # left padding changes nothing
    with vbshare.disabled(model):
        assert generate_batch(model, tokenizer, prompts, decoding, seed=0, device="cpu") != unmerged
    sampled = Decoding(metrics=("rouge_l",), max_new_tokens=8, do_sample=True, seed=3)
    state = torch.get_rng_state()
    first = generate_batch(model, tokenizer, prompts, sampled, seed=3, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # sampling leaves the caller's RNG alone
    assert generate_batch(model, tokenizer, prompts, sampled, seed=3, device="cpu") == first


# -- tasks ----------------------------------------------------------------------------------------------------------
def test_bbc_headlines_splits_like_bbc_news_and_targets_the_headline():
    from vbshare.data.tasks import bbc_headlines, bbc_news

    task, news = bbc_headlines(), bbc_news()
    assert task.metric == "rouge_l" and task.decoding is not None
    for name in ("train", "validation", "test"):
        assert len(news.splits[name]) - 10 <= len(task.splits[name]) <= len(news.splits[name])
        chat = task.splits[name].messages[0]
        assert news.splits[name].text[0].startswith(chat[1]["content"])  # the headline is the article's first line
        assert chat[1]["content"] not in chat[0]["content"].split("\n\n", 1)[1][:len(chat[1]["content"])]
    bodies = {name: {c[0]["content"] for c in task.splits[name].messages} for name in task.splits}
    assert not (bodies["train"] & bodies["test"]) and not (bodies["train"] & bodies["validation"])


def test_generation_encoding_cuts_the_prompt_and_keeps_the_answer():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))  # no chat template, no BOS: prompt, answer, EOS
    tokenizer.eos_token = tokenizer.sep_token
    long_prompt = " ".join(["word"] * 50)
    chats = [[{"role": "user", "content": long_prompt}, {"role": "assistant", "content": "short answer"}]] * 3
    task = Task("t", "lm", {"train": Split(messages=chats), "test": Split(messages=chats)}, "rouge_l", [], max_length=10,
                decoding=Decoding(metrics=("rouge_l",), max_new_tokens=5))
    encoded = tokenize_task(task, tokenizer)
    test = encoded["test"]
    prompt = test.prompts[0]
    assert prompt == [tokenizer.convert_tokens_to_ids("word")] * 10
    answer = tokenizer("short answer", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
    assert test.input_ids[0] == prompt + answer
    assert test.lm_labels[0] == [IGNORE_INDEX] * len(prompt) + answer
    assert test.references == ["short answer"] * 3 and encoded["train"].prompts is None


# -- report ---------------------------------------------------------------------------------------------------------
def test_report_pairs_generated_text_by_its_score(tmp_path):
    from vbshare.report import examples_vs_control, paired_examples

    scores_a, scores_b = [0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.85], [0.5, 0.4, 0.71, 0.3, 0.2, 0.1, 0.0]
    for name, scores in (("a", scores_a), ("b", scores_b)):
        (tmp_path / name).mkdir()
        rows = [{"index": i, "prompt": "p", "prediction": "x", "reference": "y", "rouge_l": s, "score": s,
                 "loss": 1.0, "tokens": 3} for i, s in enumerate(scores)]
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = examples_vs_control(paired_examples({0: tmp_path / "a"}, {0: tmp_path / "b"}))
    assert result["examples_better"] == 6 and result["examples_worse"] == 1
    assert result["p_examples_vs_control"] == pytest.approx(stats.wilcoxon(scores_a, scores_b).pvalue)
    assert not math.isnan(result["p_examples_vs_control"])


@pytest.mark.slow
def test_two_processes_decode_what_one_does(tmp_path):
    """Each of 2 CPU processes decodes its share; rank 0's gathered answers equal one process's."""
    script = ROOT / "tests" / "generation_ddp_script.py"
    outputs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}.json"
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_port",
                   str(29517 + processes), str(script), str(out)] if processes > 1 else [sys.executable, str(script), str(out)]
        subprocess.run(command, check=True, cwd=ROOT, timeout=300, capture_output=True)
        outputs[processes] = json.loads(out.read_text())
    assert outputs[1] == outputs[2] and len(outputs[1]) == 5


# -- presets on tiny local files of the same format (the real loader; only the source differs) -------------------
@pytest.fixture
def offline(monkeypatch):
    """No network for `datasets` / the Hub in this test."""
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_metamath_gsm8k_preset_on_local_files(tmp_path, offline):
    from vbshare.data.hub import PEFT_MATH_PROMPT, metamath_gsm8k

    write_jsonl(tmp_path / "metamath" / "train.jsonl",
                [{"query": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}. The answer is: {i + 1}", "type": "GSM_AnsAug"}
                 for i in range(6)])
    gsm = [{"question": f"Tom has {i} pens and buys 2. How many?", "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}
           for i in range(5)]
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", gsm)
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", gsm[:3])
    task = metamath_gsm8k(str(tmp_path / "metamath"), str(tmp_path / "gsm8k"), gsm8k_subset=None, validation_size=2)
    assert task.metric == "exact_match" and task.decoding.max_new_tokens == 300 and not task.chat_template
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [6, 2, 3]
    first = task.splits["test"].messages[0]
    assert first[0]["content"] == PEFT_MATH_PROMPT.format(query=gsm[0]["question"])
    assert T.extract_number(first[1]["content"]) == 2


def test_e2e_alpaca_and_hf_presets_on_local_files(tmp_path, offline):
    from vbshare.data.hub import alpaca, e2e_nlg, hf

    mr = [{"meaning_representation": f"name[Place {i}], food[Thai]", "human_reference": f"Place {i} serves Thai food."}
          for i in range(4)]
    for split in ("train", "validation", "test"):
        write_jsonl(tmp_path / "e2e" / f"{split}.jsonl", mr)
    task = e2e_nlg(str(tmp_path / "e2e"))
    assert task.metric == "bleu" and task.splits["test"].messages[1] == [
        {"role": "user", "content": "name[Place 1], food[Thai]\n"}, {"role": "assistant", "content": "Place 1 serves Thai food."}]

    write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Say {i}.", "input": "loud" if i % 2 else "",
                                             "output": f"{i}!"} for i in range(7)])
    task = alpaca(str(tmp_path / "alpaca.jsonl"), held_out=2)
    assert [len(task.splits[s]) for s in ("train", "validation", "test")] == [3, 2, 2] and task.metric == "rouge_l"
    prompts = {c[0]["content"] for s in task.splits.values() for c in s.messages}
    assert "Say 1.\n\nloud" in prompts and "Say 0." in prompts

    rows = [{"sentence": f"text {i}", "label": i % 2, "q": f"q{i}", "a": f"a{i}"} for i in range(10)]
    write_jsonl(tmp_path / "mine" / "train.jsonl", rows)
    write_jsonl(tmp_path / "mine" / "test.jsonl", rows[:3])
    gen = hf(str(tmp_path / "mine"), prompt_template="Q: {q}\nA:", response_column="a")
    assert gen.decoding is not None and len(gen.splits["test"]) == 3 and len(gen.splits["validation"]) == 1
    assert gen.splits["test"].messages[0][0]["content"] == "Q: q0\nA:"
    cls = hf(str(tmp_path / "mine"), kind="classification", text_column="sentence")
    assert cls.label_names == ["0", "1"] and cls.splits["test"].label == [0, 1, 0]
    lm = hf(str(tmp_path / "mine"), kind="lm", text_column="sentence")
    assert lm.metric == "perplexity" and lm.splits["test"].text == ["text 0", "text 1", "text 2"]
    with pytest.raises(VBShareError, match="column 'nope'"):
        hf(str(tmp_path / "mine"), kind="lm", text_column="nope")


def test_a_hub_dataset_offline_without_a_cache_fails_in_one_line(offline):
    from vbshare.data.hub import load_table

    with pytest.raises(VBShareError) as err:
        load_table("vbshare-tests/no-such-dataset", None, "train")
    assert "needs internet or a local datasets cache" in str(err.value) and "\n" not in str(err.value)


def test_forgetting_is_the_general_text_loss_without_and_with_the_adapter(tiny_lm, monkeypatch):
    from types import SimpleNamespace

    from vbshare.train import forgetting as F
    from vbshare.train.engine import Engine

    model, tokenizer = tiny_lm
    monkeypatch.setattr(F, "FORGETTING_BLOCKS", 2)
    if vbshare.state_of(model, required=False) is None:
        vbshare.inject(model, "lora", r=4)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    engine = Engine(SimpleNamespace(precision="fp32", strategy="ddp", device="cpu", compile=False))
    run = SimpleNamespace(task=Task("t", "lm", {}, "rouge_l"), tokenizer=tokenizer, model=model, engine=engine, pad_id=0,
                          step=5, settings=SimpleNamespace(trainer=SimpleNamespace(forgetting_eval=True, eval_batch_size=4)))
    record = F.forgetting(run, F.loss_before(run))
    text = "\n".join(F.general_text_task().splits["test"].text)  # independent: transformers' own loss per block
    stream = tokenizer(text[:20000], add_special_tokens=False)["input_ids"]
    blocks = torch.tensor([stream[i * 256:(i + 1) * 256] for i in range(2)])  # (2, 256)
    with torch.no_grad():
        after = model(input_ids=blocks, labels=blocks).loss.item()
        with vbshare.disabled(model):
            before = model(input_ids=blocks, labels=blocks).loss.item()
    assert record["loss_after"] == pytest.approx(after, rel=1e-4)
    assert record["loss_before"] == pytest.approx(before, rel=1e-4)
    assert record["loss_change"] == pytest.approx(after - before, rel=1e-3)


def test_the_peft_metamath_experiment_composes():
    from hydra import compose, initialize_config_dir

    from vbshare.train.settings import read_settings

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=peft_metamath", "+adapter=lora", "adapter.lr=1.0e-4"])
    assert cfg.model.loader._target_ == "vbshare.models.hf" and cfg.model.loader.name == "meta-llama/Llama-3.2-3B"
    assert cfg.data._target_ == "vbshare.data.hub.metamath_gsm8k" and cfg.data.max_new_tokens == 300
    assert (cfg.model.dtype, cfg.trainer.precision, cfg.trainer.batch_size, cfg.trainer.max_steps) == ("bf16", "bf16", 4, 5000)
    settings = read_settings(cfg)
    assert settings.optim.schedule == "cosine" and cfg.adapter.lr == 1.0e-4


def test_cosine_schedule_is_transformers():
    from transformers import get_cosine_schedule_with_warmup

    from vbshare.train.loop import lr_factor

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=10, num_training_steps=100)
    theirs = []
    for _ in range(100):
        optimizer.step()
        schedule.step()
        theirs.append(schedule.get_last_lr()[0])
    ours = [lr_factor(step, 100, 0.1, "cosine") for step in range(1, 101)]
    assert ours[9:] == pytest.approx(theirs[9:], abs=1e-9)  # after the warmup (theirs counts it from 0 / 10)


@pytest.mark.slow
@pytest.mark.decoder
def test_bbc_headlines_with_smollm2_end_to_end(tmp_path):
    """The training app on data=bbc_headlines: summary.json has test ROUGE-L, predictions.jsonl one decoded
    headline per test example whose mean ROUGE-L is the summary's, and the report pairs two such runs."""
    from hydra import compose, initialize_config_dir

    from vbshare.report import examples_vs_control, paired_examples
    from vbshare.train.app import run_training

    overrides = ["+adapter=lora", "model=smollm2_135m", "data=bbc_headlines", "trainer=debug", "data.max_length=24",
                 "data.max_new_tokens=4", "trainer.max_examples=2", "trainer.max_steps=1", "trainer.batch_size=2",
                 "trainer.eval_every=1", "trainer.forgetting_eval=false"]
    summaries = {}
    for seed in (0, 1):
        with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
            cfg = compose("train", overrides=[*overrides, f"seed={seed}"])
        summaries[seed] = run_training(cfg, tmp_path / str(seed), [*overrides, f"seed={seed}"])
    test = summaries[0]["final"]["test"]
    assert summaries[0]["metric"] == "rouge_l" and {"rouge_l", "rouge1", "rouge2", "bleu", "perplexity"} <= set(test)
    rows = [json.loads(line) for line in (tmp_path / "0" / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for row in rows:
        assert {"prompt", "prediction", "reference", "rouge_l", "score", "loss", "tokens"} <= set(row)
        assert row["rouge_l"] == T.per_example_scores([row["prediction"]], [row["reference"]], ("rouge_l",))[0]["rouge_l"]
    assert test["rouge_l"] == pytest.approx(sum(r["rouge_l"] for r in rows) / len(rows))
    pairs = paired_examples({0: tmp_path / "0"}, {0: tmp_path / "1"})
    assert "score" in pairs and examples_vs_control(pairs)["examples_paired"] == 2
