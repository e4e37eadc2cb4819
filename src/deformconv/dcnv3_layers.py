"""The DCNv3 (InternImage) and DCNv4 (FlashInternImage) layers, with the original module
structure, initialisation and ``state_dict`` keys, so their checkpoints load with
``strict=True``; plus ``(N, C, H, W)`` wrappers for ordinary CNNs.

``DCNv3``: ``input_proj`` → the operator → ``output_proj``; offsets and mask come from a
depthwise convolution + norm + activation branch (``dw_conv``) and two zero-initialised linear
layers (``offset``, ``mask``; a softmax over each group's points).  ``DCNv4``: ``value_proj``
→ the operator → ``output_proj``; one zero-initialised linear layer ``offset_mask`` gives the
fused offsets and mask (no softmax), optionally after a depthwise convolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._utils import NotScriptable
from .dcnv3 import dcnv3, dcnv4, dcnv4_offset_mask_channels

__all__ = ["DCNv3", "DCNv3NCHW", "DCNv4", "DCNv4NCHW"]


class _ToChannelsLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.permute(0, 2, 3, 1)


def _norm(channels: int, norm_layer: str, eps: float = 1e-6) -> nn.Sequential:
    """Channels-first in, channels-last out, as InternImage's ``build_norm_layer`` builds it
    (the position of the norm in the ``Sequential`` fixes the checkpoint keys)."""
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels), _ToChannelsLast())
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=eps))
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


def _activation(act_layer: str) -> nn.Module:
    layers = {"ReLU": lambda: nn.ReLU(inplace=True), "SiLU": lambda: nn.SiLU(inplace=True),
              "GELU": nn.GELU}  # fmt: skip
    if act_layer not in layers:
        raise ValueError(f"act_layer must be one of {sorted(layers)}, got {act_layer!r}")
    return layers[act_layer]()


def _store_settings(layer: nn.Module, channels: int, kernel_size: int, stride: int, pad: int,
                    dilation: int, group: int, offset_scale: float, dw_kernel_size: int | None,
                    center_feature_scale: bool, remove_center: bool) -> None:  # fmt: skip
    """Check the settings both layers share and keep them under the original attribute names."""
    if channels <= 0 or group <= 0 or channels % group:
        raise ValueError(
            f"channels must be a positive multiple of group, got channels={channels}, group={group}"
        )
    if remove_center and (kernel_size % 2 == 0 or kernel_size == 1):
        raise ValueError(f"remove_center needs an odd kernel_size above 1, got {kernel_size}")
    layer.channels, layer.kernel_size, layer.dw_kernel_size = channels, kernel_size, dw_kernel_size
    layer.stride, layer.pad, layer.dilation = stride, pad, dilation
    layer.group, layer.group_channels = group, channels // group
    layer.offset_scale = offset_scale
    layer.center_feature_scale = center_feature_scale
    layer.remove_center = int(remove_center)


def _check_input(input: Tensor, dims: int, layout: str, channels: int, axis: int = -1) -> None:
    """``ValueError`` unless ``input`` has ``dims`` axes and ``channels`` channels."""
    if input.dim() != dims or input.shape[axis] != channels:
        raise ValueError(
            f"input must be {layout} with C = channels = {channels}, got shape {tuple(input.shape)}"
        )


def _center_feature_scale(layer: nn.Module, x: Tensor, projected: Tensor, query: Tensor) -> Tensor:
    """The optional blend ``x·(1 − s) + projected·s`` with ``s = sigmoid(W·query + b)`` per
    group; the parameters live on the layer, under the original names."""
    scale = F.linear(query, layer.center_feature_scale_proj_weight,
                     layer.center_feature_scale_proj_bias).sigmoid()  # fmt: skip
    scale = scale.repeat_interleave(layer.channels // layer.group, dim=-1)
    return x * (1 - scale) + projected * scale


def _add_center_feature_scale(layer: nn.Module, channels: int, group: int) -> None:
    layer.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels))
    layer.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group))


class DCNv3(NotScriptable, nn.Module):
    r"""The DCNv3 layer of InternImage, on channels-last ``(N, H, W, C)`` tensors.

    Arguments, sub-modules and their initialisation follow the original: ``dw_conv``
    (depthwise ``dw_kernel_size`` convolution, ``norm_layer`` 'LN' or 'BN', ``act_layer``
    'GELU', 'ReLU' or 'SiLU'), ``offset`` and ``mask`` (zero-initialised linear layers),
    ``input_proj`` and ``output_proj`` (Xavier-uniform, zero bias), and with
    ``center_feature_scale`` the parameters ``center_feature_scale_proj_weight`` /
    ``_bias``.  Unlike the original, any channels per group work without a warning.

    Example:
        >>> layer = DCNv3(channels=32, group=4)
        >>> layer(torch.randn(2, 14, 14, 32)).shape
        torch.Size([2, 14, 14, 32])
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        dw_kernel_size: int | None = None,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        act_layer: str = "GELU",
        norm_layer: str = "LN",
        center_feature_scale: bool = False,
        remove_center: bool = False,
    ) -> None:
        super().__init__()
        dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
        _store_settings(self, channels, kernel_size, stride, pad, dilation, group, offset_scale,
                        dw_kernel_size, center_feature_scale, remove_center)  # fmt: skip
        points = kernel_size * kernel_size - self.remove_center
        self.dw_conv = nn.Sequential(
            nn.Conv2d(
                channels,
                channels,
                dw_kernel_size,
                stride=1,
                padding=(dw_kernel_size - 1) // 2,
                groups=channels,
            ),
            _norm(channels, norm_layer),
            _activation(act_layer),
        )
        self.offset = nn.Linear(channels, group * points * 2)
        self.mask = nn.Linear(channels, group * points)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()
        if center_feature_scale:
            _add_center_feature_scale(self, channels, group)

    def _reset_parameters(self) -> None:
        for linear in (self.offset, self.mask):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        for linear in (self.input_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def offset_and_mask(self, input: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The offsets, the (softmax-normalised) mask, and the ``dw_conv`` features."""
        _check_input(input, 4, "(N, H, W, C)", self.channels)
        batch, height, width, _ = input.shape
        points = self.kernel_size * self.kernel_size - self.remove_center
        features = self.dw_conv(input.permute(0, 3, 1, 2))
        offset = self.offset(features)
        mask = self.mask(features).reshape(batch, height, width, self.group, points)
        mask = F.softmax(mask, -1).reshape(batch, height, width, self.group * points)
        return offset, mask.to(input.dtype), features

    def forward(self, input: Tensor) -> Tensor:
        """``(N, H, W, C)`` → ``(N, H, W, C)``."""
        _check_input(input, 4, "(N, H, W, C)", self.channels)
        x = self.input_proj(input)
        projected = x
        offset, mask, features = self.offset_and_mask(input)
        x = dcnv3(x, offset, mask, self.kernel_size, self.stride, self.pad, self.dilation,
                  self.group, self.group_channels, self.offset_scale,
                  bool(self.remove_center))  # fmt: skip
        if self.center_feature_scale:
            x = _center_feature_scale(self, x, projected, features)
        return self.output_proj(x)


class DCNv4(NotScriptable, nn.Module):
    r"""The DCNv4 layer of FlashInternImage, on token sequences ``(N, H·W, C)``.

    Arguments, sub-modules and initialisation follow the original: ``offset_mask`` (a
    zero-initialised linear layer with :func:`~deformconv.dcnv4_offset_mask_channels`
    outputs), optional ``offset_mask_dw`` (depthwise convolution before it),
    ``value_proj`` and ``output_proj`` (Xavier-uniform, zero bias; absent with
    ``without_pointwise``; ``output_bias=False`` drops the output bias), and with
    ``center_feature_scale`` the parameters ``center_feature_scale_proj_weight`` / ``_bias``.
    Any kernel size and any channels per group work (the original needs a 3×3-like kernel
    and multiples of 16).

    Example:
        >>> layer = DCNv4(channels=24, group=3)
        >>> layer(torch.randn(2, 10 * 12, 24), shape=(10, 12)).shape
        torch.Size([2, 120, 24])
    """

    def __init__(
        self,
        channels: int = 64,
        kernel_size: int = 3,
        stride: int = 1,
        pad: int = 1,
        dilation: int = 1,
        group: int = 4,
        offset_scale: float = 1.0,
        dw_kernel_size: int | None = None,
        center_feature_scale: bool = False,
        remove_center: bool = False,
        output_bias: bool = True,
        without_pointwise: bool = False,
    ) -> None:
        super().__init__()
        _store_settings(self, channels, kernel_size, stride, pad, dilation, group, offset_scale,
                        dw_kernel_size, center_feature_scale, remove_center)  # fmt: skip
        self.without_pointwise = without_pointwise
        self.K = group * (kernel_size * kernel_size - self.remove_center)
        if dw_kernel_size is not None:
            self.offset_mask_dw = nn.Conv2d(channels, channels, dw_kernel_size, stride=1,
                                            padding=(dw_kernel_size - 1) // 2,
                                            groups=channels)  # fmt: skip
        outputs = dcnv4_offset_mask_channels(group, kernel_size, remove_center)
        self.offset_mask = nn.Linear(channels, outputs)
        if not without_pointwise:
            self.value_proj = nn.Linear(channels, channels)
            self.output_proj = nn.Linear(channels, channels, bias=output_bias)
        self._reset_parameters()
        if center_feature_scale:
            _add_center_feature_scale(self, channels, group)

    def _reset_parameters(self) -> None:
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        if not self.without_pointwise:
            for linear in (self.value_proj, self.output_proj):
                nn.init.xavier_uniform_(linear.weight)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def forward(self, input: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
        """``(N, L, C)`` → ``(N, L, C)`` with ``L = H·W``; ``shape = (H, W)``, square when
        omitted."""
        _check_input(input, 3, "(N, H·W, C)", self.channels)
        batch, length, channels = input.shape
        if shape is None:
            side = math.isqrt(length)
            if side * side != length:
                raise ValueError(f"input has {length} tokens, not a square: pass shape=(H, W)")
            shape = (side, side)
        height, width = shape
        if height * width != length:
            raise ValueError(f"shape {tuple(shape)} has {height * width} pixels, input {length}")
        x = input if self.without_pointwise else self.value_proj(input)
        x = x.reshape(batch, height, width, channels)
        query = input
        if self.dw_kernel_size is not None:
            image = input.view(batch, height, width, channels).permute(0, 3, 1, 2)
            query = self.offset_mask_dw(image).permute(0, 2, 3, 1).reshape(batch, length, channels)
        offset_mask = self.offset_mask(query).reshape(batch, height, width,
                                                      self.offset_mask.out_features)  # fmt: skip
        projected = x
        x = dcnv4(x, offset_mask, self.kernel_size, self.stride, self.pad, self.dilation,
                  self.group, self.group_channels, self.offset_scale,
                  bool(self.remove_center))  # fmt: skip
        if self.center_feature_scale:
            x = _center_feature_scale(self, x, projected, x)
        x = x.reshape(batch, length, channels)
        return x if self.without_pointwise else self.output_proj(x)


class DCNv3NCHW(DCNv3):
    """:class:`DCNv3` for ``(N, C, H, W)`` tensors, with the same parameters and keys.

    >>> DCNv3NCHW(channels=16, group=2)(torch.randn(1, 16, 9, 9)).shape
    torch.Size([1, 16, 9, 9])
    """

    def forward(self, input: Tensor) -> Tensor:
        _check_input(input, 4, "(N, C, H, W)", self.channels, axis=1)
        return super().forward(input.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DCNv4NCHW(DCNv4):
    """:class:`DCNv4` for ``(N, C, H, W)`` tensors, with the same parameters and keys.

    >>> DCNv4NCHW(channels=16, group=2)(torch.randn(1, 16, 9, 7)).shape
    torch.Size([1, 16, 9, 7])
    """

    def forward(self, input: Tensor) -> Tensor:  # type: ignore[override]
        _check_input(input, 4, "(N, C, H, W)", self.channels, axis=1)
        batch, channels, height, width = input.shape
        tokens = input.flatten(2).transpose(1, 2)
        out = super().forward(tokens, shape=(height, width))
        return out.transpose(1, 2).reshape(batch, channels, height, width)
