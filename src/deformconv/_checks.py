"""Argument checks of the deformable convolution functions, for any number of spatial axes.

Every error names the tensor or argument and quotes the expected and the actual value.
"""

from __future__ import annotations

import math

from torch import Tensor

from ._utils import FLOATING_DTYPES

#: Axis names used in messages: ``kernel_h``, ``out_w``...
AXES = {1: ("w",), 2: ("h", "w"), 3: ("d", "h", "w")}


def check_tensors(named: dict[str, Tensor | None], dims: int) -> None:
    """Tensors (or ``None``), ``dims + 2``-D (``bias`` 1-D), of one floating dtype and device:
    ``named["input"]``'s."""
    for name, tensor in named.items():
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(tensor).__name__}")
    for name, tensor in named.items():
        if name != "bias" and tensor is not None and tensor.dim() != dims + 2:
            raise ValueError(
                f"{name} must be a {dims + 2}-D tensor, "
                f"got {tensor.dim()}-D with shape {tuple(tensor.shape)}"
            )
    bias = named.get("bias")
    if bias is not None and bias.dim() != 1:
        raise ValueError(f"bias must be a 1-D tensor, got shape {tuple(bias.shape)}")
    input = named["input"]
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


def _check_groups(channels: int, weight: Tensor, bias: Tensor | None) -> None:
    out_channels, in_per_group = weight.shape[:2]
    if 0 in weight.shape:
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


def check_sizes(**sizes: tuple[int, ...]) -> None:
    """``ValueError`` unless every size is positive (``padding``: non-negative)."""
    for name, values in sizes.items():
        least = 0 if name == "padding" else 1
        if min(values) < least:
            word = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be {word}, got {values}")


def output_size(size, kernel, stride, padding, dilation) -> tuple[int, ...]:
    """The output size of a convolution over ``size``; ``ValueError`` when it is empty."""
    out_size = tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(size, kernel, stride, padding, dilation, strict=True)
    )
    if min(out_size) <= 0:
        raise ValueError(
            f"input of spatial size {tuple(size)} is too small for kernel {tuple(kernel)} "
            f"with padding {padding} and dilation {dilation}: output size would be {out_size}"
        )
    return out_size


def check_arguments(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
) -> None:
    """Check the arguments of a ``len(stride)``-D deformable convolution."""
    dims = len(stride)
    axes = AXES[dims]
    named = {"input": input, "offset": offset, "weight": weight, "bias": bias, "mask": mask}
    check_tensors(named, dims)
    check_sizes(stride=stride, dilation=dilation, padding=padding)

    batch, channels = input.shape[:2]
    _check_groups(channels, weight, bias)
    kernel = tuple(weight.shape[2:])
    taps = math.prod(kernel)
    kernel_names = " * ".join(f"kernel_{axis}" for axis in axes)
    offset_channels = offset.shape[1]
    if offset_channels == 0 or offset_channels % (dims * taps) != 0:
        raise ValueError(
            f"offset has {offset_channels} channels, expected a positive multiple of "
            f"{dims} * {kernel_names} = {dims} * {' * '.join(map(str, kernel))} = {dims * taps}"
        )
    offset_groups = offset_channels // (dims * taps)
    if channels % offset_groups != 0:
        raise ValueError(
            f"input has {channels} channels, which is not divisible by the {offset_groups} offset "
            f"groups (offset.shape[1] // ({dims} * {kernel_names}) = "
            f"{offset_channels} // {dims * taps})"
        )

    out_size = output_size(tuple(input.shape[2:]), kernel, stride, padding, dilation)
    out_names = ", ".join(f"out_{axis}" for axis in axes)
    for name, tensor, per_tap in (("offset", offset, dims), ("mask", mask, 1)):
        if tensor is None:
            continue
        expected = (batch, per_tap * offset_groups * taps, *out_size)
        if tuple(tensor.shape) != expected:
            factor = f"{dims} * " if name == "offset" else ""
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {expected} "
                f"(batch, {factor}offset_groups * {kernel_names}, {out_names}) "
                f"with {offset_groups} offset groups"
            )
