"""Launchers of the Triton DCNv3 kernels, registered as ``torch.library`` ``triton_op``\\ s:
``deformconv::triton_dcnv3`` and ``deformconv::triton_dcnv3_backward``.  Arguments are
assumed checked by the public functions; offsets are ``(N, Ho, Wo, G, 2P)`` and the mask
``(N, Ho, Wo, G, P)``, views of any strides with contiguous points (DCNv4's fused tensor
sliced without a copy), anything else is copied first."""

# The triton_op of PyTorch 2.6 to 2.8 infers its schema from the annotations (it ignores
# ``schema=``) and reads typing.Sequence, not collections.abc.Sequence.
from typing import Sequence  # noqa: UP035

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from .dcnv3 import dcnv3_backward_kernel, dcnv3_forward_kernel
from .ops import abs_max, fixed_point_scale, launching_on, needs_int64, wrap_triton


def _block_d(depth: int) -> int:
    return max(4, min(64, triton.next_power_of_2(depth)))


def forward_config(depth: int) -> dict:
    """Tile sizes and launch settings of the forward kernel."""
    return {"BLOCK_Q": 64, "BLOCK_D": _block_d(depth), "num_warps": 4}


def backward_config(depth: int) -> dict:
    """Tile sizes and launch settings of the backward kernel."""
    return {"BLOCK_Q": 32, "BLOCK_D": _block_d(depth), "num_warps": 4}


#: Per-kernel settings that replace the ones above (for tuning runs).
CONFIG_OVERRIDES: dict[str, dict] = {"forward": {}, "backward": {}}


def _pixels_and_groups(tensor: Tensor) -> tuple[Tensor, int, int]:
    """``tensor`` ``(N, Ho, Wo, G, X)`` and its pixel and group strides, if one stride steps
    through its pixels and its last axis is contiguous; else a contiguous copy's."""
    _, out_h, out_w, groups, last = tensor.shape
    strides = tensor.stride()
    pixel = strides[2] if out_w > 1 else strides[1] if out_h > 1 else strides[0]
    wanted = (out_h * out_w * pixel, out_w * pixel, pixel, strides[3], 1)
    if any(n > 1 and s != w for n, s, w in zip(tensor.shape, strides, wanted, strict=True)):
        return tensor.contiguous(), groups * last, last
    return tensor, pixel, strides[3]


def _launch(kernel, config: dict, forward: bool, input: Tensor, offset: Tensor,
            mask: Tensor, pointers: tuple, kernel_size, stride, padding, dilation, group,
            offset_scale, remove_center, **options) -> None:  # fmt: skip
    """Launch the ``forward`` kernel or the backward one: ``pointers`` are the tensors it
    takes after the input, offsets and mask; ``options`` its own constants."""
    batch, height, width, channels = input.shape
    out_h, out_w = offset.shape[1:3]
    kernel_h, kernel_w = kernel_size
    depth = channels // group
    points = kernel_h * kernel_w - int(remove_center)
    offset, offset_pixel, offset_group = _pixels_and_groups(offset)
    mask, mask_pixel, mask_group = _pixels_and_groups(mask)
    pixels = batch * out_h * out_w
    if forward:  # tiles of (pixel, group) rows × blocks of channels
        grid = (triton.cdiv(pixels * group, config["BLOCK_Q"]),
                triton.cdiv(depth, config["BLOCK_D"]))  # fmt: skip
    else:  # tiles of pixels × groups
        grid = (triton.cdiv(pixels, config["BLOCK_Q"]), group)
    with launching_on(input.device):
        wrap_triton(kernel)[grid](
            input, offset, mask, *pointers, pixels, height, width, out_h, out_w,
            offset_pixel, offset_group, mask_pixel, mask_group, offset_scale, DEPTH=depth,
            POINTS=points, KERNEL_H=kernel_h, KERNEL_W=kernel_w,
            STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
            DIL_H=dilation[0], DIL_W=dilation[1], GROUPS=group,
            REMOVE_CENTER=bool(remove_center),
            INDEX64=needs_int64(input, offset, mask, *pointers), **options, **config,
        )  # fmt: skip


@triton_op(
    "deformconv::triton_dcnv3",
    mutates_args=(),
    schema="(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, int[2] stride, "
    "int[2] padding, int[2] dilation, int group, float offset_scale, bool remove_center) "
    "-> Tensor",
)
def triton_dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    input = input.contiguous()
    out = input.new_empty(*offset.shape[:3], input.shape[3])
    if out.numel() == 0:
        return out
    config = {**forward_config(input.shape[3] // group), **CONFIG_OVERRIDES["forward"]}
    _launch(dcnv3_forward_kernel, config, True, input, offset, mask, (out,), kernel_size, stride,
            padding, dilation, group, offset_scale, remove_center)  # fmt: skip
    return out


@triton_op(
    "deformconv::triton_dcnv3_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, "
    "int[2] stride, int[2] padding, int[2] dilation, int group, float offset_scale, "
    "bool remove_center, bool need_input, bool deterministic) -> (Tensor, Tensor, Tensor)",
)
def triton_dcnv3_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    offset_scale: float,
    remove_center: bool,
    need_input: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for (input, offset, mask), contiguous; the input's is empty unless
    ``need_input``.  With ``deterministic`` the input gradient is summed in int64 fixed
    point: bit-reproducible."""
    grad_output, input = grad_output.contiguous(), input.contiguous()
    accumulator = torch.int64 if deterministic else torch.float32
    grad_input = torch.zeros(input.shape if need_input else (0,), dtype=accumulator,
                             device=input.device)  # fmt: skip
    scale = bound = None
    if deterministic and need_input:
        # Each input element receives at most 4·P contributions per output pixel of its image.
        points = kernel_size[0] * kernel_size[1] - int(remove_center)
        bound = abs_max(grad_output) * abs_max(mask)
        bound = bound * float(4 * points * offset.shape[1] * offset.shape[2])
        scale = fixed_point_scale(bound)
    grad_offset = torch.zeros(offset.shape, dtype=torch.float32, device=input.device)
    grad_mask = torch.zeros(mask.shape, dtype=torch.float32, device=input.device)
    if grad_output.numel() > 0:
        config = {**backward_config(input.shape[3] // group), **CONFIG_OVERRIDES["backward"]}
        pointers = (grad_output, grad_input if need_input else grad_offset, grad_offset,
                    grad_mask, grad_offset if scale is None else scale)  # fmt: skip
        _launch(dcnv3_backward_kernel, config, False, input, offset, mask, pointers, kernel_size,
                stride, padding, dilation, group, offset_scale, remove_center,
                NEED_INPUT=need_input, DETERMINISTIC=deterministic and need_input)  # fmt: skip
    if scale is not None:
        # Exact integer sums → float32 → over a power of two: bit-reproducible.  ``bound * 0``
        # is 0, or NaN when the gradients hold NaN or infinity.
        grad_input = grad_input.float().div_(scale).add_(bound * 0)
    return grad_input.to(input.dtype), grad_offset.to(offset.dtype), grad_mask.to(mask.dtype)
