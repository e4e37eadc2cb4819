"""Which path a call takes under torch.func transforms and forward-mode AD.

A custom op's registered autograd serves ordinary autograd, ``torch.compile`` and
``torch.export``, but :mod:`torch.func` does not see through it, and forward-mode AD finds no
formula in it.  An :class:`torch.autograd.Function` with ``setup_context``, a ``jvp`` and a
generated vmap rule works under both; the ones here run the same ops and backward ops, so
the kernels compute ``torch.func.grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd`` and their
``vmap`` (per-sample gradients), with ``J·u`` from :mod:`deformconv._tangents` in forward
mode.  The ops' batching rules (:mod:`deformconv._batching`) make a ``vmap`` one call.

The kernels also compute ``jvp`` of ``grad`` (forward over reverse: Hessian-vector products,
``hessian``) where the offsets do not depend on the ``jvp``'s inputs: the backward ops run
through Functions with a ``jvp`` of their own (:func:`deformconv._tangents.conv_backward`).
Other stacks (``grad`` of ``grad``, ``jvp`` of ``jvp``) would differentiate a backward or a
tangent by a transform, which the ops' formulas do not serve, so such a call runs the
composite (:mod:`deformconv.composite`), differentiable to any order; so do ONNX exports,
transforms under ``torch.compile`` or inside a ``forward_ad`` dual level, and a call with a
``forward_ad`` tangent on its offsets (forward mode cannot run inside a Function's ``jvp``).

PyTorch before 2.5 (no ``torch.library.register_vmap``) runs a custom op's registered autograd
as an autograd.Function without ``setup_context``, which no transform may meet, and its
``torch.compile`` cannot read whether transforms are active: there every transform and
tangent takes the composite, and compiled code takes the op.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
from torch.autograd import forward_ad


class Route(enum.Enum):
    OP = "op"  #: the op, with its registered autograd
    FUNCTION = "function"  #: the op through an autograd.Function (torch.func, tangents)
    COMPOSITE = "composite"  #: the composite, differentiable by anything to any order


_DIFFERENTIATING = (TransformType.Grad, TransformType.Jvp)
#: ``jvp`` of ``grad`` (Hessian-vector products, ``hessian``): the backward ops' tangents.
_FORWARD_OVER_REVERSE = [TransformType.Jvp, TransformType.Grad]

#: Whether the ops can run under transforms and tangents through the Functions (torch>=2.5).
FUNCTIONS_SUPPORTED = hasattr(torch.library, "register_vmap")
#: Whether ``vmap`` of ``jvp`` of ``grad`` (``hessian``) can run through them: PyTorch 2.5's
#: functorch fails there on an internal assertion.
HESSIANS_SUPPORTED = torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)


def _has_tangent(tensors: tuple[Tensor | None, ...]) -> bool:
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _is_jvp_input(tensor: Tensor) -> bool:
    """Whether ``tensor`` may carry a tangent of an active ``jvp`` transform: whether it is
    wrapped at its level, as its inputs and every tensor computed under it are.  Where the
    offsets may, ``jvp`` of ``grad`` runs the composite: the offsets' parts come from it
    anyway, and the kernels around them only add work (RESULTS: 1.3–2.8× the composite's
    time; with the offsets fixed, 0.2–0.6×)."""
    levels = {interpreter.level() for interpreter in retrieve_all_functorch_interpreters()
              if interpreter.key() == TransformType.Jvp}  # fmt: skip
    while torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        if torch._C._functorch.maybe_get_level(tensor) in levels:
            return True
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return False


def route(offset: Tensor, *others: Tensor | None) -> Route:
    """The path of a call on ``offset`` and the op's other tensors in the current context."""
    if torch.onnx.is_in_onnx_export():  # ONNX has no such operator: standard ones
        return Route.COMPOSITE
    dual_level = forward_ad._current_level >= 0
    if not FUNCTIONS_SUPPORTED:
        if torch.compiler.is_compiling():
            return Route.OP
        transformed = torch._C._are_functorch_transforms_active()
        tangents = dual_level and _has_tangent((offset, *others))
        return Route.COMPOSITE if transformed or tangents else Route.OP
    if torch._C._are_functorch_transforms_active():
        if torch.compiler.is_compiling():  # whose tracing cannot read the transforms
            return Route.COMPOSITE
        kinds = [interpreter.key() for interpreter in retrieve_all_functorch_interpreters()]
        differentiating = [kind for kind in kinds if kind in _DIFFERENTIATING]  # outermost first
        # A dual level of the caller's own: torch.func.jvp's is forward_ad's one level, so
        # with a Jvp transform active the level is the transform's.
        own_level = dual_level and TransformType.Jvp not in kinds
        forward_over_reverse = differentiating == _FORWARD_OVER_REVERSE and (
            HESSIANS_SUPPORTED or TransformType.Vmap not in kinds
        )
        stacked = len(differentiating) > 1 and (not forward_over_reverse or _is_jvp_input(offset))
        if stacked or own_level or TransformType.Functionalize in kinds:
            return Route.COMPOSITE
        return Route.FUNCTION if differentiating else Route.OP
    if torch.compiler.is_compiling() or not dual_level:
        return Route.OP
    # forward_ad's tangents: forward mode cannot run inside a Function's jvp, so a tangent
    # of the offsets, whose derivative comes from the composite's forward mode, takes it.
    if _has_tangent((offset,)):
        return Route.COMPOSITE
    return Route.FUNCTION if _has_tangent(others) else Route.OP


class Settings:
    """A Function's non-tensor arguments, passed to it as one: the vmap rule that torch
    generates for a Function's ``jvp`` counts batch dimensions by pytree leaf but tangents by
    argument, so that a list or tuple among the arguments would throw the two out of step."""

    __slots__ = ("values",)

    def __init__(self, values: tuple) -> None:
        self.values = values


def function(name: str, op: Any, setup: Any, backward: Any, tangent: Any,
             tensors: int, saved: int) -> type[torch.autograd.Function]:  # fmt: skip
    """``op`` as an autograd.Function named ``name``, called as ``Function.call(*args)`` with
    the op's arguments: ``setup`` and ``backward`` as for the op's registered autograd, and
    forward mode from ``tangent(op, primals, tangents, settings)``
    (:mod:`deformconv._tangents`): the op's first ``tensors`` arguments have tangents, the rest
    are its settings, and its first ``saved`` are the primals, which ``setup`` saves for the
    backward in that order (the generated vmap rule keeps one set of saved tensors for
    both)."""

    def forward(*args):
        return op(*args[:-1], *args[-1].values)

    def setup_context(ctx, inputs, output):
        inputs = (*inputs[:-1], *inputs[-1].values)
        setup(ctx, inputs, output)
        ctx.set_materialize_grads(False)  # tangents stay None where there are none
        ctx.save_for_forward(*inputs[:saved])
        ctx.forward_settings = inputs[tensors:]

    def backward_of_tensors(ctx, *grads):
        return (*backward(ctx, *grads)[:tensors], None)

    def jvp(ctx, *tangents):
        return tangent(op, ctx.saved_tensors, tangents[:tensors], ctx.forward_settings)

    methods = {"forward": forward, "setup_context": setup_context,
               "backward": backward_of_tensors, "jvp": jvp}  # fmt: skip
    namespace = {key: staticmethod(method) for key, method in methods.items()}

    def call(cls, *args):
        return cls.apply(*args[:tensors], Settings(tuple(args[tensors:])))

    namespace["call"] = classmethod(call)
    return type(name, (torch.autograd.Function,), {"generate_vmap_rule": True, **namespace})
