"""Which implementation runs the deformable-convolution op.

Every backend provides ``forward`` and ``backward`` with the signatures of
:mod:`deformconv.backends.pytorch` (deformable convolution, any dimensionality) and a second
module with those of :mod:`deformconv.backends.pytorch_dcnv3` (DCNv3 / DCNv4).  ``"auto"``
picks the best backend available for the tensors' device; a user can force one with
:func:`set_backend`, the context manager :func:`use_backend`, or the environment variable
``DEFORMCONV_BACKEND``.  A backward pass runs on the setting its forward ran under, wherever
and whenever it runs (outside the ``use_backend`` block, or on autograd's own threads).

>>> import deformconv
>>> deformconv.available_backends()
['auto', 'torch', 'triton']
>>> with deformconv.use_backend("torch"):
...     deformconv.get_backend()
'torch'
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType

import torch

from . import pytorch, pytorch_dcnv3, triton_backend, triton_dcnv3

ENV_VAR = "DEFORMCONV_BACKEND"
AUTO = "auto"

_BACKENDS: dict[str, ModuleType] = {"torch": pytorch, "triton": triton_backend}
#: Each backend's module per operator family.
_OPS: dict[str, dict[str, ModuleType]] = {
    "deform_conv": _BACKENDS,
    "dcnv3": {"torch": pytorch_dcnv3, "triton": triton_dcnv3},
}
_forced: str | None = None
#: The setting of the forward pass that a backward pass is running for (:func:`pinned`);
#: per thread and context, so that it changes nothing for code running beside it.
_pinned: ContextVar[str | None] = ContextVar("deformconv_pinned_backend", default=None)


def available_backends() -> list[str]:
    """The names :func:`set_backend` accepts.  ``"triton"`` needs Triton and a CUDA device;
    where it cannot run a call, that call runs on ``"torch"`` with a warning."""
    return [AUTO, *_BACKENDS]


def _checked(name: str, source: str) -> str:
    if not isinstance(name, str) or name not in available_backends():
        raise ValueError(f"{source} must be one of {available_backends()}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Force backend ``name`` for every later call; ``None`` returns to ``$DEFORMCONV_BACKEND``
    or, when that is unset, ``"auto"``."""
    global _forced
    _forced = None if name is None else _checked(name, "backend")


def get_backend() -> str:
    """The backend setting in force: ``set_backend``'s, else ``$DEFORMCONV_BACKEND``, else auto
    (inside a backward pass: the setting its forward ran under)."""
    pinned_setting = _pinned.get()
    if pinned_setting is not None:
        return pinned_setting
    if _forced is not None:
        return _forced
    from_env = os.environ.get(ENV_VAR, "").strip()
    if from_env:
        return _checked(from_env, f"environment variable {ENV_VAR}")
    return AUTO


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed code with backend ``name``, then restore the previous setting."""
    global _forced
    previous = _forced
    set_backend(name)
    try:
        yield
    finally:
        _forced = previous


@contextmanager
def pinned(setting: str) -> Iterator[None]:
    """Run the enclosed code (a backward pass) under ``setting``, the one its forward pass ran
    under, in this thread and context only."""
    token = _pinned.set(_checked(setting, "backend"))
    try:
        yield
    finally:
        _pinned.reset(token)


def name_of(module: ModuleType) -> str:
    """The name under which backend ``module`` is registered (``"torch"``, ``"triton"``)."""
    for table in _OPS.values():
        for name, registered in table.items():
            if registered is module:
                return name
    raise ValueError(f"{module.__name__} is not a registered backend")


def select(device: torch.device, dims: int = 2, op: str = "deform_conv") -> ModuleType:
    """The backend module that runs ``op`` (``"deform_conv"`` with ``dims`` spatial axes, or
    ``"dcnv3"``) on tensors of ``device`` under the current setting.  "auto" picks the Triton
    kernels for CUDA tensors (2-D and 3-D), the torch backend otherwise."""
    if op not in _OPS:
        raise ValueError(f"op must be one of {sorted(_OPS)}, got {op!r}")
    table = _OPS[op]
    name = get_backend()
    if name == AUTO:
        cuda = device.type == "cuda" and triton_backend.unavailable_reason() is None
        name = "triton" if cuda and dims in (2, 3) else "torch"
    return table[name]
