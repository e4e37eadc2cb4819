"""DeformConv2d and DeformableConv2d: parameters, checkpoints, and equality with the function."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import deformconv
from deformconv import DeformableConv2d, DeformConv2d


def test_deform_conv2d_layer_equals_function():
    torch.manual_seed(0)
    layer = DeformConv2d(
        6, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 1), groups=2
    ).double()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    offset = torch.randn(2, 3 * 2 * 6, 3, 8, dtype=torch.float64)
    mask = torch.rand(2, 3 * 6, 3, 8, dtype=torch.float64)
    expected = deformconv.deform_conv2d(
        x, offset, layer.weight, layer.bias, (2, 1), (1, 0), (2, 1), mask
    )
    torch.testing.assert_close(layer(x, offset, mask), expected, atol=0, rtol=0)
    expected_v1 = deformconv.deform_conv2d(
        x, offset, layer.weight, layer.bias, (2, 1), (1, 0), (2, 1)
    )
    torch.testing.assert_close(layer(x, offset), expected_v1, atol=0, rtol=0)


def test_deform_conv2d_layer_parameters_follow_torchvision():
    layer = DeformConv2d(6, 4, 3, groups=2)
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer.weight.shape == (4, 3, 3, 3)
    no_bias = DeformConv2d(6, 4, 3, bias=False)
    assert list(no_bias.state_dict()) == ["weight"]
    assert no_bias.bias is None
    # Same initialisation as nn.Conv2d (and torchvision): the same seed gives the same tensors.
    torch.manual_seed(7)
    ours = DeformConv2d(6, 4, 3, groups=2)
    torch.manual_seed(7)
    conv = torch.nn.Conv2d(6, 4, 3, groups=2)
    torch.testing.assert_close(ours.weight, conv.weight)
    torch.testing.assert_close(ours.bias, conv.bias)


def test_deform_conv2d_loads_a_torchvision_style_checkpoint():
    torch.manual_seed(1)
    checkpoint = {"weight": torch.randn(8, 2, 3, 3), "bias": torch.randn(8)}
    layer = DeformConv2d(4, 8, 3, padding=1, groups=2)
    layer.load_state_dict(checkpoint, strict=True)
    x = torch.randn(1, 4, 5, 5)
    zero = torch.zeros(1, 18, 5, 5)
    expected = F.conv2d(x, checkpoint["weight"], checkpoint["bias"], padding=1, groups=2)
    torch.testing.assert_close(layer(x, zero), expected, atol=1e-5, rtol=1e-5)


def test_device_and_dtype_keywords():
    layer = DeformableConv2d(3, 4, 3, dtype=torch.float64, device="cpu", modulated=True)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    meta = DeformConv2d(3, 4, 3, device="meta")
    assert meta.weight.device.type == "meta"


def test_extra_repr_omits_defaults():
    assert repr(DeformConv2d(4, 8, 3)) == "DeformConv2d(4, 8, kernel_size=(3, 3))"
    text = repr(
        DeformConv2d(4, 8, (3, 1), stride=2, padding=(1, 0), dilation=3, groups=2, bias=False)
    )
    assert text == (
        "DeformConv2d(4, 8, kernel_size=(3, 1), stride=(2, 2), padding=(1, 0), "
        "dilation=(3, 3), groups=2, bias=False)"
    )
    layer = DeformableConv2d(4, 8, 3, offset_groups=2, modulated=True)
    assert layer.extra_repr() == "4, 8, kernel_size=(3, 3), offset_groups=2, modulated=True"
    assert "(conv_offset): Conv2d(4, 54" in repr(layer)


@pytest.mark.parametrize("groups", [1, 2])
def test_fresh_v1_layer_is_a_plain_convolution(groups):
    torch.manual_seed(2)
    layer = DeformableConv2d(
        4, 6, (3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=groups, offset_groups=2
    ).double()
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    expected = F.conv2d(x, layer.weight, layer.bias, (1, 2), (2, 1), (2, 1), groups)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


def test_fresh_v2_layer_is_half_a_convolution():
    torch.manual_seed(3)
    layer = DeformableConv2d(4, 6, 3, padding=1, modulated=True).double()
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    expected = 0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)


def test_deformable_layer_state_dict_keys_follow_mmcv():
    v1 = DeformableConv2d(4, 6, 3, offset_groups=2)
    assert list(v1.state_dict()) == ["weight", "bias", "conv_offset.weight", "conv_offset.bias"]
    assert v1.conv_offset.weight.shape == (2 * 2 * 9, 4, 3, 3)
    v2 = DeformableConv2d(4, 6, 3, offset_groups=2, modulated=True, bias=False)
    assert list(v2.state_dict()) == ["weight", "conv_offset.weight", "conv_offset.bias"]
    assert v2.conv_offset.weight.shape == (3 * 2 * 9, 4, 3, 3)


def test_modulated_layer_splits_offsets_then_mask_logits():
    torch.manual_seed(4)
    layer = DeformableConv2d(4, 6, (3, 2), padding=1, offset_groups=2, modulated=True).double()
    taps = 6
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.3)
        layer.conv_offset.bias.normal_()
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    prediction = F.conv2d(x, layer.conv_offset.weight, layer.conv_offset.bias, padding=1)
    offset = prediction[:, : 2 * 2 * taps]
    mask = prediction[:, 2 * 2 * taps :].sigmoid()
    expected = deformconv.deform_conv2d(x, offset, layer.weight, layer.bias, padding=1, mask=mask)
    torch.testing.assert_close(layer(x), expected, atol=0, rtol=0)
    got_offset, got_mask = layer.offset_and_mask(x)
    torch.testing.assert_close(got_offset, offset)
    torch.testing.assert_close(got_mask, mask)


def test_layers_train():
    torch.manual_seed(5)
    layer = DeformableConv2d(2, 3, 3, padding=1, modulated=True)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(4, 2, 8, 8)
    target = torch.randn(4, 3, 8, 8)
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    # The zero-initialised offset branch receives gradient and moves.
    assert layer.conv_offset.weight.abs().sum() > 0


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_padding_modes(mode):
    """Other than zeros, a layer pads its input as ``padding_mode`` says and samples the
    padded input with no further padding (beyond it, 0): the function on ``F.pad``'s output,
    forward and gradients; a fresh layer is ``nn.Conv2d`` with that padding mode."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64, requires_grad=True)
    layer = DeformableConv2d(4, 6, (3, 2), padding=(2, 1), stride=(1, 2), modulated=True,
                             padding_mode=mode, dtype=torch.float64)  # fmt: skip
    conv = torch.nn.Conv2d(4, 6, (3, 2), padding=(2, 1), stride=(1, 2), padding_mode=mode,
                           dtype=torch.float64)  # fmt: skip
    conv.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    half = (conv(x) + conv.bias[:, None, None]) / 2  # a fresh mask is 0.5, the bias whole
    torch.testing.assert_close(layer(x), half)
    torch.nn.init.normal_(layer.conv_offset.weight, std=0.3)
    offset, mask = layer.offset_and_mask(x)
    padded = F.pad(x, (1, 1, 2, 2), mode=mode)
    expected = deformconv.deform_conv2d(padded, offset, layer.weight, layer.bias,
                                        stride=(1, 2), mask=mask)  # fmt: skip
    out = layer(x)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [x, layer.weight])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, layer.weight])
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)
    given = DeformConv2d(4, 6, (3, 2), padding=(2, 1), stride=(1, 2), padding_mode=mode,
                         dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(
        given(x, offset, mask),
        deformconv.deform_conv2d(padded, offset, given.weight, given.bias, stride=(1, 2),
                                 mask=mask),
    )  # fmt: skip


def test_an_unknown_padding_mode_is_refused():
    with pytest.raises(ValueError, match=r"padding_mode must be one of .* got 'mirror'"):
        DeformableConv2d(4, 6, 3, padding=1, padding_mode="mirror")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torch_jit_script_names_what_works_and_trace_does():
    layers = [
        deformconv.DeformConv2d(4, 4, 3, padding=1),
        deformconv.DeformableConv1d(4, 4, 3, padding=1),
        deformconv.DeformableConv2d(4, 6, 3, padding=1, modulated=True),
        deformconv.DeformableConv3d(4, 4, (1, 3, 3), padding=(0, 1, 1)),
        deformconv.DCNv3(16, group=2),
        deformconv.DCNv4NCHW(16, group=2),
        deformconv.DeformRoIPoolPack(3, 4),
    ]
    for layer in layers:
        name = type(layer).__name__
        with pytest.raises(RuntimeError, match=f"{name} cannot be compiled by torch.jit.script"
                           ".*torch.jit.trace"):  # fmt: skip
            torch.jit.script(torch.nn.Sequential(layer))
    torch.manual_seed(0)
    for layer, x in [(layers[2], torch.randn(2, 4, 5, 6)), (layers[5], torch.randn(1, 16, 5, 6))]:
        with torch.no_grad():
            for parameter in layer.parameters():
                parameter.add_(0.1 * torch.randn_like(parameter))
        traced = torch.jit.trace(layer, x)
        torch.testing.assert_close(traced(x), layer(x))
