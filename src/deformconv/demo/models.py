"""The demo's small CNN for 28×28 digits, and its deformable version."""

from __future__ import annotations

from torch import Tensor, nn

from ..convert import convert_to_deformable

#: The convolutions that become deformable: the three stacked 3×3 layers after the first.
DEFORMABLE_LAYERS = ("conv2", "conv3", "conv4")


class DigitNet(nn.Module):
    """Four 3×3 convolutions, each followed by group normalisation and ReLU (the 2nd and 3rd
    of stride 2), global average pooling and a linear classifier.  Group, not batch,
    normalisation: it works per image, so training on several processes with
    :class:`~torch.nn.parallel.DistributedDataParallel` equals training on one."""

    def __init__(self, widths: tuple[int, int, int, int] = (32, 64, 96, 96), classes: int = 10):
        super().__init__()
        w1, w2, w3, w4 = widths
        # No bias: the normalisation after each convolution would cancel it.
        self.conv1 = nn.Conv2d(1, w1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(w1, w2, 3, stride=2, padding=1, bias=False)
        self.conv3 = nn.Conv2d(w2, w3, 3, stride=2, padding=1, bias=False)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1, bias=False)
        self.norms = nn.ModuleList(nn.GroupNorm(8, w) for w in widths)
        self.classifier = nn.Linear(w4, classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in zip(
            (self.conv1, self.conv2, self.conv3, self.conv4), self.norms, strict=True
        ):
            x = norm(conv(x)).relu()
        return self.classifier(x.mean((2, 3)))


def deformable_digit_net(model: DigitNet | None = None, **kwargs) -> nn.Module:
    """``model`` (or a fresh :class:`DigitNet`) with :data:`DEFORMABLE_LAYERS` made
    deformable (v1) by :func:`deformconv.convert_to_deformable`."""
    model = DigitNet(**kwargs) if model is None else model
    return convert_to_deformable(model, DEFORMABLE_LAYERS)
