"""Pure-PyTorch backend of the deformable convolution ops: runs on any device, in any
floating dtype, with any number of spatial axes (2-D and 3-D share every line).

Design
------
* The input is rearranged once into a channels-last *table* of rows, ``C/G`` channels
  each, one row per (image, offset group, input position), each image padded by a zero
  border (:mod:`~deformconv.backends.plan`).  A sample of one (output position, kernel tap,
  offset group) is a weighted sum of ``2**d`` table rows: four bilinear corners in 2-D,
  eight trilinear ones in 3-D, at fixed row distances from its first corner.
* A *sampling plan* holds, for every (output position, tap, offset group), the corner rows
  (int32 where they fit), their interpolation weights and the weights' per-axis factors,
  which the backward differentiates.  Corners outside the input fall on the zero
  border, and samples with no corner inside on a block of zero rows, so nothing is ever
  read out of bounds, whatever the offsets hold, and no weight needs masking.
* Forward: the weighted corners of every sample are summed into a column buffer
  ``(positions, K·C)`` by one fused gather (on the CPU a C loop compiled at run time that
  plans the samples on the way, :mod:`~deformconv.backends.native`; where that does not
  build, or on other devices, :mod:`~deformconv.backends.gather`: a sparse-dense product on
  the CPU, compiled with the plan for narrow rows, :mod:`~deformconv.backends.compiled`,
  ``embedding_bag`` elsewhere), which one batched matrix product per weight group contracts
  with the weight, writing the output in its final ``(N, O, *out_size)`` layout where that
  is as fast.
* Backward: the samples are recomputed rather than stored (in the tensor operations but for
  the sampling plan of a small call, one chunk and a plan of at most 4 MiB, which the
  forward hands to its own backward, :mod:`~deformconv.backends.handoff`).  ``grad_input``
  sums, for every table row, the weighted column gradients of the samples that reach it, in
  the samples' order (on the CPU the C loop, whose threads each own a range of rows; else
  sorted by row, :func:`~deformconv.backends.gather.scatter_corners`); ``grad_offset`` and
  ``grad_mask`` come from the dot product of every corner's row with its column gradient (in
  the same C loop, or one fused kernel); ``grad_weight`` is one more matrix product.
* Output positions are processed in chunks (in the forward whole images, or parts of one)
  whose column buffers together fit the column budget (:func:`set_column_budget`, 256 MiB by
  default); each chunk's temporaries are released before the next chunk's are made.
* float16 and bfloat16 are computed in float32 and rounded once at the end; float64 stays
  float64.

Interpolation corners outside the input count as 0; the offset derivatives are those of the
floor-based interpolation (one-sided at integer positions, as in torchvision).  Non-finite
sampling positions (NaN or infinite offsets) sample 0 and receive zero offset gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._geometry import Geometry, geometry
from .._utils import compute_dtype
from . import handoff, native
from .plan import table_of
from .samples import Samples
from .scratch import fresh, scratch

#: The default upper bound, in bytes, on the temporary column buffers of one call.
DEFAULT_COLUMN_BUDGET = 256 * 2**20
_column_budget = DEFAULT_COLUMN_BUDGET
#: On the CPU, chunks are kept near this size even when the budget allows more: smaller
#: buffers stay in cache and are reused, which is faster than one large pass.  Other devices
#: take chunks as large as the budget allows: each chunk costs a few dozen kernel launches.
_PREFERRED_CPU_CHUNK_BYTES = 16 * 2**20


def _input_table(input: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(N, C, *size)`` → the padded table of :mod:`~deformconv.backends.plan`."""
    depth = geo.channels // geo.offset_groups
    grouped = input.reshape(geo.batch, geo.offset_groups, depth, *geo.size).movedim(2, -1)
    return padded_table(grouped, geo, dtype)


def padded_table(grouped: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """The input as ``(N, G, *size, D)`` (any strides) → its padded table
    (:mod:`~deformconv.backends.plan`) in ``dtype``, in a buffer of
    :mod:`~deformconv.backends.scratch`."""
    layout = table_of(geo)
    buffer = scratch("table", (layout.rows, grouped.shape[-1]), dtype, grouped.device)
    return layout.fill(grouped, dtype, buffer)


def _groups_first(geo: Geometry) -> bool:
    """Whether the samples go in (pixel, offset group, tap) order, not (pixel, tap, offset
    group): with one weight group, where the columns' order is free, so that the offsets'
    and the mask's rearrangement is a plain transpose per image."""
    return geo.weight_groups == 1 and geo.offset_groups > 1


def _per_pixel(tensor: Tensor, geo: Geometry, trailing: int, dtype: torch.dtype) -> Tensor:
    """Offset ``(N, G·K·t, *out_size)`` → contiguous ``(positions, K, G, t)``, or
    ``(positions, G, K, t)`` (:func:`_groups_first`), in a buffer of
    :mod:`~deformconv.backends.scratch` (one for offsets, ``t > 1``, one for masks)."""
    tensor = tensor.reshape(
        geo.batch, geo.offset_groups, geo.taps, trailing, math.prod(geo.out_size)
    )
    tensor = tensor.permute(0, 4, 1, 2, 3) if _groups_first(geo) else tensor.permute(0, 4, 2, 1, 3)
    out = scratch("offsets" if trailing > 1 else "masks", tensor.shape, dtype, tensor.device)
    return out.copy_(tensor).view(geo.pixels, -1, trailing)


def _column_blocks(geo: Geometry) -> tuple[int, int]:
    """The columns of one weight group as ``(blocks, K, channels)``: one block of all its
    channels, or one block per offset group with :func:`_groups_first` (the samples' order)."""
    blocks = geo.offset_groups if _groups_first(geo) else 1
    return blocks, geo.group_in // blocks


def _weight_matrix(weight: Tensor, geo: Geometry, dtype: torch.dtype) -> Tensor:
    """``(O, C/wg, *kernel)`` → ``(wg, O/wg, K·C/wg)``, columns ordered as the samples, (block,
    tap, channel) (:func:`_column_blocks`): per output channel a transpose of (channel, tap),
    cheaper than moving outputs innermost."""
    blocks, depth = _column_blocks(geo)
    matrix = weight.reshape(geo.weight_groups, geo.group_out, blocks, depth, geo.taps)
    if geo.taps == 1:  # a view
        return matrix.view(geo.weight_groups, geo.group_out, -1).to(dtype)
    out = scratch("matrix", (geo.weight_groups, geo.group_out, geo.taps * geo.group_in), dtype,
                  weight.device)  # fmt: skip
    out.view(geo.weight_groups, geo.group_out, blocks, geo.taps, depth).copy_(
        matrix.transpose(3, 4)
    )
    return out


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


def _image_chunks(geo: Geometry, size: int):
    """Ranges of at most ``size`` output pixels (at least one), each whole images or part of
    one image: so that a chunk's outputs are one slice of the ``(N, O, positions)`` output."""
    positions = math.prod(geo.out_size)
    if size >= positions:
        images = size // positions
        for image in range(0, geo.batch, images):
            yield image * positions, min(geo.batch, image + images) * positions
        return
    for image in range(geo.batch):
        for start, stop in _chunks(positions, size):
            yield image * positions + start, image * positions + stop


#: With at least this many output channels per weight group, the forward's matrix product
#: writes the output directly (reading the columns transposed); with fewer, BLAS runs faster
#: on pixel-major operands and the product is then copied into place.
DIRECT_OUTPUTS = 64


def _contract(matrix: Tensor, cols: Tensor, out: Tensor, start: int, stop: int) -> None:
    """``out[image, group, :, position] = matrix[group] @ cols[group, pixel]`` for the pixels
    ``start:stop`` of a chunk (:func:`_image_chunks`): ``matrix`` ``(wg, O/wg, K·C/wg)``,
    ``cols`` ``(wg, pixels, K·C/wg)``, ``out`` ``(N, wg, O/wg, positions)``."""
    groups, outputs = matrix.shape[:2]
    positions = out.shape[-1]
    image, first = divmod(start, positions)
    images = max(1, (stop - start) // positions)
    pixels = (stop - start) // images
    target = out[image : image + images, ..., first : first + pixels]
    if outputs < DIRECT_OUTPUTS:
        product = scratch("product", (groups, stop - start, outputs), out.dtype, out.device)
        torch.bmm(cols, matrix.transpose(1, 2), out=product)
        target.copy_(product.view(groups, images, pixels, outputs).permute(1, 0, 3, 2))
        return
    for group in range(groups):
        columns = cols[group].view(images, pixels, -1).transpose(1, 2)
        torch.bmm(matrix[group].expand(images, -1, -1), columns, out=target[:, group])


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
    shape = (geo.batch, groups, geo.out_channels // groups, math.prod(geo.out_size))
    if dtype == input.dtype:  # the result itself
        out = torch.empty(shape, dtype=dtype, device=input.device)
    else:  # rounded into the result at the end
        out = scratch("output", shape, dtype, input.device)
    plan = None  # kept for the backward where one chunk holds every sample
    if geo.pixels > 0:
        table = _input_table(input, geo, dtype)
        offsets = _per_pixel(offset, geo, geo.dims, dtype)
        masks = None if mask is None else _per_pixel(mask, geo, 1, dtype).view(-1)
        matrix = _weight_matrix(weight, geo, dtype)
        step = chunk_pixels(geo.pixels, geo.taps * geo.channels, 2, table)
        per_pixel = geo.taps * geo.offset_groups
        for start, stop in _image_chunks(geo, step):
            chunk_masks = None if masks is None else masks[start * per_pixel : stop * per_pixel]
            samples = Samples(table, offsets[start:stop], chunk_masks, geo, start,
                              groups_first=_groups_first(geo))  # fmt: skip
            cols = samples.columns()
            _contract(matrix, _grouped(cols.view(stop - start, geo.taps, geo.channels), geo),
                      out, start, stop)  # fmt: skip
            if stop - start == geo.pixels:
                plan = samples.plan()
            del samples, cols  # before the next chunk's: one chunk's temporaries at a time
    # Keyed by the tier too: the C loops' plans hold first rows, the others' every corner's.
    handoff.keep(offset, mask, (geo, dtype, native.available(out)), plan)
    if bias is not None:
        out += bias.to(dtype).view(groups, -1, 1)
    out = out.view(geo.batch, geo.out_channels, *geo.out_size)
    return out if dtype == input.dtype else out.to(input.dtype)


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
    grad_out = scratch("grad_output", (geo.pixels, groups, out_per_group), dtype, input.device)
    grad_out.view(grad_output.movedim(1, -1).shape).copy_(grad_output.movedim(1, -1))
    grad_bias = grad_out.sum(0).view(-1).to(grad_output.dtype)

    def zeros(*shape: int) -> Tensor:
        return torch.zeros(shape, dtype=dtype, device=input.device)

    layout = table_of(geo)
    table_grad = None
    if need_input:
        table_grad = scratch("table_grad", (layout.rows, group_channels), dtype, input.device)
        table_grad.zero_()
    weight_grad = None  # (wg, O/wg, K·C/wg), from the first chunk on
    # Per sample, rearranged into the results at the end.
    position_grad = mask_grad = None  # every entry written by its chunk
    if need_offset:
        position_grad = scratch("position_grad", (geo.pixels * per_pixel, geo.dims), dtype,
                                input.device)  # fmt: skip
    if need_mask:
        mask_grad = scratch("mask_grad", (geo.pixels * per_pixel,), dtype, input.device)

    def backward_chunk(samples: Samples, start: int, stop: int, matrix: Tensor,
                       weight_grad: Tensor | None) -> Tensor | None:  # fmt: skip
        """The gradients' part from the output pixels ``start:stop``: written into
        ``table_grad``, ``mask_grad`` and ``position_grad``, added to ``weight_grad``
        (returned; allocated at the first chunk)."""
        chunk_grad = grad_out[start:stop].transpose(0, 1)
        cols = None
        if need_input or need_offset or need_mask:
            grad_cols = scratch("grad_columns", (groups, stop - start, matrix.shape[2]),
                                dtype, input.device)  # fmt: skip
            grad_cols = _ungrouped(torch.bmm(chunk_grad, matrix, out=grad_cols), geo)
            # The columns for the weight gradient come from the same plan.
            first, last = start * per_pixel, stop * per_pixel
            cols = samples.corner_terms(
                grad_cols, table_grad=table_grad,
                mask_grad=None if mask_grad is None else mask_grad[first:last],
                position_grad=None if position_grad is None else position_grad[first:last],
                with_columns=need_weight,
            )  # fmt: skip
        if need_weight:
            cols = samples.columns() if cols is None else cols
            cols = _grouped(cols.view(stop - start, geo.taps, geo.channels), geo)
            if weight_grad is None:
                weight_grad = scratch("weight_grad", (groups, out_per_group, cols.shape[2]),
                                      dtype, input.device)  # fmt: skip
                torch.bmm(chunk_grad.transpose(1, 2), cols, out=weight_grad)
            else:
                weight_grad.baddbmm_(chunk_grad.transpose(1, 2), cols)
        return weight_grad

    if geo.pixels > 0 and any((need_input, need_offset, need_mask, need_weight)):
        table = _input_table(input, geo, dtype)
        offsets = _per_pixel(offset, geo, geo.dims, dtype)
        masks = None if mask is None else _per_pixel(mask, geo, 1, dtype).view(-1)
        matrix = _weight_matrix(weight, geo, dtype)
        step = chunk_pixels(geo.pixels, geo.taps * geo.channels, 4, table)
        # The forward's plan, if it kept one (of the same kind).
        plan = handoff.offer(offset, mask, (geo, dtype, native.available(grad_out)))
        for start, stop in _chunks(geo.pixels, step):
            first, last = start * per_pixel, stop * per_pixel
            chunk_masks = None if masks is None else masks[first:last]
            chunk_plan = None if plan is None else [t[first:last] for t in plan]
            samples = Samples(table, offsets[start:stop], chunk_masks, geo, start,
                              groups_first=_groups_first(geo), plan=chunk_plan)  # fmt: skip
            weight_grad = backward_chunk(samples, start, stop, matrix, weight_grad)
            del samples  # before the next chunk's: one chunk's temporaries at a time

    # Samples (image, position, offset group, tap) → (image, offset group, tap, position).
    positions = math.prod(geo.out_size)
    if _groups_first(geo):
        sample_shape, order = (geo.batch, positions, geo.offset_groups, geo.taps), (0, 2, 3)
    else:
        sample_shape, order = (geo.batch, positions, geo.taps, geo.offset_groups), (0, 3, 2)
    grad_input = grad_offset = grad_mask = grad_weight = None
    if table_grad is not None:
        grad_input = layout.interior(table_grad).view(
            geo.batch, geo.offset_groups, *geo.size, group_channels
        )
        grad_input = fresh(grad_input.movedim(-1, 2), input.dtype).view(input.shape)
    if position_grad is not None:
        grad_offset = position_grad.view(*sample_shape, geo.dims).permute(*order, 4, 1)
        grad_offset = fresh(grad_offset, offset.dtype).view(offset.shape)
    if mask_grad is not None:
        grad_mask = mask_grad.view(sample_shape).permute(*order, 1)
        grad_mask = fresh(grad_mask, mask.dtype).view(mask.shape)
    if need_weight:
        if weight_grad is None:  # no output positions
            weight_grad = zeros(groups, out_per_group, geo.taps * geo.channels // groups)
        blocks, depth = _column_blocks(geo)  # (block, tap, channel) → (block, channel, tap)
        grad_weight = weight_grad.view(groups, out_per_group, blocks, geo.taps, depth)
        # One copy, straight into the result (a reshape first would copy once more).
        grad_weight = fresh(grad_weight.transpose(3, 4), weight.dtype).view(weight.shape)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias
