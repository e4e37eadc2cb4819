"""Weighted gathers of table rows, the inner loop of the torch backends.

A *bag* is a fixed number of (row, weight) pairs: the interpolation corners of one sample
(deformable convolution) or every corner of every point of one output pixel and group
(DCNv3).  Three operations on ``rows`` and ``weights`` of shape ``(B, K)``:

* :func:`weighted_rows`: ``Σ_k weights[b, k] · table[rows[b, k]]``, one fused
  ``embedding_bag`` call (multi-threaded, no ``(B·K, D)`` intermediate), or, for the corners
  of single samples, :func:`corner_sums`: one sparse-dense product on the CPU, written into
  a given buffer;
* :func:`row_dots`: ``table[rows[b, k]] · grad[b]`` for every pair, the gradient of the former
  with respect to its weights (the fused kernel ``embedding_bag``'s own backward uses), or,
  for the corners of single samples, :func:`corner_dots`: one sampled dense-dense product
  on the CPU;
* :func:`scatter_corners`: the gradient with respect to the table, accumulated into
  ``table_grad``, for bags whose rows lie at fixed deltas from a first row (the corners of
  a sample in the padded table of :mod:`~deformconv.backends.plan`).

All of them sum in a fixed order: the results do not change from run to run.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

#: Gaps in the sorted rows of :func:`scatter_corners` beyond this many rows split its output
#: range: an empty row costs a write and an add, a split a few calls.
GAP_ROWS = 1024
#: :func:`scatter_corners` sorts every (bag, corner) pair where the range of rows times their
#: channels reaches this many values per bag: then one gather writing the range once
#: outweighs sorting four times the keys (on 2 cores: N=8 C=128 28² stride 2, 66 a bag,
#: 2.4 → 1.5 ms; the other way N=1 C=256 14², 40 a bag, 0.30 → 0.40 ms, and N=8 C=64 32², 8
#: a bag, 4.5 → 5.5 ms).
WIDE_RANGE = 48
#: On the CPU, :func:`scatter_corners` adds pair by pair where its range of rows is more
#: than this many times the number of pairs.
SPARSE_SPAN = 4

#: ``torch.sort`` on the CPU switches to a much faster algorithm from this many elements on
#: (torch 2.13 and 2.14 on 2 cores: 1.5 ms for 30 000 int32 keys, 0.29 ms for 32 768), so
#: mid-sized key sets are padded up to it: from about 10 000 keys on for the nearly sorted
#: rows of a plan (7 056: 0.20 ms as they are, 0.31 ms padded; 14 112: 0.47 and 0.32 ms).
_FAST_SORT_SIZE = 2**15
_PAD_SORT_FROM = 10000
#: Up to this many bytes of contributions, the CPU's sparse input gradient adds every corner
#: in one ``index_add_`` (fewer passes than one per corner).
ONE_ADD_BYTES = 16 * 2**20

with warnings.catch_warnings():  # PyTorch's once-only note that CSR tensors are in beta
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64),
                            torch.tensor([]), size=(1, 1), check_invariants=False)  # fmt: skip

_per_sample_weights_backward = getattr(
    torch.ops.aten, "_embedding_bag_per_sample_weights_backward", None
)


def weighted_rows(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """``(B, D)``: each bag's weighted sum of table rows."""
    return F.embedding_bag(rows, table, per_sample_weights=weights, mode="sum")


def corner_sums(table: Tensor, rows: Tensor, weights: Tensor, out: Tensor | None = None) -> Tensor:
    """:func:`weighted_rows` for bags whose rows strictly increase along each bag (the corners
    of one sample): on the CPU one sparse-dense product (CSR, with MKL where PyTorch has it),
    written into ``out`` ``(B, D)`` when given, with no intermediate."""
    if table.device.type != "cpu" or rows.shape[0] == 0:
        sums = weighted_rows(table, rows, weights)
        return sums if out is None else out.copy_(sums)
    matrix = _corner_matrix(rows, weights.reshape(-1), table.shape[0])
    if out is None:
        out = table.new_empty(rows.shape[0], table.shape[1])
    return torch.addmm(out, matrix, table, beta=0, out=out)  # beta=0: out's contents ignored


def corner_dots(grad: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """:func:`row_dots` for one gradient row per bag whose rows strictly increase (the
    corners of one sample): on the CPU one sampled dense-dense product (CSR)."""
    if table.device.type != "cpu" or rows.shape[0] == 0:
        return row_dots(grad, table, rows)
    pattern = _corner_matrix(rows, grad.new_zeros(rows.numel()), table.shape[0])
    dots = torch.sparse.sampled_addmm(pattern, grad, table.T, beta=0)
    return dots.values().view(rows.shape)


def _corner_matrix(rows: Tensor, values: Tensor, columns: int) -> Tensor:
    """The CSR matrix ``(B, columns)`` with ``values`` at ``rows[b, k]`` in row ``b``."""
    bags, size = rows.shape
    index = rows.dtype if bags * size < 2**31 else torch.int64
    starts = torch.arange(0, bags * size + 1, size, dtype=index, device=rows.device)
    return torch.sparse_csr_tensor(starts, rows.reshape(-1).to(index), values,
                                   size=(bags, columns), check_invariants=False)  # fmt: skip


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


def scatter_corners(table_grad: Tensor, first: Tensor, deltas: list[int], weights: Tensor,
                    grad: Tensor, *, share: int, skip_from: int) -> None:  # fmt: skip
    """``table_grad[first[b] + deltas[k]] += weights[b, k] · grad[b // share]`` for every bag
    ``b`` with ``first[b] < skip_from``: the bags' corners lie at fixed deltas from their
    first row, and ``share`` consecutive bags share one gradient row.  The rows of
    ``table_grad`` from ``skip_from`` on are scratch space: they may receive anything.

    A gather rather than a scatter, in a fixed order (deterministic): sorted by table row,
    the contributions to one row are consecutive, so one fused, multi-threaded
    ``embedding_bag`` over the gradient rows writes a contiguous range of rows.  Where that
    range is large for the number of bags (:data:`WIDE_RANGE`), or few bags spread over many
    rows, every (bag, corner) pair is sorted by its row: one gather reads each gradient row
    once.  Else only the bags are sorted, by first row, and each corner is one gather over
    them (a fourth of the keys to sort, each gradient row read once per corner), its range
    split where the sorted rows leave a gap of more than :data:`GAP_ROWS` (e.g. between offset
    groups of a large image).  On the CPU, where the range holds many more rows than there
    are pairs, adding each pair to its row with ``index_add_`` (deterministic there too)
    costs less.
    """
    keys, order = _stable_sort(first)
    count = int(torch.searchsorted(keys, skip_from))
    if count == 0:
        return
    keys, order = keys[:count], order[:count]
    low, high = int(keys[0]), int(keys[-1]) + 1
    span = high - low + deltas[-1]
    if table_grad.device.type == "cpu" and span > SPARSE_SPAN * len(deltas) * count:
        _add_bag_by_bag(table_grad, first, deltas, weights, grad, share)
        return
    if span * table_grad.shape[-1] >= WIDE_RANGE * count or span > count:
        _gather_pairs(table_grad, first, deltas, weights, grad, share, skip_from)
        return
    edges, lows, highs = [0, count], [low], [high]
    if high - low > GAP_ROWS:  # there may be gaps to split at
        cuts = torch.nonzero(keys[1:] - keys[:-1] > GAP_ROWS).view(-1) + 1
        edges = [0, *cuts.tolist(), count]
        lows = keys[edges[:-1]].tolist()
        highs = (keys[[edge - 1 for edge in edges[1:]]] + 1).tolist()
    sources = order if share == 1 else order // share
    # Whole rows gathered, then each corner's column copied: several times faster than
    # gathering along weights.T or transposing in one copy.
    rows_in_order = weights.index_select(0, order)
    sorted_weights = weights.new_empty(len(deltas), count)
    for k in range(len(deltas)):
        sorted_weights[k] = rows_in_order[:, k]
    for begin, end, low, high in zip(edges[:-1], edges[1:], lows, highs, strict=True):
        rows = torch.arange(low, high + 1, device=keys.device, dtype=keys.dtype)
        bounds = torch.searchsorted(keys[begin:end], rows)
        for k, delta in enumerate(deltas):
            part = F.embedding_bag(sources[begin:end], grad, bounds, mode="sum",
                                   per_sample_weights=sorted_weights[k, begin:end],
                                   include_last_offset=True)  # fmt: skip
            table_grad[low + delta : high + delta] += part


def _gather_pairs(table_grad: Tensor, first: Tensor, deltas: list[int], weights: Tensor,
                  grad: Tensor, share: int, skip_from: int) -> None:  # fmt: skip
    """:func:`scatter_corners` with every (bag, corner) pair sorted by its row."""
    corners = len(deltas)
    offsets = torch.tensor(deltas, dtype=first.dtype, device=first.device)
    keys, order = _stable_sort((first[:, None] + offsets).view(-1))
    # Dead bags' corners lie at skip_from or beyond, live bags' corners before it.
    count = int(torch.searchsorted(keys, skip_from))
    keys, order = keys[:count], order[:count]
    low, high = int(keys[0]), int(keys[-1]) + 1
    rows = torch.arange(low, high + 1, device=keys.device, dtype=keys.dtype)
    bounds = torch.searchsorted(keys, rows)
    part = F.embedding_bag(order // (corners * share), grad, bounds, mode="sum",
                           per_sample_weights=weights.reshape(-1)[order],
                           include_last_offset=True)  # fmt: skip
    table_grad[low:high] += part


def _stable_sort(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.sort(keys, stable=True)`` for integer keys, past the CPU's slow range of sizes
    and, where the keys span fewer than 2**15 values, on 16-bit keys (fewer radix passes:
    225 792 keys 1.7 → 1.1 ms on 2 cores)."""
    size = keys.shape[0]
    if keys.device.type != "cpu" or size == 0:
        return torch.sort(keys, stable=True)
    if size >= _PAD_SORT_FROM:
        low, high = keys.min(), keys.max()
        if int(high - low) < 2**15 - 1:
            values, order = _padded_sort((keys - low).to(torch.int16))
            return values.to(keys.dtype) + low, order
    return _padded_sort(keys)


def _padded_sort(keys: Tensor) -> tuple[Tensor, Tensor]:
    """``torch.sort(keys, stable=True)``, mid-sized key sets padded to the fast size."""
    size = keys.shape[0]
    if not _PAD_SORT_FROM <= size < _FAST_SORT_SIZE:
        return torch.sort(keys, stable=True)
    # The padding is the largest key there is: stable, it stays behind every real key.
    padding = keys.new_full((_FAST_SORT_SIZE - size,), torch.iinfo(keys.dtype).max)
    values, order = torch.sort(torch.cat([keys, padding]), stable=True)
    return values[:size], order[:size]


def _add_bag_by_bag(table_grad: Tensor, first: Tensor, deltas: list[int], weights: Tensor,
                    grad: Tensor, share: int) -> None:  # fmt: skip
    """:func:`scatter_corners` with ``index_add_``, skipped bags included (scratch rows): one
    call for every (bag, corner) pair where their contributions fit in
    :data:`ONE_ADD_BYTES`, else one per corner."""
    targets = first.to(torch.int64)
    depth = grad.shape[-1]
    corners = len(deltas)
    if first.shape[0] * corners * depth * grad.element_size() <= ONE_ADD_BYTES:
        contributions = grad.view(-1, 1, 1, depth) * weights.view(-1, share, corners, 1)
        rows = targets[:, None] + torch.tensor(deltas, device=targets.device)
        table_grad.index_add_(0, rows.view(-1), contributions.view(-1, depth))
        return
    contribution = grad.new_empty(first.shape[0], depth)  # one buffer for all corners
    for k, delta in enumerate(deltas):
        torch.mul(grad.view(-1, 1, depth), weights[:, k].view(-1, share, 1),
                  out=contribution.view(-1, share, depth))  # fmt: skip
        table_grad.index_add_(0, targets + delta, contribution)
