"""The native CPU N:M mask and pack kernels (csrc/cpu/nm_mask.cpp, nm_pack.cpp) against the torch references,
bit for bit, on every runnable library; the public ops and the layers that run them."""

from __future__ import annotations

import copy

import pytest
import torch

import nmkern
from nmkern import _cpu, _cpu_layout, _cpu_nm_pack
from nmkern.reference.cpu_layouts import nm_layout_from_packed_ref, nm_tile_pack_ref, nm_words_from_layout_ref
from nmkern.reference.nm_mask import apply_nm_ref, nm_mask_ref
from nmkern.reference.nm_pack import first_overfull_group_ref, pack_nm_ref

from _cpu_isa import ISAS, isa  # noqa: F401  (isa: a fixture, one run per runnable library)

pytestmark = pytest.mark.skipif(not ISAS, reason="the nmkern CPU library is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NAN, INF = float("nan"), float("inf")


def _ties(rows: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Values in -2..2 (most groups hold equal magnitudes), -0.0 among the zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-2, 3, (rows, k), generator=g).to(dtype)
    w[torch.rand(rows, k, generator=g) < 0.1] = -0.0
    return w


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, except that any NaN equals any NaN: torch's bf16 gather (the reference) rewrites a NaN's bits
    (0x7fc0 -> 0xffff), where the kernel copies them."""
    nan = torch.isnan(b)
    return torch.equal(torch.isnan(a), nan) and torch.equal(_bits(a)[~nan], _bits(b)[~nan])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_matches_reference_for_every_n_m(isa, dtype):
    for m in range(2, 17):
        for n in range(1, m):
            for rows in (1, 3, 37):
                w = _ties(rows, 3 * m, dtype, seed=m * 17 + n)
                assert torch.equal(_cpu_nm_pack.nm_mask_rows(w, n, m), nm_mask_ref(w, n, m)), (dtype, n, m, rows)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_golden_ties_zeros_and_non_finite(isa, dtype):
    # 2:4 rows: [kept, kept, dropped, dropped] as a stable descending sort of |w| orders them; NaN above Inf,
    # NaNs tie with each other, -0.0 ties with 0.0.
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0],
                      [0.0, -3.0, 3.0, 0.0],
                      [-0.0, 0.0, 0.0, -0.0],
                      [1.0, NAN, INF, 2.0],
                      [NAN, -INF, NAN, 5.0],
                      [-1.0, 0.5, -0.5, 1.0]], dtype=dtype)
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [1, 0, 0, 1]],
                            dtype=torch.bool)
    assert torch.equal(_cpu_nm_pack.nm_mask_rows(w, 2, 4), expected)
    assert torch.equal(nm_mask_ref(w, 2, 4), expected)
    assert _cpu_nm_pack.nm_mask_rows(w, 2, 4, check_finite=True) is None
    assert _cpu_nm_pack.nm_mask_rows(w[[0, 1, 2, 5]], 2, 4, check_finite=True) is not None


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_matches_reference_for_every_n_m(isa, dtype):
    for m in range(2, 17):
        for n in range(1, m):
            w = apply_nm_ref(_ties(5, 7 * m, dtype, seed=m * 31 + n), n, m)
            kept = w.nonzero()  # NaN and Inf are carried, not ranked: pack only asks "is it zero"
            w[tuple(kept[0])], w[tuple(kept[-1])] = NAN, -INF
            values, indices, first_bad = _cpu_nm_pack.pack_nm_rows(w, n, m)
            ref_values, ref_indices = pack_nm_ref(w, n, m)
            assert first_bad == -1
            assert _same_values(values, ref_values), (dtype, n, m)
            assert torch.equal(indices, ref_indices), (dtype, n, m)


def test_pack_reports_the_first_overfull_group_across_threads(isa):
    # 8-wide rows: ~2048 rows a work claim, so the overfull rows below land in different claims and threads.
    w = apply_nm_ref(torch.randn(6000, 8), 2, 4)
    for rows in ([5000, 4100], [4100, 5000], [2, 5999]):
        bad = w.clone()
        for r in rows:
            bad[r, 4:] = 1.0
        first = _cpu_nm_pack.pack_nm_rows(bad, 2, 4)
        assert first == (None, None, first_overfull_group_ref(bad, 2, 4))
        assert first[2] == min(rows) * 2 + 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_ops_on_the_cpu_backend(dtype):
    w = _ties(12, 32, dtype, seed=5)
    conv = _ties(8, 16, dtype, seed=6).reshape(8, 4, 2, 2)
    assert torch.equal(nmkern.nm_mask(w, 2, 4, backend="cpu"), nmkern.nm_mask(w, 2, 4, backend="reference"))
    assert torch.equal(nmkern.nm_mask(conv, 2, 4, dim=1, backend="cpu"), nm_mask_ref(conv, 2, 4, dim=1))
    assert torch.equal(_bits(nmkern.apply_nm(w, 1, 4, backend="cpu")), _bits(apply_nm_ref(w, 1, 4)))
    packed = nmkern.pack_nm(nmkern.apply_nm(conv, 2, 4, dim=1), 2, 4, dim=1, backend="cpu")
    assert torch.equal(_bits(nmkern.unpack_nm(packed)), _bits(apply_nm_ref(conv, 2, 4, dim=1)))


def test_apply_nm_and_srste_gradients_match_the_reference():
    w = torch.randn(6, 16)
    grads = []
    for backend in ("cpu", "reference"):
        a = w.clone().requires_grad_()
        (nmkern.apply_nm(a, 2, 4, backend=backend) * torch.arange(96.0).reshape(6, 16)).sum().backward()
        s = w.clone().requires_grad_()
        masked = nmkern.srste_weight(s, 2, 4, lambda_w=0.5, backend=backend)
        (masked * torch.arange(96.0).reshape(6, 16)).sum().backward()
        grads.append((a.grad, masked.detach(), s.grad))
    for got, ref in zip(*grads):
        assert torch.equal(got, ref)


def test_auto_picks_the_kernels_for_cpu_tensors_unless_triton_interprets(monkeypatch):
    w = torch.randn(4, 8)
    monkeypatch.delenv("NMKERN_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _cpu_nm_pack.resolve_path("nm_mask", "auto", w) is nmkern.Backend.CPU
    assert _cpu_nm_pack.resolve_path("nm_mask", "auto", w.double()) is nmkern.Backend.REFERENCE
    monkeypatch.setenv("NMKERN_BACKEND", "reference")
    assert _cpu_nm_pack.resolve_path("nm_mask", "auto", w) is nmkern.Backend.REFERENCE


def test_errors_name_the_op_and_the_fix():
    w = torch.randn(4, 8)
    w[2, 5] = NAN
    for op in (nmkern.nm_mask, nmkern.apply_nm):
        with pytest.raises(ValueError, match=r"contains NaN or Inf \(first at index \(2, 5\)\)"):
            op(w, 2, 4, backend="cpu")
    with pytest.raises(ValueError, match=r"pack_nm: w \(shape \(4, 8\)\) is not 2:4 sparse.*row 0.*group 0"):
        nmkern.pack_nm(torch.ones(4, 8), 2, 4, backend="cpu")
    with pytest.raises(ValueError, match=r"nm_mask: backend 'cpu' takes fp32, bf16 or fp16.*float64.*reference"):
        nmkern.nm_mask(torch.randn(4, 8, dtype=torch.float64), 2, 4, backend="cpu")
    with pytest.raises(ValueError, match=r"pack_nm: backend 'cpu' takes.*meta"):
        nmkern.pack_nm(torch.empty(4, 8, device="meta"), 2, 4, backend="cpu")


def test_c_side_rejects_bad_scalars():
    lib = _cpu._load()
    buf = torch.zeros(64)
    p, out = buf.data_ptr(), torch.zeros(64, dtype=torch.int64).data_ptr()
    assert lib.nmkern_nm_mask(p, 0, 4, 2, 17, p, 0, 1) == 1  # m > 16
    assert lib.nmkern_nm_mask(p, 0, 4, 4, 4, p, 0, 1) == 1  # n == m
    assert lib.nmkern_nm_mask(p, 3, 4, 2, 4, p, 0, 1) == 1  # unknown dtype
    assert lib.nmkern_nm_mask(p, 0, 4, 2, 4, p, 0x200, 1) == 1  # unknown flag
    assert lib.nmkern_nm_pack(p, 4, 2, 6, 2, 4, p, p, 1, out, 1) == 1  # K % m != 0
    assert lib.nmkern_nm_pack(p, 4, 2, 8, 2, 4, p, p, 2, out, 1) == 1  # words_per_row: 4 slots fit one word
    assert lib.nmkern_nm_pack(p, 8, 2, 8, 2, 4, p, p, 1, out, 1) == 1  # elem_bytes
    assert lib.nmkern_nm_pack(p, 4, 2, 8, 2, 4, p, p, 1, None, 1) == 1  # NULL first_overfull


def test_layers_pack_through_the_kernels_as_through_the_reference(monkeypatch):
    torch.manual_seed(3)
    dense = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Conv2d(8, 8, 3)).eval()
    native, reference = copy.deepcopy(dense), copy.deepcopy(dense)
    calls = []
    real = _cpu_nm_pack.pack_nm_rows
    monkeypatch.setattr(_cpu_nm_pack, "pack_nm_rows", lambda *a: calls.append(a[0].shape) or real(*a))
    nmkern.sparsify(native, "2:4", pack=True)
    assert calls == [(16, 24), (8, 72)]
    monkeypatch.setattr(nmkern.nn._layer, "_nm_backend", lambda t: "reference")
    nmkern.sparsify(reference, "2:4", pack=True)
    assert len(calls) == 2
    got, want = native.state_dict(), reference.state_dict()
    assert list(got) == list(want)
    for key in want:
        if isinstance(want[key], torch.Tensor):
            assert torch.equal(got[key], want[key]), key
        else:  # a layer's extra state (its packed form's metadata)
            assert got[key] == want[key], key
    x, image = torch.randn(3, 24), torch.randn(2, 8, 6, 6)
    assert torch.equal(native[0](x), reference[0](x))
    assert torch.equal(native[1](image), reference[1](image))


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_tiles_from_packed_rows_and_back_match_reference(isa, dtype):
    for m in range(2, 17):
        for n in range(1, m):
            for rows in (1, 8, 13):  # one padded tile, a whole tile, a whole tile and a padded one
                w = apply_nm_ref(_ties(rows, 3 * m, dtype, seed=m * 7 + n + rows), n, m)
                values, indices = pack_nm_ref(w, n, m)
                layout = _cpu_layout.layout_from_nm_packed(values, indices, n, m, 3 * m)
                ref_values, ref_index = nm_layout_from_packed_ref(values, indices, n, m)
                assert torch.equal(_bits(layout.tensors["values"]), _bits(ref_values)), (dtype, n, m, rows)
                assert torch.equal(layout.tensors["index"], ref_index), (dtype, n, m, rows)
                words = _cpu_layout.nm_indices_from_layout(layout)
                for step in (1, 64):  # tile by tile, and all at once
                    assert torch.equal(words, nm_words_from_layout_ref(ref_index, rows, 3 * m, n, m, step))
                assert torch.equal(words, indices)


def test_row_tiles_refuse_a_position_outside_the_group():
    values, indices = pack_nm_ref(apply_nm_ref(torch.randn(5, 6), 2, 3), 2, 3)
    indices[3, 0] |= 3 << 2  # slot 1 of row 3 at position 3 of a group of 3
    with pytest.raises(ValueError, match=r"layout_from_nm_packed: packed indices \(5, 1\) for values \(5, 4\) are not "
                                         r"2:3 indices of a 5x6 weight \(a position >= 3"):
        _cpu_layout.layout_from_nm_packed(values, indices, 2, 3, 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_match_the_reference(dtype):
    w = torch.empty(0, 8, dtype=dtype)
    assert torch.equal(nmkern.nm_mask(w, 2, 4, backend="cpu"), nm_mask_ref(w, 2, 4))
    assert nmkern.apply_nm(torch.empty(3, 0, 8, dtype=dtype), 1, 4, backend="cpu").shape == (3, 0, 8)
    values, indices, first_bad = _cpu_nm_pack.pack_nm_rows(w, 2, 4)
    ref_values, ref_indices = pack_nm_ref(w, 2, 4)
    assert first_bad == -1 and values.shape == ref_values.shape and indices.shape == ref_indices.shape
    layout = _cpu_layout.layout_from_nm_packed(values, indices, 2, 4, 8)
    ref_tile_values, ref_index = nm_layout_from_packed_ref(values, indices, 2, 4)
    assert torch.equal(layout.tensors["values"], ref_tile_values) and torch.equal(layout.tensors["index"], ref_index)
    assert torch.equal(_cpu_layout.nm_indices_from_layout(layout), ref_indices)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prepare_cpu_linear_builds_the_reference_layout(isa, dtype):
    for n, m in [(2, 4), (1, 4), (1, 2), (2, 3), (3, 8), (5, 16)]:
        for rows in (1, 8, 21):
            w = apply_nm_ref(_ties(rows, 4 * m, dtype, seed=rows + m), n, m)
            layout = _cpu.prepare_cpu_linear(w, "nm", n, m)
            values, index = nm_tile_pack_ref(w, n, m)
            assert torch.equal(_bits(layout.tensors["values"]), _bits(values)), (dtype, n, m, rows)
            assert torch.equal(layout.tensors["index"], index), (dtype, n, m, rows)
    bad = apply_nm_ref(torch.randn(4, 16), 2, 4)
    bad[1, 8:12] = torch.tensor([1.0, 1.0, 1.0, 0.0])
    bad[3, :4] = 1.0  # a later overfull group: the message names the first
    with pytest.raises(ValueError, match=r"prepare_cpu_linear: weight is not 2:4 sparse: row 1, group 2 has 3 "):
        _cpu.prepare_cpu_linear(bad, "nm", 2, 4)
