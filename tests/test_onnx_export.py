"""ONNX export of packed models: ``torch.onnx.export(model, args, path, dynamo=True)`` runs in
onnxruntime within 1e-5 of torch, for every pattern (issue #15, point 5).

Under ONNX export a packed layer runs the dense op on its weight decoded in the graph
(:mod:`nmkern.reference.graph_decode`); those decoders are checked here bit for bit against
the reference decoders, then whole models go through the exporter and onnxruntime.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn as nn

import nmkern
from nmkern.functional import nm_mask
from nmkern.reference.graph_decode import bsr_dense_graph, nm_dense_rows_graph, nm_indices_graph
from nmkern.reference.linear import bsr_dense_ref, nm_dense_rows_ref
from nmkern.reference.nm_pack import pack_nm_ref, unpack_words

NM_CASES = [(1, 2), (2, 4), (1, 4), (3, 4), (3, 8), (2, 8), (4, 16), (5, 16), (15, 16)]


def _exact(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("m", range(2, 17))
def test_index_words_decode_like_reference_over_the_whole_int32_range(m):
    gen = torch.Generator().manual_seed(m)
    words = torch.randint(-2 ** 31, 2 ** 31, (5, 7), generator=gen, dtype=torch.int64).to(torch.int32)
    words[0, 0], words[0, 1], words[0, 2] = -1, -2 ** 31, 0  # all ones, only the sign bit, nothing
    length = words.shape[1] * (32 // max(1, (m - 1).bit_length()))
    got = nm_indices_graph(words, m, length)
    assert got.dtype == torch.uint8
    assert torch.equal(got.long(), unpack_words(words, m, length))


@pytest.mark.parametrize("n,m", NM_CASES)
def test_nm_graph_decode_equals_reference(n, m):
    gen = torch.Generator().manual_seed(100 * n + m)
    w = torch.randn(6, m * 9, generator=gen)
    w = w * nm_mask(w, n, m)
    w[0, : 2 * m] = 0  # groups with no non-zero at all: filler slots
    values, indices = pack_nm_ref(w, n, m)
    values[1, 0], values[2, 1], values[3, 2] = float("inf"), float("nan"), -float("inf")  # kept as they are
    _exact(nm_dense_rows_graph(values, indices, n, m), nm_dense_rows_ref(values, indices, n, m))


@pytest.mark.parametrize("block", [1, 2, 4])
def test_bsr_graph_decode_equals_reference(block):
    gen = torch.Generator().manual_seed(block)
    rows, k = 5, 11
    keep = torch.rand(rows, k, generator=gen) < 0.4
    keep[1] = False  # an empty block row
    keep[3] = True  # a full one
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = keep.sum(1).cumsum(0)
    col = keep.nonzero()[:, 1]
    values = torch.randn(int(keep.sum()), block, generator=gen)
    dense_ref = bsr_dense_ref(crow, col, values, rows * block, k)
    _exact(bsr_dense_graph(crow, col, values, rows * block, k), dense_ref)
    _exact(bsr_dense_graph(crow.int(), col.int(), values, rows * block, k), dense_ref)  # int32 buffers too


def _model(kind: str) -> nn.Module:
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2),
                             nn.Flatten(), nn.Linear(8 * 3 * 3, 16))
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))


def _export_and_run(model: nn.Module, x: torch.Tensor, path, **kwargs) -> tuple[onnx.ModelProto, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False, **kwargs)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return onnx.load(str(path)), out


def _standard_ops_only(graph: onnx.ModelProto) -> None:
    domains = {node.domain for node in graph.graph.node} | {f.domain for f in graph.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains in the graph: {domains}"


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("scheme", ["2:4", "1:4", "3:8", "5:16", "1x4:0.5", "1x2:0.75"])
def test_packed_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path, scheme, kind):
    torch.manual_seed(0)
    model = _model(kind).eval()
    nmkern.sparsify(model, scheme, pack=True)
    x = torch.randn(2, 8, 8, 8) if kind == "conv" else torch.randn(3, 32)
    with torch.no_grad():
        want = model(x).numpy()
    graph, got = _export_and_run(model, x, tmp_path / "model.onnx")
    _standard_ops_only(graph)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    with torch.no_grad():  # the export leaves eager execution as it was
        np.testing.assert_array_equal(model(x).numpy(), want)


def test_mixed_scheme_model_exports_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(1)
    model = _model("linear").eval()
    nmkern.sparsify(model, {"0": "2:4", "2": "1x4:0.5", "4": None})
    for mod in model.modules():
        if isinstance(mod, nmkern.SparseLinear):
            mod.pack()
    batch = torch.export.Dim("batch", min=1, max=64)
    _, _ = _export_and_run(model, torch.randn(4, 32), tmp_path / "model.onnx", dynamic_shapes=({0: batch},))
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for rows in (1, 7, 33):  # other batch sizes than the one traced
        x = torch.randn(rows, 32)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=0, atol=1e-5)
    assert isinstance(model[4], nn.Linear) and not isinstance(model[4], nmkern.SparseLinear)
