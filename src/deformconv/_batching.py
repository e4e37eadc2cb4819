"""Batching rules: :func:`torch.vmap` over an op runs the op once, on the kernels.

A vmapped dimension of size ``B`` joins the batch where every problem shares the weight:
``B`` problems of batch ``N`` are one of batch ``B·N``.  Where the weights differ (model
ensembles), or where each problem needs its own weight gradient (per-sample gradients), it
joins the groups instead: ``B`` problems of ``g`` weight groups and ``G`` offset groups are
one problem of ``B·g`` weight groups and ``B·G`` offset groups, its channels ``B`` blocks of
the original channels.  DCNv3 has no weights: its problems always join the batch.
"""

from __future__ import annotations

from typing import Any

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


def register_conv(forward_op: Any, backward_op: Any) -> None:
    """Batching rules of ``deform_conv{2,3}d`` and its backward op."""

    def forward(info, in_dims, input, offset, mask, weight, bias, stride, padding, dilation):
        size, settings = info.batch_size, (stride, padding, dilation)
        data = [_leading(t, d, size) for t, d in zip((input, offset, mask), in_dims,
                                                      strict=False)]  # fmt: skip
        if in_dims[3] is None and in_dims[4] is None:  # one weight: the problems join the batch
            output = forward_op(*map(_as_batch, data), weight, bias, *settings)
            return output.unflatten(0, (size, -1)), 0
        weight, bias = (_as_batch(_leading(t, d, size)) for t, d in zip((weight, bias),
                                                                         in_dims[3:5],
                                                                         strict=True))  # fmt: skip
        output = forward_op(*map(_as_channels, data), weight, bias, *settings)
        return _from_channels(output, size), 1

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
        weight = _as_batch(_leading(weight, in_dims[4], size))
        grads = backward_op(*map(_as_channels, data), weight, *settings)
        grads_data = [_from_channels(g, size) if need else g
                      for g, need in zip(grads[:3], needs, strict=True)]  # fmt: skip
        grad_weight = grads[3].unflatten(0, (size, -1)) if needs_grad[3] else grads[3]
        grads = (*grads_data, grad_weight, grads[4].unflatten(0, (size, -1)))
        return grads, (*[1 if need else None for need in needs], 0 if needs_grad[3] else None, 0)

    forward_op.register_vmap(forward)
    backward_op.register_vmap(backward)


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

    forward_op.register_vmap(forward)
    backward_op.register_vmap(backward)
