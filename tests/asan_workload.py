"""The torch backend's C loops on odd inputs, for ``tests/test_native.py``, which runs this
script with the loops compiled under AddressSanitizer: any read or write past a tensor aborts
it.  Every configuration runs forward and backward in float32 and float64, on one and on two
threads, whole and cut into chunks.

    python tests/asan_workload.py [SOURCE.c]   # SOURCE.c: another source of the loops
"""

import math
import sys
from pathlib import Path

import torch

import deformconv
from cases import LOPSIDED, Config, make_inputs, output_and_grads
from deformconv.backends import native


def _convolutions(dtype: torch.dtype) -> int:
    count = 0
    odd = Config(
        batch=1,
        channels=3,
        height=1,
        width=1,
        out_channels=3,
        kernel=(2, 3),
        stride=(1, 1),
        padding=(1, 1),
        dilation=(2, 1),
        weight_groups=1,
        offset_groups=3,
    )  # a one-pixel image
    for config in [*LOPSIDED.values(), odd]:
        for offsets in ("random", "integer", "far"):
            tensors = make_inputs(config, dtype, "random" if offsets == "far" else offsets)
            if offsets == "far":
                with torch.no_grad():  # NaN, infinite and far positions, some just outside
                    flat = tensors["offset"].view(-1)
                    flat[0::7], flat[1::7], flat[2::7] = math.nan, math.inf, -1e30
                    flat[3::7] = 1e3
                    flat[4::7] = -1.0 - 1e-6
            output_and_grads(deformconv.deform_conv2d, tensors, config)
            count += 1
    return count


def _volumes(dtype: torch.dtype) -> int:
    x = torch.randn(2, 4, 3, 5, 4, dtype=dtype, requires_grad=True)
    weight = torch.randn(4, 2, 2, 3, 1, dtype=dtype, requires_grad=True)
    offset = (torch.randn(2, 3 * 2 * 6, 3, 2, 8, dtype=dtype) * 3).requires_grad_()
    mask = torch.rand(2, 2 * 6, 3, 2, 8, dtype=dtype, requires_grad=True)
    out = deformconv.deform_conv3d(x, offset, weight, None, (1, 2, 1), (1, 0, 2), (2, 1, 1),
                                   mask)  # fmt: skip
    out.square().sum().backward()
    return 1


def _dcnv3(dtype: torch.dtype) -> int:
    x = torch.randn(2, 5, 4, 3 * 5, dtype=dtype, requires_grad=True)
    offset = (torch.randn(2, 3, 4, 3 * 2 * 6, dtype=dtype) * 2).requires_grad_()
    mask = torch.rand(2, 3, 4, 3 * 6, dtype=dtype, requires_grad=True)
    out = deformconv.dcnv3(x, offset, mask, kernel_size=(2, 3), stride=(2, 1), padding=(1, 2),
                           dilation=(1, 2), group=3, group_channels=5,
                           offset_scale=1.5)  # fmt: skip
    out.square().sum().backward()
    return 1


def main() -> None:
    if len(sys.argv) > 1:
        native.SOURCE = Path(sys.argv[1])
    assert native.runs_here(), native.failure()
    count = 0
    with deformconv.use_backend("torch"):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for budget in (None, 512):  # 512 bytes: one output position a chunk
                deformconv.set_column_budget(budget)
                for dtype in (torch.float32, torch.float64):
                    count += _convolutions(dtype) + _volumes(dtype) + _dcnv3(dtype)
    print(f"{count} calls, forward and backward, on the C loops")


if __name__ == "__main__":
    main()
