"""vbshare.analysis.vera and .unilora on hand-built states with known answers, and on saved adapter folders
(where the projections / index map must be rebuilt from the seed exactly as at injection); every figure draws
without a display."""
from __future__ import annotations

import io
import math

import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import vbshare
from vbshare.analysis import unilora as UL
from vbshare.analysis import vera as VE

FC0, OUT0, FC1, OUT1 = "layers.0.fc", "layers.0.out", "layers.1.fc", "layers.1.out"


class Block(nn.Module):
    def __init__(self, d_in: int, d_hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_in, d_hidden)
        self.out = nn.Linear(d_hidden, d_in)


class Toy(nn.Module):
    """Two blocks with unequal shapes: fc (out=12, in=8), out (out=8, in=12)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Block(8, 12) for _ in range(2))

    def forward(self, x):
        for block in self.layers:
            x = x + block.out(torch.tanh(block.fc(x)))
        return x


def toy(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Toy().eval()


def draws(fig: Figure) -> None:
    assert isinstance(fig, Figure)
    fig.savefig(io.BytesIO(), format="png")


# -- VeRA -----------------------------------------------------------------------------------------------------------
def hand_built_vera() -> dict[str, torch.Tensor]:
    """r = 2; λ_d of fc0 = (3, 4): norm 5, drift from 0.1 = rms(2.9, 3.9); λ_b of fc0 = (1, 2)."""
    return {
        f"{FC0}.lambda_d": torch.tensor([3.0, 4.0]), f"{FC0}.lambda_b": torch.tensor([1.0, 2.0]),
        f"{FC1}.lambda_d": torch.tensor([0.1, 0.1]), f"{FC1}.lambda_b": torch.tensor([0.0, -1.0]),
    }


def test_vera_vector_table_by_hand():
    table = VE.vector_table_from_tensors(hand_built_vera(), [FC0, FC1], d_initial=0.1)
    assert table["vector"].tolist() == ["lambda_d", "lambda_b"] * 2
    row = table[(table["module"] == FC0) & (table["vector"] == "lambda_d")].iloc[0]
    assert row["norm"] == pytest.approx(5.0) and row["rms"] == pytest.approx(5 / math.sqrt(2))
    assert row["init"] == 0.1 and row["drift"] == pytest.approx(math.sqrt((2.9**2 + 3.9**2) / 2))
    untouched = table[(table["module"] == FC1) & (table["vector"] == "lambda_d")].iloc[0]
    assert untouched["drift"] == pytest.approx(0.0, abs=1e-7)
    b1 = table[(table["module"] == FC1) & (table["vector"] == "lambda_b")].iloc[0]
    assert (b1["init"], b1["min"], b1["max"], b1["layer"], b1["kind"]) == (0.0, -1.0, 0.0, 1, "fc")


def test_vera_vector_values_rows_are_layers():
    found = VE.vectors_from_tensors(hand_built_vera(), [FC1, FC0])  # order given does not matter
    values = VE.vector_values(found, "fc", "lambda_d")
    assert values.index.tolist() == [0, 1]
    assert values.to_numpy().tolist() == [[3.0, 4.0], [pytest.approx(0.1), pytest.approx(0.1)]]
    with pytest.raises(vbshare.VBShareError, match="kinds present: fc"):
        VE.vector_values(found, "attention", "lambda_d")


def test_vera_delta_norms_by_hand():
    """A, B chosen as identity slices: ΔW(fc0) = diag(1, 2) · I · diag(3, 4) · [I | 0] = [[3, 0, 0], [0, 8, 0]]."""
    A = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # (r=2, max_in=3)
    B = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # (max_out=3, r=2)
    vectors = VE.vectors_from_tensors(hand_built_vera(), [FC0, FC1])
    table = VE.delta_norm_table_from(vectors, {FC0: (2, 3), FC1: (2, 2)}, A, B)
    assert table["delta_norm"].tolist() == pytest.approx([math.sqrt(73), 0.1])  # fc1: diag(0, −1)·diag(.1, .1)
    assert table["delta_rms"].iloc[0] == pytest.approx(math.sqrt(73) / math.sqrt(6))


@pytest.mark.parametrize("save_projection", [False, True])
def test_vera_folder_tables_match_the_model(save_projection, tmp_path):
    """From a saved folder (projections saved or drawn again from the seed), ‖ΔW‖ equals the live model's."""
    model = vbshare.inject(toy(), "vera", targets=["fc", "out"], r=4, projection_seed=9,
                           save_projection=save_projection)
    with torch.no_grad():
        for adapter in vbshare.adapters(model).values():
            adapter.lambda_b.normal_()
            adapter.lambda_d.normal_()
    vbshare.save_adapter(model, tmp_path)
    table = VE.delta_norm_table(tmp_path)
    for name, adapter in vbshare.adapters(model).items():
        got = table.set_index("module").loc[name, "delta_norm"]
        assert got == pytest.approx(adapter.delta_weight().detach().double().norm().item(), rel=1e-5)
    vectors = VE.vector_table(tmp_path)
    assert len(vectors) == 8 and set(vectors["size"]) == {4, 12, 8}
    draws(VE.plot_vector_norms(vectors))
    draws(VE.plot_vector_norms(vectors, stat="drift"))
    draws(VE.plot_vector_heatmap(VE.vector_values(tmp_path, "fc", "lambda_d"), center=0.1))
    draws(VE.plot_delta_norms(table))


def test_vera_reader_refuses_other_methods(tmp_path):
    vbshare.save_adapter(vbshare.inject(toy(), "lora", targets=["fc"], r=2), tmp_path)
    with pytest.raises(vbshare.VBShareError, match="not vera"):
        VE.vector_table(tmp_path)
    with pytest.raises(vbshare.VBShareError, match="not unilora"):
        UL.entry_table(tmp_path)


# -- Uni-LoRA -------------------------------------------------------------------------------------------------------
def hand_built_map() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """d = 4, r = 1. fc0: A (1, 3) reads 0, 1, 1; B (2, 1) reads 2, 0. fc1: A reads 0, 0, 3; B reads 1, 1.
    Uses: entry 0 -> 4 (A 3, B 1), 1 -> 4 (A 2, B 2), 2 -> 1, 3 -> 1. Entries 0 and 1 are read by both modules."""
    return {
        FC0: (torch.tensor([[0, 1, 1]]), torch.tensor([[2], [0]])),
        FC1: (torch.tensor([[0, 0, 3]]), torch.tensor([[1], [1]])),
    }


def test_unilora_entry_table_by_hand():
    table = UL.entry_table_from(torch.tensor([1.0, 2.0, 3.0, 4.0]), hand_built_map())
    assert table["uses"].tolist() == [4, 4, 1, 1]
    assert table["uses_A"].tolist() == [3, 2, 0, 1] and table["uses_B"].tolist() == [1, 2, 1, 0]
    assert table["scale"].tolist() == pytest.approx([0.5, 0.5, 1.0, 1.0])
    assert table["read_value"].tolist() == pytest.approx([0.5, 1.0, 3.0, 4.0])
    assert table["modules"].tolist() == [2, 2, 1, 1] and table["layers"].tolist() == [2, 2, 1, 1]
    assert table["kinds"].tolist() == [1, 1, 1, 1]
    summary = UL.usage_summary(table)
    assert (summary["factor_entries"], summary["uses_min"], summary["uses_max"], summary["unread"]) == (10, 1, 4, 0)
    assert summary["mean_modules_per_entry"] == pytest.approx(1.5)


def test_unilora_module_table_and_sharing_matrix_by_hand():
    modules = UL.module_table_from(hand_built_map(), theta_d_length=4)
    assert modules["factor_entries"].tolist() == [5, 5]
    assert modules["theta_entries"].tolist() == [3, 3] and modules["theta_share"].tolist() == [0.75, 0.75]
    assert modules["mean_uses"].tolist() == pytest.approx([5 / 3, 5 / 3])
    matrix = UL.sharing_matrix(hand_built_map(), 4)
    assert matrix.to_numpy().tolist() == [[3, 2], [2, 3]]
    by_kind = UL.sharing_matrix(hand_built_map(), 4, by="kind")
    assert by_kind.to_numpy().tolist() == [[4]]  # one kind ("fc") reads all four entries


def test_unilora_out_of_range_map_is_refused():
    with pytest.raises(vbshare.VBShareError, match="outside 0..3"):
        UL.entry_table_from(torch.zeros(4), {FC0: (torch.tensor([[4]]), torch.tensor([[0]]))})


@pytest.mark.parametrize("save_indices", [False, True])
def test_unilora_folder_map_is_the_models(save_indices, tmp_path):
    """The map read from a folder is the model's: rebuilt from the seed, or (save_indices) read from the file,
    here after reversing the model's indices so that the seed would give another map."""
    model = vbshare.inject(toy(), "unilora", targets=["fc", "out"], r=2, theta_d_length=30, proj_seed=6,
                           save_indices=save_indices)
    if save_indices:
        for adapter in vbshare.adapters(model).values():
            adapter.indices_A.copy_(adapter.indices_A.flip(-1))
    vbshare.save_adapter(model, tmp_path)
    found = UL.index_map(tmp_path)
    for name, adapter in vbshare.adapters(model).items():
        assert torch.equal(found[name][0], adapter.indices_A.long())
        assert torch.equal(found[name][1], adapter.indices_B.long())
    entries = UL.entry_table(tmp_path)
    D = 2 * 2 * (2 * (8 + 12))  # 2 layers × 2 modules × r·(in + out)
    assert entries["uses"].sum() == D and set(entries["uses"]) <= {D // 30, -(-D // 30)}
    torch.testing.assert_close(torch.tensor(entries["value"].to_numpy()), vbshare.state_of(model).theta.double())
    modules = UL.module_table(tmp_path)
    assert modules["factor_entries"].sum() == D
    draws(UL.plot_sharing(entries))
    draws(UL.plot_theta_distribution(entries, init_bound=0.02))
    draws(UL.plot_sharing_matrix(UL.sharing_matrix(found, 30, by="short")))


def test_unilora_count_axes_have_whole_number_ticks():
    """Counts of θ entries (and of their readers) are whole numbers: with the hand-built map's small counts
    (at most two θ entries per bar, three shared) the default locator would place ticks at 0.25 or 0.5 steps, and
    with every θ entry read 14 times (one bar, 13.6..14.4) at 0.1 steps."""
    entries = UL.entry_table_from(torch.tensor([1.0, 2.0, 3.0, 4.0]), hand_built_map())
    sharing = UL.plot_sharing(entries)
    one_bar = UL.plot_sharing(entries.assign(uses=14))
    theta = UL.plot_theta_distribution(entries, bins=4)
    matrix = UL.plot_sharing_matrix(UL.sharing_matrix(hand_built_map(), 4))
    for fig in (sharing, one_bar, theta, matrix):
        draws(fig)
    count_axes = [(ax, "xy") for ax in sharing.axes + one_bar.axes] + [(ax, "y") for ax in theta.axes]
    for ax, which in [*count_axes, (matrix.axes[1], "y")]:  # axes[1]: the colour bar
        for axis in which:
            ticks = getattr(ax, f"get_{axis}ticks")()
            low, high = getattr(ax, f"get_{axis}lim")()
            shown = [t for t in ticks if low <= t <= high]
            assert shown and all(float(t).is_integer() for t in shown), (ax.get_xlabel(), axis, shown)
    assert [t for t in one_bar.axes[0].get_xticks() if 13.5 < t < 14.5] == [14]
