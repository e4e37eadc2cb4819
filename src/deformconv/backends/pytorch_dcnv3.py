"""Pure-PyTorch backend of the DCNv3 / DCNv4 operator: any device, any floating dtype.

It reuses the deformable-convolution backend's machinery (:mod:`~deformconv.backends.plan`):
the input becomes a padded table of rows of ``D`` channels (one row per image, group and
pixel; channels-last input makes this a cheap permutation), and the sampling plan gives
every (output pixel, group, point) its four bilinear corners.  DCNv3's positions are
expressed as the plan's regular grid plus a displacement ``Δ = s·offset + (c −
tap·dilation)(1 − s)``, and the plan applies DCNv3's border rule (a sample counts only
strictly inside ``(−1, H) × (−1, W)``).  There are no weights to contract: all corners of
all points of one pixel and group form one bag of :mod:`~deformconv.backends.gather`,
summed by one fused gather.  The backward recomputes the samples; gradients of the
positions come from the plan's weight factors, times ``offset_scale``; the input gradient
is one fused gather per corner over the samples sorted by table row.  Output pixels go in
chunks that bound the temporary buffers by the same column budget as the convolution.  On
the CPU the gathers and gradients are the convolution's C loops
(:mod:`~deformconv.backends.native`), or, where those do not build, its tensor operations.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._geometry import Geometry
from .._utils import compute_dtype
from .plan import table_of
from .pytorch import chunk_pixels, padded_table
from .samples import Samples
from .scratch import fresh, scratch


def point_coords(kernel: tuple[int, int], remove_center: bool) -> tuple[tuple[int, int], ...]:
    """Kernel coordinates (row, column) of the points in DCNv3's order: column by column,
    the centre dropped when ``remove_center``."""
    kernel_h, kernel_w = kernel
    coords = [(j, i) for i in range(kernel_w) for j in range(kernel_h)]
    if remove_center:
        coords.remove((kernel_h // 2, kernel_w // 2))
    return tuple(coords)


def tap_coords(kernel: tuple[int, int], remove_center: bool, device) -> Tensor:
    """:func:`point_coords` as a tensor ``(P, 2)``."""
    coords = point_coords(kernel, remove_center)
    return torch.tensor(coords, dtype=torch.long, device=device).view(-1, 2)


def _geometry(input: Tensor, offset: Tensor, kernel, stride, padding, dilation, group):
    batch, height, width, channels = input.shape
    return Geometry(batch=batch, channels=channels, size=(height, width), out_channels=channels,
                    kernel=tuple(kernel), out_size=tuple(offset.shape[1:3]),
                    stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                    weight_groups=1, offset_groups=group)  # fmt: skip


def _table(input: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(N, H, W, G·D)`` → the padded table of :mod:`~deformconv.backends.plan`."""
    depth = geo.channels // geo.offset_groups
    grouped = input.reshape(geo.batch, *geo.size, geo.offset_groups, depth).movedim(-2, 1)
    return padded_table(grouped, geo, dtype)


def _displacements(offset: Tensor, geo: Geometry, taps: Tensor, scale: float, dtype):
    """Offsets ``(N, Ho, Wo, G·P·2)`` as (Δh, Δw) from the plan's grid, ``(pixels, G, P, 2)``,
    in a buffer of :mod:`~deformconv.backends.scratch`."""
    points = taps.shape[0]
    pairs = offset.reshape(-1, 2)
    buffer = scratch("offsets", pairs.shape, dtype, offset.device)
    pairs = _swapped_pairs(pairs, buffer)  # (w, h) → (h, w)
    pairs = pairs.view(geo.pixels, geo.offset_groups, points, 2)
    centre = torch.tensor([d * (k - 1) // 2 for d, k in zip(geo.dilation, geo.kernel,
                                                             strict=True)])  # fmt: skip
    spread = taps * torch.tensor(geo.dilation, device=taps.device)
    shift = (centre.to(taps.device) - spread).to(dtype) * (1 - scale)
    return pairs.mul_(scale).add_(shift[None, None, :, :])


def _swapped_pairs(pairs: Tensor, out: Tensor) -> Tensor:
    """``(n, 2)`` pairs with their two columns swapped, into ``out`` (two column copies:
    ``flip`` takes twice as long on the CPU)."""
    out[:, 0] = pairs[:, 1]
    out[:, 1] = pairs[:, 0]
    return out


def _masks(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The mask ``(N, Ho, Wo, G, P)`` flat, in ``dtype``: itself where it already is, else
    a copy in a buffer of :mod:`~deformconv.backends.scratch` (DCNv4's fused tensor)."""
    if mask.dtype == dtype and mask.is_contiguous():
        return mask.view(-1)
    return scratch("masks", mask.shape, dtype, mask.device).copy_(mask).view(-1)


def forward(input, offset, mask, kernel, stride, padding, dilation, group, offset_scale,
            remove_center) -> Tensor:  # fmt: skip
    geo = _geometry(input, offset, kernel, stride, padding, dilation, group)
    dtype = compute_dtype(input.dtype)
    coords = point_coords(geo.kernel, remove_center)
    taps = tap_coords(geo.kernel, remove_center, input.device)
    points, depth = len(coords), geo.channels // group
    out = torch.empty(geo.pixels, group, depth, dtype=dtype, device=input.device)
    if geo.pixels > 0:
        table = _table(input, geo, dtype)
        shifts = _displacements(offset, geo, taps, offset_scale, dtype)
        masks = _masks(mask, dtype)  # (pixels·G·P,)
        step = chunk_pixels(geo.pixels, points * geo.channels, 2, table)
        for start in range(0, geo.pixels, step):
            stop = min(geo.pixels, start + step)
            first, last = start * group * points, stop * group * points
            chunk = Samples(table, shifts[start:stop], masks[first:last], geo, start,
                            taps=coords, groups_first=True, strict=True)  # fmt: skip
            bags = chunk.columns(bag=points)
            out[start:stop] = bags.view(-1, group, depth)
    return out.view(*input.shape[:1], *geo.out_size, geo.channels).to(input.dtype)


def backward(grad_output, input, offset, mask, kernel, stride, padding, dilation, group,
             offset_scale, remove_center, needs_grad):  # fmt: skip
    """Gradients for (input, offset, mask); ``None`` where not requested."""
    need_input, need_offset, need_mask = needs_grad
    geo = _geometry(input, offset, kernel, stride, padding, dilation, group)
    dtype = compute_dtype(input.dtype)
    coords = point_coords(geo.kernel, remove_center)
    taps = tap_coords(geo.kernel, remove_center, input.device)
    points, depth = len(coords), geo.channels // group
    samples = geo.pixels * group * points

    def buffer(slot: str, *shape: int) -> Tensor:
        return scratch(slot, shape, dtype, input.device)

    layout = table_of(geo)
    table_grad = buffer("table_grad", layout.rows, depth).zero_() if need_input else None
    # Every entry of these two is written by its chunk.
    position_grad = buffer("position_grad", samples, 2) if need_offset else None
    mask_grad = buffer("mask_grad", samples) if need_mask else None
    if geo.pixels > 0 and any(needs_grad):
        table = _table(input, geo, dtype)
        shifts = _displacements(offset, geo, taps, offset_scale, dtype)
        masks = _masks(mask, dtype)  # (pixels·G·P,)
        grad_out = grad_output.reshape(geo.pixels * group, depth).to(dtype)
        step = chunk_pixels(geo.pixels, points * geo.channels, 3, table)
        for start in range(0, geo.pixels, step):
            stop = min(geo.pixels, start + step)
            first, last = start * group * points, stop * group * points
            bag_grads = grad_out[start * group : stop * group]
            chunk = Samples(table, shifts[start:stop], masks[first:last], geo, start,
                            taps=coords, groups_first=True, strict=True, share=points)  # fmt: skip
            positions = None if position_grad is None else position_grad[first:last]
            masks_grad = None if mask_grad is None else mask_grad[first:last]
            chunk.corner_terms(bag_grads, table_grad=table_grad, position_grad=positions,
                               mask_grad=masks_grad)  # fmt: skip
            if positions is not None:
                positions.mul_(offset_scale)

    grad_input = grad_offset = grad_mask = None  # fresh memory, never the buffers
    if table_grad is not None:
        grad_input = layout.interior(table_grad).view(geo.batch, group, *geo.size, depth)
        grad_input = fresh(grad_input.movedim(1, -2), input.dtype).view(input.shape)
    if position_grad is not None:
        grad_offset = torch.empty(position_grad.shape, dtype=offset.dtype, device=offset.device)
        grad_offset = _swapped_pairs(position_grad, grad_offset).view(offset.shape)
    if mask_grad is not None:
        grad_mask = fresh(mask_grad.view(mask.shape), mask.dtype)
    return grad_input, grad_offset, grad_mask
