"""3-D benchmark: ``deform_conv3d`` against ``nn.Conv3d`` on video-like clips.

Times forward and forward+backward side by side in one process, interleaved, median of
repeats, on the CPU and, when there is one, on the GPU (float32, and bfloat16 there; there
also ``deform_conv3d`` on the torch backend, beside the default Triton kernels).  Prints a
Markdown table and optionally writes CSV.

    python benchmarks/bench_3d.py [--quick] [--csv out.csv] [--device cpu|cuda]
    deformconv bench --3d [-- same arguments]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import deformconv
from deformconv.bench import timed


@dataclass(frozen=True)
class Clip:
    batch: int
    channels: int
    frames: int
    size: int
    kernel: tuple[int, int, int] = (3, 3, 3)

    @property
    def padding(self) -> tuple[int, ...]:
        return tuple(k // 2 for k in self.kernel)

    @property
    def label(self) -> str:
        kernel = "×".join(map(str, self.kernel))
        return f"N={self.batch} C={self.channels} T={self.frames} {self.size}² k{kernel}"


STANDARD = [Clip(1, 64, 8, 56), Clip(1, 64, 8, 56, kernel=(1, 3, 3)), Clip(2, 32, 16, 28)]
QUICK = [Clip(1, 16, 4, 28)]


def make_inputs(clip: Clip, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator().manual_seed(0)
    taps = clip.kernel[0] * clip.kernel[1] * clip.kernel[2]
    spatial = (clip.frames, clip.size, clip.size)

    def rand(*shape, scale=1.0):
        tensor = torch.randn(*shape, generator=generator) * scale
        return tensor.to(device, dtype).requires_grad_()

    return {
        "input": rand(clip.batch, clip.channels, *spatial),
        "offset": rand(clip.batch, 3 * taps, *spatial, scale=2.0),
        "mask": rand(clip.batch, taps, *spatial, scale=0.5),
        "weight": rand(clip.channels, clip.channels, *clip.kernel, scale=0.05),
        "bias": rand(clip.channels),
    }


def _runner(name: str, clip: Clip, t: dict, backward: bool):
    def deform():
        return deformconv.deform_conv3d(t["input"], t["offset"], t["weight"], t["bias"],
                                        padding=clip.padding, mask=t["mask"])  # fmt: skip

    def conv():
        return F.conv3d(t["input"], t["weight"], t["bias"], padding=clip.padding)

    call = conv if name == "nn.Conv3d" else deform

    def backend():
        return deformconv.use_backend("torch") if name == TORCH_BACKEND else nullcontext()

    def run():
        with backend():
            if backward:
                call().sum().backward()
            else:
                with torch.no_grad():
                    call()

    return run


#: On the GPU, deform_conv3d on the torch backend too (the default there is the Triton one).
TORCH_BACKEND = "torch backend"


def time_clips(clips, device: torch.device, dtypes, repeats: int) -> list[dict]:
    rows = []
    names = ["deform_conv3d", "nn.Conv3d"] + ([TORCH_BACKEND] if device.type == "cuda" else [])
    for clip in clips:
        for dtype in dtypes:
            tensors = make_inputs(clip, device, dtype)
            for mode, backward in (("fwd", False), ("fwd+bwd", True)):
                runs = {name: _runner(name, clip, tensors, backward) for name in names}
                for run in runs.values():
                    run()  # warm-up
                times: dict[str, list[float]] = {name: [] for name in names}
                for _ in range(repeats):  # interleaved
                    for name, run in runs.items():
                        times[name].append(timed(run, device))
                medians = {name: statistics.median(times[name]) * 1e3 for name in names}
                ratio = medians["deform_conv3d"] / medians["nn.Conv3d"]
                dtype_name = str(dtype).removeprefix("torch.")
                row = {"shape": clip.label, "device": device.type, "dtype": dtype_name,
                       "mode": mode, **medians, "ratio": ratio}  # fmt: skip
                rows.append(row)
                print(f"  {clip.label:<30} {device.type} {dtype_name:<8} {mode:<8} "
                      f"deform {medians['deform_conv3d']:9.2f} ms  conv3d "
                      f"{medians['nn.Conv3d']:8.2f} ms  ({ratio:.1f}x)", flush=True)  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | device | dtype | mode | deform_conv3d ms | nn.Conv3d ms | ratio "
        "| torch backend ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        torch_backend = f"{r[TORCH_BACKEND]:.2f}" if TORCH_BACKEND in r else "–"
        times = (f"{r['deform_conv3d']:.2f} | {r['nn.Conv3d']:.2f} | {r['ratio']:.1f}x "
                 f"| {torch_backend}")  # fmt: skip
        lines.append(f"| {r['shape']} | {r['device']} | {r['dtype']} | {r['mode']} | {times} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small clip, few repeats")
    where = "where to run (default: the CPU, and the GPU when present)"
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help=where)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per entry")
    parser.add_argument("--csv", help="also write the rows to this CSV file")
    args = parser.parse_args(argv)
    clips = QUICK if args.quick else STANDARD
    repeats = args.repeats or (3 if args.quick else 5)
    plans = []
    if args.device in ("cpu", "all"):
        plans.append((torch.device("cpu"), [torch.float32]))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        plans.append((torch.device("cuda"), [torch.float32, torch.bfloat16]))
    print(f"deformconv {deformconv.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)  # fmt: skip
    rows = []
    for device, dtypes in plans:
        rows += time_clips(clips, device, dtypes, repeats)
    print(markdown(rows))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            fields = list(dict.fromkeys(key for row in rows for key in row))
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
    return 0
