"""Registration of ``deformconv::deform_conv2d``, ``deformconv::deform_conv3d`` and
``deformconv::dcnv3`` as PyTorch operators.

Each op and its backward are ``torch.library`` custom ops with fake (meta) implementations
and registered autograd, so ``torch.compile``, ``torch.export`` and ``opcheck`` see them as
ordinary operators.  Both run whichever backend :func:`deformconv.backends.select` names for
the tensors' device and dimensionality; a backward pass called by autograd, under the backend
setting its forward ran under.  Arguments are validated by the public functions, not here.

The backward ops have autograd formulas too, so gradients can be differentiated again.  The
backward maps ``(grad_output, inputs)`` to ``J(inputs)ᵀ·grad_output``; its vector-Jacobian
product with cotangents ``u`` of the gradients is ``J·u`` for ``grad_output`` and the gradient
of ``⟨grad_output, J·u⟩`` for the inputs.  The operator is linear in each of input, mask and
weight, so ``J·u`` is the op itself with one of them replaced by its cotangent, plus the
derivative along the offsets, which :mod:`deformconv.composite` gives in forward mode (only
when the offsets' gradients are differentiated: a gradient penalty on the input runs the ops
alone).  Where that backward is differentiated once more (third derivatives), it runs on
the composite throughout, whose derivatives go on to any order.  The public functions call
:func:`deform_conv` and :func:`dcnv3`, which run the composite instead of an op where the
ops cannot serve (:func:`deformconv.composite.wanted`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import backends, composite
from .backends import handoff

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
    grads = backend.backward(  # backends take grad_output with any strides
        grad_output,
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
    ctx.plan = handoff.take(offset, mask)  # what the forward kept for the backward, if any
    ctx.backend = backends.get_backend()


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
        with handoff.offered(ctx.plan), backends.pinned(ctx.backend):
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
    backward_op.register_autograd(_second_order, setup_context=_setup_second_order)
    return forward_op, backward_op


def _setup_second_order(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad_output, input, offset, mask, weight, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(grad_output, input, offset, mask, weight)
    ctx.conv_args = (stride, padding, dilation)
    ctx.backend = backends.get_backend()


def _cotangent(tensor: Tensor | None) -> Tensor | None:
    """An incoming cotangent as a constant, or None where it is absent, empty or zero."""
    if tensor is None or tensor.numel() == 0 or not tensor.any():
        return None
    return tensor.detach()


def _pull_back(ctx: Any, tangent_of, grad_output: Tensor, primals: tuple) -> tuple:
    """``tangent_of(*primals)`` (``J·u``) and the gradients of ``⟨grad_output, J·u⟩`` for the
    ``primals`` that need one (None for the others), on detached copies: the cotangents and
    ``grad_output`` are constants here, and nothing reaches into the graph around them."""
    needs = [t is not None and need for t, need in zip(primals, ctx.needs_input_grad[1:],
                                                        strict=False)]  # fmt: skip
    leaves = [None if t is None else t.detach().requires_grad_(need)
              for t, need in zip(primals, needs, strict=True)]  # fmt: skip
    with torch.enable_grad(), backends.pinned(ctx.backend):
        tangent = tangent_of(*leaves)
        wanted = [t for t, need in zip(leaves, needs, strict=True) if need]
        found = iter(torch.autograd.grad(tangent, wanted, grad_output.detach(),
                                         allow_unused=True)
                     if tangent.requires_grad else [None] * len(wanted))  # fmt: skip
    return tangent.detach(), tuple(next(found) if need else None for need in needs)


def _second_order(ctx: Any, *cotangents: Tensor):
    """The backward op's backward (see the module docstring)."""
    if torch.is_grad_enabled():  # to be differentiated again
        return _composite_second_order(ctx, *cotangents)
    grad_output, *primals = ctx.saved_tensors
    u_input, u_offset, u_mask, u_weight, u_bias = map(_cotangent, cotangents)
    conv_args = ctx.conv_args
    op = deform_conv2d_op if grad_output.dim() == 4 else deform_conv3d_op

    def tangent_of(input, offset, mask, weight):
        terms = [op(*args, None, *conv_args) for given, args in [
            (u_input, (u_input, offset, mask, weight)),
            (u_mask, (input, offset, u_mask, weight)),
            (u_weight, (input, offset, mask, u_weight)),
        ] if given is not None]  # fmt: skip
        if u_offset is not None:
            terms.append(torch.func.jvp(
                lambda offset: composite.deform_conv(input, offset, mask, weight, None,
                                                     *conv_args),
                (offset,), (u_offset,))[1])  # fmt: skip
        if u_bias is not None:
            terms.append(u_bias.reshape(-1, *[1] * (grad_output.dim() - 2)).expand_as(grad_output))
        return sum(terms) if terms else torch.zeros_like(grad_output, requires_grad=True)

    tangent, grads = _pull_back(ctx, tangent_of, grad_output, tuple(primals))
    return (tangent, *grads, None, None, None, None)


def _composite_second_order(ctx: Any, *outer: Tensor):
    """:func:`_second_order` on the composite throughout: differentiable to any order."""
    grad_output, input, offset, mask, weight = ctx.saved_tensors
    need_input, need_offset, need_mask, need_weight = ctx.needs_input_grad[1:5]
    modulated = mask is not None

    def function(input, offset, weight, bias, *mask):
        return composite.deform_conv(input, offset, mask[0] if modulated else None, weight,
                                     bias, *ctx.conv_args)  # fmt: skip

    bias = weight.new_zeros(weight.shape[0])  # the backward op's fifth output is its gradient
    primals = (input, offset, weight, bias, *([mask] if modulated else []))
    needed = (need_input, need_offset, need_weight, True, *([need_mask] if modulated else []))
    outer_grads = (outer[0], outer[1], outer[3], outer[4], *((outer[2],) if modulated else ()))
    grads = composite.second_order(function, primals, grad_output, needed, outer_grads)
    grad_grad_output, grad_input, grad_offset, grad_weight, _, *grad_mask = grads
    return (grad_grad_output, grad_input, grad_offset, *(grad_mask or [None]), grad_weight,
            None, None, None, None)  # fmt: skip


def deform_conv(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor,
                bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tensor:  # fmt: skip
    """``deform_conv2d`` or ``deform_conv3d`` by input's dimensionality: the op, or where
    that cannot serve, the composite."""
    if composite.wanted(input, offset, mask, weight, bias):
        return composite.deform_conv(input, offset, mask, weight, bias, stride, padding,
                                     dilation)  # fmt: skip
    op = deform_conv2d_op if input.dim() == 4 else deform_conv3d_op
    return op(input, offset, mask, weight, bias, stride, padding, dilation)


deform_conv2d_op, deform_conv2d_backward_op = _register(2)
deform_conv3d_op, deform_conv3d_backward_op = _register(3)


@torch.library.custom_op(
    f"{_NAMESPACE}::dcnv3",
    mutates_args=(),
    schema="(Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, int[2] stride, "
    "int[2] padding, int[2] dilation, int group, float offset_scale, bool remove_center) "
    "-> Tensor",
)
def dcnv3_op(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
             remove_center) -> Tensor:  # fmt: skip
    """``input`` ``(N, H, W, C)``, ``offset`` ``(N, Ho, Wo, G, 2P)``, ``mask`` ``(N, Ho, Wo, G,
    P)``: the public layouts with the groups split out, so that DCNv4's fused tensor passes as
    two views of itself."""
    backend = backends.select(input.device, op="dcnv3")
    output = backend.forward(input, offset, mask, tuple(kernel_size), tuple(stride),
                             tuple(padding), tuple(dilation), group, offset_scale,
                             remove_center)  # fmt: skip
    return output.contiguous()


@dcnv3_op.register_fake
def _(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale,
      remove_center):  # fmt: skip
    return input.new_empty(*offset.shape[:3], input.shape[3])


@torch.library.custom_op(
    f"{_NAMESPACE}::dcnv3_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor offset, Tensor mask, int[2] kernel_size, "
    "int[2] stride, int[2] padding, int[2] dilation, int group, float offset_scale, "
    "bool remove_center, bool[3] needs_grad) -> (Tensor, Tensor, Tensor)",
)
def dcnv3_backward_op(grad_output, input, offset, mask, kernel_size, stride, padding, dilation,
                      group, offset_scale, remove_center, needs_grad):  # fmt: skip
    """Gradients for (input, offset, mask); an empty tensor where not needed."""
    backend = backends.select(input.device, op="dcnv3")
    grads = backend.backward(grad_output.contiguous(), input, offset, mask, tuple(kernel_size),
                             tuple(stride), tuple(padding), tuple(dilation), group,
                             offset_scale, remove_center, tuple(needs_grad))  # fmt: skip
    return tuple(  # type: ignore[return-value]
        input.new_empty(0) if grad is None else grad.contiguous() for grad in grads
    )


@dcnv3_backward_op.register_fake
def _(grad_output, input, offset, mask, kernel_size, stride, padding, dilation, group,
      offset_scale, remove_center, needs_grad):  # fmt: skip
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need else input.new_empty(0)
        for t, need in zip((input, offset, mask), needs_grad, strict=True)
    )


def _dcnv3_setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
    input, offset, mask, *settings = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.settings = settings
    ctx.backend = backends.get_backend()


def _dcnv3_backward(ctx: Any, grad_output: Tensor):
    input, offset, mask = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:3])
    with backends.pinned(ctx.backend):
        grads = dcnv3_backward_op(grad_output, input, offset, mask, *ctx.settings, needs)
    return (*(g if need else None for g, need in zip(grads, needs, strict=True)),
            *([None] * len(ctx.settings)))  # fmt: skip


dcnv3_op.register_autograd(_dcnv3_backward, setup_context=_dcnv3_setup_context)


def _dcnv3_setup_second_order(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad_output, input, offset, mask, *settings, _ = inputs
    ctx.save_for_backward(grad_output, input, offset, mask)
    ctx.settings = settings
    ctx.backend = backends.get_backend()


def _dcnv3_second_order(ctx: Any, *cotangents: Tensor):
    """The backward op's backward, as for the convolution: linear in input and mask."""
    grad_output, *primals = ctx.saved_tensors
    settings = ctx.settings
    if torch.is_grad_enabled():  # to be differentiated again: the composite throughout
        grads = composite.second_order(
            lambda *primals: composite.dcnv3(*primals, *settings), primals, grad_output,
            ctx.needs_input_grad[1:4], cotangents)  # fmt: skip
        return (*grads, *([None] * (len(settings) + 1)))
    u_input, u_offset, u_mask = map(_cotangent, cotangents)

    def tangent_of(input, offset, mask):
        terms = [dcnv3_op(*args, *settings) for given, args in [
            (u_input, (u_input, offset, mask)), (u_mask, (input, offset, u_mask)),
        ] if given is not None]  # fmt: skip
        if u_offset is not None:
            terms.append(torch.func.jvp(
                lambda offset: composite.dcnv3(input, offset, mask, *settings),
                (offset,), (u_offset,))[1])  # fmt: skip
        return sum(terms) if terms else torch.zeros_like(grad_output, requires_grad=True)

    tangent, grads = _pull_back(ctx, tangent_of, grad_output, tuple(primals))
    return (tangent, *grads, *([None] * (len(settings) + 1)))


dcnv3_backward_op.register_autograd(_dcnv3_second_order,
                                    setup_context=_dcnv3_setup_second_order)  # fmt: skip


def dcnv3(input: Tensor, offset: Tensor, mask: Tensor, *settings) -> Tensor:
    """``dcnv3_op``, or where that cannot serve, the composite."""
    if composite.wanted(input, offset, mask):
        return composite.dcnv3(input, offset, mask, *settings)
    return dcnv3_op(input, offset, mask, *settings)
