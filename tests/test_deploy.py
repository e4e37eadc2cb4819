"""Deployment: ONNX export to the standard DeformConv operator (both exporters), checkpoint
import from torchvision / mmcv / detectron2 layouts, torch.export and AOTInductor."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deformconv
from deformconv import checkpoints

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from onnx.reference import ReferenceEvaluator  # noqa: E402

#: torch's ``torch.export``-based exporter (``dynamo=True``) with the nodes of
#: ``torch.onnx.ops`` (PyTorch 2.8 and later); the TorchScript-based one runs on every version.
needs_dynamo_exporter = pytest.mark.skipif(
    not hasattr(torch.onnx, "ops"), reason=f"torch {torch.__version__} has no torch.onnx.ops"
)
EXPORTERS = [False, pytest.param(True, marks=needs_dynamo_exporter)]


class Predicted(nn.Module):
    """DeformableConv2d: offsets and mask computed inside the model."""

    def __init__(self, modulated: bool = True):
        super().__init__()
        self.layer = deformconv.DeformableConv2d(4, 6, 3, padding=1, offset_groups=2,
                                                 modulated=modulated)  # fmt: skip
        with torch.no_grad():
            self.layer.conv_offset.weight.normal_(std=0.3)
            self.layer.conv_offset.bias.normal_(std=0.5)

    def forward(self, x):
        return self.layer(x).relu()


class Given(nn.Module):
    """deform_conv2d with offsets (and mask) as inputs: weight groups, offset groups, stride,
    dilation, optional mask and bias."""

    def __init__(self, mask: bool, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3, 3, 2))
        self.bias = nn.Parameter(torch.randn(6)) if bias else None
        self.use_mask = mask

    def forward(self, x, offset, mask):
        return deformconv.deform_conv2d(
            x, offset, self.weight, self.bias, stride=(2, 1), padding=(1, 2), dilation=(2, 1),
            mask=mask if self.use_mask else None,
        )  # fmt: skip


def _given_inputs(batch: int = 2):
    # input 6 channels (2 weight groups), 3 offset groups, kernel 3×2; output 5×12 from 11×9.
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 6, 11, 9, generator=generator)
    offset = torch.randn(batch, 2 * 3 * 6, 5, 12, generator=generator) * 2
    mask = torch.rand(batch, 3 * 6, 5, 12, generator=generator)
    return x, offset, mask


class Sequence1d(nn.Module):
    """The 1-D layer: it exports through the 2-D op as a DeformConv node on a one-row image."""

    def __init__(self):
        super().__init__()
        self.layer = deformconv.DeformableConv1d(4, 6, 3, padding=1, modulated=True)
        with torch.no_grad():
            self.layer.conv_offset.weight.normal_(std=0.3)

    def forward(self, x):
        return self.layer(x)


CASES = {
    "deformable-1d": (Sequence1d, lambda b: (torch.randn(b, 4, 20),)),
    "predicted-v2": (lambda: Predicted(True), lambda b: (torch.randn(b, 4, 9, 10),)),
    "predicted-v1": (lambda: Predicted(False), lambda b: (torch.randn(b, 4, 9, 10),)),
    "given-mask-bias": (lambda: Given(True, True), _given_inputs),
    "given-mask-no-bias": (lambda: Given(True, False), _given_inputs),
    "given-no-mask-no-bias": (lambda: Given(False, False), _given_inputs),
}


def _export(model, args, path, dynamo: bool, opset: int = 19):
    names = [f"in{i}" for i in range(len(args))]
    kwargs = {"input_names": names, "output_names": ["out"], "opset_version": opset}
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=64)
        kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
    else:
        kwargs["dynamic_axes"] = {name: {0: "batch"} for name in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), dynamo=dynamo, **kwargs)


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("case", list(CASES))
def test_onnx_export_runs_in_onnxruntime_and_the_reference(tmp_path, case, dynamo):
    torch.manual_seed(0)
    make_model, make_inputs = CASES[case]
    model = make_model().eval()
    path = tmp_path / "model.onnx"
    _export(model, make_inputs(2), path, dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == 1
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # onnx.reference's DeformConv normalises coordinates by (size - 1): a one-row image (the
    # 1-D case) divides by zero there, so that case is checked with onnxruntime alone.
    reference = None if case == "deformable-1d" else ReferenceEvaluator(proto)
    for batch in (2, 3):  # the batch dimension is dynamic
        args = make_inputs(batch)
        with torch.no_grad():
            expected = model(*args).numpy()
        feeds = {f"in{i}": a.numpy() for i, a in enumerate(args)}
        feeds = {k: v for k, v in feeds.items() if k in {i.name for i in proto.graph.input}}
        results = [("onnxruntime", session.run(None, feeds)[0])]
        if reference is not None:
            results.append(("reference", reference.run(None, feeds)[0]))
        for name, actual in results:
            error = abs(actual - expected).max() / max(1.0, abs(expected).max())
            assert error <= 1e-4, f"{name}: {error:.2e}"


def test_onnx_export_below_opset_19(tmp_path):
    model = Predicted().eval()
    x = torch.randn(1, 4, 9, 10)
    with pytest.raises(Exception, match="needs opset_version >= 19"):
        _export(model, (x,), tmp_path / "old.onnx", dynamo=False, opset=17)


@needs_dynamo_exporter
def test_dynamo_onnx_export_below_opset_19(tmp_path):
    model = Predicted().eval()
    x = torch.randn(1, 4, 9, 10)
    # No valid model comes out: torch's dynamo exporter either stops (PyTorch 2.8 does, at the
    # dynamic batch size) or converts the graph down without knowing DeformConv, whose result
    # the ONNX checker refuses.
    path = tmp_path / "old-dynamo.onnx"
    try:
        _export(model, (x,), path, dynamo=True, opset=17)
    except Exception:
        return
    with pytest.raises(onnx.checker.ValidationError, match="DeformConv"):
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)


# ---- checkpoints -------------------------------------------------------------------------


def _reference(x, weight, bias, offset_weight, offset_bias, modulated, conv):
    """What the source library computes, written out from the same tensors."""
    prediction = F.conv2d(x, offset_weight, offset_bias, **conv)
    mask = None
    if modulated:  # detectron2: chunk into (o1, o2, mask); offsets = cat(o1, o2)
        o1, o2, logits = torch.chunk(prediction, 3, dim=1)
        prediction, mask = torch.cat((o1, o2), dim=1), logits.sigmoid()
    return deformconv.deform_conv2d(x, prediction, weight, bias, mask=mask, **conv)


@pytest.mark.parametrize("modulated", [False, True])
def test_mmcv_and_detectron2_layers(modulated):
    torch.manual_seed(0)
    conv = {"stride": 1, "padding": 2, "dilation": 2}
    taps, groups = 9, 2
    weight, bias = torch.randn(8, 2, 3, 3), torch.randn(8)  # 2 weight groups of 4 channels
    offset_weight = torch.randn((3 if modulated else 2) * groups * taps, 4, 3, 3) * 0.1
    offset_bias = torch.randn(offset_weight.shape[0])
    x = torch.randn(2, 4, 10, 11)
    expected = _reference(x, weight, bias, offset_weight, offset_bias, modulated, conv)
    mmcv = checkpoints.deformable_conv2d_from_mmcv(
        {"weight": weight, "bias": bias, "conv_offset.weight": offset_weight,
         "conv_offset.bias": offset_bias},
        groups=2, deform_groups=groups, modulated=modulated, **conv,
    )  # fmt: skip
    detectron2 = checkpoints.deformable_conv2d_from_detectron2(
        {"weight": weight, "bias": bias, "norm.weight": torch.ones(8)},
        {"weight": offset_weight, "bias": offset_bias},
        groups=2, deformable_groups=groups, modulated=modulated, **conv,
    )  # fmt: skip
    for layer in (mmcv, detectron2):
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_dcnv2_package_layer():
    """The DCNv2 package's ``DCN``: modulated, no weight groups, ``conv_offset_mask``."""
    torch.manual_seed(2)
    conv = {"stride": 2, "padding": 1, "dilation": 1}
    weight, bias = torch.randn(6, 4, 3, 3), torch.randn(6)
    offset_weight = torch.randn(3 * 2 * 9, 4, 3, 3) * 0.1  # 2 deformable groups
    offset_bias = torch.randn(offset_weight.shape[0])
    x = torch.randn(2, 4, 9, 8)
    expected = _reference(x, weight, bias, offset_weight, offset_bias, True, conv)
    layer = checkpoints.deformable_conv2d_from_dcnv2(
        {"weight": weight, "bias": bias, "conv_offset_mask.weight": offset_weight,
         "conv_offset_mask.bias": offset_bias},
        deformable_groups=2, **conv,
    )  # fmt: skip
    assert layer.modulated and layer.offset_groups == 2
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_torchvision_layer():
    weight, bias = torch.randn(6, 2, 3, 2), torch.randn(6)
    layer = checkpoints.deform_conv2d_from_torchvision(
        {"weight": weight, "bias": bias}, stride=2, padding=1, groups=2
    )
    x, offset = torch.randn(1, 4, 9, 9), torch.randn(1, 12, 5, 5)
    expected = deformconv.deform_conv2d(x, offset, weight, bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x, offset), expected)


def test_wrong_offset_channels_are_named():
    with pytest.raises(ValueError, match=r"has 18 output channels, expected 3 .* = 27"):
        checkpoints.deformable_conv2d_from_mmcv(
            {"weight": torch.randn(4, 4, 3, 3), "conv_offset.weight": torch.randn(18, 4, 3, 3)},
            modulated=True,
        )
    with pytest.raises(ValueError, match="source must be one of"):
        checkpoints.convert_state_dict({}, "mmdet")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 1)
        self.conv2 = deformconv.DeformableConv2d(4, 4, 3, padding=1, bias=False, modulated=True)


@pytest.mark.parametrize("source", ["mmcv", "detectron2", "dcnv2"])
def test_whole_model_state_dict(source):
    torch.manual_seed(1)
    offset = ".conv_offset_mask" if source == "dcnv2" else "_offset"
    theirs = {
        "conv1.weight": torch.randn(4, 4, 1, 1),
        "conv1.bias": torch.randn(4),
        "conv2.weight": torch.randn(4, 4, 3, 3),
        f"conv2{offset}.weight": torch.randn(27, 4, 3, 3),
        f"conv2{offset}.bias": torch.randn(27),
    }
    block = Block()
    block.load_state_dict(checkpoints.convert_state_dict(theirs, source), strict=True)
    torch.testing.assert_close(block.conv2.conv_offset.weight, theirs[f"conv2{offset}.weight"])
    torch.testing.assert_close(block.conv2.weight, theirs["conv2.weight"])
    assert checkpoints.convert_state_dict(theirs, "torchvision") == theirs


# ---- torch.export and AOTInductor ----------------------------------------------------------


@pytest.mark.skipif(
    not hasattr(torch._inductor, "aoti_compile_and_package"),
    reason=f"torch {torch.__version__} has no AOTInductor packages",
)
def test_torch_export_and_aot_inductor(tmp_path):
    model = Predicted().eval()
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(model, (torch.randn(2, 4, 9, 10),), dynamic_shapes=({0: batch},))
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    x = torch.randn(3, 4, 9, 10)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(loaded(x), expected)
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "model-aoti.pt2")
    )
    compiled = torch._inductor.aoti_load_package(package)
    torch.testing.assert_close(compiled(x), expected, atol=1e-5, rtol=1e-5)


# ---- operators ONNX has no node for: standard operators ---------------------------------


class DCNv4Tokens(nn.Module):
    """The DCNv4 layer on 6×7 token grids."""

    def __init__(self):
        super().__init__()
        self.layer = deformconv.DCNv4(channels=12, group=3, kernel_size=3, dw_kernel_size=3)

    def forward(self, x):
        return self.layer(x, shape=(6, 7))


def _randomise_offsets(model: nn.Module) -> nn.Module:
    """Offset (and mask) predictors start at zero: give them weights, so samples move."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in {"offset", "mask", "offset_mask", "conv_offset"}:
                module.weight.normal_(std=0.3)
                module.bias.normal_(std=0.5)
    return model


STANDARD_CASES = {
    "dcnv3": (lambda: deformconv.DCNv3(channels=12, group=3, kernel_size=3),
              lambda b: (torch.randn(b, 6, 7, 12),)),
    "dcnv4": (DCNv4Tokens, lambda b: (torch.randn(b, 42, 12),)),
    "deformable-3d": (lambda: deformconv.DeformableConv3d(4, 6, (2, 3, 3), padding=(0, 1, 2),
                                                          offset_groups=2, modulated=True),
                      lambda b: (torch.randn(b, 4, 3, 5, 6),)),
}  # fmt: skip


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("case", list(STANDARD_CASES))
def test_onnx_export_without_a_deformable_operator(tmp_path, case, dynamo):
    """3-D, DCNv3 and DCNv4 export as standard operators (ONNX has no node for them), with a
    dynamic batch, and onnxruntime gives the model's results."""
    torch.manual_seed(0)
    make_model, make_inputs = STANDARD_CASES[case]
    model = _randomise_offsets(make_model().eval())
    path = tmp_path / "model.onnx"
    _export(model, make_inputs(2), path, dynamo)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    assert "Gather" in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (2, 3):
        (x,) = make_inputs(batch)
        with torch.no_grad():
            expected = model(x).numpy()
        actual = session.run(None, {"in0": x.numpy()})[0]
        error = abs(actual - expected).max() / max(1.0, abs(expected).max())
        assert error <= 1e-5, f"batch {batch}: {error:.2e}"


@needs_dynamo_exporter
@pytest.mark.parametrize("case", ["dcnv3", "deformable-3d"])
def test_onnx_export_without_a_deformable_operator_keeps_image_sizes_dynamic(tmp_path, case):
    """With torch's dynamo exporter the image size stays dynamic too."""
    torch.manual_seed(0)
    make_model, _ = STANDARD_CASES[case]
    model = _randomise_offsets(make_model().eval())
    if case == "dcnv3":
        axes, make = (0, 1, 2), lambda n, h, w: torch.randn(n, h, w, 12)
    else:
        axes, make = (0, 3, 4), lambda n, h, w: torch.randn(n, 4, 3, h, w)
    dims = {axis: torch.export.Dim(f"axis{axis}", min=1, max=64) for axis in axes}
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (make(2, 6, 7),), str(path), dynamo=True, opset_version=19,
                          input_names=["x"], dynamic_shapes=(dims,))  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(2, 6, 7), (3, 9, 5), (1, 4, 11)]:
        x = make(*shape)
        with torch.no_grad():
            expected = model(x).numpy()
        actual = session.run(None, {"x": x.numpy()})[0]
        error = abs(actual - expected).max() / max(1.0, abs(expected).max())
        assert error <= 1e-5, f"{shape}: {error:.2e}"


def test_onnx_benchmark_runs_the_exports_in_onnxruntime(tmp_path, capsys):
    from deformconv import cli

    assert cli.main(["bench", "--onnx", "--", "--quick", "--repeats", "1",
                     "--dir", str(tmp_path)]) == 0  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| D")]
    assert [row.split(" |")[0] for row in rows] == [
        "| DeformableConv3d 3×3×3 C=8 1×8×4×8×8",
        "| DCNv4NCHW C=32 G=2 1×32×12×12",
    ]
    for row in rows:  # onnxruntime gives PyTorch's results
        assert float(row.split("|")[-2]) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case0", "case1"]
