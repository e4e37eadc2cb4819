"""Small helpers shared by the public functions and layers."""

from __future__ import annotations

import torch

IntOrPair = int | tuple[int, int]
IntOrTriple = int | tuple[int, int, int]

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_COUNT_WORDS = {1: "an int", 2: "an int or a pair of ints", 3: "an int or a triple of ints"}


def _ntuple(value, name: str, n: int) -> tuple[int, ...]:
    """Return ``value`` (an int, or ``n`` ints) as ``n`` Python ints; ``name`` is used in the
    error message."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (int(value),) * n
    if isinstance(value, (tuple, list)) and len(value) == n:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(int(v) for v in value)
    raise TypeError(f"{name} must be {_COUNT_WORDS[n]}, got {value!r}")


def _pair(value: IntOrPair | list[int], name: str) -> tuple[int, int]:
    """Return ``value`` as a pair of Python ints; ``name`` is used in the error message."""
    return _ntuple(value, name, 2)  # type: ignore[return-value]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float64 stays, other floats accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_inputs(*tensors):
    """Under autocast, the floating tensors cast to the autocast dtype (the op then runs in
    it, like a convolution); otherwise the tensors as given."""
    input = tensors[0]
    if not (isinstance(input, torch.Tensor) and torch.is_autocast_enabled(input.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(input.device.type)
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors
    )


class NotScriptable:
    """A layer that ``torch.jit.script`` (deprecated by PyTorch) does not compile: it says so
    and names what works instead, rather than failing inside TorchScript's compiler."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} cannot be compiled by torch.jit.script: use "
            "torch.compile or torch.export (torch.jit.trace works too, but recent PyTorch "
            "deprecates it with torch.jit.script), and torch.onnx.export for ONNX"
        )
