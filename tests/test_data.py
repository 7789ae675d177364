"""Data (vbshare/data): few-shot BBC News, instruction data for causal LMs, public batches, the README snippet.

Instruction labels are checked against token lists written out by hand for a word-level tokenizer built in
the test (one id per word, so every position can be counted on paper); the loss on them against transformers'
own causal-LM loss and a float64 sum written here; the SmolLM2 run against a response loss computed from the
tokenizer's chat template without vbshare's encoding code.
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import vbshare
from vbshare import VBShareError
from vbshare.data import batches, bbc_news, collate, files, tokenize_task
from vbshare.data.tasks import IGNORE_INDEX, Split, Task
from vbshare.train import CONFIG_DIR, run_training
from vbshare.train.loop import forward_loss

REPO = Path(__file__).resolve().parents[1]
README_TIMEOUT_S = 300  # the README snippet trains MiniLM for 30 steps (about 30 s on a 2-core CPU)
CHANCE_ACCURACY = 0.2  # 5 BBC topics
X = IGNORE_INDEX

# -- a word-level tokenizer: one id per word, so the expected ids can be written by hand ---------------------------
VOCAB = ["[PAD]", "<s>", "</s>", "<user>", "<assistant>", "<system>", "what", "is", "two", "plus", "it",
         "four", "be", "brief", "and", "three", "five", "[UNK]"]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
TWO_PLUS_TWO = {"prompt": "what is two plus two", "response": "it is four"}
TWO_PLUS_THREE = {"prompt": "what is two plus three", "response": "five"}
CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus two"},
                     {"role": "assistant", "content": "four"}, {"role": "user", "content": "and three plus two"},
                     {"role": "assistant", "content": "five"}]}


def hand(words: str) -> list[int]:
    """Ids of space-separated words by their place in VOCAB (the tokenizer under test is not used)."""
    return [VOCAB.index(w) for w in words.split()]


def word_tokenizer(with_template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="[PAD]", unk_token="[UNK]")
    tokenizer.chat_template = TEMPLATE if with_template else None
    return tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def instruction_task(tmp_path: Path, rows: list[dict], **options) -> Task:
    """files() on a JSONL file used for all three splits (no random split, so the order is known)."""
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    return files(str(path), validation_path=str(path), test_path=str(path), **options)


# -- instruction data: exact labels ---------------------------------------------------------------------------------
# (rows, with chat template?) -> expected [(input words, target words with "X" for no loss)] of the train split
EXPECTED = {
    "prompt_template": ([TWO_PLUS_TWO], True, [
        ("<user> what is two plus two </s> <assistant> it is four </s>",
         "X X X X X X X X it is four </s>")]),
    "prompt_plain": ([TWO_PLUS_TWO], False, [
        ("<s> what is two plus two it is four </s>",
         "X X X X X X it is four </s>")]),
    "chat_template": ([CHAT], True, [
        ("<system> be brief </s> <user> what is two plus two </s> <assistant> four </s> "
         "<user> and three plus two </s> <assistant> five </s>",
         "X X X X X X X X X X X X four </s> X X X X X X X five </s>")]),
    "chat_plain": ([CHAT], False, [
        ("<s> be brief what is two plus two four </s> and three plus two five </s>",
         "X X X X X X X X four </s> X X X X five </s>")]),
}


def words_to_ids(words: str) -> list[int]:
    return [X if w == "X" else VOCAB.index(w) for w in words.split()]


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_instruction_labels_by_hand(case, tmp_path):
    rows, with_template, expected = EXPECTED[case]
    task = instruction_task(tmp_path, rows, max_length=64)
    assert (task.kind, task.metric) == ("lm", "perplexity")
    encoded = tokenize_task(task, word_tokenizer(with_template))["train"]
    assert encoded.input_ids == [hand(ids) for ids, _ in expected]
    assert encoded.lm_labels == [words_to_ids(labels) for _, labels in expected]
    assert encoded.labels is None


@pytest.mark.parametrize("with_template", [True, False])
def test_instruction_packing_by_hand(with_template, tmp_path):
    """[2+2, 2+3, 2+2] with room for 24 tokens: the first two share a sequence, the third starts a new one."""
    if with_template:
        first = ("<user> what is two plus two </s> <assistant> it is four </s>", "X X X X X X X X it is four </s>")
        second = ("<user> what is two plus three </s> <assistant> five </s>", "X X X X X X X X five </s>")
    else:
        first = ("<s> what is two plus two it is four </s>", "X X X X X X it is four </s>")
        second = ("<s> what is two plus three five </s>", "X X X X X X five </s>")
    task = instruction_task(tmp_path, [TWO_PLUS_TWO, TWO_PLUS_THREE, TWO_PLUS_TWO], max_length=24, packing=True)
    encoded = tokenize_task(task, word_tokenizer(with_template))["train"]
    assert encoded.input_ids == [hand(first[0]) + hand(second[0]), hand(first[0])]
    assert encoded.lm_labels == [words_to_ids(first[1]) + words_to_ids(second[1]), words_to_ids(first[1])]
    unpacked = tokenize_task(instruction_task(tmp_path, [TWO_PLUS_TWO, TWO_PLUS_THREE, TWO_PLUS_TWO], max_length=24),
                             word_tokenizer(with_template))["train"]
    assert len(unpacked) == 3


def test_chat_template_switch_and_truncation(tmp_path):
    """data.chat_template=false ignores a template the tokenizer has; a chat whose response lies beyond
    max_length is left out, and if none is left the error says what to change."""
    plain = tokenize_task(instruction_task(tmp_path, [TWO_PLUS_TWO], chat_template=False), word_tokenizer(True))
    assert plain["train"].input_ids == [hand("<s> what is two plus two it is four </s>")]
    short = instruction_task(tmp_path, [CHAT, TWO_PLUS_THREE], max_length=10)  # CHAT's first target is at 12
    encoded = tokenize_task(short, word_tokenizer(True))["train"]
    assert encoded.input_ids == [hand("<user> what is two plus three </s> <assistant> five </s>")]
    with pytest.raises(VBShareError, match="data.max_length"):
        tokenize_task(instruction_task(tmp_path, [CHAT], max_length=10), word_tokenizer(True))


def test_instruction_bad_rows_one_line(tmp_path):
    for rows, needle in (([{"messages": [{"role": "user", "content": "hi"}]}], "no 'assistant' turn"),
                         ([{"messages": "hi"}], "list of"),
                         ([{"prompt": "hi", "response": 3}], "strings")):
        with pytest.raises(VBShareError, match=needle) as caught:
            instruction_task(tmp_path, rows)
        assert "\n" not in str(caught.value)


def test_instruction_file_split_without_labels(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [TWO_PLUS_TWO, TWO_PLUS_THREE] * 10)
    task = files(str(path), fractions={"train": 0.6, "validation": 0.2, "test": 0.2})
    assert {name: len(split) for name, split in task.splits.items()} == {"train": 12, "validation": 4, "test": 4}


def tiny_gpt2(vocab_size: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=16, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


def test_lm_labels_collate_and_loss(tmp_path):
    """collate pads lm_labels with -100; forward_loss (the training loop's) equals transformers' own causal-LM
    loss on vbshare.data.batches and a float64 sum over the response positions written here."""
    tokenizer = word_tokenizer(True)
    task = instruction_task(tmp_path, [TWO_PLUS_TWO, TWO_PLUS_THREE], max_length=64)
    encoded = tokenize_task(task, tokenizer)["train"]
    batch = collate(encoded, [0, 1], tokenizer.pad_token_id, "cpu")
    assert batch["lm_labels"][1].tolist() == words_to_ids("X X X X X X X X five </s>") + [X, X]
    assert batch["input_ids"][1].tolist() == hand("<user> what is two plus three </s> <assistant> five </s>") + [0, 0]

    model = tiny_gpt2(len(VOCAB))
    with torch.no_grad():
        ours, logits = forward_loss(model, batch, task)  # the model is called without lm_labels (GPT-2 refuses it)
        theirs = model(**next(batches(task, tokenizer, batch_size=2))).loss
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    terms = [-log_probs[b, t, batch["lm_labels"][b, t + 1]] for b in range(2) for t in range(logits.shape[1] - 1)
             if batch["lm_labels"][b, t + 1] != X]
    assert len(terms) == 4 + 2  # "it is four </s>" and "five </s>"
    assert torch.allclose(ours.double(), torch.stack(terms).mean(), atol=1e-6)
    assert torch.allclose(ours, theirs, atol=1e-6)


# -- few-shot BBC News ----------------------------------------------------------------------------------------------
def pairs(split: Split) -> list[tuple[str, int]]:
    return list(zip(split.text, split.label))


def test_bbc_news_train_per_class():
    full = bbc_news()
    few = bbc_news(train_per_class=6, train_subset_seed=0)
    assert Counter(few.splits["train"].label) == {label: 6 for label in range(5)}
    assert set(pairs(few.splits["train"])) <= set(pairs(full.splits["train"]))
    for split in ("validation", "test"):
        assert pairs(few.splits[split]) == pairs(full.splits[split])
    assert pairs(bbc_news(train_per_class=6, train_subset_seed=0).splits["train"]) == pairs(few.splits["train"])
    other = bbc_news(train_per_class=6, train_subset_seed=1)
    assert set(pairs(other.splits["train"])) != set(pairs(few.splits["train"]))
    assert Counter(other.splits["train"].label) == {label: 6 for label in range(5)}
    with pytest.raises(VBShareError, match="fewer than data.train_per_class"):
        bbc_news(train_per_class=10_000)


def test_train_per_class_from_the_config():
    """data.train_per_class on the app's config; the subset follows the run seed."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["data.train_per_class=4", "seed=3"])
    task = instantiate(cfg.data)
    assert cfg.data.train_subset_seed == 3
    assert pairs(task.splits["train"]) == pairs(bbc_news(train_per_class=4, train_subset_seed=3).splits["train"])


def test_files_train_per_class(tmp_path):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows([{"text": f"good film {i}", "label": "good"} for i in range(10)]
                         + [{"text": f"bad film {i}", "label": "bad"} for i in range(20)])
    task = files(str(path), validation_path=str(path), test_path=str(path), train_per_class=5)
    assert Counter(task.splits["train"].label) == {0: 5, 1: 5}
    assert len(task.splits["validation"]) == len(task.splits["test"]) == 30
    with pytest.raises(VBShareError, match="instruction data has none"):
        instruction_task(tmp_path, [TWO_PLUS_TWO], train_per_class=1)


# -- public batches -------------------------------------------------------------------------------------------------
def toy_task() -> Task:
    texts = [f"article number {i} " + "word " * i for i in range(10)]
    labels = [i % 2 for i in range(10)]
    return Task("toy", "classification", {"train": Split(texts, labels)}, "accuracy", ["even", "odd"], 8)


def test_batches_one_pass_and_training_steps():
    from vbshare.models import tiny_bert

    model, tokenizer = tiny_bert("classification", 2)
    task = toy_task()
    texts, labels = task.splits["train"].text, task.splits["train"].label
    in_order = list(batches(task, tokenizer, batch_size=4))
    assert [len(b["labels"]) for b in in_order] == [4, 4, 2]
    assert torch.cat([b["labels"] for b in in_order]).tolist() == labels
    expected = tokenizer(texts, truncation=True, max_length=8)["input_ids"]
    got = [row[mask.bool()].tolist() for b in in_order for row, mask in zip(b["input_ids"], b["attention_mask"])]
    assert got == expected
    assert set(in_order[0]) == {"input_ids", "attention_mask", "token_type_ids", "labels"}

    steps = list(batches(task, tokenizer, batch_size=4, steps=5, seed=1))
    assert [len(b["labels"]) for b in steps] == [4] * 5
    rows = lambda bs: [tuple(r.tolist()) for b in bs for r in b["input_ids"]]  # noqa: E731
    assert len(set(rows(steps[:2]))) == 8  # an epoch (2 full batches of 10 examples) repeats no example
    assert rows(steps[2:4]) != rows(steps[:2])  # each epoch is shuffled afresh
    assert rows(steps) == rows(batches(task, tokenizer, batch_size=4, steps=5, seed=1))
    assert rows(steps) != rows(batches(task, tokenizer, batch_size=4, steps=5, seed=2))
    assert torch.isfinite(model(**steps[0]).loss)
    with pytest.raises(VBShareError, match="no 'test' split"):
        next(batches(task, tokenizer, split="test"))


@pytest.mark.slow
def test_readme_library_snippet_runs_as_written(tmp_path):
    """The README's first python block, executed unchanged in an empty folder (one thread: a shared CPU)."""
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    script = tmp_path / "readme_snippet.py"
    script.write_text(block)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=README_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    adapted = re.findall(r"^\S*encoder\.layer\.\d+\.\S+", done.stdout, re.M)  # summary(model)'s module rows
    assert len(adapted) == 6 * 4  # MiniLM's 6 layers × query, value and the feed-forward pair, as the snippet says
    assert sum(name.endswith(".attention.output.dense") for name in adapted) == 0
    accuracy = float(re.search(r"validation accuracy ([0-9.]+)", done.stdout).group(1))
    assert accuracy > 2 * CHANCE_ACCURACY
    for folder in ("adapter", "adapter-topk", "peft"):
        assert (tmp_path / "out" / folder / "adapter_config.json").is_file(), folder


# -- SmolLM2 on instruction data --------------------------------------------------------------------------------------
COLOURS = ["red", "blue", "green", "yellow", "black", "white"]
ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow", "goat", "sheep"]


def colour_rows(animals: list[str]) -> list[dict]:
    return [{"prompt": f"What colour is the {a}?", "response": f"The {a} is {c}, my friend."}
            for a in animals for c in COLOURS]


def response_loss(model, tokenizer, rows: list[dict]) -> float:
    """Mean NLL of the response tokens: the chat rendered once by the tokenizer's template, the prompt's length
    taken from rendering the prompt alone with the generation prompt."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            user = [{"role": "user", "content": row["prompt"]}]
            prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row["response"]}],
                                                 tokenize=False)
            start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])  # (1, T)
            logits = model(ids).logits[0]  # (T, V)
            total += float(torch.nn.functional.cross_entropy(logits[start - 1:-1], ids[0, start:], reduction="sum"))
            count += ids.shape[1] - start
    return total / count


@pytest.mark.decoder
def test_smollm2_instruction_run_lowers_response_loss(tmp_path):
    from vbshare.models import smollm2_135m

    train_file = write_jsonl(tmp_path / "train.jsonl", colour_rows(ANIMALS[:6]))
    held_out = colour_rows(ANIMALS[6:])[::3]
    held_out_file = write_jsonl(tmp_path / "held_out.jsonl", held_out)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+adapter=lora", "model=smollm2_135m", "data=files", f"data.path={train_file}",
            f"data.validation_path={held_out_file}", f"data.test_path={held_out_file}", "data.max_length=64",
            "trainer=debug", "trainer.max_steps=6", "trainer.eval_every=6", "trainer.checkpoint_every=null",
            "adapter.lr.A=5e-3", "adapter.lr.B=5e-3"])
    summary = run_training(cfg, tmp_path / "run")
    assert summary["metric"] == "perplexity"
    model, tokenizer = smollm2_135m("lm")
    before = response_loss(model, tokenizer, held_out)
    vbshare.load_adapter(model, tmp_path / "run" / "adapter")
    after = response_loss(model, tokenizer, held_out)
    print(f"response loss before {before:.3f}, after {after:.3f}")
    assert after < 0.5 * before, (before, after)
