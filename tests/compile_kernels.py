"""Compile every Triton kernel launch of the library for an NVIDIA GPU, with no GPU present.

The launchers (``deformconv.kernels.ops`` and ``deformconv.kernels.dcnv3_ops``) are called on
small CPU tensors with ``wrap_triton`` replaced by a recorder, so each launch they would make
is captured with its real arguments and constants; each is then compiled by Triton's own
compiler for the target (``sm_90`` by default: Hopper) down to a cubin (Triton ships
``ptxas``), specialized on its arguments as the JIT would specialize it.  A kernel that the
interpreter runs but the compiler rejects fails here.  Prints registers, local memory
(spills) and shared memory per launch, read from the cubin by the ``cuobjdump`` that Triton
ships.

    TRITON_INTERPRET=0 python tests/compile_kernels.py [--arch 80 90] [--jobs N]
        [--shapes small|benchmark] [--sass DIR]

``--shapes benchmark`` records the launches at the benchmarks' first shapes instead of tiny
ones (the JIT specializes on sizes, so the code can differ); ``--sass DIR`` also writes each
launch's SASS, one instruction a line, so that two versions of a kernel can be compared
without a GPU (``diff -r``: identical files mean identical machine code).

Run by ``tests/test_kernel_compilation.py`` in a fresh process (the tests' own process runs
the kernels in the interpreter, whose ``triton.jit`` functions cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from deformconv.kernels import dcnv3_ops, ops

_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
          torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32"}  # fmt: skip
_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    label: str
    kernel: object
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for ``wrap_triton``: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, launches: list[Launch], label: list[str]):
        self.launches, self.label = launches, label

    def __call__(self, kernel):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.label[0], kernel, args, kwargs))

        return _Grid(launch)


class _Grid:
    def __init__(self, launch):
        self.launch = launch

    def __getitem__(self, grid):
        return self.launch


def _signature(launch: Launch) -> tuple[dict, dict, dict]:
    names = launch.kernel.arg_names
    signature, constants = {}, {}
    for name, value in zip(names, launch.args, strict=False):
        if isinstance(value, torch.Tensor):
            signature[name] = _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i64" if abs(value) >= 2**31 else "i32"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: cannot type {value!r}")
    options = {k: v for k, v in launch.kwargs.items() if k in _OPTIONS}
    for name, value in launch.kwargs.items():
        if name not in _OPTIONS:
            signature[name] = "constexpr"
            constants[name] = value
    missing = [n for n in names if n not in signature]
    if missing:
        raise TypeError(f"{launch.label}: no value for {missing}")
    return signature, constants, options


#: (batch, channels, out channels, height, width, groups, offset groups, kernel) of the
#: convolution launches and (batch, height, width, groups, channels per group) of the DCNv3
#: ones: tiny, or the benchmarks' first.
_SHAPES = {
    "small": ((2, 6, 4, 9, 8, 2, 2, (2, 3)), (2, 5, 6, 2, 32)),
    "benchmark": ((8, 256, 256, 64, 64, 1, 1, (3, 3)), (64, 56, 56, 4, 32)),
}


def _conv_launches(record: list[str], shape: tuple) -> None:
    """Forward and backward launches of ``deform_conv2d`` for each dtype and setting."""
    batch, channels, out_channels, height, width, groups, offset_groups, (kh, kw) = shape
    taps = kh * kw
    cases = itertools.product(
        [torch.float16, torch.bfloat16, torch.float32], [True, False], [False, True]
    )
    for dtype, modulated, deterministic in cases:
        precisions = ["ieee", "tf32"] if dtype == torch.float32 else ["ieee"]
        for precision in precisions:
            record[0] = (f"deform_conv2d {str(dtype)[6:]} {precision} "
                         f"mask={modulated} deterministic={deterministic}")  # fmt: skip
            x = torch.randn(batch, channels, height, width, dtype=dtype)
            out_size = (height + 3 - kh, width + 3 - kw)
            offset = torch.randn(batch, 2 * offset_groups * taps, *out_size, dtype=dtype)
            mask = torch.rand(batch, offset_groups * taps, *out_size, dtype=dtype)
            mask = mask if modulated else None
            weight = torch.randn(out_channels, channels // groups, kh, kw, dtype=dtype)
            bias = torch.randn(out_channels, dtype=dtype)
            args = ([1, 1], [1, 1], [1, 1])
            out = ops.triton_deform_conv2d(x, offset, mask, weight, bias, *args, precision)
            ops.triton_deform_conv2d_backward(torch.ones_like(out), x, offset, mask, weight,
                                              *args, [True] * 4, precision,
                                              deterministic)  # fmt: skip


def _dcnv3_launches(record: list[str], shape: tuple) -> None:
    """Forward and backward launches of the DCNv3 operator for each dtype and setting."""
    batch, height, width, groups, depth = shape
    for dtype, deterministic, remove in itertools.product(
        [torch.float16, torch.bfloat16, torch.float32], [False, True], [False, True]
    ):
        record[0] = f"dcnv3 {str(dtype)[6:]} deterministic={deterministic} remove={remove}"
        points = 9 - int(remove)
        x = torch.randn(batch, height, width, groups * depth, dtype=dtype)
        fused = torch.randn(batch, height, width, groups, 3 * points, dtype=dtype)
        offset, mask = fused[..., : 2 * points], fused[..., 2 * points :]
        args = ([3, 3], [1, 1], [1, 1], [1, 1], groups, 1.0, remove)
        out = dcnv3_ops.triton_dcnv3(x, offset, mask, *args)
        dcnv3_ops.triton_dcnv3_backward(torch.ones_like(out), x, offset, mask, *args, True,
                                        deterministic)  # fmt: skip


def record_launches(shapes: str = "small") -> list[Launch]:
    conv_shape, dcnv3_shape = _SHAPES[shapes]
    launches: list[Launch] = []
    label = [""]
    recorder = _Recorder(launches, label)
    saved = ops.wrap_triton, dcnv3_ops.wrap_triton
    ops.wrap_triton = dcnv3_ops.wrap_triton = recorder
    try:
        _conv_launches(label, conv_shape)
        _dcnv3_launches(label, dcnv3_shape)
    finally:
        ops.wrap_triton, dcnv3_ops.wrap_triton = saved
    return launches


def _cuobjdump(cubin: bytes, flag: str) -> str:
    """What the ``cuobjdump`` that Triton ships prints for ``cubin`` with ``flag``."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run([tool, flag, handle.name], capture_output=True,
                              text=True).stdout  # fmt: skip


def sass(cubin: bytes) -> list[str]:
    """The cubin's instructions, one a line, without addresses, encodings or comments."""
    lines = re.findall(r"^\s*/\*[0-9a-f]{4,}\*/\s+([^;]*);", _cuobjdump(cubin, "-sass"), re.M)
    return [" ".join(line.split()) for line in lines]


def resources(cubin: bytes) -> str:
    """Registers, local memory (spills) and shared memory of a cubin's kernel, in bytes."""
    report = _cuobjdump(cubin, "-res-usage")
    found = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", report))
    if not found:
        return "resource usage not available"
    return f"{found['REG']} registers, {found['LOCAL']} B local, {found['SHARED']} B shared"


_LAUNCHES: list[Launch] = []
#: Where ``_compile`` writes each launch's SASS (``--sass``), or None.
_SASS_DIR: list[str | None] = [None]


def _specialized(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict]:
    """The source and options Triton's JIT would compile for this launch on ``target``: with
    its argument specialization (16-byte aligned pointers, integers divisible by 16), which
    decides vector loads and so registers.  Uses the JIT's own binder, a Triton internal:
    where that is missing, the plain signature (compiles the same code, less specialized)."""
    try:
        from triton import knobs
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        kwargs = {**launch.kwargs, "debug": False,
                  "instrumentation_mode": knobs.compilation.instrumentation_mode,
                  "fpsan_homomorphic_casts": knobs.compilation.fpsan_homomorphic_casts}  # fmt: skip
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constants, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
        return ASTSource(kernel, signature, constants, attrs), options.__dict__
    except (AttributeError, ImportError, TypeError, KeyError):
        signature, constants, options = _signature(launch)
        return ASTSource(launch.kernel, signature, constants), options


def _compile(index: int, arch: int) -> str:
    """Compile launch ``index`` of ``_LAUNCHES`` for ``sm_<arch>``: a report line."""
    launch = _LAUNCHES[index]
    name = f"{launch.kernel.fn.__name__} [{launch.label}]"
    target = GPUTarget("cuda", arch, 32)
    try:
        source, options = _specialized(launch, target)
        compiled = triton.compile(source, target=target, options=options)
    except Exception as error:  # report every failure, not only the first
        return f"FAILED sm_{arch} {name}: {type(error).__name__}: {str(error)[:2000]}"
    cubin = compiled.asm["cubin"]
    instructions = sass(cubin)
    if _SASS_DIR[0] is not None:
        path = os.path.join(_SASS_DIR[0], f"sm_{arch}-{index:03d}-{launch.kernel.fn.__name__}.sass")
        with open(path, "w") as handle:
            handle.write(f"// {name}\n" + "\n".join(instructions) + "\n")
    return f"ok sm_{arch} {name}: {resources(cubin)}, {len(instructions)} instructions"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities, e.g. 80 90 (default: 90)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compilations in parallel")  # fmt: skip
    parser.add_argument("--shapes", choices=sorted(_SHAPES), default="small",
                        help="tiny launches, or the benchmarks' first shapes")  # fmt: skip
    parser.add_argument("--sass", metavar="DIR",
                        help="write each launch's SASS to DIR, one instruction a line")  # fmt: skip
    args = parser.parse_args(argv)
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
        _SASS_DIR[0] = args.sass
    if not isinstance(ops.deform_conv2d_forward_kernel, triton.runtime.JITFunction):
        print("the kernels are interpreted (TRITON_INTERPRET=1): run with TRITON_INTERPRET=0")
        return 2
    seen = set()
    for launch in record_launches(args.shapes):
        signature, constants, options = _signature(launch)
        key = (launch.kernel.fn.__name__, tuple(sorted(signature.items())),
               tuple(sorted(constants.items())), tuple(sorted(options.items())))  # fmt: skip
        if key not in seen:
            seen.add(key)
            _LAUNCHES.append(launch)
    work = [(index, arch) for arch in args.arch for index in range(len(_LAUNCHES))]
    # Forked workers inherit the recorded launches; each compiles its share.
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        lines = pool.starmap(_compile, work)
    for line in lines:
        print(line)
    failures = sum(line.startswith("FAILED") for line in lines)
    arches = ", ".join(f"sm_{arch}" for arch in args.arch)
    print(f"{len(work)} compilations ({len(_LAUNCHES)} launches for {arches}), {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
