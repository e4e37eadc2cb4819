"""Directional derivatives of the operators: ``J·u`` for tangents ``u`` of their inputs.

The operators are linear in each of input, mask and weight (and affine in bias), so the part
of ``J·u`` along any of them is the operator itself with that argument replaced by its
tangent.  The part along the offsets is the composite's forward-mode derivative
(:mod:`deformconv.composite`), which holds every sample at once, and runs only where the
offsets have a tangent.  Forward-mode AD (:mod:`deformconv._transforms`) and the backward ops'
own backward (:mod:`deformconv._double_backward`) both take ``J·u`` from here.

The backward ops' ``J·u`` (forward mode over reverse: ``jvp`` of ``grad``, ``hessian``) splits
the same way: the gradients are linear in ``grad_output``, and each is linear in each of
input, mask and weight that it depends on (the input's gradient does not depend on the input,
the mask's not on the mask, the weight's not on the weight), so those parts are the backward
ops again; along the offsets, the composite's backward in forward mode.
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


def _gradient_sums(terms: list[tuple[Tensor, ...]], likes: list[Tensor]) -> tuple[Tensor, ...]:
    """Output by output, the sum of the terms' non-empty entries (a term's entry is empty
    where that gradient does not depend on the term's argument); zeros where none is."""
    sums = []
    for i, like in enumerate(likes):
        found = [term[i] for term in terms if term[i] is not None and term[i].numel()]
        sums.append(sum(found[1:], found[0]) if found else like.new_zeros(like.shape))
    return tuple(sums)


def _along_offsets(function: Callable[..., Tensor], grad_output: Tensor, primals: list,
                   index: int, u_offset: Tensor, needs: Sequence[bool]) -> list:  # fmt: skip
    """``J·u`` along the offsets (``primals[index]``) of the gradients of ``function`` (the
    composite) with cotangent ``grad_output``: the needed ones, ``None`` for the others and
    for absent primals (``None``, a missing mask)."""
    present = [i for i, primal in enumerate(primals) if primal is not None]
    wanted = [i for i in present if needs[i]]

    def gradients(offset):
        values = list(primals)
        values[index] = offset

        def of_present(*given):
            full = list(values)
            for i, value in zip(present, given, strict=True):
                full[i] = value
            return function(*full)

        return composite.gradients(of_present, [values[i] for i in present], grad_output,
                                   [needs[i] for i in present])  # fmt: skip

    tangents = dict(zip(wanted, torch.func.jvp(gradients, (primals[index],), (u_offset,))[1],
                        strict=True))  # fmt: skip
    return [tangents.get(i) for i in range(len(primals))]


def conv_backward(op: Callable[..., tuple], primals: Sequence[Tensor | None],
                  tangents: Sequence[Tensor | None], settings: Sequence) -> tuple:  # fmt: skip
    """``J·u`` of ``deform_conv{2,3}d_backward`` (``op``) at ``primals`` = (grad_output,
    input, offset, mask, weight) along ``tangents`` of the same (``None`` for zero);
    ``settings`` = (stride, padding, dilation, needs_grad).  The tangents of the five
    gradients (input, offset, mask, weight, bias)."""
    grad_output, input, offset, mask, weight = primals
    u_grad, u_input, u_offset, u_mask, u_weight = tangents
    *conv, needs = settings
    need_input, need_offset, need_mask, need_weight = needs
    empty = input.new_empty(0)
    likes = [input if need_input else empty, offset if need_offset else empty,
             mask if need_mask and mask is not None else empty, weight if need_weight else empty,
             grad_output.new_empty(weight.shape[0])]  # fmt: skip
    terms = []
    if u_grad is not None:
        terms.append(op(u_grad, input, offset, mask, weight, *conv, needs))
    # Each argument's part: the gradients that depend on it, with it replaced by its tangent;
    # the bias's gradient (the sum of grad_output) depends on none of them.
    for given, args, needed in [
        (u_input, (u_input, offset, mask, weight), (False, need_offset, need_mask, need_weight)),
        (u_mask, (input, offset, u_mask, weight), (need_input, need_offset, False, need_weight)),
        (u_weight, (input, offset, mask, u_weight), (need_input, need_offset, need_mask, False)),
    ]:
        if given is not None:
            terms.append((*op(grad_output, *args, *conv, list(needed))[:4], None))
    if u_offset is not None:
        along = _along_offsets(
            lambda input, offset, mask, weight: composite.deform_conv(
                input, offset, mask, weight, None, *conv),
            grad_output, [input, offset, mask, weight], 1, u_offset, needs,
        )  # fmt: skip
        terms.append((*along, None))
    return _gradient_sums(terms, likes)


def dcnv3_backward(op: Callable[..., tuple], primals: Sequence[Tensor],
                   tangents: Sequence[Tensor | None], settings: Sequence) -> tuple:  # fmt: skip
    """``J·u`` of ``dcnv3_backward`` (``op``) at ``primals`` = (grad_output, input, offset,
    mask) along ``tangents`` of the same; ``settings``: the op's other arguments, needs_grad
    last.  The tangents of the three gradients (input, offset, mask)."""
    grad_output, input, offset, mask = primals
    u_grad, u_input, u_offset, u_mask = tangents
    *others, needs = settings
    need_input, need_offset, need_mask = needs
    empty = input.new_empty(0)
    likes = [t if need else empty for t, need in zip((input, offset, mask), needs, strict=True)]
    terms = []
    if u_grad is not None:
        terms.append(op(u_grad, input, offset, mask, *others, needs))
    for given, args, needed in [
        (u_input, (u_input, offset, mask), (False, need_offset, need_mask)),
        (u_mask, (input, offset, u_mask), (need_input, need_offset, False)),
    ]:
        if given is not None:
            terms.append(op(grad_output, *args, *others, list(needed)))
    if u_offset is not None:
        terms.append(_along_offsets(
            lambda input, offset, mask: composite.dcnv3(input, offset, mask, *others),
            grad_output, [input, offset, mask], 1, u_offset, needs))  # fmt: skip
    return _gradient_sums(terms, likes)
