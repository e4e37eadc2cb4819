"""Weighted gathers of table rows, the inner loop of the torch backends.

A *bag* is a fixed number of (row, weight) pairs: the interpolation corners of one sample
(deformable convolution) or every corner of every point of one output pixel and group
(DCNv3).  Three operations on ``rows`` and ``weights`` of shape ``(B, K)``:

* :func:`weighted_rows`: ``Σ_k weights[b, k] · table[rows[b, k]]``, one fused
  ``embedding_bag`` call (multi-threaded, no ``(B·K, D)`` intermediate);
* :func:`row_dots`: ``table[rows[b, k]] · grad[b]`` for every pair, the gradient of the former
  with respect to its weights (the fused kernel ``embedding_bag``'s own backward uses);
* :func:`scatter_rows`: the gradient with respect to the table, accumulated into
  ``table_grad`` with ``index_add_``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_per_sample_weights_backward = getattr(
    torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None
)


def weighted_rows(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """``(B, D)``: each bag's weighted sum of table rows."""
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


def row_dots(grad: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """``(B, K)``: the dot product of every bag entry's table row with its bag's ``grad``."""
    global _per_sample_weights_backward
    bags, size = rows.shape
    if _per_sample_weights_backward is not None and bags > 0:
        flat = rows.reshape(-1)
        starts = torch.arange(0, bags * size, size, device=rows.device, dtype=rows.dtype)
        bag_of = torch.arange(bags, device=rows.device, dtype=rows.dtype)
        bag_of = bag_of.repeat_interleave(size)
        try:
            dots = _per_sample_weights_backward(grad, table, flat, starts, bag_of, 0, -1)
            return dots.view(bags, size)
        except (RuntimeError, TypeError):  # a private op: if a PyTorch changes it, loop
            _per_sample_weights_backward = None
    dots = grad.new_empty(bags, size)
    for k in range(size):
        dots[:, k] = (table.index_select(0, rows[:, k]) * grad).sum(1)
    return dots


def scatter_rows(table_grad: Tensor, rows: Tensor, weights: Tensor, grad: Tensor,
                 buffer: Tensor) -> None:  # fmt: skip
    """``table_grad[rows[b, k]] += weights[b, k] · grad[b]``.  ``buffer`` is scratch space of
    shape ``(..., D)`` with ``B`` rows in all, and ``grad`` broadcasts to that shape, so a
    gradient that several bags share need not be repeated."""
    shape = (*buffer.shape[:-1], 1)
    for k in range(rows.shape[1]):
        torch.mul(grad, weights[:, k].view(shape), out=buffer)
        # int64: index_add_ is several times slower with an int32 index on the CPU.
        table_grad.index_add_(0, rows[:, k].to(torch.int64), buffer.view(-1, buffer.shape[-1]))
