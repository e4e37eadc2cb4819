"""Pictures of what deformable layers learned: sampling locations and offset magnitudes.

:func:`sampling_locations` follows one output unit of the last deformable layer back through
the stacked deformable layers of a model: its ``K`` sampling points, each of theirs, and so
on, ``K**L`` points for ``L`` layers (729 for three 3×3 layers), in the image's pixel
coordinates — the figure of Dai et al. (2017).  The layers are assumed to be applied one
after another, each to the (pointwise-transformed) output of the previous one, as in a plain
CNN; offset group 0 is followed.  The plotting functions need matplotlib.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .convert import deformable_layers
from .deformable_conv2d import DeformableConv2d

__all__ = ["offset_magnitudes", "plot_offset_magnitudes", "plot_sampling_locations",
           "sampling_locations"]  # fmt: skip


@torch.no_grad()
def _record(model: nn.Module, image: Tensor) -> list[tuple[DeformableConv2d, Tensor, tuple]]:
    """Run ``model`` on one image; each deformable layer's offsets and input size."""
    seen: list[tuple[DeformableConv2d, Tensor, tuple]] = []
    hooks = [
        layer.register_forward_hook(
            lambda module, args, output: seen.append(
                (module, module.offset_and_mask(args[0])[0][0], tuple(args[0].shape[-2:]))
            )
        )
        for _, layer in deformable_layers(model)
        if isinstance(layer, DeformableConv2d)
    ]
    try:
        was_training = model.training
        model.eval()
        model(image[None] if image.dim() == 3 else image[:1])
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise ValueError("the model has no DeformableConv2d layer")
    return seen


def _sample_points(layer: DeformableConv2d, offset: Tensor, points: Tensor) -> Tensor:
    """The ``K`` sampling positions (in the layer's input) of each output position in
    ``points`` ``(P, 2)`` (y, x; fractional allowed): ``(P·K, 2)``."""
    kh, kw = layer.kernel_size
    out_h, out_w = offset.shape[-2:]
    taps = kh * kw
    # Offsets of group 0 at the (fractional) points, bilinear between output positions.
    grid = torch.stack(
        (points[:, 1] / max(out_w - 1, 1) * 2 - 1, points[:, 0] / max(out_h - 1, 1) * 2 - 1), -1
    )
    deltas = F.grid_sample(
        offset[None, : 2 * taps], grid[None, None], align_corners=True, padding_mode="border"
    )[0, :, 0].T.reshape(-1, taps, 2)
    ty = torch.arange(kh, dtype=points.dtype).repeat_interleave(kw) * layer.dilation[0]
    tx = torch.arange(kw, dtype=points.dtype).repeat(kh) * layer.dilation[1]
    y = points[:, :1] * layer.stride[0] - layer.padding[0] + ty + deltas[..., 0]
    x = points[:, 1:] * layer.stride[1] - layer.padding[1] + tx + deltas[..., 1]
    return torch.stack((y, x), -1).reshape(-1, 2)


def sampling_locations(
    model: nn.Module, image: Tensor, unit: tuple[float, float] | None = None
) -> list[Tensor]:
    """Sampling locations of one output unit through the stacked deformable layers.

    Args:
        model: a model with :class:`DeformableConv2d` layers applied one after another.
        image: one input ``(C, H, W)`` (or a batch, of which the first is used).
        unit: the output position ``(y, x)`` of the last deformable layer to follow; its
            centre by default.

    Returns:
        For each deformable layer from the last to the first, the ``(K**depth, 2)`` sampling
        positions ``(y, x)`` in image pixels: ``K`` points, then ``K²``, and so on.

    >>> import deformconv
    >>> net = torch.nn.Sequential(*(deformconv.DeformableConv2d(1, 1, 3, padding=1)
    ...                             for _ in range(3)))
    >>> [p.shape[0] for p in sampling_locations(net, torch.rand(1, 9, 9), unit=(4, 4))]
    [9, 81, 729]
    """
    seen = _record(model, image)
    image_size = image.shape[-2:]
    last_offset = seen[-1][1]
    if unit is None:
        unit = ((last_offset.shape[-2] - 1) / 2, (last_offset.shape[-1] - 1) / 2)
    points = torch.tensor([unit], dtype=last_offset.dtype)
    levels = []
    for index in range(len(seen) - 1, -1, -1):
        layer, offset, _ = seen[index]
        if index < len(seen) - 1:  # from the next layer's input to this layer's output
            points = points * _ratio(offset.shape[-2:], seen[index + 1][2])
        points = _sample_points(layer, offset, points)
        levels.append(_to_image(points, index, seen, image_size))
    return levels


def _ratio(numerator, denominator) -> Tensor:
    return torch.tensor([numerator[0] / denominator[0], numerator[1] / denominator[1]])


def _to_image(points: Tensor, index: int, seen: list, image_size) -> Tensor:
    """Positions in the input of deformable layer ``index`` → image pixels, through the
    kernel centres of the layers before it (their undeformed receptive-field centres)."""
    for j in range(index - 1, -1, -1):
        layer, offset, _ = seen[j]
        points = points * _ratio(offset.shape[-2:], seen[j + 1][2])
        centre = torch.tensor([(k - 1) / 2 * d for k, d in zip(layer.kernel_size,
                               layer.dilation, strict=True)])  # fmt: skip
        points = points * torch.tensor(layer.stride) - torch.tensor(layer.padding) + centre
    return points * _ratio(image_size, seen[0][2])


@torch.no_grad()
def offset_magnitudes(model: nn.Module, image: Tensor) -> list[tuple[str, Tensor]]:
    """For each deformable layer, the mean length of its offsets (in its input's pixels) at
    every output position: ``(name, (Ho, Wo))``."""
    names = [
        name for name, layer in deformable_layers(model) if isinstance(layer, DeformableConv2d)
    ]
    return [
        (name, offset.reshape(-1, 2, *offset.shape[-2:]).norm(dim=1).mean(0))
        for name, (_, offset, _) in zip(names, _record(model, image), strict=True)
    ]


def plot_sampling_locations(model: nn.Module, images, titles=None, unit=None, path=None):
    """One panel per image: the image with the ``K`` sampling points of the last deformable
    layer (green), the ``K²`` of the layer before (orange) and the ``K³`` of the one before
    that (red; deeper levels magenta).  Returns the figure; saves it to ``path`` when given."""
    import matplotlib.pyplot as plt

    images = list(images)
    fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 4), squeeze=False)
    colours = ["yellow", "orange", "red", "magenta"]
    for i, (ax, image) in enumerate(zip(axes[0], images, strict=True)):
        levels = sampling_locations(model, image, unit)
        ax.imshow(image[0].detach().cpu().numpy(), cmap="gray")
        for depth in range(len(levels) - 1, -1, -1):
            y, x = levels[depth].T.numpy()
            size = 4 if depth == len(levels) - 1 else 14
            ax.scatter(x, y, s=size, c=colours[min(depth, 3)] if depth else "lime",
                       alpha=0.6, linewidths=0)  # fmt: skip
        ax.set_xlim(-0.5, image.shape[-1] - 0.5)
        ax.set_ylim(image.shape[-2] - 0.5, -0.5)
        ax.set_axis_off()
        if titles:
            ax.set_title(titles[i])
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig


def plot_offset_magnitudes(model: nn.Module, image: Tensor, path=None):
    """A heatmap per deformable layer of :func:`offset_magnitudes`; returns the figure."""
    import matplotlib.pyplot as plt

    maps = offset_magnitudes(model, image)
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(3.2 * (len(maps) + 1), 3), squeeze=False)
    axes[0][0].imshow(image[0].detach().cpu().numpy(), cmap="gray")
    axes[0][0].set_title("input")
    for ax, (name, magnitude) in zip(axes[0][1:], maps, strict=True):
        shown = ax.imshow(magnitude.cpu().numpy(), cmap="viridis")
        ax.set_title(f"{name}: |offset| (px)")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    for ax in axes[0]:
        ax.set_axis_off()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
