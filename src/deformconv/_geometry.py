"""The sizes of one deformable convolution, shared by the backends and the kernels."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Geometry(NamedTuple):
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    out_h: int
    out_w: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    weight_groups: int
    offset_groups: int

    @property
    def taps(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def pixels(self) -> int:
        return self.batch * self.out_h * self.out_w

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

    def tap_major_weight(self, weight: Tensor) -> Tensor:
        """``weight`` ``(O, C/wg, kh, kw)`` viewed as ``(wg, K, C/wg, O/wg)``: per weight group,
        a matrix whose rows run over (tap, input channel) and columns over outputs."""
        matrix = weight.reshape(self.weight_groups, self.group_out, self.group_in, self.taps)
        return matrix.permute(0, 3, 2, 1)

    def conv_args(self) -> tuple[int, ...]:
        """Stride, padding and dilation, flat: (sh, sw, ph, pw, dh, dw)."""
        return (*self.stride, *self.padding, *self.dilation)


def geometry(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Geometry:
    batch, channels, height, width = input.shape
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    return Geometry(
        batch=batch,
        channels=channels,
        height=height,
        width=width,
        out_channels=out_channels,
        kernel_h=kernel_h,
        kernel_w=kernel_w,
        out_h=offset.shape[2],
        out_w=offset.shape[3],
        stride=stride,
        padding=padding,
        dilation=dilation,
        weight_groups=channels // in_per_group,
        offset_groups=offset.shape[1] // (2 * kernel_h * kernel_w),
    )
