"""Pure-PyTorch backend of the DCNv3 / DCNv4 operator: any device, any floating dtype.

It reuses the deformable-convolution backend's machinery: the input becomes a table of rows
``(N·G·H·W + 1, D)`` (one row per image, group and pixel; channels-last input makes this a cheap
permutation), and :func:`~deformconv.backends.pytorch.sampling_plan` gives every (output
pixel, point, group) its four bilinear corners.  DCNv3's positions are expressed as the
plan's regular grid plus a displacement ``Δ = s·offset + (c − tap·dilation)(1 − s)``, and
the plan applies DCNv3's border rule (a sample counts only strictly inside ``(−1, H) × (−1,
W)``).  There are no weights to contract: all corners of all points of one pixel and group
form one bag of :mod:`~deformconv.backends.gather`, summed by one fused gather.
The backward recomputes the samples; gradients of the positions come from the plan's weight
derivatives, times ``offset_scale``.  Output pixels go in chunks that bound the temporary
buffers by the same column budget as the convolution.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._geometry import Geometry
from .._utils import compute_dtype
from .gather import row_dots, scatter_rows, weighted_rows
from .pytorch import chunk_pixels, sampling_plan, table_rows, zero_row


def tap_coords(kernel: tuple[int, int], remove_center: bool, device) -> Tensor:
    """``(P, 2)`` kernel coordinates (row, column) of the points in DCNv3's order: column by
    column, the centre dropped when ``remove_center``."""
    kernel_h, kernel_w = kernel
    coords = [(j, i) for i in range(kernel_w) for j in range(kernel_h)]
    if remove_center:
        coords.remove((kernel_h // 2, kernel_w // 2))
    return torch.tensor(coords, dtype=torch.long, device=device).view(-1, 2)


def _geometry(input: Tensor, offset: Tensor, kernel, stride, padding, dilation, group):
    batch, height, width, channels = input.shape
    return Geometry(batch=batch, channels=channels, size=(height, width), out_channels=channels,
                    kernel=tuple(kernel), out_size=tuple(offset.shape[1:3]),
                    stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                    weight_groups=1, offset_groups=group)  # fmt: skip


def _table(input: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(N, H, W, G·D)`` → the rows of :func:`~deformconv.backends.pytorch.table_rows`."""
    depth = geo.channels // geo.offset_groups
    grouped = input.reshape(geo.batch, math.prod(geo.size), geo.offset_groups, depth)
    return table_rows(grouped.transpose(1, 2), dtype)


def _displacements(offset: Tensor, geo: Geometry, taps: Tensor, scale: float, dtype):
    """Offsets ``(N, Ho, Wo, G·P·2)`` as (Δh, Δw) from the plan's grid, ``(pixels, P, G, 2)``."""
    points = taps.shape[0]
    pairs = offset.reshape(geo.pixels, geo.offset_groups, points, 2).to(dtype)
    pairs = pairs.flip(-1).transpose(1, 2)  # (w, h) → (h, w); (pixels, P, G, 2)
    centre = torch.tensor([d * (k - 1) // 2 for d, k in zip(geo.dilation, geo.kernel,
                                                             strict=True)])  # fmt: skip
    spread = taps * torch.tensor(geo.dilation, device=taps.device)
    shift = (centre.to(taps.device) - spread).to(dtype) * (1 - scale)
    return (pairs * scale + shift[None, :, None, :]).contiguous()


def _bags(plan_tensor: Tensor, pixels: int, points: int, group: int) -> Tensor:
    """Plan rows or weights ``(pixels·P·G, 4)`` regrouped as one bag per (pixel, group):
    ``(pixels·G, P·4)``."""
    corners = plan_tensor.shape[-1]
    bags = plan_tensor.view(pixels, points, group, corners).transpose(1, 2)
    return bags.reshape(pixels * group, points * corners)


def forward(input, offset, mask, kernel, stride, padding, dilation, group, offset_scale,
            remove_center) -> Tensor:  # fmt: skip
    geo = _geometry(input, offset, kernel, stride, padding, dilation, group)
    dtype = compute_dtype(input.dtype)
    taps = tap_coords(geo.kernel, remove_center, input.device)
    points, depth = taps.shape[0], geo.channels // group
    out = torch.empty(geo.pixels, group, depth, dtype=dtype, device=input.device)
    if geo.pixels > 0:
        table = _table(input, geo, dtype)
        shifts = _displacements(offset, geo, taps, offset_scale, dtype)
        masks = mask.reshape(geo.pixels, group, points).transpose(1, 2).to(dtype).contiguous()
        step = chunk_pixels(geo.pixels, points * geo.channels, 2, table)
        for start in range(0, geo.pixels, step):
            stop = min(geo.pixels, start + step)
            plan = sampling_plan(geo, shifts[start:stop], start, derivatives=False, taps=taps,
                                 strict=True)  # fmt: skip
            weights = plan.weights * masks[start:stop].view(-1, 1)
            rows = _bags(plan.rows, stop - start, points, group)
            weights = _bags(weights, stop - start, points, group)
            out[start:stop] = weighted_rows(table, rows, weights).view(-1, group, depth)
    return out.view(*input.shape[:1], *geo.out_size, geo.channels).to(input.dtype)


def backward(grad_output, input, offset, mask, kernel, stride, padding, dilation, group,
             offset_scale, remove_center, needs_grad):  # fmt: skip
    """Gradients for (input, offset, mask); ``None`` where not requested."""
    need_input, need_offset, need_mask = needs_grad
    geo = _geometry(input, offset, kernel, stride, padding, dilation, group)
    dtype = compute_dtype(input.dtype)
    taps = tap_coords(geo.kernel, remove_center, input.device)
    points, depth = taps.shape[0], geo.channels // group
    samples = geo.pixels * points * group

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=input.device)

    table_grad = zeros(zero_row(geo) + 1, depth) if need_input else None
    position_grad = zeros(samples, 2) if need_offset else None
    mask_grad = zeros(samples) if need_mask else None
    if geo.pixels > 0 and any(needs_grad):
        table = _table(input, geo, dtype)
        shifts = _displacements(offset, geo, taps, offset_scale, dtype)
        masks = mask.reshape(geo.pixels, group, points).transpose(1, 2).to(dtype).reshape(-1)
        grad_out = grad_output.reshape(geo.pixels, 1, group, depth).to(dtype)
        step = chunk_pixels(geo.pixels, points * geo.channels, 3, table)
        product = table.new_empty(step, points, group, depth)
        for start in range(0, geo.pixels, step):
            stop = min(geo.pixels, start + step)
            first, last = start * points * group, stop * points * group
            m = last - first
            plan = sampling_plan(geo, shifts[start:stop], start, derivatives=need_offset,
                                 taps=taps, strict=True)  # fmt: skip
            chunk_masks = masks[first:last]
            if table_grad is not None:
                weights = plan.weights * chunk_masks[:, None]
                scatter_rows(table_grad, plan.rows, weights, grad_out[start:stop],
                             product[: stop - start])  # fmt: skip
            if need_offset or need_mask:
                rows = _bags(plan.rows, stop - start, points, group)
                bag_grads = grad_out[start:stop].reshape(-1, depth)
                dots = row_dots(bag_grads, table, rows)  # (pixels·G, P·4)
                dots = dots.view(stop - start, group, points, -1).transpose(1, 2)
                dots = dots.reshape(m, -1)
                if mask_grad is not None:
                    mask_grad[first:last] = (plan.weights * dots).sum(1)
                if position_grad is not None:
                    position = (plan.d_weights * dots).sum(-1).T
                    position_grad[first:last] = position * (chunk_masks * offset_scale)[:, None]

    grad_input = grad_offset = grad_mask = None
    if table_grad is not None:
        grad_input = table_grad[:-1].view(geo.batch, group, math.prod(geo.size), depth)
        grad_input = grad_input.transpose(1, 2)
        grad_input = grad_input.reshape(input.shape).to(input.dtype)
    if position_grad is not None:
        grad_offset = position_grad.view(geo.pixels, points, group, 2).flip(-1).transpose(1, 2)
        grad_offset = grad_offset.reshape(offset.shape).to(offset.dtype)
    if mask_grad is not None:
        grad_mask = mask_grad.view(geo.pixels, points, group).transpose(1, 2)
        grad_mask = grad_mask.reshape(mask.shape).to(mask.dtype)
    return grad_input, grad_offset, grad_mask
