"""CPU benchmark: deformconv against torchvision (when importable) and nn.Conv2d.

Times forward and forward+backward of each implementation side by side in one process
(with ``--penalty`` also a forward+backward with a gradient penalty, a double backward;
with ``--transforms`` also ``torch.func.grad`` and per-sample gradients, ``vmap(grad)``),
interleaved, median of repeats, each timed call right after an untimed call of the same
implementation (``--cold``: without); measures the extra peak memory of one forward+backward
(and of each torch.func mode) per implementation in a separate process each.  Prints a
Markdown table and writes CSV.

torchvision does not import beside every torch build; to include it, run this script from an
environment with a matching pair, e.g. ``pip install torch==2.14.1 torchvision==0.29.1`` in a
separate virtual environment plus ``pip install -e .`` of this repository.

    deformconv bench --cpu                            # standard shapes
    deformconv bench --cpu --quick --csv out.csv      # two shapes, fewer repeats
    python benchmarks/bench_cpu.py [same arguments]   # the same from a source tree
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import deformconv


@dataclass(frozen=True)
class Shape:
    batch: int
    channels: int
    out_channels: int
    size: int
    kernel: int = 3
    stride: int = 1
    offset_groups: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def label(self) -> str:
        text = f"N={self.batch} C={self.channels}→{self.out_channels} {self.size}² k{self.kernel}"
        if self.stride != 1:
            text += f" s{self.stride}"
        if self.offset_groups != 1:
            text += f" G={self.offset_groups}"
        return text


STANDARD = [
    Shape(2, 64, 64, 56),
    Shape(8, 64, 64, 32),
    Shape(1, 256, 256, 14),
    Shape(8, 128, 128, 28, stride=2),
    Shape(2, 32, 32, 64, kernel=5),
    Shape(2, 256, 256, 28, kernel=1),
    Shape(2, 64, 64, 56, offset_groups=4),
]
QUICK = STANDARD[:2]


def implementations() -> dict:
    impls = {"deformconv": deformconv.deform_conv2d}
    try:
        import torchvision.ops

        impls["torchvision"] = torchvision.ops.deform_conv2d
    except Exception:  # torchvision missing or built for another torch
        pass
    return impls


def make_inputs(shape: Shape, dtype=torch.float32, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    out_size = (shape.size + 2 * shape.padding - shape.kernel) // shape.stride + 1
    taps = shape.kernel * shape.kernel
    g = shape.offset_groups

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(dtype).requires_grad_(True)

    return {
        "input": randn(shape.batch, shape.channels, shape.size, shape.size),
        "offset": randn(shape.batch, 2 * g * taps, out_size, out_size, scale=2.0),
        "mask": torch.rand(shape.batch, g * taps, out_size, out_size, generator=generator)
        .to(dtype)
        .requires_grad_(True),
        "weight": randn(shape.out_channels, shape.channels, shape.kernel, shape.kernel, scale=0.05),
        "bias": randn(shape.out_channels),
    }


#: Timed modes: a forward; forward+backward; forward+backward of the output plus the squared
#: norm of its input gradient (a gradient penalty, which differentiates the backward again);
#: the gradients of every tensor by ``torch.func.grad``; the same per sample of the batch by
#: ``vmap(grad)``; a Hessian-vector product in input and weight by ``jvp(grad)`` (forward
#: over reverse; the offsets, fixed, keep it on the kernels).  torchvision's op has no double
#: backward and no torch.func support.
MODES = ("fwd", "fwd+bwd", "fwd+bwd+penalty", "torch.func.grad", "vmap(grad)", "jvp(grad)")
PENALTY, TRANSFORMS = MODES[2:3], MODES[3:]


def runner(name: str, shape: Shape, tensors: dict, mode: str):
    impls = implementations()

    def deform(t=tensors):
        return impls[name](t["input"], t["offset"], t["weight"], t["bias"], stride=shape.stride,
                           padding=shape.padding, mask=t["mask"])  # fmt: skip

    def conv(t=tensors):
        return F.conv2d(t["input"], t["weight"], t["bias"], stride=shape.stride,
                        padding=shape.padding)  # fmt: skip

    call = conv if name == "nn.Conv2d" else deform
    if mode == "fwd":

        def run():
            with torch.no_grad():
                call()
    elif mode == "fwd+bwd":

        def run():
            call().sum().backward()
    elif mode == "fwd+bwd+penalty":

        def run():
            out = call()
            (grad,) = torch.autograd.grad(out.sum(), tensors["input"], create_graph=True)
            (out.sum() + grad.square().sum()).backward()
    else:
        keys = list(tensors)
        values = [tensors[key].detach() for key in keys]

        def loss(*values):
            return call(dict(zip(keys, values, strict=True))).sum()

        gradients = torch.func.grad(loss, argnums=tuple(range(len(keys))))
        if mode == "vmap(grad)":  # a batch of one per sample; weight and bias shared
            in_dims = tuple(None if key in ("weight", "bias") else 0 for key in keys)
            gradients = torch.func.vmap(gradients, in_dims=in_dims)
            values = [v if d is None else v.unsqueeze(1) for v, d in zip(values, in_dims,
                                                                          strict=True)]  # fmt: skip

        def run():
            return gradients(*values)

        if mode == "jvp(grad)":
            varied = [keys.index("input"), keys.index("weight")]
            generator = torch.Generator().manual_seed(1)
            vectors = tuple(torch.randn(values[i].shape, generator=generator) for i in varied)

            def gradient(x, weight):
                given = list(values)
                given[varied[0]], given[varied[1]] = x, weight
                return gradients(*given)

            def run():
                return torch.func.jvp(gradient, tuple(values[i] for i in varied), vectors)[1]

    return run


def time_shapes(shapes: list[Shape], repeats: int, cold: bool = False,
                penalty: bool = False, transforms: bool = False) -> list[dict]:  # fmt: skip
    """Median times in rounds over the implementations (interleaved, so that drifts of the
    machine hit every implementation alike).  Each timed call follows an untimed call of the
    same implementation, unless ``cold``: then it follows the previous implementation's
    calls, and pays for the state they leave (a single-threaded torchvision backward leaves
    one core idle for tens of milliseconds, after which the next few milliseconds of any
    work run up to 30 % slower on the machine of RESULTS.md).  ``penalty`` adds the gradient
    penalty mode, ``transforms`` the torch.func modes, both without torchvision."""
    rows = []
    names = [*implementations(), "nn.Conv2d"]
    for shape in shapes:
        tensors = make_inputs(shape)
        for mode in [*MODES[:2], *(PENALTY if penalty else ()),
                     *(TRANSFORMS if transforms else ())]:  # fmt: skip
            timed = [n for n in names if mode in MODES[:2] or n != "torchvision"]
            runs = {name: runner(name, shape, tensors, mode) for name in timed}
            for run in runs.values():
                run()  # warm-up
            times: dict[str, list[float]] = {name: [] for name in timed}
            for _ in range(repeats):
                for name, run in runs.items():
                    if not cold:
                        run()
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            for name in timed:
                median = statistics.median(times[name]) * 1e3
                rows.append({"shape": shape.label, "mode": mode, "impl": name, "ms": median})
                print(f"  {shape.label:<32} {mode:<8} {name:<12} {median:9.2f} ms", flush=True)
    return rows


def peak_memory_mib(name: str, shape: Shape, mode: str = "fwd+bwd") -> float:
    """Extra peak resident memory of one call of ``mode`` (a forward+backward by default),
    measured in a fresh process."""
    code = (
        "import json; import deformconv.bench.cpu as b; print(json.dumps("
        f"b._measure_in_process({name!r}, b.Shape(**{asdict(shape)!r}), {mode!r})))"
    )
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(deformconv.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _measure_in_process(name: str, shape: Shape, mode: str = "fwd+bwd") -> float:
    tensors = make_inputs(shape)
    run = runner(name, shape, tensors, mode)
    run()  # the first call maps libraries and thread pools, which are not the op's memory
    for tensor in tensors.values():
        tensor.grad = None
    # Writing 5 to clear_refs resets the peak-RSS mark (VmHWM) to the current RSS (Linux).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) / 1024


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from ..backends import compiled, native

    if native.runs_here():
        sampling = "in C loops compiled at run time"
    elif compiled.compile_enabled():
        sampling = f"as tensor operations, compiled from {compiled.MIN_SAMPLES} samples a call"
    else:
        sampling = "as tensor operations"
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"CPU sampling {sampling}"
    )


def markdown(rows: list[dict], memory: dict) -> str:
    names = list(dict.fromkeys(row["impl"] for row in rows))
    lines = [
        "| shape | mode | " + " | ".join(names) + " | deformconv speed-up |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    keys = list(dict.fromkeys((row["shape"], row["mode"]) for row in rows))
    for shape, mode in keys:
        ms = {r["impl"]: r["ms"] for r in rows if (r["shape"], r["mode"]) == (shape, mode)}
        other = ms.get("torchvision")
        speedup = f"{other / ms['deformconv']:.1f}× vs torchvision" if other else "—"
        cells = " | ".join(f"{ms[name]:.1f} ms" if name in ms else "—" for name in names)
        lines.append(f"| {shape} | {mode} | {cells} | {speedup} |")
    if memory:  # {implementation: {(shape, mode): MiB}}
        lines += ["", "| shape | " + " | ".join(memory) + " |", "|---|" + "---|" * len(memory)]
        for shape, mode in next(iter(memory.values())):
            cells = " | ".join(f"{memory[name][shape, mode]:.0f} MiB"
                               if (shape, mode) in memory[name] else "—"
                               for name in memory)  # fmt: skip
            lines.append(f"| {shape} (extra peak RSS, {mode}) | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="deformconv bench --cpu", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="two shapes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement")
    parser.add_argument("--csv", default=None, help="write the timings to this CSV file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--penalty", action="store_true",
                        help="also time a gradient penalty (double backward)")  # fmt: skip
    parser.add_argument("--transforms", action="store_true",
                        help="also time torch.func.grad, vmap(grad), jvp(grad)")  # fmt: skip
    parser.add_argument("--cold", action="store_true",
                        help="no untimed call right before each timed one")  # fmt: skip
    args = parser.parse_args(argv)
    shapes = QUICK if args.quick else STANDARD
    repeats = args.repeats or (3 if args.quick else 7)
    protocol = "cold" if args.cold else "each timed call right after an untimed one"
    print(f"# {machine()}, {time.strftime('%Y-%m-%d')}, {protocol}", flush=True)
    rows = time_shapes(shapes, repeats, cold=args.cold, penalty=args.penalty,
                       transforms=args.transforms)  # fmt: skip
    memory: dict[str, dict[tuple[str, str], float]] = {}
    if not args.no_memory:
        memory_shape = Shape(4, 128, 128, 48)
        for name in [*implementations(), "nn.Conv2d"]:
            modes = ["fwd+bwd", *(TRANSFORMS if args.transforms and name != "torchvision" else ())]
            memory[name] = {(memory_shape.label, mode): peak_memory_mib(name, memory_shape, mode)
                            for mode in modes}  # fmt: skip
    print()
    print(markdown(rows, memory))
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["shape", "mode", "impl", "ms"])
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
