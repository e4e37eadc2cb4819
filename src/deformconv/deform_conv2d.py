"""Deformable convolution v1 and modulated v2: the function ``deform_conv2d`` and its layer."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._library import deform_conv2d_op
from ._utils import FLOATING_DTYPES, IntOrPair, _pair

__all__ = ["DeformConv2d", "deform_conv2d"]


def _check_arguments(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> None:
    named = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    for name, tensor in named.items():
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    for name in ("input", "offset", "weight", "mask"):
        tensor = named[name]
        if tensor is not None and tensor.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor, "
                f"got {tensor.dim()}-D with shape {tuple(tensor.shape)}"
            )
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"bias must be a 1-D tensor, got shape {tuple(bias.shape)}")
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.dtype not in FLOATING_DTYPES:
            raise TypeError(
                f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}"
            )
        if tensor.dtype != input.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype}, expected input's dtype {input.dtype}"
            )
        if tensor.device != input.device:
            raise ValueError(
                f"{name} is on {tensor.device}, expected input's device {input.device}"
            )
    for name, pair in (("stride", stride), ("dilation", dilation)):
        if min(pair) <= 0:
            raise ValueError(f"{name} must be positive, got {pair}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")

    batch, channels, height, width = input.shape
    out_channels, in_per_group, kernel_h, kernel_w = weight.shape
    taps = kernel_h * kernel_w
    if in_per_group == 0 or kernel_h == 0 or kernel_w == 0 or out_channels == 0:
        raise ValueError(
            f"weight must have no zero-size dimension, got shape {tuple(weight.shape)}"
        )
    if channels % in_per_group != 0:
        raise ValueError(
            f"input has {channels} channels, which is not a multiple of weight.shape[1] = "
            f"{in_per_group} (weight groups are inferred as input.shape[1] // weight.shape[1])"
        )
    weight_groups = channels // in_per_group
    if out_channels % weight_groups != 0:
        raise ValueError(
            f"weight has {out_channels} output channels, which is not divisible by the "
            f"{weight_groups} weight groups (input.shape[1] // weight.shape[1])"
        )
    if bias is not None and bias.shape[0] != out_channels:
        raise ValueError(
            f"bias has {bias.shape[0]} elements, expected weight.shape[0] = {out_channels}"
        )

    offset_channels = offset.shape[1]
    if offset_channels == 0 or offset_channels % (2 * taps) != 0:
        raise ValueError(
            f"offset has {offset_channels} channels, expected a positive multiple of "
            f"2 * kernel_h * kernel_w = 2 * {kernel_h} * {kernel_w} = {2 * taps}"
        )
    offset_groups = offset_channels // (2 * taps)
    if channels % offset_groups != 0:
        raise ValueError(
            f"input has {channels} channels, which is not divisible by the {offset_groups} offset "
            f"groups (offset.shape[1] // (2 * kernel_h * kernel_w) = "
            f"{offset_channels} // {2 * taps})"
        )

    out_h = (height + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"input of spatial size {(height, width)} is too small for kernel "
            f"{(kernel_h, kernel_w)} "
            f"with padding {padding} and dilation {dilation}: output size would be {(out_h, out_w)}"
        )
    for name, tensor, expected in (
        ("offset", offset, 2 * offset_groups * taps),
        ("mask", mask, offset_groups * taps),
    ):
        if tensor is None:
            continue
        expected_shape = (batch, expected, out_h, out_w)
        if tuple(tensor.shape) != expected_shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {expected_shape} "
                f"(batch, {'2 * ' if name == 'offset' else ''}offset_groups * kernel_h * kernel_w, "
                f"out_h, out_w) with {offset_groups} offset groups"
            )


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
    if isinstance(input, Tensor) and torch.is_autocast_enabled(input.device.type):
        # Under autocast the op runs in the autocast dtype, like a convolution.
        dtype = torch.get_autocast_dtype(input.device.type)
        input, offset, weight, bias, mask = (
            tensor.to(dtype)
            if isinstance(tensor, Tensor) and tensor.is_floating_point()
            else tensor
            for tensor in (input, offset, weight, bias, mask)
        )
    _check_arguments(input, offset, weight, bias, mask, stride, padding, dilation)
    if torch.onnx.is_in_onnx_export():
        from . import onnx_export

        if not torch.jit.is_tracing():  # the torch.export-based exporter
            return onnx_export.dynamo_node(
                input, offset, mask, weight, bias, stride, padding, dilation
            )
        onnx_export.register_torchscript_symbolic()
    return deform_conv2d_op(input, offset, mask, weight, bias, stride, padding, dilation)


class _DeformConvLayer(nn.Module):
    """Settings, weight and bias shared by the deformable convolution layers.

    Follows :class:`torch.nn.Conv2d`: ``ValueError`` for bad arguments, the same parameter
    shapes and initialisation, ``bias`` registered as ``None`` when absent.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair,
        padding: IntOrPair,
        dilation: IntOrPair,
        groups: int,
        bias: bool,
        offset_groups: int = 1,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_layer_arguments(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, offset_groups
        )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride = _pair(stride, "stride")
        self.padding = _pair(padding, "padding")
        self.dilation = _pair(dilation, "dilation")
        self.groups = groups
        self.offset_groups = offset_groups
        self.weight = nn.Parameter(
            torch.empty(
                out_channels, in_channels // groups, *self.kernel_size, device=device, dtype=dtype
            )
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """Initialise like :class:`torch.nn.Conv2d` (and torchvision's layer)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _deform_conv(self, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        return deform_conv2d(
            input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask
        )

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        for name, default in (("stride", (1, 1)), ("padding", (0, 0)), ("dilation", (1, 1))):
            value = getattr(self, name)
            if value != default:
                text += f", {name}={value}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.offset_groups != 1:
            text += f", offset_groups={self.offset_groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class DeformConv2d(_DeformConvLayer):
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

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
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
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._deform_conv(input, offset, mask)


def _check_layer_arguments(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrPair,
    stride: IntOrPair,
    padding: IntOrPair,
    dilation: IntOrPair,
    groups: int,
    offset_groups: int = 1,
) -> None:
    """``ValueError`` for constructor arguments that no input could make valid."""
    for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    for name, value in (("groups", groups), ("offset_groups", offset_groups)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    if in_channels % groups != 0:
        raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
    if out_channels % groups != 0:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    if in_channels % offset_groups != 0:
        raise ValueError(
            f"in_channels ({in_channels}) must be divisible by offset_groups ({offset_groups})"
        )
    for name, value, least in (
        ("kernel_size", kernel_size, 1),
        ("stride", stride, 1),
        ("dilation", dilation, 1),
        ("padding", padding, 0),
    ):
        try:
            pair = _pair(value, name)
        except TypeError as error:
            raise ValueError(str(error)) from None
        if min(pair) < least:
            raise ValueError(
                f"{name} must be {'positive' if least else 'non-negative'}, got {value}"
            )
