"""deform_conv3d and its layers against a float64 loop reference of the 3-D definition."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import deformconv
from cases import deterministic_algorithms, needs_kernels, strided_copy


def _trilinear(volume, position):
    """Sample ``volume`` ``(C, D, H, W)`` at ``position`` (d, h, w); corners outside count as
    0."""
    total = volume.new_zeros(volume.shape[0])
    values = [p.item() for p in position]
    if not all(math.isfinite(v) for v in values):
        return total
    lows = [math.floor(v) for v in values]
    fracs = [p - low for p, low in zip(position, lows, strict=True)]
    for corner in itertools.product((0, 1), repeat=3):
        index = [low + bit for low, bit in zip(lows, corner, strict=True)]
        if all(0 <= i < n for i, n in zip(index, volume.shape[1:], strict=True)):
            weight = 1
            for bit, frac in zip(corner, fracs, strict=True):
                weight = weight * (frac if bit else 1 - frac)
            total = total + weight * volume[:, index[0], index[1], index[2]]
    return total


def reference(input, offset, weight, bias, stride, padding, dilation, mask):
    batch, channels = input.shape[:2]
    out_channels, group_in, *kernel = weight.shape
    taps = math.prod(kernel)
    groups = channels // group_in
    offset_groups = offset.shape[1] // (3 * taps)
    group_out, per_offset_group = out_channels // groups, channels // offset_groups
    out_size = offset.shape[2:]
    out = input.new_zeros(batch, out_channels, *out_size)
    for n, *o in itertools.product(range(batch), *(range(s) for s in out_size)):
        samples = []  # (taps, channels)
        for k, tap in enumerate(itertools.product(*(range(s) for s in kernel))):
            parts = []
            for g in range(offset_groups):
                shift = offset[(n, slice(g * 3 * taps + 3 * k, g * 3 * taps + 3 * k + 3), *o)]
                position = [o[a] * stride[a] - padding[a] + tap[a] * dilation[a] + shift[a]
                            for a in range(3)]  # fmt: skip
                chans = slice(g * per_offset_group, (g + 1) * per_offset_group)
                value = _trilinear(input[n, chans], position)
                if mask is not None:
                    value = value * mask[(n, g * taps + k, *o)]
                parts.append(value)
            samples.append(torch.cat(parts))
        samples = torch.stack(samples)
        column = []
        for g in range(groups):
            block = samples[:, g * group_in : (g + 1) * group_in]  # (taps, group_in)
            w = weight[g * group_out : (g + 1) * group_out].reshape(group_out, group_in, taps)
            column.append((w * block.T[None]).sum((1, 2)))
        column = torch.cat(column)
        out[(n, slice(None), *o)] = column if bias is None else column + bias
    return out


# Lopsided: a non-cubic kernel, stride != padding != dilation per axis, two weight groups
# and three offset groups that straddle them.
CONFIG = {
    "batch": 2, "channels": 6, "size": (3, 5, 4), "out_channels": 4, "kernel": (2, 3, 1),
    "stride": (1, 2, 1), "padding": (1, 0, 2), "dilation": (2, 1, 1), "weight_groups": 2,
    "offset_groups": 3,
}  # fmt: skip


def _out_size(config):
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(config["size"], config["kernel"], config["stride"],
                                 config["padding"], config["dilation"], strict=True)
    )  # fmt: skip


def make_inputs(config=CONFIG, dtype=torch.float64, scale=1.5, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    taps = math.prod(config["kernel"])
    out = _out_size(config)
    g = config["offset_groups"]
    offset = rand(config["batch"], 3 * g * taps, *out) * scale
    offset[:, ::5] = offset[:, ::5].round()  # some integer positions
    return {
        "input": rand(config["batch"], config["channels"], *config["size"]),
        "offset": offset,
        "weight": rand(
            config["out_channels"], config["channels"] // config["weight_groups"], *config["kernel"]
        ),
        "bias": rand(config["out_channels"]),
        "mask": torch.rand(config["batch"], g * taps, *out, generator=generator, dtype=dtype),
    }


def _conv_args(config=CONFIG):
    return {name: config[name] for name in ("stride", "padding", "dilation")}


def _run(function, tensors, **args):
    t = tensors
    return function(t["input"], t["offset"], t["weight"], t["bias"], mask=t["mask"], **args)


@pytest.mark.parametrize("modulated", [True, False])
@pytest.mark.usefixtures("cpu_gathers")
def test_forward_and_every_gradient_match_reference(modulated):
    tensors = make_inputs()
    if not modulated:
        tensors["mask"] = None
    leaves = {k: v.requires_grad_() for k, v in tensors.items() if v is not None}
    ours = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    expected = _run(reference, tensors, **_conv_args())
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, list(leaves.values()), grad_out)
    expected_grads = torch.autograd.grad(expected, list(leaves.values()), grad_out)
    for name, mine, theirs in zip(leaves, ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9, msg=name)


def test_gradcheck():
    config = {**CONFIG, "batch": 1, "size": (2, 3, 3), "channels": 2, "out_channels": 2,
              "weight_groups": 1, "offset_groups": 2, "kernel": (2, 2, 1),
              "stride": (1, 1, 2), "padding": (0, 1, 0), "dilation": (1, 1, 1)}  # fmt: skip
    tensors = make_inputs(config, scale=0.7)
    tensors["offset"] += 0.03  # keep positions off the integers, where the gradient jumps
    for tensor in tensors.values():
        tensor.requires_grad_()

    def function(input, offset, weight, bias, mask):
        return deformconv.deform_conv3d(input, offset, weight, bias, mask=mask,
                                        **_conv_args(config))  # fmt: skip

    assert torch.autograd.gradcheck(function, tuple(tensors.values()), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_zero_offsets_equal_conv3d(groups):
    x = torch.randn(2, 4, 5, 6, 7)
    weight = torch.randn(6, 4 // groups, 3, 1, 2)
    bias = torch.randn(6)
    args = {"stride": (2, 1, 1), "padding": (1, 0, 2), "dilation": (1, 2, 3)}
    expected = F.conv3d(x, weight, bias, groups=groups, **args)
    offset = torch.zeros(2, 3 * 6, *expected.shape[2:])
    ours = deformconv.deform_conv3d(x, offset, weight, bias, **args)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


def test_float32_and_non_contiguous_inputs():
    tensors = make_inputs()
    expected = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    strided = {name: t.float().transpose(-1, -2).contiguous().transpose(-1, -2)
               for name, t in tensors.items() if name in ("offset", "mask")}  # fmt: skip
    strided["input"] = torch.cat([tensors["input"].float()] * 2, dim=1)[:, ::2]
    strided["input"].copy_(tensors["input"])
    assert not any(t.is_contiguous() for t in strided.values())
    args = {**strided, "weight": tensors["weight"].float(), "bias": tensors["bias"].float()}
    ours = _run(deformconv.deform_conv3d, args, **_conv_args())
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def test_batch_zero():
    tensors = {k: v[:0] if k not in ("weight", "bias") else v for k, v in make_inputs().items()}
    for tensor in tensors.values():
        tensor.requires_grad_()
    out = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    assert out.shape == (0, 4, *_out_size(CONFIG))
    out.sum().backward()
    assert tensors["weight"].grad.abs().sum() == 0 and tensors["input"].grad.shape[0] == 0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1e30])
@pytest.mark.usefixtures("cpu_gathers")
def test_non_finite_and_far_offsets_sample_zero(bad):
    tensors = make_inputs()
    tensors["offset"][:, :3] = bad  # every coordinate of tap 0 in offset group 0
    tensors["offset"].requires_grad_()
    out = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(tensors["offset"].grad).all()
    assert (tensors["offset"].grad[:, :3] == 0).all()


@pytest.mark.usefixtures("cpu_gathers")
def test_chunked_path_is_identical():
    tensors = make_inputs()
    expected = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    try:
        deformconv.set_column_budget(512)  # forces one output position per chunk
        chunked = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    finally:
        deformconv.set_column_budget(None)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-12)


def test_layers():
    x = torch.randn(2, 4, 3, 6, 5)
    layer = deformconv.DeformableConv3d(4, 6, (2, 3, 3), padding=(1, 1, 0), groups=2)
    expected = F.conv3d(x, layer.weight, layer.bias, padding=(1, 1, 0), groups=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    assert layer.conv_offset.out_channels == 3 * 18
    modulated = deformconv.DeformableConv3d(4, 6, 3, padding=1, modulated=True, mask_scale=2.0,
                                            offset_groups=2)  # fmt: skip
    assert modulated.conv_offset.out_channels == 4 * 2 * 27
    full = F.conv3d(x, modulated.weight, modulated.bias, padding=1)
    torch.testing.assert_close(modulated(x), full, rtol=1e-4, atol=1e-4)
    assert set(modulated.state_dict()) == {"weight", "bias", "conv_offset.weight",
                                           "conv_offset.bias"}  # fmt: skip
    modulated(x).square().sum().backward()
    assert modulated.conv_offset.weight.grad.abs().sum() > 0
    plain = deformconv.DeformConv3d(4, 6, (1, 3, 3), padding=(0, 1, 1), bias=False)
    assert repr(plain) == (
        "DeformConv3d(4, 6, kernel_size=(1, 3, 3), padding=(0, 1, 1), bias=False)"
    )
    offset = torch.randn(2, 27, 3, 6, 5)
    torch.testing.assert_close(
        plain(x, offset), deformconv.deform_conv3d(x, offset, plain.weight, padding=(0, 1, 1))
    )


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"input": torch.zeros(2, 6, 5, 4)}, ValueError,
         r"input must be a 5-D tensor, got 4-D with shape \(2, 6, 5, 4\)"),
        ({"offset": torch.zeros(2, 17, 3, 2, 8)}, ValueError,
         r"offset has 17 channels, expected a positive multiple of 3 \* kernel_d \* kernel_h"
         r" \* kernel_w = 3 \* 2 \* 3 \* 1 = 18"),
        ({"offset": torch.zeros(2, 54, 3, 2, 7)}, ValueError,
         r"offset has shape \(2, 54, 3, 2, 7\), expected \(2, 54, 3, 2, 8\) \(batch, 3 \* offset_"),
        ({"mask": torch.zeros(2, 17, 3, 2, 8)}, ValueError,
         r"mask has shape \(2, 17, 3, 2, 8\), expected \(2, 18, 3, 2, 8\)"),
        ({"stride": (1, 2)}, TypeError, r"stride must be an int or a triple of ints"),
        ({"input": torch.zeros(2, 6, 1, 1, 1)}, ValueError,
         r"input of spatial size \(1, 1, 1\) is too small for kernel \(2, 3, 1\)"),
    ],
)  # fmt: skip
def test_errors(change, error, message):
    args = {**make_inputs(dtype=torch.float32), **_conv_args(), **change}
    with pytest.raises(error, match=message):
        deformconv.deform_conv3d(args["input"], args["offset"], args["weight"], args["bias"],
                                 args["stride"], args["padding"], args["dilation"],
                                 args["mask"])  # fmt: skip


def test_layer_constructor_errors():
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a triple of ints"):
        deformconv.DeformConv3d(4, 4, (3, 3))
    with pytest.raises(ValueError, match=r"in_channels \(4\) must be divisible by offset_"):
        deformconv.DeformableConv3d(4, 4, 3, offset_groups=3)


def test_opcheck_and_compile():
    tensors = make_inputs(dtype=torch.float32)
    op = torch.ops.deformconv.deform_conv3d.default
    args = (tensors["input"].requires_grad_(), tensors["offset"].requires_grad_(),
            tensors["mask"], tensors["weight"].requires_grad_(), tensors["bias"],
            *(list(v) for v in _conv_args().values()))  # fmt: skip
    torch.library.opcheck(op, args)
    torch._dynamo.reset()
    layer = deformconv.DeformableConv3d(4, 6, 3, padding=1, modulated=True)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.1)
    x = torch.randn(1, 4, 3, 5, 5, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert x.grad is not None and layer.conv_offset.weight.grad is not None


def test_half_precision_and_autocast():
    tensors = make_inputs()
    expected = _run(deformconv.deform_conv3d, tensors, **_conv_args())
    for dtype in (torch.float16, torch.bfloat16):
        half = {k: v.to(dtype) for k, v in tensors.items()}
        out = _run(deformconv.deform_conv3d, half, **_conv_args())
        assert out.dtype == dtype
        error = (out.double() - expected).norm() / expected.norm()
        assert error < (1e-2 if dtype == torch.bfloat16 else 2e-3)
    floats = {k: v.float() for k, v in tensors.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _run(deformconv.deform_conv3d, floats, **_conv_args()).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("backend", "dtype", "tolerance"),
    [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-5)],
)
@settings(max_examples=12, deadline=None)
@given(
    size=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),
    kernel=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 2)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 1), st.integers(1, 2)),
    weight_groups=st.integers(1, 2),
    offset_groups=st.integers(1, 2),
    seed=st.integers(0, 2**16),
    strided=st.booleans(),
)
def test_random_configurations(backend, dtype, tolerance, size, kernel, stride, padding,
                               dilation, weight_groups, offset_groups, seed, strided):  # fmt: skip
    if backend == "triton":
        needs_kernels()
    config = {"batch": 1, "channels": 2 * weight_groups * offset_groups, "size": size,
              "out_channels": 2 * weight_groups, "kernel": kernel, "stride": stride,
              "padding": padding, "dilation": dilation, "weight_groups": weight_groups,
              "offset_groups": offset_groups}  # fmt: skip
    if min(_out_size(config)) <= 0:
        return
    tensors = make_inputs(config, seed=seed)
    leaves = {k: v.requires_grad_() for k, v in tensors.items()}
    expected = _run(reference, leaves, **_conv_args(config))
    grad = torch.randn_like(expected)
    theirs = torch.autograd.grad(expected, list(leaves.values()), grad, allow_unused=True)
    theirs = {name: torch.zeros_like(leaf) if g is None else g
              for (name, leaf), g in zip(leaves.items(), theirs, strict=True)}  # fmt: skip
    layout = strided_copy if strided else lambda tensor: tensor
    ours = _outputs_and_grads(tensors, backend, dtype, config, grad, layout=layout)
    for name, value in {"output": expected, **theirs}.items():
        assert ours[name].dtype == dtype, name
        error = (ours[name].double() - value).norm() / max(value.norm(), 1e-300)
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def _outputs_and_grads(tensors, backend, dtype, config=CONFIG, grad_out=None,
                       layout=lambda tensor: tensor):  # fmt: skip
    """The output and every gradient of ``deform_conv3d`` on ``backend`` in ``dtype``, the
    gradients of ``(output · grad_out).sum()`` (``grad_out`` random by default)."""
    leaves = {k: layout(v.detach().to(dtype)).requires_grad_() for k, v in tensors.items()
              if v is not None}  # fmt: skip
    cast = {**dict.fromkeys(tensors), **leaves}
    with deformconv.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch would warn
        out = _run(deformconv.deform_conv3d, cast, **_conv_args(config))
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                                   dtype=torch.float64)  # fmt: skip
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(dtype))
    for name, leaf in leaves.items():  # the op writes none of its inputs
        torch.testing.assert_close(leaf.detach(), tensors[name].to(dtype), rtol=0, atol=0,
                                   equal_nan=True, msg=name)  # fmt: skip
    return {"output": out, **dict(zip(leaves, grads, strict=True))}


@pytest.mark.parametrize(
    ("dtype", "tolerance", "modulated"),
    [(torch.float32, 1e-5, True), (torch.float32, 1e-5, False), (torch.float16, 2e-3, True)],
)
def test_triton_kernels_match_float64(modulated, dtype, tolerance, monkeypatch):
    """The Triton kernels in 3-D (interpreted without a GPU) against the float64 torch
    backend, output and every gradient, on the lopsided configuration with offset groups
    that straddle the weight groups; small tiles, so that every kernel runs several pixel,
    channel and output blocks."""
    needs_kernels()
    from deformconv.kernels import ops
    from triton_cases import SMALL_TILES

    for kernel, config in SMALL_TILES.items():
        monkeypatch.setitem(ops.CONFIG_OVERRIDES, kernel, config)
    config = {**CONFIG, "batch": 1, "channels": 24, "out_channels": 20}  # 2 weight, 3 offset groups
    tensors = make_inputs(config)
    if not modulated:
        tensors["mask"] = None
    rounded = {k: None if v is None else v.to(dtype).double() for k, v in tensors.items()}
    expected = _outputs_and_grads(rounded, "torch", torch.float64, config)
    actual = _outputs_and_grads(rounded, "triton", dtype, config)
    for name, value in expected.items():
        assert actual[name].dtype == dtype
        error = (actual[name].double() - value).norm() / value.norm()
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


@pytest.mark.overflow_checks
def test_triton_kernels_sample_zero_at_non_finite_and_far_offsets():
    """Offsets of NaN (every coordinate of tap 0, offset group 0), infinity (the depth of tap 1,
    group 1) and -1e30 (the width of tap 2, group 2): the Triton kernels agree with the float64
    torch backend, output and every gradient, and no 32-bit index overflows (the interpreter
    checks in this test)."""
    needs_kernels()
    config = {**CONFIG, "batch": 1}
    tensors = make_inputs(config)
    taps = math.prod(config["kernel"])
    with torch.no_grad():
        tensors["offset"][:, 0:3] = math.nan
        tensors["offset"][:, 3 * taps + 3] = math.inf
        tensors["offset"][:, 6 * taps + 6 + 2] = -1e30
    expected = _outputs_and_grads(tensors, "torch", torch.float64, config)
    actual = _outputs_and_grads(tensors, "triton", torch.float32, config)
    for name, value in expected.items():
        assert torch.isfinite(actual[name]).all(), name
        error = (actual[name].double() - value).norm() / value.norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"


@pytest.mark.parametrize(
    ("backend", "dtype", "tolerance"),
    [("torch", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)],
)
def test_strided_unaligned_inputs(backend, dtype, tolerance):
    """Every input a view with doubled strides at an unaligned address, NaN in between."""
    if backend == "triton":
        needs_kernels()
    config = {**CONFIG, "batch": 1}
    tensors = make_inputs(config)
    expected = _outputs_and_grads(tensors, "torch", torch.float64, config)
    actual = _outputs_and_grads(tensors, backend, dtype, config, layout=strided_copy)
    for name, value in expected.items():
        error = (actual[name].double() - value).norm() / value.norm()
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def test_triton_deterministic_mode_is_bit_identical():
    needs_kernels()
    tensors = make_inputs({**CONFIG, "batch": 1})
    with deterministic_algorithms():
        first = _outputs_and_grads(tensors, "triton", torch.float32)
        second = _outputs_and_grads(tensors, "triton", torch.float32)
    expected = _outputs_and_grads(tensors, "torch", torch.float64)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
        error = (value.double() - expected[name]).norm() / expected[name].norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"
