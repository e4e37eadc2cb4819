"""Small helpers shared by the public functions and layers."""

from __future__ import annotations

import torch

IntOrPair = int | tuple[int, int]

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _pair(value: IntOrPair | list[int], name: str) -> tuple[int, int]:
    """Return ``value`` as a pair of Python ints; ``name`` is used in the error message."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2:
        first, second = value
        if isinstance(first, int) and isinstance(second, int) and not isinstance(first, bool):
            return (int(first), int(second))
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float64 stays, other floats accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
