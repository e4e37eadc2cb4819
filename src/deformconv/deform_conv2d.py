"""Deformable convolution v1 and modulated v2: the function ``deform_conv2d`` and its layer."""

from __future__ import annotations

import torch
from torch import Tensor

from . import _library
from ._checks import check_arguments
from ._layers import _OffsetsAsInput
from ._utils import IntOrPair, _pair, autocast_inputs

__all__ = ["DeformConv2d", "deform_conv2d"]


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: Tensor | None = None,
) -> Tensor:
    r"""Deformable convolution (v1), or modulated deformable convolution (v2) given a ``mask``.

    Each kernel tap of each output pixel samples the input by bilinear interpolation at its
    regular position shifted by a learned offset, optionally multiplies the sample by the
    mask, and the samples are contracted with ``weight`` as in a convolution.  The arguments
    and results match :func:`torchvision.ops.deform_conv2d`.

    For output pixel ``(oy, ox)``, tap ``(i, j)`` and offset group ``g`` the sample lies at
    ``y = oy·stride_h − pad_h + i·dilation_h + Δy`` and ``x = ox·stride_w − pad_w + j·dilation_w
    + Δx``, with ``Δy = offset[:, g·2K + 2k]`` and ``Δx = offset[:, g·2K + 2k + 1]``,
    ``k = i·kernel_w + j``, ``K = kernel_h·kernel_w``.  Bilinear corners outside the image
    count as 0.  Input channel ``c`` belongs to offset group ``c // (C / offset_groups)``.
    Non-finite offsets sample 0 and receive a zero gradient.

    Args:
        input (Tensor[batch_size, in_channels, in_height, in_width]): input tensor.
        offset (Tensor[batch_size, 2 * offset_groups * kernel_height * kernel_width, out_height,
            out_width]): sampling offsets, (Δy, Δx) per tap; ``offset_groups`` is inferred.
        weight (Tensor[out_channels, in_channels // groups, kernel_height, kernel_width]):
            convolution weights; ``groups`` is inferred as ``in_channels // weight.shape[1]``.
        bias (Tensor[out_channels], optional): bias added to the output.
        stride (int or Tuple[int, int]): distance between output pixels. Default: 1.
        padding (int or Tuple[int, int]): zero padding on both sides. Default: 0.
        dilation (int or Tuple[int, int]): spacing between kernel taps. Default: 1.
        mask (Tensor[batch_size, offset_groups * kernel_height * kernel_width, out_height,
            out_width], optional): modulation scalars, applied as given (no sigmoid).

    Returns:
        Tensor[batch_size, out_channels, out_height, out_width]: the result, in input's dtype.
        float16 and bfloat16 are computed with float32 accumulation.

    References:
        Dai et al., "Deformable Convolutional Networks", ICCV 2017.
        Zhu et al., "Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019.

    Example:
        >>> import torch
        >>> x = torch.randn(2, 4, 8, 8)
        >>> weight = torch.randn(6, 4, 3, 3)
        >>> offset = torch.zeros(2, 2 * 3 * 3, 8, 8)
        >>> out = deform_conv2d(x, offset, weight, padding=1)
        >>> out.shape
        torch.Size([2, 6, 8, 8])
        >>> torch.allclose(out, torch.nn.functional.conv2d(x, weight, padding=1), atol=1e-5)
        True
    """
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    input, offset, weight, bias, mask = autocast_inputs(input, offset, weight, bias, mask)
    check_arguments(input, offset, weight, bias, mask, stride, padding, dilation)
    if torch.onnx.is_in_onnx_export():
        from . import onnx_export

        if not torch.jit.is_tracing():  # the torch.export-based exporter
            return onnx_export.dynamo_node(
                input, offset, mask, weight, bias, stride, padding, dilation
            )
        onnx_export.register_torchscript_symbolic()  # maps the op to a DeformConv node
        return _library.deform_conv2d_op(input, offset, mask, weight, bias, stride, padding,
                                         dilation)  # fmt: skip
    return _library.deform_conv(input, offset, mask, weight, bias, stride, padding, dilation)


class DeformConv2d(_OffsetsAsInput):
    """Deformable convolution layer that takes the offsets (and mask) as inputs.

    Parameters, initialisation and ``state_dict`` keys match :class:`torchvision.ops.DeformConv2d`,
    so its checkpoints load with ``strict=True`` and give the same outputs.

    Args:
        in_channels (int): channels of the input.
        out_channels (int): channels of the output.
        kernel_size (int or Tuple[int, int]): kernel height and width.
        stride, padding, dilation (int or Tuple[int, int]): as in :class:`torch.nn.Conv2d`.
        groups (int): weight groups; both channel counts must be divisible by it. Default: 1.
        bias (bool): add a learnable bias. Default: True.
        padding_mode (str): ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``, as
            in :class:`torch.nn.Conv2d`; other than zeros, the input is padded so and samples
            beyond the padded input count as 0. Default: ``"zeros"``.

    Shape:
        - input: ``(N, in_channels, H, W)``; offset: ``(N, 2·G·kh·kw, Ho, Wo)``;
          mask: ``(N, G·kh·kw, Ho, Wo)``, for any number of offset groups ``G``.
        - output: ``(N, out_channels, Ho, Wo)``.

    Example:
        >>> layer = DeformConv2d(4, 8, kernel_size=3, padding=1)
        >>> x = torch.randn(1, 4, 10, 10)
        >>> layer(x, torch.zeros(1, 18, 10, 10)).shape
        torch.Size([1, 8, 10, 10])
    """

    _dims = 2
    _function = staticmethod(deform_conv2d)
