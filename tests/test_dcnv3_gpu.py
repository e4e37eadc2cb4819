"""The DCNv3 / DCNv4 Triton kernels on a CUDA device: half precision against float64, the
layers under ``torch.compile`` with Inductor, ``opcheck``.  Skipped without a GPU (the
interpreter tests in test_dcnv3.py cover the kernels' arithmetic)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("torch", minversion="2.6")  # torch.library.triton_op
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import deformconv
from cases import deterministic_algorithms
from deformconv.backends import select, triton_dcnv3
from test_dcnv3 import CASES, _args, make_inputs, op_args

TOLERANCES = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def test_auto_selects_the_kernels_for_cuda_tensors():
    assert select(torch.device("cuda"), op="dcnv3") is triton_dcnv3


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_output_and_gradients_against_float64(name, dtype):
    case = CASES[name]
    tensors = {k: v.cuda() for k, v in make_inputs(case).items()}

    def run(cast, backend):
        leaves = {k: v.to(cast).requires_grad_() for k, v in tensors.items()}
        with deformconv.use_backend(backend):
            out = deformconv.dcnv3(leaves["input"], leaves["offset"], leaves["mask"],
                                   **_args(case))  # fmt: skip
        grads = torch.autograd.grad(out, list(leaves.values()), grad_output.to(cast))
        return [out, *grads]

    out_shape = (*tensors["offset"].shape[:3], tensors["input"].shape[3])
    grad_output = torch.randn(out_shape, device="cuda", dtype=torch.float64)
    # The reference sees the same rounded inputs: rounding an offset onto an integer moves
    # the bilinear corner, which changes the offset gradient by a step, not by rounding.
    tensors = {k: v.to(dtype).double() for k, v in tensors.items()}
    expected = run(torch.float64, "torch")
    for label, ours, theirs in zip(("out", "input", "offset", "mask"), run(dtype, "triton"),
                                   expected, strict=True):  # fmt: skip
        error = ((ours.double() - theirs).norm() / theirs.norm().clamp_min(1e-30)).item()
        assert error <= TOLERANCES[dtype], f"{label}: {error:.2e}"


@pytest.mark.parametrize("layer_class", [deformconv.DCNv3, deformconv.DCNv4])
def test_layers_compile_with_inductor(layer_class):
    torch._dynamo.reset()
    layer = layer_class(channels=64, group=4).cuda()
    x = torch.randn(2, 14, 14, 64, device="cuda", requires_grad=True)
    if layer_class is deformconv.DCNv4:
        x = x.detach().flatten(1, 2).requires_grad_()
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if name.startswith(("offset", "mask")):
                parameter.normal_(std=0.1)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-4)
    compiled(x).sum().backward()
    assert x.grad is not None


def test_opcheck_on_cuda():
    case = CASES["lopsided"]
    tensors = {k: v.cuda().float().requires_grad_() for k, v in make_inputs(case).items()}
    args = op_args(tensors, case)
    torch.library.opcheck(torch.ops.deformconv.dcnv3.default, args)
    # The Triton op has no autograd of its own (the dcnv3 op's autograd calls its backward).
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(torch.ops.deformconv.triton_dcnv3.default, plain)


def test_deterministic_gradients_are_bit_identical():
    case = CASES["lopsided"]
    tensors = {k: v.cuda().float() for k, v in make_inputs(case, batch=8).items()}
    grad = None
    runs = []
    with deterministic_algorithms():
        for _ in range(3):
            leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
            out = deformconv.dcnv3(leaves["input"], leaves["offset"], leaves["mask"],
                                   **_args(case))  # fmt: skip
            grad = torch.randn_like(out) if grad is None else grad
            runs.append(torch.autograd.grad(out, list(leaves.values()), grad))
    for run in runs[1:]:
        for first, other in zip(runs[0], run, strict=True):
            assert torch.equal(first, other)


@pytest.mark.parametrize(
    "settings",
    [{"BLOCK_Q": 128, "num_warps": 8}, {"BLOCK_Q": 16, "BLOCK_D": 4, "num_warps": 2}],
    ids=["wide-tiles", "narrow-blocks"],
)
def test_kernel_settings_compiled(settings, monkeypatch):
    from deformconv.kernels import dcnv3_ops

    monkeypatch.setitem(dcnv3_ops.CONFIG_OVERRIDES, "forward", settings)
    monkeypatch.setitem(dcnv3_ops.CONFIG_OVERRIDES, "backward", settings)
    for name in ("lopsided", "wide-groups"):
        case = CASES[name]
        tensors = {k: v.cuda() for k, v in make_inputs(case).items()}
        results = {}
        for backend, dtype in (("torch", torch.float64), ("triton", torch.float32)):
            leaves = {k: v.to(dtype).requires_grad_() for k, v in tensors.items()}
            with deformconv.use_backend(backend):
                out = deformconv.dcnv3(*leaves.values(), **_args(case))
            grad = torch.linspace(-1.0, 1.0, out.numel(), device="cuda").view_as(out).to(dtype)
            results[backend] = [out, *torch.autograd.grad(out, list(leaves.values()), grad)]
        for ours, theirs in zip(results["triton"], results["torch"], strict=True):
            torch.testing.assert_close(ours.double(), theirs, rtol=1e-4, atol=1e-4)


def test_double_backward_on_cuda():
    """A gradient penalty through the DCNv3 kernels (first derivatives) and the composite
    (along the offsets) on CUDA agrees with the CPU in float64."""
    case = CASES["lopsided"]
    tensors = make_inputs(case)
    tensors["offset"] = tensors["offset"].round() + 0.5  # away from the kinks at integers

    def penalty(device, dtype):
        leaves = {k: v.to(device, dtype).requires_grad_() for k, v in tensors.items()}
        out = deformconv.dcnv3(leaves["input"], leaves["offset"], leaves["mask"], **_args(case))
        grads = torch.autograd.grad(out.square().sum(), [leaves["input"], leaves["offset"]],
                                    create_graph=True)  # fmt: skip
        loss = sum(grad.square().sum() for grad in grads)
        return torch.autograd.grad(loss, list(leaves.values()))

    expected = penalty("cpu", torch.float64)
    for name, want, got in zip(tensors, expected, penalty("cuda", torch.float32), strict=True):
        error = (got.cpu().double() - want).norm() / want.norm()
        assert error <= 1e-4, f"{name}: {error:.2e}"
