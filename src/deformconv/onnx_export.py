"""ONNX export of ``deform_conv2d`` to the standard ``DeformConv`` operator (opset 19).

Nothing to call: ``torch.onnx.export(model, args, f, opset_version=19)`` turns every call of
:func:`deformconv.deform_conv2d` (and so of the layers) into one ``DeformConv`` node, with
the TorchScript-based exporter (``dynamo=False``) and the ``torch.export``-based one
(``dynamo=True``).  Offsets and masks computed inside the model export as ordinary operators
around it.  Below opset 19 ONNX has no such operator, and the export stops with an error that
says so.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

#: The first ONNX opset with ``DeformConv``.
MIN_OPSET = 19
_OP = "deformconv::deform_conv2d"


def _attributes(weight_shape, offset_channels, input_channels, stride, padding, dilation) -> dict:
    _, group_in, kernel_h, kernel_w = weight_shape
    return {
        "dilations": [int(d) for d in dilation],
        "group": int(input_channels) // int(group_in),
        "kernel_shape": [int(kernel_h), int(kernel_w)],
        "offset_group": int(offset_channels) // (2 * int(kernel_h) * int(kernel_w)),
        "pads": [int(padding[0]), int(padding[1]), int(padding[0]), int(padding[1])],
        "strides": [int(s) for s in stride],
    }


def dynamo_node(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """The ``DeformConv`` node for the ``torch.export``-based exporter."""
    attributes = _attributes(
        weight.shape, offset.shape[1], input.shape[1], stride, padding, dilation
    )
    shape = (input.shape[0], weight.shape[0], offset.shape[2], offset.shape[3])
    return torch.onnx.ops.symbolic(
        "DeformConv",
        [input, weight, offset, bias, mask],
        attributes,
        dtype=input.dtype,
        shape=shape,
        version=MIN_OPSET,
    )


def _symbolic(g, input, offset, mask, weight, bias, stride, padding, dilation):
    """TorchScript-exporter symbolic of ``deformconv::deform_conv2d`` (opset 19 and later)."""
    from torch.onnx import symbolic_helper as helper

    weight_shape = helper._get_tensor_sizes(weight)
    input_channels = helper._get_tensor_sizes(input)[1]
    offset_channels = helper._get_tensor_sizes(offset)[1]
    stride, padding, dilation = (helper._maybe_get_const(v, "is") for v in (stride, padding,
                                                                          dilation))  # fmt: skip
    attributes = _attributes(weight_shape, offset_channels, input_channels, stride, padding,
                             dilation)  # fmt: skip
    inputs = [input, weight, offset]
    if not helper._is_none(mask):
        if helper._is_none(bias):  # DeformConv's inputs are positional: B comes before mask
            zeros = torch.zeros(weight_shape[0], dtype=_torch_dtype(weight))
            bias = g.op("Constant", value_t=zeros)
        inputs += [bias, mask]
    elif not helper._is_none(bias):
        inputs.append(bias)
    return g.op("DeformConv", *inputs, **{f"{k}_i": v for k, v in attributes.items()})


_SCALAR_TYPES = {"Float": torch.float32, "Double": torch.float64, "Half": torch.float16,
                 "BFloat16": torch.bfloat16}  # fmt: skip


def _torch_dtype(value) -> torch.dtype:
    """The dtype of a TorchScript graph value (float32 when the graph does not say)."""
    return _SCALAR_TYPES.get(value.type().scalarType(), torch.float32)


def _too_old(g, *args):
    from torch.onnx.errors import SymbolicValueError

    raise SymbolicValueError(
        f"deform_conv2d exports to the ONNX operator DeformConv, which needs "
        f"opset_version >= {MIN_OPSET}",
        args[0],
    )


@functools.cache
def register_torchscript_symbolic() -> None:
    """Teach the TorchScript-based exporter ``deformconv::deform_conv2d`` (done on first use)."""
    torch.onnx.register_custom_op_symbolic(_OP, _too_old, 9)
    torch.onnx.register_custom_op_symbolic(_OP, _symbolic, MIN_OPSET)
