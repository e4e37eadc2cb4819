"""deform_conv1d and its layers against a float64 loop reference of the 1-D definition."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import deformconv


def _linear(sequence, x):
    """Linear sample of ``sequence`` ``(C, L)`` at ``x``; neighbours outside count as 0."""
    length = sequence.shape[1]
    total = sequence.new_zeros(sequence.shape[0])
    if not math.isfinite(x.item()):
        return total
    low = math.floor(x.item())
    frac = x - low
    for index, weight in ((low, 1 - frac), (low + 1, frac)):
        if 0 <= index < length:
            total = total + weight * sequence[:, index]
    return total


def reference(input, offset, weight, bias, stride, padding, dilation, mask):
    batch, channels, _ = input.shape
    out_channels, group_in, taps = weight.shape
    groups = channels // group_in
    offset_groups = offset.shape[1] // taps
    group_out, per_offset_group = out_channels // groups, channels // offset_groups
    out_length = offset.shape[2]
    rows = []
    for n in range(batch):
        columns = []
        for o in range(out_length):
            samples = []  # (taps, channels)
            for k in range(taps):
                parts = []
                for g in range(offset_groups):
                    position = o * stride - padding + k * dilation + offset[n, g * taps + k, o]
                    value = _linear(input[n, g * per_offset_group:(g + 1) * per_offset_group],
                                    position)  # fmt: skip
                    if mask is not None:
                        value = value * mask[n, g * taps + k, o]
                    parts.append(value)
                samples.append(torch.cat(parts))
            samples = torch.stack(samples)
            outputs = []
            for g in range(groups):
                block = samples[:, g * group_in : (g + 1) * group_in]  # (taps, group_in)
                w = weight[g * group_out : (g + 1) * group_out]  # (group_out, group_in, taps)
                outputs.append((w * block.T[None]).sum((1, 2)))
            column = torch.cat(outputs)
            columns.append(column if bias is None else column + bias)
        rows.append(torch.stack(columns, dim=1))
    return torch.stack(rows)


CONFIGS = {
    "groups-offset-groups": dict(
        channels=6,
        out=4,
        taps=3,
        stride=2,
        padding=1,
        dilation=2,
        groups=2,
        offset_groups=3,
        mask=True,
        bias=True,
    ),
    "plain": dict(
        channels=3,
        out=5,
        taps=4,
        stride=1,
        padding=2,
        dilation=1,
        groups=1,
        offset_groups=1,
        mask=False,
        bias=False,
    ),
}


def make(config, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    length = 13
    out_length = (length + 2 * config["padding"] - config["dilation"] * (config["taps"] - 1) - 1
                  ) // config["stride"] + 1  # fmt: skip
    g, k = config["offset_groups"], config["taps"]
    tensors = {
        "input": torch.randn(2, config["channels"], length, generator=generator),
        "offset": torch.randn(2, g * k, out_length, generator=generator) * 2,
        "weight": torch.randn(
            config["out"], config["channels"] // config["groups"], k, generator=generator
        ),
        "bias": torch.randn(config["out"], generator=generator) if config["bias"] else None,
        "mask": torch.rand(2, g * k, out_length, generator=generator) if config["mask"] else None,
    }
    return {n: None if t is None else t.to(dtype).requires_grad_(True) for n, t in tensors.items()}


def call(fn, t, config):
    return fn(t["input"], t["offset"], t["weight"], t["bias"], config["stride"],
              config["padding"], config["dilation"], t["mask"])  # fmt: skip


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference_with_gradients(name):
    config = CONFIGS[name]
    tensors = make(config)
    expected = call(reference, tensors, config)
    actual = call(deformconv.deform_conv1d, tensors, config)
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=0)
    inputs = [t for t in tensors.values() if t is not None]
    projection = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, inputs, projection),
                    torch.autograd.grad(expected, inputs, projection), strict=True):  # fmt: skip
        torch.testing.assert_close(a, e, atol=1e-10, rtol=0)


def test_gradcheck():
    config = CONFIGS["groups-offset-groups"]
    tensors = make(config, seed=2)
    inputs = tuple(t for t in tensors.values() if t is not None)

    def run(input, offset, weight, bias, mask):
        return deformconv.deform_conv1d(input, offset, weight, bias, 2, 1, 2, mask)

    assert torch.autograd.gradcheck(run, inputs)


def test_zero_offsets_equal_conv1d():
    x, weight, bias = torch.randn(3, 4, 17), torch.randn(6, 2, 5), torch.randn(6)
    offset = torch.zeros(3, 5, 8)
    out = deformconv.deform_conv1d(x, offset, weight, bias, stride=2, padding=1, dilation=1)
    torch.testing.assert_close(out, F.conv1d(x, weight, bias, 2, 1, 1, 2), atol=1e-5, rtol=1e-5)


def test_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 20)
    fresh = deformconv.DeformableConv1d(4, 6, 3, padding=1, groups=2, offset_groups=2)
    torch.testing.assert_close(fresh(x), F.conv1d(x, fresh.weight, fresh.bias, padding=1,
                                                  groups=2), atol=1e-5, rtol=1e-5)  # fmt: skip
    modulated = deformconv.DeformableConv1d(4, 6, 3, padding=1, modulated=True)
    half = 0.5 * F.conv1d(x, modulated.weight, padding=1) + modulated.bias[:, None]
    torch.testing.assert_close(modulated(x), half, atol=1e-5, rtol=1e-5)
    assert modulated.conv_offset.out_channels == 6
    layer = deformconv.DeformConv1d(4, 6, 3, padding=1, bias=False)
    offset = torch.randn(2, 3, 20)
    torch.testing.assert_close(
        layer(x, offset), deformconv.deform_conv1d(x, offset, layer.weight, padding=1)
    )
    assert repr(layer) == "DeformConv1d(4, 6, kernel_size=(3,), padding=(1,), bias=False)"
    modulated(x).sum().backward()
    assert modulated.conv_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"input": torch.zeros(2, 4, 5, 5)}, "input must be a 3-D tensor"),
        ({"offset": torch.zeros(2, 4, 20)}, "offset has 4 channels, expected a positive multiple"),
        ({"offset": torch.zeros(2, 3, 19)}, r"offset must have shape \(2, 3, 20\)"),
        ({"mask": torch.zeros(2, 3, 7)}, r"mask must have shape \(2, 3, 20\)"),
    ],
)
def test_errors(change, message):
    args = {"input": torch.zeros(2, 4, 20), "offset": torch.zeros(2, 3, 20),
            "weight": torch.zeros(6, 4, 3), "mask": None, **change}  # fmt: skip
    with pytest.raises(ValueError, match=message):
        deformconv.deform_conv1d(args["input"], args["offset"], args["weight"], padding=1,
                                 mask=args["mask"])  # fmt: skip


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layer = deformconv.DeformableConv1d(4, 6, 3, padding=1, modulated=True)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.2)
    x = torch.randn(2, 4, 16, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))
    compiled(x).sum().backward()
    assert x.grad is not None and layer.conv_offset.weight.grad is not None
