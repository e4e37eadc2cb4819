"""The DCNv3 and DCNv4 layers: original state-dict keys, initial behaviour, and the DCNv4
layer against its definition computed with the loop reference."""

from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn.functional as F

import deformconv
from dcnv3_reference import dcnv3_reference

DCNV3_KEYS = {"dw_conv.0.weight", "dw_conv.0.bias", "dw_conv.1.1.weight", "dw_conv.1.1.bias",
              "offset.weight", "offset.bias", "mask.weight", "mask.bias", "input_proj.weight",
              "input_proj.bias", "output_proj.weight", "output_proj.bias"}  # fmt: skip
BN_KEYS = {f"dw_conv.1.0.{name}" for name in ("weight", "bias", "running_mean", "running_var",
                                              "num_batches_tracked")}  # fmt: skip
SCALE_KEYS = {"center_feature_scale_proj_weight", "center_feature_scale_proj_bias"}


def test_dcnv3_state_dict_keys_and_shapes():
    layer = deformconv.DCNv3(channels=48, group=4)
    assert set(layer.state_dict()) == DCNV3_KEYS
    assert layer.offset.out_features == 4 * 9 * 2 and layer.mask.out_features == 4 * 9
    bn = deformconv.DCNv3(channels=48, group=4, norm_layer="BN", center_feature_scale=True,
                          remove_center=True)  # fmt: skip
    expected = (DCNV3_KEYS - {"dw_conv.1.1.weight", "dw_conv.1.1.bias"}) | BN_KEYS | SCALE_KEYS
    assert set(bn.state_dict()) == expected
    assert bn.offset.out_features == 4 * 8 * 2
    assert bn.center_feature_scale_proj_weight.shape == (4, 48)


def test_dcnv4_state_dict_keys_and_shapes():
    layer = deformconv.DCNv4(channels=64, group=4)
    assert set(layer.state_dict()) == {"offset_mask.weight", "offset_mask.bias",
                                       "value_proj.weight", "value_proj.bias",
                                       "output_proj.weight", "output_proj.bias"}  # fmt: skip
    assert layer.offset_mask.out_features == 112
    bare = deformconv.DCNv4(channels=64, group=4, without_pointwise=True, dw_kernel_size=3,
                            center_feature_scale=True)  # fmt: skip
    keys = {"offset_mask.weight", "offset_mask.bias", "offset_mask_dw.weight",
            "offset_mask_dw.bias"}  # fmt: skip
    assert set(bare.state_dict()) == keys | SCALE_KEYS
    no_bias = deformconv.DCNv4(channels=64, group=4, output_bias=False)
    assert "output_proj.bias" not in no_bias.state_dict()


@pytest.mark.parametrize("layer_class", [deformconv.DCNv3, deformconv.DCNv4])
def test_state_dict_round_trip_is_strict_and_exact(layer_class):
    torch.manual_seed(0)
    layer = layer_class(channels=24, group=3, center_feature_scale=True)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = layer_class(channels=24, group=3, center_feature_scale=True)
    fresh.load_state_dict(torch.load(buffer), strict=True)
    x = torch.randn(2, 7, 7, 24)
    if layer_class is deformconv.DCNv4:
        x = x.flatten(1, 2)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_fresh_dcnv3_layer_averages_the_projected_window():
    """Zero offset and mask layers: every point samples its grid position with weight 1/9."""
    layer = deformconv.DCNv3(channels=16, group=2, act_layer="ReLU")
    x = torch.randn(2, 6, 9, 16)
    projected = layer.input_proj(x).permute(0, 3, 1, 2)
    mean = F.avg_pool2d(projected, 3, 1, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(layer(x), layer.output_proj(mean), rtol=1e-5, atol=1e-5)


def test_dcnv4_layer_matches_its_definition():
    torch.manual_seed(0)
    layer = deformconv.DCNv4(channels=6, group=2, kernel_size=3, pad=1, offset_scale=0.5,
                             dw_kernel_size=3).double()  # fmt: skip
    with torch.no_grad():
        layer.offset_mask.weight.normal_(std=0.5)
        layer.offset_mask.bias.normal_(std=0.5)
    height, width = 4, 5
    x = torch.randn(1, height * width, 6, dtype=torch.float64)
    value = layer.value_proj(x).reshape(1, height, width, 6)
    image = x.view(1, height, width, 6).permute(0, 3, 1, 2)
    query = layer.offset_mask_dw(image).permute(0, 2, 3, 1)
    fused = layer.offset_mask(query)
    # Group g owns [27g, 27g + 27): 9 (Δw, Δh) pairs, then 9 mask values; 54 of 56 used.
    offset = torch.cat([fused[..., 27 * g : 27 * g + 18] for g in range(2)], -1)
    mask = torch.cat([fused[..., 27 * g + 18 : 27 * g + 27] for g in range(2)], -1)
    sampled = dcnv3_reference(value, offset, mask, (3, 3), (1, 1), (1, 1), (1, 1), 2, 0.5, False)
    expected = layer.output_proj(sampled.reshape(1, -1, 6))
    torch.testing.assert_close(layer(x, shape=(height, width)), expected)


def test_center_feature_scale_blends_towards_the_projection():
    layer = deformconv.DCNv3(channels=8, group=2, center_feature_scale=True)
    with torch.no_grad():
        layer.center_feature_scale_proj_bias.fill_(50.0)  # sigmoid = 1: the projection only
    x = torch.randn(1, 5, 5, 8)
    expected = layer.output_proj(layer.input_proj(x))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_nchw_wrappers_share_parameters_and_results():
    torch.manual_seed(0)
    v3 = deformconv.DCNv3NCHW(channels=12, group=3)
    plain = deformconv.DCNv3(channels=12, group=3)
    plain.load_state_dict(v3.state_dict(), strict=True)
    x = torch.randn(2, 12, 6, 5)
    torch.testing.assert_close(v3(x), plain(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    v4 = deformconv.DCNv4NCHW(channels=12, group=3)
    with torch.no_grad():
        v4.offset_mask.weight.normal_(std=0.1)
    tokens = x.flatten(2).transpose(1, 2)
    expected = deformconv.DCNv4.forward(v4, tokens, shape=(6, 5)).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(v4(x), expected)


def test_gradients_reach_every_parameter():
    layer = deformconv.DCNv3(channels=8, group=2, center_feature_scale=True)
    with torch.no_grad():  # leave the zero start, so that every path carries a gradient
        for zero in (layer.offset.weight, layer.mask.weight,
                     layer.center_feature_scale_proj_weight):  # fmt: skip
            zero.normal_(std=0.3)
    x = torch.randn(1, 5, 5, 8)
    layer(x).square().sum().backward()
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": 10, "group": 4}, r"channels must be a positive multiple of group"),
        ({"kernel_size": 4, "remove_center": True}, r"remove_center needs an odd kernel_size"),
        ({"kernel_size": 1, "remove_center": True}, r"odd kernel_size above 1, got 1"),
        ({"norm_layer": "GN"}, r"norm_layer must be 'LN' or 'BN', got 'GN'"),
    ],
)
def test_layer_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        deformconv.DCNv3(**{"channels": 8, "group": 2, **kwargs})


def test_dcnv4_needs_a_shape_for_non_square_inputs():
    layer = deformconv.DCNv4(channels=8, group=2)
    with pytest.raises(ValueError, match=r"input has 12 tokens, not a square: pass shape"):
        layer(torch.randn(1, 12, 8))
    assert layer(torch.randn(1, 12, 8), shape=(3, 4)).shape == (1, 12, 8)
    assert layer(torch.randn(1, 16, 8)).shape == (1, 16, 8)  # 16 tokens: 4 × 4


def test_torch_export_with_dynamic_batch(tmp_path):
    layer = deformconv.DCNv3(channels=8, group=2).eval()
    with torch.no_grad():
        layer.offset.weight.normal_(std=0.1)
    x = torch.randn(2, 6, 6, 8)
    batch = torch.export.Dim("batch", min=1, max=16)
    program = torch.export.export(layer, (x,), dynamic_shapes={"input": {0: batch}})
    path = tmp_path / "dcnv3.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    other = torch.randn(3, 6, 6, 8)
    torch.testing.assert_close(loaded(other), layer(other))


def test_layers_under_cpu_autocast_run_in_bfloat16():
    v3 = deformconv.DCNv3(channels=8, group=2)
    v4 = deformconv.DCNv4(channels=8, group=2)
    x = torch.randn(1, 5, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert v3(x).dtype == torch.bfloat16
        assert v4(x.flatten(1, 2)).dtype == torch.bfloat16
        offset, mask = torch.zeros(1, 5, 5, 36), torch.full((1, 5, 5, 18), 1 / 9)
        assert deformconv.dcnv3(x, offset, mask, 3, padding=1, group=2).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("make", "shape", "kwargs"),
    [
        (lambda: deformconv.DCNv3(channels=12, group=3, center_feature_scale=True),
         (0, 5, 6, 12), {}),
        (lambda: deformconv.DCNv4(channels=12, group=3, dw_kernel_size=3,
                                  center_feature_scale=True), (0, 30, 12), {"shape": (5, 6)}),
        (lambda: deformconv.DCNv3NCHW(channels=12, group=3), (0, 12, 5, 6), {}),
        (lambda: deformconv.DCNv4NCHW(channels=12, group=3), (0, 12, 5, 6), {}),
    ],
    ids=["dcnv3", "dcnv4", "dcnv3-nchw", "dcnv4-nchw"],
)  # fmt: skip
def test_batch_zero(make, shape, kwargs):
    layer = make()
    x = torch.randn(shape, requires_grad=True)
    out = layer(x, **kwargs)
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == shape
    assert all(p.grad is None or (p.grad == 0).all() for p in layer.parameters())


@pytest.mark.parametrize(
    ("layer", "shape", "layout"),
    [
        (deformconv.DCNv3(channels=16, group=2), (2, 16, 5, 5), r"\(N, H, W, C\)"),
        (deformconv.DCNv3(channels=16, group=2), (5, 5, 16), r"\(N, H, W, C\)"),
        (deformconv.DCNv4(channels=16, group=2), (2, 25, 8), r"\(N, H·W, C\)"),
        (deformconv.DCNv3NCHW(channels=16, group=2), (2, 5, 5, 16), r"\(N, C, H, W\)"),
        (deformconv.DCNv4NCHW(channels=16, group=2), (2, 5, 5, 16), r"\(N, C, H, W\)"),
    ],
)
def test_inputs_of_another_layout_are_refused(layer, shape, layout):
    message = rf"input must be {layout} with C = channels = 16, got shape "
    with pytest.raises(ValueError, match=message + re.escape(str(shape))):
        layer(torch.randn(shape))
