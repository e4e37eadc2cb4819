"""ONNX benchmark: layers exported with ``torch.onnx.export`` and run by onnxruntime on the
CPU, against the same layers in PyTorch.

``DeformableConv2d`` exports as the standard ``DeformConv`` node; ``DeformableConv3d``,
``DCNv3NCHW`` and ``DCNv4NCHW``, which ONNX has no operator for, as the standard operators of
:mod:`deformconv.composite`.  Median of repeats, each after an untimed call; the largest
difference from PyTorch's output is printed beside.  Needs ``onnx``, ``onnxscript`` and
``onnxruntime`` (``pip install 'deformconv[onnx]'``).

    python benchmarks/bench_onnx.py [--quick] [--repeats N] [--dir DIR]
    deformconv bench --onnx [-- same arguments]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import deformconv


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[], torch.nn.Module]
    shape: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.name} {'×'.join(map(str, self.shape))}"


STANDARD = [
    Case("DeformableConv2d 3×3 C=64 (DeformConv node)",
         lambda: deformconv.DeformableConv2d(64, 64, 3, padding=1, modulated=True),
         (1, 64, 56, 56)),
    Case("DeformableConv3d 3×3×3 C=32",
         lambda: deformconv.DeformableConv3d(32, 32, 3, padding=1, modulated=True),
         (1, 32, 8, 28, 28)),
    Case("DCNv3NCHW C=128 G=4", lambda: deformconv.DCNv3NCHW(128, group=4), (1, 128, 56, 56)),
    Case("DCNv4NCHW C=128 G=4", lambda: deformconv.DCNv4NCHW(128, group=4), (1, 128, 56, 56)),
]  # fmt: skip
QUICK = [
    Case("DeformableConv3d 3×3×3 C=8",
         lambda: deformconv.DeformableConv3d(8, 8, 3, padding=1, modulated=True), (1, 8, 4, 8, 8)),
    Case("DCNv4NCHW C=32 G=2", lambda: deformconv.DCNv4NCHW(32, group=2), (1, 32, 12, 12)),
]  # fmt: skip


def _model(case: Case) -> torch.nn.Module:
    """The case's layer with small random offset predictors, so that the samples move."""
    torch.manual_seed(0)
    model = case.make().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "offset" in name or "mask" in name:
                parameter.normal_(0, 0.02)
    return model


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        run()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(case: Case, folder: Path, repeats: int) -> dict:
    import onnxruntime

    model = _model(case)
    x = torch.randn(case.shape, generator=torch.Generator().manual_seed(1))
    path = folder / "model.onnx"
    # The torch.export-based exporter where it makes DeformConv nodes (torch.onnx.ops).
    dynamo = hasattr(torch.onnx, "ops")
    torch.onnx.export(model, (x,), str(path), opset_version=19, dynamo=dynamo)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        expected = model(x)
        torch_ms = _median_ms(lambda: model(x), repeats)
    (actual,) = session.run(None, feed)
    difference = (torch.from_numpy(actual) - expected).abs().max().item()
    return {"case": case.label, "onnxruntime_ms": _median_ms(lambda: session.run(None, feed),
                                                             repeats),
            "torch_ms": torch_ms, "max_difference": difference}  # fmt: skip


def markdown(rows: list[dict]) -> str:
    lines = ["| layer, input | onnxruntime ms | PyTorch ms | largest difference |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['case']} | {r['onnxruntime_ms']:.1f} | {r['torch_ms']:.1f} "
              f"| {r['max_difference']:.1e} |" for r in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deformconv bench --onnx",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="two small cases")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per case")
    parser.add_argument("--dir", default=None, help="keep the exported files here")
    args = parser.parse_args(argv)
    cases = QUICK if args.quick else STANDARD
    repeats = args.repeats or (3 if args.quick else 9)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for case in cases:
            folder = Path(args.dir or scratch) / f"case{len(rows)}"
            folder.mkdir(parents=True, exist_ok=True)
            rows.append(measure(case, folder, repeats))
            print(f"  {rows[-1]}", flush=True)
    print()
    print(markdown(rows))
    return 0
