"""DCNv3 and DCNv4 sampling operators: ``dcnv3`` and ``dcnv4``.

DCNv3 (InternImage) is a grouped, depthwise deformable aggregation on channels-last tensors:
each group of ``group_channels`` channels samples the input at ``P`` deformed points per
output pixel and sums the samples weighted by a mask; there are no convolution weights (the
layers around it hold linear projections).  DCNv4 (FlashInternImage) is the same operator
with its offsets and mask in one fused tensor, and no softmax on the mask.

Point ``p`` of a ``kernel_h × kernel_w`` kernel runs column by column (``i`` over the width
outside, ``j`` over the height inside, as the original operators do), skipping the centre
when ``remove_center``.  Its sample lies at

    h = oh·stride_h − pad_h + c_h + (j·dilation_h − c_h + Δh)·offset_scale
    w = ow·stride_w − pad_w + c_w + (i·dilation_w − c_w + Δw)·offset_scale

with ``c = dilation·(kernel − 1) // 2``.  It counts only strictly inside ``(−1, H) × (−1, W)``;
bilinear corners outside the image count as 0.  Unlike the original pure-PyTorch reference,
``padding`` is applied per axis as named (that reference swaps ``pad_h`` and ``pad_w``).
"""

from __future__ import annotations

import math

from torch import Tensor

from . import _library, _transforms
from ._checks import check_sizes, check_tensors, output_size
from ._utils import IntOrPair, _pair, autocast_inputs

__all__ = ["dcnv3", "dcnv4", "dcnv4_offset_mask_channels"]


def _points(kernel: tuple[int, int], remove_center: bool) -> int:
    if remove_center and (kernel[0] % 2 == 0 or kernel[1] % 2 == 0):
        raise ValueError(f"remove_center needs odd kernel sizes, got kernel_size {kernel}")
    if remove_center and kernel == (1, 1):
        raise ValueError("remove_center leaves no point of kernel_size (1, 1)")
    return kernel[0] * kernel[1] - int(remove_center)


def _settings(input, kernel_size, stride, padding, dilation, group, group_channels,
              remove_center):  # fmt: skip
    kernel = _pair(kernel_size, "kernel_size")
    stride = _pair(stride, "stride")
    padding = _pair(padding, "padding")
    dilation = _pair(dilation, "dilation")
    check_sizes(kernel_size=kernel, stride=stride, dilation=dilation, padding=padding)
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0:
        raise ValueError(f"group must be a positive int, got {group!r}")
    channels = input.shape[-1]
    if group_channels is None:
        group_channels = channels // group
    if channels == 0 or group_channels <= 0:
        raise ValueError(
            f"input has {channels} channels (last axis) for {group} groups: every group needs "
            f"at least one channel, got group_channels = {group_channels}"
        )
    if group * group_channels != channels:
        raise ValueError(
            f"input has {channels} channels (last axis), expected group * group_channels = "
            f"{group} * {group_channels} = {group * group_channels}"
        )
    points = _points(kernel, remove_center)
    out_size = output_size(tuple(input.shape[1:3]), kernel, stride, padding, dilation)
    return kernel, stride, padding, dilation, points, out_size


def _check_shape(name: str, tensor: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} ({meaning})")


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    group: int = 1,
    group_channels: int | None = None,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    r"""DCNv3's deformable sampling and aggregation, on channels-last tensors.

    Args:
        input (Tensor[N, H, W, group * group_channels]): the (projected) input.
        offset (Tensor[N, Ho, Wo, group * P * 2]): (Δw, Δh) of each point of each group, in
            units of the kernel grid (scaled by ``offset_scale``), ``P = kernel_h·kernel_w``
            (minus 1 with ``remove_center``).
        mask (Tensor[N, Ho, Wo, group * P]): weight of each point, used as given (the DCNv3
            layer applies a softmax over the points of each group before).
        kernel_size, stride, padding, dilation (int or Tuple[int, int]): as in a convolution,
            (height, width).
        group (int): channel groups; each has its own offsets and mask.
        group_channels (int, optional): channels per group; ``C // group`` by default.
        offset_scale (float): factor on the offsets and the kernel spread. Default: 1.
        remove_center (bool): drop the centre point (odd kernel sizes only).

    Returns:
        Tensor[N, Ho, Wo, C] in input's dtype; float16 and bfloat16 accumulate in float32.

    Example:
        >>> x = torch.randn(2, 8, 8, 16)
        >>> points = 9
        >>> offset = torch.zeros(2, 8, 8, 4 * points * 2)
        >>> mask = torch.full((2, 8, 8, 4 * points), 1 / points)
        >>> out = dcnv3(x, offset, mask, 3, padding=1, group=4)
        >>> mean = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1)
        >>> torch.allclose(out, mean.permute(0, 2, 3, 1), atol=1e-6)
        True
    """
    if mask is None:
        raise TypeError("mask must be a Tensor, got NoneType (DCNv3 always weights its points)")
    input, offset, mask = autocast_inputs(input, offset, mask)
    check_tensors({"input": input, "offset": offset, "mask": mask}, 2)
    kernel, stride, padding, dilation, points, out_size = _settings(
        input, kernel_size, stride, padding, dilation, group, group_channels, remove_center
    )
    batch = input.shape[0]
    _check_shape("offset", offset, (batch, *out_size, group * points * 2),
                 "N, Ho, Wo, group * points * 2")  # fmt: skip
    _check_shape("mask", mask, (batch, *out_size, group * points), "N, Ho, Wo, group * points")
    route = _transforms.route(offset, input, mask)
    offset = offset.unflatten(-1, (group, 2 * points))
    mask = mask.unflatten(-1, (group, points))
    return _library.dcnv3(input, offset, mask, kernel, stride, padding, dilation, group,
                          float(offset_scale), bool(remove_center), route=route)  # fmt: skip


def dcnv4_offset_mask_channels(group: int, kernel_size: IntOrPair = 3,
                               remove_center: bool = False) -> int:  # fmt: skip
    """Channels of DCNv4's fused offset-and-mask tensor: ``3·group·P`` rounded up to a multiple
    of 8, as DCNv4's layer produces it.

    >>> dcnv4_offset_mask_channels(4, 3)
    112
    """
    points = _points(_pair(kernel_size, "kernel_size"), remove_center)
    return math.ceil(group * points * 3 / 8) * 8


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    group: int = 1,
    group_channels: int | None = None,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    r"""DCNv4's operator: :func:`dcnv3` with offsets and mask fused in one tensor.

    ``offset_mask`` is ``(N, Ho, Wo, M)`` with ``M ≥ 3·group·P`` (DCNv4's layer pads ``M`` to
    a multiple of 8, see :func:`dcnv4_offset_mask_channels`; the padding is ignored).  Group
    ``g`` owns channels ``[3gP, 3gP + 3P)``: first ``P`` pairs (Δw, Δh), then ``P`` mask
    values, used as given (no softmax).  Any kernel size and any channels per group work
    (the original requires ``P ∈ {8, 9}`` and multiples of 16).

    Example:
        >>> x = torch.randn(1, 6, 6, 8)
        >>> offset_mask = torch.zeros(1, 6, 6, dcnv4_offset_mask_channels(2, 3))
        >>> dcnv4(x, offset_mask, 3, padding=1, group=2).shape
        torch.Size([1, 6, 6, 8])
    """
    input, offset_mask = autocast_inputs(input, offset_mask)
    check_tensors({"input": input, "offset_mask": offset_mask}, 2)
    kernel, stride, padding, dilation, points, out_size = _settings(
        input, kernel_size, stride, padding, dilation, group, group_channels, remove_center
    )
    used = 3 * group * points
    expected = (input.shape[0], *out_size)
    if tuple(offset_mask.shape[:3]) != expected or offset_mask.shape[3] < used:
        sizes = ", ".join(map(str, expected))
        raise ValueError(
            f"offset_mask has shape {tuple(offset_mask.shape)}, expected ({sizes}, M) with "
            f"M >= 3 * group * points = {used}"
        )
    route = _transforms.route(offset_mask, input)
    fused = offset_mask[..., :used].unflatten(-1, (group, 3 * points))  # a view: no copy
    offset, mask = fused[..., : 2 * points], fused[..., 2 * points :]
    return _library.dcnv3(input, offset, mask, kernel, stride, padding, dilation, group,
                          float(offset_scale), bool(remove_center), route=route)  # fmt: skip
