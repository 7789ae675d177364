"""ASLoRA (docs/methods.md §3): shared A per role, B's tied adaptively — pairing, ties, optimiser surgery, resume.

Every expectation is computed independently here (float64, from the B's and A the test set itself) rather
than read back from the implementation.
"""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from torch import nn

import vbshare
from vbshare.adapters.aslora import write_merge_history
from vbshare.train import train_step


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, d + 2)
        self.back = nn.Linear(d + 2, d, bias=False)


class Toy(nn.Module):
    """n blocks; roles `layers.*.fc` (d -> d) and `layers.*.out` (d -> d+2)."""

    def __init__(self, n: int = 4, d: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + torch.tanh(block.fc(x)) + 0.5 * block.back(torch.tanh(block.out(x)))
        return x


def build(n: int = 4, d: int = 8, targets=("fc", "out"), model_seed: int = 0, **hyper) -> nn.Module:
    torch.manual_seed(model_seed)
    model = Toy(n, d)
    torch.manual_seed(model_seed + 1)
    return vbshare.inject(model, "aslora", targets=list(targets), **hyper)


def batch(step: int, d: int = 8) -> torch.Tensor:
    return torch.randn(6, d, generator=torch.Generator().manual_seed(1000 + step))


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(vbshare.param_groups(model, lr=5e-2, weight_decay=0.01))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps, d: int = 8) -> list[float]:
    losses = []
    model.train()
    for step in steps:
        stats = train_step(model, optimizer, lambda: (model(batch(step, d)) - 1.0).pow(2).mean(), step)
        losses.append(stats.loss.item())
    return losses


def distinct_b(model: nn.Module, group: str) -> list[nn.Parameter]:
    state = vbshare.state_of(model)
    out: list[nn.Parameter] = []
    for name in state.groups[group]:
        b = state.B_of(name)
        if not any(b is seen for seen in out):
            out.append(b)
    return out


# -- hand-built pairing example -----------------------------------------------------------------------------
# d = 2, r = 2, A = diag(10, 0.1): a difference in B's first column costs 100x more under `delta` than `b`.
HAND_A = torch.tensor([[10.0, 0.0], [0.0, 0.1]])
HAND_B = [
    torch.tensor([[0.0, 0.0], [0.0, 0.0]]),
    torch.tensor([[0.0, 3.0], [0.0, 0.0]]),
    torch.tensor([[1.0, 3.0], [0.0, 0.0]]),
    torch.tensor([[0.5, 0.0], [0.0, 0.0]]),
]


def reference_closest(pairs: str, distance: str) -> tuple[int, int]:
    A = HAND_A.double()
    candidates = [(i, i + 1) for i in range(3)] if pairs == "adjacent" else list(itertools.combinations(range(4), 2))

    def dist(i, j):
        diff = HAND_B[i].double() - HAND_B[j].double()
        return torch.linalg.norm(diff @ A if distance == "delta" else diff).item()

    return min(candidates, key=lambda p: dist(*p))


def hand_model(**hyper) -> nn.Module:
    model = build(n=4, d=2, targets=("fc",), r=2, merge_start=1, merge_every=1, **hyper)
    state = vbshare.state_of(model)
    with torch.no_grad():
        state.A_of("layers.0.fc").copy_(HAND_A)
        for i, value in enumerate(HAND_B):
            state.B_of(f"layers.{i}.fc").copy_(value)
    return model


def test_hand_example_is_discriminating():
    """The example must separate the options, or the next test could pass by luck."""
    picks = {(p, d): reference_closest(p, d) for p in ("adjacent", "all") for d in ("b", "delta")}
    assert len(set(picks.values())) == 3
    assert picks[("all", "b")] == (0, 3)  # the globally closest pair is not adjacent


@pytest.mark.parametrize("pairs", ["adjacent", "all"])
@pytest.mark.parametrize("distance", ["b", "delta"])
def test_hand_example_merges_reference_pair(pairs, distance):
    model = hand_model(pairs=pairs, distance=distance)
    state = vbshare.state_of(model)
    optimizer = make_optimizer(model)
    vbshare.after_step(model, optimizer, 1)  # t = 1: the running averages equal the B's set above
    i, j = reference_closest(pairs, distance)
    assert len(state.history) == 1
    record = state.history[0]
    assert record["layers"] == [[i], [j]]
    assert record["step"] == 1 and record["group"] == "layers.*.fc"
    diff = HAND_B[i].double() - HAND_B[j].double()
    expected = torch.linalg.norm(diff @ HAND_A.double() if distance == "delta" else diff).item()
    assert record["distance"] == pytest.approx(expected, rel=1e-12)
    assert state.B_of(f"layers.{i}.fc") is state.B_of(f"layers.{j}.fc")
    others = [k for k in range(4) if k not in (i, j)]
    for k in others:
        assert state.B_of(f"layers.{k}.fc") is not state.B_of(f"layers.{i}.fc")


def test_merge_into_upper_keeps_upper_parameter():
    model = hand_model(pairs="adjacent", distance="b")  # reference pair (1, 2)
    state = vbshare.state_of(model)
    upper = state.B_of("layers.2.fc")
    vbshare.after_step(model, make_optimizer(model), 1)
    assert state.B_of("layers.1.fc") is upper and state.B_of("layers.2.fc") is upper
    torch.testing.assert_close(upper.detach(), HAND_B[2], rtol=0, atol=0)
    # the merged running average is the mean of the two
    torch.testing.assert_close(state.B_avg(state.b_key["layers.1.fc"]), (HAND_B[1] + HAND_B[2]) / 2)


def test_merge_into_average_takes_mean_value():
    model = hand_model(pairs="adjacent", distance="b", merge_into="average")
    state = vbshare.state_of(model)
    upper = state.B_of("layers.2.fc")
    vbshare.after_step(model, make_optimizer(model), 1)
    assert state.B_of("layers.1.fc") is upper
    torch.testing.assert_close(upper.detach().double(), (HAND_B[1].double() + HAND_B[2].double()) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pairing", ["similarity", "random"])
def test_adjacent_never_ties_non_neighbours(seed, pairing):
    n = 6
    model = build(n=n, targets=("fc",), r=2, merge_start=1, merge_every=1, share_ratio=None, pairs="adjacent",
                  pairing=pairing, seed=seed)
    state = vbshare.state_of(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for i in range(n):
            state.B_of(f"layers.{i}.fc").copy_(torch.randn(8, 2, generator=g))
    optimizer = make_optimizer(model)
    for step in range(1, n):
        vbshare.after_step(model, optimizer, step)
    assert len(state.history) == n - 1
    for record in state.history:
        lower, upper = record["layers"]
        assert lower == list(range(lower[0], lower[-1] + 1)), "a tie-set is not a contiguous run of layers"
        assert upper == list(range(upper[0], upper[-1] + 1))
        assert lower[-1] + 1 == upper[0], f"non-neighbours tied: {lower} and {upper}"


# -- counts --------------------------------------------------------------------------------------------------
def test_k_merges_leave_n_minus_k_parameters_and_stored_count_drops():
    n, r, d = 5, 3, 8
    model = build(n=n, d=d, r=r, merge_start=2, merge_every=1, max_merges=3, share_ratio=None)
    state = vbshare.state_of(model)
    groups = {"layers.*.fc": d, "layers.*.out": d + 2}  # role -> out
    stored0 = vbshare.summary(model).stored
    # one A per group + one B per layer, counted independently
    assert stored0 == sum(r * d + n * r * out for out in groups.values())
    optimizer = make_optimizer(model)
    for step, k in zip(range(1, 7), [0, 1, 2, 3, 3, 3]):
        train(model, optimizer, [step])
        for group, out in groups.items():
            assert len(distinct_b(model, group)) == n - k
            assert state.merges[group] == k
        assert vbshare.summary(model).stored == stored0 - sum(k * r * out for out in groups.values())
        assert state.stored_parameters() == stored0 - sum(k * r * out for out in groups.values())
        b_keys = [key for key in vbshare.adapter_state_dict(model) if key.startswith("vbshare.B_")]
        assert len(b_keys) == len(groups) * (n - k)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == stored0 - sum(
            k * r * out for out in groups.values())


def test_share_ratio_budget():
    model = build(n=4, targets=("fc",), r=2, merge_start=1, merge_every=1, share_ratio=0.5)
    optimizer = make_optimizer(model)
    train(model, optimizer, range(1, 6))
    assert len(distinct_b(model, "layers.*.fc")) == 2  # floor(0.5 * 4) = 2 merges, then no more


def test_running_average_matches_reference():
    model = build(n=3, targets=("fc",), r=2, merge_start=3, merge_every=10)
    state = vbshare.state_of(model)
    optimizer = make_optimizer(model)
    seen = {i: [] for i in range(3)}
    for step in range(1, 4):  # by hand, so the B's can be read between optimizer.step() and after_step
        (model(batch(step)) - 1.0).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        for i in range(3):
            seen[i].append(state.B_of(f"layers.{i}.fc").detach().double().clone())
        vbshare.after_step(model, optimizer, step)
    # each average is the plain mean of B after steps 1, 2, 3; at step 3 the closest pair is tied
    assert len(state.history) == 1
    record = state.history[0]
    lower, upper = record["layers"][0][0], record["layers"][1][0]
    mean = {i: sum(seen[i]) / 3 for i in range(3)}
    merged_key = state.b_key[f"layers.{lower}.fc"]
    torch.testing.assert_close(state.B_avg(merged_key).double(), (mean[lower] + mean[upper]) / 2, atol=1e-6, rtol=1e-5)
    (alone,) = [i for i in range(3) if i not in (lower, upper)]
    torch.testing.assert_close(state.B_avg(state.b_key[f"layers.{alone}.fc"]).double(), mean[alone], atol=1e-6, rtol=1e-5)
    # and the pair chosen is the closest adjacent pair of those averages
    dist = {p: torch.linalg.norm(mean[p[0]] - mean[p[1]]).item() for p in [(0, 1), (1, 2)]}
    assert (lower, upper) == min(dist, key=dist.get)


# -- training continues, optimiser clean ---------------------------------------------------------------------
def test_training_continues_after_merges_and_optimizer_forgets_dropped():
    model = build(n=4, r=2, merge_start=2, merge_every=2, share_ratio=None)
    state = vbshare.state_of(model)
    original = {name: state.B_of(name) for name in state.targets}
    optimizer = make_optimizer(model)
    held_out = batch(999)
    with torch.no_grad():
        loss_before = (model(held_out) - 1.0).pow(2).mean().item()
    losses = train(model, optimizer, range(1, 3))  # a merge per group at step 2
    top = {group: state.B_of(names[-1]) for group, names in state.groups.items()}
    exp_avg_before = {group: optimizer.state[p]["exp_avg"].clone() for group, p in top.items()}
    losses += train(model, optimizer, range(3, 13))
    assert all(torch.isfinite(torch.tensor(losses)))
    with torch.no_grad():
        assert (model(held_out) - 1.0).pow(2).mean().item() < 0.7 * loss_before  # still learning after ties
    live = {id(p) for p in model.parameters() if p.requires_grad}
    dropped = [p for p in original.values() if id(p) not in live]
    assert len(dropped) == 2 * 3  # every group tied down to one B (budget n − 1 = 3 merges, at steps 2, 4, 6)
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    for p in dropped:
        assert p not in optimizer.state
        assert not any(p is q for q in in_groups)
    assert {id(p) for p in in_groups} == live
    assert {id(p) for p in optimizer.state} == live
    for g in optimizer.param_groups:
        assert len(g["names"]) == len(g["params"])
        named = dict(model.named_parameters())
        assert all(named[n] is p for n, p in zip(g["names"], g["params"]))
    for group, p in top.items():  # merge_into=upper: the deepest layer's B survives every tie, state and all
        (only,) = distinct_b(model, group)
        assert only is p and p is original[state.groups[group][-1]]
        assert not torch.equal(optimizer.state[p]["exp_avg"], exp_avg_before[group])  # kept and still updated


def test_survivor_keeps_its_optimizer_state_at_tie():
    model = build(n=3, targets=("fc",), r=2, merge_start=2, merge_every=100)
    state = vbshare.state_of(model)
    optimizer = make_optimizer(model)
    train(model, optimizer, [1])
    before = {name: {k: v.clone() for k, v in optimizer.state[state.B_of(name)].items()} for name in state.targets}
    # step 2 by hand so the optimiser state can be read between optimizer.step() and the tie
    (model(batch(2)) - 1.0).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    snapshot = {name: {k: v.clone() for k, v in optimizer.state[state.B_of(name)].items()} for name in state.targets}
    vbshare.after_step(model, optimizer, 2)
    upper = state.history[0]["modules"][1][0]
    after = optimizer.state[state.B_of(upper)]
    for key, value in snapshot[upper].items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0)
    assert before  # step 1 created state for every B


# -- history -------------------------------------------------------------------------------------------------
def test_history_file_and_write_merge_history(tmp_path):
    path = tmp_path / "hist" / "merges.jsonl"
    model = build(n=4, r=2, merge_start=1, merge_every=1, share_ratio=None, history_path=str(path))
    train(model, make_optimizer(model), range(1, 4))
    state = vbshare.state_of(model)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6 and lines == state.history
    assert [r["step"] for r in lines] == [1, 1, 2, 2, 3, 3]
    out = write_merge_history(model, tmp_path / "again.jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == lines


# -- save, load, continue ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pairing,merge_into", [("similarity", "upper"), ("random", "average")])
def test_resume_gives_same_ties_and_next_merge(tmp_path, pairing, merge_into):
    """Resume = load_adapter into a fresh base, optimiser from vbshare.param_groups, load its state dict."""
    hyper = dict(n=5, r=2, merge_start=2, merge_every=2, max_merges=3, share_ratio=None, pairing=pairing,
                 merge_into=merge_into, seed=7)
    straight = build(**hyper)
    train(straight, make_optimizer(straight), range(1, 10))

    first = build(**hyper)
    optimizer = make_optimizer(first)
    train(first, optimizer, range(1, 5))  # merges at steps 2 and 4
    vbshare.save_adapter(first, tmp_path / "ckpt")
    torch.save(optimizer.state_dict(), tmp_path / "ckpt" / "optimizer.pt")

    torch.manual_seed(0)
    resumed = vbshare.load_adapter(Toy(5, 8), tmp_path / "ckpt")  # same frozen base (seed 0)
    rstate, fstate = vbshare.state_of(resumed), vbshare.state_of(first)
    assert rstate.metadata() == fstate.metadata()
    for group in rstate.groups:  # ties restored as shared parameter objects
        assert len(distinct_b(resumed, group)) == 5 - 2
    for name in rstate.targets:
        for other in rstate.tie_sets[rstate.b_key[name]]:
            assert rstate.B_of(other) is rstate.B_of(name)
    for key, value in vbshare.adapter_state_dict(first).items():
        torch.testing.assert_close(vbshare.adapter_state_dict(resumed)[key], value, rtol=0, atol=0)
    new_optimizer = make_optimizer(resumed)  # same parameter order as the live optimiser after its ties
    assert [g["names"] for g in new_optimizer.param_groups] == [g["names"] for g in optimizer.param_groups]
    new_optimizer.load_state_dict(torch.load(tmp_path / "ckpt" / "optimizer.pt"))
    train(resumed, new_optimizer, range(5, 10))  # the next (last) merges at step 6

    sstate = vbshare.state_of(straight)
    assert [(h["step"], h["group"], h["layers"]) for h in rstate.history] == [
        (h["step"], h["group"], h["layers"]) for h in sstate.history]
    assert [h["step"] for h in sstate.history] == [2, 2, 4, 4, 6, 6]  # max_merges=3: the last at step 6
    for a, b in zip(rstate.history, sstate.history):
        assert a["distance"] == pytest.approx(b["distance"], rel=1e-5, abs=1e-7)
    assert {g: list(v) for g, v in rstate.metadata()["ties"].items()} == {
        g: list(v) for g, v in sstate.metadata()["ties"].items()}
    assert rstate.num_updates == sstate.num_updates == 9
    for key, value in vbshare.adapter_state_dict(straight).items():
        torch.testing.assert_close(vbshare.adapter_state_dict(resumed)[key], value, atol=1e-6, rtol=1e-5)


def test_checkpoint_counts_each_tied_b_once(tmp_path):
    model = build(n=4, r=2, merge_start=1, merge_every=1, share_ratio=None)
    train(model, make_optimizer(model), range(1, 3))
    vbshare.save_adapter(model, tmp_path / "a")
    import safetensors.torch

    saved = safetensors.torch.load_file(tmp_path / "a" / "adapter_model.safetensors")
    b_keys = [k for k in saved if k.startswith("vbshare.B_")]
    avg_keys = [k for k in saved if k.startswith("vbshare.avg_B_")]
    assert len(b_keys) == len(avg_keys) == 2 * 2  # 4 layers, 2 merges per group
    assert len([k for k in saved if k.startswith("vbshare.A_")]) == 2
