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


def _conv_launches(record: list[str]) -> None:
    """Forward and backward launches of ``deform_conv2d`` for each dtype and setting."""
    cases = itertools.product(
        [torch.float16, torch.bfloat16, torch.float32], [True, False], [False, True]
    )
    for dtype, modulated, deterministic in cases:
        precisions = ["ieee", "tf32x3"] if dtype == torch.float32 else ["ieee"]
        for precision in precisions:
            record[0] = (f"deform_conv2d {str(dtype)[6:]} {precision} "
                         f"mask={modulated} deterministic={deterministic}")  # fmt: skip
            x = torch.randn(2, 6, 9, 8, dtype=dtype)
            offset = torch.randn(2, 2 * 2 * 6, 10, 8, dtype=dtype)
            mask = torch.rand(2, 2 * 6, 10, 8, dtype=dtype) if modulated else None
            weight = torch.randn(4, 3, 2, 3, dtype=dtype)
            bias = torch.randn(4, dtype=dtype)
            args = ([1, 1], [1, 1], [1, 1])
            out = ops.triton_deform_conv2d(x, offset, mask, weight, bias, *args, precision)
            ops.triton_deform_conv2d_backward(torch.ones_like(out), x, offset, mask, weight,
                                              *args, [True] * 4, precision,
                                              deterministic)  # fmt: skip


def _dcnv3_launches(record: list[str]) -> None:
    """Forward and backward launches of the DCNv3 operator for each dtype and setting."""
    for dtype, deterministic, remove in itertools.product(
        [torch.float16, torch.bfloat16, torch.float32], [False, True], [False, True]
    ):
        record[0] = f"dcnv3 {str(dtype)[6:]} deterministic={deterministic} remove={remove}"
        points = 9 - int(remove)
        x = torch.randn(2, 5, 6, 2 * 32, dtype=dtype)
        fused = torch.randn(2, 5, 6, 2, 3 * points, dtype=dtype)
        offset, mask = fused[..., : 2 * points], fused[..., 2 * points :]
        args = ([3, 3], [1, 1], [1, 1], [1, 1], 2, 1.0, remove)
        out = dcnv3_ops.triton_dcnv3(x, offset, mask, *args)
        dcnv3_ops.triton_dcnv3_backward(torch.ones_like(out), x, offset, mask, *args, True,
                                        deterministic)  # fmt: skip


def record_launches() -> list[Launch]:
    launches: list[Launch] = []
    label = [""]
    recorder = _Recorder(launches, label)
    saved = ops.wrap_triton, dcnv3_ops.wrap_triton
    ops.wrap_triton = dcnv3_ops.wrap_triton = recorder
    try:
        _conv_launches(label)
        _dcnv3_launches(label)
    finally:
        ops.wrap_triton, dcnv3_ops.wrap_triton = saved
    return launches


def resources(cubin: bytes) -> str:
    """Registers, local memory (spills) and shared memory of a cubin's kernel, in bytes."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")  # fmt: skip
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([tool, "-res-usage", handle.name], capture_output=True,
                                text=True).stdout  # fmt: skip
    found = dict(re.findall(r"\b(REG|LOCAL|SHARED):(\d+)", report))
    if not found:
        return "resource usage not available"
    return f"{found['REG']} registers, {found['LOCAL']} B local, {found['SHARED']} B shared"


_LAUNCHES: list[Launch] = []


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
    return f"ok sm_{arch} {name}: {resources(compiled.asm['cubin'])}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities, e.g. 80 90 (default: 90)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compilations in parallel")  # fmt: skip
    args = parser.parse_args(argv)
    if not isinstance(ops.deform_conv2d_forward_kernel, triton.runtime.JITFunction):
        print("the kernels are interpreted (TRITON_INTERPRET=1): run with TRITON_INTERPRET=0")
        return 2
    seen = set()
    for launch in record_launches():
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
