"""Triton kernels of ``deform_conv2d`` and ``deform_conv3d``: implicit GEMM, no column buffer
in memory.

The constant ``DIMS`` is 2 or 3.  In 3-D a pixel has a depth too and a sample is trilinear:
the bilinear samples of its two planes, weighted by the fractional depth; everything written
for the depth axis is compiled out of the 2-D launches.

Notation: ``M = N·Ho·Wo`` (``N·Do·Ho·Wo``) output pixels, ``K = kh·kw`` (``kd·kh·kw``) taps,
``gi = C / groups`` input and ``go = O / groups`` output channels per weight group,
``ogi = C / offset_groups`` channels per offset group.  The weight is rearranged to
``(groups, K, gi, go)``.  Input and input gradient are addressed through their strides, so
NCHW and channels-last both run without a copy.

* Forward: a program owns a tile of output pixels × output channels of one weight group.
  For every tap and every offset group that meets the weight group, it computes the sampling
  positions once, gathers bilinear samples for blocks of input channels into registers
  (modulation applied) and contracts them with the weight tile on tensor cores
  (fp16/bf16 operands, fp32 accumulation); bias is added at the end.
* Backward, data: a program owns a tile of output pixels for one tap and one offset group.
  It forms the column gradient ``grad_out · Wᵀ`` per channel block on tensor cores, reduces
  it against the recomputed corner values into the offset and mask gradients (complete in
  the program, no atomics), and scatters it into the input gradient with atomic adds: fp32
  adds, or, in deterministic mode, int64 fixed-point adds whose sum does not depend on order.
* Backward, weight: a program owns a (tap, input-channel block, output-channel block) tile
  and one split of the pixels; it recomputes the samples and contracts them with
  ``grad_out``.  The splits add their sums atomically, or, in deterministic mode, write
  separate partial sums that are added afterwards in a fixed order.

float32 operands are contracted as ``PRECISION`` says: exactly (``"ieee"``), or on TF32 tensor
cores (``"tf32"``) with both operands rounded to TF32 first (:func:`_dot`).
"""

import triton
import triton.language as tl

from .sampling import bilinear_tile, load_corners, sample_position, scatter_bilinear


@triton.jit
def _wide(index, INDEX64: tl.constexpr):
    """``index`` as int64 when addresses may pass 2**31."""
    if INDEX64:
        index = index.to(tl.int64)
    return index


@triton.jit
def round_to_tf32(x):
    """float32 ``x`` rounded to the nearest TF32 value (10 mantissa bits; ties away from zero,
    as ``cvt.rna.tf32.f32``); infinities and NaN stay as they are."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation.  With ``"tf32"`` the float32 operands are
    rounded to TF32 first: the tensor cores would otherwise drop their low bits, which biases
    every product towards zero (a relative error of about 8e-4 in a product of Gaussian
    matrices, against 3e-4 rounded)."""
    if PRECISION == "tf32":
        a = round_to_tf32(a)
        b = round_to_tf32(b)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _modulation(mask_ptr, mask_base, channel_offset, rows, HAS_MASK: tl.constexpr):
    """The modulation of a tile's samples as float32, or 1 without a mask."""
    if HAS_MASK:
        scale = tl.load(mask_ptr + mask_base + channel_offset, mask=rows).to(tl.float32)
    else:
        scale = tl.full(mask_base.shape, 1.0, tl.float32)
    return scale


@triton.jit
def _pixel_tile(tile, tiles_per_image, plane, out_h, out_w, BLOCK_M: tl.constexpr,
                INDEX64: tl.constexpr, DIMS: tl.constexpr):  # fmt: skip
    """Tile ``tile`` of the output pixels: an image and ``BLOCK_M`` consecutive pixels of it,
    with their coordinates (depth, row, column; the depth 0 in 2-D).

    Tiles never straddle images, so the pixels of a tile are contiguous in every NCHW tensor
    and their loads and stores coalesce.
    """
    image = _wide(tile // tiles_per_image, INDEX64)
    p = (tile % tiles_per_image) * BLOCK_M + tl.arange(0, BLOCK_M)
    if DIMS == 3:
        line = p // out_w  # (depth, row) pairs
        out_t = line // out_h
        out_y = line % out_h
    else:
        out_t = 0
        out_y = p // out_w
    return image, p < plane, p, out_t, out_y, p % out_w


@triton.jit
def _tap_base(out_t, out_y, out_x, tap, stride_d, stride_h, stride_w, pad_d, pad_h, pad_w,
              dil_d, dil_h, dil_w, KH, KW, DIMS: tl.constexpr):  # fmt: skip
    """The regular (undeformed) sampling position of kernel tap ``tap`` for a tile's pixels."""
    if DIMS == 3:
        base_t = out_t * stride_d - pad_d + (tap // (KH * KW)) * dil_d
        base_y = out_y * stride_h - pad_h + ((tap // KW) % KH) * dil_h
    else:
        base_t = 0
        base_y = out_y * stride_h - pad_h + (tap // KW) * dil_h
    base_x = out_x * stride_w - pad_w + (tap % KW) * dil_w
    return base_t, base_y, base_x


@triton.jit
def _planes(rows, t0, depth):
    """Which rows have their plane ``t0``, and their plane ``t0 + 1``, inside the volume."""
    return rows & (t0 >= 0) & (t0 < depth), rows & (t0 + 1 >= 0) & (t0 + 1 < depth)


@triton.jit
def _trilinear_tile(x_ptr, image_base, t0, y0, x0, ft, fy, fx, scale, channel_offsets,
                    stride_d, stride_h, stride_w, height, width, low, high, cols):  # fmt: skip
    """``(BLOCK_M, BLOCK_K)`` trilinear samples times ``scale``: the bilinear samples of the
    planes ``t0`` and ``t0 + 1`` (of the rows ``low`` and ``high``, :func:`_planes`),
    weighted ``1 − ft`` and ``ft``."""
    a = bilinear_tile(x_ptr, image_base + t0 * stride_d, y0, x0, fy, fx, scale * (1.0 - ft),
                      channel_offsets, stride_h, stride_w, height, width, low, cols)  # fmt: skip
    a += bilinear_tile(x_ptr, image_base + (t0 + 1) * stride_d, y0, x0, fy, fx, scale * ft,
                       channel_offsets, stride_h, stride_w, height, width, high,
                       cols)  # fmt: skip
    return a


@triton.jit
def _plane_sums(grad_col, x_ptr, image_base, y0, x0, fy, fx, channel_offsets, stride_h,
                stride_w, height, width, rows, cols):  # fmt: skip
    """Over a tile's channels, the sums of ``grad_col`` times one plane's bilinear sample and
    times its derivatives along y and x (``(BLOCK_M,)`` each, without modulation)."""
    v00, v01, v10, v11 = load_corners(x_ptr, image_base, y0, x0, channel_offsets, stride_h,
                                      stride_w, height, width, rows, cols)  # fmt: skip
    gy = (1.0 - fy)[:, None]
    gx = (1.0 - fx)[:, None]
    top = v00 * gx + v01 * fx[:, None]
    bottom = v10 * gx + v11 * fx[:, None]
    d_dy = (v10 - v00) * gx + (v11 - v01) * fx[:, None]
    d_dx = (v01 - v00) * gy + (v11 - v10) * fy[:, None]
    sample = top * gy + bottom * fy[:, None]
    return (tl.sum(grad_col * sample, axis=1), tl.sum(grad_col * d_dy, axis=1),
            tl.sum(grad_col * d_dx, axis=1))  # fmt: skip


@triton.jit
def deform_conv2d_forward_kernel(
    x_ptr,
    offset_ptr,
    mask_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    tiles_per_image,
    height,
    width,
    out_w,
    plane,
    out_channels,
    x_stride_n,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    group_in,
    group_out,
    offset_group_in,
    offset_groups,
    KH,
    KW,
    depth,
    out_h,
    x_stride_d,
    stride_d,
    pad_d,
    dil_d,
    KD,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INDEX64: tl.constexpr,
    PRECISION: tl.constexpr,
    DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    taps = KH * KW
    if DIMS == 3:
        taps = KD * KH * KW
    out_tiles = tl.cdiv(group_out, BLOCK_N)
    group = tl.program_id(1) // out_tiles
    o = (tl.program_id(1) % out_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_ok = o < group_out
    image, rows, p, out_t, out_y, out_x = _pixel_tile(
        tl.program_id(0), tiles_per_image, plane, out_h, out_w, BLOCK_M, INDEX64, DIMS
    )
    offset_base = image * (offset_groups * DIMS * taps * plane) + p
    mask_base = image * (offset_groups * taps * plane) + p
    image_base = image * x_stride_n
    k = tl.arange(0, BLOCK_K)
    c_first = group * group_in
    c_end = c_first + group_in
    w_group = w_ptr + group * (taps * group_in * group_out)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tap in range(taps):
        base_t, base_y, base_x = _tap_base(out_t, out_y, out_x, tap, stride_d, stride_h,
                                           stride_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
                                           KH, KW, DIMS)  # fmt: skip
        for og in range(c_first // offset_group_in, (c_end - 1) // offset_group_in + 1):
            t0, y0, x0, ft, fy, fx = sample_position(
                offset_ptr,
                offset_base,
                (og * taps + tap) * DIMS,
                plane,
                base_t,
                base_y,
                base_x,
                depth,
                height,
                width,
                rows,
                INDEX64,
                DIMS,
            )
            if DIMS == 3:
                low, high = _planes(rows, t0, depth)
            scale = _modulation(mask_ptr, mask_base, (og * taps + tap) * plane, rows, HAS_MASK)
            seg_lo = tl.maximum(c_first, og * offset_group_in)
            seg_hi = tl.minimum(c_end, (og + 1) * offset_group_in)
            for c0 in range(seg_lo, seg_hi, BLOCK_K):
                c = c0 + k
                cols = c < seg_hi
                channel_offsets = _wide(c, INDEX64) * x_stride_c
                if DIMS == 3:
                    a = _trilinear_tile(
                        x_ptr, image_base, t0, y0, x0, ft, fy, fx, scale, channel_offsets,
                        x_stride_d, x_stride_h, x_stride_w, height, width, low, high, cols,
                    )  # fmt: skip
                else:
                    a = bilinear_tile(
                        x_ptr, image_base, y0, x0, fy, fx, scale, channel_offsets, x_stride_h,
                        x_stride_w, height, width, rows, cols,
                    )  # fmt: skip
                w_rows = tap * group_in + (c - c_first)
                w = tl.load(
                    w_group + w_rows[:, None] * group_out + o[None, :],
                    mask=cols[:, None] & o_ok[None, :],
                    other=0.0,
                )
                acc = _dot(a.to(w.dtype), w, acc, PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + group * group_out + o, mask=o_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    channel = group * group_out + o
    out_pointers = out_ptr + (image * (out_channels * plane) + p)[:, None]
    out_pointers += _wide(channel, INDEX64)[None, :] * plane
    tl.store(out_pointers, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & o_ok[None, :])


@triton.jit
def deform_conv2d_backward_data_kernel(
    grad_out_ptr,
    x_ptr,
    offset_ptr,
    mask_ptr,
    w_ptr,
    grad_x_ptr,
    grad_offset_ptr,
    grad_mask_ptr,
    fixed_point_ptr,
    tiles_per_image,
    height,
    width,
    out_w,
    plane,
    out_channels,
    x_stride_n,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    g_stride_n,
    g_stride_c,
    g_stride_h,
    g_stride_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    group_in,
    group_out,
    offset_group_in,
    offset_groups,
    KH,
    KW,
    depth,
    out_h,
    x_stride_d,
    g_stride_d,
    stride_d,
    pad_d,
    dil_d,
    KD,
    HAS_MASK: tl.constexpr,
    NEED_INPUT: tl.constexpr,
    NEED_OFFSET: tl.constexpr,
    NEED_MASK: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
    ATOMIC_SEM: tl.constexpr,
    INDEX64: tl.constexpr,
    PRECISION: tl.constexpr,
    DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    taps = KH * KW
    if DIMS == 3:
        taps = KD * KH * KW
    tap = tl.program_id(1)
    og = tl.program_id(2)
    image, rows, p, out_t, out_y, out_x = _pixel_tile(
        tl.program_id(0), tiles_per_image, plane, out_h, out_w, BLOCK_M, INDEX64, DIMS
    )
    offset_base = image * (offset_groups * DIMS * taps * plane) + p
    mask_base = image * (offset_groups * taps * plane) + p
    grad_out_base = image * (out_channels * plane) + p
    image_base = image * x_stride_n
    grad_image_base = image * g_stride_n
    base_t, base_y, base_x = _tap_base(out_t, out_y, out_x, tap, stride_d, stride_h, stride_w,
                                       pad_d, pad_h, pad_w, dil_d, dil_h, dil_w, KH, KW,
                                       DIMS)  # fmt: skip
    t0, y0, x0, ft, fy, fx = sample_position(
        offset_ptr,
        offset_base,
        (og * taps + tap) * DIMS,
        plane,
        base_t,
        base_y,
        base_x,
        depth,
        height,
        width,
        rows,
        INDEX64,
        DIMS,
    )
    if DIMS == 3:  # trilinear: the planes t0 and t0 + 1, weighted 1 − ft and ft
        low, high = _planes(rows, t0, depth)
    scale = _modulation(mask_ptr, mask_base, (og * taps + tap) * plane, rows, HAS_MASK)
    fixed_point_scale = 1.0
    if DETERMINISTIC:
        fixed_point_scale = tl.load(fixed_point_ptr)
    acc_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
    k = tl.arange(0, BLOCK_K)
    j = tl.arange(0, BLOCK_O)
    c_first = og * offset_group_in
    c_end = c_first + offset_group_in
    for group in range(c_first // group_in, (c_end - 1) // group_in + 1):
        seg_lo = tl.maximum(c_first, group * group_in)
        seg_hi = tl.minimum(c_end, (group + 1) * group_in)
        w_tap = w_ptr + (group * taps + tap) * (group_in * group_out)
        for c0 in range(seg_lo, seg_hi, BLOCK_K):
            c = c0 + k
            cols = c < seg_hi
            w_rows = c - group * group_in
            grad_col = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            for o0 in range(0, group_out, BLOCK_O):
                o = o0 + j
                o_ok = o < group_out
                g_out = tl.load(
                    grad_out_ptr
                    + grad_out_base[:, None]
                    + _wide(group * group_out + o, INDEX64)[None, :] * plane,
                    mask=rows[:, None] & o_ok[None, :],
                    other=0.0,
                )
                w_t = tl.load(
                    w_tap + w_rows[None, :] * group_out + o[:, None],
                    mask=o_ok[:, None] & cols[None, :],
                    other=0.0,
                )
                grad_col = _dot(g_out, w_t, grad_col, PRECISION)
            channel_offsets = _wide(c, INDEX64) * x_stride_c
            grad_channel_offsets = _wide(c, INDEX64) * g_stride_c
            if NEED_OFFSET or NEED_MASK:
                if DIMS == 3:  # per-row weights factor out of the sums over channels
                    s0, y0_sum, x0_sum = _plane_sums(
                        grad_col, x_ptr, image_base + t0 * x_stride_d, y0, x0, fy, fx,
                        channel_offsets, x_stride_h, x_stride_w, height, width, low, cols,
                    )  # fmt: skip
                    s1, y1_sum, x1_sum = _plane_sums(
                        grad_col, x_ptr, image_base + (t0 + 1) * x_stride_d, y0, x0, fy, fx,
                        channel_offsets, x_stride_h, x_stride_w, height, width, high, cols,
                    )  # fmt: skip
                    gt = 1.0 - ft
                    acc_m += s0 * gt + s1 * ft
                    acc_t += s1 - s0
                    acc_y += y0_sum * gt + y1_sum * ft
                    acc_x += x0_sum * gt + x1_sum * ft
                else:
                    sample_sum, y_sum, x_sum = _plane_sums(
                        grad_col, x_ptr, image_base, y0, x0, fy, fx, channel_offsets,
                        x_stride_h, x_stride_w, height, width, rows, cols,
                    )  # fmt: skip
                    acc_m += sample_sum
                    acc_y += y_sum
                    acc_x += x_sum
            if NEED_INPUT:
                values = grad_col * scale[:, None]
                if DIMS == 3:
                    scatter_bilinear(
                        grad_x_ptr, grad_image_base + t0 * g_stride_d, y0, x0, fy, fx,
                        grad_channel_offsets, g_stride_h, g_stride_w, height, width, low, cols,
                        values * (1.0 - ft)[:, None], fixed_point_scale, DETERMINISTIC,
                        ATOMIC_SEM,
                    )  # fmt: skip
                    scatter_bilinear(
                        grad_x_ptr, grad_image_base + (t0 + 1) * g_stride_d, y0, x0, fy, fx,
                        grad_channel_offsets, g_stride_h, g_stride_w, height, width, high, cols,
                        values * ft[:, None], fixed_point_scale, DETERMINISTIC, ATOMIC_SEM,
                    )  # fmt: skip
                else:
                    scatter_bilinear(
                        grad_x_ptr, grad_image_base, y0, x0, fy, fx, grad_channel_offsets,
                        g_stride_h, g_stride_w, height, width, rows, cols, values,
                        fixed_point_scale, DETERMINISTIC, ATOMIC_SEM,
                    )  # fmt: skip
    if NEED_OFFSET:
        channel = (og * taps + tap) * DIMS
        pointers = grad_offset_ptr + offset_base + channel * plane
        out_ty = grad_offset_ptr.dtype.element_ty
        if DIMS == 3:
            tl.store(pointers, (acc_t * scale).to(out_ty), mask=rows)
            pointers += plane
        tl.store(pointers, (acc_y * scale).to(out_ty), mask=rows)
        tl.store(pointers + plane, (acc_x * scale).to(out_ty), mask=rows)
    if NEED_MASK:
        pointers = grad_mask_ptr + mask_base + (og * taps + tap) * plane
        tl.store(pointers, acc_m.to(grad_mask_ptr.dtype.element_ty), mask=rows)


@triton.jit
def deform_conv2d_backward_weight_kernel(
    grad_out_ptr,
    x_ptr,
    offset_ptr,
    mask_ptr,
    partial_ptr,
    pixel_tiles,
    tiles_per_split,
    tiles_per_image,
    height,
    width,
    out_w,
    plane,
    out_channels,
    x_stride_n,
    x_stride_c,
    x_stride_h,
    x_stride_w,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    group_in,
    group_out,
    offset_group_in,
    offset_groups,
    KH,
    KW,
    depth,
    out_h,
    x_stride_d,
    stride_d,
    pad_d,
    dil_d,
    KD,
    HAS_MASK: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    INDEX64: tl.constexpr,
    PRECISION: tl.constexpr,
    DIMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    taps = KH * KW
    if DIMS == 3:
        taps = KD * KH * KW
    out_tiles = tl.cdiv(group_out, BLOCK_N)
    in_tiles = tl.cdiv(group_in, BLOCK_K)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    o = (tile % out_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = tile // out_tiles
    c_tile = tile % in_tiles
    tile = tile // in_tiles
    tap = tile % taps
    group = tile // taps
    o_ok = o < group_out
    c_local = c_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = c_local < group_in
    c = group * group_in + c_local
    channel_offsets = _wide(c, INDEX64) * x_stride_c
    c_lo = group * group_in + c_tile * BLOCK_K
    c_hi = tl.minimum(c_lo + BLOCK_K, (group + 1) * group_in)
    og_lo = c_lo // offset_group_in
    og_hi = (c_hi - 1) // offset_group_in
    c_og = c // offset_group_in
    first = split * tiles_per_split
    last = tl.minimum(pixel_tiles, first + tiles_per_split)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for t in range(first, last):
        image, rows, p, out_t, out_y, out_x = _pixel_tile(
            t, tiles_per_image, plane, out_h, out_w, BLOCK_M, INDEX64, DIMS
        )
        offset_base = image * (offset_groups * DIMS * taps * plane) + p
        mask_base = image * (offset_groups * taps * plane) + p
        image_base = image * x_stride_n
        base_t, base_y, base_x = _tap_base(out_t, out_y, out_x, tap, stride_d, stride_h,
                                           stride_w, pad_d, pad_h, pad_w, dil_d, dil_h, dil_w,
                                           KH, KW, DIMS)  # fmt: skip
        a = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for og in range(og_lo, og_hi + 1):
            t0, y0, x0, ft, fy, fx = sample_position(
                offset_ptr,
                offset_base,
                (og * taps + tap) * DIMS,
                plane,
                base_t,
                base_y,
                base_x,
                depth,
                height,
                width,
                rows,
                INDEX64,
                DIMS,
            )
            scale = _modulation(mask_ptr, mask_base, (og * taps + tap) * plane, rows, HAS_MASK)
            if DIMS == 3:
                low, high = _planes(rows, t0, depth)
                a += _trilinear_tile(
                    x_ptr, image_base, t0, y0, x0, ft, fy, fx, scale, channel_offsets,
                    x_stride_d, x_stride_h, x_stride_w, height, width, low, high,
                    cols & (c_og == og),
                )  # fmt: skip
            else:
                a += bilinear_tile(
                    x_ptr, image_base, y0, x0, fy, fx, scale, channel_offsets, x_stride_h,
                    x_stride_w, height, width, rows, cols & (c_og == og),
                )  # fmt: skip
        g_out = tl.load(
            grad_out_ptr
            + (image * (out_channels * plane) + p)[:, None]
            + _wide(group * group_out + o, INDEX64)[None, :] * plane,
            mask=rows[:, None] & o_ok[None, :],
            other=0.0,
        )
        acc = _dot(tl.trans(a.to(g_out.dtype)), g_out, acc, PRECISION)
    pointers = ((group * taps + tap) * group_in + c_local)[:, None] * group_out + o[None, :]
    if ACCUMULATE:  # every split adds into one buffer
        tl.atomic_add(
            partial_ptr + pointers, acc, mask=cols[:, None] & o_ok[None, :], sem="relaxed"
        )
    else:  # every split writes its own partial sum, added up in a fixed order afterwards
        pointers += split * (group_in * out_channels * taps)
        tl.store(partial_ptr + pointers, acc, mask=cols[:, None] & o_ok[None, :])
