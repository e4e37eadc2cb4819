"""Configurations and random inputs shared by the tests."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import Tensor

from deformconv import _transforms
from deformconv.backends import triton_backend


def needs_kernels() -> None:
    """Skip (the test, or the module when called at its top) unless the Triton kernels can run
    here: Triton installed and a PyTorch with ``torch.library.triton_op`` (2.6 or later)."""
    reason = triton_backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason, allow_module_level=True)


#: Tests of the ops under torch.func transforms and forward-mode tangents through their
#: autograd.Functions, which PyTorch 2.4 cannot run (it runs the composite there).
needs_functions = pytest.mark.skipif(
    not _transforms.FUNCTIONS_SUPPORTED,
    reason=f"torch {torch.__version__} runs transforms on the composite (torch>=2.5 on the ops)",
)


@dataclass(frozen=True)
class Config:
    batch: int = 2
    channels: int = 6
    height: int = 7
    width: int = 9
    out_channels: int = 4
    kernel: tuple[int, int] = (3, 2)
    stride: tuple[int, int] = (2, 1)
    padding: tuple[int, int] = (1, 0)
    dilation: tuple[int, int] = (2, 1)
    weight_groups: int = 2
    offset_groups: int = 3
    use_mask: bool = True
    use_bias: bool = True

    @property
    def out_size(self) -> tuple[int, int]:
        kh, kw = self.kernel
        out_h = (
            self.height + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1
        ) // self.stride[0] + 1
        out_w = (self.width + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[
            1
        ] + 1
        return out_h, out_w

    @property
    def conv_args(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


# Lopsided settings: non-square kernels, stride != padding != dilation, weight groups and
# offset groups that straddle each other, masks and no masks, degenerate sizes.
LOPSIDED = {
    "straddling-groups": Config(),
    "no-mask-no-bias": Config(
        use_mask=False, use_bias=False, offset_groups=2, weight_groups=3, out_channels=6
    ),
    "1x1-kernel": Config(
        kernel=(1, 1), stride=(1, 2), padding=(0, 1), dilation=(1, 1), offset_groups=2
    ),
    "tall-kernel": Config(
        kernel=(5, 1), stride=(3, 1), padding=(2, 3), dilation=(1, 2), weight_groups=1
    ),
    "single-row-input": Config(
        height=1, kernel=(1, 3), stride=(1, 1), padding=(0, 1), dilation=(1, 1)
    ),
    "single-column-input": Config(
        width=1, kernel=(2, 1), padding=(1, 0), dilation=(1, 1), stride=(1, 1)
    ),
    "batch-0": Config(batch=0),
    "batch-3": Config(batch=3, channels=4, out_channels=6, weight_groups=2, offset_groups=4),
}


@st.composite
def random_configs(draw) -> Config:
    """Small configurations of every kind, odd ones included (batch 0, one-pixel images,
    kernels larger than the image, stride 3), whose output is not empty."""
    offset_groups, weight_groups = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    pairs = {name: st.tuples(st.integers(low, high), st.integers(low, high))
             for name, low, high in [("size", 1, 6), ("kernel", 1, 3), ("stride", 1, 3),
                                     ("padding", 0, 2), ("dilation", 1, 2)]}  # fmt: skip
    size, kernel, stride, padding, dilation = (draw(pairs[name]) for name in pairs)
    config = Config(
        batch=draw(st.integers(0, 2)),
        channels=offset_groups * weight_groups * draw(st.integers(1, 2)),
        height=size[0],
        width=size[1],
        out_channels=weight_groups * draw(st.integers(1, 2)),
        kernel=kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        weight_groups=weight_groups,
        offset_groups=offset_groups,
        use_mask=draw(st.booleans()),
        use_bias=draw(st.booleans()),
    )
    assume(min(config.out_size) > 0)
    return config


def make_inputs(
    config: Config,
    dtype: torch.dtype = torch.float64,
    offsets: str = "random",
    seed: int = 0,
    requires_grad: bool = True,
) -> dict[str, Tensor | None]:
    """Inputs for ``deform_conv2d``; ``offsets`` is "random", "integer" or "zero"."""
    generator = torch.Generator().manual_seed(seed)
    kh, kw = config.kernel
    out_h, out_w = config.out_size
    taps = kh * kw

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype)

    offset_shape = (config.batch, 2 * config.offset_groups * taps, out_h, out_w)
    if offsets == "random":
        offset = rand(*offset_shape, scale=2.0)
    elif offsets == "integer":
        offset = torch.randint(-3, 4, offset_shape, generator=generator).to(dtype)
    else:
        offset = torch.zeros(offset_shape, dtype=dtype)
    tensors: dict[str, Tensor | None] = {
        "input": rand(config.batch, config.channels, config.height, config.width),
        "offset": offset,
        "weight": rand(config.out_channels, config.channels // config.weight_groups, kh, kw),
        "mask": (
            torch.rand(
                config.batch,
                config.offset_groups * taps,
                out_h,
                out_w,
                generator=generator,
                dtype=torch.float64,
            ).to(dtype)
            if config.use_mask
            else None
        ),
        "bias": rand(config.out_channels) if config.use_bias else None,
    }
    if requires_grad:
        for tensor in tensors.values():
            if tensor is not None:
                tensor.requires_grad_(True)
    return tensors


def strided_copy(tensor: Tensor, shift: int = 3) -> Tensor:
    """``tensor``'s values in a view whose strides are all doubled, ``shift`` elements into a
    storage filled with NaN elsewhere: not contiguous, not 16-byte aligned, and any read of
    an element between the tensor's own spreads NaN into the results."""
    strides = [2 * stride for stride in torch.empty(tensor.shape).stride()]
    reach = sum((size - 1) * stride for size, stride in zip(tensor.shape, strides, strict=True))
    extent = shift + 1 + reach
    storage = torch.full((extent,), float("nan"), dtype=tensor.dtype, device=tensor.device)
    view = storage.as_strided(tensor.shape, strides, shift)
    view.copy_(tensor.detach())
    return view.requires_grad_(tensor.requires_grad)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` within the context, the previous setting
    after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def differentiable(tensors: dict[str, Tensor | None]) -> dict[str, Tensor]:
    return {
        name: tensor
        for name, tensor in tensors.items()
        if tensor is not None and tensor.requires_grad
    }


def call(fn, tensors: dict[str, Tensor | None], config: Config) -> Tensor:
    return fn(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        config.stride,
        config.padding,
        config.dilation,
        tensors["mask"],
    )


def output_and_grads(
    fn, tensors, config, seed: int = 1, projection_dtype: torch.dtype | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """The output of ``fn`` and the gradients of a random projection of it (whose values are
    rounded to ``projection_dtype`` when given)."""
    out = call(fn, tensors, config)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    projection = projection.to(projection_dtype or out.dtype).to(out.device, out.dtype)
    inputs = differentiable(tensors)
    grads = torch.autograd.grad(out, list(inputs.values()), projection, allow_unused=True)
    return out, {
        name: (torch.zeros_like(tensor) if grad is None else grad)
        for (name, tensor), grad in zip(inputs.items(), grads, strict=False)
    }


def assert_falls_back_once(run, expected, match: str, atol: float = 1e-5) -> None:
    """``run()`` (an ``output_and_grads`` call) warns with a ``RuntimeWarning`` matching
    ``match`` the first time, not the second, and gives ``expected`` both times (gradients
    to ten times ``atol``)."""
    with pytest.warns(RuntimeWarning, match=match):
        first = run()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        again = run()
    for result in (first, again):
        torch.testing.assert_close(result[0], expected[0], atol=atol, rtol=1e-5)
        for name in expected[1]:
            torch.testing.assert_close(result[1][name], expected[1][name], atol=10 * atol,
                                       rtol=1e-5, msg=name)  # fmt: skip
