"""Compiled sampling for the torch backend on the CPU, where the C loops of
:mod:`~deformconv.backends.native` do not run (they take precedence).

The sampling plan, its corner dot products and the offset and mask gradients are dozens of
small tensor operations over all samples, each a pass over memory (and, at small sizes, a
few microseconds of dispatch).  Compiled by ``torch.compile`` (Inductor's C++ code
generation), each function below becomes one fused loop over the samples:

* :func:`corners`: every sample's corner rows, masked corner weights and fractional
  position, which the fused gathers of :mod:`~deformconv.backends.gather` take;
* :func:`dot_terms`: the mask and position gradients from per-corner dot products;
* for tables of narrow rows (:data:`NARROW_ROWS`), where the plan's arithmetic rather than
  the gathers takes the time, the gathers are compiled with the plan, which is then never
  materialised: :func:`columns`, every sample's weighted corner rows, and
  :func:`corner_terms`, the whole backward sampling (plan, corner dot products with the
  column gradient, mask and position gradients).  (N=2, C=64, 56×56, 4 offset groups of 16
  channels: forward+backward 63–67 → 46 ms on 2 cores.)

The functions are plain tensor code: uncompiled they give the same results (up to rounding)
and run wherever compiling does not, which is what the backend falls back to.  Compilation
happens on first use, with dynamic shapes, on one entry per sample (detached, so that no
view relation is guarded on) and with the table's constants as 0-d tensors: once per dtype,
mask / no mask and number of axes, not per input size or geometry.  Inductor keeps what it
compiled in its on-disk cache for later processes.  It needs a C++ compiler at run time:
where compiling fails for any reason the backend warns once and goes on uncompiled.
:func:`set_cpu_compile` (or ``DEFORMCONV_COMPILE=0``) turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

from .plan import Grid, corner_deltas, corner_weights, pairs_of, plan_from_grid, position_grads

ENV_VAR = "DEFORMCONV_COMPILE"
_enabled = _native = True  # set from the environment by set_cpu_compile(None) below
_failure: str | None = None
_compiled: dict[str, object] = {}


def set_cpu_compile(enabled: bool | None) -> None:
    """Compile the torch backend's CPU sampling (``True``: its C loops, else Inductor), or
    not (``False``); ``None``: back to ``$DEFORMCONV_COMPILE`` (default on; ``native``: the C
    loops only).

    >>> set_cpu_compile(False); compile_enabled()
    False
    >>> set_cpu_compile(None)
    """
    global _enabled, _native
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_cpu_compile takes True, False or None, got {enabled!r}")
    setting = os.environ.get(ENV_VAR, "1")
    _enabled = setting not in ("0", "native") if enabled is None else enabled
    _native = setting != "0" if enabled is None else enabled


set_cpu_compile(None)


def compile_enabled() -> bool:
    """Whether the CPU sampling is compiled (see :func:`set_cpu_compile`)."""
    return _enabled


def native_enabled() -> bool:
    """Whether the C corner loops of :mod:`~deformconv.backends.native` may run: unless
    :func:`set_cpu_compile` turned compiling off (``$DEFORMCONV_COMPILE`` ``native`` keeps these
    and turns Inductor off)."""
    return _native


def compile_failure() -> str | None:
    """Why compiling failed in this process, or ``None``."""
    return _failure


def corners(offsets: Tensor, masks: Tensor | None, grid: Grid,
            strict: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """For samples at ``offsets`` ``(M, d)`` with ``masks`` ``(M,)`` (or ``None``): their
    corner rows ``(M, 2**d)``, masked corner weights ``(M, 2**d)`` and fractional positions
    ``(M, d)``; ``strict`` as for :func:`~deformconv.backends.plan.plan_from_grid`."""
    plan = plan_from_grid(offsets, grid, strict)
    weights = plan.weights if masks is None else plan.weights * masks[:, None]
    return plan.rows, weights, torch.stack([high for _, high in plan.pairs], dim=1)


def columns(table: Tensor, offsets: Tensor, masks: Tensor | None, grid: Grid,
            strict: bool = False, bag: int = 1) -> Tensor:  # fmt: skip
    """``(M / bag, D)``: each sample's corner rows of ``table``, weighted and masked, summed
    over ``bag`` consecutive samples (the plan of :func:`corners`)."""
    rows, weights, _ = corners(offsets, masks, grid, strict)
    total = table[rows[:, 0]] * weights[:, :1]
    for corner in range(1, weights.shape[1]):
        total = total + table[rows[:, corner]] * weights[:, corner : corner + 1]
    return total if bag == 1 else total.view(-1, bag, total.shape[-1]).sum(1)


def dot_terms(dots: Tensor, fractions: Tensor, masks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mask gradients ``(M,)`` and masked position gradients ``(M, d)`` of samples with
    fractional positions ``fractions`` ``(M, d)`` (from :func:`corners`), given the dot product
    of every corner's row with the sample's column gradient ``dots`` ``(M, 2**d)``."""
    pairs = pairs_of(fractions)
    mask_grad = (corner_weights(pairs) * dots).sum(1)
    position_grad = position_grads(pairs, dots)
    if masks is not None:
        position_grad = position_grad * masks[:, None]
    return mask_grad, position_grad


def corner_terms(table: Tensor, grad_columns: Tensor, offsets: Tensor, masks: Tensor | None,
                 grid: Grid, strict: bool = False, share: int = 1) -> tuple:  # fmt: skip
    """For samples with column gradient ``grad_columns`` ``(M / share, D)``, shared by
    ``share`` consecutive samples: their first rows ``(M,)``, masked corner weights
    ``(M, 2**d)``, mask gradients ``(M,)`` and position gradients ``(M, d)`` (masked): the
    plan of :func:`corners` and the gradients of :func:`dot_terms`, with the dot products
    gathered in the same loop."""
    rows, weights, fractions = corners(offsets, masks, grid, strict)
    if share > 1:
        sample = torch.arange(rows.shape[0], device=table.device)
        grad_columns = grad_columns[sample // share]
    dots = torch.stack(
        [(table[rows[:, corner]] * grad_columns).sum(1) for corner in range(rows.shape[1])],
        dim=1,
    )
    mask_grad, position_grad = dot_terms(dots, fractions, masks)
    return rows[:, 0], weights, mask_grad, position_grad


@functools.lru_cache(maxsize=64)
def _constants(sizes: tuple, strides: tuple, reaches: tuple, dead: int, index: torch.dtype,
               device: torch.device) -> dict:  # fmt: skip
    def tensors(values, dtype):
        return tuple(torch.tensor(value, dtype=dtype, device=device) for value in values)

    return {"sizes": tensors(sizes, index), "strides": tensors(strides, index),
            "reaches": tensors(reaches, torch.float64),
            "deltas": tensors(corner_deltas(strides), index),
            "dead": torch.tensor(dead, dtype=index, device=device)}  # fmt: skip


def _tensor_constants(grid: Grid, device: torch.device) -> Grid:
    """``grid`` with its numbers as 0-d tensors (and the deltas as a tuple of them), so that
    compiled code does not specialise on them: one compilation serves every geometry; its
    tensors detached (see :func:`run`)."""
    constants = _constants(grid.sizes, grid.strides, grid.reaches, grid.dead, grid.first.dtype,
                           device)  # fmt: skip
    return grid._replace(first=grid.first.detach(),
                         bases=[base.detach() for base in grid.bases], **constants)  # fmt: skip


#: :func:`columns` and :func:`corner_terms` are compiled only for tables of at most this many
#: channels a row: wider rows are gathered faster by :mod:`~deformconv.backends.gather`.
NARROW_ROWS = 32


def active(tensor: Tensor) -> bool:
    """Whether :func:`run` compiles for tensors like ``tensor``: on the CPU, in float32 or
    float64, where :func:`set_cpu_compile` allows and compiling has not failed."""
    return (_enabled and _failure is None and tensor.device.type == "cpu"
            and tensor.dtype in (torch.float32, torch.float64))  # fmt: skip


#: Calls for fewer samples than this run uncompiled: a compiled call costs about 0.1–0.3 ms
#: of fixed overhead (guards and wrappers, more with cold caches), as much as the uncompiled
#: plan of a few thousand samples.
MIN_SAMPLES = 8192


def worthwhile(table: Tensor, samples: int) -> bool:
    """Whether to compile the sampling of ``samples`` samples from ``table``: where
    :func:`active`, for at least :data:`MIN_SAMPLES` samples."""
    return active(table) and samples >= MIN_SAMPLES


def fuses_gathers(table: Tensor) -> bool:
    """Whether the gathers from ``table`` run compiled, in :func:`columns` and
    :func:`corner_terms`: where :func:`active` and the rows are narrow (:data:`NARROW_ROWS`)."""
    return active(table) and table.shape[-1] <= NARROW_ROWS


def run(function, *args, **options):
    """``function(*args, **options)`` (a function of this module), compiled where
    :func:`active` for its first tensor argument.  A :class:`~deformconv.backends.plan.Grid`
    argument gets its numbers as 0-d tensors."""
    global _failure
    like = next(arg for arg in args if isinstance(arg, Tensor))
    if not active(like):
        return function(*args, **options)
    name = function.__name__
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=True)
    # detach(): no view relations, on which the compiled code would otherwise guard.
    inputs = [
        _tensor_constants(arg, like.device) if isinstance(arg, Grid)
        else arg.detach() if isinstance(arg, Tensor) else arg
        for arg in args
    ]  # fmt: skip
    try:
        with torch.no_grad():
            return _compiled[name](*inputs, **options)
    except Exception as error:  # no compiler, a compiler error, an unsupported platform...
        _failure = f"{type(error).__name__}: {str(error).strip()[:300]}"
        warnings.warn(
            f"deformconv: compiling the CPU sampling failed ({_failure}); running it "
            f"uncompiled (same results, slower).  Set {ENV_VAR}=0 to skip compiling.",
            RuntimeWarning,
            stacklevel=2,
        )
        return function(*args, **options)
