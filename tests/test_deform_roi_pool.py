"""deform_roi_pool and its layers against a float64 loop reference of mmcv's algorithm."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

import deformconv
from deformconv import DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack


def _sample(plane, y, x):
    """RoIAlign's bilinear sample, one point at a time (autograd flows through y and x)."""
    height, width = plane.shape
    if y.item() < -1 or y.item() > height or x.item() < -1 or x.item() > width:
        return plane.new_zeros(())
    y = y.clamp(min=0)
    x = x.clamp(min=0)
    y_low, x_low = int(y.item()), int(x.item())
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = y.detach() * 0 + y_low
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = x.detach() * 0 + x_low
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    return ((1 - ly) * (1 - lx) * plane[y_low, x_low] + (1 - ly) * lx * plane[y_low, x_high]
            + ly * (1 - lx) * plane[y_high, x_low] + ly * lx * plane[y_high, x_high])  # fmt: skip


def reference(input, rois, offset, size, scale, ratio, gamma):
    out_h, out_w = size
    rows = []
    for r in range(rois.shape[0]):
        image = int(rois[r, 0])
        x1, y1, x2, y2 = (rois[r, i] * scale - 0.5 for i in range(1, 5))
        roi_w, roi_h = x2 - x1, y2 - y1
        grid_h = ratio if ratio > 0 else math.ceil(roi_h.item() / out_h)
        grid_w = ratio if ratio > 0 else math.ceil(roi_w.item() / out_w)
        count = max(grid_h * grid_w, 1)
        channels = []
        for c in range(input.shape[1]):
            bins = []
            for ph in range(out_h):
                for pw in range(out_w):
                    start_y, start_x = y1, x1
                    if offset is not None:
                        start_x = start_x + gamma * roi_w * offset[r, 0, ph, pw]
                        start_y = start_y + gamma * roi_h * offset[r, 1, ph, pw]
                    total = input.new_zeros(())
                    for iy in range(grid_h):
                        y = start_y + ph * roi_h / out_h + (iy + 0.5) * roi_h / out_h / grid_h
                        for ix in range(grid_w):
                            x = start_x + pw * roi_w / out_w + (ix + 0.5) * roi_w / out_w / grid_w
                            total = total + _sample(input[image, c], y, x)
                    bins.append(total / count)
            channels.append(torch.stack(bins).view(out_h, out_w))
        rows.append(torch.stack(channels))
    return torch.stack(rows)


ROIS = torch.tensor([
    [0, 1.0, 2.0, 9.5, 7.0],     # inside
    [1, -3.0, -2.0, 4.0, 5.5],   # over the top-left border
    [0, 6.0, 1.0, 14.0, 12.0],   # over the bottom-right border
    [1, 3.0, 3.0, 3.5, 3.2],     # tiny
], dtype=torch.float64)  # fmt: skip


@pytest.mark.parametrize(
    ("size", "scale", "ratio", "with_offset"),
    [((3, 2), 1.0, 0, True), ((2, 3), 0.5, 2, True), ((3, 3), 1.0, 0, False)],
    ids=["adaptive", "scaled-fixed-ratio", "no-offset"],
)
def test_matches_loop_reference_with_gradients(size, scale, ratio, with_offset):
    generator = torch.Generator().manual_seed(0)
    input = torch.randn(2, 3, 9, 11, generator=generator, dtype=torch.float64)
    offset = torch.randn(4, 2, *size, generator=generator, dtype=torch.float64) * 0.7
    input.requires_grad_(True)
    offset.requires_grad_(True)
    used = offset if with_offset else None
    args = (size, scale, ratio, 0.2)
    expected = reference(input, ROIS, used, *args)
    actual = deformconv.deform_roi_pool(input, ROIS, used, *args)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)
    projection = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    inputs = [input, offset] if with_offset else [input]
    expected_grads = torch.autograd.grad(expected, inputs, projection)
    actual_grads = torch.autograd.grad(actual, inputs, projection)
    for name, a, e in zip(["input", "offset"], actual_grads, expected_grads, strict=False):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=0, msg=name)


def test_zero_offsets_are_aligned_roi_align():
    input = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    zero = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    pooled = deformconv.deform_roi_pool(input, ROIS, zero, 3, 1.0, 0)
    torch.testing.assert_close(pooled, deformconv.deform_roi_pool(input, ROIS, None, 3))
    try:
        import torchvision.ops
    except Exception:  # torchvision is optional and may not import beside this torch
        return
    expected = torchvision.ops.roi_align(input, ROIS, 3, 1.0, 0, aligned=True)
    torch.testing.assert_close(pooled, expected)


def test_gradcheck():
    input = torch.randn(1, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    offset = (torch.randn(1, 2, 2, 2, dtype=torch.float64) * 0.3).requires_grad_(True)
    rois = torch.tensor([[0, 0.7, 1.2, 5.1, 4.9]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda i, o: deformconv.deform_roi_pool(i, rois, o, 2, 1.0, 2), (input, offset)
    )


def test_float32_empty_and_channels():
    input = torch.randn(2, 5, 8, 8)
    pooled = deformconv.deform_roi_pool(input, ROIS.float(), None, (2, 4))
    assert pooled.shape == (4, 5, 2, 4) and pooled.dtype == torch.float32
    assert deformconv.deform_roi_pool(input, torch.zeros(0, 5), None, 3).shape == (0, 5, 3, 3)


@pytest.mark.parametrize(
    ("rois", "offset", "message"),
    [
        (torch.zeros(3, 4), None, r"rois must have shape \(R, 5\)"),
        (torch.zeros(2, 5), torch.zeros(2, 2, 3, 4), r"offset must have shape \(2, 2, 3, 3\)"),
    ],
)
def test_errors(rois, offset, message):
    with pytest.raises(ValueError, match=message):
        deformconv.deform_roi_pool(torch.zeros(1, 1, 4, 4), rois, offset, 3)


def test_layers_start_as_roi_align_and_follow_mmcv_keys():
    torch.manual_seed(0)
    input, rois = torch.randn(2, 4, 10, 10), ROIS.float()
    plain = deformconv.deform_roi_pool(input, rois, None, 3, 0.5, 2)
    assert torch.equal(DeformRoIPool(3, 0.5, 2)(input, rois), plain)
    pack = DeformRoIPoolPack(3, 4, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(pack(input, rois), plain)
    modulated = ModulatedDeformRoIPoolPack(3, 4, 8, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(modulated(input, rois), plain * 0.5)
    assert list(pack.state_dict()) == [
        "offset_fc.0.weight", "offset_fc.0.bias", "offset_fc.2.weight", "offset_fc.2.bias",
        "offset_fc.4.weight", "offset_fc.4.bias",
    ]  # fmt: skip
    assert [k for k in modulated.state_dict() if k.startswith("mask_fc")] == [
        "mask_fc.0.weight", "mask_fc.0.bias", "mask_fc.2.weight", "mask_fc.2.bias"
    ]  # fmt: skip
    # Trained offsets move the bins: the output changes, and gradients reach offset_fc.
    with torch.no_grad():
        pack.offset_fc[4].bias.fill_(0.5)
    moved = pack(input, rois)
    assert not torch.allclose(moved, plain)
    moved.sum().backward()
    assert pack.offset_fc[4].weight.grad.abs().sum() > 0  # the first layers wait for it


def test_non_finite_and_far_rois_and_offsets_pool_zero():
    """RoIs and offsets of NaN, infinity and 1e30 pool 0 with finite gradients; the other
    RoIs of the same call pool as they do alone."""
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(2, 3, 9, 11, generator=generator, dtype=torch.float64)
    rois = torch.cat([ROIS, torch.tensor([[0, math.nan, 1, 3, 4], [1, 2, 2, math.inf, 5],
                                          [0, -1e30, 1, -1e30, 4], [1, 1e30, 1e30, 1e30, 1e30]],
                                         dtype=torch.float64)])  # fmt: skip
    offset = torch.randn(8, 2, 2, 3, generator=generator, dtype=torch.float64)
    offset[0, :, 0, 0] = math.nan
    offset[1, 0, 1, 2] = math.inf
    offset[2, 1, 1, 1] = -1e30
    input.requires_grad_(True)
    offset.requires_grad_(True)
    out = deformconv.deform_roi_pool(input, rois, offset, (2, 3), 1.0, 2, 0.2)
    assert torch.isfinite(out).all()
    assert (out[4:] == 0).all()
    assert (out[0, :, 0, 0] == 0).all() and (out[1, :, 1, 2] == 0).all()
    assert (out[2, :, 1, 1] == 0).all()
    alone = deformconv.deform_roi_pool(input, rois[3:4], offset[3:4], (2, 3), 1.0, 2, 0.2)
    torch.testing.assert_close(out[3:4], alone, rtol=0, atol=0)
    grad_input, grad_offset = torch.autograd.grad(out.sum(), [input, offset])
    assert torch.isfinite(grad_input).all() and torch.isfinite(grad_offset).all()
    assert (grad_offset[4:] == 0).all() and (grad_offset[0, :, 0, 0] == 0).all()


def test_results_do_not_depend_on_the_chunks(monkeypatch):
    input = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    offset = torch.randn(4, 2, 3, 2, dtype=torch.float64) * 0.5
    whole = deformconv.deform_roi_pool(input, ROIS, offset, (3, 2), 1.0, 0)
    module = importlib.import_module("deformconv.deform_roi_pool")
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 1)  # one grid slot a chunk
    torch.testing.assert_close(deformconv.deform_roi_pool(input, ROIS, offset, (3, 2), 1.0, 0),
                               whole, rtol=1e-14, atol=1e-14)  # fmt: skip


@pytest.mark.parametrize("index", [2.0, -1.0, math.nan])
def test_batch_indices_outside_the_input_are_refused(index):
    rois = ROIS.clone()
    rois[2, 0] = index
    with pytest.raises(ValueError, match=rf"must lie in \[0, 2\).*got {index} for RoI 2"):
        deformconv.deform_roi_pool(torch.zeros(2, 1, 4, 4, dtype=torch.float64), rois, None, 3)


def test_an_adaptive_grid_beyond_the_limit_is_refused():
    huge = torch.tensor([[0, 0.0, 0.0, 1e30, 4.0]])
    with pytest.raises(ValueError, match=r"RoI 0's adaptive sampling grid .* pass a sampling_"):
        deformconv.deform_roi_pool(torch.zeros(1, 1, 4, 4), huge, None, 3)
    # With a fixed sampling ratio it pools (the samples lie outside: 0).
    out = deformconv.deform_roi_pool(torch.ones(1, 1, 4, 4), huge, None, 3, sampling_ratio=2)
    assert out.shape == (1, 1, 3, 3) and torch.isfinite(out).all()
