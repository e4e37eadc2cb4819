"""The Triton backend against the float64 reference: forward and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter (see ``conftest.py``), on small
shapes, in float32 and float16; bfloat16 and the CUDA-only paths are in ``test_triton_gpu.py``.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

pytest.importorskip("triton")
pytest.importorskip("torch", minversion="2.6")  # torch.library.triton_op

import triton
import triton.language as tl

import deformconv
from cases import (
    LOPSIDED,
    Config,
    call,
    deterministic_algorithms,
    make_inputs,
    output_and_grads,
    random_configs,
    strided_copy,
)
from deformconv.backends import triton_backend
from deformconv.kernels.deform_conv2d import round_to_tf32
from triton_cases import (
    DEVICE,
    SMALL_TILES,
    TOLERANCES,
    errors,
    on_device,
    reference_results,
    relative_error,
)

DTYPES = [torch.float32, torch.float16]
# Channels that need several blocks, weight groups and offset groups that straddle each other.
WIDE = Config(
    batch=2, channels=40, height=11, width=13, out_channels=36, kernel=(3, 3),
    stride=(1, 2), padding=(1, 2), dilation=(1, 2), weight_groups=2, offset_groups=4,
)  # fmt: skip
# The same channels and groups on 40 output pixels: with 16-wide tiles every kernel runs
# several pixel, channel and output blocks, each axis's last one partly empty.
WIDE_FEW_PIXELS = dataclasses.replace(WIDE, height=5, width=7)


def triton_deform_conv2d(*args, **kwargs):
    with deformconv.use_backend("triton"):
        return deformconv.deform_conv2d(*args, **kwargs)


def assert_within_tolerance(result: dict, dtype: torch.dtype) -> None:
    for name, error in result.items():
        assert error <= TOLERANCES[dtype], f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(LOPSIDED))
def test_matches_float64_reference(name, dtype):
    assert_within_tolerance(errors(triton_deform_conv2d, LOPSIDED[name], dtype), dtype)


# On a GPU each new setting compiles the kernels anew: fewer examples there.
@settings(max_examples=20 if DEVICE.type == "cpu" else 6, deadline=None)
@given(config=random_configs(), offsets=st.sampled_from(["random", "integer"]),
       seed=st.integers(0, 2**16), strided=st.booleans(), deterministic=st.booleans())  # fmt: skip
def test_random_configurations(config, offsets, seed, strided, deterministic):
    """Odd small configurations (batch 0, one-pixel images, kernels larger than the image),
    inputs strided or not, deterministic mode or not, against the float64 reference, forward
    and every gradient, in float32."""
    with deterministic_algorithms(deterministic):
        result = errors(triton_deform_conv2d, config, torch.float32, offsets=offsets, seed=seed,
                        layout=strided_copy if strided else None)  # fmt: skip
    assert_within_tolerance(result, torch.float32)


@pytest.mark.parametrize("offsets", ["integer", "zero"])
def test_matches_reference_at_integer_positions(offsets):
    config = LOPSIDED["straddling-groups"]
    result = errors(triton_deform_conv2d, config, torch.float32, offsets=offsets)
    assert_within_tolerance(result, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_channel_blocks(dtype):
    assert_within_tolerance(errors(triton_deform_conv2d, WIDE, dtype, seed=1), dtype)


def test_small_tiles_give_the_same_results(monkeypatch):
    from deformconv.kernels import ops

    assert WIDE_FEW_PIXELS.out_size == (5, 4)
    for kernel, config in SMALL_TILES.items():
        monkeypatch.setitem(ops.CONFIG_OVERRIDES, kernel, config)
    result = errors(triton_deform_conv2d, WIDE_FEW_PIXELS, torch.float32)
    assert_within_tolerance(result, torch.float32)


def test_64_bit_indexing_gives_the_same_results(monkeypatch):
    from deformconv.kernels import ops

    config = LOPSIDED["batch-3"]
    tensors = on_device(make_inputs(config, dtype=torch.float32, seed=3), torch.float32)
    expected, expected_grads = output_and_grads(triton_deform_conv2d, tensors, config)
    monkeypatch.setattr(ops, "_INT32_LIMIT", 8)  # every tensor takes the int64 path
    assert ops.needs_int64(tensors["input"])
    actual, actual_grads = output_and_grads(triton_deform_conv2d, tensors, config)
    # The same sums, up to the order of the atomic adds.
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_unaligned_inputs(dtype):
    """Every input a view with doubled strides at an unaligned address, NaN in between."""
    config = LOPSIDED["straddling-groups"]
    assert_within_tolerance(errors(triton_deform_conv2d, config, dtype, layout=strided_copy),
                            dtype)  # fmt: skip


@pytest.mark.parametrize("gather_channels_last", [True, False])
def test_non_contiguous_and_channels_last_inputs(monkeypatch, gather_channels_last):
    from deformconv.kernels import ops

    monkeypatch.setattr(ops, "GATHER_CHANNELS_LAST", gather_channels_last)
    config = LOPSIDED["batch-3"]
    tensors = on_device(make_inputs(config, dtype=torch.float32, seed=2), torch.float32)
    expected, expected_grads = output_and_grads(deformconv.deform_conv2d, tensors, config)
    twisted = {
        name: None
        if tensor is None
        else (
            tensor.detach().transpose(0, -1).contiguous().transpose(0, -1).requires_grad_(True)
            if tensor.dim() > 1
            else tensor.detach().repeat_interleave(2)[::2].requires_grad_(True)
        )
        for name, tensor in tensors.items()
    }
    twisted["input"] = tensors["input"].detach().to(memory_format=torch.channels_last)
    twisted["input"].requires_grad_(True)
    for name, tensor in twisted.items():  # the same values in other layouts
        if tensor is not None:
            assert torch.equal(tensor, tensors[name]) and not tensor.is_contiguous(), name
    actual, actual_grads = output_and_grads(triton_deform_conv2d, twisted, config)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(actual_grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_deterministic_mode_is_bit_identical_and_exact(monkeypatch):
    from deformconv.kernels import ops

    for kernel, config in SMALL_TILES.items():
        monkeypatch.setitem(ops.CONFIG_OVERRIDES, kernel, config)
    config = WIDE_FEW_PIXELS
    rounded, (expected, expected_grads) = reference_results(config, torch.float32, seed=6)
    tensors = on_device(rounded, torch.float32)
    with deterministic_algorithms():
        first = output_and_grads(triton_deform_conv2d, tensors, config)
        second = output_and_grads(triton_deform_conv2d, tensors, config)
    (out, grads), (out_again, grads_again) = first, second
    assert torch.equal(out, out_again)
    assert relative_error(out, expected) <= TOLERANCES[torch.float32]
    for name, grad in expected_grads.items():
        assert torch.equal(grads[name], grads_again[name]), name
        assert relative_error(grads[name], grad) <= TOLERANCES[torch.float32], name


def test_deterministic_mode_with_an_empty_batch():
    config = LOPSIDED["batch-0"]
    with deterministic_algorithms():
        assert_within_tolerance(errors(triton_deform_conv2d, config, torch.float32),
                                torch.float32)  # fmt: skip


# The interpreter converts the NaN sums to int64 with numpy, which warns; CUDA does not.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.overflow_checks
def test_deterministic_mode_propagates_nan_gradients():
    config = LOPSIDED["straddling-groups"]
    tensors = on_device(make_inputs(config, dtype=torch.float32), torch.float32)
    out = call(triton_deform_conv2d, tensors, config)
    projection = torch.ones_like(out)
    projection[0, 0, 0, 0] = float("nan")
    with deterministic_algorithms():
        (grad_input,) = torch.autograd.grad(out, tensors["input"], projection)
    assert torch.isnan(grad_input).any()


@pytest.mark.overflow_checks
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e30])
def test_non_finite_offsets_sample_zero(bad):
    config = LOPSIDED["straddling-groups"]
    tensors = on_device(make_inputs(config, dtype=torch.float32), torch.float32)
    with torch.no_grad():
        tensors["offset"][:, 0] = bad
    out, grads = output_and_grads(triton_deform_conv2d, tensors, config)
    with deformconv.use_backend("torch"):
        expected, expected_grads = output_and_grads(deformconv.deform_conv2d, tensors, config)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, grad in expected_grads.items():
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-5, msg=name)


def test_float64_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.setattr(triton_backend, "_warned", set())
    config = LOPSIDED["no-mask-no-bias"]
    tensors = on_device(make_inputs(config, requires_grad=False), torch.float64)
    with deformconv.use_backend("torch"):
        expected = call(deformconv.deform_conv2d, tensors, config)
    with pytest.warns(RuntimeWarning, match="float64"):
        actual = call(triton_deform_conv2d, tensors, config)
    torch.testing.assert_close(actual, expected, atol=0, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(triton_deform_conv2d, tensors, config)  # the same reason warns only once


def test_cpu_tensors_without_the_interpreter_fall_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_backend, "_warned", set())
    config = LOPSIDED["no-mask-no-bias"]
    tensors = make_inputs(config, dtype=torch.float32, requires_grad=False)
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
        actual = call(triton_deform_conv2d, tensors, config)
    with deformconv.use_backend("torch"):
        torch.testing.assert_close(actual, call(deformconv.deform_conv2d, tensors, config))


@pytest.mark.parametrize("kind", ["weight groups", "offset groups"])
def test_more_groups_than_a_launch_grid_holds_fall_back(monkeypatch, kind):
    """65536 one-channel groups: more blocks than CUDA's grid takes along an axis; the call
    runs on the torch backend with a warning saying so, forward and backward."""
    monkeypatch.setattr(triton_backend, "_warned", set())
    channels = triton_backend.GRID_LIMIT + 1
    x = torch.randn(1, channels, 1, 2, device=DEVICE, requires_grad=True)
    groups = channels if kind == "weight groups" else 1
    weight = torch.randn(channels if groups > 1 else 1, channels // groups, 1, 1, device=DEVICE)
    offset = torch.randn(1, 2 * (1 if groups > 1 else channels), 1, 2, device=DEVICE)
    with deformconv.use_backend("torch"):
        expected = deformconv.deform_conv2d(x, offset, weight)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    with pytest.warns(RuntimeWarning, match=f"{channels} {kind}.*exceed the kernels' launch grid"):
        actual = triton_deform_conv2d(x, offset, weight)
        (actual_grad,) = torch.autograd.grad(actual.sum(), x)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(actual_grad, expected_grad)
    dcnv3_input = x.detach().reshape(1, 1, 2, channels).contiguous()
    with pytest.warns(RuntimeWarning, match=f"{channels} groups exceed"):
        with deformconv.use_backend("triton"):
            deformconv.dcnv3(dcnv3_input, torch.zeros(1, 1, 2, 2 * channels, device=DEVICE),
                             torch.ones(1, 1, 2, channels, device=DEVICE), kernel_size=1,
                             group=channels, group_channels=1)  # fmt: skip


def test_float32_precision_follows_pytorch_settings():
    x = torch.zeros(1, device=DEVICE)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_backend.float32_precision(x) == "ieee"
        torch.set_float32_matmul_precision("high")
        expected = "tf32" if DEVICE.type == "cuda" else "ieee"
        assert triton_backend.float32_precision(x) == expected
        assert triton_backend.float32_precision(x.half()) == "ieee"
    finally:
        torch.set_float32_matmul_precision(previous)


def _nearest_tf32(x: Tensor) -> Tensor:
    """float32 ``x`` to the nearest value with 10 mantissa bits, ties away from zero, chosen
    by comparing the two neighbours in float64 (IEEE rounding: past the largest value, to
    infinity)."""
    low = (x.view(torch.int32) & ~0x1FFF).view(torch.float32)  # towards zero
    high = (low.view(torch.int32) + 0x2000).view(torch.float32)  # away from zero
    # Past the largest value ``high`` is infinity, which stands for 2**128 in the comparison.
    high_value = torch.where(high.isinf(), high.sign().double() * 2.0**128, high.double())
    nearer_high = (x.double() - high_value).abs() <= (x.double() - low.double()).abs()
    result = torch.where(nearer_high, high, low)
    return torch.where(torch.isfinite(x), result, x)


@triton.jit
def _round_to_tf32_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(out_ptr + i, round_to_tf32(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def test_round_to_tf32_rounds_to_nearest_ties_away():
    bits = torch.tensor([0x3F801000, 0x3F800FFF, 0x3F803000, 0xBF801000, 0x7F7FFFFF, 0x00001000,
                         0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7FFFFFFF],
                        dtype=torch.int64).to(torch.int32)  # fmt: skip
    spread = torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))
    x = torch.cat([bits.view(torch.float32), spread])
    out = torch.empty_like(x)
    _round_to_tf32_kernel[(1,)](x, out, x.numel(), BLOCK=1024)
    expected = _nearest_tf32(x)
    assert torch.equal(out[~x.isnan()], expected[~x.isnan()])
    assert out.isnan().equal(x.isnan())
    assert (out.view(torch.int32)[~x.isnan()] & 0x1FFF == 0).all()  # 10 mantissa bits left
    assert out[0] == 1.0 + 2.0**-10 and out[1] == 1.0 and out[2] == 1.0 + 2.0**-9  # ties away


def test_tf32_products_round_their_operands(monkeypatch):
    """With TF32 allowed, all three matrix products (forward, column gradient, weight
    gradient) round their float32 operands to TF32: the output and every gradient but the
    bias's carry TF32's rounding error, within the bound for TF32."""
    monkeypatch.setattr(triton_backend, "float32_precision", lambda input: "tf32")
    config = Config(batch=2, channels=64, height=7, width=9, out_channels=32, kernel=(3, 3),
                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                    offset_groups=2)  # fmt: skip
    result = errors(triton_deform_conv2d, config, torch.float32)
    for name, error in result.items():
        if name == "bias":
            assert error <= TOLERANCES[torch.float32], f"{name}: {error:.2e}"
        else:
            assert 3e-5 <= error <= 5e-4, f"{name}: {error:.2e}"


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_wide_float32_tiles_with_partial_blocks(monkeypatch, precision):
    """160 output channels: float32's weight gradient takes them in 128-wide tiles (the second
    one part empty), its forward under TF32 in one 256-wide tile (96 columns empty)."""
    from deformconv._geometry import geometry
    from deformconv.kernels import ops

    monkeypatch.setattr(triton_backend, "float32_precision", lambda input: precision)
    config = Config(batch=1, channels=8, height=5, width=6, out_channels=160, kernel=(3, 2),
                    stride=(1, 1), padding=(1, 0), dilation=(1, 1), weight_groups=1,
                    offset_groups=2)  # fmt: skip
    tensors = make_inputs(config, requires_grad=False)
    shape = geometry(tensors["input"], tensors["offset"], tensors["weight"], config.stride,
                     config.padding, config.dilation)  # fmt: skip
    assert ops.backward_weight_config(shape, torch.float32)["BLOCK_N"] == 128
    wide = 256 if precision == "tf32" else 128
    assert ops.forward_config(shape, torch.float32, precision)["BLOCK_N"] == wide
    result = errors(triton_deform_conv2d, config, torch.float32, tensors=tensors)
    bound = 5e-4 if precision == "tf32" else TOLERANCES[torch.float32]
    for name, error in result.items():
        assert error <= bound, f"{name}: {error:.2e}"


def test_forward_tile_fits_the_devices_shared_memory():
    """The 128-pixel half-precision forward tile needs about 104 KiB of shared memory: only
    where a block may have 128 KiB or more (A100, H100), not on sm_86/sm_89's 99 KiB; the
    256-wide TF32 tile needs up to 104 KiB too."""
    from deformconv._geometry import geometry
    from deformconv.kernels import ops

    x, offset = torch.empty(8, 256, 64, 64), torch.empty(8, 18, 64, 64)
    shape = geometry(x, offset, torch.empty(256, 256, 3, 3), (1, 1), (1, 1), (1, 1))
    tile = {shared: ops.forward_config(shape, torch.bfloat16, "ieee", shared)["BLOCK_M"]
            for shared in (None, 99 * 1024, 163 * 1024, 227 * 1024)}  # fmt: skip
    assert tile == {None: 128, 99 * 1024: 64, 163 * 1024: 128, 227 * 1024: 128}
    # Under TF32 the 256-wide tile likewise.
    width = {shared: ops.forward_config(shape, torch.float32, "tf32", shared)["BLOCK_N"]
             for shared in (None, 99 * 1024, 227 * 1024)}  # fmt: skip
    assert width == {None: 256, 99 * 1024: 128, 227 * 1024: 256}
    assert ops.shared_memory_per_block(torch.device("cpu")) is None


def test_launches_are_made_on_the_inputs_device(monkeypatch):
    """Triton launches on the current CUDA device; every launch runs inside
    ``launching_on(input.device)``, which makes the input's device current."""
    from deformconv.kernels import ops

    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or _Nothing())
    with ops.launching_on(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    entered.clear()
    with ops.launching_on(torch.device("cpu")):  # the interpreter: nothing to switch
        pass
    assert entered == []

    devices = []
    real = ops.launching_on
    monkeypatch.setattr(ops, "launching_on", lambda device: devices.append(device) or real(device))
    config = LOPSIDED["straddling-groups"]
    tensors = on_device(make_inputs(config, dtype=torch.float32), torch.float32)
    out = call(triton_deform_conv2d, tensors, config)
    out.sum().backward()
    assert devices == [DEVICE, DEVICE]  # the forward, then the backward's launches


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_corner_of_positions_that_round_across_an_integer():
    # x = 100 + Δ with Δ = -1e-6 rounds to 100.0 in float32; the corners must be those of 99.
    config = Config(
        batch=1, channels=2, height=3, width=128, out_channels=2, kernel=(1, 1), stride=(1, 1),
        padding=(0, 0), dilation=(1, 1), weight_groups=1, offset_groups=1, use_mask=False,
    )  # fmt: skip
    tensors = make_inputs(config, dtype=torch.float32, offsets="zero", requires_grad=False)
    tensors["offset"][:, 1] = -1e-6
    assert_within_tolerance(
        errors(triton_deform_conv2d, config, torch.float32, tensors=tensors), torch.float32
    )


@triton.jit
def _square_kernel(x_ptr, out_ptr):
    x = tl.load(x_ptr)
    tl.store(out_ptr, x * x)


def _square_int32(x: int) -> int:
    value = torch.tensor([x], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(value)
    _square_kernel[(1,)](value, out)
    return int(out.item())


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's checks")
@pytest.mark.overflow_checks
def test_marked_tests_keep_the_interpreters_overflow_checks():
    assert _square_int32(1000) == 1000 * 1000
    with pytest.raises(Exception, match="overflow"):
        _square_int32(1 << 16)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the interpreter's checks")
def test_other_tests_run_without_them():
    assert _square_int32(1 << 16) == 0  # 2**32 wraps to 0 in 32 bits
