"""Registration of ``deformconv::deform_conv2d`` and ``deformconv::deform_conv3d`` as
PyTorch operators.

Each op and its backward are ``torch.library`` custom ops with fake (meta) implementations
and registered autograd, so ``torch.compile``, ``torch.export`` and ``opcheck`` see them as
ordinary operators.  Both run whichever backend :func:`deformconv.backends.select` names for
the tensors' device and dimensionality.  Arguments are validated by the public functions,
not here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import backends

_NAMESPACE = "deformconv"


def _forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> Tensor:
    backend = backends.select(input.device, input.dim() - 2)
    output = backend.forward(
        input, offset, mask, weight, bias, tuple(stride), tuple(padding), tuple(dilation)
    )
    return output.contiguous()


def _forward_fake(input, offset, mask, weight, bias, stride, padding, dilation):
    return input.new_empty(input.shape[0], weight.shape[0], *offset.shape[2:])


def _backward_impl(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    needs_grad: Sequence[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (input, offset, mask, weight, bias); an empty tensor where not needed."""
    backend = backends.select(input.device, input.dim() - 2)
    grads = backend.backward(
        grad_output.contiguous(),
        input,
        offset,
        mask,
        weight,
        tuple(stride),
        tuple(padding),
        tuple(dilation),
        tuple(needs_grad),
    )
    # The fake implementation promises contiguous gradients; hold every backend to it.
    return tuple(  # type: ignore[return-value]
        input.new_empty(0) if grad is None else grad.contiguous() for grad in grads
    )


def _backward_fake(grad_output, input, offset, mask, weight, stride, padding, dilation,
                   needs_grad):  # fmt: skip
    need_input, need_offset, need_mask, need_weight = needs_grad

    def like(tensor: Tensor | None, needed: bool) -> Tensor:
        if needed and tensor is not None:
            return torch.empty_like(tensor, memory_format=torch.contiguous_format)
        return input.new_empty(0)

    return (
        like(input, need_input),
        like(offset, need_offset),
        like(mask, need_mask),
        like(weight, need_weight),
        grad_output.new_empty(weight.shape[0]),
    )


def _setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    input, offset, mask, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, mask, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation)


def _register(dims: int) -> tuple[Any, Any]:
    """Define ``deformconv::deform_conv{dims}d`` and its backward op."""
    name = f"{_NAMESPACE}::deform_conv{dims}d"
    forward_op = torch.library.custom_op(
        name,
        mutates_args=(),
        schema=f"(Tensor input, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, "
        f"int[{dims}] stride, int[{dims}] padding, int[{dims}] dilation) -> Tensor",
    )(_forward)
    forward_op.register_fake(_forward_fake)
    backward_op = torch.library.custom_op(
        f"{name}_backward",
        mutates_args=(),
        schema=f"(Tensor grad_output, Tensor input, Tensor offset, Tensor? mask, Tensor weight, "
        f"int[{dims}] stride, int[{dims}] padding, int[{dims}] dilation, bool[4] needs_grad) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    )(_backward_impl)
    backward_op.register_fake(_backward_fake)

    def backward(ctx: Any, grad_output: Tensor):
        input, offset, mask, weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        modulated = mask is not None and needs[2]
        grads = backward_op(
            grad_output, input, offset, mask, weight, *ctx.conv_args,
            [needs[0], needs[1], modulated, needs[3]],
        )  # fmt: skip
        grad_input, grad_offset, grad_mask, grad_weight, grad_bias = grads
        return (
            grad_input if needs[0] else None,
            grad_offset if needs[1] else None,
            grad_mask if modulated else None,
            grad_weight if needs[3] else None,
            grad_bias if ctx.has_bias and needs[4] else None,
            None,
            None,
            None,
        )

    forward_op.register_autograd(backward, setup_context=_setup_context)
    return forward_op, backward_op


deform_conv2d_op, deform_conv2d_backward_op = _register(2)
deform_conv3d_op, deform_conv3d_backward_op = _register(3)
