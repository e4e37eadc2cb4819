"""The self-contained deformable convolution layer: it predicts its own offsets (and mask)."""

from __future__ import annotations

from ._layers import _SelfContained
from .deform_conv2d import deform_conv2d

__all__ = ["DeformableConv2d"]


class DeformableConv2d(_SelfContained):
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
        padding_mode (str): ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as
            in :class:`torch.nn.Conv2d`; other than zeros, the input is padded so (for
            ``conv_offset`` too) and samples beyond the padded input count as 0.
            Default: ``"zeros"``.

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

    _dims = 2
    _function = staticmethod(deform_conv2d)
