"""A float64 loop reference of DCNv3's sampling operator, from its published definition.

For output pixel (oh, ow), group g and point p (points run over the kernel column by column,
``i`` over the width outside, ``j`` over the height inside, the centre skipped when
``remove_center``), the sample lies at

    w = ow·stride_w − pad_w + c_w + (i·dil_w − c_w + Δw)·s,   c_w = dil_w·(kernel_w − 1) // 2
    h = oh·stride_h − pad_h + c_h + (j·dil_h − c_h + Δh)·s,   s = offset_scale

with (Δw, Δh) = offset[n, oh, ow, 2(gP + p) : 2(gP + p) + 2].  It counts only when
−1 < h < H and −1 < w < W; bilinear corners outside the image count as 0.  Output channel
g·D + c is the mask-weighted sum of the samples of input channel g·D + c.  Autograd through
this gives the reference gradients.
"""

from __future__ import annotations

import math


def points(kernel_h: int, kernel_w: int, remove_center: bool) -> list[tuple[int, int]]:
    """(j, i) = (row, column) of every point, in DCNv3's order."""
    order = [(j, i) for i in range(kernel_w) for j in range(kernel_h)]
    if remove_center:
        order.remove((kernel_h // 2, kernel_w // 2))
    return order


def _bilinear(image, h, w):
    """``image`` ``(H, W, D)`` at (h, w); corners outside count as 0."""
    height, width = image.shape[:2]
    total = image.new_zeros(image.shape[2])
    if not (-1 < h.item() < height and -1 < w.item() < width):
        return total
    h_low, w_low = math.floor(h.item()), math.floor(w.item())
    frac_h, frac_w = h - h_low, w - w_low
    for row, weight_h in ((h_low, 1 - frac_h), (h_low + 1, frac_h)):
        for col, weight_w in ((w_low, 1 - frac_w), (w_low + 1, frac_w)):
            if 0 <= row < height and 0 <= col < width:
                total = total + weight_h * weight_w * image[row, col]
    return total


def dcnv3_reference(input, offset, mask, kernel, stride, padding, dilation, group, offset_scale,
                    remove_center):  # fmt: skip
    batch, _, _, channels = input.shape
    _, out_h, out_w, _ = offset.shape
    depth = channels // group
    taps = points(*kernel, remove_center)
    count = len(taps)
    centre = [dilation[a] * (kernel[a] - 1) // 2 for a in range(2)]
    out = input.new_zeros(batch, out_h, out_w, channels)
    for n in range(batch):
        for oh in range(out_h):
            for ow in range(out_w):
                for g in range(group):
                    image = input[n, :, :, g * depth : (g + 1) * depth]
                    value = input.new_zeros(depth)
                    for p, (j, i) in enumerate(taps):
                        k = g * count + p
                        dw, dh = offset[n, oh, ow, 2 * k], offset[n, oh, ow, 2 * k + 1]
                        h = (oh * stride[0] - padding[0] + centre[0]
                             + (j * dilation[0] - centre[0] + dh) * offset_scale)  # fmt: skip
                        w = (ow * stride[1] - padding[1] + centre[1]
                             + (i * dilation[1] - centre[1] + dw) * offset_scale)  # fmt: skip
                        value = value + mask[n, oh, ow, k] * _bilinear(image, h, w)
                    out[n, oh, ow, g * depth : (g + 1) * depth] = value
    return out
