"""Pure-PyTorch backend of the deformable convolution ops: runs on any device, in any
floating dtype, with any number of spatial axes (2-D and 3-D share every line).

Design
------
* The input is rearranged once into a channels-last *table* of rows
  ``(N·G·S + 1, C/G)``, one row per (image, offset group, input position), ``S`` positions
  per image, and a last row of zeros.  A sample of one (output position, kernel tap, offset
  group) is a weighted sum of ``2**d`` table rows: four bilinear corners in 2-D, eight
  trilinear ones in 3-D.
* A *sampling plan* holds, for every (output position, tap, offset group), the corner rows
  (int32 where they fit) and their interpolation weights, and for the backward the
  derivatives of those weights along each axis.  Corners outside the input point at the zero
  row, so nothing is ever read out of bounds, whatever the offsets hold, and no weight needs
  masking.
* Forward: the weighted corners of every sample are summed by one fused gather
  (:mod:`~deformconv.backends.gather`, ``embedding_bag``) into a column buffer
  ``(positions, K·C)``, which one batched matrix product per weight group contracts with the
  weight.
* Backward: the samples are recomputed rather than stored.  ``grad_input`` scatters the
  weighted column gradients back with ``index_add_``; ``grad_offset`` and ``grad_mask`` come
  from the dot product of every corner's row with its column gradient (one fused kernel);
  ``grad_weight`` is one more matrix product.
* Output positions are processed in chunks whose column buffers together fit the column
  budget (:func:`set_column_budget`, 256 MiB by default).
* float16 and bfloat16 are computed in float32 and rounded once at the end; float64 stays
  float64.

Interpolation corners outside the input count as 0; the offset derivatives are those of the
floor-based interpolation (one-sided at integer positions, as in torchvision).  Non-finite
sampling positions (NaN or infinite offsets) sample 0 and receive zero offset gradient.
"""

from __future__ import annotations

import math
import operator
from typing import NamedTuple

import torch
from torch import Tensor

from .._geometry import Geometry, geometry
from .._utils import compute_dtype
from .gather import row_dots, scatter_rows, weighted_rows

#: The default upper bound, in bytes, on the temporary column buffers of one call.
DEFAULT_COLUMN_BUDGET = 256 * 2**20
_column_budget = DEFAULT_COLUMN_BUDGET
#: On the CPU, chunks are kept near this size even when the budget allows more: smaller
#: buffers stay in cache and are reused, which is faster than one large pass.  Other devices
#: take chunks as large as the budget allows: each chunk costs a few dozen kernel launches.
_PREFERRED_CPU_CHUNK_BYTES = 16 * 2**20


class SamplingPlan(NamedTuple):
    """The ``2**d`` interpolation corners of each of ``M = pixels·K·G`` samples, ``(M, 2**d)``:
    input-table rows, weights and, for the backward, the weights' derivatives along each axis
    ``(d, M, 2**d)``."""

    rows: Tensor
    weights: Tensor
    d_weights: Tensor | None


def _unravel(index: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """Row-major coordinates of flat ``index`` in an array of ``sizes``."""
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index = index // size
    return coords[::-1]


def _per_corner(pairs: list[tuple[Tensor, Tensor]], combine=operator.mul) -> list[Tensor]:
    """``combine`` (product, or sum) over axes of each corner's (low, high) entries, the first
    axis varying slowest: in 2-D the order (y0 x0, y0 x1, y1 x0, y1 x1)."""
    corners = list(pairs[0])
    for low, high in pairs[1:]:
        corners = [combine(corner, entry) for corner in corners for entry in (low, high)]
    return corners


def sampling_plan(
    geo: Geometry,
    offsets: Tensor,
    first_pixel: int,
    *,
    derivatives: bool,
    taps: Tensor | None = None,
    strict: bool = False,
) -> SamplingPlan:
    """Plan the samples of ``offsets.shape[0]`` output pixels starting at ``first_pixel``.

    ``offsets`` is ``(pixels, K, G, d)`` with the displacement along each axis (Δy, Δx in
    2-D) in the last dimension, already in the compute dtype.  ``taps`` ``(K, d)`` lists the
    kernel coordinates of the taps (default: every tap of ``geo.kernel``, row-major).  With
    ``strict``, a sample counts only when its position lies strictly inside ``(−1, size)`` on
    every axis (DCNv3's rule); otherwise corners are judged one by one (torchvision's).
    """
    device, dtype = offsets.device, offsets.dtype
    pixel = torch.arange(first_pixel, first_pixel + offsets.shape[0], device=device)
    image = pixel // math.prod(geo.out_size)
    out_coords = _unravel(pixel, geo.out_size)
    if taps is None:
        tap_coords = _unravel(torch.arange(geo.taps, device=device), geo.kernel)
    else:
        tap_coords = list(taps.unbind(1))
    bases = [
        out[:, None] * stride - pad + tap * dil
        for out, tap, stride, pad, dil in zip(
            out_coords, tap_coords, geo.stride, geo.padding, geo.dilation, strict=True
        )
    ]
    shifts = offsets.unbind(-1)

    # Positions at least one pixel outside the input have no valid corner.  They, and NaN or
    # infinite positions (comparisons with NaN are false), are moved to a harmless spot with
    # no valid corner, so that their value and every derivative is 0 and their row numbers
    # stay small.  The rounded position only makes that decision: the corner comes from the
    # offset alone, floor(base + Δ) = base + floor(Δ), the corner of the exact position even
    # where base + Δ does not round exactly.
    near = None
    for base, shift, size in zip(bases, shifts, geo.size, strict=True):
        position = base.to(dtype)[:, :, None] + shift
        inside = (
            (position > -1) & (position < size)
            if strict
            else ((position > -2) & (position < size + 1))
        )
        near = inside if near is None else near & inside

    # A corner counts only inside the input (the weights then fade to 0 within one pixel of
    # the border); the rows of the others, and of samples that are not near, point at the
    # table's last row, which is all zeros.  So no weight needs masking: such a corner adds 0
    # to the sample and to every derivative, and its gradient lands in that spare row.  The
    # derivatives follow the floor: one-sided at integer positions.
    index = _index_dtype(geo)
    strides = [math.prod(geo.size[axis + 1 :]) for axis in range(geo.dims)]
    rows, ok, fractions = [], [], []
    for base, shift, size, step in zip(bases, shifts, geo.size, strides, strict=True):
        shift = torch.where(near, shift, 0.0)
        shift_low = shift.floor()
        frac = shift - shift_low
        fractions.append((1 - frac, frac))
        low = base.to(index)[:, :, None] + shift_low.to(index)
        ok.append(((low >= 0) & (low < size), (low >= -1) & (low < size - 1)))
        rows.append((low * step, low * step + step))

    group = torch.arange(geo.offset_groups, device=device)
    table_base = (image[:, None, None] * geo.offset_groups + group) * math.prod(geo.size)
    rows[0] = (rows[0][0] + table_base.to(index), rows[0][1] + table_base.to(index))
    valid = torch.stack(_per_corner(ok, operator.and_), dim=-1) & near[..., None]
    corner_rows = torch.stack(_per_corner(rows, operator.add), dim=-1)
    corners = corner_rows.shape[-1]
    corner_rows = corner_rows.masked_fill_(~valid, zero_row(geo)).view(-1, corners)
    weights = torch.stack(_per_corner(fractions), dim=-1).view(-1, corners)
    if not derivatives:
        return SamplingPlan(corner_rows, weights, None)
    d_weights = torch.stack(
        [
            torch.stack(
                _per_corner([(-1.0, 1.0) if a == axis else f for a, f in enumerate(fractions)]),
                dim=-1,
            )
            for axis in range(geo.dims)
        ]
    )
    return SamplingPlan(corner_rows, weights, d_weights.view(geo.dims, -1, corners))


def zero_row(geo: Geometry) -> int:
    """The index of the all-zero row after the input table's ``N·G·S`` rows."""
    return geo.batch * geo.offset_groups * math.prod(geo.size)


def _index_dtype(geo: Geometry) -> torch.dtype:
    """int32 row numbers where they fit (less memory traffic), else int64."""
    return torch.int32 if zero_row(geo) < 2**31 - 1 else torch.int64


def table_rows(grouped: Tensor, dtype: torch.dtype) -> Tensor:
    """``(N, G, S, C/G)`` (any strides) → contiguous ``(N·G·S + 1, C/G)`` rows in ``dtype``,
    the last all zeros (see :func:`sampling_plan`)."""
    table = grouped.new_empty(grouped.shape[:3].numel() + 1, grouped.shape[3], dtype=dtype)
    table[:-1].view(grouped.shape).copy_(grouped)
    table[-1] = 0
    return table


def _input_table(input: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(N, C, *size)`` → the table of :func:`table_rows`."""
    group_channels = geo.channels // geo.offset_groups
    grouped = input.reshape(geo.batch, geo.offset_groups, group_channels, math.prod(geo.size))
    return table_rows(grouped.transpose(2, 3), dtype)


def _per_pixel(tensor: Tensor, geo: Geometry, trailing: int, dtype: torch.dtype) -> Tensor:
    """Offset ``(N, G·K·t, *out_size)`` → contiguous ``(positions, K, G, t)``."""
    tensor = tensor.reshape(
        geo.batch, geo.offset_groups, geo.taps, trailing, math.prod(geo.out_size)
    ).permute(0, 4, 2, 1, 3)
    return tensor.to(dtype).contiguous().view(geo.pixels, geo.taps, geo.offset_groups, trailing)


def _weight_matrix(weight: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(O, C/wg, *kernel)`` → ``(wg, K·C/wg, O/wg)``, rows ordered (tap, channel)."""
    matrix = geo.tap_major_weight(weight)
    return matrix.reshape(geo.weight_groups, -1, geo.group_out).to(dtype)


def _grouped(columns: Tensor, geo: Geometry) -> Tensor:
    """Columns ``(pixels, K, C)`` → ``(wg, pixels, K·C/wg)``; a view when there is one group."""
    groups = geo.weight_groups
    pixels = columns.shape[0]
    columns = columns.view(pixels, geo.taps, groups, geo.channels // groups)
    return columns.permute(2, 0, 1, 3).reshape(groups, pixels, -1)


def _ungrouped(grouped: Tensor, geo: Geometry) -> Tensor:
    """Inverse of :func:`_grouped`, as sample rows ``(pixels·K·G, C/G)``."""
    groups = geo.weight_groups
    pixels = grouped.shape[1]
    columns = grouped.view(groups, pixels, geo.taps, geo.channels // groups).permute(1, 2, 0, 3)
    return columns.reshape(-1, geo.channels // geo.offset_groups)


def set_column_budget(nbytes: int | None) -> None:
    """Bound the temporary column buffers of one call of the torch backend to ``nbytes``
    (``None``: the default, 256 MiB).  Smaller budgets mean more, smaller chunks: the same
    results in bounded memory, a little slower.

    >>> set_column_budget(64 * 2**20); column_budget()
    67108864
    >>> set_column_budget(None)
    """
    global _column_budget
    if nbytes is None:
        _column_budget = DEFAULT_COLUMN_BUDGET
        return
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"the column budget must be a positive number of bytes, got {nbytes!r}")
    _column_budget = nbytes


def column_budget() -> int:
    """The column budget in force, in bytes (see :func:`set_column_budget`)."""
    return _column_budget


def chunk_pixels(pixels: int, values_per_pixel: int, buffers: int, like: Tensor) -> int:
    """Output pixels per chunk: ``buffers`` temporary buffers of ``values_per_pixel`` values
    per pixel, of ``like``'s dtype and device, stay within the column budget (and, on the CPU,
    near the preferred chunk size).

    >>> chunk_pixels(10**6, 576, 2, torch.empty(0))  # 16 MiB a buffer on the CPU
    7281
    >>> chunk_pixels(10**6, 576, 2, torch.empty(0, device="meta"))  # the whole budget
    58254
    """
    bytes_per_pixel = max(1, values_per_pixel * like.element_size() * buffers)
    budget = _column_budget
    if like.device.type == "cpu":
        budget = min(budget, _PREFERRED_CPU_CHUNK_BYTES * buffers)
    return max(1, min(pixels, budget // bytes_per_pixel))


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Tensor:
    geo = geometry(input, offset, weight, stride, padding, dilation)
    dtype = compute_dtype(input.dtype)
    groups = geo.weight_groups
    out = torch.empty(
        geo.pixels, groups, geo.out_channels // groups, dtype=dtype, device=input.device
    )
    if geo.pixels > 0:
        table = _input_table(input, geo, dtype)
        offsets = _per_pixel(offset, geo, geo.dims, dtype)
        masks = None if mask is None else _per_pixel(mask, geo, 1, dtype).view(geo.pixels, -1)
        matrix = _weight_matrix(weight, geo, dtype)
        step = chunk_pixels(geo.pixels, geo.taps * geo.channels, 2, table)
        for start, stop in _chunks(geo.pixels, step):
            plan = sampling_plan(geo, offsets[start:stop], start, derivatives=False)
            weights = plan.weights
            if masks is not None:
                weights = weights * masks[start:stop].view(-1, 1)
            cols = weighted_rows(table, plan.rows, weights)
            cols = _grouped(cols.view(stop - start, geo.taps, geo.channels), geo)
            out[start:stop] = torch.bmm(cols, matrix).transpose(0, 1)
    if bias is not None:
        out += bias.to(dtype).view(groups, -1)
    out = out.view(geo.batch, *geo.out_size, geo.out_channels).movedim(-1, 1)
    return out.to(input.dtype).contiguous()


def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    needs_grad: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """Gradients for (input, offset, mask, weight, bias); ``None`` where not requested."""
    need_input, need_offset, need_mask, need_weight = needs_grad
    need_mask = need_mask and mask is not None
    geo = geometry(input, offset, weight, stride, padding, dilation)
    dtype = compute_dtype(input.dtype)
    groups = geo.weight_groups
    out_per_group = geo.out_channels // groups
    group_channels = geo.channels // geo.offset_groups
    per_pixel = geo.taps * geo.offset_groups
    grad_out = grad_output.movedim(1, -1).to(dtype).reshape(geo.pixels, groups, out_per_group)
    grad_bias = grad_out.sum(0).view(-1).to(grad_output.dtype)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=input.device)

    table_grad = zeros(zero_row(geo) + 1, group_channels) if need_input else None
    weight_grad = (
        zeros(groups, geo.taps * geo.channels // groups, out_per_group) if need_weight else None
    )
    position_grad = zeros(geo.pixels * per_pixel, geo.dims) if need_offset else None
    mask_grad = zeros(geo.pixels * per_pixel) if need_mask else None

    if geo.pixels > 0 and any((need_input, need_offset, need_mask, need_weight)):
        table = _input_table(input, geo, dtype)
        offsets = _per_pixel(offset, geo, geo.dims, dtype)
        masks = None if mask is None else _per_pixel(mask, geo, 1, dtype).view(-1)
        matrix_t = _weight_matrix(weight, geo, dtype).transpose(1, 2)
        step = chunk_pixels(geo.pixels, geo.taps * geo.channels, 4, table)
        product = table.new_empty(step * per_pixel, group_channels)
        for start, stop in _chunks(geo.pixels, step):
            first, last = start * per_pixel, stop * per_pixel
            m = last - first
            plan = sampling_plan(geo, offsets[start:stop], start, derivatives=need_offset)
            chunk_grad = grad_out[start:stop].transpose(0, 1)
            grad_cols = _ungrouped(torch.bmm(chunk_grad, matrix_t), geo)
            weights = plan.weights
            if masks is not None:
                weights = weights * masks[first:last, None]
            if weight_grad is not None:
                cols = weighted_rows(table, plan.rows, weights)
                cols = _grouped(cols.view(stop - start, geo.taps, geo.channels), geo)
                weight_grad.baddbmm_(cols.transpose(1, 2), chunk_grad)
            if table_grad is not None:
                scatter_rows(table_grad, plan.rows, weights, grad_cols, product[:m])
            if need_offset or need_mask:
                dots = row_dots(grad_cols, table, plan.rows)
                if mask_grad is not None:
                    mask_grad[first:last] = (plan.weights * dots).sum(1)
                if position_grad is not None:
                    position_grad[first:last] = (plan.d_weights * dots).sum(-1).T
                    if masks is not None:
                        position_grad[first:last] *= masks[first:last, None]

    sample_shape = (geo.batch, math.prod(geo.out_size), geo.taps, geo.offset_groups)
    grad_input = grad_offset = grad_mask = grad_weight = None
    if table_grad is not None:
        grad_input = table_grad[:-1].view(
            geo.batch, geo.offset_groups, math.prod(geo.size), group_channels
        )
        grad_input = grad_input.transpose(2, 3).reshape(input.shape).to(input.dtype)
    if position_grad is not None:
        grad_offset = position_grad.view(*sample_shape, geo.dims).permute(0, 3, 2, 4, 1)
        grad_offset = grad_offset.reshape(offset.shape).to(offset.dtype)
    if mask_grad is not None:
        grad_mask = mask_grad.view(sample_shape).permute(0, 3, 2, 1)
        grad_mask = grad_mask.reshape(mask.shape).to(mask.dtype)
    if weight_grad is not None:
        grad_weight = weight_grad.view(groups, geo.taps, -1, out_per_group).permute(0, 3, 2, 1)
        grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
