"""Directional derivatives of the operators: ``J·u`` for tangents ``u`` of their inputs.

The operators are linear in each of input, mask and weight (and affine in bias), so the part
of ``J·u`` along any of them is the operator itself with that argument replaced by its
tangent.  The part along the offsets is the composite's forward-mode derivative
(:mod:`deformconv.composite`), which holds every sample at once, and runs only where the
offsets have a tangent.  Forward-mode AD (:mod:`deformconv._transforms`) and the backward ops'
own backward (:mod:`deformconv._double_backward`) both take ``J·u`` from here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from . import composite


def _sum(terms: list[Tensor], like: Tensor) -> Tensor:
    """The sum of ``terms``; zeros shaped as ``like`` (requiring grad, so that a pull-back
    through it works) when there are none."""
    if not terms:
        return like.new_zeros(like.shape).requires_grad_()
    return sum(terms[1:], terms[0])


def conv(op: Callable[..., Tensor], primals: Sequence[Tensor | None],
         tangents: Sequence[Tensor | None], settings: Sequence) -> Tensor:  # fmt: skip
    """``J·u`` of ``deform_conv{2,3}d`` (``op``) at ``primals`` = (input, offset, mask,
    weight) along ``tangents`` = (input, offset, mask, weight, bias), ``None`` for a zero
    tangent; ``settings`` = (stride, padding, dilation)."""
    input, offset, mask, weight = primals
    like = input.new_empty(input.shape[0], weight.shape[0], *offset.shape[2:])
    u_input, u_offset, u_mask, u_weight, u_bias = tangents
    terms = [op(*args, None, *settings) for given, args in [
        (u_input, (u_input, offset, mask, weight)),
        (u_mask, (input, offset, u_mask, weight)),
        (u_weight, (input, offset, mask, u_weight)),
    ] if given is not None]  # fmt: skip
    if u_offset is not None:
        terms.append(torch.func.jvp(
            lambda offset: composite.deform_conv(input, offset, mask, weight, None, *settings),
            (offset,), (u_offset,))[1])  # fmt: skip
    if u_bias is not None:
        shape = (-1, *[1] * (like.dim() - 2))
        terms.append(u_bias.reshape(shape).expand_as(like).contiguous())
    return _sum(terms, like)


def dcnv3(op: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor | None],
          settings: Sequence) -> Tensor:  # fmt: skip
    """``J·u`` of ``dcnv3`` (``op``) at ``primals`` = (input, offset, mask) along
    ``tangents`` (``None`` for zero); ``settings``: the op's other arguments."""
    input, offset, mask = primals
    like = input.new_empty(*offset.shape[:3], input.shape[3])
    u_input, u_offset, u_mask = tangents
    terms = [op(*args, *settings) for given, args in [
        (u_input, (u_input, offset, mask)), (u_mask, (input, offset, u_mask)),
    ] if given is not None]  # fmt: skip
    if u_offset is not None:
        terms.append(torch.func.jvp(
            lambda offset: composite.dcnv3(input, offset, mask, *settings),
            (offset,), (u_offset,))[1])  # fmt: skip
    return _sum(terms, like)
