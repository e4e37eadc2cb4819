"""Checkpoints of torchvision, mmcv / mmdetection, detectron2 and the DCNv2 package in this
package's layers.

These libraries keep the same tensors under different keys:

* torchvision ``DeformConv2d``: ``weight``, ``bias`` -- this package's :class:`DeformConv2d`.
* mmcv ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack``: ``weight``, (``bias``),
  ``conv_offset.weight``, ``conv_offset.bias`` -- this package's :class:`DeformableConv2d`;
  checkpoints of mmcv's early versions keep the offset branch beside the layer, as
  ``<layer>_offset.weight`` / ``<layer>_offset.bias``.
* detectron2 ``DeformConv`` / ``ModulatedDeformConv`` hold no offset branch: the block beside
  them does (``conv2_offset`` next to ``conv2`` in ``DeformBottleneckBlock``), with the same
  channel layout (offsets, then mask logits for the modulated layer).
* The DCNv2 package (``DCN`` of CharlesShang/DCNv2 and the copies of it in CenterNet, FairMOT
  and many detection and pose models): ``weight``, ``bias``, ``conv_offset_mask.weight``,
  ``conv_offset_mask.bias``, modulated, with the same channel layout (it chunks the
  prediction into three and concatenates the first two as the offsets).

:func:`convert_state_dict` rewrites a whole model's state dict by those key patterns; the
``*_from_*`` functions build one layer from its tensors.

>>> import torch
>>> old = {"conv2.weight": torch.randn(8, 4, 3, 3), "conv2_offset.weight": torch.zeros(18, 4, 3, 3),
...        "conv2_offset.bias": torch.zeros(18)}
>>> sorted(convert_state_dict(old, "mmcv"))
['conv2.conv_offset.bias', 'conv2.conv_offset.weight', 'conv2.weight']
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ._utils import IntOrPair
from .deform_conv2d import DeformConv2d
from .deformable_conv2d import DeformableConv2d

__all__ = [
    "SOURCES",
    "convert_state_dict",
    "deform_conv2d_from_torchvision",
    "deformable_conv2d_from_dcnv2",
    "deformable_conv2d_from_detectron2",
    "deformable_conv2d_from_mmcv",
]

SOURCES = ("torchvision", "mmcv", "detectron2", "dcnv2")


def convert_state_dict(state_dict: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with the keys of ``source``'s deformable layers renamed to
    those of this package's layers, for a model whose deformable layers are
    :class:`DeformableConv2d` (or :class:`DeformConv2d` for torchvision) at the same names.

    Every ``<name>_offset.weight`` / ``<name>_offset.bias`` beside a ``<name>.weight`` becomes
    ``<name>.conv_offset.weight`` / ``.bias`` (early mmcv checkpoints, detectron2's blocks), and
    for ``"dcnv2"`` every ``<name>.conv_offset_mask.weight`` / ``.bias`` does; all other keys,
    detectron2's ``<name>.norm.*`` included, are kept as they are.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}")
    converted = dict(state_dict)
    if source == "torchvision":
        return converted
    marker = ".conv_offset_mask" if source == "dcnv2" else "_offset"
    for key in list(converted):
        for suffix in ("weight", "bias"):
            ending = f"{marker}.{suffix}"
            if not key.endswith(ending):
                continue
            stem = key[: -len(ending)]
            target = f"{stem}.conv_offset.{suffix}"
            if f"{stem}.weight" in converted and target not in converted:
                converted[target] = converted.pop(key)
    return converted


def deform_conv2d_from_torchvision(
    state_dict: Mapping[str, Tensor],
    *,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> DeformConv2d:
    """A :class:`DeformConv2d` holding torchvision ``DeformConv2d``'s ``weight`` (and
    ``bias``); the settings, which a state dict does not hold, are torchvision's arguments."""
    weight = state_dict["weight"]
    layer = DeformConv2d(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
        padding=padding, dilation=dilation, groups=groups, bias="bias" in state_dict,
        dtype=weight.dtype,
    )  # fmt: skip
    layer.load_state_dict(dict(state_dict), strict=True)
    return layer


def deformable_conv2d_from_mmcv(
    state_dict: Mapping[str, Tensor],
    *,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
    modulated: bool = False,
) -> DeformableConv2d:
    """A :class:`DeformableConv2d` from mmcv ``DeformConv2dPack`` (``modulated=False``) or
    ``ModulatedDeformConv2dPack`` (``modulated=True``) tensors: ``weight``, optional ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``.  The mask is mmcv's (``mask_scale=1``)."""
    return _deformable(
        state_dict["weight"], state_dict.get("bias"), state_dict["conv_offset.weight"],
        state_dict.get("conv_offset.bias"), stride, padding, dilation, groups, deform_groups,
        modulated,
    )  # fmt: skip


def deformable_conv2d_from_dcnv2(
    state_dict: Mapping[str, Tensor],
    *,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    deformable_groups: int = 1,
) -> DeformableConv2d:
    """A modulated :class:`DeformableConv2d` from the DCNv2 package's ``DCN`` tensors:
    ``weight``, ``bias``, ``conv_offset_mask.weight``, ``conv_offset_mask.bias``."""
    return _deformable(
        state_dict["weight"], state_dict.get("bias"), state_dict["conv_offset_mask.weight"],
        state_dict.get("conv_offset_mask.bias"), stride, padding, dilation, 1,
        deformable_groups, True,
    )  # fmt: skip


def deformable_conv2d_from_detectron2(
    conv_state_dict: Mapping[str, Tensor],
    offset_state_dict: Mapping[str, Tensor],
    *,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    deformable_groups: int = 1,
    modulated: bool = False,
) -> DeformableConv2d:
    """A :class:`DeformableConv2d` from detectron2's ``DeformConv`` (``modulated=False``) or
    ``ModulatedDeformConv`` tensors (``weight``, optional ``bias``; a ``norm.*`` entry is left
    to the caller) and those of the offset convolution beside it (``weight``, ``bias``)."""
    return _deformable(
        conv_state_dict["weight"], conv_state_dict.get("bias"), offset_state_dict["weight"],
        offset_state_dict.get("bias"), stride, padding, dilation, groups, deformable_groups,
        modulated,
    )  # fmt: skip


def _deformable(
    weight, bias, offset_weight, offset_bias, stride, padding, dilation, groups, offset_groups,
    modulated,
) -> DeformableConv2d:  # fmt: skip
    taps = weight.shape[2] * weight.shape[3]
    expected = offset_groups * taps * (3 if modulated else 2)
    if offset_weight.shape[0] != expected:
        kind = "3 (offsets and mask)" if modulated else "2 (offsets)"
        raise ValueError(
            f"the offset convolution has {offset_weight.shape[0]} output channels, expected "
            f"{kind} * offset groups {offset_groups} * {taps} taps = {expected}"
        )
    layer = DeformableConv2d(
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
        padding=padding, dilation=dilation, groups=groups, offset_groups=offset_groups,
        bias=bias is not None, modulated=modulated, dtype=weight.dtype,
    )  # fmt: skip
    if tuple(offset_weight.shape[1:]) != tuple(layer.conv_offset.weight.shape[1:]):
        raise ValueError(
            f"the offset convolution's weight has shape {tuple(offset_weight.shape)}, expected "
            f"{tuple(layer.conv_offset.weight.shape)}"
        )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
        layer.conv_offset.weight.copy_(offset_weight)
        if offset_bias is None:
            layer.conv_offset.bias.zero_()
        else:
            layer.conv_offset.bias.copy_(offset_bias)
    return layer
