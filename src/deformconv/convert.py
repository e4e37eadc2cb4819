"""Turn chosen convolutions of any model into deformable ones, keeping what the model computes.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
>>> x = torch.randn(1, 3, 16, 16)
>>> before = model(x)
>>> deformable = convert_to_deformable(model, include="2", modulated=True)
>>> type(deformable[2]).__name__
'DeformableConv2d'
>>> torch.allclose(deformable(x), before, atol=1e-5)
True
>>> len(offset_parameters(deformable))  # conv_offset weight and bias
2
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from ._layers import _SelfContained
from .deform_conv1d import DeformableConv1d
from .deform_conv3d import DeformableConv3d
from .deformable_conv2d import DeformableConv2d

__all__ = ["convert_to_deformable", "deformable_layers", "offset_parameters"]

Selector = str | Iterable[str] | Callable[[str, nn.Module], bool] | None

#: The deformable layer that replaces each kind of convolution.
_DEFORMABLE: dict[type, type] = {
    nn.Conv1d: DeformableConv1d,
    nn.Conv2d: DeformableConv2d,
    nn.Conv3d: DeformableConv3d,
}


def _selected(selector: Selector) -> Callable[[str, nn.Module], bool]:
    if selector is None:
        return lambda name, module: True
    if isinstance(selector, str):
        return lambda name, module: fnmatch.fnmatchcase(name, selector)
    if callable(selector):
        return selector
    names = set(selector)
    return lambda name, module: name in names


def _padding(name: str, conv: nn.Module) -> tuple[int, ...]:
    if conv.padding == "valid":
        return (0,) * len(conv.kernel_size)
    if conv.padding == "same":
        spans = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(span % 2 for span in spans):
            raise ValueError(
                f"{name}: padding='same' with kernel {conv.kernel_size} and dilation "
                f"{conv.dilation} pads unevenly, which deformable convolution cannot"
            )
        return tuple(span // 2 for span in spans)
    return tuple(conv.padding)  # type: ignore[return-value]


def _deformable_from(name: str, conv: nn.Module, modulated: bool, offset_groups: int) -> nn.Module:
    if conv.in_channels % offset_groups:
        raise ValueError(
            f"{name}: in_channels {conv.in_channels} is not divisible by "
            f"offset_groups {offset_groups}"
        )
    layer = _DEFORMABLE[type(conv)](
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=_padding(name, conv),
        dilation=conv.dilation,
        groups=conv.groups,
        offset_groups=offset_groups,
        bias=conv.bias is not None,
        modulated=modulated,
        mask_scale=2.0 if modulated else 1.0,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    layer.weight.requires_grad_(conv.weight.requires_grad)
    if conv.bias is not None:
        layer.bias.requires_grad_(conv.bias.requires_grad)
    layer.train(conv.training)
    return layer


def convert_to_deformable(
    model: nn.Module,
    include: Selector = None,
    *,
    modulated: bool = False,
    offset_groups: int = 1,
    inplace: bool = False,
) -> nn.Module:
    """Replace chosen convolutions of ``model`` by deformable ones: :class:`torch.nn.Conv2d`
    by :class:`DeformableConv2d`, and likewise ``Conv1d`` and ``Conv3d`` by
    :class:`DeformableConv1d` and :class:`DeformableConv3d`.

    Each replaced layer keeps its weight, bias and settings and gets a zero-initialised offset
    predictor, so the converted model computes exactly what the original did until the offsets
    are trained.  Modulated (v2) layers are built with ``mask_scale=2``: their initial mask is
    ``2 · sigmoid(0) = 1`` rather than mmcv's 0.5, which keeps the outputs unchanged; the
    mask then ranges over (0, 2).

    Args:
        model: any module; it is copied first unless ``inplace=True``.
        include: which convolutions to convert, by their names in ``model.named_modules()``:
            ``None`` for all, a glob pattern (``"layer3.*"``, ``"features.[2-4]"``), a
            collection of names, or a predicate ``(name, conv) -> bool``.
        modulated: build deformable convolution v2 layers (with a mask) instead of v1.
        offset_groups: offset groups of every new layer.
        inplace: modify ``model`` itself.

    Returns:
        The converted model (``model`` itself when ``inplace``).

    Raises:
        ValueError: when nothing matches ``include``, or a chosen layer cannot be converted
            (uneven ``padding="same"``, or channels that ``offset_groups`` does not divide).
    """
    if not inplace:
        model = copy.deepcopy(model)
    chosen = _selected(include)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) in _DEFORMABLE and chosen(name, module)
    ]
    if not targets:
        raise ValueError(
            f"no convolution (nn.Conv1d, nn.Conv2d, nn.Conv3d) of the model matches "
            f"include={include!r}"
        )
    for name, conv in targets:
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attribute, _deformable_from(name, conv, modulated, offset_groups))
    return model


def deformable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The self-contained deformable layers of ``model`` (:class:`DeformableConv1d`,
    :class:`DeformableConv2d`, :class:`DeformableConv3d`) with their names, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, _SelfContained):
            yield name, module


def offset_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every offset (and mask) predictor in ``model``: give them their own
    learning rate, or train them alone, e.g. ``torch.optim.SGD([{"params":
    offset_parameters(model), "lr": 1e-3}, ...])``."""
    return [p for _, layer in deformable_layers(model) for p in layer.conv_offset.parameters()]
