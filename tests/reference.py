"""A slow float64 loop reference of deformable convolution, independent of the package.

Every sample is computed one at a time with Python-level bilinear interpolation; autograd
through it gives the reference gradients.  ``math.floor`` on a detached position makes the
offset derivative one-sided at integer positions, which is torchvision's convention.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _bilinear(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Sample ``image`` ``(C, H, W)`` at (y, x); corners outside the image count as 0."""
    height, width = image.shape[1:]
    total = image.new_zeros(image.shape[0])
    y_value, x_value = y.item(), x.item()
    if not (math.isfinite(y_value) and math.isfinite(x_value)):
        return total
    y_low, x_low = math.floor(y_value), math.floor(x_value)
    frac_y, frac_x = y - y_low, x - x_low
    for row, weight_y in ((y_low, 1 - frac_y), (y_low + 1, frac_y)):
        for col, weight_x in ((x_low, 1 - frac_x), (x_low + 1, frac_x)):
            if 0 <= row < height and 0 <= col < width:
                total = total + weight_y * weight_x * image[:, row, col]
    return total


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    batch, channels, _, _ = input.shape
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    offset_groups = offset.shape[1] // (2 * taps)
    weight_groups = channels // in_per_group
    out_h, out_w = offset.shape[2:]
    per_offset_group = channels // offset_groups

    images = []
    for n in range(batch):
        per_channel_group = []
        for g in range(offset_groups):
            image = input[n, g * per_offset_group : (g + 1) * per_offset_group]
            taps_columns = []
            for i in range(kernel_h):
                for j in range(kernel_w):
                    k = i * kernel_w + j
                    pixels = []
                    for oy in range(out_h):
                        for ox in range(out_w):
                            dy = offset[n, g * 2 * taps + 2 * k, oy, ox]
                            dx = offset[n, g * 2 * taps + 2 * k + 1, oy, ox]
                            y = oy * stride[0] - padding[0] + i * dilation[0] + dy
                            x = ox * stride[1] - padding[1] + j * dilation[1] + dx
                            value = _bilinear(image, y, x)
                            if mask is not None:
                                value = value * mask[n, g * taps + k, oy, ox]
                            pixels.append(value)
                    # (C/G, Ho·Wo) for this tap
                    taps_columns.append(torch.stack(pixels, dim=1))
            per_channel_group.append(torch.stack(taps_columns, dim=1))  # (C/G, K, L)
        images.append(torch.cat(per_channel_group, dim=0))  # (C, K, L)
    if batch == 0:
        columns = input.new_zeros(0, channels, taps, out_h * out_w)
    else:
        columns = torch.stack(images)  # (N, C, K, L)

    out_per_group = out_channels // weight_groups
    outputs = []
    for wg in range(weight_groups):
        cols = columns[:, wg * in_per_group : (wg + 1) * in_per_group]
        w = weight[wg * out_per_group : (wg + 1) * out_per_group].reshape(
            out_per_group, in_per_group, taps
        )
        outputs.append(torch.einsum("nckl,ock->nol", cols, w))
    out = torch.cat(outputs, dim=1).reshape(batch, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
