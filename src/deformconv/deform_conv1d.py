"""1-D deformable convolution, v1 and modulated v2: ``deform_conv1d`` and its layers.

It is the 2-D op on a one-row image: the input becomes ``(N, C, 1, L)``, each tap's offset
``Δx`` gets a ``Δy`` of 0, the kernel a height of 1.  Every 2-D backend, gradient and export
path therefore serves it too, and sampling on the one row is exact linear interpolation with
the same rule: positions outside the sequence read 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._layers import _OffsetsAsInput, _SelfContained
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


class DeformConv1d(_OffsetsAsInput):
    """:func:`deform_conv1d` as a layer whose offsets (and mask) are inputs:
    ``forward(input, offset, mask=None)``.  Parameters and initialisation follow
    :class:`torch.nn.Conv1d`; sizes are kept as 1-tuples, as there.

    >>> layer = DeformConv1d(4, 8, kernel_size=3, padding=1)
    >>> layer(torch.randn(2, 4, 20), torch.zeros(2, 3, 20)).shape
    torch.Size([2, 8, 20])
    """

    _dims = 1
    _function = staticmethod(deform_conv1d)


class DeformableConv1d(_SelfContained):
    """1-D deformable convolution that predicts its own offsets (and mask): a zero-initialised
    ``conv_offset`` (:class:`torch.nn.Conv1d`) gives ``offset_groups · kernel_size`` offsets,
    then as many mask logits when ``modulated`` (mask = ``mask_scale`` · sigmoid), so a fresh
    v1 layer is ``F.conv1d`` and a fresh v2 layer ``mask_scale / 2`` of it.

    >>> layer = DeformableConv1d(4, 8, kernel_size=3, padding=1, modulated=True)
    >>> layer(torch.randn(2, 4, 20)).shape
    torch.Size([2, 8, 20])
    """

    _dims = 1
    _function = staticmethod(deform_conv1d)
