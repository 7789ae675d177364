"""Tied-LoRA (docs/methods.md §6): every `train` subset against a float64 reference whose frozen tensors are
drawn here by the documented rule, ΔW = 0 at init, training u and v only changes nothing else, frozen tensors
absent from the saved file and rebuilt identically, stored-parameter counts, bad configs."""
from __future__ import annotations

import hashlib
import itertools
import math

import pytest
import safetensors.torch
import torch
from torch import nn

import vbshare
from vbshare.checkpoint import WEIGHTS_FILE
from vbshare.errors import VBShareError

from adapter_cases import CASES
from test_matrix import build_adapted, train_steps
from toy_model import Toy, batch, build_toy, train

FACTORS = ("A", "B", "u", "v")
SUBSETS = [list(c) for n in range(1, 5) for c in itertools.combinations(FACTORS, n)]
R, ALPHA, SEED = 3, 6.0, 7


def toy(seed: int = 0) -> Toy:
    """Three blocks, so each role (layers.*.fc, layers.*.proj) is a sharing group of three layers."""
    return build_toy(blocks=3, seed=seed)


def adapted(train: list[str], seed: int = 0) -> Toy:
    model = toy(seed)
    torch.manual_seed(seed + 1)
    return vbshare.inject(model, "tied_lora", targets=["fc", "proj"], r=R, alpha=ALPHA, seed=SEED, train=train)


def frozen_draw(role: str, factor: str, shape: tuple[int, int]) -> torch.Tensor:
    """The documented rule for a frozen A / B: float32 CPU draw U(−1/√fan_in, 1/√fan_in) from a generator
    seeded with SHA-256("<seed>/<role>/<factor>") (first 8 bytes, little-endian, top bit cleared)."""
    digest = hashlib.sha256(f"{SEED}/{role}/{factor}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def reference_delta(model: nn.Module, name: str, trained_set: list[str]) -> torch.Tensor:
    """ΔW (out, in) in float64: trained tensors read from the model's saved state_dict, frozen ones drawn here
    (A, B) or ones (u, v); s · Σ_i u_i (v ⊙ B[:, i]) a_iᵀ."""
    role = name.replace(name.split(".")[1], "*", 1)  # layers.2.fc -> layers.*.fc
    key = role.replace("*", "N").replace(".", "_")
    out_features, in_features = vbshare.adapters(model)[name].out_features, vbshare.adapters(model)[name].in_features
    saved = model.state_dict()
    A = saved[f"vbshare.A_{key}"] if "A" in trained_set else frozen_draw(role, "A", (R, in_features))
    B = saved[f"vbshare.B_{key}"] if "B" in trained_set else frozen_draw(role, "B", (out_features, R))
    u = saved[f"{name}.u"] if "u" in trained_set else torch.ones(R)
    v = saved[f"{name}.v"] if "v" in trained_set else torch.ones(out_features)
    A, B, u, v = A.double(), B.double(), u.double(), v.double()
    delta = torch.zeros(out_features, in_features, dtype=torch.float64)
    for i in range(R):
        delta += u[i] * torch.outer(v * B[:, i], A[i])
    return (ALPHA / R) * delta


def stored_by_formula(trained_set: list[str]) -> int:
    """docs/methods.md §6 by hand for Toy: groups fc (12, 8) and proj (8, 12), three layers each."""
    total = 0
    for out_features, in_features in ((12, 8), (8, 12)):
        total += R * in_features * ("A" in trained_set) + out_features * R * ("B" in trained_set)
        total += 3 * (R * ("u" in trained_set) + out_features * ("v" in trained_set))
    return total


@pytest.mark.parametrize("trained_set", SUBSETS, ids=["".join(s) for s in SUBSETS])
def test_every_train_subset(trained_set, tmp_path):
    model = adapted(trained_set)
    x = batch(0)
    with torch.no_grad():
        assert torch.equal(model(x), toy()(x)), "ΔW must be exactly 0 at init"
    roles = set(vbshare.parameter_roles(model).values())
    assert roles == set(trained_set)
    assert vbshare.summary(model).stored == stored_by_formula(trained_set)
    assert vbshare.summary(model).trainable == stored_by_formula(trained_set)

    train(model)
    for name, adapter in vbshare.adapters(model).items():
        reference = reference_delta(model, name, trained_set)
        assert reference.abs().max() > 1e-4, f"{name}: training left ΔW at 0"
        torch.testing.assert_close(adapter.delta_weight().double(), reference, atol=1e-6, rtol=1e-5)

    vbshare.save_adapter(model, tmp_path)
    saved_keys = set(safetensors.torch.load_file(str(tmp_path / WEIGHTS_FILE)))
    assert saved_keys == {n for n, p in model.named_parameters() if p.requires_grad}  # the trained tensors only
    fresh = vbshare.load_adapter(toy(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=0, rtol=0)


def test_training_u_and_v_changes_nothing_else(tmp_path):
    """Frozen random A, B: after AdamW steps every tensor but u and v (buffers included) is bit-identical,
    the saved file holds u and v only, and a load rebuilds A and B bit-identically."""
    model = adapted(["u", "v"])
    before = {**{k: v.clone() for k, v in model.named_parameters()},
              **{k: v.clone() for k, v in model.named_buffers()}}
    assert any(k.startswith("vbshare.A_") for k in before) and any(k.startswith("vbshare.B_") for k in before)
    train(model)
    after = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vectors = {k for k in before if k.endswith((".u", ".v"))}
    assert changed == vectors, f"changed other than u, v: {sorted(changed - vectors)}; unchanged: {sorted(vectors - changed)}"

    vbshare.save_adapter(model, tmp_path)
    saved = safetensors.torch.load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved) == vectors
    fresh = vbshare.load_adapter(toy(), tmp_path)
    for key, value in fresh.vbshare.named_buffers():
        assert torch.equal(value, after[f"vbshare.{key}"]), f"{key} was not rebuilt identically"
    with torch.no_grad():
        assert torch.equal(fresh(batch(0)), model(batch(0)))


def test_frozen_factors_follow_the_seed_not_the_global_rng():
    one, two = adapted(["u", "v"], seed=0), adapted(["u", "v"], seed=5)  # other base weights and global RNG
    for (key, a), (_, b) in zip(one.vbshare.named_buffers(), two.vbshare.named_buffers()):
        assert torch.equal(a, b), key
    other_seed = vbshare.inject(toy(), "tied_lora", targets=["fc", "proj"], r=R, alpha=ALPHA, seed=SEED + 1,
                                train=["u", "v"])
    assert not torch.equal(one.vbshare.A_layers_N_fc, other_seed.vbshare.A_layers_N_fc)
    assert not torch.equal(one.vbshare.A_layers_N_fc, one.vbshare.A_layers_N_proj[:, :8])


def test_layers_of_a_role_share_one_A_and_B():
    model = adapted(list(FACTORS))
    layers = [vbshare.adapters(model)[f"layers.{i}.fc"] for i in range(3)]
    train(model)
    A = {id(a.state.A_of(a.name)) for a in layers}
    B = {id(a.state.B_of(a.name)) for a in layers}
    assert len(A) == 1 and len(B) == 1
    assert not torch.equal(layers[0].v, layers[1].v), "each layer keeps its own v"
    assert model.vbshare.sharing_pattern() == {"sharing_groups": 2, "trained": list(FACTORS)}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_matrix_case_moves_delta_off_zero(kind):
    """The shared matrix's float64 check (ΔW atol 1e-6) would pass trivially at ΔW = 0: its training steps must
    move ΔW off 0 in every module, clearly so in all but the tiny BERT's queries (its near-uniform attention
    passes them almost no gradient, for every method: ~1e-6)."""
    model = build_adapted("tied_lora", kind)
    train_steps(model)
    largest = {name: CASES["tied_lora"].reference_delta(a).abs().max().item() for name, a in vbshare.adapters(model).items()}
    assert min(largest.values()) > 1e-7, largest
    assert sorted(largest.values())[2] > 1e-4, largest


def test_matrix_case_moves_u_and_v():
    """On the tiny GPT-2, u and v move far enough that a ΔW ignoring them would fail the matrix's check."""
    model = build_adapted("tied_lora", "gpt2")
    train_steps(model)
    for name, adapter in vbshare.adapters(model).items():
        A, B = adapter.state.A_of(name).detach().double(), adapter.state.B_of(name).detach().double()
        without_vectors = adapter.scale * B @ A  # (out, in)
        gap = (CASES["tied_lora"].reference_delta(adapter) - without_vectors).abs().max()
        assert gap > 1e-4, f"{name}: u and v have not moved ({gap:.1e})"


def test_train_order_is_canonical():
    model = vbshare.inject(toy(), "tied_lora", targets=["fc"], train=["v", "u"])
    assert model.vbshare.config.train == ["u", "v"]


def test_role_with_unequal_shapes_is_refused():
    model = toy()
    model.layers[2].fc = nn.Linear(8, 16)
    with pytest.raises(VBShareError, match="different shapes") as err:
        vbshare.inject(model, "tied_lora", targets=["fc"])
    assert "\n" not in str(err.value)


# -- analysis: vbshare.analysis.tied_lora on hand-built states ---------------------------------------------------
def hand_built_vectors() -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Two layers × (fc (out 2), proj (out 3)), r = 2. u of layers.1.fc is (3, 4): norm 5, rms 5/√2."""
    targets = {"layers.0.fc": (2, 4), "layers.0.proj": (3, 2), "layers.1.fc": (2, 4), "layers.1.proj": (3, 2)}
    tensors = {
        "layers.0.fc.u": torch.tensor([1.0, 1.0]), "layers.0.fc.v": torch.tensor([0.0, 2.0]),
        "layers.1.fc.u": torch.tensor([3.0, 4.0]), "layers.1.fc.v": torch.tensor([1.0, -1.0]),
        "layers.0.proj.u": torch.tensor([0.5, 1.5]), "layers.0.proj.v": torch.tensor([1.0, 1.0, 1.0]),
        "layers.1.proj.u": torch.tensor([2.0, 0.0]), "layers.1.proj.v": torch.tensor([0.0, 0.0, 3.0]),
        "vbshare.A_layers_N_fc": torch.zeros(2, 4),  # shared tensors are ignored by the vector tables
    }
    return tensors, targets


def test_analysis_vector_table_hand_built():
    from vbshare.analysis import tied_lora as TL

    tensors, targets = hand_built_vectors()
    table = TL.vector_table_from_tensors(tensors, targets, r=2)
    assert len(table) == 8 and table["trained"].all()
    row = table[(table.module == "layers.1.fc") & (table.vector == "u")].iloc[0]
    assert (row["layer"], row["kind"], row["size"], row["init"]) == (1, "fc", 2, 1.0)
    assert row.norm == pytest.approx(5.0) and row.rms == pytest.approx(5 / math.sqrt(2))
    assert row.drift == pytest.approx(math.sqrt((4 + 9) / 2)) and (row["min"], row["max"]) == (3.0, 4.0)
    v_row = table[(table.module == "layers.1.proj") & (table.vector == "v")].iloc[0]
    assert v_row["size"] == 3 and v_row["mean"] == pytest.approx(1.0)

    values = TL.vector_values(TL.vectors_from_tensors(tensors, targets, r=2), "proj", "u")
    assert list(values.index) == [0, 1] and values.to_numpy().tolist() == [[0.5, 1.5], [2.0, 0.0]]


def test_analysis_frozen_vectors_are_ones_and_zeroed_init_is_reported():
    """train = [A, u]: v frozen (ones, absent from the tensors), u the zeroed factor (init 0)."""
    from vbshare.analysis import tied_lora as TL

    tensors, targets = hand_built_vectors()
    only_u = {k: v for k, v in tensors.items() if k.endswith(".u")}
    table = TL.vector_table_from_tensors(only_u, targets, r=2, train=["A", "u"])
    frozen = table[table.vector == "v"]
    assert not frozen["trained"].any() and (frozen["rms"] == 1.0).all() and (frozen["drift"] == 0.0).all()
    u = table[(table.vector == "u") & (table.module == "layers.1.fc")].iloc[0]
    assert u.init == 0.0 and u.drift == pytest.approx(5 / math.sqrt(2))
    with pytest.raises(VBShareError, match="layers.0.fc.v"):
        TL.vector_table_from_tensors(only_u, targets, r=2)  # says v trains, but there is no v
    with pytest.raises(VBShareError, match="kinds present: fc, proj"):
        TL.vector_values(TL.vectors_from_tensors(tensors, targets, r=2), "query")


def test_analysis_reads_a_saved_adapter_and_draws(tmp_path):
    from matplotlib.figure import Figure

    from vbshare.analysis import tied_lora as TL

    model = adapted(["u", "v"])
    train(model)
    vbshare.save_adapter(model, tmp_path / "adapter")
    table = TL.vector_table(tmp_path)  # a run directory holding adapter/
    layer = vbshare.adapters(model)["layers.2.proj"]
    row = table[(table.module == "layers.2.proj") & (table.vector == "v")].iloc[0]
    assert row.norm == pytest.approx(layer.v.detach().norm().item()) and row.init == 0.0 and row.trained
    assert len(table) == 2 * 6
    for fig in (TL.plot_vector_norms(table), TL.plot_vector_norms(table, stat="drift"), TL.plot_u_heatmaps(tmp_path),
                TL.plot_vector_heatmap(TL.vector_values(tmp_path, "fc", "v"))):
        assert isinstance(fig, Figure) and fig.axes
        fig.savefig(tmp_path / "figure.png")
    lora = vbshare.inject(toy(), "lora", targets=["fc"])
    vbshare.save_adapter(lora, tmp_path / "lora")
    with pytest.raises(VBShareError, match="not tied_lora"):
        TL.vector_table(tmp_path / "lora")


def test_analysis_vector_plot_keeps_zero_and_the_starting_values_in_view():
    """The per-layer line plot shared with VeRA: y from 0 up to 1.1 × the larger of the data and the dashed
    starting values, so a vector that never reaches its start (here rms ≤ 0.4, start 1) still shows the start."""
    import pandas as pd
    from matplotlib.figure import Figure

    from vbshare.analysis.common import plot_stat_by_layer

    rows = pd.DataFrame({"layer": [0, 1, 0, 1], "kind": ["fc", "fc", "proj", "proj"], "rms": [0.2, 0.4, 0.1, 0.3],
                         "trained": [True, True, False, False]})
    ax = Figure().subplots()
    plot_stat_by_layer(ax, rows, "rms", init_lines=[1.0])
    assert ax.get_ylim() == pytest.approx((0.0, 1.1))
    assert [line.get_linestyle() for line in ax.lines[:2]] == ["-", ":"]  # proj is frozen: dotted
    assert [line.get_ydata()[0] for line in ax.lines[2:]] == [1.0]  # one dashed start line
    ax = Figure().subplots()
    plot_stat_by_layer(ax, rows.assign(rms=[-0.5, 2.0, 0.0, 0.0]), "rms")
    assert ax.get_ylim() == pytest.approx((-0.55, 2.2))
