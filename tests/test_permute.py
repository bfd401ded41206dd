"""Channel permutation for N:M (prune_oneshot(permute=True), issue #13).

The search only accepts gains (never below the identity) and ends swap-locally optimal; a fold
into the producer leaves the function unchanged (gated MLP, MLP through an activation, attention
value -> output inside heads, with grouped-query attention); and prune_oneshot(permute=True)
equals folding the reported permutations first and pruning without permutation.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.methods.permute import apply_fold, find_folds, kept_score, search_permutation


def _outlier_score(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    """|w| * column scale with heavy-tailed column scales (a few outlier channels), as Wanda scores look."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=gen).abs() * (torch.rand(k, generator=gen) ** 4 * 10 + 0.1)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (5, 16)])
def test_search_keeps_at_least_the_identity_and_is_a_permutation(n, m):
    for seed in range(3):
        score = _outlier_score(24, 8 * m, seed)
        perm = search_permutation(score, n, m)
        assert sorted(perm.tolist()) == list(range(8 * m))
        assert kept_score(score[:, perm], n, m) >= kept_score(score, n, m)


def test_search_spreads_clustered_outlier_channels():
    score = torch.ones(16, 32)
    score[:, :4] = 100.0  # four outlier channels in one group of 4: 2:4 keeps only two of them per row
    perm = search_permutation(score, 2, 4)
    assert kept_score(score[:, perm], 2, 4) == 16 * (4 * 101 + 4 * 2)  # each outlier kept, in a group of its own
    assert kept_score(score, 2, 4) == 16 * (2 * 100 + 7 * 2)


def test_search_ends_swap_locally_optimal():
    score = _outlier_score(6, 16, seed=4)
    perm = search_permutation(score, 2, 4, rounds=500, min_gain=0.0, patience=60)
    best = kept_score(score[:, perm], 2, 4)
    for i, j in itertools.combinations(range(16), 2):
        if i // 4 != j // 4:
            swapped = perm.clone()
            swapped[i], swapped[j] = perm[j], perm[i]
            assert kept_score(score[:, swapped], 2, 4) <= best + 1e-9, (i, j)


def test_search_stays_inside_segments():
    score = _outlier_score(8, 48, seed=2)
    perm = search_permutation(score, 2, 4, segment=16)
    assert all(sorted(perm[s:s + 16].tolist()) == list(range(s, s + 16)) for s in range(0, 48, 16))
    with pytest.raises(ValueError, match="segment 12 and segment by m=8"):
        search_permutation(score, 4, 8, segment=12)


def _head_perm(channels: int, head_dim: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(head_dim, generator=gen) + s for s in range(0, channels, head_dim)])


def _folded_function_is_unchanged(model, inputs, expected_folds: int):
    folds = find_folds(model)
    assert len(folds) == expected_folds
    with torch.no_grad():
        before = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        for i, fold in enumerate(folds.values()):
            channels = fold.producers[0].out_features
            perm = _head_perm(channels, fold.head_dim or channels, seed=i)
            assert not torch.equal(perm, torch.arange(channels))
            apply_fold(fold, perm)
        after = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    before = getattr(before, "logits", getattr(before, "last_hidden_state", before))
    after = getattr(after, "logits", getattr(after, "last_hidden_state", after))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_folds_keep_the_function_of_a_llama_with_grouped_query_attention(tiny_llama):
    model = tiny_llama(layers=2, heads=4)  # 4 query heads share 2 key/value heads of 8 channels
    folds = find_folds(model)
    o_fold = folds[id(model.model.layers[0].self_attn.o_proj)]
    assert (o_fold.head_dim, o_fold.kv_groups) == (8, 2) and o_fold.producers == [model.model.layers[0].self_attn.v_proj]
    mlp = model.model.layers[1].mlp
    assert folds[id(mlp.down_proj)].producers == [mlp.gate_proj, mlp.up_proj]
    ids = {"input_ids": torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))}
    _folded_function_is_unchanged(model, ids, expected_folds=4)


def test_folds_keep_the_function_of_a_bert_encoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  vocab_size=50, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    folds = find_folds(model)
    layer = model.encoder.layer[0]
    assert folds[id(layer.attention.output.dense)].producers == [layer.attention.self.value]
    assert folds[id(layer.output.dense)].producers == [layer.intermediate.dense]
    ids = {"input_ids": torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))}
    _folded_function_is_unchanged(model, ids, expected_folds=4)


def test_folds_of_a_sequential_pass_only_elementwise_modules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 8)).eval()
    folds = find_folds(model)
    assert [f.consumer for f in folds.values()] == [model[3], model[5]]  # not model[7]: LayerNorm mixes channels
    _folded_function_is_unchanged(model, torch.randn(5, 8), expected_folds=2)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_permuted_pruning_equals_folding_first_then_pruning_unpermuted(method, tiny_llama):
    base = tiny_llama(layers=2, heads=4)
    gen = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(3)]
    scheme = {"model.layers.*": "2:4"}
    permuted = copy.deepcopy(base)
    report = nmkern.prune_oneshot(permuted, calib, scheme, method=method, permute=True, progress=False)
    names = sorted(r["name"].rpartition(".")[2] for r in report.permuted)
    assert names == ["down_proj", "down_proj", "o_proj", "o_proj"]
    assert all(r["kept_after"] >= r["kept_before"] for r in report.permuted)
    assert any(r["kept_after"] > r["kept_before"] for r in report.permuted)
    assert {n.rpartition(".")[2] for n, _ in report.unpermuted} == {"q_proj", "k_proj", "v_proj", "gate_proj",
                                                                      "up_proj"}
    folded = copy.deepcopy(base)
    folds = find_folds(folded)
    modules = dict(folded.named_modules())
    for r in report.permuted:
        apply_fold(folds[id(modules[r["name"]])], torch.tensor(r["perm"]))
    nmkern.prune_oneshot(folded, calib, scheme, method=method, permute=False, progress=False)
    for (name, a), b in zip(permuted.named_parameters(), folded.parameters()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_permutation_raises_the_kept_score_of_planted_outlier_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    with torch.no_grad():  # channels 0-3 of the hidden layer carry 30x the activation: one group of 4
        model[0].weight[:4] *= 30
        model[0].bias[:4] = 5.0
    calib = [torch.randn(16, 16) for _ in range(4)]
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    report = nmkern.prune_oneshot(model, calib, {"2": "2:4"}, method="wanda", permute=True, progress=False)
    nmkern.prune_oneshot(plain, calib, {"2": "2:4"}, method="wanda", progress=False)
    (row,) = report.permuted
    assert row["producers"] == ["0"] and row["kept_after"] > 1.2 * row["kept_before"]
    x = torch.randn(64, 16)
    with torch.no_grad():
        err_perm = (model(x) - dense(x)).norm()
        err_plain = (plain(x) - dense(x)).norm()
    assert err_perm < err_plain
    assert ((model[2].weight.reshape(8, -1, 4) != 0).sum(-1) <= 2).all()


def test_a_failure_after_a_fold_restores_weights_and_biases_bit_identically():
    class NaNAfter(nn.Module):
        def forward(self, x):
            return x * float("nan")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), NaNAfter(), nn.Linear(16, 8)).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer '4' receives NaN/Inf activations"):
        nmkern.prune_oneshot(model, [torch.randn(4, 8)], "2:4", method="wanda", permute=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_tall_score_is_searched_on_sampled_rows_and_still_never_loses():
    score = _outlier_score(300, 32, seed=5)
    perm = search_permutation(score, 2, 4, max_rows=40)
    assert sorted(perm.tolist()) == list(range(32))
    assert kept_score(score[:, perm], 2, 4) > kept_score(score, 2, 4)
    # where the identity is already optimal (2:4 keeps both large channels of group 0), it stays
    flat = torch.ones(300, 8)
    flat[:, :2] = 5.0
    assert torch.equal(search_permutation(flat, 2, 4, max_rows=10), torch.arange(8))
