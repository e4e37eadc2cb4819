"""Bounds checks for Triton kernels run in Triton's CPU interpreter.

A kernel launch passes tensors; every address it loads, stores or updates atomically (where
its mask lets it) must lie inside the memory of one of those tensors: from its first element
to its last, as its sizes and strides reach.  :func:`checking_bounds` makes the interpreter
check that for every launch and raise :class:`OutOfBounds`, naming the access, the address
and the tensors' extents, when an access falls outside.  On a GPU such an access would read
another allocation (or fault); in the interpreter it would read whatever lies at the address.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


def _extent(tensor: torch.Tensor) -> tuple[int, int] | None:
    """``[first byte, end)`` of the elements ``tensor`` reaches (``None`` when empty)."""
    if tensor.numel() == 0:
        return None
    low = high = 0
    for size, stride in zip(tensor.shape, tensor.stride(), strict=True):
        reach = (size - 1) * stride
        low, high = (low + reach, high) if reach < 0 else (low, high + reach)
    item = tensor.element_size()
    return tensor.data_ptr() + low * item, tensor.data_ptr() + (high + 1) * item


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from _tensors(value)


class _Launches:
    """The extents of the tensors of the launch the interpreter is running."""

    def __init__(self):
        self.starts = np.zeros(0, dtype=np.uint64)
        self.ends = np.zeros(0, dtype=np.uint64)

    def record(self, args, kwargs) -> None:
        merged: list[list[int]] = []  # the union of the extents (views may overlap or nest)
        for start, end in sorted(filter(None, map(_extent, _tensors([*args, *kwargs.values()])))):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        self.starts = np.array([start for start, _ in merged], dtype=np.uint64)
        self.ends = np.array([end for _, end in merged], dtype=np.uint64)

    def check(self, what: str, pointers, mask, item_size: int) -> None:
        addresses = np.asarray(pointers, dtype=np.uint64)
        if mask is not None:
            addresses = addresses[np.broadcast_to(np.asarray(mask, dtype=bool), addresses.shape)]
        addresses = addresses.ravel()
        if addresses.size == 0:
            return
        index = np.searchsorted(self.starts, addresses, side="right").astype(np.int64) - 1
        inside = index >= 0
        inside[inside] = addresses[inside] + np.uint64(item_size) <= self.ends[index[inside]]
        if not inside.all():
            address = int(addresses[~inside][0])
            extents = ", ".join(f"[{s:#x}, {e:#x})" for s, e in zip(self.starts, self.ends,
                                                                   strict=True))  # fmt: skip
            raise OutOfBounds(
                f"{what} of {item_size} bytes at {address:#x} ({int((~inside).sum())} of "
                f"{addresses.size} addresses outside), the launch's tensors: {extents}"
            )


_HOOKS = ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")


def supported() -> bool:
    """Whether this Triton's interpreter has the parts the checks hook into."""
    from triton.runtime import interpreter

    builder = getattr(interpreter, "interpreter_builder", None)
    executor = getattr(interpreter, "GridExecutor", None)
    return (builder is not None and all(hasattr(builder, name) for name in _HOOKS)
            and hasattr(executor, "_init_args_hst"))  # fmt: skip


@contextlib.contextmanager
def checking_bounds():
    """Within this context every kernel the interpreter runs is checked (see the module);
    with a Triton whose interpreter lacks the parts it hooks into, nothing is
    (``tests/test_interpreter_bounds.py`` then fails)."""
    from triton.runtime import interpreter

    if not supported():
        yield
        return
    builder = interpreter.interpreter_builder
    launches = _Launches()
    real_init = interpreter.GridExecutor._init_args_hst
    real_load, real_store = builder.create_masked_load, builder.create_masked_store
    real_rmw, real_cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = real_init(self, args_dev, kwargs)
        launches.record(args_hst, kwargs_hst)
        return args_hst, kwargs_hst

    def size(pointers) -> int:
        return max(1, pointers.get_element_ty().primitive_bitwidth // 8)

    def load(ptrs, mask, *args):
        launches.check("load", ptrs.data, mask.data, size(ptrs))
        return real_load(ptrs, mask, *args)

    def store(ptrs, value, mask, *args):
        launches.check("store", ptrs.data, mask.data, size(ptrs))
        return real_store(ptrs, value, mask, *args)

    def rmw(op, ptr, value, mask, *args):
        launches.check("atomic update", ptr.data, None if mask is None else mask.data, size(ptr))
        return real_rmw(op, ptr, value, mask, *args)

    def cas(ptr, *args):
        launches.check("atomic compare-and-swap", ptr.data, None, size(ptr))
        return real_cas(ptr, *args)

    patches = [
        (interpreter.GridExecutor, "_init_args_hst", init_args),
        (builder, "create_masked_load", load),
        (builder, "create_masked_store", store),
        (builder, "create_atomic_rmw", rmw),
        (builder, "create_atomic_cas", cas),
    ]
    with contextlib.ExitStack() as stack:
        for owner, name, replacement in patches:
            original = owner.__dict__.get(name)
            stack.callback(
                (lambda o=owner, n=name: delattr(o, n))
                if original is None
                else (lambda o=owner, n=name, v=original: setattr(o, n, v))
            )
            setattr(owner, name, replacement)
        yield
