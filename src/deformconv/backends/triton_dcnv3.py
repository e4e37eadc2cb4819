"""Triton backend of the DCNv3 / DCNv4 operator: the kernels of :mod:`deformconv.kernels.dcnv3`
for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).  What they do not take runs
on the torch backend with a one-time warning naming why, as for the convolution.  Under
``torch.use_deterministic_algorithms(True)`` the input gradient is summed in int64 fixed point,
so every gradient is bit-identical from run to run."""

from __future__ import annotations

import torch

from . import pytorch_dcnv3
from .triton_backend import beyond_grid, fallback, uncovered


def _kernels():
    from ..kernels import dcnv3_ops

    return dcnv3_ops


def forward(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
            remove_center):  # fmt: skip
    args = (kernel_size, stride, padding, dilation, group, offset_scale, remove_center)
    reason = uncovered(input) or beyond_grid(groups=group)
    if reason is not None:
        fallback(reason)
        return pytorch_dcnv3.forward(input, offset, mask, *args)
    _kernels()
    return torch.ops.deformconv.triton_dcnv3(input, offset, mask, *args)


def backward(grad_output, input, offset, mask, kernel_size, stride, padding, dilation, group,
             offset_scale, remove_center, needs_grad):  # fmt: skip
    """Gradients for (input, offset, mask); ``None`` where not requested."""
    args = (kernel_size, stride, padding, dilation, group, offset_scale, remove_center)
    reason = uncovered(input) or beyond_grid(groups=group)
    if reason is not None:
        fallback(reason)
        return pytorch_dcnv3.backward(grad_output, input, offset, mask, *args, needs_grad)
    _kernels()
    grads = torch.ops.deformconv.triton_dcnv3_backward(
        grad_output, input, offset, mask, *args, needs_grad[0],
        torch.are_deterministic_algorithms_enabled(),
    )  # fmt: skip
    return tuple(g if need else None for g, need in zip(grads, needs_grad, strict=True))
