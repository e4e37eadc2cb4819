"""The sizes of one deformable convolution, shared by the backends and the kernels.

Spatial quantities are tuples with one entry per axis (depth, height, width for 3-D;
height, width for 2-D), so the torch backend serves every dimensionality with one code
path.  The ``height``/``width``/``kernel_h``... accessors name the last two axes, which the
Triton kernels take apart from depth.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from torch import Tensor


class Geometry(NamedTuple):
    batch: int
    channels: int
    size: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...]
    out_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    weight_groups: int
    offset_groups: int

    @property
    def dims(self) -> int:
        """Number of spatial axes."""
        return len(self.size)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def pixels(self) -> int:
        """Output positions of the whole batch."""
        return self.batch * math.prod(self.out_size)

    @property
    def group_in(self) -> int:
        """Input channels per weight group."""
        return self.channels // self.weight_groups

    @property
    def group_out(self) -> int:
        """Output channels per weight group."""
        return self.out_channels // self.weight_groups

    @property
    def offset_group_in(self) -> int:
        """Input channels per offset group."""
        return self.channels // self.offset_groups

    height = property(lambda self: self.size[-2])
    width = property(lambda self: self.size[-1])
    kernel_h = property(lambda self: self.kernel[-2])
    kernel_w = property(lambda self: self.kernel[-1])
    out_h = property(lambda self: self.out_size[-2])
    out_w = property(lambda self: self.out_size[-1])

    def tap_major_weight(self, weight: Tensor) -> Tensor:
        """``weight`` ``(O, C/wg, *kernel)`` viewed as ``(wg, K, C/wg, O/wg)``: per weight
        group, a matrix whose rows run over (tap, input channel) and columns over outputs."""
        matrix = weight.reshape(self.weight_groups, self.group_out, self.group_in, self.taps)
        return matrix.permute(0, 3, 2, 1)


def geometry(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> Geometry:
    dims = input.dim() - 2
    kernel = tuple(weight.shape[2:])
    return Geometry(
        batch=input.shape[0],
        channels=input.shape[1],
        size=tuple(input.shape[2:]),
        out_channels=weight.shape[0],
        kernel=kernel,
        out_size=tuple(offset.shape[2:]),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        weight_groups=input.shape[1] // weight.shape[1],
        offset_groups=offset.shape[1] // (dims * math.prod(kernel)),
    )
