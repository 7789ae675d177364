"""vbshare.analysis on hand-built states with known answers: VB-LoRA bank usage, ASLoRA tie-set trees and
B distances, SoRA rank histories; and every figure function draws without a display (Agg)."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import vbshare
from vbshare.analysis import aslora as AS
from vbshare.analysis import common
from vbshare.analysis import sora as SO
from vbshare.analysis import vblora as VB
from vbshare.errors import VBShareError

H = 6  # bank vectors in the hand-built VB-LoRA states


class Block(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.out = nn.Linear(d, d)


class Toy(nn.Module):
    def __init__(self, n: int = 4, d: int = 8):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))

    def forward(self, x):
        for block in self.layers:
            x = x + torch.tanh(block.out(torch.tanh(block.fc(x))))
        return x


def one_hot_logits(shape: tuple[int, ...], picks: list[tuple[int, int]]) -> torch.Tensor:
    """Logits (..., H) whose top-2 at every position are `picks` in order (flattened over the leading dims):
    the first pick gets logit 2, the second 1, the rest 0, so the weights are softmax([2, 1])."""
    logits = torch.zeros(*shape, H)
    flat = logits.view(-1, H)
    assert flat.shape[0] == len(picks)
    for row, (first, second) in enumerate(picks):
        flat[row, first], flat[row, second] = 2.0, 1.0
    return logits


# -- common -----------------------------------------------------------------------------------------------------
def test_module_names():
    name = "bert.encoder.layer.3.attention.self.query"
    assert common.module_kind(name) == "attention.self.query"
    assert common.short_name(name) == "L3.attention.self.query"
    assert common.short_name("classifier") == "classifier"
    table = common.module_table([name, "bert.encoder.layer.0.output.dense"])
    assert table["layer"].tolist() == [3, 0] and table["kind"].tolist() == ["attention.self.query", "output.dense"]


def test_list_snapshots_orders_by_step(tmp_path):
    for step in (20, 5, 100):
        (tmp_path / "snapshots" / f"step_{step:06d}").mkdir(parents=True)
        (tmp_path / "snapshots" / f"step_{step:06d}" / "adapter_config.json").write_text("{}")
    (tmp_path / "snapshots" / "notes").mkdir()
    assert [s for s, _ in common.list_snapshots(tmp_path)] == [5, 20, 100]
    assert common.list_snapshots(tmp_path / "nowhere") == []


# -- VB-LoRA ----------------------------------------------------------------------------------------------------
def hand_built_vblora() -> dict[str, torch.Tensor]:
    """Two modules, r = 1, in/b = 2, out/b = 1: 3 sub-vectors each, top-2 of H = 6 bank vectors.

    m0: A picks (0, 1), (0, 2); B picks (0, 1).   m1: A picks (3, 0), (0, 1); B picks (1, 3).
    Counts: vector 0 -> 5, 1 -> 4, 2 -> 1, 3 -> 2, 4 and 5 never.
    """
    return {
        "layers.0.fc.logits_A": one_hot_logits((1, 2), [(0, 1), (0, 2)]),  # (r, in/b, h)
        "layers.0.fc.logits_B": one_hot_logits((1, 1), [(0, 1)]),  # (out/b, r, h)
        "layers.1.fc.logits_A": one_hot_logits((1, 2), [(3, 0), (0, 1)]),
        "layers.1.fc.logits_B": one_hot_logits((1, 1), [(1, 3)]),
    }


def test_vblora_selections_and_bank_usage_counts():
    sel = VB.selections_from_tensors(hand_built_vblora(), topk=2)
    assert len(sel) == 2 * 3 * 2
    high, low = math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))
    first = sel[(sel.module == "layers.0.fc") & (sel.factor == "A") & (sel.position == 1)]
    assert first["vector"].tolist() == [0, 2] and first["weight"].tolist() == pytest.approx([high, low])
    assert first["slot"].tolist() == [0, 1] and set(first["layer"]) == {0} and set(first["kind"]) == {"fc"}

    counts = VB.usage_counts(sel, H)
    assert counts["count"].tolist() == [5, 4, 1, 2, 0, 0]
    assert counts["modules"].tolist() == [2, 2, 1, 1, 0, 0]
    assert counts["weight"].sum() == pytest.approx(6.0)  # one per sub-vector
    summary = VB.usage_summary(sel, H, top=2)
    assert summary["never_chosen"] == 2 and summary["used"] == 4 and summary["selections"] == 12
    assert summary["most_chosen"] == [(0, 5), (1, 4)] and summary["top_share"] == pytest.approx(9 / 12)
    assert summary["shared_by_2plus_modules"] == 2

    usage = VB.usage_matrix(sel, H)
    assert list(usage.index) == ["layers.0.fc", "layers.1.fc"] and list(usage.columns) == list(range(H))
    assert usage.loc["layers.0.fc", 0] == pytest.approx(3 * high)
    assert usage.loc["layers.1.fc", 3] == pytest.approx(high + low)
    assert VB.usage_matrix(sel, H, value="count").loc["layers.0.fc"].tolist() == [3, 2, 1, 0, 0, 0]
    by_factor = VB.usage_matrix(sel, H, by="factor", value="count")
    assert by_factor.loc["B"].tolist() == [1, 2, 0, 1, 0, 0]


def test_vblora_stored_topk_form_gives_the_same_selections():
    tensors = hand_built_vblora()
    stored = {}
    for key, logits in tensors.items():  # what VBLoRAState.pack writes: k indices + the first k-1 weights
        top, index = logits.topk(2, dim=-1)
        stored[key + "_topk_indices"] = index.to(torch.uint8)
        stored[key + "_topk_weights"] = top.softmax(-1)[..., :-1]
    a, b = VB.selections_from_tensors(tensors, topk=2), VB.selections_from_tensors(stored)
    assert a["vector"].tolist() == b["vector"].tolist()
    assert np.allclose(a["weight"], b["weight"])
    with pytest.raises(VBShareError, match="topk"):
        VB.selections_from_tensors(tensors)


def test_vblora_similarity_and_cluster_order():
    usage = pd.DataFrame([[1, 0, 0], [2, 0, 0], [0, 1, 1], [0, 3, 3]], index=list("abcd"), columns=range(3))
    sim = VB.similarity(usage)
    assert sim.loc["a", "b"] == pytest.approx(1.0) and sim.loc["a", "c"] == pytest.approx(0.0)
    assert sim.loc["c", "d"] == pytest.approx(1.0)
    order = VB.cluster_order(sim)
    assert sorted(order) == list("abcd")
    assert abs(order.index("a") - order.index("b")) == 1 and abs(order.index("c") - order.index("d")) == 1


def test_vblora_drift_between_snapshots():
    before = hand_built_vblora()
    after = dict(before)
    after["layers.1.fc.logits_B"] = one_hot_logits((1, 1), [(5, 3)])  # one of 6 sub-vectors moves, keeps one vector
    snaps = [(10, VB.selections_from_tensors(before, 2)), (20, VB.selections_from_tensors(after, 2))]
    drift = VB.selection_drift(snaps)
    assert drift["step"].tolist() == [10, 20]
    assert drift["changed_vs_final"].tolist() == pytest.approx([1 / 6, 0.0])
    assert drift["changed_vs_previous"].tolist() == pytest.approx([0.0, 1 / 6])
    assert drift["overlap_with_final"].tolist() == pytest.approx([(5 + 0.5) / 6, 1.0])
    assert drift["vectors_used"].tolist() == [4, 5]


def test_vblora_reads_saved_adapters_in_both_forms(tmp_path):
    torch.manual_seed(0)
    model = Toy(n=2)
    vbshare.inject(model, "vblora", targets=["fc", "out"], r=2, num_vectors=H, vector_length=4, topk=2)
    vbshare.save_adapter(model, tmp_path / "adapter")
    vbshare.save_adapter(model, tmp_path / "adapter_topk", topk_only=True)
    full, topk = VB.selections(tmp_path), VB.selections(tmp_path / "adapter_topk")
    assert full["vector"].tolist() == topk["vector"].tolist()
    assert len(full) == 4 * (2 * 2 + 2 * 2) * 2  # modules * n_sub * k
    assert VB.num_vectors_of(tmp_path) == H
    for name, adapter in vbshare.adapters(model).items():  # the table reproduces the module's A exactly
        rows = full[(full.module == name) & (full.factor == "A")]
        A = torch.zeros(2, 8)
        for row in rows.itertuples():
            A[row.rank, row.position * 4:(row.position + 1) * 4] += row.weight * model.vbshare.bank[row.vector].detach()
        assert torch.allclose(A, adapter.factors()[0].detach(), atol=1e-6)


# -- ASLoRA -----------------------------------------------------------------------------------------------------
def records(*merges):
    return [{"merge": i, "step": step, "group": group, "layers": [lower, upper], "distance": d}
            for i, (step, group, lower, upper, d) in enumerate(merges, start=1)]


HISTORY = AS.history_table(records(
    (10, "g", [1], [2], 0.5),
    (10, "h", [0], [1], 0.1),
    (20, "g", [3], [4], 0.7),
    (30, "g", [1, 2], [3, 4], 0.9),
))


def test_aslora_tie_sets_replay_the_merges():
    layers = [0, 1, 2, 3, 4]
    assert AS.tie_sets(HISTORY, "g", layers, upto_step=5) == [(0,), (1,), (2,), (3,), (4,)]
    assert AS.tie_sets(HISTORY, "g", layers, upto_step=10) == [(0,), (1, 2), (3,), (4,)]
    assert AS.tie_sets(HISTORY, "g", layers, upto_step=25) == [(0,), (1, 2), (3, 4)]
    assert AS.tie_sets(HISTORY, "g", layers) == [(0,), (1, 2, 3, 4)]
    assert AS.tie_sets(HISTORY, "h", [0, 1]) == [(0, 1)]
    bad = AS.history_table(records((10, "g", [1], [2], 0.5), (20, "g", [2], [3], 0.6)))  # 2 is no longer a set
    with pytest.raises(VBShareError, match="not tie-sets"):
        AS.tie_sets(bad, "g", layers)


def test_aslora_merge_tree_is_a_linkage():
    tree = AS.merge_tree(HISTORY, "g", [0, 1, 2, 3, 4])
    assert tree[["node", "left", "right", "step", "size"]].values.tolist() == [
        [5, 1, 2, 10, 2], [6, 3, 4, 20, 2], [7, 5, 6, 30, 4]]
    assert tree["members"].tolist() == [(1, 2), (3, 4), (1, 2, 3, 4)]
    assert tree["distance"].tolist() == [0.5, 0.7, 0.9]
    summary = AS.share_summary(HISTORY, {"g": [0, 1, 2, 3, 4], "h": [0, 1], "idle": [0, 1, 2]})
    assert summary.set_index("group")["distinct_B"].to_dict() == {"g": 2, "h": 1, "idle": 3}
    assert summary.set_index("group")["first_step"].to_dict()["g"] == 10


def test_aslora_distance_matrix_known_values():
    mats = {0: torch.zeros(2, 1), 1: torch.tensor([[3.0], [4.0]]), 2: torch.tensor([[3.0], [0.0]])}
    table = AS.distance_matrix(mats)
    np.testing.assert_allclose(table.values, [[0, 5, 3], [5, 0, 4], [3, 4, 0]])
    A = torch.tensor([[2.0, 0.0]])  # (r=1, in=2): the delta distance doubles every entry
    np.testing.assert_allclose(AS.distance_matrix(mats, A).values, [[0, 10, 6], [10, 0, 8], [6, 8, 0]])


def test_aslora_reads_a_saved_adapter(tmp_path):
    torch.manual_seed(0)
    model = Toy(n=3)
    vbshare.inject(model, "aslora", targets=["fc", "out"], r=2)
    state = model.vbshare
    with torch.no_grad():
        for i, name in enumerate(["layers.0.fc", "layers.1.fc", "layers.2.fc"]):
            key = state.b_key[name]
            state.B_avg(key).fill_(float(i * i))  # averages 0, 1, 4 -> distances ‖·‖_F over (8 x 2) entries
    state.tie(state.b_key["layers.0.fc"], state.b_key["layers.1.fc"], None, step=7)
    vbshare.save_adapter(model, tmp_path / "adapter")
    (tmp_path / "merge_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in state.history))

    history = AS.merge_history(tmp_path)
    assert history[["step", "lower", "upper"]].values.tolist() == [[7, (0,), (1,)]]
    assert AS.merge_history(tmp_path / "adapter").equals(history)  # the same from the metadata
    groups = AS.group_layers(tmp_path)
    assert groups == {"layers.*.fc": [0, 1, 2], "layers.*.out": [0, 1, 2]}
    table = AS.b_distance_matrix(tmp_path, "layers.*.fc")
    merged = 0.5  # the tie averages the two running averages: (0 + 1) / 2
    scale = math.sqrt(16)  # Frobenius norm of a constant (8 x 2) matrix = |c| * 4
    far = (4 - merged) * scale
    np.testing.assert_allclose(table.values, [[0, 0, far], [0, 0, far], [far, far, 0]], rtol=1e-6)
    delta = AS.b_distance_matrix(tmp_path, "layers.*.fc", which="B", kind="delta")
    np.testing.assert_allclose(delta.values, np.zeros((3, 3)))  # every B is still 0
    assert AS.tie_sets(history, "layers.*.fc", groups["layers.*.fc"]) == [(0, 1), (2,)]
    with pytest.raises(VBShareError, match="no aslora group"):
        AS.b_distance_matrix(tmp_path, "layers.*.nothing")


# -- SoRA -------------------------------------------------------------------------------------------------------
def stage(i: int, lam: float, ranks: dict[str, int], mem: float, gen: float) -> dict:
    params = sum(k * (8 + 8) for k in ranks.values())
    return {"stage": i, "lam": lam, "total_steps": 10 * (i + 1), "ranks": ranks, "r_max": 4,
            "retained_rank": sum(ranks.values()), "nonzero_params": params, "param_fraction": params / (4 * 16 * 3),
            "memorisation": {"accuracy": mem}, "generalisation": {"accuracy": gen}}


RECORDS = [
    stage(0, 0.0, {"layers.0.fc": 4, "layers.0.out": 4, "layers.1.fc": 4}, 0.8, 0.5),
    stage(1, 0.5, {"layers.0.fc": 3, "layers.0.out": 4, "layers.1.fc": 1}, 0.8, 0.6),
    stage(2, 1.0, {"layers.0.fc": 1, "layers.0.out": 2, "layers.1.fc": 0}, 0.4, 0.25),
]


def test_sora_rank_history_from_stage_records(tmp_path):
    table = SO.rank_table(RECORDS)
    assert table.loc["layers.1.fc"].tolist() == [4, 1, 0]
    assert list(table.columns) == [0, 1, 2]
    assert SO.rank_table(RECORDS, by="layer").values.tolist() == [[8, 7, 3], [4, 1, 0]]
    assert SO.rank_table(RECORDS, by="kind").loc["fc"].tolist() == [8, 4, 1]
    stages = SO.stage_table(RECORDS)
    assert stages["retained_rank"].tolist() == [12, 8, 3]
    assert stages["rank_fraction"].tolist() == pytest.approx([1.0, 8 / 12, 3 / 12])
    assert stages["memorisation_rel"].tolist() == pytest.approx([1.0, 1.0, 0.5])
    assert stages["generalisation_rel"].tolist() == pytest.approx([1.0, 1.2, 0.5])
    path = tmp_path / "sora_stages.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    assert SO.stage_records(tmp_path) == RECORDS and SO.stage_records(path) == RECORDS
    with pytest.raises(VBShareError, match="stage records"):
        SO.stage_records(tmp_path / "snapshots")


def test_sora_ranks_from_gates_and_from_the_pruned_form(tmp_path):
    torch.manual_seed(0)
    model = Toy(n=2)
    vbshare.inject(model, "sora", targets=["fc"], r=4)
    gates = {"layers.0.fc": [1.0, 0.0, -0.5, 0.0], "layers.1.fc": [0.0, 0.0, 0.0, 0.0]}
    with torch.no_grad():
        for name, adapter in vbshare.adapters(model).items():
            adapter.gate.copy_(torch.tensor(gates[name]))
            adapter.lora_B.normal_()
    vbshare.save_adapter(model, tmp_path / "snapshots" / "step_000005", stored_form=False)  # gates kept
    vbshare.save_adapter(model, tmp_path / "adapter")  # pruned: a LoRA of rank 2 with layer 1 dropped
    assert SO.ranks_of_adapter(tmp_path / "snapshots" / "step_000005") == {"layers.0.fc": 2, "layers.1.fc": 0}
    assert SO.ranks_of_adapter(tmp_path / "adapter") == {"layers.0.fc": 2}
    history = SO.rank_history([(5, tmp_path / "snapshots" / "step_000005"), (9, tmp_path / "adapter")])
    assert history.to_dict() == {5: {"layers.0.fc": 2, "layers.1.fc": 0}, 9: {"layers.0.fc": 2, "layers.1.fc": 0}}
    gate_rows = SO.gate_table(tmp_path / "snapshots" / "step_000005")
    assert gate_rows[gate_rows.module == "layers.0.fc"]["gate"].tolist() == gates["layers.0.fc"]


# -- figures ----------------------------------------------------------------------------------------------------
def test_figures_show_their_data():
    """The figures draw the numbers they are given: the hand-built counts (docstring of hand_built_vblora), a cosine
    similarity computed here, the records' ranks; the rest must at least draw something."""
    sel = VB.selections_from_tensors(hand_built_vblora(), topk=2)
    usage = VB.usage_matrix(sel, H)

    heatmap = VB.plot_usage_heatmap(usage).axes[0].images[0].get_array()
    assert np.allclose(np.sort(heatmap.sum(axis=0))[::-1], np.sort(usage.to_numpy().sum(axis=0))[::-1])
    assert np.allclose(heatmap.sum(axis=1), usage.to_numpy().sum(axis=1))  # columns sorted, rows kept

    counts = VB.plot_usage_counts(VB.usage_counts(sel, H))
    assert [bar.get_height() for bar in counts.axes[0].patches] == [5, 4, 2, 1, 0, 0]
    assert counts.axes[0].get_title() == "2 of 6 vectors never chosen"

    values = usage.to_numpy(dtype=float)
    unit = values / np.linalg.norm(values, axis=1, keepdims=True)
    drawn = VB.plot_similarity(VB.similarity(usage)).axes[0].images[0].get_array()
    assert np.allclose(drawn, unit @ unit.T)

    ranks = SO.plot_rank_heatmap(SO.rank_table(RECORDS), r_max=4).axes[0].images[0].get_array()
    assert ranks.tolist() == [[4, 3, 1], [4, 4, 2], [4, 1, 0]]  # module x stage, as RECORDS give them

    others = [
        VB.plot_drift(VB.selection_drift([(1, sel), (2, sel)])),
        AS.plot_merge_trees(HISTORY, {"g": [0, 1, 2, 3, 4], "h": [0, 1]}),
        AS.plot_merge_trees(HISTORY, {"g": [0, 1, 2, 3, 4]}, height="distance"),
        AS.plot_distance_matrix(AS.distance_matrix({0: torch.zeros(2, 1), 1: torch.ones(2, 1)})),
        SO.plot_tradeoff(SO.stage_table(RECORDS)),
    ]
    for fig in others:
        assert isinstance(fig, Figure) and any(ax.lines or ax.images or ax.collections or ax.patches
                                               for ax in fig.axes)
