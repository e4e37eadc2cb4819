"""Triton kernels of the DCNv3 / DCNv4 operator, on channels-last tensors.

The forward kernel's program owns a tile of ``BLOCK_Q`` (output pixel, group) rows, a
pixel's groups in neighbouring rows, and walks the points; for each point it loads a row's
offsets and mask once and uses them for ``BLOCK_D`` channels of the group (contiguous in
memory, so the corner loads are vector loads).  The backward kernel's program owns
``BLOCK_Q`` pixels of one group.  Offsets and mask are read through a pixel stride and a
group stride, so DCNv4's fused tensor is read in place.  Element offsets are 32-bit unless
``INDEX64``.  Samples are accumulated in float32.  A sample counts only strictly inside
``(-1, H) × (-1, W)`` (DCNv3's rule); nothing outside the input is read: the forward moves
corners outside the image onto its edge with weight 0, the backward masks them off.  The
backward kernel recomputes the samples, reduces the offset and mask gradients over the
group's channels in registers, and adds the input gradient to a float32 buffer with
atomics, or, in deterministic mode, to an int64 fixed-point buffer whose sums do not depend
on the order of the adds.
"""

import triton
import triton.language as tl

from .sampling import load_corners, scatter_bilinear


@triton.jit
def pixel_tile(tile, out_h, out_w, pixels, BLOCK_Q: tl.constexpr, INDEX64: tl.constexpr):
    """The ``BLOCK_Q`` consecutive output pixels of program ``tile``: their flat index, which
    exist, their image, row and column."""
    q = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if INDEX64:
        q = q.to(tl.int64)
    return q, q < pixels, q // (out_h * out_w), (q // out_w) % out_h, q % out_w


@triton.jit
def dcnv3_point(
    offset_ptr,
    mask_ptr,
    q,
    point,
    group,
    out_h_index,
    out_w_index,
    height,
    width,
    active,
    offset_pixel_stride,
    offset_group_stride,
    mask_pixel_stride,
    mask_group_stride,
    POINTS: tl.constexpr,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    GROUPS: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    offset_scale,
):
    """Corner ``(h0, w0)``, fractions, mask and validity of one point for a tile of pixels
    (``group`` one for all, or one per pixel), plus the point's index in a contiguous
    ``(pixels, GROUPS, POINTS)`` layout.
    Offsets and mask are read through their pixel and group strides; a point's (Δw, Δh)
    pair and mask value are contiguous along the points."""
    raw = point
    if REMOVE_CENTER:
        raw = point + tl.where(point >= (KERNEL_W // 2) * KERNEL_H + KERNEL_H // 2, 1, 0)
    i = raw // KERNEL_H  # kernel column
    j = raw % KERNEL_H  # kernel row
    sample = q * (GROUPS * POINTS) + group * POINTS + point
    pair = offset_ptr + q * offset_pixel_stride + group * offset_group_stride + 2 * point
    dw = tl.load(pair, mask=active, other=0.0).to(tl.float32)
    dh = tl.load(pair + 1, mask=active, other=0.0).to(tl.float32)
    weight = mask_ptr + q * mask_pixel_stride + group * mask_group_stride + point
    weight = tl.load(weight, mask=active, other=0.0).to(tl.float32)
    centre_h = (DIL_H * (KERNEL_H - 1)) // 2
    centre_w = (DIL_W * (KERNEL_W - 1)) // 2
    h = (out_h_index * STRIDE_H - PAD_H + centre_h).to(tl.float32)
    w = (out_w_index * STRIDE_W - PAD_W + centre_w).to(tl.float32)
    h += ((j * DIL_H - centre_h).to(tl.float32) + dh) * offset_scale
    w += ((i * DIL_W - centre_w).to(tl.float32) + dw) * offset_scale
    valid = active & (h > -1.0) & (w > -1.0) & (h < height) & (w < width)
    h = tl.where(valid, h, 0.0)
    w = tl.where(valid, w, 0.0)
    h_low = tl.floor(h)
    w_low = tl.floor(w)
    return (h_low.to(tl.int32), w_low.to(tl.int32), h - h_low, w - w_low, weight, valid,
            sample)  # fmt: skip


@triton.jit
def inner_corners(image_base, h0, w0, fh, fw, weight, row_stride, channels, height, width):
    """Element offsets of the four corners of each row's sample and their bilinear weights
    times ``weight``, for corners ``h0`` in ``[-1, H - 1]`` and ``w0`` in ``[-1, W - 1]``
    (positions inside ``(-1, H) × (-1, W)``, or 0): a corner outside the image is moved onto
    its edge and weighted 0, so every offset is inside ``image_base``'s image."""
    gh = tl.where(h0 >= 0, 1.0 - fh, 0.0) * weight
    fh = tl.where(h0 < height - 1, fh, 0.0) * weight
    gw = tl.where(w0 >= 0, 1.0 - fw, 0.0)
    fw = tl.where(w0 < width - 1, fw, 0.0)
    top = image_base + tl.maximum(h0, 0) * row_stride
    bottom = image_base + tl.minimum(h0 + 1, height - 1) * row_stride
    left = tl.maximum(w0, 0) * channels
    right = tl.minimum(w0 + 1, width - 1) * channels
    return (top + left, top + right, bottom + left, bottom + right,
            gh * gw, gh * fw, fh * gw, fh * fw)  # fmt: skip


@triton.jit
def add_corners(acc, input_ptr, d, cols, o00, o01, o10, o11, w00, w01, w10, w11,
                EVEN_D: tl.constexpr):  # fmt: skip
    """``acc`` plus each row's four corner values (channels ``d`` at element offsets
    ``o..``, all inside the input) times their weights; with ``EVEN_D`` every channel
    exists and the loads take no mask."""
    pointers = input_ptr + d[None, :]
    if EVEN_D:
        v00 = tl.load(pointers + o00[:, None])
        v01 = tl.load(pointers + o01[:, None])
        v10 = tl.load(pointers + o10[:, None])
        v11 = tl.load(pointers + o11[:, None])
    else:
        v00 = tl.load(pointers + o00[:, None], mask=cols[None, :], other=0.0)
        v01 = tl.load(pointers + o01[:, None], mask=cols[None, :], other=0.0)
        v10 = tl.load(pointers + o10[:, None], mask=cols[None, :], other=0.0)
        v11 = tl.load(pointers + o11[:, None], mask=cols[None, :], other=0.0)
    acc += v00.to(tl.float32) * w00[:, None]
    acc += v01.to(tl.float32) * w01[:, None]
    acc += v10.to(tl.float32) * w10[:, None]
    acc += v11.to(tl.float32) * w11[:, None]
    return acc


@triton.jit
def dcnv3_forward_kernel(
    input_ptr,
    offset_ptr,
    mask_ptr,
    out_ptr,
    pixels,
    height,
    width,
    out_h,
    out_w,
    offset_pixel_stride,
    offset_group_stride,
    mask_pixel_stride,
    mask_group_stride,
    offset_scale,
    DEPTH: tl.constexpr,
    POINTS: tl.constexpr,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    GROUPS: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    INDEX64: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Rows are (pixel, group) pairs: a pixel's groups share its offset and mask lines.
    rows = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    if INDEX64:
        rows = rows.to(tl.int64)
    active = rows < pixels * GROUPS
    q = rows // GROUPS
    group = rows % GROUPS
    image = tl.where(active, q // (out_h * out_w), 0)  # rows past the end read image 0
    out_h_index = (q // out_w) % out_h
    out_w_index = q % out_w
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = d < DEPTH
    channels = GROUPS * DEPTH
    row_base = image * height * width * channels + group * DEPTH  # the row's group, pixel 0
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for point in range(POINTS):
        h0, w0, fh, fw, weight, valid, _ = dcnv3_point(
            offset_ptr, mask_ptr, q, point, group, out_h_index, out_w_index, height, width,
            active, offset_pixel_stride, offset_group_stride, mask_pixel_stride,
            mask_group_stride, POINTS, KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
            DIL_H, DIL_W, GROUPS, REMOVE_CENTER, offset_scale,
        )  # fmt: skip
        o00, o01, o10, o11, w00, w01, w10, w11 = inner_corners(
            row_base, h0, w0, fh, fw, tl.where(valid, weight, 0.0), width * channels, channels,
            height, width,
        )  # fmt: skip
        acc = add_corners(acc, input_ptr, d, cols, o00, o01, o10, o11, w00, w01, w10, w11,
                          DEPTH % BLOCK_D == 0)  # fmt: skip
    out = out_ptr + (q * channels + group * DEPTH)[:, None] + d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=active[:, None] & cols[None, :])


@triton.jit
def dcnv3_backward_kernel(
    input_ptr,
    offset_ptr,
    mask_ptr,
    grad_out_ptr,
    grad_input_ptr,
    grad_offset_ptr,
    grad_mask_ptr,
    fixed_point_ptr,
    pixels,
    height,
    width,
    out_h,
    out_w,
    offset_pixel_stride,
    offset_group_stride,
    mask_pixel_stride,
    mask_group_stride,
    offset_scale,
    DEPTH: tl.constexpr,
    POINTS: tl.constexpr,
    KERNEL_H: tl.constexpr,
    KERNEL_W: tl.constexpr,
    STRIDE_H: tl.constexpr,
    STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr,
    PAD_W: tl.constexpr,
    DIL_H: tl.constexpr,
    DIL_W: tl.constexpr,
    GROUPS: tl.constexpr,
    REMOVE_CENTER: tl.constexpr,
    NEED_INPUT: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    INDEX64: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    q, active, image, out_h_index, out_w_index = pixel_tile(
        tl.program_id(0), out_h, out_w, pixels, BLOCK_Q, INDEX64
    )
    group = tl.program_id(1)
    channels = GROUPS * DEPTH
    image_base = image * height * width * channels
    row_stride = width * channels
    fixed_point_scale = 1.0
    if DETERMINISTIC:
        fixed_point_scale = tl.load(fixed_point_ptr)
    # With one block of channels, the output gradient is loaded once for all points.
    d = tl.arange(0, BLOCK_D)
    rows = grad_out_ptr + (q * channels)[:, None] + (group * DEPTH + d)[None, :]
    go_once = tl.load(rows, mask=active[:, None] & (d < DEPTH)[None, :], other=0.0)
    go_once = go_once.to(tl.float32)
    for point in range(POINTS):
        h0, w0, fh, fw, weight, valid, sample = dcnv3_point(
            offset_ptr, mask_ptr, q, point, group, out_h_index, out_w_index, height, width,
            active, offset_pixel_stride, offset_group_stride, mask_pixel_stride,
            mask_group_stride, POINTS, KERNEL_H, KERNEL_W, STRIDE_H, STRIDE_W, PAD_H, PAD_W,
            DIL_H, DIL_W, GROUPS, REMOVE_CENTER, offset_scale,
        )  # fmt: skip
        gh = 1.0 - fh
        gw = 1.0 - fw
        grad_mask = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        grad_h = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        grad_w = tl.zeros((BLOCK_Q,), dtype=tl.float32)
        for d_start in range(0, DEPTH, BLOCK_D):
            d = d_start + tl.arange(0, BLOCK_D)
            cols = d < DEPTH
            channel = group * DEPTH + d
            if DEPTH <= BLOCK_D:
                go = go_once
            else:
                rows = grad_out_ptr + (q * channels)[:, None] + channel[None, :]
                go = tl.load(rows, mask=active[:, None] & cols[None, :], other=0.0)
                go = go.to(tl.float32)
            v00, v01, v10, v11 = load_corners(input_ptr, image_base, h0, w0, channel,
                                              row_stride, channels, height, width, valid,
                                              cols)  # fmt: skip
            value = (v00 * gw[:, None] + v01 * fw[:, None]) * gh[:, None]
            value += (v10 * gw[:, None] + v11 * fw[:, None]) * fh[:, None]
            grad_mask += tl.sum(go * value, axis=1)
            d_h = (v10 - v00) * gw[:, None] + (v11 - v01) * fw[:, None]
            d_w = (v01 - v00) * gh[:, None] + (v11 - v10) * fh[:, None]
            grad_h += tl.sum(go * d_h, axis=1)
            grad_w += tl.sum(go * d_w, axis=1)
            if NEED_INPUT:
                scatter_bilinear(grad_input_ptr, image_base, h0, w0, fh, fw, channel,
                                 row_stride, channels, height, width, valid, cols,
                                 go * weight[:, None], fixed_point_scale, DETERMINISTIC,
                                 "relaxed")  # fmt: skip
        grad_mask = tl.where(valid, grad_mask, 0.0)
        scale = tl.where(valid, weight * offset_scale, 0.0)
        tl.store(grad_mask_ptr + sample, grad_mask, mask=active)
        tl.store(grad_offset_ptr + 2 * sample, grad_w * scale, mask=active)
        tl.store(grad_offset_ptr + 2 * sample + 1, grad_h * scale, mask=active)
