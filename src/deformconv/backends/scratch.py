"""Reused CPU buffers for temporaries of the torch backends.

A large tensor allocated afresh on every call costs page faults on the CPU: the C allocator
hands freed blocks above its trim threshold back to the system, and every page of the next
allocation faults in again (at N=1, C=256, 14×14, 3×3 about 1900 faults, a fifth of the time
of a forward+backward).  A temporary that never leaves its call is therefore taken from a
buffer kept per thread and per *slot* (one slot per kind of temporary, so that two live
temporaries never share memory).  Buffers are kept up to :data:`SCRATCH_BYTES` per thread in
all; larger needs, and other devices (whose allocators cache), get fresh memory.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

#: At most this many bytes of buffers are kept per thread.
SCRATCH_BYTES = 64 * 2**20

_local = threading.local()


def scratch(slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised contiguous tensor for a temporary that no caller outside the backend
    ever sees: on the CPU a view of this thread's buffer for ``slot``, which the next call
    asking for ``slot`` overwrites."""
    nbytes = math.prod(shape) * dtype.itemsize
    if device.type != "cpu" or nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    buffers: dict[str, Tensor] = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(slot)
    if buffer is None or buffer.numel() < nbytes:
        others = sum(b.numel() for name, b in buffers.items() if name != slot)
        if others + nbytes > SCRATCH_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = buffers[slot] = torch.empty(nbytes, dtype=torch.uint8)
    return buffer[:nbytes].view(dtype).view(shape)


def fresh(view: Tensor, dtype: torch.dtype) -> Tensor:
    """A contiguous copy of ``view`` in ``dtype``, in memory of its own (never a buffer of
    this module): what a backend returns from its temporaries."""
    return torch.empty(view.shape, dtype=dtype, device=view.device).copy_(view)


def release() -> None:
    """Free the buffers the torch backend keeps for the calling thread (up to
    ``SCRATCH_BYTES``, 64 MiB, per thread that has called it); later calls allocate anew."""
    _local.__dict__.pop("buffers", None)


def kept_bytes() -> int:
    """Bytes of buffers this thread keeps."""
    return sum(b.numel() for b in _local.__dict__.get("buffers", {}).values())
