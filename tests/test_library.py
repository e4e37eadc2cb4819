"""The registered operator: opcheck, torch.compile, torch.export, autocast."""

from __future__ import annotations

import pytest
import torch

import deformconv
from cases import LOPSIDED, Config, make_inputs
from deformconv import DeformableConv2d


def op_args(config: Config, tensors):
    return (
        tensors["input"],
        tensors["offset"],
        tensors["mask"],
        tensors["weight"],
        tensors["bias"],
        list(config.stride),
        list(config.padding),
        list(config.dilation),
    )


def test_public_function_calls_the_registered_op():
    schema = str(torch.ops.deformconv.deform_conv2d.default._schema)
    assert schema.startswith(
        "deformconv::deform_conv2d(Tensor input, Tensor offset, Tensor? mask, Tensor weight"
    )
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, requires_grad=False)
    direct = torch.ops.deformconv.deform_conv2d(*op_args(config, tensors))
    via_public = deformconv.deform_conv2d(
        tensors["input"],
        tensors["offset"],
        tensors["weight"],
        tensors["bias"],
        config.stride,
        config.padding,
        config.dilation,
        tensors["mask"],
    )
    torch.testing.assert_close(direct, via_public, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["straddling-groups", "no-mask-no-bias", "batch-0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(name, dtype):
    config = LOPSIDED[name]
    tensors = make_inputs(config, dtype=dtype)
    torch.library.opcheck(torch.ops.deformconv.deform_conv2d.default, op_args(config, tensors))


def _model(modulated: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        DeformableConv2d(8, 8, 3, padding=1, offset_groups=2, modulated=modulated),
    )
    with torch.no_grad():  # non-zero offsets, so the deformation is exercised
        model[2].conv_offset.weight.normal_(std=0.1)
    return model


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend):
    torch._dynamo.reset()
    model = _model(modulated=True)
    x = torch.randn(2, 3, 10, 11, requires_grad=True)
    expected = model(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *model.parameters()])
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    actual = compiled(x)
    actual_grads = torch.autograd.grad(actual.square().sum(), [x, *model.parameters()])
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(actual_grads, expected_grads, strict=False):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_torch_export_with_dynamic_batch(tmp_path):
    model = _model(modulated=True).eval()
    x = torch.randn(2, 3, 10, 11)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    targets = [str(node.target) for node in exported.graph.nodes if node.op == "call_function"]
    assert "deformconv.deform_conv2d.default" in targets
    path = tmp_path / "model.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path)
    for size in (1, 5):
        y = torch.randn(size, 3, 10, 11)
        torch.testing.assert_close(loaded.module()(y), model(y), atol=1e-6, rtol=1e-6)


def test_cpu_autocast_runs_in_the_autocast_dtype():
    model = _model(modulated=False)
    x = torch.randn(2, 3, 10, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    reference = model(x)
    assert ((out.float() - reference).norm() / reference.norm()).item() < 2e-2


def test_opcheck_with_channels_last_tensors():
    config = LOPSIDED["batch-3"]
    tensors = make_inputs(config, requires_grad=False)
    for name in ("input", "weight", "offset"):
        tensors[name] = tensors[name].to(memory_format=torch.channels_last).requires_grad_(True)
    torch.library.opcheck(torch.ops.deformconv.deform_conv2d.default, op_args(config, tensors))


def test_info_says_where_transforms_and_onnx_exports_run(monkeypatch):
    from deformconv import _transforms, cli

    monkeypatch.setattr(_transforms, "FUNCTIONS_SUPPORTED", True)
    monkeypatch.setattr(torch.onnx, "ops", torch.onnx, raising=False)
    text = cli.info()
    assert "tangents: on the ops" in text
    assert "ONNX export: torch.onnx.export with dynamo=True or dynamo=False" in text
    monkeypatch.setattr(_transforms, "FUNCTIONS_SUPPORTED", False)
    monkeypatch.delattr(torch.onnx, "ops", raising=False)
    text = cli.info()
    assert "tangents: on deformconv.composite" in text
    assert "ONNX export: torch.onnx.export with dynamo=False (the dynamo" in text
