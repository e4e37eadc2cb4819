"""The ``deformconv`` command: the demo experiment, the benchmarks, and what this machine has.

    deformconv demo [--quick] [--out DIR]   the scaled-digits experiment (a few minutes on a CPU)
    deformconv bench [--cpu | --gpu | --3d | --dcnv3]   the benchmarks, standard shapes
    deformconv info                         versions, backends and devices

``python -m deformconv`` is the same command.  The demo runs unchanged under
``torchrun --nproc_per_node=N`` (gloo on CPUs, NCCL on GPUs).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import torch

from . import __version__, available_backends, backends


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deformconv",
        description="Deformable convolution for PyTorch: demo, benchmarks and machine info.",
    )
    parser.add_argument("--version", action="version", version=f"deformconv {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train regular and deformable CNNs on rescaled digits and compare them",
        description="The scaled-digits experiment: (a) a regular CNN trained on digits of one "
        "size, tested on those and on digits rescaled 0.5-1.6x; (b) the same CNN converted "
        "to a deformable one, only its offset predictors fine-tuned on rescaled digits; (c) "
        "regular and deformable CNNs trained from scratch on rescaled digits.  Writes "
        "results.json, results.md and pictures of the learned sampling locations to --out.",
    )
    demo.add_argument("--quick", action="store_true", help="smaller sets, about a minute on a CPU")
    demo.add_argument(
        "--out",
        type=Path,
        default=Path("deformconv-demo"),
        help="where results and pictures go (default: ./deformconv-demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench = commands.add_parser(
        "bench",
        help="time deformconv against torchvision and plain convolution here",
        description="Runs the CPU benchmark (or the GPU one with --gpu, the default when a "
        "GPU is present) at its standard shapes and prints a Markdown table.  Arguments after "
        "the options go to the benchmark (see `deformconv bench --cpu -- --help`).",
    )
    which = bench.add_mutually_exclusive_group()
    which.add_argument("--cpu", action="store_true", help="the CPU benchmark")
    which.add_argument("--gpu", action="store_true", help="the GPU benchmark")
    which.add_argument("--3d", dest="video", action="store_true",
                       help="deform_conv3d against nn.Conv3d on video-like clips")  # fmt: skip
    which.add_argument("--dcnv3", action="store_true",
                       help="DCNv3/DCNv4 against grid_sample and the memory floor")  # fmt: skip
    which.add_argument("--onnx", action="store_true",
                       help="exported layers in onnxruntime against PyTorch")  # fmt: skip
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark")

    commands.add_parser("info", help="versions, backends and devices",
                        description="Prints versions, backends and devices.")  # fmt: skip
    return parser


def info() -> str:
    """What ``deformconv info`` prints."""
    from .backends import triton_backend

    lines = [
        f"deformconv {__version__}",
        f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    lines.append(f"CPU: {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    cuda = torch.cuda.is_available()
    for index in range(torch.cuda.device_count() if cuda else 0):
        lines.append(f"GPU {index}: {torch.cuda.get_device_name(index)}")
    if not cuda:
        lines.append("GPU: none visible to torch")
    reason = triton_backend.unavailable_reason()
    lines.append(f"backends: {', '.join(available_backends())}; setting: {backends.get_backend()}")
    workloads = (("2-D", 2, "deform_conv"), ("3-D", 3, "deform_conv"), ("DCNv3/v4", 2, "dcnv3"))
    for label, device in (("CPU", "cpu"), ("CUDA", "cuda")):
        chosen = {
            what: backends.name_of(backends.select(torch.device(device), dims, op))
            for what, dims, op in workloads
        }
        runs = ", ".join(f"{what} {name}" for what, name in chosen.items())
        lines.append(f"  {label} tensors run on: {runs}")
    if reason:
        lines[-1] += f" (triton unavailable: {reason})"
    if triton_backend.tf32_allowed():
        products = "on TF32 tensor cores (PyTorch's settings allow TF32)"
    else:
        products = "exact, without tensor cores (PyTorch's settings allow no TF32)"
    lines.append(f"float32 products in the Triton kernels: {products}")
    lines.append(f"torch backend on the CPU: {_cpu_sampling()}")
    lines.append(f"torch.func transforms and forward-mode tangents: {_transforms_path()}")
    exporters = "dynamo=True or dynamo=False"
    if not hasattr(torch.onnx, "ops"):
        exporters = "dynamo=False (the dynamo exporter needs torch.onnx.ops, PyTorch 2.8+)"
    lines.append(f"ONNX export: torch.onnx.export with {exporters}")
    return "\n".join(lines)


def _transforms_path() -> str:
    from . import _transforms

    if _transforms.FUNCTIONS_SUPPORTED:
        return "on the ops (stacked ones on deformconv.composite)"
    return "on deformconv.composite (the ops need torch.library.register_vmap, PyTorch 2.5+)"


def _cpu_sampling() -> str:
    """How the torch backend samples on the CPU (:mod:`deformconv.backends.native`, else
    :mod:`deformconv.backends.compiled`)."""
    from .backends import compiled, native

    if native.runs_here():
        return "C loops, compiled on first use (the plan, the gathers and the gradients)"
    if not compiled.native_enabled():
        loops = f"tensor operations ({compiled.ENV_VAR}=0 or set_cpu_compile(False))"
    else:
        loops = f"tensor operations (building the C loops failed: {native.failure()})"
    if compiled.compile_failure() is not None:
        plan = f"uncompiled (compiling failed: {compiled.compile_failure()})"
    elif not compiled.compile_enabled():
        plan = f"uncompiled ({compiled.ENV_VAR}=0 or native, or set_cpu_compile(False))"
    else:
        plan = (
            f"compiled with torch.compile on first use for calls of {compiled.MIN_SAMPLES} "
            f"samples or more (the gathers with it for rows of at most "
            f"{compiled.NARROW_ROWS} channels)"
        )
    return f"{loops}; the plan {plan}"


def _demo(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import PIL  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as error:
        print(f"deformconv demo needs {error.name}: pip install 'deformconv[demo]'",
              file=sys.stderr)  # fmt: skip
        return 2
    from .demo import experiment

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(args.device)
    if distributed:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    settings = experiment.QUICK if args.quick else experiment.Settings()
    settings = type(settings)(**{**settings.__dict__, "seed": args.seed})
    try:
        experiment.run(settings, args.out, device, progress=not args.no_progress)
        if distributed:  # every process done before the group goes
            dist.barrier()
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _bench(args: argparse.Namespace) -> int:
    gpu = args.gpu or (not args.cpu and torch.cuda.is_available())
    extra = [a for a in args.args if a != "--"]
    if args.video:
        from .bench import video as module
    elif args.dcnv3:
        from .bench import dcnv3 as module
    elif args.onnx:
        from .bench import onnx_runtime as module
    elif gpu:
        from .bench import gpu as module
    else:
        from .bench import cpu as module
    return module.main(extra) or 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "bench":
        return _bench(args)
    print(info())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
