"""1xN block pruning: masks vs numpy, rearrangement, frozen fine-tune, BSR export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from nmkern.methods.blockprune import OutputPermuted, block_order, filter_prune_masks, prune_1xn


def np_block_mask(w: np.ndarray, n: int, sparsity: float, rearrange: bool) -> np.ndarray:
    """Independent 1xN mask: blocks = n consecutive output channels x 1 input channel x whole kernel."""
    o, i = w.shape[0], w.shape[1]
    w3 = np.abs(w.reshape(o, i, -1).astype(np.float64))
    order = np.arange(o)
    if rearrange:  # filters by L1 norm, largest first, ties keep index order
        norms = w3.sum(axis=(1, 2))
        order = np.argsort(-norms, kind="stable")
    src = w3[order]
    scores = src.reshape(o // n, n, i, -1).sum(axis=(1, 3))  # (o/n, i)
    flat = scores.reshape(-1)
    k = int(sparsity * flat.size)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:k]] = False
    keep_rows = np.repeat(keep.reshape(o // n, i), n, axis=0)  # (o, i) in sorted order
    full_sorted = np.broadcast_to(keep_rows.reshape(o, i, *([1] * (w.ndim - 2))), w.shape)
    full = np.empty(w.shape, dtype=bool)
    full[order] = full_sorted
    return full


def cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def data(seed=1, count=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, 6, 6, generator=g), torch.randint(0, 10, (count,), generator=g)


@pytest.mark.parametrize("n", [2, 4, 8, 16])
@pytest.mark.parametrize("rearrange", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.75])
def test_masks_match_numpy(n, rearrange, sparsity):
    model = cnn()
    before = {k: model.get_submodule(k).weight.detach().clone() for k in ("0", "2", "6")}
    res = prune_1xn(model, block=n, sparsity=sparsity, rearrange=rearrange, layers=["0", "2", "6"], export=False)
    for k, w in before.items():
        want = np_block_mask(w.numpy(), n, sparsity, rearrange)
        assert np.array_equal(res.masks[k].numpy(), want), k
        blocks = w.shape[0] // n * w.shape[1]
        per_block = w.numel() // blocks
        assert int((~res.masks[k]).sum()) == int(sparsity * blocks) * per_block


def test_default_layers_skip_what_cannot_be_blocked():
    res = prune_1xn(cnn(), block=4, sparsity=0.5, export=False)
    assert sorted(res.masks) == ["0", "2", "6"]
    assert res.skipped == ["8"]  # 10 output channels, not divisible by 4


def test_rearrangement_changes_which_blocks_go_but_never_the_count():
    plain = prune_1xn(cnn(), block=4, sparsity=0.5, rearrange=False, export=False)
    rearr = prune_1xn(cnn(), block=4, sparsity=0.5, rearrange=True, export=False)
    changed = 0
    for k in plain.masks:
        assert int(plain.masks[k].sum()) == int(rearr.masks[k].sum())
        changed += not torch.equal(plain.masks[k], rearr.masks[k])
    assert changed == len(plain.masks)


def test_rearrangement_is_chosen_per_layer():
    plain = prune_1xn(cnn(), block=4, sparsity=0.5, rearrange=False, export=False)
    some = prune_1xn(cnn(), block=4, sparsity=0.5, rearrange=["2"], export=False)
    also = prune_1xn(cnn(), block=4, sparsity=0.5, rearrange={"2": True, "0": False}, export=False)
    assert torch.equal(some.masks["0"], plain.masks["0"]) and torch.equal(some.masks["6"], plain.masks["6"])
    assert not torch.equal(some.masks["2"], plain.masks["2"])
    assert all(torch.equal(some.masks[k], also.masks[k]) for k in some.masks)
    assert some.targets["2"].rearrange and not some.targets["0"].rearrange


def test_random_criterion_is_seeded_and_keeps_the_count():
    a = prune_1xn(cnn(), block=4, sparsity=0.5, criterion="random", seed=3, export=False)
    b = prune_1xn(cnn(), block=4, sparsity=0.5, criterion="random", seed=3, export=False)
    c = prune_1xn(cnn(), block=4, sparsity=0.5, criterion="random", seed=4, export=False)
    l1 = prune_1xn(cnn(), block=4, sparsity=0.5, criterion="l1", export=False)
    for k in a.masks:
        assert torch.equal(a.masks[k], b.masks[k])
        assert int(a.masks[k].sum()) == int(l1.masks[k].sum())
    assert any(not torch.equal(a.masks[k], c.masks[k]) for k in a.masks)


def test_finetune_keeps_masks_frozen_and_changes_kept_weights():
    model = cnn()
    w0 = model.get_submodule("2").weight.detach().clone()
    res = prune_1xn(model, block=4, sparsity=0.5, rearrange=True, data=data(), epochs=2, batch_size=16, lr=0.05,
                    export=False, progress=False)
    w = model.get_submodule("2").weight.detach()
    assert torch.equal(res.masks["2"], torch.from_numpy(np_block_mask(w0.numpy(), 4, 0.5, True)))
    assert bool((w[~res.masks["2"]] == 0).all())
    assert not torch.equal(w[res.masks["2"]], w0[res.masks["2"]])
    assert res.train_loss == res.train_loss  # finite, not NaN


@pytest.mark.parametrize("rearrange", [False, True])
def test_bsr_equals_the_masked_weight(rearrange):
    model = cnn()
    res = prune_1xn(model, block=4, sparsity=0.5, rearrange=rearrange, data=data(), epochs=1, batch_size=32,
                    export=False, progress=False)
    for k, bsr in res.bsr.items():
        w = model.get_submodule(k).weight.detach()
        order = res.orders[k]
        assert bsr.layout == torch.sparse_bsr and bsr.values().shape[1:] == (4, 1)
        assert torch.equal(bsr.to_dense(), (w * res.masks[k])[order].reshape(w.shape[0], -1))
        # stored blocks are exactly the kept ones
        assert bsr.values().shape[0] * 4 * 1 == int(res.masks[k].reshape(w.shape[0], -1).sum())
        if not rearrange:
            assert torch.equal(order, torch.arange(w.shape[0]))


def test_block_order_lines_up_rearranged_blocks():
    res = prune_1xn(cnn(), block=4, sparsity=0.5, rearrange=True, export=False)
    for k, mask in res.masks.items():
        order = block_order(mask, 4)
        rows = mask[order].reshape(mask.shape[0], mask.shape[1], -1)[:, :, 0].reshape(mask.shape[0] // 4, 4, -1)
        assert bool((rows == rows[:, :1]).all())
    with pytest.raises(ValueError, match="not a \\(rearranged\\) 1x4 block mask"):
        bad = torch.zeros(8, 3, dtype=torch.bool)
        bad[0, 0] = True
        block_order(bad, 4)


@pytest.mark.parametrize("rearrange", [False, True])
def test_export_to_packed_sparse_modules(rearrange):
    nmnn = pytest.importorskip("nmkern.nn")
    model = cnn()
    res = prune_1xn(model, block=4, sparsity=0.5, rearrange=rearrange, data=data(), epochs=1, batch_size=32,
                    progress=False)
    exp = res.exported
    assert exp is not None
    for k in res.masks:
        mod = exp.get_submodule(k)
        inner = mod.inner if rearrange else mod
        assert isinstance(mod, OutputPermuted) == rearrange
        assert isinstance(inner, (nmnn.SparseLinear, nmnn.SparseConv2d)) and inner.is_packed
        w = model.get_submodule(k).weight.detach()
        assert torch.equal(inner.dense_weight(), (w * res.masks[k])[res.orders[k]])
    x = data()[0][:8]
    model.eval(), exp.eval()
    with torch.no_grad():
        want, got = model(x), exp(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_filter_pruning_baseline():
    model = cnn()
    masks = filter_prune_masks(model, 0.5, ["2"])
    w = model.get_submodule("2").weight.detach()
    kept_rows = masks["2"].reshape(32, -1).all(1)
    assert int(kept_rows.sum()) == 16 and bool((masks["2"].reshape(32, -1).any(1) == kept_rows).all())
    norms = w.abs().reshape(32, -1).sum(1)
    assert norms[kept_rows].min() >= norms[~kept_rows].max()


def test_bad_input_errors():
    with pytest.raises(ValueError, match="not divisible by block=4"):
        prune_1xn(cnn(), block=4, layers=["8"], export=False)
    with pytest.raises(ValueError, match="unknown criterion"):
        prune_1xn(cnn(), criterion="magnitude", export=False)
    with pytest.raises(ValueError, match="not being pruned"):
        prune_1xn(cnn(), rearrange=["8"], export=False)
    with pytest.raises(ValueError, match="no data to fine-tune on"):
        prune_1xn(cnn(), epochs=2, export=False)
    with pytest.raises(ValueError, match=r"prune_1xn: block must be a positive int \(output channels per 1xN block"):
        prune_1xn(cnn(), block=0, export=False)
    with pytest.raises(ValueError, match=r"sparsity=1.0 must lie in \[0, 1\)"):
        prune_1xn(cnn(), sparsity=1.0, export=False)
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        prune_1xn("model")
    with pytest.raises(ValueError, match="no Linear/Conv layer of the model has output channels divisible by block=7"):
        prune_1xn(cnn(), block=7, export=False)
    with pytest.raises(TypeError, match="rearrange must be a bool"):
        prune_1xn(cnn(), rearrange=3, export=False)


def test_n_is_the_deprecated_name_of_block():
    new = prune_1xn(cnn(), block=4, sparsity=0.5, export=False)
    with pytest.warns(DeprecationWarning, match=r"prune_1xn: the 1xN block size is now called block="):
        old = prune_1xn(cnn(), n=4, sparsity=0.5, export=False)
    assert all(torch.equal(new.masks[k], old.masks[k]) for k in new.masks)
    with pytest.warns(DeprecationWarning, match="block_order: the 1xN block size is now called block="):
        assert torch.equal(block_order(new.masks["2"], n=4), block_order(new.masks["2"], block=4))
    with pytest.raises(TypeError, match="prune_1xn: got both block= and n="):
        prune_1xn(cnn(), block=4, n=4, export=False)
