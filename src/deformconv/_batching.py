"""Batching rules: :func:`torch.vmap` over an op runs the op once, on the kernels.

A vmapped dimension of size ``B`` joins the batch where every problem shares the weight:
``B`` problems of batch ``N`` are one of batch ``B·N``.  Where the weights differ (model
ensembles), or where each problem needs its own weight gradient (per-sample gradients), it
joins the groups instead: ``B`` problems of ``g`` weight groups and ``G`` offset groups are
one problem of ``B·g`` weight groups and ``B·G`` offset groups, its channels ``B`` blocks of
the original channels, at most :data:`GROUPS_PER_CALL` groups a call (a ``jacrev`` over a
large output vmaps over as many problems as it has elements).  DCNv3 has no weights: its
problems always join the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._utils import compute_dtype


def _leading(tensor: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    """``tensor`` with its vmapped dimension first, or repeated ``size`` times when it has
    none."""
    if tensor is None:
        return None
    if dim is None:
        return tensor.expand(size, *tensor.shape)
    return tensor.movedim(dim, 0)


def _as_batch(tensor: Tensor | None) -> Tensor | None:
    """``(B, N, ...)`` as ``(B·N, ...)``."""
    return None if tensor is None else tensor.flatten(0, 1)


def _as_channels(tensor: Tensor | None) -> Tensor | None:
    """``(B, N, C, ...)`` as ``(N, B·C, ...)``."""
    return None if tensor is None else tensor.transpose(0, 1).flatten(1, 2)


def _from_channels(tensor: Tensor, size: int) -> Tensor:
    """``(N, B·C, ...)`` as ``(N, B, C, ...)``: the inverse of :func:`_as_channels`, the
    vmapped dimension at 1."""
    return tensor.unflatten(1, (size, -1))


#: Problems folded into the groups of one call have at most this many weight groups or
#: offset groups together; more problems take more calls.
GROUPS_PER_CALL = 1024


def _parts(input: Tensor, offset: Tensor, weight: Tensor) -> list[slice]:
    """Slices of the ``B`` problems (``input`` and ``offset`` with the vmapped dimension
    first, ``weight`` as the op takes it) that fold into the groups of one call each."""
    dims = input.dim() - 3
    offset_groups = offset.shape[2] // (dims * math.prod(weight.shape[-dims:]))
    groups = max(input.shape[2] // weight.shape[-dims - 1], offset_groups)
    step, size = max(1, GROUPS_PER_CALL // groups), input.shape[0]
    return [slice(start, min(start + step, size)) for start in range(0, size, step)]


def _part(tensor: Tensor | None, part: slice) -> Tensor | None:
    return None if tensor is None else tensor[part]


def _register(op: Any, rule: Callable) -> None:
    """Register ``rule`` for ``op``, for a vmap over an empty dimension too: that runs the
    rule on one problem of zeros and keeps none of its results.  A PyTorch whose custom ops
    take no batching rules (``register_vmap``) vmaps them in a loop instead."""
    if not hasattr(op, "register_vmap"):
        return

    def empty_safe(info, in_dims, *args):
        if info.batch_size:
            return rule(info, in_dims, *args)
        args = [a.new_zeros((*a.shape[:d], 1, *a.shape[d + 1 :])) if isinstance(d, int) else a
                for a, d in zip(args, in_dims, strict=True)]  # fmt: skip
        one = SimpleNamespace(batch_size=1, randomness=info.randomness)
        results, out_dims = rule(one, in_dims, *args)
        if isinstance(results, Tensor):
            return results.narrow(out_dims, 0, 0), out_dims
        return tuple(r if d is None else r.narrow(d, 0, 0)
                     for r, d in zip(results, out_dims, strict=True)), out_dims  # fmt: skip

    op.register_vmap(empty_safe)


def register_conv(forward_op: Any, backward_op: Any) -> None:
    """Batching rules of ``deform_conv{2,3}d`` and its backward op."""

    def forward(info, in_dims, input, offset, mask, weight, bias, stride, padding, dilation):
        size, settings = info.batch_size, (stride, padding, dilation)
        data = [_leading(t, d, size) for t, d in zip((input, offset, mask), in_dims,
                                                      strict=False)]  # fmt: skip
        if in_dims[3] is None and in_dims[4] is None:  # one weight: the problems join the batch
            output = forward_op(*map(_as_batch, data), weight, bias, *settings)
            return output.unflatten(0, (size, -1)), 0
        weight, bias = (_leading(t, d, size) for t, d in zip((weight, bias), in_dims[3:5],
                                                              strict=True))  # fmt: skip

        def fold(part: slice) -> Tensor:
            output = forward_op(*[_as_channels(_part(t, part)) for t in data],
                                _as_batch(weight[part]), _as_batch(_part(bias, part)),
                                *settings)  # fmt: skip
            return _from_channels(output, part.stop - part.start)

        return torch.cat([fold(part) for part in _parts(data[0], data[1], weight[0])], 1), 1

    def backward(info, in_dims, grad_output, input, offset, mask, weight, stride, padding,
                 dilation, needs_grad):  # fmt: skip
        size = info.batch_size
        data = [_leading(t, d, size) for t, d in zip((grad_output, input, offset, mask),
                                                      in_dims, strict=False)]  # fmt: skip
        settings = (stride, padding, dilation, needs_grad)
        # Which of the input, offset and mask gradients come back: the others are empty.
        needs = (needs_grad[0], needs_grad[1], needs_grad[2] and mask is not None)
        if in_dims[4] is None and not needs_grad[3]:  # one weight, no weight gradient
            grads = backward_op(*map(_as_batch, data), weight, *settings)
            grads_data = [g.unflatten(0, (size, -1)) if need else g
                          for g, need in zip(grads[:3], needs, strict=True)]  # fmt: skip
            # The op's bias gradient sums over every problem; each needs its own.
            grad_bias = data[0].flatten(3).sum((1, 3), dtype=compute_dtype(data[0].dtype))
            grad_bias = grad_bias.to(data[0].dtype)
            grads = (*grads_data, grads[3], grad_bias)
            return grads, (*[0 if need else None for need in needs], None, 0)
        weight = _leading(weight, in_dims[4], size)
        grads_data, grad_weight, grad_bias = [], [], []
        for part in _parts(data[1], data[2], weight[0]):
            count = part.stop - part.start
            grads = backward_op(*[_as_channels(_part(t, part)) for t in data],
                                _as_batch(weight[part]), *settings)  # fmt: skip
            grads_data.append([_from_channels(g, count) if need else g
                               for g, need in zip(grads[:3], needs, strict=True)])  # fmt: skip
            grad_weight.append(grads[3].unflatten(0, (count, -1)) if needs_grad[3] else grads[3])
            grad_bias.append(grads[4].unflatten(0, (count, -1)))
        grads = (
            *[torch.cat(parts, 1) if need else parts[0]
              for parts, need in zip(zip(*grads_data, strict=True), needs, strict=True)],
            torch.cat(grad_weight, 0) if needs_grad[3] else grad_weight[0],
            torch.cat(grad_bias, 0),
        )  # fmt: skip
        return grads, (*[1 if need else None for need in needs], 0 if needs_grad[3] else None, 0)

    _register(forward_op, forward)
    _register(backward_op, backward)


def register_dcnv3(forward_op: Any, backward_op: Any) -> None:
    """Batching rules of ``dcnv3`` and its backward op: the problems join the batch."""

    def forward(info, in_dims, input, offset, mask, *settings):
        size = info.batch_size
        data = [_as_batch(_leading(t, d, size)) for t, d in zip((input, offset, mask), in_dims,
                                                                 strict=False)]  # fmt: skip
        return forward_op(*data, *settings).unflatten(0, (size, -1)), 0

    def backward(info, in_dims, grad_output, input, offset, mask, *settings):
        size = info.batch_size
        data = [_as_batch(_leading(t, d, size)) for t, d in
                zip((grad_output, input, offset, mask), in_dims, strict=False)]  # fmt: skip
        grads = backward_op(*data, *settings)
        needs_grad = settings[-1]
        grads = tuple(g.unflatten(0, (size, -1)) if need else g
                      for g, need in zip(grads, needs_grad, strict=True))  # fmt: skip
        return grads, tuple(0 if need else None for need in needs_grad)

    _register(forward_op, forward)
    _register(backward_op, backward)
