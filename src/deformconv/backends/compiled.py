"""Compiled sampling for the torch backend on the CPU.

The torch backends' sampling plan, bilinear gather and corner dot products (the
convolution's and DCNv3's) are dozens of small tensor operations over all samples, each a
pass over memory.  Compiled by
``torch.compile`` (Inductor's C++ code generation), each of the two functions below becomes a
fused loop over the samples that never materialises the plan:

* :func:`columns`: every sample's weighted (and masked) sum of its corner rows;
* :func:`corner_terms`: from the column gradient, the mask and position gradients, plus the
  first rows and masked weights that the input gradient's gathers take.

It pays where the table's rows are narrow (many offset groups, few channels): there the
plan's operations, not the gather, take the time (N=2, C=64, 56×56, 4 offset groups of 16
channels: forward+backward 63–67 → 46 ms on 2 cores).  Rows of more than
:data:`NARROW_ROWS` channels keep the uncompiled path.

The uncompiled functions give the same results (up to rounding) and run wherever compiling
does not: they are what the backend falls back to.  Compilation happens on first use, with
dynamic shapes, on one entry per sample (detached, so that no view relation is guarded
on) and with the table's constants as 0-d tensors: once per dtype, mask / no mask and number
of axes, not per input size or geometry.  Inductor keeps what it compiled in its on-disk
cache for later processes.  It needs a C++
compiler at run time: where compiling fails for any reason the backend warns once and goes
on uncompiled.  :func:`set_cpu_compile` (or ``DEFORMCONV_COMPILE=0``) turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
from torch import Tensor

from .plan import Grid, corner_deltas, plan_from_grid

ENV_VAR = "DEFORMCONV_COMPILE"
_enabled = os.environ.get(ENV_VAR, "1") != "0"
_failure: str | None = None
_compiled: dict[str, object] = {}


def set_cpu_compile(enabled: bool | None) -> None:
    """Compile the torch backend's CPU sampling (``True``), or not (``False``); ``None``:
    back to ``$DEFORMCONV_COMPILE`` (default on).

    >>> set_cpu_compile(False); compile_enabled()
    False
    >>> set_cpu_compile(None)
    """
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_cpu_compile takes True, False or None, got {enabled!r}")
    _enabled = os.environ.get(ENV_VAR, "1") != "0" if enabled is None else enabled


def compile_enabled() -> bool:
    """Whether the CPU sampling is compiled (see :func:`set_cpu_compile`)."""
    return _enabled


def compile_failure() -> str | None:
    """Why compiling failed in this process, or ``None``."""
    return _failure


def columns(table: Tensor, offsets: Tensor, masks: Tensor | None, grid: Grid,
            strict: bool = False, bag: int = 1) -> Tensor:  # fmt: skip
    """``(M / bag, D)``: each sample's corner rows of ``table``, weighted and masked, summed
    over ``bag`` consecutive samples; ``offsets`` ``(M, d)``, ``masks`` ``(M,)``; ``strict``
    as for :func:`~deformconv.backends.plan.sampling_plan`."""
    plan = plan_from_grid(offsets, grid, strict)
    weights = plan.weights if masks is None else plan.weights * masks[:, None]
    total = _weighted_corners(table, plan.rows, weights)
    return total if bag == 1 else total.view(-1, bag, total.shape[-1]).sum(1)


def _weighted_corners(table: Tensor, rows: Tensor, weights: Tensor) -> Tensor:
    """``(M, D)``: each sample's corner rows ``rows`` ``(M, 2**d)`` of ``table`` times
    ``weights``, summed."""
    total = table[rows[:, 0]] * weights[:, :1]
    for corner in range(1, weights.shape[1]):
        total = total + table[rows[:, corner]] * weights[:, corner : corner + 1]
    return total


def corner_terms(table: Tensor, grad_columns: Tensor, offsets: Tensor, masks: Tensor | None,
                 grid: Grid, strict: bool = False, share: int = 1,
                 with_columns: bool = False) -> tuple:  # fmt: skip
    """For samples with column gradient ``grad_columns`` ``(M / share, D)``, shared by
    ``share`` consecutive samples: their first rows ``(M,)``, masked corner weights
    ``(M, 2**d)``, mask gradients ``(M,)``, position gradients ``(M, d)`` (masked) and, with
    ``with_columns``, their :func:`columns` (else ``None``), from the same plan."""
    plan = plan_from_grid(offsets, grid, strict)
    if share > 1:
        sample = torch.arange(plan.first.shape[0], device=table.device)
        grad_columns = grad_columns[sample // share]
    dots = torch.stack(
        [(table[plan.rows[:, corner]] * grad_columns).sum(1)
         for corner in range(plan.rows.shape[1])], dim=1,
    )  # fmt: skip
    mask_grad = (plan.weights * dots).sum(1)
    position_grad = plan.position_grads(dots)
    weights = plan.weights
    if masks is not None:
        position_grad = position_grad * masks[:, None]
        weights = weights * masks[:, None]
    sums = _weighted_corners(table, plan.rows, weights) if with_columns else None
    return plan.first, weights, mask_grad, position_grad, sums


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


#: Compiled only for tables of at most this many channels a row: wider rows are gathered as
#: fast by ``embedding_bag``, and the compiled call's fixed cost outweighs what it saves.
NARROW_ROWS = 32


def active(table: Tensor) -> bool:
    """Whether :func:`run` compiles for ``table``: on the CPU, in float32 or float64, with
    narrow rows (:data:`NARROW_ROWS`)."""
    return (_enabled and _failure is None and table.device.type == "cpu"
            and table.dtype in (torch.float32, torch.float64)
            and table.shape[-1] <= NARROW_ROWS)  # fmt: skip


def run(function, *args, **options):
    """``function(*args, **options)`` (:func:`columns` or :func:`corner_terms`, whose last
    positional argument is the grid), compiled where :func:`set_cpu_compile` allows and
    compiling works."""
    global _failure
    if not active(args[0]):
        return function(*args, **options)
    name = function.__name__
    if name not in _compiled:
        _compiled[name] = torch.compile(function, dynamic=True)
    grid = _tensor_constants(args[-1], args[0].device)
    # detach(): no view relations, on which the compiled code would otherwise guard.
    tensors = [arg.detach() if isinstance(arg, Tensor) else arg for arg in args[:-1]]
    try:
        with torch.no_grad():
            return _compiled[name](*tensors, grid, **options)
    except Exception as error:  # no compiler, a compiler error, an unsupported platform...
        _failure = f"{type(error).__name__}: {str(error).strip()[:300]}"
        warnings.warn(
            f"deformconv: compiling the CPU sampling failed ({_failure}); running it "
            f"uncompiled (same results, slower).  Set {ENV_VAR}=0 to skip compiling.",
            RuntimeWarning,
            stacklevel=2,
        )
        return function(*args, **options)
