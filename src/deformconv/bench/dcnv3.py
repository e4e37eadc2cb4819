"""DCNv3 / DCNv4 benchmark: deformconv's backends against a pure-PyTorch ``grid_sample``
implementation, and against the memory-traffic floor.

At the shapes of DCNv4's own scripts (56×56 with 4 groups of 32 channels, then the 28, 14 and
7 stages with twice the groups each time, and one 200×320 image), times the forward and
forward+backward of the operator (DCNv4's fused layout, 3×3, no softmax) for each
implementation and dtype, interleaved, median of repeats.  The floor is the bytes the
forward must move (input + output + offsets and mask) divided by the copy bandwidth measured
in the same run; the table gives each forward as a multiple of it.  Every step is bounded by
``--budget`` seconds in all; progress is printed with timestamps.

    python benchmarks/bench_dcnv3_v4.py [--quick] [--batch N] [--csv out.csv]
    deformconv bench --dcnv3 [-- same arguments]

On the CPU the batch defaults to 2 (``--batch`` changes it); on a GPU to the scripts' 64.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import deformconv
from deformconv.backends.pytorch_dcnv3 import tap_coords
from deformconv.bench import timed
from deformconv.bench.gpu import START, bench, log


@dataclass(frozen=True)
class Stage:
    height: int
    width: int
    group: int
    depth: int = 32
    batch: int | None = None  # None: the run's batch

    def label(self, batch: int) -> str:
        n = self.batch or batch
        return f"N={n} {self.height}×{self.width} G={self.group} D={self.depth}"


STANDARD = [Stage(56, 56, 4), Stage(28, 28, 8), Stage(14, 14, 16), Stage(7, 7, 32),
            Stage(200, 320, 4, batch=1)]  # fmt: skip
QUICK = [Stage(14, 14, 4)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def grid_sample_dcnv4(input, offset_mask, group, points=9, kernel=(3, 3)):
    """The operator in plain PyTorch: one ``F.grid_sample`` over all points (3×3, stride 1,
    padding 1, dilation 1, offset scale 1), then the masked sum."""
    batch, height, width, channels = input.shape
    depth = channels // group
    fused = offset_mask[..., : 3 * group * points].unflatten(-1, (group, 3 * points))
    shift = fused[..., : 2 * points].unflatten(-1, (points, 2))  # (N, H, W, G, P, (w, h))
    mask = fused[..., 2 * points :]  # (N, H, W, G, P)
    taps = tap_coords(kernel, False, input.device).to(input.dtype) - 1  # (P, (row, column))
    rows = torch.arange(height, device=input.device, dtype=input.dtype)
    cols = torch.arange(width, device=input.device, dtype=input.dtype)
    y = rows[:, None, None, None] + taps[:, 0] + shift[..., 1]
    x = cols[None, :, None, None] + taps[:, 1] + shift[..., 0]
    grid = torch.stack(((x + 0.5) * (2 / width) - 1, (y + 0.5) * (2 / height) - 1), -1)
    grid = grid.permute(0, 3, 1, 2, 4, 5).reshape(batch * group, height * width, points, 2)
    value = input.permute(0, 3, 1, 2).reshape(batch * group, depth, height, width)
    sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)  # fmt: skip
    weights = mask.permute(0, 3, 1, 2, 4).reshape(batch * group, 1, height * width, points)
    out = (sampled * weights).sum(-1).view(batch, group, depth, height, width)
    return out.permute(0, 3, 4, 1, 2).reshape(batch, height, width, channels)


def make_inputs(stage: Stage, batch: int, device, dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    n = stage.batch or batch
    channels = stage.group * stage.depth
    fused = deformconv.dcnv4_offset_mask_channels(stage.group, 3)
    shape = (n, stage.height, stage.width)
    offset_mask = torch.randn(*shape, fused, generator=generator) * 1.5
    return {
        "input": torch.randn(*shape, channels, generator=generator).to(device, dtype),
        "offset_mask": offset_mask.to(device, dtype),
    }


def _runner(name: str, stage: Stage, tensors: dict, backward: bool):
    def call():
        if name == "grid_sample":
            return grid_sample_dcnv4(tensors["input"], tensors["offset_mask"], stage.group)
        with deformconv.use_backend(name.removeprefix("deformconv ")):
            return deformconv.dcnv4(tensors["input"], tensors["offset_mask"], 3, padding=1,
                                    group=stage.group)  # fmt: skip

    def run():
        if backward:
            for tensor in tensors.values():
                tensor.grad = None
            call().sum().backward()
        else:
            with torch.no_grad():
                call()

    return run


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    size = (1 << 28) if device.type == "cuda" else (1 << 26)
    source = torch.empty(size // 4, device=device)
    target = torch.empty_like(source)
    times = [timed(lambda: target.copy_(source), device) for _ in range(10)]
    return 2 * size / statistics.median(times[2:])


def floor_ms(stage: Stage, batch: int, itemsize: int, bandwidth: float) -> float:
    n = stage.batch or batch
    pixels = n * stage.height * stage.width
    channels = stage.group * stage.depth
    fused = deformconv.dcnv4_offset_mask_channels(stage.group, 3)
    nbytes = pixels * (2 * channels + fused) * itemsize
    return nbytes / bandwidth * 1e3


def _times(runs: dict, device, repeats: int) -> dict:
    """Milliseconds per call of each run: on a GPU the median of ``triton.testing.do_bench``
    (CUDA events over a queue of calls), on the CPU the median of interleaved repeats."""
    if device.type == "cuda":
        return {name: bench(run) for name, run in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(run, device))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


#: Kernel settings the ``--tune`` sweep times at the first stage (fp16).
TUNING = {
    "forward": [
        {"BLOCK_Q": 64, "BLOCK_D": 32, "num_warps": 4},
        {"BLOCK_Q": 32, "BLOCK_D": 32, "num_warps": 2},
        {"BLOCK_Q": 128, "BLOCK_D": 32, "num_warps": 8},
    ],
    "backward": [
        {"BLOCK_Q": 32, "BLOCK_D": 32, "num_warps": 4},
        {"BLOCK_Q": 16, "BLOCK_D": 32, "num_warps": 4},
    ],
}


def tune(stage: Stage, batch: int, device, bandwidth: float) -> list[dict]:
    """The Triton kernels alone on DCNv4's fused tensor (read in place), one row per setting,
    then the forward on separate contiguous offsets and mask (DCNv3's layout)."""
    from deformconv.kernels import dcnv3_ops

    tensors = make_inputs(stage, batch, device, torch.float16)
    used = 3 * stage.group * 9
    fused = tensors["offset_mask"][..., :used].unflatten(-1, (stage.group, 27))
    args = ([3, 3], [1, 1], [1, 1], [1, 1], stage.group, 1.0, False)
    grad = torch.randn_like(tensors["input"])
    floor = floor_ms(stage, batch, 2, bandwidth)
    x, offset, mask = tensors["input"], fused[..., :18], fused[..., 18:]
    calls = {
        "forward": lambda: dcnv3_ops.triton_dcnv3(x, offset, mask, *args),
        "backward": lambda: dcnv3_ops.triton_dcnv3_backward(grad, x, offset, mask, *args, True,
                                                            False),
    }  # fmt: skip
    rows = []

    def record(row: dict) -> None:
        rows.append(row)
        log(f"tune {row}")

    expected = calls["forward"]().float()
    for kernel, configs in TUNING.items():
        for config in configs:
            dcnv3_ops.CONFIG_OVERRIDES[kernel] = config
            try:
                ms = bench(calls[kernel])
                row = {"kernel": kernel, **config, "ms": ms, "x_floor": ms / floor}
                if kernel == "forward":  # each variant's output against the default's
                    row["max_diff"] = (calls[kernel]().float() - expected).abs().max().item()
                record(row)
            except Exception as error:  # a setting the compiler rejects is a result too
                record({"kernel": kernel, **config, "error": f"{type(error).__name__}: {error}"})
            finally:
                dcnv3_ops.CONFIG_OVERRIDES[kernel] = {}
    offset, mask = offset.contiguous(), mask.contiguous()
    ms = bench(calls["forward"])
    record({"kernel": "forward, contiguous offsets and mask", "ms": ms, "x_floor": ms / floor})
    return rows


def measure(stages, batch, device, dtypes, names, repeats, budget) -> list[dict]:
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth on {device.type}: {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for stage in stages:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            tensors = make_inputs(stage, batch, device, dtype)
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                if time.perf_counter() - START > budget:
                    log("budget spent; stopping")
                    return rows
                if backward:
                    tensors = {k: v.requires_grad_() for k, v in tensors.items()}
                runs = {name: _runner(name, stage, tensors, backward) for name in names}
                for run in runs.values():
                    run()  # warm-up (and compilation)
                times = _times(runs, device, repeats)
                floor = floor_ms(stage, batch, tensors["input"].element_size(), bandwidth)
                for name in names:
                    ms = times[name]
                    row = {"shape": stage.label(batch), "device": device.type, "dtype": dtype_name,
                           "mode": mode, "impl": name, "ms": ms, "floor_ms": floor,
                           "x_floor": ms / floor}  # fmt: skip
                    rows.append(row)
                    log(f"{row['shape']:<28} {dtype_name} {mode:<8} {name:<18} {ms:9.3f} ms "
                        f"({ms / floor:6.1f}x floor {floor:.3f} ms)")  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | device | dtype | mode | implementation | ms | × floor |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['shape']} | {r['device']} | {r['dtype']} | {r['mode']} | "
                     f"{r['impl']} | {r['ms']:.3f} | {r['x_floor']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small stage, few repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="default: the GPU when there is one")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="images per call")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per entry")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds in all")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="GPU: first time the kernels' tile settings at the first stage",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    batch = args.batch or (64 if gpu else 2)
    stages = QUICK if args.quick else STANDARD
    dtypes = ["fp16", "bf16", "fp32"] if gpu else ["fp32"]
    names = ["deformconv triton", "deformconv torch", "grid_sample"] if gpu else [
        "deformconv torch", "grid_sample"]  # fmt: skip
    repeats = args.repeats or (3 if args.quick else (20 if gpu else 5))
    log(f"deformconv {deformconv.__version__}, torch {torch.__version__}, {device.type}, "
        f"batch {batch}, {torch.get_num_threads()} CPU threads")  # fmt: skip
    if args.tune and gpu:
        tune(stages[0], batch, device, copy_bandwidth(device))
    rows = measure(stages, batch, device, dtypes, names, repeats, args.budget)
    print(markdown(rows))
    if args.csv and rows:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0
