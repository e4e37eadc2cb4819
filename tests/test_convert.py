"""convert_to_deformable: the converted model computes what the original did; selection,
errors and the offset-parameter helper."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deformconv
from deformconv import (
    DeformableConv2d,
    convert_to_deformable,
    deformable_layers,
    offset_parameters,
)


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + identity).relu()


def resnet_like() -> nn.Module:
    """A small ResNet-style network (stem, two stages of basic blocks), built here: no weights
    are downloaded."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 16, 7, 2, 3, bias=False))
    model.add_module("layer1", nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16)))
    model.add_module("layer2", nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                           nn.Linear(32, 10)))  # fmt: skip
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("modulated", [False, True])
def test_converted_resnet_computes_the_same(modulated):
    model = resnet_like()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    converted = convert_to_deformable(model, "layer2.*.conv*", modulated=modulated)
    names = [n for n, m in converted.named_modules() if isinstance(m, DeformableConv2d)]
    assert names == ["layer2.0.conv1", "layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2"]
    torch.testing.assert_close(converted(x), expected, atol=1e-5, rtol=1e-5)
    assert not converted.training  # the layers keep the model's mode
    assert isinstance(model.layer2[0].conv1, nn.Conv2d)  # the original is left alone


def test_converted_demo_cnn_computes_the_same():
    from deformconv.demo.models import DEFORMABLE_LAYERS, DigitNet, deformable_digit_net

    torch.manual_seed(1)
    model = DigitNet()
    x = torch.rand(3, 1, 28, 28)
    converted = deformable_digit_net(model)
    for name in DEFORMABLE_LAYERS:
        assert isinstance(getattr(converted, name), DeformableConv2d)
    torch.testing.assert_close(converted(x), model(x), atol=1e-5, rtol=1e-5)


def test_selection_by_names_and_predicate():
    model = resnet_like()
    by_names = convert_to_deformable(model, ["stem", "layer1.0.conv2"])
    assert isinstance(by_names.stem, DeformableConv2d)
    assert isinstance(by_names.layer1[0].conv2, DeformableConv2d)
    assert isinstance(by_names.layer1[0].conv1, nn.Conv2d)
    strided = convert_to_deformable(model, lambda name, conv: conv.stride == (2, 2))
    converted = {n for n, m in strided.named_modules() if isinstance(m, DeformableConv2d)}
    assert converted == {"stem", "layer2.0.conv1", "layer2.0.downsample.0"}
    everything = convert_to_deformable(model)
    plain = [n for n, m in everything.named_modules() if type(m) is nn.Conv2d]
    assert plain and all(n.endswith(".conv_offset") for n in plain)  # only offset predictors


def test_in_place_conversion_keeps_settings_dtype_and_grad_flags():
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2,
                     dtype=torch.float64)  # fmt: skip
    conv.bias.requires_grad_(False)
    model = nn.Sequential(conv)
    same = convert_to_deformable(model, inplace=True, modulated=True, offset_groups=2)
    layer = same[0]
    assert same is model and isinstance(layer, DeformableConv2d)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups) == (
        (3, 5), (2, 1), (1, 2), (1, 2), 2
    )  # fmt: skip
    assert layer.offset_groups == 2 and layer.mask_scale == 2.0
    assert layer.weight.dtype == torch.float64 and not layer.bias.requires_grad
    torch.testing.assert_close(layer.weight, conv.weight)


@pytest.mark.parametrize(
    ("padding", "expected"), [("same", (2, 1)), ("valid", (0, 0))], ids=["same", "valid"]
)
def test_string_padding(padding, expected):
    conv = nn.Conv2d(2, 2, (5, 3), padding=padding)
    x = torch.randn(1, 2, 9, 9)
    converted = convert_to_deformable(nn.Sequential(conv))
    assert converted[0].padding == expected
    torch.testing.assert_close(converted(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_padding_modes_convert(dims, mode):
    """Convolutions that pad other than with zeros convert too: same outputs at first, and
    the converted layer pads its input the same way for its offsets and its samples."""
    conv = getattr(nn, f"Conv{dims}d")(4, 6, 3, padding=(1, 2, 1)[:dims], padding_mode=mode,
                                       stride=(2, 1, 1)[:dims])  # fmt: skip
    x = torch.randn(2, 4, *(5, 7, 6)[:dims])
    converted = convert_to_deformable(nn.Sequential(conv), modulated=True)
    assert converted[0].padding_mode == mode and converted[0].conv_offset.padding_mode == mode
    assert f"padding_mode='{mode}'" in repr(converted[0])
    torch.testing.assert_close(converted(x), conv(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("conv", "include", "message"),
    [
        (nn.Conv2d(2, 2, 4, padding="same"), None, "pads unevenly"),
        (
            nn.Conv2d(2, 2, 3),
            "head.*",
            r"no convolution \(nn.Conv1d, nn.Conv2d, nn.Conv3d\) of the model matches "
            r"include='head.\*'",
        ),
    ],
    ids=["uneven-same", "no-match"],
)
def test_errors(conv, include, message):
    with pytest.raises(ValueError, match=message):
        convert_to_deformable(nn.Sequential(conv), include)


def test_offset_groups_must_divide_channels():
    with pytest.raises(ValueError, match="in_channels 6 is not divisible by offset_groups 4"):
        convert_to_deformable(nn.Sequential(nn.Conv2d(6, 2, 3)), offset_groups=4)


def test_offset_parameters_train_alone():
    model = convert_to_deformable(resnet_like().train(), "layer1.*.conv2", modulated=True)
    params = offset_parameters(model)
    assert len(params) == 4  # two layers, weight and bias of each conv_offset
    predictors = {id(p) for _, m in deformconv.deformable_layers(model)
                  for p in m.conv_offset.parameters()}  # fmt: skip
    assert {id(p) for p in params} == predictors
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(params, lr=0.1)
    model(torch.randn(2, 3, 32, 32)).square().mean().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".conv_offset." in n for n in changed)


@pytest.mark.parametrize("modulated", [False, True])
def test_conv1d_and_conv3d_convert_too(modulated):
    model = nn.Sequential(
        nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1)),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=(1, 2, 2), padding=1),
    )
    clip = torch.randn(1, 3, 4, 9, 9)
    converted = convert_to_deformable(model, modulated=modulated)
    assert [type(m).__name__ for _, m in deformable_layers(converted)] == ["DeformableConv3d"] * 2
    torch.testing.assert_close(converted(clip), model(clip), rtol=1e-4, atol=1e-5)
    sequence = nn.Sequential(nn.Conv1d(2, 3, 5, padding="same"))
    signal = torch.randn(2, 2, 30)
    layer = convert_to_deformable(sequence, modulated=modulated)[0]
    assert type(layer).__name__ == "DeformableConv1d" and layer.padding == (2,)
    torch.testing.assert_close(layer(signal), sequence(signal), rtol=1e-4, atol=1e-5)
    assert len(offset_parameters(converted)) == 4
