"""The training engine in one process: gradient accumulation, activation checkpointing, mixed precision,
resume, the test-split switch, language-model targets and the FSDP grouping.

Equalities are checked on the saved adapter tensors of tiny-BERT runs with dropout off (`trainer.dropout=0`):
splitting a step's batch into micro-batches, or recomputing activations, must train the same adapter as the
plain run, up to float rounding. Multi-process runs are in test_ddp.py.
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

import vbshare
from vbshare.registry import METHODS
from vbshare.errors import VBShareError
from vbshare.models import tiny_bert
from vbshare.train import train_step
from vbshare.data.batching import collate
from vbshare.data.tasks import IGNORE_INDEX
from vbshare.train.batches import count_targets, forward_loss
from vbshare.train.engine import frozen_subtrees, transformer_blocks
from vbshare.train.setup import enable_activation_checkpointing

from run_checks import assert_same_adapter, losses, saved_tensors
from helpers import train

BASE = ["model=tiny_bert", "trainer=debug", "data.max_length=32", "trainer.dropout=0", "trainer.eval_every=4",
        "trainer.checkpoint_every=null"]
# The machinery each method runs after a step, made to act within four steps: ASLoRA ties B's from step 1,
# SoRA's threshold (lr · lam per step on the gates) zeroes a good share of its N(0, 1) gates, and its L1
# extra loss (once per step, whatever the micro-batches) is on.
ACTIVE = {"aslora": ["adapter.merge_start=1", "adapter.merge_every=1"], "sora": ["adapter.lam=100", "adapter.l1=0.5"]}
ACCUMULATION_TOLERANCE = 1e-5  # float rounding of differently sized matrix products
CHECKPOINTING_TOLERANCE = 1e-6  # the recomputation repeats the same operations


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """method -> (run dir, summary) of the reference run: one micro-batch, no activation checkpointing."""
    cache: dict[str, tuple[Path, dict]] = {}

    def get(method: str) -> tuple[Path, dict]:
        if method not in cache:
            run_dir = tmp_path_factory.mktemp(f"plain_{method}")
            cache[method] = run_dir, train([f"+adapter={method}", *BASE, *ACTIVE.get(method, [])], run_dir)
        return cache[method]

    return get


# -- gradient accumulation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "vblora", "aslora", "sora"])
def test_four_micro_batches_train_the_same_adapter(method, plain_runs, tmp_path):
    plain_dir, plain = plain_runs(method)
    summary = train([f"+adapter={method}", *BASE, *ACTIVE.get(method, []), "trainer.grad_accum_steps=4"], tmp_path)
    assert summary["grad_accum_steps"] == 4 and plain["grad_accum_steps"] == 1
    assert_same_adapter(tmp_path, plain_dir, ACCUMULATION_TOLERANCE)
    assert summary["sharing"] == plain["sharing"]  # the same ties / the same pruned gates
    assert [s for s, _ in losses(tmp_path)] == [1, 2, 3, 4]  # after_step ran once per optimiser step
    assert [loss for _, loss in losses(tmp_path)] == pytest.approx([loss for _, loss in losses(plain_dir)], abs=1e-5)
    if method == "aslora":
        assert summary["sharing"]["merges"] > 0, "no tie happened inside the run"
    if method == "sora":
        ranks = summary["sharing"]["retained_ranks"]
        assert sum(ranks.values()) < 8 * len(ranks), "no gate was thresholded inside the run"


def test_micro_batch_weights_add_up_to_the_batch_mean():
    """Target-token weighting: micro-batches of different sizes, each summed and divided by the whole batch's
    token count, give the mean over every target token (not the mean of the micro-batch means)."""
    split = SimpleNamespace(input_ids=[[5, 6, 7, 8, 9], [5, 6], [7, 8, 9, 5]], labels=None, token_type_ids=None,
                            lm_labels=[[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], [IGNORE_INDEX, 6], [7, 8, IGNORE_INDEX, 5]])
    torch.manual_seed(0)
    table = torch.randn(10, 10)  # a "model": next-token logits read from a table, per input token
    model = lambda input_ids, attention_mask: SimpleNamespace(logits=table[input_ids])  # noqa: E731
    task = SimpleNamespace(kind="lm")
    # by hand: the targets are lm_labels shifted by one, positions labelled IGNORE_INDEX carry no loss
    terms = []
    for ids, labels in zip(split.input_ids, split.lm_labels):
        for position in range(1, len(ids)):
            if labels[position] != IGNORE_INDEX:
                terms.append(-torch.log_softmax(table[ids[position - 1]].double(), -1)[labels[position]])
    expected = torch.stack(terms).mean()
    assert count_targets(split, [0, 1, 2], "lm") == len(terms) == 6
    whole, _ = forward_loss(model, collate(split, [0, 1, 2], 0, torch.device("cpu")), task)
    parts = [forward_loss(model, collate(split, part, 0, torch.device("cpu")), task, reduction="sum")[0]
             for part in ([0], [1, 2])]
    torch.testing.assert_close(whole.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(sum(parts).double() / count_targets(split, [0, 1, 2], "lm"), expected, atol=1e-6, rtol=0)
    batch = collate(split, [1, 2], 0, torch.device("cpu"))
    assert batch["lm_labels"].tolist() == [[IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX], [7, 8, IGNORE_INDEX, 5]]


# -- activation checkpointing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_activation_checkpointing_trains_the_same_adapter(method, plain_runs, tmp_path):
    plain_dir, plain = plain_runs(method)
    summary = train([f"+adapter={method}", *BASE, *ACTIVE.get(method, []), "trainer.activation_checkpointing=true"],
                    tmp_path)
    assert_same_adapter(tmp_path, plain_dir, CHECKPOINTING_TOLERANCE)
    assert summary["sharing"] == plain["sharing"]


def test_activation_checkpointing_recomputes_every_block():
    """With checkpointing on, backward runs the adapted layers inside every block a second time, and the
    forward pass keeps far fewer tensors for backward."""

    def forward_calls_and_saved(checkpointing: bool) -> tuple[int, int]:
        model, _ = tiny_bert("classification", 3)
        vbshare.inject(model, "lora", targets=["query", "value"])
        if checkpointing:
            enable_activation_checkpointing(model)
        counts = {"calls": 0, "saved": 0}
        for adapter in vbshare.adapters(model).values():
            adapter.register_forward_hook(lambda *_: counts.__setitem__("calls", counts["calls"] + 1))

        def saved(t: torch.Tensor) -> torch.Tensor:
            counts["saved"] += 1
            return t

        model.train()
        ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))

        def loss() -> torch.Tensor:
            with torch.autograd.graph.saved_tensors_hooks(saved, lambda t: t):
                return model(input_ids=ids).logits.pow(2).mean()

        train_step(model, torch.optim.SGD(vbshare.param_groups(model, lr=0.1)), loss, 1)
        return counts["calls"], counts["saved"]

    (plain_calls, plain_saved), (checkpointed_calls, checkpointed_saved) = (
        forward_calls_and_saved(False), forward_calls_and_saved(True))
    assert plain_calls == 4 and checkpointed_calls == 8  # 2 blocks × (query, value); twice each when recomputed
    assert checkpointed_saved < plain_saved / 2


# -- mixed precision ------------------------------------------------------------------------------------------
def test_bf16_trains_and_keeps_fp32_adapter(tmp_path):
    """bf16 autocast over a base loaded in bf16: the loss falls on a batch seen every step, the trained tensors
    stay fp32, and the forward pass really ran in bf16 (its first loss differs from fp32's by rounding only)."""
    same_batch = [*BASE, "+adapter=lora", "trainer.max_examples=8", "trainer.batch_size=8", "trainer.max_steps=8",
                  "trainer.eval_every=8", "adapter.lr.A=2e-2", "adapter.lr.B=2e-2", "adapter.lr.head=2e-2"]
    low = train([*same_batch, "trainer.precision=bf16", "model.dtype=bf16"], tmp_path / "bf16")
    train(same_batch, tmp_path / "fp32")
    assert low["precision"] == "bf16"
    curve = [loss for _, loss in losses(tmp_path / "bf16")]
    assert curve[-1] < curve[0] - 0.1, curve
    tensors = saved_tensors(tmp_path / "bf16")
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    first_bf16, first_fp32 = losses(tmp_path / "bf16")[0][1], losses(tmp_path / "fp32")[0][1]
    assert first_bf16 != first_fp32 and first_bf16 == pytest.approx(first_fp32, abs=5e-2)


@pytest.mark.parametrize("setting, needle", [("trainer.precision=fp16", "needs a CUDA device"),
                                             ("trainer.precision=fp8", "trainer.precision must be"),
                                             ("trainer.strategy=zero3", "trainer.strategy must be"),
                                             ("trainer.grad_accum_steps=3", "divisible by the number of processes"),
                                             ("model.dtype=bf16", "set trainer.precision=bf16")])
def test_bad_engine_settings_fail_in_one_line(setting, needle, tmp_path):
    with pytest.raises(VBShareError, match=needle):
        train(["+adapter=lora", *BASE, setting], tmp_path)


# -- resume ---------------------------------------------------------------------------------------------------
def test_resume_with_accumulation_is_exact(tmp_path):
    """Stopped at step 3 and resumed, a run with micro-batches and ASLoRA ties logs the uninterrupted run's
    losses exactly and saves the identical adapter."""
    common = ["+adapter=aslora", *BASE, *ACTIVE["aslora"], "trainer.grad_accum_steps=2", "trainer.max_steps=6",
              "trainer.checkpoint_every=3", "trainer.eval_every=3"]
    full = train(common, tmp_path / "full")
    assert train([*common, "trainer.stop_at_step=3"], tmp_path / "cut") is None
    resumed = train([*common, f"trainer.resume={tmp_path / 'cut'}"], tmp_path / "elsewhere")
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert [s for s, _ in losses(tmp_path / "cut")] == list(range(1, 7))
    assert resumed["final"] == full["final"] and resumed["sharing"] == full["sharing"]
    assert_same_adapter(tmp_path / "cut", tmp_path / "full", atol=0.0)


# -- the test split -------------------------------------------------------------------------------------------
def test_eval_test_false_never_scores_the_test_split(tmp_path):
    summary = train(["+adapter=lora", *BASE, "trainer.eval_test=false", "trainer.eval_every=2"], tmp_path)
    assert list(summary["final"]) == ["validation"]
    lines = (tmp_path / "metrics.jsonl").read_text()
    assert "test" not in lines and "final_validation" in lines
    assert "test" not in (tmp_path / "summary.json").read_text()


# -- adapter config keys that are not hyperparameters ---------------------------------------------------------
def test_search_space_and_size_key_stay_out_of_the_training_app(tmp_path):
    """compare's search space and size knob live in configs/search/, which the training app never composes."""
    from vbshare.search_spaces import read_search

    assert read_search("lora").size_key == "r" and "lr.A" in read_search("lora").search
    summary = train(["+adapter=lora", *BASE, "trainer.max_steps=1"], tmp_path)
    assert not {"search", "size_key"} & set(yaml.safe_load((tmp_path / "config.yaml").read_text())["adapter"])
    assert summary["hyperparameters"]["r"] == 8
    assert "search" not in summary["hyperparameters"] and "size_key" not in summary["hyperparameters"]


# -- FSDP grouping --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "vblora", "aslora"])
def test_fsdp_units_hold_every_frozen_block_weight_and_no_trained_one(method):
    """Each transformer block's FSDP unit holds all of the block's frozen weights; every trained tensor
    (the adapters' own and the shared ones on model.vbshare) stays outside the units."""
    model, _ = tiny_bert("classification", 3)
    vbshare.inject(model, method, targets=["query", "value", "intermediate.dense"],
                   **({"vector_length": 64} if method == "vblora" else {}))
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["BertEmbeddings", "BertLayer", "BertLayer"]
    for block in blocks:
        in_units = {id(p) for unit in frozen_subtrees(block) for p in unit.parameters()}
        frozen = {id(p) for p in block.parameters() if not p.requires_grad}
        trained = {id(p) for p in block.parameters() if p.requires_grad}
        assert in_units == frozen
        assert not in_units & trained
    assert all(p.requires_grad for p in vbshare.state_of(model).parameters())


def test_fsdp_refuses_what_it_cannot_shard():
    from vbshare.train.engine import check_shardable

    model, _ = tiny_bert("classification", 3)
    with pytest.raises(VBShareError, match="full fine-tuning freezes none"):
        check_shardable(model.requires_grad_(True))
    model, _ = tiny_bert("classification", 3)
    vbshare.inject(model, "sora", targets=["query"])
    with pytest.raises(VBShareError, match="converted copy"):
        check_shardable(model)
    vanilla = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    vanilla[0].requires_grad_(False)
    with pytest.raises(VBShareError, match="no block classes"):
        check_shardable(vanilla)
