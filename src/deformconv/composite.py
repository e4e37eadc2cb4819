"""The operators as compositions of differentiable PyTorch operations.

The backends compute each operator and its first derivatives with kernels of their own.  The
functions here compute the same values with ordinary tensor operations -- one gather of the
interpolation corners' rows of channels, then matrix products that weight and sum them and
contract them with the weights -- so that autograd can differentiate them again, in reverse
and in forward mode, and :mod:`torch.func` can transform them.  The library runs them for
what the kernels do not provide:

- derivatives along the offsets: the backward ops' own backward (``create_graph=True``,
  double backward) and forward-mode AD take them from here, and all of the backward's
  derivatives where it is differentiated once more (:func:`second_order`);
- stacked differentiating transforms (``grad`` of ``grad``, ``jvp`` of ``grad``,
  ``torch.func.hessian``) and transforms under ``torch.compile``
  (:func:`deformconv._transforms.route`);
- ONNX export of the operators ONNX has no node for (3-D, DCNv3, DCNv4): they export as
  standard operators (Gather, Floor, Where, MatMul).

They hold the corners of every sample at once, ``2^d·N·C·K·Ho·Wo`` values in ``d``
dimensions (the backends hold none), and compute half precision in float32.

>>> import torch
>>> from deformconv import deform_conv2d
>>> x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
>>> offset = torch.randn(1, 18, 5, 5, dtype=torch.float64)
>>> weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
>>> torch.allclose(deform_conv(x, offset, None, weight, None, (1, 1), (1, 1), (1, 1)),
...                deform_conv2d(x, offset, weight, padding=1))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._utils import compute_dtype
from .backends.pytorch_dcnv3 import point_coords


def gradients(function, primals: Sequence[Tensor], cotangent: Tensor,
              needed: Sequence[bool]) -> tuple:  # fmt: skip
    """The backward of ``function`` at ``primals`` for ``cotangent``: the gradients of the
    ``needed`` primals, in their order."""
    _, pullback = torch.func.vjp(function, *primals)
    return tuple(g for g, need in zip(pullback(cotangent), needed, strict=True) if need)


def second_order(
    function,
    primals: Sequence[Tensor],
    cotangent: Tensor,
    needed: Sequence[bool],
    outer: Sequence[Tensor | None],
) -> tuple:
    """Derivatives of a backward pass: the backward of ``function`` maps ``(cotangent,
    *primals)`` to the gradients of the ``needed`` primals (:func:`gradients`); this is its
    vector-Jacobian product with ``outer`` (one per primal, read where needed; ``None`` for
    zero), one result for ``cotangent`` and each primal.  It stays differentiable where
    autograd records."""

    def backward(cotangent, *primals):
        return gradients(function, primals, cotangent, needed)

    grads, pullback = torch.func.vjp(backward, cotangent, *primals)
    outer = [o for o, need in zip(outer, needed, strict=True) if need]
    return pullback(tuple(torch.zeros_like(g) if o is None else o
                          for g, o in zip(grads, outer, strict=True)))  # fmt: skip


def interpolate(table: Tensor, bases: Sequence[Tensor], shifts: Sequence[Tensor],
                sizes: Sequence[int], strict: bool = False, scale: Tensor | None = None,
                sums: int = 1) -> Tensor:  # fmt: skip
    """Samples of ``table`` ``(B, prod(sizes), C)`` (a grid of ``sizes``, row-major, ``C``
    channels a point) at the positions ``base + shift``, one ``(B, Q)`` tensor of each per
    axis (``bases`` integer-valued), each times ``scale`` ``(B, Q)`` if given, and summed
    over runs of ``sums`` consecutive samples: ``(B, Q / sums, C)``.

    Linear interpolation along every axis, corners outside the grid counting as 0.  A sample
    counts where its lower corner lies in ``[−1, size)`` on every axis (torchvision's rule:
    at −1 the value is 0 but the gradient of the position is not) or, with ``strict``, where
    its position lies strictly inside ``(−1, size)`` (DCNv3's); elsewhere, and where a shift
    is not finite, it is 0 with zero gradients.  The lower corner is ``base + floor(shift)``,
    exact where ``base + shift`` would round.  All corners are one gather of whole rows of
    ``C`` channels, and each result one weighted sum of its rows (a matrix product).
    """
    lows, fractions, inside = [], [], None
    for base, shift, size in zip(bases, shifts, sizes, strict=True):
        whole = shift.floor()
        low, fraction = base + whole, shift - whole
        counts = (low >= -1) & (low < size)  # False for NaN
        if strict:
            counts = counts & ((low >= 0) | (fraction > 0))
        inside = counts if inside is None else inside & counts
        lows.append(low)
        fractions.append(fraction)
    # Samples that do not count move to -2, whose corners all lie outside, with a zero
    # fraction: no NaN or infinity reaches the arithmetic, nor any gradient.
    lows = [torch.where(inside, low, -2.0) for low in lows]
    fractions = [torch.where(inside, f, 0.0) for f in fractions]
    batch, points, channels = table.shape
    first = (torch.arange(batch, device=table.device) * points)[:, None]  # each table's row 0
    indices, weights = [], []
    # The corners (0, 0), (0, 1), (1, 0), (1, 1) in 2-D (not itertools.product, which
    # torch.compile of PyTorch 2.6 cannot trace).
    dims = len(sizes)
    corners = [[code >> (dims - 1 - axis) & 1 for axis in range(dims)] for code in range(2**dims)]
    for corner in corners:
        index, weight, valid = first, None, inside
        for axis, (low, fraction, size, upper) in enumerate(
            zip(lows, fractions, sizes, corner, strict=True)
        ):
            factor = fraction if upper else 1 - fraction
            coordinate = low + upper
            valid = valid & (coordinate >= 0) & (coordinate < size)
            stride = math.prod(sizes[axis + 1 :])
            index = index + coordinate.clamp(0, size - 1).long() * stride
            weight = factor if weight is None else weight * factor
        indices.append(index)
        weights.append(torch.where(valid, weight, 0.0))
    weight = torch.stack(weights, -1)  # (B, Q, corners)
    if scale is not None:
        weight = weight * scale.unsqueeze(-1)
    results, rows = inside.shape[1] // sums, sums * len(weights)
    index = torch.stack(indices, -1).reshape(-1)
    values = table.reshape(-1, channels).index_select(0, index)
    values = values.reshape(batch, results, rows, channels)
    return torch.matmul(weight.reshape(batch, results, 1, rows), values).squeeze(2)


def _coordinates(sizes: Sequence[int], device: torch.device) -> list[Tensor]:
    """Coordinates per axis of the points of a grid of ``sizes``, row-major."""
    axes = torch.meshgrid(*[torch.arange(size, device=device) for size in sizes], indexing="ij")
    return [axis.reshape(-1) for axis in axes]


def _grid(out_size: Sequence[int], kernel: Sequence[int], stride, padding, dilation,
          like: Tensor) -> list[Tensor]:  # fmt: skip
    """Regular sampling positions per axis, ``(K, L)``: taps row-major, pixels row-major."""
    taps = _coordinates(kernel, like.device)
    pixels = _coordinates(out_size, like.device)
    return [
        (pixels[a] * stride[a] - padding[a]).to(like.dtype)[None, :]
        + (taps[a] * dilation[a]).to(like.dtype)[:, None]
        for a in range(len(kernel))
    ]


def deform_conv(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor,
                bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tensor:  # fmt: skip
    """``deformconv::deform_conv2d`` / ``deform_conv3d`` (arguments in the op's order)."""
    dims = input.dim() - 2
    batch, channels, *sizes = input.shape
    out_size = tuple(offset.shape[2:])
    out_channels, group_channels, *kernel = weight.shape
    taps, pixels = math.prod(kernel), math.prod(out_size)
    samples = taps * pixels
    offset_groups = offset.shape[1] // (dims * taps)
    groups = channels // group_channels
    dtype = compute_dtype(input.dtype)
    with torch.autocast(input.device.type, enabled=False):
        deltas = offset.to(dtype).reshape(batch, offset_groups, taps, dims, pixels)
        # Samples in (pixel, tap) order: a pixel's taps and channels are one row of the
        # matrix product with the weights.
        grid = [base.t() for base in _grid(out_size, kernel, stride, padding, dilation, deltas)]
        shifts = [deltas[:, :, :, a].transpose(2, 3).reshape(batch * offset_groups, samples)
                  for a in range(dims)]  # fmt: skip
        per_group = channels // offset_groups
        table = input.to(dtype).reshape(batch * offset_groups, per_group, math.prod(sizes))
        table = table.transpose(1, 2)  # a row of channels per point
        scale = None
        if mask is not None:
            scale = mask.to(dtype).reshape(batch, offset_groups, taps, pixels).transpose(2, 3)
            scale = scale.reshape(batch * offset_groups, samples)
        columns = interpolate(table, [base.reshape(-1) for base in grid], shifts, sizes,
                              scale=scale)  # fmt: skip
        # (batch, G, pixels, taps, C/G) → (groups, batch·pixels, taps·gc)
        columns = columns.reshape(batch, offset_groups, pixels, taps, per_group)
        columns = columns.permute(0, 2, 3, 1, 4).reshape(batch, pixels, taps, groups,
                                                         group_channels)  # fmt: skip
        columns = columns.permute(3, 0, 1, 2, 4).reshape(groups, batch * pixels,
                                                         taps * group_channels)  # fmt: skip
        weights = weight.to(dtype).reshape(groups, out_channels // groups, group_channels, taps)
        weights = weights.permute(0, 3, 2, 1).reshape(groups, taps * group_channels, -1)
        output = torch.bmm(columns, weights).reshape(groups, batch, pixels, out_channels // groups)
        output = output.permute(1, 0, 3, 2)
        output = output.reshape(batch, out_channels, *out_size)
        if bias is not None:
            output = output + bias.to(dtype).reshape(out_channels, *[1] * dims)
    return output.to(input.dtype)


def dcnv3(input: Tensor, offset: Tensor, mask: Tensor, kernel_size: Sequence[int],
          stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], group: int,
          offset_scale: float, remove_center: bool) -> Tensor:  # fmt: skip
    """``deformconv::dcnv3``: ``input`` ``(N, H, W, C)``, ``offset`` ``(N, Ho, Wo, G, 2P)``
    with (Δw, Δh) pairs, ``mask`` ``(N, Ho, Wo, G, P)``; ``(N, Ho, Wo, C)``."""
    batch, height, width, channels = input.shape
    out_size = tuple(offset.shape[1:3])
    coords = point_coords(tuple(kernel_size), remove_center)
    points = len(coords)
    dtype = compute_dtype(input.dtype)
    depth = channels // group
    if batch:  # -1 in the reshapes keeps the pixel counts dynamic in ONNX exports
        pixels = cells = samples_per_row = -1
    else:  # an empty batch needs them spelled out
        pixels, cells = out_size[0] * out_size[1], height * width
        samples_per_row = points * pixels
    with torch.autocast(input.device.type, enabled=False):
        # Samples in (pixel, point) order: each pixel's points are one weighted sum.
        deltas = offset.to(dtype).reshape(batch, pixels, group, points, 2).transpose(1, 2)
        taps = torch.tensor(coords, dtype=dtype, device=input.device).view(points, 2)
        bases, shifts = [], []
        for axis in (0, 1):  # height, width; the pairs are (Δw, Δh)
            centre = dilation[axis] * (kernel_size[axis] - 1) // 2
            tap = taps[:, axis] * dilation[axis]
            pixel = torch.arange(out_size[axis], device=input.device, dtype=dtype)
            pixel = pixel * stride[axis] - padding[axis]
            pixel = (pixel[:, None] if axis == 0 else pixel[None, :]).expand(out_size)
            bases.append((pixel.reshape(-1, 1) + tap).reshape(-1))
            shift = (centre - tap) * (1 - offset_scale) + deltas[..., 1 - axis] * offset_scale
            shifts.append(shift.reshape(batch * group, samples_per_row))
        table = input.to(dtype).reshape(batch, cells, group, depth).transpose(1, 2)
        table = table.reshape(batch * group, cells, depth)
        scale = mask.to(dtype).reshape(batch, pixels, group, points).transpose(1, 2)
        output = interpolate(
            table,
            bases,
            shifts,
            (height, width),
            strict=True,
            scale=scale.reshape(batch * group, samples_per_row),
            sums=points,
        )
        output = output.reshape(batch, group, pixels, depth).transpose(1, 2)
        output = output.reshape(batch, *out_size, channels)
    return output.to(input.dtype)
