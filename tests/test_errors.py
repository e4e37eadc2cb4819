"""Bad input: every error names the tensor and quotes the expected and actual values."""

from __future__ import annotations

import pytest
import torch

import deformconv
from cases import Config, make_inputs

CONFIG = Config(
    batch=2,
    channels=6,
    height=7,
    width=9,
    out_channels=4,
    kernel=(3, 2),
    stride=(2, 1),
    padding=(1, 0),
    dilation=(2, 1),
    weight_groups=2,
    offset_groups=3,
)


def inputs(**changes):
    tensors = make_inputs(CONFIG, requires_grad=False)
    args = {"stride": CONFIG.stride, "padding": CONFIG.padding, "dilation": CONFIG.dilation}
    args.update(tensors)
    args.update(changes)
    return args


def run(args):
    return deformconv.deform_conv2d(
        args["input"],
        args["offset"],
        args["weight"],
        args["bias"],
        args["stride"],
        args["padding"],
        args["dilation"],
        args["mask"],
    )


def test_valid_arguments_run():
    assert run(inputs()).shape == (2, 4, 3, 8)


ok = inputs()
CASES = {
    "offset channels": (
        {"offset": ok["offset"][:, :-1]},
        ValueError,
        r"offset has 35 channels, expected a positive multiple of "
        r"2 \* kernel_h \* kernel_w = 2 \* 3 \* 2 = 12",
    ),
    "offset groups do not divide channels": (
        {"offset": torch.zeros(2, 48, 3, 8, dtype=torch.float64)},
        ValueError,
        r"input has 6 channels, which is not divisible by the 4 offset groups",
    ),
    "mask channels": (
        {"mask": ok["mask"][:, :-1]},
        ValueError,
        r"mask has shape \(2, 17, 3, 8\), expected \(2, 18, 3, 8\)",
    ),
    "offset spatial size": (
        {"offset": ok["offset"][..., :-1]},
        ValueError,
        r"offset has shape \(2, 36, 3, 7\), expected \(2, 36, 3, 8\)",
    ),
    "mask spatial size": (
        {"mask": ok["mask"][:, :, :-1]},
        ValueError,
        r"mask has shape \(2, 18, 2, 8\), expected \(2, 18, 3, 8\)",
    ),
    "offset batch": (
        {"offset": ok["offset"][:1]},
        ValueError,
        r"offset has shape \(1, 36, 3, 8\), expected \(2, 36, 3, 8\)",
    ),
    "channels vs weight groups": (
        {"weight": torch.zeros(4, 4, 3, 2, dtype=torch.float64)},
        ValueError,
        r"input has 6 channels, which is not a multiple of weight.shape\[1\] = 4",
    ),
    "out channels vs weight groups": (
        {"weight": torch.zeros(5, 3, 3, 2, dtype=torch.float64), "bias": None},
        ValueError,
        r"weight has 5 output channels, which is not divisible by the 2 weight groups",
    ),
    "bias size": (
        {"bias": torch.zeros(5, dtype=torch.float64)},
        ValueError,
        r"bias has 5 elements, expected weight.shape\[0\] = 4",
    ),
    "input not 4-D": (
        {"input": ok["input"][0]},
        ValueError,
        r"input must be a 4-D tensor, got 3-D with shape \(6, 7, 9\)",
    ),
    "offset not 4-D": (
        {"offset": ok["offset"][0]},
        ValueError,
        r"offset must be a 4-D tensor, got 3-D",
    ),
    "weight not 4-D": (
        {"weight": ok["weight"][0]},
        ValueError,
        r"weight must be a 4-D tensor, got 3-D",
    ),
    "mask not 4-D": ({"mask": ok["mask"][0]}, ValueError, r"mask must be a 4-D tensor, got 3-D"),
    "bias not 1-D": (
        {"bias": ok["bias"][None]},
        ValueError,
        r"bias must be a 1-D tensor, got shape \(1, 4\)",
    ),
    "mixed dtypes": (
        {"offset": ok["offset"].float()},
        TypeError,
        r"offset has dtype torch.float32, expected input's dtype torch.float64",
    ),
    "integer tensors": (
        {"input": ok["input"].long()},
        TypeError,
        r"input must be float16, bfloat16, float32 or float64, got torch.int64",
    ),
    "mixed devices": (
        {"weight": ok["weight"].to("meta")},
        ValueError,
        r"weight is on meta, expected input's device cpu",
    ),
    "zero stride": ({"stride": (0, 1)}, ValueError, r"stride must be positive, got \(0, 1\)"),
    "negative dilation": (
        {"dilation": -1},
        ValueError,
        r"dilation must be positive, got \(-1, -1\)",
    ),
    "negative padding": (
        {"padding": (1, -2)},
        ValueError,
        r"padding must be non-negative, got \(1, -2\)",
    ),
    "bad stride type": (
        {"stride": (1, 2, 3)},
        TypeError,
        r"stride must be an int or a pair of ints, got \(1, 2, 3\)",
    ),
    "input too small": (
        {"input": ok["input"][..., :1, :1]},
        ValueError,
        r"input of spatial size \(1, 1\) is too small for kernel \(3, 2\) "
        r".* output size would be \(0, 0\)",
    ),
    "not a tensor": ({"mask": [1.0]}, TypeError, r"mask must be a Tensor, got list"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_error_message(name):
    changes, error, message = CASES[name]
    with pytest.raises(error, match=message):
        run(inputs(**changes))


@pytest.mark.parametrize(
    ("layer", "kwargs", "message"),
    [
        (
            deformconv.DeformConv2d,
            {"groups": 4},
            r"in_channels \(6\) must be divisible by groups \(4\)",
        ),
        (
            deformconv.DeformConv2d,
            {"groups": 3, "out_channels": 4},
            r"out_channels \(4\) must be divisible by groups \(3\)",
        ),
        (deformconv.DeformConv2d, {"kernel_size": 0}, r"kernel_size must be positive, got 0"),
        (deformconv.DeformConv2d, {"stride": (1, 0)}, r"stride must be positive, got \(1, 0\)"),
        (deformconv.DeformConv2d, {"padding": -1}, r"padding must be non-negative, got -1"),
        (deformconv.DeformConv2d, {"in_channels": 0}, r"in_channels must be positive, got 0"),
        (
            deformconv.DeformableConv2d,
            {"offset_groups": 4},
            r"in_channels \(6\) must be divisible by offset_groups \(4\)",
        ),
        (
            deformconv.DeformableConv2d,
            {"offset_groups": 0},
            r"offset_groups must be positive, got 0",
        ),
        (
            deformconv.DeformableConv2d,
            {"dilation": (1, 2, 3)},
            r"dilation must be an int or a pair of ints",
        ),
    ],
)
def test_layer_constructor_errors(layer, kwargs, message):
    arguments = {"in_channels": 6, "out_channels": 6, "kernel_size": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        layer(**arguments)
