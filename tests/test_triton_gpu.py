"""The Triton backend on a CUDA device: bfloat16, autocast, determinism, 64-bit indexing,
``torch.compile`` and ``opcheck``.  Skipped without a GPU (the interpreter covers the rest)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("torch", minversion="2.6")  # torch.library.triton_op
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import deformconv
from cases import (
    LOPSIDED,
    Config,
    call,
    deterministic_algorithms,
    make_inputs,
    output_and_grads,
    strided_copy,
)
from deformconv.backends import select, triton_backend
from triton_cases import TOLERANCES, errors, on_device

CUDA = torch.device("cuda")


def test_auto_selects_triton_for_cuda_tensors():
    assert select(CUDA) is triton_backend and select(CUDA, 3) is triton_backend


@pytest.mark.parametrize("name", list(LOPSIDED))
def test_bfloat16_matches_float64_reference(name):
    for label, error in errors(deformconv.deform_conv2d, LOPSIDED[name], torch.bfloat16).items():
        assert error <= TOLERANCES[torch.bfloat16], f"{label}: {error:.2e}"


def test_bfloat16_strided_unaligned_inputs():
    """Every input a view with doubled strides at an unaligned address, NaN in between."""
    config = LOPSIDED["straddling-groups"]
    result = errors(deformconv.deform_conv2d, config, torch.bfloat16, layout=strided_copy)
    for label, error in result.items():
        assert error <= TOLERANCES[torch.bfloat16], f"{label}: {error:.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_runs_in_the_autocast_dtype(dtype):
    config = LOPSIDED["straddling-groups"]
    tensors = on_device(make_inputs(config, dtype=torch.float32), torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        out, grads = output_and_grads(deformconv.deform_conv2d, tensors, config)
    assert out.dtype == dtype
    # The same as casting by hand: the op ran in the autocast dtype, not upcast.
    cast = {n: None if t is None else t.detach().to(dtype) for n, t in tensors.items()}
    torch.testing.assert_close(out, call(deformconv.deform_conv2d, cast, config))
    for grad in grads.values():
        assert grad.dtype == torch.float32  # gradients come back in the leaves' dtype


def test_tf32_only_when_allowed():
    config = Config(batch=2, channels=64, height=12, width=12, out_channels=64, kernel=(3, 3),
                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                    offset_groups=1)  # fmt: skip
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = errors(deformconv.deform_conv2d, config, torch.float32)
        torch.set_float32_matmul_precision("high")
        tf32 = errors(deformconv.deform_conv2d, config, torch.float32)
    finally:
        torch.set_float32_matmul_precision(previous)
    assert max(exact.values()) <= 1e-5, exact
    assert max(tf32.values()) <= 5e-4, tf32
    # Every result of a product carries TF32's rounding (the bias gradient is a plain sum).
    assert min(error for name, error in tf32.items() if name != "bias") >= 3e-5, tf32


def test_deterministic_gradients_are_bit_identical():
    config = Config(batch=4, channels=64, height=24, width=24, out_channels=64, kernel=(3, 3),
                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), weight_groups=1,
                    offset_groups=2)  # fmt: skip
    tensors = on_device(make_inputs(config, dtype=torch.float32, seed=9), torch.float32)
    # Offsets that pile many samples onto the same pixels: atomic order matters most there.
    with torch.no_grad():
        tensors["offset"].mul_(0.1).add_(3.0)
    with deterministic_algorithms():
        runs = [output_and_grads(deformconv.deform_conv2d, tensors, config)[1] for _ in range(3)]
    for name in runs[0]:
        assert all(torch.equal(runs[0][name], run[name]) for run in runs[1:]), name


def test_more_than_2_to_the_31_elements():
    # 64 · 5800 · 5800 > 2**31 input elements: addresses need 64 bits.  Compare the last rows
    # with the same computation on a crop that fits 32-bit indexing.
    generator = torch.Generator(device=CUDA).manual_seed(0)
    height = width = 5800
    x = torch.randn(1, 64, height, width, device=CUDA, dtype=torch.float16, generator=generator)
    assert x.numel() > 2**31
    weight = torch.randn(16, 64, 3, 3, device=CUDA, dtype=torch.float16, generator=generator)
    offset = torch.rand(1, 18, height, width, device=CUDA, dtype=torch.float16, generator=generator)
    offset = offset.sub_(0.5)
    for tensor in (x, weight, offset):
        tensor.requires_grad_(True)
    out = deformconv.deform_conv2d(x, offset, weight, padding=1)
    grad_x, grad_offset = torch.autograd.grad(out, (x, offset), torch.ones_like(out))
    rows = slice(height - 8, height)
    crop_x = x.detach()[:, :, rows].clone().requires_grad_(True)
    crop_offset = offset.detach()[:, :, rows].clone().requires_grad_(True)
    crop_out = deformconv.deform_conv2d(crop_x, crop_offset, weight, padding=1)
    crop_grad_x, crop_grad_offset = torch.autograd.grad(
        crop_out, (crop_x, crop_offset), torch.ones_like(crop_out)
    )
    torch.testing.assert_close(out[:, :, height - 6 : height - 2], crop_out[:, :, 2:6])
    torch.testing.assert_close(grad_x[:, :, height - 5 : height - 3], crop_grad_x[:, :, 3:5])
    torch.testing.assert_close(
        grad_offset[:, :, height - 6 : height - 2], crop_grad_offset[:, :, 2:6]
    )


@pytest.mark.parametrize("modulated", [False, True])
def test_torch_compile_fullgraph(modulated):
    torch._dynamo.reset()
    layer = deformconv.DeformableConv2d(16, 16, 3, padding=1, modulated=modulated).to(CUDA)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.1)
    x = torch.randn(2, 16, 12, 12, device=CUDA, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None


def test_triton_op_compiles_with_inductor():
    torch._dynamo.reset()
    config = LOPSIDED["straddling-groups"]
    tensors = on_device(
        make_inputs(config, dtype=torch.float32, requires_grad=False), torch.float32
    )

    def run(input, offset, mask, weight, bias):
        out = torch.ops.deformconv.triton_deform_conv2d(
            input,
            offset,
            mask,
            weight,
            bias,
            config.stride,
            config.padding,
            config.dilation,
            "ieee",
        )
        return out.relu()

    args = [tensors[n] for n in ("input", "offset", "mask", "weight", "bias")]
    torch.testing.assert_close(torch.compile(run, fullgraph=True)(*args), run(*args))


@pytest.mark.parametrize("name", ["straddling-groups", "batch-0"])
def test_opcheck_on_cuda(name):
    config = LOPSIDED[name]
    tensors = on_device(make_inputs(config, dtype=torch.float32), torch.float32)
    args = (
        tensors["input"], tensors["offset"], tensors["mask"], tensors["weight"], tensors["bias"],
        list(config.stride), list(config.padding), list(config.dilation),
    )  # fmt: skip
    torch.library.opcheck(torch.ops.deformconv.deform_conv2d.default, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.deformconv.triton_deform_conv2d.default, (*plain, "ieee"))


def test_layer_matches_torch_backend_on_cuda():
    config = LOPSIDED["batch-3"]
    tensors = on_device(make_inputs(config, dtype=torch.float32), torch.float32)
    actual = call(deformconv.deform_conv2d, tensors, config)
    with deformconv.use_backend("torch"):
        expected = call(deformconv.deform_conv2d, tensors, config)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_shared_memory_per_block_is_the_devices():
    from deformconv.kernels import ops

    device = torch.device("cuda")
    shared = ops.shared_memory_per_block(device)
    properties = torch.cuda.get_device_properties(device)
    expected = getattr(properties, "shared_memory_per_block_optin", None)
    assert shared >= 48 * 1024
    if expected is not None:
        assert shared == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_tensors_on_a_device_that_is_not_current():
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, dtype=torch.float32)
    expected, expected_grads = output_and_grads(deformconv.deform_conv2d, on_device(tensors,
                                                torch.float32), config)  # fmt: skip
    second = {n: None if t is None else t.detach().to("cuda:1").requires_grad_(t.requires_grad)
              for n, t in tensors.items()}  # fmt: skip
    assert torch.cuda.current_device() == 0
    out, grads = output_and_grads(deformconv.deform_conv2d, second, config)
    assert out.device == torch.device("cuda", 1)
    torch.testing.assert_close(out.cpu(), expected.cpu())
    for name, grad in grads.items():
        torch.testing.assert_close(grad.cpu(), expected_grads[name].cpu(), msg=name)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float16, 2e-3),
                                                  (torch.bfloat16, 1e-2)])  # fmt: skip
def test_deform_conv3d_runs_the_triton_kernels(dtype, tolerance):
    """3-D on CUDA: the Triton kernels (no fallback warning) against the float64 torch
    backend, output and every gradient, on the lopsided 3-D configuration."""
    from test_deform_conv3d import CONFIG, _outputs_and_grads, make_inputs

    config = {**CONFIG, "channels": 24, "out_channels": 20}
    tensors = {k: v.cuda() for k, v in make_inputs(config).items()}
    rounded = {k: v.to(dtype).double() for k, v in tensors.items()}
    expected = _outputs_and_grads(rounded, "torch", torch.float64, config)
    actual = _outputs_and_grads(rounded, "triton", dtype, config)
    for name, value in expected.items():
        assert actual[name].dtype == dtype and actual[name].is_cuda
        error = ((actual[name].double() - value).norm() / value.norm()).item()
        assert error <= tolerance, f"{name}: relative error {error:.2e}"


def test_double_backward_and_torch_func_on_cuda():
    """A gradient penalty through the Triton kernels (their first derivatives, the composite's
    second), ``torch.func.grad``, per-sample gradients (``vmap(grad)``, the batching rules)
    and a Hessian-vector product (``jvp`` of ``grad``, the offsets fixed) on CUDA agree with
    the CPU in float64."""
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, requires_grad=False)
    tensors["offset"] = tensors["offset"].round() + 0.5  # away from the kinks at integers
    names = [n for n, t in tensors.items() if t is not None]

    def penalty(device, dtype):
        leaves = {n: tensors[n].to(device, dtype).requires_grad_() for n in names}
        given = dict(tensors, **leaves)
        (grad_input,) = torch.autograd.grad(call(deformconv.deform_conv2d, given, config).sum(),
                                            leaves["input"], create_graph=True)  # fmt: skip
        return torch.autograd.grad(grad_input.square().sum(), list(leaves.values()),
                                   allow_unused=True)  # fmt: skip

    def func_grad(device, dtype):
        values = [tensors[n].to(device, dtype) for n in names]

        def loss(*values):
            given = dict(tensors, **dict(zip(names, values, strict=True)))
            return call(deformconv.deform_conv2d, given, config).square().sum()

        return torch.func.grad(loss, argnums=tuple(range(len(names))))(*values)

    def per_sample(device, dtype):
        values = [tensors[n].to(device, dtype) for n in names]
        in_dims = tuple(None if n in ("weight", "bias") else 0 for n in names)

        def loss(*values):
            given = dict(tensors, **dict(zip(names, values, strict=True)))
            return call(deformconv.deform_conv2d, given, config).square().sum()

        gradients = torch.func.vmap(torch.func.grad(loss, argnums=tuple(range(len(names)))),
                                    in_dims=in_dims)  # fmt: skip
        return gradients(*[v if d is None else v.unsqueeze(1)
                           for v, d in zip(values, in_dims, strict=True)])  # fmt: skip

    def hessian_vector_product(device, dtype):  # the kernels' jvp of grad (offsets fixed)
        values = [tensors[n].to(device, dtype) for n in names]
        fixed = {n: v for n, v in zip(names, values, strict=True) if n == "offset"}
        varied = [n for n in names if n != "offset"]

        def loss(*chosen):
            given = dict(tensors, **fixed, **dict(zip(varied, chosen, strict=True)))
            return call(deformconv.deform_conv2d, given, config).square().sum()

        chosen = [v for n, v in zip(names, values, strict=True) if n != "offset"]
        generator = torch.Generator().manual_seed(3)
        vectors = [torch.randn(v.shape, generator=generator, dtype=torch.float64)
                   .to(device, dtype) for v in chosen]  # fmt: skip
        gradient = torch.func.grad(loss, argnums=tuple(range(len(chosen))))
        products = torch.func.jvp(gradient, tuple(chosen), tuple(vectors))[1]
        return [None if n == "offset" else products[varied.index(n)] for n in names]

    for run in (penalty, func_grad, per_sample, hessian_vector_product):
        expected = run("cpu", torch.float64)
        for name, want, got in zip(names, expected, run(CUDA, torch.float32), strict=True):
            if want is None:
                assert got is None, name
                continue
            error = (got.cpu().double() - want).norm() / want.norm().clamp_min(1e-30)
            assert error <= 1e-4, f"{run.__name__} {name}: {error:.2e}"
