"""Digits rendered on the fly with Pillow's built-in scalable font: no download, any size.

Every image is one of ten glyphs drawn with a random stroke width and font size, then moved by
one batched resampling: a random rotation, shift, optional scale and a smooth elastic jitter.
The same ``seed`` gives the same images on every machine.

>>> images, labels = render_digits(8, seed=0)
>>> images.shape, labels.shape, images.dtype
(torch.Size([8, 1, 28, 28]), torch.Size([8]), torch.float32)
>>> bool(torch.equal(images, render_digits(8, seed=0)[0]))
True
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: Size of the images; glyphs are drawn ``_OVERSAMPLE`` times larger and averaged down.
SIZE = 28
_OVERSAMPLE = 3
_FONT_SIZES = (48, 54, 60)
_STROKES = (0, 1, 3, 4)
#: The scale range of the "scaled" variant.
SCALE_RANGE = (0.5, 1.6)


@functools.cache
def _glyphs() -> Tensor:
    """``(10, len(_FONT_SIZES) * len(_STROKES), S, S)`` glyph images in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = SIZE * _OVERSAMPLE
    glyphs = torch.empty(10, len(_FONT_SIZES) * len(_STROKES), canvas, canvas)
    for digit in range(10):
        for i, (size, stroke) in enumerate(
            (size, stroke) for size in _FONT_SIZES for stroke in _STROKES
        ):
            font = ImageFont.load_default(size=size)
            image = Image.new("L", (canvas, canvas), 0)
            ImageDraw.Draw(image).text(
                (canvas / 2, canvas / 2), str(digit), font=font, fill=255, anchor="mm",
                stroke_width=stroke, stroke_fill=255,
            )  # fmt: skip
            pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
            glyphs[digit, i] = pixels.view(canvas, canvas).float() / 255
    return glyphs


def render_digits(
    count: int,
    *,
    seed: int,
    scale_range: tuple[float, float] | None = None,
    batch: int = 2048,
) -> tuple[Tensor, Tensor]:
    """``count`` digit images ``(count, 1, 28, 28)`` in [0, 1] and their labels.

    Args:
        count: how many images.
        seed: the random seed; the same seed gives the same images.
        scale_range: draw each digit's scale log-uniformly from this range (the "scaled"
            variant, e.g. :data:`SCALE_RANGE`); ``None`` keeps the glyphs' own size.
        batch: images resampled at once (bounds memory).
    """
    generator = torch.Generator().manual_seed(seed)
    glyphs = _glyphs()
    labels = torch.randint(0, 10, (count,), generator=generator)
    styles = torch.randint(0, glyphs.shape[1], (count,), generator=generator)
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(12)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2.5 / SIZE * 2)
    if scale_range is None:
        scale = torch.ones(count)
    else:
        low, high = (math.log(v) for v in scale_range)
        scale = torch.exp(low + (high - low) * torch.rand(count, generator=generator))
    jitter = torch.randn(count, 2, 4, 4, generator=generator) * 0.03
    images = torch.empty(count, 1, SIZE, SIZE)
    for start in range(0, count, batch):
        part = slice(start, min(count, start + batch))
        images[part] = _warp(
            glyphs[labels[part], styles[part]][:, None],
            angle[part], shift[part], scale[part], jitter[part],
        )  # fmt: skip
    return images, labels


def _warp(glyphs: Tensor, angle: Tensor, shift: Tensor, scale: Tensor, jitter: Tensor) -> Tensor:
    """Rotate, shift, scale and elastically jitter glyphs, then average down to ``SIZE``."""
    n, canvas = glyphs.shape[0], glyphs.shape[-1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # The grid maps output coordinates to glyph coordinates: the inverse of the motion.
    theta = torch.stack(
        (torch.stack((cos, -sin, -shift[:, 0]), 1), torch.stack((sin, cos, -shift[:, 1]), 1)), 1
    )
    grid = F.affine_grid(theta, [n, 1, canvas, canvas], align_corners=False)
    elastic = F.interpolate(jitter, size=(canvas, canvas), mode="bicubic", align_corners=False)
    grid = grid + elastic.permute(0, 2, 3, 1)
    warped = F.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return F.avg_pool2d(warped, _OVERSAMPLE).clamp_(0, 1)
