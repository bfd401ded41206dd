"""Autograd and the dense twin of every sparse op in :mod:`nmkern.ops`.

A packed weight is a frozen sparse base (adapters / LoRA train on top of it): every
``torch.ops.nmkern.*`` GEMM / conv op has an autograd formula for its input ``x``
(and its bias), exact on every path because it is computed from the same packed
tensors, decompressed by the pure-torch reference:

* linear: ``grad_x = grad_out @ W``, ``grad_bias = grad_out.sum(0)``;
* conv2d: ``grad_x = conv2d_input(x.shape, W, grad_out, ...)``, ``grad_bias = grad_out.sum((0, 2, 3))``.

The packed tensors (values, indices, metadata, BSR pointers) get no gradient: weight
gradients are not supported, and an op whose packed values require grad raises
``ValueError`` rather than silently leaving their ``.grad`` empty. The formulas are
plain torch, so ``torch.compile`` traces them into the backward graph.

:func:`dense_op` is the same decompression followed by the dense op: the sparse
kernels run it instead when their input holds NaN/Inf (see :mod:`nmkern.ops`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from .reference.cpu_layouts import nm_tile_unpack_ref
from .reference.linear import bsr_dense_ref, conv2d_dense, conv_weight_from_rows
from .reference.nm_pack import unpack_nm_ref
from .reference.semi24 import decompress_24_ref


class OpSpec(NamedTuple):
    """How to rebuild an op's dense weight: ``weight(x_shape, *args_after_x)``; where its bias sits."""

    weight: Callable
    bias_at: int  # index of ``bias`` in the op's arguments
    conv: bool = False


def _bsr_conv_weight(x_shape, crow, col, values, ws, *_):
    return bsr_dense_ref(crow, col, values, ws[0], math.prod(ws[1:])).reshape(ws)


def _cpu_bsr_weight(x_shape, values, rowptr, col, block, in_f, out_f, bias):
    return bsr_dense_ref(rowptr, col, values.reshape(-1, block), out_f, in_f)


SPECS: dict[str, OpSpec] = {
    "nm_linear": OpSpec(lambda x_shape, values, indices, n, m, bias: unpack_nm_ref(values, indices, n, m), 5),
    "semi24_linear": OpSpec(lambda x_shape, values, meta, bias: decompress_24_ref(values, meta), 3),
    "bsr_linear": OpSpec(lambda x_shape, crow, col, values, out_f, bias:
                         bsr_dense_ref(crow, col, values, out_f, x_shape[1]), 5),
    "nm_conv2d": OpSpec(lambda x_shape, values, indices, n, m, ws, *_:
                        conv_weight_from_rows(unpack_nm_ref(values, indices, n, m), ws), 6, conv=True),
    "bsr_conv2d": OpSpec(_bsr_conv_weight, 5, conv=True),
    "cpu_nm_linear": OpSpec(lambda x_shape, values, index, n, m, in_f, out_f, bias:
                            nm_tile_unpack_ref(values, index, out_f, in_f, n, m), 7),
    "cpu_bsr_linear": OpSpec(_cpu_bsr_weight, 7),
    "cuda_sparse24_linear": OpSpec(lambda x_shape, values, meta, bias: decompress_24_ref(values, meta), 3),
}


def _spec(op_name: str) -> OpSpec:
    """``nm_linear_triton`` -> the spec of ``nm_linear``; native ops by their own name."""
    if op_name in SPECS:
        return SPECS[op_name]
    return SPECS[op_name.rsplit("_", 1)[0]]


def dense_op(op_name: str, *args) -> torch.Tensor:
    """The dense op on the decompressed weight, for the arguments of op ``op_name``."""
    spec = _spec(op_name)
    x = args[0]
    w = spec.weight(tuple(x.shape), *args[1:]).to(x.dtype)
    bias = args[spec.bias_at]
    if spec.conv:
        stride, padding, dilation = args[-3:]
        return conv2d_dense(x, w, bias, stride, padding, dilation)  # CPU half precision in fp32: see there
    return F.linear(x, w, bias)


_SAVED = "<saved tensor>"  # placeholder in ctx.args for a tensor kept by save_for_backward


def _setup_context(op_name: str) -> Callable:
    def setup_context(ctx, inputs, output):
        for i, a in enumerate(inputs[1:], 1):
            if isinstance(a, torch.Tensor) and a.requires_grad and a.is_floating_point() and i != _spec(op_name).bias_at:
                raise ValueError(f"nmkern::{op_name}: argument {i} (a packed weight tensor) requires grad; the packed "
                                 "ops give gradients for x and bias only (a packed weight is a frozen base) - "
                                 "detach it, or train the dense weight in the training form (before .pack())")
        tensors = [a for a in inputs[1:] if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.args = [_SAVED if isinstance(a, torch.Tensor) else a for a in inputs[1:]]
        ctx.x_shape = tuple(inputs[0].shape)
    return setup_context


def _backward(op_name: str) -> Callable:
    spec = _spec(op_name)

    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if a is _SAVED else a for a in ctx.args]
        grads: list = [None] * (len(args) + 1)
        if ctx.needs_input_grad[0]:
            w = spec.weight(ctx.x_shape, *args).to(grad.dtype)
            if spec.conv:
                stride, padding, dilation = args[-3:]
                grads[0] = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad, tuple(stride), tuple(padding),
                                                      tuple(dilation))
            else:
                grads[0] = grad @ w
        if ctx.needs_input_grad[spec.bias_at]:
            grads[spec.bias_at] = grad.sum((0, 2, 3) if spec.conv else 0)
        return tuple(grads)
    return backward


def register(op_names) -> None:
    """``torch.library.register_autograd`` for every ``nmkern::<name>`` in ``op_names``."""
    for name in op_names:
        torch.library.register_autograd(f"nmkern::{name}", _backward(name), setup_context=_setup_context(name))
