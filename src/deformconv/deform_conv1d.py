"""1-D deformable convolution, v1 and modulated v2: ``deform_conv1d`` and its layers.

It is the 2-D op on a one-row image: the input becomes ``(N, C, 1, L)``, each tap's offset
``Δx`` gets a ``Δy`` of 0, the kernel a height of 1.  Every 2-D backend, gradient and export
path therefore serves it too, and sampling on the one row is exact linear interpolation with
the same rule: positions outside the sequence read 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .deform_conv2d import deform_conv2d

__all__ = ["DeformConv1d", "DeformableConv1d", "deform_conv1d"]


def _single(value, name: str) -> int:
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return int(value)


def _check_1d(input, offset, weight, mask, stride, padding, dilation) -> None:
    named = {"input": input, "offset": offset, "weight": weight, "mask": mask}
    for name, tensor in named.items():
        if tensor is not None and (not isinstance(tensor, Tensor) or tensor.dim() != 3):
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a 3-D tensor, got {shape}")
    taps = weight.shape[2]
    if taps == 0 or offset.shape[1] == 0 or offset.shape[1] % taps:
        raise ValueError(
            f"offset has {offset.shape[1]} channels, expected a positive multiple of the "
            f"kernel size {taps} (one Δx per tap and offset group)"
        )
    length = (input.shape[2] + 2 * padding - dilation * (taps - 1) - 1) // stride + 1
    for name, tensor, channels in (("offset", offset, offset.shape[1]), ("mask", mask,
                                   offset.shape[1])):  # fmt: skip
        if tensor is None:
            continue
        expected = (input.shape[0], channels, length)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(tensor.shape)}")


def deform_conv1d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    mask: Tensor | None = None,
) -> Tensor:
    r"""1-D deformable convolution (v1, or modulated v2 when ``mask`` is given).

    Args:
        input (Tensor[batch, in_channels, length]): input sequence.
        offset (Tensor[batch, offset_groups * kernel_size, out_length]): ``Δx`` of every tap,
            for each offset group.
        weight (Tensor[out_channels, in_channels // groups, kernel_size]): convolution weights.
        bias (Tensor[out_channels], optional): added to the output.
        stride, padding, dilation (int): as in :func:`torch.nn.functional.conv1d`.
        mask (Tensor[batch, offset_groups * kernel_size, out_length], optional): modulation.

    Returns:
        Tensor[batch, out_channels, out_length]

    Example:
        >>> x = torch.randn(2, 4, 16)
        >>> weight = torch.randn(6, 4, 3)
        >>> out = deform_conv1d(x, torch.zeros(2, 3, 16), weight, padding=1)
        >>> torch.allclose(out, torch.nn.functional.conv1d(x, weight, padding=1), atol=1e-5)
        True
    """
    stride, padding, dilation = (_single(v, n) for v, n in ((stride, "stride"),
                                 (padding, "padding"), (dilation, "dilation")))  # fmt: skip
    _check_1d(input, offset, weight, mask, stride, padding, dilation)
    # (N, G·K, L) → (N, G·K·2, 1, L) with (Δy, Δx) = (0, Δx) per tap, interleaved by a
    # constant index (no reshape, so that exporters keep the channel count static).
    taps = offset.shape[1]
    order = [i // 2 + (i % 2) * taps for i in range(2 * taps)]
    interleave = torch.tensor(order, device=offset.device)
    offset_2d = torch.cat((torch.zeros_like(offset), offset), dim=1).index_select(1, interleave)
    out = deform_conv2d(
        input.unsqueeze(2),
        offset_2d.unsqueeze(2),
        weight.unsqueeze(2),
        bias,
        stride=(1, stride),
        padding=(0, padding),
        dilation=(1, dilation),
        mask=None if mask is None else mask.unsqueeze(2),
    )
    return out.squeeze(2)


class DeformConv1d(nn.Module):
    """:func:`deform_conv1d` as a layer whose offsets (and mask) are inputs:
    ``forward(input, offset, mask=None)``.  Parameters and initialisation follow
    :class:`torch.nn.Conv1d`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels {in_channels} and out_channels {out_channels} must be divisible "
                f"by groups {groups}"
            )
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _single(kernel_size, "kernel_size")
        self.stride = _single(stride, "stride")
        self.padding = _single(padding, "padding")
        self.dilation = _single(dilation, "dilation")
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, self.kernel_size, **factory)
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise like :class:`torch.nn.Conv1d`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _deform_conv(self, input: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        return deform_conv1d(input, offset, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, mask)  # fmt: skip

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._deform_conv(input, offset, mask)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        for name, default in (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)):
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text + (", bias=False" if self.bias is None else "")


class DeformableConv1d(DeformConv1d):
    """1-D deformable convolution that predicts its own offsets (and mask): a zero-initialised
    ``conv_offset`` (:class:`torch.nn.Conv1d`) gives ``offset_groups · kernel_size`` offsets,
    then as many mask logits when ``modulated`` (mask = sigmoid), so a fresh v1 layer is
    ``F.conv1d`` and a fresh v2 layer half of it.

    >>> layer = DeformableConv1d(4, 8, kernel_size=3, padding=1, modulated=True)
    >>> layer(torch.randn(2, 4, 20)).shape
    torch.Size([2, 8, 20])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
        offset_groups: int = 1,
        bias: bool = True,
        modulated: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, device, dtype)  # fmt: skip
        if in_channels % offset_groups:
            raise ValueError(
                f"in_channels {in_channels} must be divisible by offset_groups {offset_groups}"
            )
        self.offset_groups = offset_groups
        self.modulated = modulated
        outputs = offset_groups * self.kernel_size * (2 if modulated else 1)
        self.conv_offset = nn.Conv1d(in_channels, outputs, self.kernel_size, self.stride,
                                     self.padding, self.dilation, device=device,
                                     dtype=dtype)  # fmt: skip
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor | None]:
        """The offsets and mask (``None`` for v1) this layer applies to ``input``."""
        prediction = self.conv_offset(input)
        if not self.modulated:
            return prediction, None
        split = self.offset_groups * self.kernel_size
        return prediction[:, :split], prediction[:, split:].sigmoid()

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = self.offset_and_mask(input)
        return self._deform_conv(input, offset, mask)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.offset_groups != 1:
            text += f", offset_groups={self.offset_groups}"
        return text + (", modulated=True" if self.modulated else "")
