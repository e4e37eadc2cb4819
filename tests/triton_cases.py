"""Helpers shared by the Triton backend's tests: run on CUDA when present, else interpreted."""

from __future__ import annotations

import torch
from torch import Tensor

from cases import Config, make_inputs, output_and_grads
from reference import deform_conv2d_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: ‖actual − float64 reference‖ / ‖reference‖, for the output and every gradient.
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def relative_error(actual: Tensor, expected: Tensor) -> float:
    actual = actual.detach().cpu().double()
    scale = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / scale if scale > 0 else difference


#: Launch settings for ``ops.CONFIG_OVERRIDES`` under which small shapes need several pixel,
#: channel and output blocks.
SMALL_TILES = {
    "forward": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 16},
    "backward_data": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_O": 16},
    "backward_weight": {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 16},
}


def on_device(tensors: dict, dtype: torch.dtype) -> dict:
    return {
        name: None
        if tensor is None
        else tensor.detach().to(DEVICE, dtype).requires_grad_(tensor.requires_grad)
        for name, tensor in tensors.items()
    }


def reference_results(
    config: Config, dtype: torch.dtype, offsets: str = "random", seed: int = 0, tensors=None
):
    """Inputs rounded to ``dtype`` and the float64 reference results on those very values."""
    if tensors is None:
        tensors = make_inputs(config, offsets=offsets, seed=seed, requires_grad=False)
    rounded = {
        name: None if t is None else t.to(dtype).double().requires_grad_(True)
        for name, t in tensors.items()
    }
    return rounded, output_and_grads(
        deform_conv2d_reference, rounded, config, projection_dtype=dtype
    )


def errors(
    fn,
    config: Config,
    dtype: torch.dtype,
    offsets: str = "random",
    seed: int = 0,
    tensors=None,
    layout=None,
):
    """Relative errors of ``fn`` on ``DEVICE`` in ``dtype``: output first, then gradients.
    The inputs are drawn for ``config`` unless ``tensors`` gives them; ``layout`` (a function
    of a tensor) gives each input the memory layout to run with."""
    rounded, (expected, expected_grads) = reference_results(config, dtype, offsets, seed, tensors)
    tensors = on_device(rounded, dtype)
    if layout is not None:
        tensors = {name: None if t is None else layout(t) for name, t in tensors.items()}
    actual, actual_grads = output_and_grads(fn, tensors, config)
    for name, tensor in tensors.items():  # the op writes none of its inputs
        if tensor is not None:
            torch.testing.assert_close(tensor.detach().cpu().double(), rounded[name].detach(),
                                       rtol=0, atol=0, equal_nan=True, msg=name)  # fmt: skip
    assert actual.dtype == dtype and actual.device.type == DEVICE.type
    result = {"output": relative_error(actual, expected)}
    for name, grad in expected_grads.items():
        assert actual_grads[name].dtype == dtype, name
        result[name] = relative_error(actual_grads[name], grad)
    return result
