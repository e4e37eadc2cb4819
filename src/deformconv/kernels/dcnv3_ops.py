"""Launchers of the Triton DCNv3 kernels, registered as ``torch.library`` ``triton_op``\\ s:
``deformconv::triton_dcnv3`` and ``deformconv::triton_dcnv3_backward``.  Arguments are
assumed checked by the public functions."""

from collections.abc import Sequence

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .dcnv3 import dcnv3_backward_kernel, dcnv3_forward_kernel
from .ops import fixed_point_scale


def _block_d(depth: int) -> int:
    return max(4, min(64, triton.next_power_of_2(depth)))


def _settings(input, offset, kernel_size, stride, padding, dilation, group, remove_center):
    batch, height, width, channels = input.shape
    out_h, out_w = offset.shape[1:3]
    kernel_h, kernel_w = kernel_size
    points = kernel_h * kernel_w - int(remove_center)
    sizes = (batch * out_h * out_w, height, width, out_h, out_w)
    constants = {
        "DEPTH": channels // group,
        "POINTS": points,
        "KERNEL_H": kernel_h,
        "KERNEL_W": kernel_w,
        "STRIDE_H": stride[0],
        "STRIDE_W": stride[1],
        "PAD_H": padding[0],
        "PAD_W": padding[1],
        "DIL_H": dilation[0],
        "DIL_W": dilation[1],
        "GROUPS": group,
        "REMOVE_CENTER": bool(remove_center),
    }
    return sizes, constants


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
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    out = input.new_empty(*offset.shape[:3], input.shape[3])
    sizes, constants = _settings(input, offset, kernel_size, stride, padding, dilation, group,
                                 remove_center)  # fmt: skip
    if out.numel() == 0:
        return out
    block_q, block_d = 64, _block_d(constants["DEPTH"])
    grid = (triton.cdiv(sizes[0], block_q), group, triton.cdiv(constants["DEPTH"], block_d))
    wrap_triton(dcnv3_forward_kernel)[grid](
        input, offset, mask, out, *sizes, offset_scale, **constants, BLOCK_Q=block_q,
        BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
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
    """Gradients for (input, offset, mask); the input's is empty unless ``need_input``.  With
    ``deterministic`` the input gradient is summed in int64 fixed point: bit-reproducible."""
    grad_output = grad_output.contiguous()
    input, offset, mask = input.contiguous(), offset.contiguous(), mask.contiguous()
    sizes, constants = _settings(input, offset, kernel_size, stride, padding, dilation, group,
                                 remove_center)  # fmt: skip
    accumulator = torch.int64 if deterministic else torch.float32
    grad_input = torch.zeros(input.shape if need_input else (0,), dtype=accumulator,
                             device=input.device)  # fmt: skip
    scale = bound = None
    if deterministic and need_input:
        # Each input element receives at most 4·P contributions per output pixel of its image.
        bound = grad_output.detach().abs().amax().float() * mask.detach().abs().amax().float()
        bound = bound * float(4 * constants["POINTS"] * sizes[3] * sizes[4])
        scale = fixed_point_scale(bound)
    grad_offset = torch.zeros(offset.shape, dtype=torch.float32, device=input.device)
    grad_mask = torch.zeros(mask.shape, dtype=torch.float32, device=input.device)
    if sizes[0] > 0:
        block_q, block_d = 32, _block_d(constants["DEPTH"])
        grid = (triton.cdiv(sizes[0], block_q), group)
        wrap_triton(dcnv3_backward_kernel)[grid](
            input, offset, mask, grad_output, grad_input if need_input else grad_offset,
            grad_offset, grad_mask, grad_offset if scale is None else scale, *sizes,
            offset_scale, **constants, NEED_INPUT=need_input,
            DETERMINISTIC=deterministic and need_input, BLOCK_Q=block_q, BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    if scale is not None:
        # Exact integer sums → float32 → over a power of two: bit-reproducible.  ``bound * 0``
        # is 0, or NaN when the gradients hold NaN or infinity.
        grad_input = grad_input.float().div_(scale).add_(bound * 0)
    return grad_input.to(input.dtype), grad_offset.to(offset.dtype), grad_mask.to(mask.dtype)
