"""Triton backend of ``deform_conv2d`` and ``deform_conv3d``: fused kernels for CUDA tensors.

The kernels (:mod:`deformconv.kernels`) are compiled at run time by Triton; nothing is built
at install time.  What they do not cover runs on the torch backend instead, with a warning
naming why, once per reason: float64 tensors, devices other than CUDA (CPU tensors run the
kernels only under ``TRITON_INTERPRET=1``, Triton's interpreter), a missing Triton or
``torch.library.triton_op``, or more groups or taps than a launch grid holds.

* float16 and bfloat16 are contracted on tensor cores with float32 accumulation.  float32 is
  contracted exactly unless PyTorch's settings allow TF32 for matrix products
  (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision``);
  then on TF32 tensor cores, the operands rounded to TF32 (relative error about 3e-4).
* Under ``torch.use_deterministic_algorithms(True)`` the input gradient is summed in int64
  fixed point, so every gradient is bit-identical from run to run.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from types import ModuleType

import torch
from torch import Tensor

from . import pytorch

_warned: set[str] = set()


@functools.cache
def unavailable_reason() -> str | None:
    """Why the Triton kernels cannot run at all here, or ``None`` when they can."""
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op (torch>=2.6 has)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def uncovered(input: Tensor) -> str | None:
    """Why the kernels do not take ``input``, or ``None`` when they do."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if input.device.type == "cpu" and not _interpreted():
        return "CPU tensors run the Triton kernels only under TRITON_INTERPRET=1"
    if input.device.type not in ("cuda", "cpu"):
        return f"the Triton kernels do not run on {input.device.type} tensors"
    if input.dim() not in (4, 5):
        return "the Triton kernels cover 2-D and 3-D (1-D runs as 2-D)"
    if input.dtype == torch.float64:
        return "the Triton kernels do not compute in float64"
    return None


#: CUDA's limit on a launch grid along its second and third axes, which hold the kernels'
#: weight groups × output-channel tiles, taps, offset groups and DCNv3 groups.
GRID_LIMIT = 65535


def beyond_grid(**counts: int) -> str | None:
    """Why a launch grid cannot hold ``counts`` (blocks along one axis each, by name), or
    ``None`` when it can."""
    for name, count in counts.items():
        if count > GRID_LIMIT:
            return (f"{count} {name.replace('_', ' ')} exceed the kernels' launch grid "
                    f"(at most {GRID_LIMIT} along an axis)")  # fmt: skip
    return None


def _grid(input: Tensor, offset: Tensor, weight: Tensor) -> str | None:
    taps = math.prod(weight.shape[2:])
    groups = input.shape[1] // max(1, weight.shape[1])
    per_group = weight.shape[0] // max(1, groups)
    offset_groups = offset.shape[1] // max(1, (input.dim() - 2) * taps)
    # Output tiles of at least 16 channels, the kernels' narrowest (kernels.ops' configs).
    return beyond_grid(weight_groups_times_output_tiles=groups * -(-per_group // 16), taps=taps,
                       offset_groups=offset_groups)  # fmt: skip


def fallback(reason: str) -> ModuleType:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"deformconv: the triton backend runs this call on the torch backend: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )
    return pytorch


def _kernels() -> ModuleType:
    from ..kernels import ops

    return ops


def tf32_allowed() -> bool:
    """Whether PyTorch's settings allow TF32 for float32 matrix products."""
    return (torch.backends.cuda.matmul.allow_tf32
            or torch.get_float32_matmul_precision() != "highest")  # fmt: skip


def float32_precision(input: Tensor) -> str:
    """How float32 operands are contracted: on TF32 tensor cores (``"tf32"``) only where
    PyTorch allows TF32 for matrix products; exactly otherwise (``"ieee"``)."""
    if input.dtype != torch.float32 or input.device.type != "cuda":
        return "ieee"
    return "tf32" if tf32_allowed() else "ieee"


def forward(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    reason = uncovered(input) or _grid(input, offset, weight)
    if reason is not None:
        return fallback(reason).forward(
            input, offset, mask, weight, bias, stride, padding, dilation
        )
    _kernels()
    return torch.ops.deformconv.triton_deform_conv2d(
        input, offset, mask, weight, bias, stride, padding, dilation, float32_precision(input)
    )


def backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    needs_grad: tuple[bool, bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor]:
    """Gradients for (input, offset, mask, weight, bias); ``None`` where not requested."""
    reason = uncovered(input) or _grid(input, offset, weight)
    if reason is not None:
        return fallback(reason).backward(
            grad_output, input, offset, mask, weight, stride, padding, dilation, needs_grad
        )
    _kernels()
    grads = torch.ops.deformconv.triton_deform_conv2d_backward(
        grad_output,
        input,
        offset,
        mask,
        weight,
        stride,
        padding,
        dilation,
        list(needs_grad),
        float32_precision(input),
        torch.are_deterministic_algorithms_enabled(),
    )
    wanted = (*needs_grad, True)
    return tuple(g if need else None for g, need in zip(grads, wanted, strict=True))  # type: ignore[return-value]
