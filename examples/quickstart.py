"""An API example: build a DeformableConv2d, run forward and backward on the CPU, and check
it against float64.  (The main job is `deformconv demo`.)"""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F

import deformconv


def main() -> int:
    torch.manual_seed(0)
    layer = deformconv.DeformableConv2d(
        16, 32, kernel_size=3, padding=1, offset_groups=2, modulated=True
    )
    print(
        f"deformconv {deformconv.__version__}, torch {torch.__version__}, "
        f"backend {deformconv.get_backend()}"
    )
    print(layer)

    # A fresh layer has a zero offset branch: it is a plain convolution (times the 0.5 mask).
    x = torch.randn(4, 16, 24, 24, requires_grad=True)
    fresh_error = (
        (layer(x) - (0.5 * F.conv2d(x, layer.weight, padding=1) + layer.bias[:, None, None]))
        .abs()
        .max()
    )
    print(f"fresh layer vs 0.5 * conv2d + bias: max |difference| = {fresh_error:.2e}")

    # Give the offset branch some weights, as training would, so that the kernel deforms.
    with torch.no_grad():
        layer.conv_offset.weight.normal_(std=0.05)
    out = layer(x)
    out.square().mean().backward()
    offset, mask = layer.offset_and_mask(x)
    print(
        f"input {tuple(x.shape)} -> offsets {tuple(offset.shape)}, mask {tuple(mask.shape)} "
        f"-> output {tuple(out.shape)}"
    )
    print(
        f"offsets: mean |Δ| = {offset.abs().mean():.3f} px, max |Δ| = {offset.abs().max():.3f} px"
    )

    # The same layer in float64 is the reference.
    exact = copy.deepcopy(layer).double()
    x64 = x.detach().double().requires_grad_(True)
    out64 = exact(x64)
    out64.square().mean().backward()

    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    rows = [
        ("output", relative(out.detach(), out64.detach())),
        ("grad input", relative(x.grad, x64.grad)),
    ]
    for (name, param), (_, param64) in zip(
        layer.named_parameters(), exact.named_parameters(), strict=False
    ):
        rows.append((f"grad {name}", relative(param.grad, param64.grad)))
    print("agreement with float64 (relative L2 error):")
    for name, error in rows:
        print(f"  {name:<24} {error:.2e}")
    worst = max(error for _, error in rows)
    ok = worst < 1e-4 and fresh_error < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
