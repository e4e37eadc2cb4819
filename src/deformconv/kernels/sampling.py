"""Bilinear sampling helpers shared by the Triton kernels, and their adjoint: the scatter of a
gradient into the corners of its samples.

A sampling position is ``base + offset`` for one (output pixel, kernel tap, offset group).
Positions one pixel or more outside the image (or volume), and NaN or infinite ones, are
moved to ``(-2, -2)`` (``(-2, -2, -2)``), where no corner is valid, so they sample 0 and get
zero gradient.  Corners are valid inside the image only; loads of invalid corners are masked
off, so nothing outside the input is ever read.  This is the rule of the torch backend,
kernel for kernel.
"""

import triton
import triton.language as tl


@triton.jit
def sample_position(
    offset_ptr,
    offset_base,
    offset_channel,
    plane,
    base_t,
    base_y,
    base_x,
    depth,
    height,
    width,
    active,
    INDEX64: tl.constexpr,
    DIMS: tl.constexpr,
):
    """Lowest corner ``(t0, y0, x0)`` and fractions ``(ft, fy, fx)`` of a tile of positions
    (``DIMS`` 3: depth, height, width; 2: ``t0`` and ``ft`` are 0 and ``base_t``, ``depth``
    unused).

    ``offset_channel`` is the channel of the first coordinate's offset (Δd in 3-D, Δy in 2-D;
    the others follow it); ``offset_base`` the pixel's element offset in image-major
    ``offset``; ``plane`` the output plane size.  With ``INDEX64`` the corners are int64,
    ready for addresses past 2**31.
    """
    if INDEX64:
        offset_channel = offset_channel.to(tl.int64)
        base_y = base_y.to(tl.int64)
        base_x = base_x.to(tl.int64)
    if DIMS == 3:
        if INDEX64:
            base_t = base_t.to(tl.int64)
        dt = tl.load(offset_ptr + offset_base + offset_channel * plane, mask=active, other=0.0)
        dt = dt.to(tl.float32)
        offset_channel += 1
    dy = tl.load(offset_ptr + offset_base + offset_channel * plane, mask=active, other=0.0)
    dx = tl.load(offset_ptr + offset_base + (offset_channel + 1) * plane, mask=active, other=0.0)
    dy = dy.to(tl.float32)
    dx = dx.to(tl.float32)
    # The rounded position only decides which samples are far outside (or not finite).  The
    # corner comes from the offset alone, floor(base + Δ) = base + floor(Δ), so that it is
    # the corner of the exact position even where base + Δ does not round exactly.
    y = base_y.to(tl.float32) + dy
    x = base_x.to(tl.float32) + dx
    near = (y > -2.0) & (y < height + 1.0) & (x > -2.0) & (x < width + 1.0)
    if DIMS == 3:
        t = base_t.to(tl.float32) + dt
        near = near & (t > -2.0) & (t < depth + 1.0)
        dt = tl.where(near, dt, 0.0)
        dt_low = tl.floor(dt)
        t0 = tl.where(near, base_t + dt_low.to(base_t.dtype), -2)
        ft = dt - dt_low
    else:
        t0 = 0
        ft = 0.0
    dy = tl.where(near, dy, 0.0)
    dx = tl.where(near, dx, 0.0)
    dy_low = tl.floor(dy)
    dx_low = tl.floor(dx)
    y0 = tl.where(near, base_y + dy_low.to(base_y.dtype), -2)
    x0 = tl.where(near, base_x + dx_low.to(base_x.dtype), -2)
    return t0, y0, x0, ft, dy - dy_low, dx - dx_low


@triton.jit
def load_corner(
    x_ptr, image_base, yy, xx, channel_offsets, stride_h, stride_w, height, width, rows, cols
):
    """``(BLOCK_M, BLOCK_K)`` input values at rows ``yy`` and columns ``xx`` (0 outside)."""
    inside = corner_mask(yy, xx, height, width, rows)
    pointers = x_ptr + (image_base + yy * stride_h + xx * stride_w)[:, None]
    pointers += channel_offsets[None, :]
    values = tl.load(pointers, mask=inside[:, None] & cols[None, :], other=0.0)
    return values.to(tl.float32)


@triton.jit
def load_corners(
    x_ptr, image_base, y0, x0, channel_offsets, stride_h, stride_w, height, width, rows, cols
):
    """The four corners ``(y0, x0)``, ``(y0, x0 + 1)``, ``(y0 + 1, x0)``, ``(y0 + 1, x0 + 1)``
    of a tile of samples, as float32 ``(BLOCK_M, BLOCK_K)`` tiles (0 outside the image)."""
    v00 = load_corner(x_ptr, image_base, y0, x0, channel_offsets, stride_h, stride_w, height,
                      width, rows, cols)  # fmt: skip
    v01 = load_corner(x_ptr, image_base, y0, x0 + 1, channel_offsets, stride_h, stride_w,
                      height, width, rows, cols)  # fmt: skip
    v10 = load_corner(x_ptr, image_base, y0 + 1, x0, channel_offsets, stride_h, stride_w,
                      height, width, rows, cols)  # fmt: skip
    v11 = load_corner(x_ptr, image_base, y0 + 1, x0 + 1, channel_offsets, stride_h, stride_w,
                      height, width, rows, cols)  # fmt: skip
    return v00, v01, v10, v11


@triton.jit
def corner_mask(yy, xx, height, width, rows):
    """Which rows of a tile have a valid corner at ``(yy, xx)``."""
    return rows & (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)


@triton.jit
def bilinear_tile(x_ptr, image_base, y0, x0, fy, fx, scale, channel_offsets, stride_h, stride_w,
                  height, width, rows, cols):  # fmt: skip
    """``(BLOCK_M, BLOCK_K)`` bilinear samples at ``(y0 + fy, x0 + fx)``, times ``scale``."""
    v00, v01, v10, v11 = load_corners(x_ptr, image_base, y0, x0, channel_offsets, stride_h,
                                      stride_w, height, width, rows, cols)  # fmt: skip
    gy = 1.0 - fy
    gx = 1.0 - fx
    top = v00 * gx[:, None] + v01 * fx[:, None]
    bottom = v10 * gx[:, None] + v11 * fx[:, None]
    return (top * gy[:, None] + bottom * fy[:, None]) * scale[:, None]


@triton.jit
def scatter_corner(grad_ptr, image_base, yy, xx, channel_offsets, stride_h, stride_w, height,
                   width, rows, cols, values, fixed_point_scale, DETERMINISTIC: tl.constexpr,
                   ATOMIC_SEM: tl.constexpr):  # fmt: skip
    """Add ``values`` ``(BLOCK_M, BLOCK_K)`` at rows ``yy`` and columns ``xx`` (nothing
    outside the image): float32 atomic adds, or, with ``DETERMINISTIC``, int64 adds of
    ``values · fixed_point_scale``, whose sums do not depend on their order."""
    inside = corner_mask(yy, xx, height, width, rows)
    pointers = grad_ptr + (image_base + yy * stride_h + xx * stride_w)[:, None]
    pointers += channel_offsets[None, :]
    if DETERMINISTIC:
        values = (values * fixed_point_scale).to(tl.int64)
    # "relaxed" order (what the kernels pass) suffices: the adds commute and nothing reads the
    # sums before the kernel ends.
    tl.atomic_add(pointers, values, mask=inside[:, None] & cols[None, :], sem=ATOMIC_SEM)


@triton.jit
def scatter_bilinear(grad_ptr, image_base, y0, x0, fy, fx, channel_offsets, stride_h, stride_w,
                     height, width, rows, cols, values, fixed_point_scale,
                     DETERMINISTIC: tl.constexpr, ATOMIC_SEM: tl.constexpr):  # fmt: skip
    """The adjoint of :func:`bilinear_tile` (without its scale): adds ``values``
    ``(BLOCK_M, BLOCK_K)`` into the four corners of each sample, each times its bilinear
    weight."""
    gy = 1.0 - fy
    gx = 1.0 - fx
    scatter_corner(grad_ptr, image_base, y0, x0, channel_offsets, stride_h, stride_w, height,
                   width, rows, cols, values * (gy * gx)[:, None], fixed_point_scale,
                   DETERMINISTIC, ATOMIC_SEM)  # fmt: skip
    scatter_corner(grad_ptr, image_base, y0, x0 + 1, channel_offsets, stride_h, stride_w,
                   height, width, rows, cols, values * (gy * fx)[:, None], fixed_point_scale,
                   DETERMINISTIC, ATOMIC_SEM)  # fmt: skip
    scatter_corner(grad_ptr, image_base, y0 + 1, x0, channel_offsets, stride_h, stride_w,
                   height, width, rows, cols, values * (fy * gx)[:, None], fixed_point_scale,
                   DETERMINISTIC, ATOMIC_SEM)  # fmt: skip
    scatter_corner(grad_ptr, image_base, y0 + 1, x0 + 1, channel_offsets, stride_h, stride_w,
                   height, width, rows, cols, values * (fy * fx)[:, None], fixed_point_scale,
                   DETERMINISTIC, ATOMIC_SEM)  # fmt: skip
