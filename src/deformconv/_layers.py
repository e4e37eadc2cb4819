"""The layer machinery shared by the 1-D, 2-D and 3-D deformable convolution layers.

A layer class names its number of spatial axes (``_dims``) and its function (``_function``);
everything else (argument checks, parameters, initialisation, the offset branch, ``repr``)
is written once here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import NotScriptable, _ntuple

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
#: As in :class:`torch.nn.Conv2d`: how the input is padded.  Other than "zeros", the layer
#: pads the input so (``F.pad``) and samples it with no further padding; samples beyond that
#: padded input count as 0.
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_layer_arguments(
    dims: int,
    in_channels: int,
    out_channels: int,
    groups: int,
    offset_groups: int,
    sizes: dict[str, object],
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
    for name, value in sizes.items():
        try:
            values = _ntuple(value, name, dims)
        except TypeError as error:
            raise ValueError(str(error)) from None
        least = 0 if name == "padding" else 1
        if min(values) < least:
            raise ValueError(
                f"{name} must be {'positive' if least else 'non-negative'}, got {value}"
            )


class _DeformConvLayer(NotScriptable, nn.Module):
    """Settings, weight and bias of a deformable convolution layer with ``_dims`` axes.

    Follows :class:`torch.nn.Conv2d` and its siblings: ``ValueError`` for bad arguments, the
    same parameter shapes and initialisation, ``bias`` registered as ``None`` when absent.
    """

    _dims: ClassVar[int]
    _function: ClassVar[Callable[..., Tensor]]

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride,
        padding,
        dilation,
        groups: int,
        bias: bool,
        offset_groups: int = 1,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dims = self._dims
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        sizes = {"kernel_size": kernel_size, "stride": stride, "dilation": dilation,
                 "padding": padding}  # fmt: skip
        _check_layer_arguments(dims, in_channels, out_channels, groups, offset_groups, sizes)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _ntuple(kernel_size, "kernel_size", dims)
        self.stride = _ntuple(stride, "stride", dims)
        self.padding = _ntuple(padding, "padding", dims)
        self.dilation = _ntuple(dilation, "dilation", dims)
        self.groups = groups
        self.offset_groups = offset_groups
        self.padding_mode = padding_mode
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)

    @property
    def taps(self) -> int:
        """Kernel taps: the product of the kernel sizes."""
        return math.prod(self.kernel_size)

    def reset_parameters(self) -> None:
        """Initialise like :class:`torch.nn.Conv2d` (and torchvision's layer)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _padded(self, input: Tensor) -> Tensor:
        """``input`` padded as ``padding_mode`` says, where that is not zeros (which the
        sampling applies itself)."""
        if self.padding_mode == "zeros":
            return input
        pads = [p for p in reversed(self.padding) for _ in range(2)]
        return F.pad(input, pads, mode=self.padding_mode)

    def _deform_conv(self, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        """The deformable convolution of ``input`` as padded by :meth:`_padded`."""
        padding = self.padding if self.padding_mode == "zeros" else (0,) * self._dims
        return type(self)._function(
            input, offset, self.weight, self.bias, self.stride, padding, self.dilation, mask
        )

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        for name, default in (("stride", 1), ("padding", 0), ("dilation", 1)):
            value = getattr(self, name)
            if value != (default,) * self._dims:
                text += f", {name}={value}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.offset_groups != 1:
            text += f", offset_groups={self.offset_groups}"
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        if self.bias is None:
            text += ", bias=False"
        return text


class _OffsetsAsInput(_DeformConvLayer):
    """A layer whose offsets (and mask) are inputs: ``forward(input, offset, mask=None)``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode=padding_mode, device=device,
                         dtype=dtype)  # fmt: skip
        self.reset_parameters()

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._deform_conv(self._padded(input), offset, mask)


class _SelfContained(_DeformConvLayer):
    """A layer that predicts its own offsets (and mask) with a zero-initialised convolution
    ``conv_offset`` of the layer's kernel size, stride, padding, dilation and padding mode:
    ``d·G·K`` offset channels, then ``G·K`` mask logits when modulated (mask =
    ``mask_scale`` · sigmoid)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
        mask_scale: float = 1.0,
        padding_mode: str = "zeros",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, offset_groups=offset_groups, padding_mode=padding_mode,
                         device=device, dtype=dtype)  # fmt: skip
        if not modulated and mask_scale != 1.0:
            raise ValueError(f"mask_scale applies to modulated layers only, got {mask_scale}")
        self.modulated = modulated
        self.mask_scale = float(mask_scale)
        per_tap = self._dims + (1 if modulated else 0)
        self.conv_offset = _CONV[self._dims](
            in_channels,
            offset_groups * self.taps * per_tap,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
            padding_mode=padding_mode,
            device=device,
            dtype=dtype,
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
        offset_channels = self._dims * self.offset_groups * self.taps
        mask = prediction[:, offset_channels:].sigmoid()
        if self.mask_scale != 1.0:
            mask = mask * self.mask_scale
        return prediction[:, :offset_channels], mask

    def forward(self, input: Tensor) -> Tensor:
        offset, mask = self.offset_and_mask(input)
        return self._deform_conv(self._padded(input), offset, mask)

    def extra_repr(self) -> str:
        text = super().extra_repr() + (", modulated=True" if self.modulated else "")
        return text + (f", mask_scale={self.mask_scale:g}" if self.mask_scale != 1.0 else "")
