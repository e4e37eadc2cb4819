"""The backward ops' own backward: derivatives of the gradients.

A backward op maps ``(grad_output, inputs)`` to ``J(inputs)ᵀ·grad_output``.  Its
vector-Jacobian product with cotangents ``u`` of those gradients is ``J·u`` for
``grad_output`` and the gradient of ``⟨grad_output, J·u⟩`` for the inputs, with ``J·u`` from
:mod:`deformconv._tangents`: the ops themselves, and the composite only where the offsets'
gradients have a cotangent, so a gradient penalty on the input runs the ops alone.  Where
this backward is itself differentiated (third derivatives), it runs on the composite
throughout, whose derivatives go on to any order.

:mod:`deformconv._library` registers :func:`conv` and :func:`dcnv3` with their setup
functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import _tangents, backends, composite


def setup_conv(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad_output, input, offset, mask, weight, stride, padding, dilation, _ = inputs
    ctx.save_for_backward(grad_output, input, offset, mask, weight)
    ctx.settings = (stride, padding, dilation)
    ctx.backend = backends.get_backend()


def setup_dcnv3(ctx: Any, inputs: tuple, output: tuple) -> None:
    grad_output, input, offset, mask, *settings, _ = inputs
    ctx.save_for_backward(grad_output, input, offset, mask)
    ctx.settings = tuple(settings)
    ctx.backend = backends.get_backend()


def _cotangent(tensor: Tensor | None) -> Tensor | None:
    """An incoming cotangent as a constant, or None where it is absent, empty or zero."""
    if tensor is None or tensor.numel() == 0 or not tensor.any():
        return None
    return tensor.detach()


def _pull_back(ctx: Any, tangent_of, grad_output: Tensor, primals: list) -> tuple:
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


def conv(op):
    """The backward of ``deform_conv{2,3}d_backward``, with ``op`` the forward op."""

    def backward(ctx: Any, *cotangents: Tensor):
        if torch.is_grad_enabled():  # to be differentiated again
            return _composite_conv(ctx, *cotangents)
        grad_output, *primals = ctx.saved_tensors
        u_input, u_offset, u_mask, u_weight, u_bias = map(_cotangent, cotangents)
        settings = ctx.settings

        def tangent_of(*primals):
            return _tangents.conv(op, primals, (u_input, u_offset, u_mask, u_weight, u_bias),
                                  settings)  # fmt: skip

        tangent, grads = _pull_back(ctx, tangent_of, grad_output, primals)
        return (tangent, *grads, None, None, None, None)

    return backward


def _composite_conv(ctx: Any, *outer: Tensor):
    """:func:`conv`'s backward on the composite throughout: differentiable to any order."""
    grad_output, input, offset, mask, weight = ctx.saved_tensors
    need_input, need_offset, need_mask, need_weight = ctx.needs_input_grad[1:5]
    modulated = mask is not None

    def function(input, offset, weight, bias, *mask):
        return composite.deform_conv(input, offset, mask[0] if modulated else None, weight,
                                     bias, *ctx.settings)  # fmt: skip

    bias = weight.new_zeros(weight.shape[0])  # the backward op's fifth output is its gradient
    primals = (input, offset, weight, bias, *([mask] if modulated else []))
    needed = (need_input, need_offset, need_weight, True, *([need_mask] if modulated else []))
    outer_grads = (outer[0], outer[1], outer[3], outer[4], *((outer[2],) if modulated else ()))
    grads = composite.second_order(function, primals, grad_output, needed, outer_grads)
    grad_grad_output, grad_input, grad_offset, grad_weight, _, *grad_mask = grads
    return (grad_grad_output, grad_input, grad_offset, *(grad_mask or [None]), grad_weight,
            None, None, None, None)  # fmt: skip


def dcnv3(op):
    """The backward of ``dcnv3_backward``, with ``op`` the forward op: linear in input and
    mask."""

    def backward(ctx: Any, *cotangents: Tensor):
        grad_output, *primals = ctx.saved_tensors
        settings = ctx.settings
        unused = [None] * (len(settings) + 1)
        if torch.is_grad_enabled():  # to be differentiated again: the composite throughout
            grads = composite.second_order(
                lambda *primals: composite.dcnv3(*primals, *settings), primals, grad_output,
                ctx.needs_input_grad[1:4], cotangents)  # fmt: skip
            return (*grads, *unused)
        u_input, u_offset, u_mask = map(_cotangent, cotangents)

        def tangent_of(*primals):
            return _tangents.dcnv3(op, primals, (u_input, u_offset, u_mask), settings)

        tangent, grads = _pull_back(ctx, tangent_of, grad_output, primals)
        return (tangent, *grads, *unused)

    return backward
