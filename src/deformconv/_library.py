"""Registration of ``deformconv::deform_conv2d``, ``deformconv::deform_conv3d`` and
``deformconv::dcnv3`` as PyTorch operators.

Each op and its backward are ``torch.library`` custom ops with fake (meta) implementations
and registered autograd, so ``torch.compile``, ``torch.export`` and ``opcheck`` see them as
ordinary operators.  Both run whichever backend :func:`deformconv.backends.select` names for
the tensors' device and dimensionality; a backward pass called by autograd, under the backend
setting its forward ran under.  Arguments are validated by the public functions, not here.

The backward ops have autograd formulas too (:mod:`deformconv._double_backward`), so
gradients can be differentiated again, and batching rules (:mod:`deformconv._batching`).  The
public functions call :func:`deform_conv` and :func:`dcnv3`, which run each op directly,
through an autograd.Function under torch.func transforms and forward-mode AD, or as the
composite where the ops cannot serve (:func:`deformconv._transforms.route`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _batching, _double_backward, _tangents, _transforms, backends, composite
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


def _conv_backward(backward_op: Any):
    """The backward of ``deform_conv{2,3}d``, running ``backward_op`` (the backward op, or
    it as an autograd.Function)."""

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

    return backward


def _register(dims: int) -> tuple[Any, Any, type[torch.autograd.Function]]:
    """Define ``deformconv::deform_conv{dims}d`` and its backward op; also returns the op as
    an autograd.Function, for torch.func (:mod:`deformconv._transforms`)."""
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

    double_backward = _double_backward.conv(forward_op)
    forward_op.register_autograd(_conv_backward(backward_op), setup_context=_setup_context)
    backward_op.register_autograd(double_backward, setup_context=_double_backward.setup_conv)
    _batching.register_conv(forward_op, backward_op)
    # The same as autograd.Functions (torch.func and forward mode; _transforms).
    title = f"DeformConv{dims}d"
    backward_function = _transforms.function(
        f"{title}Backward", backward_op, _double_backward.setup_conv, double_backward,
        _tangents.conv_backward, tensors=5, saved=5,
    )  # fmt: skip
    function = _transforms.function(title, forward_op, _setup_context,
                                    _conv_backward(backward_function.call), _tangents.conv,
                                    tensors=5, saved=4)  # fmt: skip
    return forward_op, backward_op, function


def deform_conv(input: Tensor, offset: Tensor, mask: Tensor | None, weight: Tensor,
                bias: Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tensor:  # fmt: skip
    """``deform_conv2d`` or ``deform_conv3d`` by input's dimensionality, on the route
    :func:`~deformconv._transforms.route` picks."""
    args = (input, offset, mask, weight, bias, stride, padding, dilation)
    route = _transforms.route(offset, input, mask, weight, bias)
    if route is _transforms.Route.COMPOSITE:
        return composite.deform_conv(*args)
    if route is _transforms.Route.FUNCTION:
        function = DeformConv2dFunction if input.dim() == 4 else DeformConv3dFunction
        return function.call(*args)
    return (deform_conv2d_op if input.dim() == 4 else deform_conv3d_op)(*args)


deform_conv2d_op, deform_conv2d_backward_op, DeformConv2dFunction = _register(2)
deform_conv3d_op, deform_conv3d_backward_op, DeformConv3dFunction = _register(3)


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


def _dcnv3_backward(backward_op: Any):
    """The backward of ``dcnv3``, running ``backward_op`` (the backward op, or it as an
    autograd.Function)."""

    def backward(ctx: Any, grad_output: Tensor):
        input, offset, mask = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:3])
        with backends.pinned(ctx.backend):
            grads = backward_op(grad_output, input, offset, mask, *ctx.settings, needs)
        return (*(g if need else None for g, need in zip(grads, needs, strict=True)),
                *([None] * len(ctx.settings)))  # fmt: skip

    return backward


_dcnv3_double_backward = _double_backward.dcnv3(dcnv3_op)
dcnv3_op.register_autograd(_dcnv3_backward(dcnv3_backward_op),
                           setup_context=_dcnv3_setup_context)  # fmt: skip
dcnv3_backward_op.register_autograd(_dcnv3_double_backward,
                                    setup_context=_double_backward.setup_dcnv3)  # fmt: skip
_batching.register_dcnv3(dcnv3_op, dcnv3_backward_op)
# The same as autograd.Functions (torch.func and forward mode; _transforms).
_DCNv3Backward = _transforms.function(
    "DCNv3Backward", dcnv3_backward_op, _double_backward.setup_dcnv3, _dcnv3_double_backward,
    _tangents.dcnv3_backward, tensors=4, saved=4,
)  # fmt: skip
DCNv3Function = _transforms.function("DCNv3", dcnv3_op, _dcnv3_setup_context,
                                     _dcnv3_backward(_DCNv3Backward.call), _tangents.dcnv3,
                                     tensors=3, saved=3)  # fmt: skip


def dcnv3(input: Tensor, offset: Tensor, mask: Tensor, *settings,
          route: _transforms.Route | None = None) -> Tensor:  # fmt: skip
    """``dcnv3_op`` on the route :func:`~deformconv._transforms.route` picks, or ``route``:
    the public functions pick it on their tensors as given, before they take the views the op
    reads (under a ``jvp`` transform any view counts as a tensor with a tangent)."""
    route = route or _transforms.route(offset, input, mask)
    if route is _transforms.Route.COMPOSITE:
        return composite.dcnv3(input, offset, mask, *settings)
    if route is _transforms.Route.FUNCTION:
        return DCNv3Function.call(input, offset, mask, *settings)
    return dcnv3_op(input, offset, mask, *settings)
