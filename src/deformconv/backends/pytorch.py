"""Pure-PyTorch backend of ``deform_conv2d``: runs on any device, in any floating dtype.

Design
------
* The input is rearranged once into a channels-last *table* of rows
  ``(N·G·H·W, C/G)``, one row per (image, offset group, pixel).  A bilinear sample of one
  (output pixel, kernel tap, offset group) is a weighted sum of four table rows.
* A *sampling plan* holds, for every (output pixel, tap, offset group), the four corner rows
  and their bilinear weights, and for the backward the derivatives of those weights with
  respect to the sampling position.  Corners outside the image get weight 0 and a clamped,
  valid row number, so nothing is ever read out of bounds, whatever the offsets hold.
* Forward: the four corners are gathered with ``index_select`` into a reused buffer and
  accumulated into a column buffer ``(pixels, K·C)``, which one batched matrix product per
  weight group contracts with the weight.
* Backward: the samples are recomputed rather than stored.  ``grad_input`` scatters the
  weighted column gradients back with ``index_add_``; ``grad_offset`` and ``grad_mask`` come
  from one dot product over channels per corner; ``grad_weight`` is one more matrix product.
* Output pixels are processed in chunks whose column buffers together fit the column budget
  (:func:`set_column_budget`, 256 MiB by default); the buffers are allocated once per call
  and reused by every chunk.
* float16 and bfloat16 are computed in float32 and rounded once at the end; float64 stays
  float64.

Bilinear corners outside the image count as 0; the offset derivatives are those of the
floor-based interpolation (one-sided at integer positions, as in torchvision).  Non-finite
sampling positions (NaN or infinite offsets) sample 0 and receive zero offset gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .._geometry import Geometry, geometry
from .._utils import compute_dtype

#: The default upper bound, in bytes, on the temporary column buffers of one call.
DEFAULT_COLUMN_BUDGET = 256 * 2**20
_column_budget = DEFAULT_COLUMN_BUDGET
#: Chunks are kept near this size even when the budget allows more: smaller buffers stay in
#: cache and are reused, which is faster than one large pass.
_PREFERRED_CHUNK_BYTES = 4 * 2**20


class SamplingPlan(NamedTuple):
    """Four bilinear corners for each of ``M = pixels·K·G`` samples (corner-major, ``(4, M)``)."""

    rows: Tensor
    weights: Tensor
    d_weights_dy: Tensor | None
    d_weights_dx: Tensor | None


def sampling_plan(
    geo: Geometry, offsets: Tensor, first_pixel: int, *, derivatives: bool
) -> SamplingPlan:
    """Plan the samples of ``offsets.shape[0]`` output pixels starting at ``first_pixel``.

    ``offsets`` is ``(pixels, K, G, 2)`` with (Δy, Δx) in the last axis, already in the
    compute dtype.
    """
    device, dtype = offsets.device, offsets.dtype
    height, width = geo.height, geo.width
    pixel = torch.arange(first_pixel, first_pixel + offsets.shape[0], device=device)
    image = pixel // (geo.out_h * geo.out_w)
    out_y = (pixel // geo.out_w) % geo.out_h
    out_x = pixel % geo.out_w
    tap_y = torch.arange(geo.kernel_h, device=device).repeat_interleave(geo.kernel_w)
    tap_x = torch.arange(geo.kernel_w, device=device).repeat(geo.kernel_h)
    base_y = out_y[:, None] * geo.stride[0] - geo.padding[0] + tap_y * geo.dilation[0]
    base_x = out_x[:, None] * geo.stride[1] - geo.padding[1] + tap_x * geo.dilation[1]
    offset_y = offsets[..., 0]
    offset_x = offsets[..., 1]
    y = base_y.to(dtype)[:, :, None] + offset_y
    x = base_x.to(dtype)[:, :, None] + offset_x

    # Positions at least one pixel outside the image have no valid corner.  They, and NaN or
    # infinite positions (comparisons with NaN are false), are moved to a harmless spot with
    # no valid corner, so that their value and every derivative is 0 and their row numbers
    # stay small.  The rounded position only makes that decision: the corner comes from the
    # offset alone, floor(base + Δ) = base + floor(Δ), the corner of the exact position even
    # where base + Δ does not round exactly.
    near = (y > -2) & (y < height + 1) & (x > -2) & (x < width + 1)
    offset_y = torch.where(near, offset_y, 0.0)
    offset_x = torch.where(near, offset_x, 0.0)
    offset_y_low = offset_y.floor()
    offset_x_low = offset_x.floor()
    frac_y = offset_y - offset_y_low
    frac_x = offset_x - offset_x_low
    rest_y = 1 - frac_y
    rest_x = 1 - frac_x
    y_low_i = torch.where(near, base_y[:, :, None] + offset_y_low.long(), -2)
    x_low_i = torch.where(near, base_x[:, :, None] + offset_x_low.long(), -2)
    # A corner counts only inside the image; the bilinear weights then fade to 0 within one
    # pixel of the border.  The derivatives follow the floor: one-sided at integer positions.
    y_low_ok = (y_low_i >= 0) & (y_low_i < height)
    y_high_ok = (y_low_i >= -1) & (y_low_i < height - 1)
    x_low_ok = (x_low_i >= 0) & (x_low_i < width)
    x_high_ok = (x_low_i >= -1) & (x_low_i < width - 1)
    y_low_c = y_low_i.clamp(0, height - 1)
    y_high_c = (y_low_i + 1).clamp(0, height - 1)
    x_low_c = x_low_i.clamp(0, width - 1)
    x_high_c = (x_low_i + 1).clamp(0, width - 1)

    group = torch.arange(geo.offset_groups, device=device)
    table_base = (image[:, None, None] * geo.offset_groups + group) * (height * width)
    rows = torch.stack(
        (
            table_base + y_low_c * width + x_low_c,
            table_base + y_low_c * width + x_high_c,
            table_base + y_high_c * width + x_low_c,
            table_base + y_high_c * width + x_high_c,
        )
    ).view(4, -1)
    valid = torch.stack(
        (y_low_ok & x_low_ok, y_low_ok & x_high_ok, y_high_ok & x_low_ok, y_high_ok & x_high_ok)
    ).to(dtype)
    weights = torch.stack(
        (rest_y * rest_x, rest_y * frac_x, frac_y * rest_x, frac_y * frac_x)
    ).mul_(valid)
    if not derivatives:
        return SamplingPlan(rows, weights.view(4, -1), None, None)
    d_dy = torch.stack((-rest_x, -frac_x, rest_x, frac_x)).mul_(valid)
    d_dx = torch.stack((-rest_y, rest_y, -frac_y, frac_y)).mul_(valid)
    return SamplingPlan(rows, weights.view(4, -1), d_dy.view(4, -1), d_dx.view(4, -1))


def _input_table(input: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(N, C, H, W)`` → contiguous ``(N·G·H·W, C/G)`` rows in ``dtype``."""
    group_channels = geo.channels // geo.offset_groups
    table = input.reshape(geo.batch, geo.offset_groups, group_channels, geo.height, geo.width)
    table = table.permute(0, 1, 3, 4, 2).to(dtype, memory_format=torch.contiguous_format)
    return table.contiguous().view(-1, group_channels)


def _per_pixel(tensor: Tensor, geo: Geometry, trailing: int, dtype: torch.dtype) -> Tensor:
    """Offset ``(N, G·K·t, Ho, Wo)`` → contiguous ``(N·Ho·Wo, K, G, t)``."""
    tensor = tensor.reshape(
        geo.batch, geo.offset_groups, geo.taps, trailing, geo.out_h, geo.out_w
    ).permute(0, 4, 5, 2, 1, 3)
    return tensor.to(dtype).contiguous().view(geo.pixels, geo.taps, geo.offset_groups, trailing)


def _weight_matrix(weight: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(O, C/wg, kh, kw)`` → ``(wg, K·C/wg, O/wg)``, rows ordered (tap, channel)."""
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


def _chunk_pixels(geo: Geometry, itemsize: int, buffers: int) -> int:
    bytes_per_pixel = max(1, geo.taps * geo.channels * itemsize * buffers)
    budget = min(_column_budget, _PREFERRED_CHUNK_BYTES * buffers)
    return max(1, min(geo.pixels, budget // bytes_per_pixel))


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(total, start + size)


def _sample_columns(
    table: Tensor, plan: SamplingPlan, mask: Tensor | None, gathered: Tensor, out: Tensor
) -> Tensor:
    """Accumulate the (masked) bilinear samples of a plan into ``out`` ``(M, C/G)``."""
    weights = plan.weights if mask is None else plan.weights * mask
    for corner in range(4):
        torch.index_select(table, 0, plan.rows[corner], out=gathered)
        if corner == 0:
            torch.mul(gathered, weights[corner, :, None], out=out)
        else:
            out.addcmul_(gathered, weights[corner, :, None])
    return out


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    geo = geometry(input, offset, weight, stride, padding, dilation)
    dtype = compute_dtype(input.dtype)
    groups = geo.weight_groups
    out = torch.empty(
        geo.pixels, groups, geo.out_channels // groups, dtype=dtype, device=input.device
    )
    if geo.pixels > 0:
        table = _input_table(input, geo, dtype)
        offsets = _per_pixel(offset, geo, 2, dtype)
        masks = None if mask is None else _per_pixel(mask, geo, 1, dtype).view(geo.pixels, -1)
        matrix = _weight_matrix(weight, geo, dtype)
        step = _chunk_pixels(geo, table.element_size(), buffers=2)
        samples = step * geo.taps * geo.offset_groups
        gathered = table.new_empty(samples, table.shape[1])
        columns = table.new_empty(samples, table.shape[1])
        for start, stop in _chunks(geo.pixels, step):
            m = (stop - start) * geo.taps * geo.offset_groups
            plan = sampling_plan(geo, offsets[start:stop], start, derivatives=False)
            chunk_mask = None if masks is None else masks[start:stop].view(-1)
            cols = _sample_columns(table, plan, chunk_mask, gathered[:m], columns[:m])
            cols = _grouped(cols.view(stop - start, geo.taps, geo.channels), geo)
            out[start:stop] = torch.bmm(cols, matrix).transpose(0, 1)
    if bias is not None:
        out += bias.to(dtype).view(groups, -1)
    out = out.view(geo.batch, geo.out_h, geo.out_w, geo.out_channels).permute(0, 3, 1, 2)
    return out.to(input.dtype).contiguous()


def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
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
    grad_out = grad_output.permute(0, 2, 3, 1).to(dtype).reshape(geo.pixels, groups, out_per_group)
    grad_bias = grad_out.sum(0).view(-1).to(grad_output.dtype)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=input.device)

    table_grad = zeros(input.numel() // group_channels, group_channels) if need_input else None
    weight_grad = (
        zeros(groups, geo.taps * geo.channels // groups, out_per_group) if need_weight else None
    )
    position_grad = zeros(geo.pixels * per_pixel, 2) if need_offset else None
    mask_grad = zeros(geo.pixels * per_pixel) if need_mask else None

    if geo.pixels > 0 and any((need_input, need_offset, need_mask, need_weight)):
        table = _input_table(input, geo, dtype)
        offsets = _per_pixel(offset, geo, 2, dtype)
        masks = None if mask is None else _per_pixel(mask, geo, 1, dtype).view(-1)
        matrix_t = _weight_matrix(weight, geo, dtype).transpose(1, 2)
        step = _chunk_pixels(geo, table.element_size(), buffers=4)
        gathered = table.new_empty(step * per_pixel, group_channels)
        columns = torch.empty_like(gathered)
        product = torch.empty_like(gathered)
        dots = table.new_empty(4, step * per_pixel)
        for start, stop in _chunks(geo.pixels, step):
            first, last = start * per_pixel, stop * per_pixel
            m = last - first
            plan = sampling_plan(geo, offsets[start:stop], start, derivatives=need_offset)
            chunk_grad = grad_out[start:stop].transpose(0, 1)
            grad_cols = _ungrouped(torch.bmm(chunk_grad, matrix_t), geo)
            weights = plan.weights if masks is None else plan.weights * masks[first:last]
            for corner in range(4):
                sample = torch.index_select(table, 0, plan.rows[corner], out=gathered[:m])
                if need_offset or need_mask:
                    torch.mul(sample, grad_cols, out=product[:m])
                    torch.sum(product[:m], dim=1, out=dots[corner, :m])
                if weight_grad is not None:
                    if corner == 0:
                        torch.mul(sample, weights[corner, :, None], out=columns[:m])
                    else:
                        columns[:m].addcmul_(sample, weights[corner, :, None])
                if table_grad is not None:
                    torch.mul(grad_cols, weights[corner, :, None], out=product[:m])
                    table_grad.index_add_(0, plan.rows[corner], product[:m])
            if weight_grad is not None:
                cols = _grouped(columns[:m].view(stop - start, geo.taps, geo.channels), geo)
                weight_grad.baddbmm_(cols.transpose(1, 2), chunk_grad)
            if mask_grad is not None:
                mask_grad[first:last] = (plan.weights * dots[:, :m]).sum(0)
            if position_grad is not None:
                position_grad[first:last, 0] = (plan.d_weights_dy * dots[:, :m]).sum(0)
                position_grad[first:last, 1] = (plan.d_weights_dx * dots[:, :m]).sum(0)
                if masks is not None:
                    position_grad[first:last] *= masks[first:last, None]

    sample_shape = (geo.batch, geo.out_h, geo.out_w, geo.taps, geo.offset_groups)
    grad_input = grad_offset = grad_mask = grad_weight = None
    if table_grad is not None:
        grad_input = table_grad.view(
            geo.batch, geo.offset_groups, geo.height, geo.width, group_channels
        )
        grad_input = grad_input.permute(0, 1, 4, 2, 3).reshape(input.shape).to(input.dtype)
    if position_grad is not None:
        grad_offset = position_grad.view(*sample_shape, 2).permute(0, 4, 3, 5, 1, 2)
        grad_offset = grad_offset.reshape(offset.shape).to(offset.dtype)
    if mask_grad is not None:
        grad_mask = mask_grad.view(sample_shape).permute(0, 4, 3, 1, 2)
        grad_mask = grad_mask.reshape(mask.shape).to(mask.dtype)
    if weight_grad is not None:
        grad_weight = weight_grad.view(groups, geo.taps, -1, out_per_group).permute(0, 3, 2, 1)
        grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
