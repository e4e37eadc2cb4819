"""Sampling plans of the torch backends: where each sample's interpolation corners lie in a
padded, channels-last table of the input, and with what weights.

The table
---------
The input becomes a table of rows ``(rows, D)``: per (image, offset group) a *plane* that is
the input's positions padded by one zero cell on both sides of every axis, one row per
cell, planes one after the other, then a short *dead* block of zero rows.  ``D`` is the
channels per offset group.

A sample's corners are its lowest corner's row plus fixed *deltas* (``0, 1, W+2, W+3`` in
2-D), the same for every sample.  A sample that has at least one corner inside the input
has all of its corners inside its own plane, those outside on the zero border; a sample
with none (and a non-finite one) is moved to the dead block.  So no corner is ever tested
or masked one by one, nothing is read out of bounds whatever the offsets hold, and the
gradient that lands on the border or in the dead block is simply dropped.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import NamedTuple

import torch
from torch import Tensor

from .._geometry import Geometry


class Table(NamedTuple):
    """The row layout of the padded table for ``planes`` planes over an input of ``size``."""

    planes: int
    size: tuple[int, ...]

    @property
    def padded(self) -> tuple[int, ...]:
        return tuple(s + 2 for s in self.size)

    @property
    def plane_rows(self) -> int:
        return math.prod(self.padded)

    @property
    def strides(self) -> list[int]:
        """Rows between neighbouring cells along each axis."""
        return [math.prod(self.padded[axis + 1 :]) for axis in range(len(self.size))]

    @property
    def deltas(self) -> list[int]:
        """Row offsets of the ``2**d`` corners from the lowest one, first axis slowest."""
        return corner_deltas(self.strides)

    @property
    def dead(self) -> int:
        """The first row of the dead block, after the planes."""
        return self.planes * self.plane_rows

    @property
    def rows(self) -> int:
        return self.dead + self.deltas[-1] + 1

    @property
    def index_dtype(self) -> torch.dtype:
        """int32 row numbers where they fit (less memory traffic), else int64."""
        return torch.int32 if self.rows < 2**31 else torch.int64

    def fill(self, grouped: Tensor, dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
        """``(..., *size, D)`` (any strides, ``planes`` leading entries, e.g. ``(N, G)``) → the
        table, contiguous, in ``dtype``: ``out`` ``(rows, D)`` when given (any contents)."""
        if out is None:
            table = grouped.new_zeros(self.rows, grouped.shape[-1], dtype=dtype)
        else:  # zero the border and the dead block only
            table = out
            planes = self.planes_of(table)
            for axis in range(1, len(self.size) + 1):
                planes.select(axis, 0).zero_()
                planes.select(axis, -1).zero_()
            table[self.dead :].zero_()
        self.interior(table).view(grouped.shape).copy_(grouped)
        return table

    def planes_of(self, table: Tensor) -> Tensor:
        """The planes of a table ``(rows, D)``, as ``(planes, *padded, D)``."""
        return table[: self.dead].view(self.planes, *self.padded, table.shape[-1])

    @property
    def _interior(self) -> tuple[slice, ...]:
        return (slice(None), *(slice(1, -1) for _ in self.size))

    def interior(self, table: Tensor) -> Tensor:
        """The input's cells of a table (or of its gradient): ``(planes, *size, D)``."""
        return self.planes_of(table)[self._interior]


def corner_deltas(strides) -> list[int]:
    """Row offsets of the ``2**d`` corners from the lowest one, first axis slowest, for rows
    ``strides`` apart along each axis."""
    deltas = [0]
    for stride in strides:
        deltas = [delta + step for delta in deltas for step in (0, stride)]
    return deltas


def table_of(geo: Geometry) -> Table:
    return Table(geo.batch * geo.offset_groups, tuple(geo.size))


class SamplingPlan(NamedTuple):
    """The corners of each of ``M`` samples: ``first`` ``(M,)`` the table row of the lowest
    corner (the dead block for samples that are 0), ``rows`` ``(M, 2**d)`` the rows of all
    corners, ``weights`` ``(M, 2**d)`` their interpolation weights, and ``pairs`` the factors
    of those weights, one ``(low, high)`` pair of ``(M,)`` tensors per axis."""

    first: Tensor
    rows: Tensor
    weights: Tensor
    pairs: list[tuple[Tensor, Tensor]]


def pairs_of(fractions: Tensor) -> list[tuple[Tensor, Tensor]]:
    """A plan's ``pairs`` from the fractional positions ``(M, d)``: ``(1 − f, f)`` per axis."""
    return [(1 - fraction, fraction) for fraction in fractions.unbind(1)]


def corner_weights(pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``(M, 2**d)``: each corner's interpolation weight, the product of its axes' factors."""
    return torch.stack(_per_corner(pairs), dim=-1)


def position_grads(pairs: list[tuple[Tensor, Tensor]], dots: Tensor) -> Tensor:
    """``(M, d)``: the derivatives along each axis of ``Σ_k weights[:, k] · dots[:, k]``, from
    per-corner ``dots`` ``(M, 2**d)`` (corners differing along an axis, times the other axes'
    weights)."""
    dims = len(pairs)
    grads = []
    for axis in range(dims):
        bit = 1 << (dims - 1 - axis)
        others = _per_corner([pair for a, pair in enumerate(pairs) if a != axis])
        lows = [corner for corner in range(2**dims) if not corner & bit]
        terms = [
            weight * (dots[:, low | bit] - dots[:, low])
            for weight, low in zip(others, lows, strict=True)
        ]
        grads.append(sum(terms[1:], terms[0]))
    return torch.stack(grads, dim=-1)


def _unravel(index: Tensor, sizes: tuple[int, ...]) -> list[Tensor]:
    """Row-major coordinates of flat ``index`` in an array of ``sizes``."""
    coords = []
    for size in reversed(sizes):
        coords.append(index % size)
        index = index // size
    return coords[::-1]


def _per_corner(pairs: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """Products over axes of each corner's (low, high) factors, the first axis slowest: in
    2-D the order (y0 x0, y0 x1, y1 x0, y1 x1).  No axes: the single factor 1."""
    if not pairs:
        return [1.0]
    corners = list(pairs[0])
    for low, high in pairs[1:]:
        corners = [corner * entry for corner in corners for entry in (low, high)]
    return corners


def _grid(
    geo: Geometry,
    first_pixel: int,
    pixels: int,
    taps: tuple | None,
    groups_first: bool,
    device: torch.device,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """The plan's terms that do not depend on the offsets, one entry per sample ``(M,)`` in
    the sample order: the first corner's row at zero offset and, per axis, the kernel grid's
    position; and the corners' row deltas ``(2**d,)``."""
    table = table_of(geo)
    index = table.index_dtype
    pixel = torch.arange(first_pixel, first_pixel + pixels, device=device)
    image = pixel // math.prod(geo.out_size)
    out_coords = _unravel(pixel, geo.out_size)
    if taps is None:
        tap_coords = _unravel(torch.arange(geo.taps, device=device), geo.kernel)
    else:
        tap_coords = list(torch.tensor(taps, device=device).view(-1, geo.dims).unbind(1))
    # (pixels, K) per-tap terms and (pixels, G) per-group terms, unsqueezed to broadcast.
    tap_axis, group_axis = (2, 1) if groups_first else (1, 2)
    group = torch.arange(geo.offset_groups, device=device)
    first = ((image[:, None] * geo.offset_groups + group) * table.plane_rows).unsqueeze(tap_axis)
    bases = []
    for axis, (out, tap) in enumerate(zip(out_coords, tap_coords, strict=True)):
        base = out[:, None] * geo.stride[axis] - geo.padding[axis] + tap * geo.dilation[axis]
        base = base.unsqueeze(group_axis)
        first = first + (base + 1) * table.strides[axis]
        bases.append(base)
    bases = [base.expand(first.shape).reshape(-1).to(index) for base in bases]
    deltas = torch.tensor(table.deltas, dtype=index, device=device)
    return first.reshape(-1).to(index), bases, deltas


#: Grids are kept, least recently used out first, up to this many bytes in all (on their
#: device); a grid larger than a quarter of it is not kept.
GRID_CACHE_BYTES = 32 * 2**20


def _nbytes(grid: tuple[Tensor, list[Tensor], Tensor]) -> int:
    first, bases, deltas = grid
    return sum(t.numel() * t.element_size() for t in (first, *bases, deltas))


class _GridCache:
    """:func:`_grid` by its arguments: a call of the same geometry and chunk (every step of
    a training loop) reuses its grid instead of recomputing it."""

    def __init__(self) -> None:
        self._grids: OrderedDict[tuple, tuple] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __call__(self, *key):
        with self._lock:
            grid = self._grids.get(key)
            if grid is not None:
                self._grids.move_to_end(key)
                return grid
        grid = _grid(*key)
        size = _nbytes(grid)
        if size <= GRID_CACHE_BYTES // 4:
            with self._lock:
                if key not in self._grids:
                    self._grids[key] = grid
                    self._bytes += size
                while self._bytes > GRID_CACHE_BYTES:
                    self._bytes -= _nbytes(self._grids.popitem(last=False)[1])
        return grid

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._grids)

    def clear(self) -> None:
        with self._lock:
            self._grids.clear()
            self._bytes = 0


_grid_cache = _GridCache()


class Grid(NamedTuple):
    """What a plan needs besides the offsets: the offset-independent terms of :func:`_grid`
    and the table's constants, per axis where it says so."""

    first: Tensor
    bases: list[Tensor]
    deltas: Tensor
    sizes: tuple[int, ...]
    reaches: tuple[float, ...]
    strides: tuple[int, ...]
    dead: int


def grid_of(
    geo: Geometry,
    first_pixel: int,
    pixels: int,
    device: torch.device,
    *,
    taps: tuple[tuple[int, ...], ...] | None = None,
    groups_first: bool = False,
) -> Grid:
    """The :class:`Grid` of ``pixels`` output pixels from ``first_pixel``: their samples in
    (pixel, tap, offset group) order, or (pixel, offset group, tap) with ``groups_first``.
    ``taps`` lists the kernel coordinates of the ``K`` taps (default: every tap of
    ``geo.kernel``, row-major)."""
    table = table_of(geo)
    first, bases, deltas = _grid_cache(geo, first_pixel, pixels, taps, groups_first, device)
    # Beyond ``reach`` no sample has a corner inside (see plan_from_grid).
    axes = zip(geo.size, geo.padding, geo.out_size, geo.stride, geo.kernel, geo.dilation,
               strict=True)  # fmt: skip
    reaches = tuple(
        float(size + pad + (out - 1) * stride + (kernel - 1) * dil + 2)
        for size, pad, out, stride, kernel, dil in axes
    )
    return Grid(first, bases, deltas, tuple(geo.size), reaches, tuple(table.strides), table.dead)


def plan_from_grid(offsets: Tensor, grid: Grid, strict: bool = False) -> SamplingPlan:
    """Plan the samples of a :class:`Grid` (:func:`grid_of`) at ``offsets`` ``(M, d)``, one
    row per sample in the grid's order, the displacement along each axis (Δy, Δx in 2-D), in
    the compute dtype.  A sample is 0 unless it has a corner inside the input; with
    ``strict``, unless its position lies strictly inside ``(−1, size)`` on every axis (DCNv3's
    rule).  Tensor operations on one entry per sample only, whose constants may be numbers or
    0-d tensors (the deltas a tensor or a tuple of 0-d tensors), so that it can also be
    compiled (:mod:`~deformconv.backends.compiled`)."""
    first = grid.first
    near = None
    pairs = []
    for axis, base in enumerate(grid.bases):
        size, reach = grid.sizes[axis], grid.reaches[axis]
        # Clamping at ``reach`` keeps every integer below small, and NaN goes there too.  The
        # corner comes from the offset alone, floor(base + Δ) = base + floor(Δ), exact even
        # where base + Δ would round.
        shift = offsets[..., axis]
        shift = torch.where(shift.isnan(), reach, shift).clamp_(-reach, reach)
        whole = shift.floor()
        frac = shift - whole
        whole = whole.to(first.dtype)
        low = base + whole
        inside = (low >= -1) & (low < size)
        if strict:  # the position low + frac must be > -1
            inside &= (low >= 0) | (frac > 0)
        if near is None:
            near = inside
        else:
            near &= inside
        first = first + whole * grid.strides[axis]
        pairs.append((1 - frac, frac))

    first = first.masked_fill_(near.logical_not_(), grid.dead)
    if isinstance(grid.deltas, Tensor):
        rows = first[:, None] + grid.deltas
    else:
        rows = torch.stack([first + delta for delta in grid.deltas], dim=1)
    return SamplingPlan(first, rows, corner_weights(pairs), pairs)
