"""LoRA-XS and MoS beyond the shared matrix (docs/methods.md §13, §14).

LoRA-XS: the frozen factors against properties any truncated SVD must have (whatever its signs), the paper's
orientation of the update, the start at the base model, factors recomputed bit for bit on load (nothing but R
saved unless asked), and the paper's stored count on RoBERTa-large. MoS: the official parameter count on a
LLaMA-2-7B-shaped model, the sharing structure (which modules read which shards, seen in the index tables and
in the gradients that reach the pools), the start at the base model and the one-line errors.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel, RobertaConfig, RobertaModel

import vbshare
from vbshare.core import adapter_state_dict
from vbshare.errors import VBShareError

from test_matrix import build_base, inputs, run, train_steps

BERT_TARGETS = ["query", "value", "intermediate.dense"]


def bert(layers: int = 4, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                embd_pdrop=0.0, attn_pdrop=0.0)).eval()


# -- LoRA-XS -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_loraxs_factors_are_the_truncated_svd_of_the_base(kind):
    """svd_B = U_r has orthonormal columns, svd_A = Σ_r V_rᵀ has orthogonal rows of norms σ_1 … σ_r (numpy's
    float64 singular values), and svd_B svd_A is W's best rank-r approximation: ‖W − U_r Σ_r V_rᵀ‖_F² = Σ_{i>r} σ_i²."""
    r = 5
    base, targets = (bert(), ["query", "intermediate.dense"]) if kind == "bert" else (gpt2(), ["c_attn", "c_fc"])
    model = vbshare.inject(base, "loraxs", targets=targets, r=r)
    for name, adapter in vbshare.adapters(model).items():
        weight = adapter.base_layer.weight.detach().double().numpy()
        weight = weight.T if adapter.fan_in_fan_out else weight  # (out, in)
        sigma = np.linalg.svd(weight, compute_uv=False)
        A, B = adapter.svd_A.double().numpy(), adapter.svd_B.double().numpy()  # (r, in), (out, r)
        np.testing.assert_allclose(B.T @ B, np.eye(r), atol=1e-6, err_msg=name)
        np.testing.assert_allclose(A @ A.T, np.diag(sigma[:r] ** 2), atol=1e-6, err_msg=name)
        residual = np.linalg.norm(weight - B @ A) ** 2
        np.testing.assert_allclose(residual, (sigma[r:] ** 2).sum(), rtol=1e-5, err_msg=name)
        largest = np.abs(B).argmax(axis=0)  # the documented sign rule: each column's largest entry is positive
        assert (B[largest, np.arange(r)] > 0).all(), name


def test_loraxs_update_in_the_papers_orientation():
    """The paper's x·W orientation: with Wᵀ = U' Σ V'ᵀ (in, out), ΔWᵀ = s · U'_r Σ_r Rᵀ V'_rᵀ — its R is ours transposed."""
    model = vbshare.inject(bert(layers=2), "loraxs", targets=["query"], r=4, alpha=8)
    with torch.no_grad():
        for adapter in vbshare.adapters(model).values():
            adapter.R.normal_()  # any R: the identity is about the orientation, not about training
    for adapter in vbshare.adapters(model).values():
        W_paper = adapter.base_weight().detach().double().T  # (in, out)
        U, S, Vh = torch.linalg.svd(W_paper, full_matrices=False)
        U, S, Vh = U[:, :4], S[:4], Vh[:4]
        signs = torch.sign(Vh.T.gather(0, Vh.T.abs().argmax(0, keepdim=True))).squeeze(0)  # our rule, on W's U = V'
        U, Vh = U * signs, Vh * signs[:, None]
        R = adapter.R.detach().double()
        paper = 2.0 * U @ torch.diag(S) @ R.T @ Vh  # (in, out)
        torch.testing.assert_close(adapter.delta_weight().double().T, paper, atol=1e-6, rtol=1e-5)


def test_loraxs_starts_at_the_base_model():
    x = inputs()
    with torch.no_grad():
        base = run(build_base("bert"), x)
        exact = vbshare.inject(build_base("bert"), "loraxs", targets=["query", "value"], r=4, init_std=0.0)
        assert torch.equal(run(exact, x), base)  # R = 0: ΔW = 0 exactly
        torch.manual_seed(0)
        default = vbshare.inject(build_base("bert"), "loraxs", targets=["query", "value"], r=4)  # R ~ N(0, 1e-10)
        moved = (run(default, x) - base).abs().max()
    R = torch.cat([a.R.detach().reshape(-1) for a in vbshare.adapters(default).values()])
    assert 0.5e-5 < R.std() < 2e-5
    assert 0 < moved < 1e-4


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_loraxs_reload_recomputes_the_same_factors(kind, tmp_path):
    """Only R is written; loading into a fresh base recomputes the SVD factors bit for bit, so outputs are equal."""
    targets = ["query", "value", "output.dense"] if kind == "bert" else ["c_attn", "c_proj"]
    model = vbshare.inject(build_base(kind), "loraxs", targets=targets, r=4, alpha=64)
    train_steps(model)
    vbshare.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(key.endswith(".R") for key in saved)
    fresh = vbshare.load_adapter(build_base(kind), tmp_path)
    for (name, a), b in zip(vbshare.adapters(model).items(), vbshare.adapters(fresh).values()):
        assert torch.equal(a.svd_A, b.svd_A) and torch.equal(a.svd_B, b.svd_B), name
    x = inputs()
    with torch.no_grad():
        assert torch.equal(run(fresh, x), run(model, x))


def test_loraxs_save_factors_writes_and_counts_them(tmp_path):
    model = vbshare.inject(build_base("bert"), "loraxs", targets=["query", "intermediate.dense"], r=4, save_factors=True)
    vbshare.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {key.rsplit(".", 1)[1] for key in saved} == {"R", "svd_A", "svd_B"}
    shapes = model.vbshare.targets.values()  # query (32, 32) ×2, intermediate.dense (64, 32) ×2
    assert vbshare.summary(model).stored == sum(16 + 4 * (out + inp) for out, inp in shapes) == 1344
    fresh = vbshare.load_adapter(build_base("bert"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inputs()), run(model, inputs()), atol=0, rtol=0)


def test_loraxs_reproduces_the_papers_roberta_large_count():
    """The paper: 60K trainable on RoBERTa-large at r = 25 — query, value, attention output and feed-forward output
    (the official `output.dense` suffix matches both) in 24 layers: 96 modules · 25² = 60,000. Built on the meta
    device: the counts need no weights and no SVD."""
    config = RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, hidden_size=1024,
                           num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    with torch.device("meta"):
        model = RobertaModel(config)
    vbshare.inject(model, "loraxs", targets=["query", "value", "attention.output.dense", "output.dense"], r=25)
    counted = vbshare.summary(model)
    assert len(vbshare.adapters(model)) == 96
    assert counted.stored == counted.trainable == 60_000


def test_loraxs_rank_above_the_weight_is_refused():
    with pytest.raises(VBShareError, match=r"r=40 exceeds min\(in, out\) = 32 .*choose r <= 32") as err:
        vbshare.inject(build_base("bert"), "loraxs", targets=["query"], r=40)
    assert "\n" not in str(err.value)


# -- MoS -----------------------------------------------------------------------------------------------------------
def test_mos_reproduces_the_official_llama2_7b_count():
    """The official repository's parameter log: MoS on LLaMA-2-7B (q, k, v, o, gate, up, down in 32 layers) trains
    4,997,120 parameters at equivalent rank 2, whatever its rank r — a rank-2 LoRA's count, an eighth of the log's
    rank-16 LoRA (39,976,960)."""
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with torch.device("meta"):
        mos = LlamaModel(config)
    vbshare.inject(mos, "mos", targets=targets, r=8, equivalent_rank=2, private_rank=1, shards_per_vector=2)
    counted = vbshare.summary(mos)
    assert counted.stored == counted.trainable == 4_997_120
    lora_16 = 16 * sum(out + inp for out, inp in mos.vbshare.targets.values())  # Σ r·(in + out)
    assert lora_16 == 39_976_960 == 8 * counted.stored
    assert counted.rows[0]["module"] == "(shared)" and all(row["stored"] == 0 for row in counted.rows[1:])


MOS = dict(r=3, equivalent_rank=3, private_rank=1, shards_per_vector=2, seed=7)  # 4 layers: 16 public, 4 drawn


def test_mos_sharing_structure():
    """Per role: every table holds r·l distinct shards, first (r−p)·l public ones, then the module's own p·l
    private block; the private blocks tile the private section; A and B pick their public shards apart; the
    tables depend on the seed only and are never saved; roles read different pools."""
    model = vbshare.inject(bert(), "mos", targets=BERT_TARGETS, **MOS)
    state = model.vbshare
    r, e, p, l = 3, 3, 1, 2
    layers = vbshare.adapters(model)
    assert len(state.groups) == 3 and all(len(names) == 4 for names in state.groups.values())
    for role, names in state.groups.items():
        N, public = e * 4 * l, (e - p) * 4 * l
        pool_A, pool_B = state.pools_of(names[0])
        assert pool_A.shape[0] == pool_B.shape[0] == N
        private_rows = []
        for i, name in enumerate(names):
            a, b = layers[name].shards_A.tolist(), layers[name].shards_B.tolist()
            for table in (a, b):
                assert len(table) == len(set(table)) == r * l
                assert all(j < public for j in table[: (r - p) * l])
                assert table[(r - p) * l:] == list(range(public + i * p * l, public + (i + 1) * p * l))
            assert a[: (r - p) * l] != b[: (r - p) * l]  # pair dissociation
            private_rows += a[(r - p) * l:]
            assert all(t is pool for t, pool in zip(state.pools_of(name), (pool_A, pool_B)))
        assert sorted(private_rows) == list(range(public, N))  # every private shard is one module's
    pools = [id(t) for names in state.groups.values() for t in state.pools_of(names[0])]
    assert len(set(pools)) == 6
    # the tables are rebuilt from the seed (the same for the same seed, others for another) and never saved
    again = vbshare.adapters(vbshare.inject(bert(seed=1), "mos", targets=BERT_TARGETS, **MOS))
    other = vbshare.adapters(vbshare.inject(bert(), "mos", targets=BERT_TARGETS, **{**MOS, "seed": 8}))
    for name, adapter in layers.items():
        assert torch.equal(adapter.shards_A, again[name].shards_A) and torch.equal(adapter.shards_B, again[name].shards_B)
    assert any(not torch.equal(adapter.shards_A, other[name].shards_A) for name, adapter in layers.items())
    assert not [k for k in adapter_state_dict(model) if "shards_" in k]


def test_mos_gradients_reach_exactly_the_shards_read():
    """At init (pool_B = 0) a backward pass gives pool_B a gradient on exactly the rows some module's B table
    names, and pool_A none at all; after one step the same holds for pool_A and the A tables."""
    model = vbshare.inject(bert(), "mos", targets=BERT_TARGETS, **MOS)
    state, layers = model.vbshare, vbshare.adapters(model)

    def read_rows(names: list[str], factor: str, count: int) -> torch.Tensor:
        used = torch.zeros(count, dtype=torch.bool)
        for name in names:
            used[getattr(layers[name], f"shards_{factor}")] = True
        return used

    run(model, inputs()).pow(2).mean().backward()
    for names in state.groups.values():
        pool_A, pool_B = state.pools_of(names[0])
        used = read_rows(names, "B", pool_B.shape[0])
        assert not used.all(), "the configuration should leave some public shards unread"
        assert (pool_B.grad.abs().sum(1) > 0).tolist() == used.tolist()
        assert pool_A.grad is None or not pool_A.grad.any()
    optimizer = torch.optim.SGD(vbshare.param_groups(model, lr=0.1))
    optimizer.step()
    optimizer.zero_grad()
    run(model, inputs(1)).pow(2).mean().backward()
    for names in state.groups.values():
        pool_A, _ = state.pools_of(names[0])
        assert (pool_A.grad.abs().sum(1) > 0).tolist() == read_rows(names, "A", pool_A.shape[0]).tolist()


def test_mos_starts_at_the_base_model():
    x = inputs()
    with torch.no_grad():
        adapted = vbshare.inject(build_base("gpt2"), "mos", targets=["c_attn", "c_fc"], r=2, equivalent_rank=2,
                                 private_rank=1, shards_per_vector=4)
        assert torch.equal(run(adapted, x), run(build_base("gpt2"), x))


@pytest.mark.parametrize("hyper,message", [
    (dict(shards_per_vector=3), r"shards_per_vector=3 does not divide module .* e\.g\. shards_per_vector=2"),
    (dict(r=8, equivalent_rank=2, private_rank=1), r"public pool holds .* = 4 rank vectors .*use r <= 5"),
    (dict(r=4, equivalent_rank=2, private_rank=3), r"private_rank=3 exceeds .*choose private_rank <= 2"),
    (dict(r=4, equivalent_rank=2, private_rank=2), r"leaves no public shards .*set r=2"),
    (dict(equivalent_rank=0), r"equivalent_rank must be a positive integer"),
])
def test_mos_bad_settings_are_one_line_errors(hyper, message):
    with pytest.raises(VBShareError, match=message) as err:
        vbshare.inject(bert(), "mos", targets=BERT_TARGETS, **{**MOS, **hyper})
    assert "\n" not in str(err.value)
