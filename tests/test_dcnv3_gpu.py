"""The DCNv3 / DCNv4 Triton kernels on a CUDA device: half precision against float64, the
layers under ``torch.compile`` with Inductor, ``opcheck``.  Skipped without a GPU (the
interpreter tests in test_dcnv3.py cover the kernels' arithmetic)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import deformconv
from deformconv.backends import select, triton_dcnv3
from test_dcnv3 import CASES, _args, make_inputs

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

    grad_output = torch.randn(run(torch.float64, "torch")[0].shape, device="cuda",
                              dtype=torch.float64)  # fmt: skip
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


def test_opcheck_of_the_triton_op():
    case = CASES["lopsided"]
    tensors = {k: v.cuda().float().requires_grad_() for k, v in make_inputs(case).items()}
    args = _args(case)
    torch.library.opcheck(
        torch.ops.deformconv.triton_dcnv3.default,
        (tensors["input"], tensors["offset"], tensors["mask"], list(args["kernel_size"]),
         list(args["stride"]), list(args["padding"]), list(args["dilation"]), args["group"],
         args["offset_scale"], args["remove_center"]),
    )  # fmt: skip


def test_deterministic_gradients_are_bit_identical():
    case = CASES["lopsided"]
    tensors = {k: v.cuda().float() for k, v in make_inputs(case, batch=8).items()}
    grad = None
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(3):
            leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
            out = deformconv.dcnv3(leaves["input"], leaves["offset"], leaves["mask"],
                                   **_args(case))  # fmt: skip
            grad = torch.randn_like(out) if grad is None else grad
            runs.append(torch.autograd.grad(out, list(leaves.values()), grad))
    finally:
        torch.use_deterministic_algorithms(False)
    for run in runs[1:]:
        for first, other in zip(runs[0], run, strict=True):
            assert torch.equal(first, other)
