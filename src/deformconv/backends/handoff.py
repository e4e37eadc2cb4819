"""A forward's sampling plan, kept for its backward.

The plan (corner rows, masked weights, fractional positions) depends only on the offsets, the
mask and the geometry.  The torch backend's forward hands it over (:func:`keep`) when it fits
in :data:`KEEP_BYTES`; the op's autograd takes it into the autograd context right after the
forward (:func:`take`) and offers it to the backward (:func:`offered`, :func:`offer`), which
then skips recomputing it.  Elsewhere (a larger call, under ``torch.compile``, another
backend) the backward recomputes the plan: the results are the same either way.  A plan no
autograd context takes (a forward without gradients) is dropped at the thread's next
forward.

A plan is matched to its tensors by identity (weak references) and version counter, as
autograd's saved tensors are: offsets or a mask changed in place after the forward are never
offered their old plan.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

#: Plans of at most this many bytes are kept from a forward for its backward: the small
#: calls, whose plan costs most relative to the rest; a plan (40 bytes a sample in 2-D) is
#: held from the forward to the backward, as autograd holds saved tensors.
KEEP_BYTES = 4 * 2**20

_local = threading.local()


def _identity(offset: Tensor, mask: Tensor | None) -> tuple:
    """What must not change between a forward and its backward: which tensors (weak
    references, so that a later tensor at the same address never matches) and their
    versions."""
    masks = None if mask is None else (weakref.ref(mask), mask._version)
    return weakref.ref(offset), offset._version, masks


def _same(identity: tuple, offset: Tensor, mask: Tensor | None) -> bool:
    reference, version, masks = identity
    if reference() is not offset or version != offset._version:
        return False
    if masks is None or mask is None:
        return masks is None and mask is None
    return masks[0]() is mask and masks[1] == mask._version


def keep(offset: Tensor, mask: Tensor | None, key: Any, plan: tuple[Tensor, ...] | None) -> None:
    """Hand over the plan of the forward that has just run on ``offset`` and ``mask`` with
    ``key`` (its geometry and dtype); ``None``: none to hand over (replaces an older one)."""
    if plan is not None and sum(t.numel() * t.element_size() for t in plan) > KEEP_BYTES:
        plan = None
    _local.kept = None if plan is None else (_identity(offset, mask), key, plan)


def take(offset: Tensor, mask: Tensor | None) -> tuple | None:
    """The plan the last forward in this thread handed over, if it ran on ``offset`` and
    ``mask`` as they are now; it is handed over once."""
    kept = getattr(_local, "kept", None)
    _local.kept = None
    return kept if kept is not None and _same(kept[0], offset, mask) else None


@contextmanager
def offered(kept: tuple | None) -> Iterator[None]:
    """Offer a plan from :func:`take` to the backward run inside."""
    _local.offered = kept
    try:
        yield
    finally:
        _local.offered = None


def offer(offset: Tensor, mask: Tensor | None, key: Any) -> tuple[Tensor, ...] | None:
    """The plan offered to this backward, if it is the one of ``offset``, ``mask`` and
    ``key``."""
    kept = getattr(_local, "offered", None)
    if kept is None or not _same(kept[0], offset, mask) or kept[1] != key:
        return None
    return kept[2]
