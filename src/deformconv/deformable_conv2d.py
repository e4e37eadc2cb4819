"""The self-contained deformable convolution layer: it predicts its own offsets (and mask)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._utils import IntOrPair
from .deform_conv2d import _DeformConvLayer

__all__ = ["DeformableConv2d"]


class DeformableConv2d(_DeformConvLayer):
    """Deformable convolution whose offsets (and, if modulated, mask) come from the input.

    A zero-initialised ``conv_offset`` (an :class:`torch.nn.Conv2d` with the layer's kernel
    size, stride, padding and dilation) predicts ``2·G·K`` offset channels, followed by
    ``G·K`` mask logits when ``modulated=True`` (mask = ``mask_scale`` · sigmoid of them), for
    ``G`` offset groups and ``K = kernel_h·kernel_w`` taps.  A fresh v1 layer therefore
    computes exactly ``F.conv2d`` with its own weight; a fresh v2 layer computes
    ``mask_scale / 2`` of it (sigmoid(0) = 0.5): half with the default ``mask_scale=1``, all of
    it with ``mask_scale=2``, which :func:`deformconv.convert_to_deformable` uses.

    Channel layout and ``state_dict`` keys (``weight``, ``bias``, ``conv_offset.weight``,
    ``conv_offset.bias``) are those of mmcv's ``DeformConv2dPack`` (v1) and
    ``ModulatedDeformConv2dPack`` (v2), so their checkpoints load with ``strict=True``
    (build the layer with ``bias=False`` for mmcv's v1 layer, which has none).

    Args:
        in_channels (int): channels of the input.
        out_channels (int): channels of the output.
        kernel_size (int or Tuple[int, int]): kernel height and width.
        stride, padding, dilation (int or Tuple[int, int]): as in :class:`torch.nn.Conv2d`.
        groups (int): weight groups. Default: 1.
        offset_groups (int): groups of input channels that share one set of offsets. Default: 1.
        bias (bool): add a learnable bias to the output. Default: True.
        modulated (bool): predict a mask too (deformable convolution v2). Default: False.
        mask_scale (float): factor on the predicted mask, whose range is then
            ``(0, mask_scale)``. Default: 1 (mmcv's mask).

    Shape:
        - input: ``(N, in_channels, H, W)``
        - output: ``(N, out_channels, Ho, Wo)``, sized as by :class:`torch.nn.Conv2d`.

    References:
        Dai et al., "Deformable Convolutional Networks", ICCV 2017.
        Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019.

    Example:
        >>> layer = DeformableConv2d(3, 8, kernel_size=3, padding=1, modulated=True)
        >>> layer(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
        mask_scale: float = 1.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            offset_groups=offset_groups,
            device=device,
            dtype=dtype,
        )
        if not modulated and mask_scale != 1.0:
            raise ValueError(f"mask_scale applies to modulated layers only, got {mask_scale}")
        self.modulated = modulated
        self.mask_scale = float(mask_scale)
        factory = {"device": device, "dtype": dtype}
        taps = self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset = nn.Conv2d(
            in_channels,
            offset_groups * taps * (3 if modulated else 2),
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
            **factory,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weight like :class:`torch.nn.Conv2d`; the offset branch to zero."""
        super().reset_parameters()
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offsets and mask (``None`` for v1) this layer applies to ``input``."""
        prediction = self.conv_offset(input)
        if not self.modulated:
            return prediction, None
        offset_channels = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
        mask = prediction[:, offset_channels:].sigmoid()
        if self.mask_scale != 1.0:
            mask = mask * self.mask_scale
        return prediction[:, :offset_channels], mask

    def forward(self, input: Tensor) -> Tensor:
        offset, mask = self.offset_and_mask(input)
        return self._deform_conv(input, offset, mask)

    def extra_repr(self) -> str:
        text = super().extra_repr() + (", modulated=True" if self.modulated else "")
        return text + (f", mask_scale={self.mask_scale:g}" if self.mask_scale != 1.0 else "")
