"""Deformable RoI pooling (Dai et al., 2017), v1 and modulated (Zhu et al., 2019).

Aligned RoI pooling in which every output bin is shifted by a learned offset, given as a
fraction of the RoI's size times ``gamma`` — mmcv's ``deform_roi_pool`` semantics: RoI corners
scaled by ``spatial_scale`` and shifted by half a pixel, ``sampling_ratio`` samples per bin
and axis (adaptive, ``ceil(roi_size / output_size)``, when 0), each sample bilinear with
RoIAlign's border rule, averaged over the bin.  With zero offsets it is
``torchvision.ops.roi_align(..., aligned=True)``.  Written in PyTorch operators: it runs on any
device, autograd gives every gradient, and ``torch.compile`` traces it.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ._utils import FLOATING_DTYPES, IntOrPair, NotScriptable, _pair, compute_dtype

__all__ = ["DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack", "deform_roi_pool"]


def _check(input: Tensor, rois: Tensor, offset: Tensor | None, size, sampling_ratio) -> None:
    if input.dim() != 4:
        raise ValueError(f"input must be a 4-D tensor, got shape {tuple(input.shape)}")
    if input.dtype not in FLOATING_DTYPES:
        raise TypeError(f"input must be a floating-point tensor, got {input.dtype}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"rois must have shape (R, 5) (batch index, x1, y1, x2, y2), got {tuple(rois.shape)}"
        )
    expected = (rois.shape[0], 2, *size)
    if offset is not None and tuple(offset.shape) != expected:
        raise ValueError(f"offset must have shape {expected}, got {tuple(offset.shape)}")
    if min(size) <= 0:
        raise ValueError(f"output_size must be positive, got {size}")
    if sampling_ratio < 0:
        raise ValueError(f"sampling_ratio must be >= 0, got {sampling_ratio}")


#: The most samples one bin of one RoI may take (the adaptive grid of a RoI some 7000 feature
#: pixels wide at 7×7 bins); more is refused with an error.
MAX_SAMPLES_PER_BIN = 2**20
#: Sample positions are taken in chunks of about this many sampled values.
_CHUNK_ELEMENTS = 2**24


def _check_batch_indices(rois: Tensor, batch: int) -> None:
    index = rois[:, 0]
    bad = ~((index >= 0) & (index < batch))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"rois[:, 0] holds batch indices, which must lie in [0, {batch}) (input has {batch} "
            f"images), got {index[r].item()} for RoI {r}"
        )


def _adaptive_grid(size: Tensor, bins: int) -> Tensor:
    """``ceil(size / bins)`` samples per bin along one axis: 0 where ``size`` is not positive
    or not finite (such a RoI pools 0)."""
    per_bin = size.detach() / bins
    per_bin = torch.where(per_bin.isfinite(), per_bin, 0.0).clamp(0, MAX_SAMPLES_PER_BIN + 1)
    return torch.ceil(per_bin).long()


def _check_grid(grid_h: Tensor, grid_w: Tensor) -> None:
    samples = grid_h * grid_w
    if bool((samples > MAX_SAMPLES_PER_BIN).any()):
        r = int(samples.argmax())
        raise ValueError(
            f"rois: RoI {r}'s adaptive sampling grid (sampling_ratio=0) would take "
            f"{int(grid_h[r])} × {int(grid_w[r])} samples per bin, more than "
            f"MAX_SAMPLES_PER_BIN = {MAX_SAMPLES_PER_BIN}; clip the boxes or pass a "
            f"sampling_ratio"
        )


def _bilinear(table: Tensor, image: Tensor, y: Tensor, x: Tensor, height: int, width: int):
    """RoIAlign's bilinear sample of ``table`` ``(N, H·W, C)`` at ``(y, x)`` ``(R, P)``:
    0 beyond one pixel outside, positions clamped to the border inside that."""
    # Not (inside or within a pixel of it): NaN and infinite positions count as outside too.
    outside = ~((y >= -1) & (y <= height) & (x >= -1) & (x <= width))
    y = torch.where(outside, 0.0, y).clamp(min=0)
    x = torch.where(outside, 0.0, x).clamp(min=0)
    y_low = y.detach().floor().clamp(max=height - 1)
    x_low = x.detach().floor().clamp(max=width - 1)
    y = torch.where(y_low >= height - 1, y_low, y)
    x = torch.where(x_low >= width - 1, x_low, x)
    ly, lx = y - y_low, x - x_low
    y0, x0 = y_low.long(), x_low.long()
    y1, x1 = (y0 + 1).clamp(max=height - 1), (x0 + 1).clamp(max=width - 1)
    rows = image[:, None]

    def corner(yy, xx):
        return table[rows, yy * width + xx]  # (R, P, C)

    value = (
        corner(y0, x0) * ((1 - ly) * (1 - lx))[..., None]
        + corner(y0, x1) * ((1 - ly) * lx)[..., None]
        + corner(y1, x0) * (ly * (1 - lx))[..., None]
        + corner(y1, x1) * (ly * lx)[..., None]
    )
    return value.masked_fill(outside[..., None], 0)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    output_size: IntOrPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    r"""Deformable RoI pooling: aligned RoI pooling with a learned shift per output bin.

    Args:
        input (Tensor[N, C, H, W]): feature map.
        rois (Tensor[R, 5]): boxes ``(batch index, x1, y1, x2, y2)`` in image coordinates.
        offset (Tensor[R, 2, out_h, out_w], optional): per-bin shifts, channel 0 along x and
            channel 1 along y, as fractions of the RoI's width and height (times ``gamma``).
            ``None`` pools without deformation.
        output_size (int or Tuple[int, int]): bins per RoI, ``(out_h, out_w)``.
        spatial_scale (float): factor from image to feature-map coordinates.
        sampling_ratio (int): samples per bin and axis; 0 adapts it to the RoI's size.
        gamma (float): scale of the offsets.

    Returns:
        Tensor[R, C, out_h, out_w]

    Samples at NaN or infinite positions (from the RoIs or the offsets) count as 0, as those
    beyond one pixel outside the map do.  Raises ``ValueError`` for a batch index outside
    ``[0, N)`` and for a RoI whose adaptive grid would take more than
    :data:`MAX_SAMPLES_PER_BIN` samples per bin.

    References:
        Dai et al., "Deformable Convolutional Networks", ICCV 2017.

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
        >>> deform_roi_pool(x, rois, output_size=2, sampling_ratio=2)
        tensor([[[[ 2.5000,  4.5000],
                  [10.5000, 12.5000]]]])
    """
    size = _pair(output_size, "output_size")
    _check(input, rois, offset, size, sampling_ratio)
    out_h, out_w = size
    batch, channels, height, width = input.shape
    dtype = compute_dtype(input.dtype)
    count = rois.shape[0]
    if count == 0 or input.numel() == 0:
        return input.new_zeros(count, channels, out_h, out_w)
    _check_batch_indices(rois, batch)
    boxes = rois.to(dtype) * spatial_scale - 0.5
    start_w, start_h, end_w, end_h = boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    roi_w, roi_h = end_w - start_w, end_h - start_h
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((count,), sampling_ratio, device=input.device)
    else:
        grid_h, grid_w = _adaptive_grid(roi_h, out_h), _adaptive_grid(roi_w, out_w)
        _check_grid(grid_h, grid_w)
    samples_h = max(1, int(grid_h.max()))
    samples_w = max(1, int(grid_w.max()))
    # Bin origins (R, out_h, out_w), shifted by the offsets.
    ph = torch.arange(out_h, device=input.device, dtype=dtype)[None, :, None]
    pw = torch.arange(out_w, device=input.device, dtype=dtype)[None, None, :]
    origin_y = start_h[:, None, None] + ph * bin_h[:, None, None]
    origin_x = start_w[:, None, None] + pw * bin_w[:, None, None]
    if offset is not None:
        offset = offset.to(dtype)
        # A RoI of non-finite size samples nothing; its offsets get a zero gradient.
        scale_w = torch.where(roi_w.isfinite(), gamma * roi_w, 0.0)[:, None, None]
        scale_h = torch.where(roi_h.isfinite(), gamma * roi_h, 0.0)[:, None, None]
        origin_x = origin_x + scale_w * offset[:, 0]
        origin_y = origin_y + scale_h * offset[:, 1]
    step_y = (bin_h / grid_h.clamp(min=1))[:, None, None, None]
    step_x = (bin_w / grid_w.clamp(min=1))[:, None, None, None]
    table = input.to(dtype).permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    image = rois[:, 0].long()
    # The samples_h × samples_w grid slots of every bin, in chunks; a RoI's unused slots
    # (its grid is smaller than the largest) are masked.
    slots = samples_h * samples_w
    chunk = max(1, _CHUNK_ELEMENTS // (count * out_h * out_w * channels))
    pooled = None
    for first in range(0, slots, chunk):
        slot = torch.arange(first, min(first + chunk, slots), device=input.device)
        iy, ix = slot // samples_w, slot % samples_w
        y = origin_y[..., None] + (iy.to(dtype) + 0.5) * step_y  # (R, out_h, out_w, slots)
        x = origin_x[..., None] + (ix.to(dtype) + 0.5) * step_x
        y, x = torch.broadcast_tensors(y, x)
        used = (iy < grid_h[:, None]) & (ix < grid_w[:, None])  # (R, slots)
        values = _bilinear(table, image, y.reshape(count, -1), x.reshape(count, -1), height,
                           width)  # fmt: skip
        values = values.view(count, out_h, out_w, slot.numel(), channels)
        part = (values * used[:, None, None, :, None].to(dtype)).sum(3)
        pooled = part if pooled is None else pooled + part
    total = (grid_h * grid_w).clamp(min=1).to(dtype)[:, None, None, None]
    pooled = pooled / total
    return pooled.permute(0, 3, 1, 2).to(input.dtype).contiguous()


class DeformRoIPool(NotScriptable, nn.Module):
    """:func:`deform_roi_pool` as a layer; ``forward(input, rois, offset=None)``.
    Arguments and names follow mmcv's ``DeformRoIPool``."""

    def __init__(
        self,
        output_size: IntOrPair,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size, "output_size")
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale,
                               self.sampling_ratio, self.gamma)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")  # fmt: skip


def _fc(sizes: list[int], last_activation: nn.Module | None) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    if last_activation is not None:
        layers.append(last_activation)
    last = [m for m in layers if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its own offsets: an RoI pooling without offsets
    feeds fully connected layers (``offset_fc``: two hidden layers of ``deform_fc_channels``,
    the last layer zero-initialised) whose ``2·out_h·out_w`` outputs shift the bins.  A fresh
    layer therefore pools like aligned RoIAlign.  Names and ``state_dict`` keys follow mmcv's
    ``DeformRoIPoolPack``.

    >>> pool = DeformRoIPoolPack(output_size=3, output_channels=4, deform_fc_channels=16)
    >>> pool(torch.randn(1, 4, 8, 8), torch.tensor([[0.0, 1.0, 1.0, 6.0, 7.0]])).shape
    torch.Size([1, 4, 3, 3])
    """

    def __init__(
        self,
        output_size: IntOrPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc(
            [bins * output_channels, deform_fc_channels, deform_fc_channels, bins * 2], None
        )

    def _offset(self, pooled: Tensor) -> Tensor:
        return self.offset_fc(pooled.flatten(1)).view(-1, 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        pooled = super().forward(input, rois)
        return super().forward(input, rois, self._offset(pooled))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """:class:`DeformRoIPoolPack` with a modulation mask per bin (DCNv2): ``mask_fc`` (one
    hidden layer, zero-initialised output layer, sigmoid) scales every bin, so a fresh layer
    pools half of aligned RoIAlign.  Keys follow mmcv's ``ModulatedDeformRoIPoolPack``."""

    def __init__(
        self,
        output_size: IntOrPair,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale,
                         sampling_ratio, gamma)  # fmt: skip
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _fc([bins * output_channels, deform_fc_channels, bins], nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        pooled = DeformRoIPool.forward(self, input, rois)
        mask = self.mask_fc(pooled.flatten(1)).view(-1, 1, *self.output_size)
        return DeformRoIPool.forward(self, input, rois, self._offset(pooled)) * mask
