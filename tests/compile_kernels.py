"""Compile every Triton kernel launch of the library for an NVIDIA GPU, with no GPU present.

The launchers (``deformconv.kernels.ops`` and ``deformconv.kernels.dcnv3_ops``) are called on
small CPU tensors with ``wrap_triton`` replaced by a recorder, so each launch they would make
is captured with its real arguments and constants; each is then compiled by Triton's own
compiler for the target (``sm_90`` by default: Hopper) down to a cubin (Triton ships
``ptxas``), specialized on its arguments as the JIT would specialize it.  A kernel that the
interpreter runs but the compiler rejects fails here.  Prints registers, the stack frame and
the spill instructions (where registers run out, ``ptxas`` spills them to the stack) per
launch, read from the cubin by the ``cuobjdump`` that Triton ships, and shared memory (the
cubin's static part plus what Triton allocates at launch).  The launchers are told the
shared memory a block may use on each target (:data:`PER_BLOCK_SHARED`), and a launch that
needs more, which would fail on such a GPU, fails here.

    TRITON_INTERPRET=0 python tests/compile_kernels.py [--arch 80 90] [--jobs N]
        [--shapes small|benchmark] [--sass DIR] [--override KERNEL:KEY=VALUE,...]

``--shapes benchmark`` records the launches at the benchmarks' first shapes instead of tiny
ones (the JIT specializes on sizes, so the code can differ); ``--sass DIR`` also writes each
launch's SASS, one instruction a line, so that two versions of a kernel can be compared
without a GPU (``diff -r``: identical files mean identical machine code).  Each report line
also gives the blocks a multiprocessor holds at once and what limits them (registers, shared
memory or warps); ``--override`` changes a convolution kernel's launch settings (tiles,
``num_warps``, ``maxnreg``: a cap on registers per thread) to see what they would compile to.

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
_OPTIONS = ("num_warps", "num_stages", "maxnreg")


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
            args = tuple(_stand_in(arg) for arg in args)
            self.launches.append(Launch(self.label[0], kernel, args, kwargs))

        return _Grid(launch)


def _stand_in(value):
    """A one-element tensor with ``value``'s dtype and address alignment (all the JIT
    specializes a pointer on), so that recorded launches do not keep large tensors alive."""
    if not isinstance(value, torch.Tensor):
        return value
    shift = (value.data_ptr() % 16) // value.element_size()
    return torch.empty(16, dtype=value.dtype)[shift : shift + 1]


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
#: convolution launches, (batch, height, width, groups, channels per group) of the DCNv3
#: ones and (batch, channels, size) of the 3-D convolution's (3×3×3): tiny, or the
#: benchmarks' first.
_SHAPES = {
    "small": ((2, 6, 4, 9, 8, 2, 2, (2, 3)), (2, 5, 6, 2, 32), (2, 6, (3, 5, 4))),
    "benchmark": ((8, 256, 256, 64, 64, 1, 1, (3, 3)), (64, 56, 56, 4, 32), (2, 32, (16, 28, 28))),
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


def _conv3d_launches(record: list[str], shape: tuple) -> None:
    """Forward and backward launches of ``deform_conv3d`` (with mask) for each dtype."""
    batch, channels, size = shape
    cases = [(torch.float16, "ieee"), (torch.bfloat16, "ieee"), (torch.float32, "ieee"),
             (torch.float32, "tf32")]  # fmt: skip
    for (dtype, precision), deterministic in itertools.product(cases, [False, True]):
        record[0] = f"deform_conv3d {str(dtype)[6:]} {precision} deterministic={deterministic}"
        x = torch.randn(batch, channels, *size, dtype=dtype)
        offset = torch.randn(batch, 3 * 27, *size, dtype=dtype)
        mask = torch.rand(batch, 27, *size, dtype=dtype)
        weight = torch.randn(channels, channels, 3, 3, 3, dtype=dtype)
        args = ([1, 1, 1], [1, 1, 1], [1, 1, 1])
        out = ops.triton_deform_conv2d(x, offset, mask, weight, None, *args, precision)
        ops.triton_deform_conv2d_backward(torch.ones_like(out), x, offset, mask, weight, *args,
                                          [True] * 4, precision, deterministic)  # fmt: skip


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


#: Shared memory one block may use (opt-in, bytes) per compute capability: what the
#: launchers are told the device has, and what a launch must fit.
PER_BLOCK_SHARED = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024,
                    90: 227 * 1024}  # fmt: skip


def record_launches(shapes: str = "small", arch: int = 90) -> list[Launch]:
    """The launches the launchers make at ``shapes`` on a device of compute capability
    ``arch`` (its shared memory per block)."""
    conv_shape, dcnv3_shape, conv3d_shape = _SHAPES[shapes]
    launches: list[Launch] = []
    label = [""]
    recorder = _Recorder(launches, label)
    saved = ops.wrap_triton, dcnv3_ops.wrap_triton, ops.shared_memory_per_block
    ops.wrap_triton = dcnv3_ops.wrap_triton = recorder
    ops.shared_memory_per_block = lambda device: PER_BLOCK_SHARED[arch]
    try:
        _conv_launches(label, conv_shape)
        _dcnv3_launches(label, dcnv3_shape)
        _conv3d_launches(label, conv3d_shape)
    finally:
        ops.wrap_triton, dcnv3_ops.wrap_triton, ops.shared_memory_per_block = saved
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


#: Per multiprocessor on sm_75 (T4), sm_80 (A100), sm_86 / sm_89 (RTX 30 / 40, A10, L4) and
#: sm_90 (H100): registers, shared memory for blocks (bytes), warps, blocks; and the
#: registers' allocation unit per warp.
_LIMITS = {75: (65536, 64 * 1024, 32, 16), 80: (65536, 164 * 1024, 64, 32),
           86: (65536, 100 * 1024, 48, 16), 89: (65536, 100 * 1024, 48, 24),
           90: (65536, 228 * 1024, 64, 32)}  # fmt: skip
_REGISTER_UNIT = 256


def blocks_per_processor(arch: int, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """How many blocks of a kernel one multiprocessor holds at once, and what limits it
    (the occupancy calculator's rule: registers per warp rounded up to 256, plus 1 KiB of
    shared memory the system reserves per block).

    >>> blocks_per_processor(90, 255, 24576, 4)
    (2, 'registers')
    >>> blocks_per_processor(90, 128, 24576, 4)
    (4, 'registers')
    >>> blocks_per_processor(90, 96, 122880, 4)
    (1, 'shared memory')
    """
    register_file, shared_memory, max_warps, max_blocks = _LIMITS[arch]
    per_warp = -(-registers * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    limits = {
        "registers": register_file // (per_warp * warps),
        "shared memory": shared_memory // (shared + 1024),
        "warps": max_warps // warps,
        "blocks": max_blocks,
    }
    reason = min(limits, key=limits.__getitem__)
    return limits[reason], reason


def resources(cubin: bytes) -> tuple[int, int, int] | None:
    """Registers, per-thread stack and local memory (bytes: where ``ptxas`` puts spilled
    registers) and static shared memory (bytes) of a cubin's kernel, or ``None`` where
    ``cuobjdump`` does not say."""
    report = _cuobjdump(cubin, "-res-usage")
    found = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", report))
    if not found:
        return None
    return int(found["REG"]), int(found["STACK"]) + int(found["LOCAL"]), int(found["SHARED"])


def spills(instructions: list[str]) -> tuple[int, int]:
    """How many of the instructions store registers to and load them from the stack.

    >>> spills(["STL [R1+0x30], RZ", "LDL R4, [R1+0x30]", "@P0 LDL.64 R6, [R1+0x8]",
    ...         "STS [R3], R2"])
    (1, 2)
    """
    operations = [line.split()[1] if line.startswith("@") else line.split()[0]
                  for line in instructions]  # fmt: skip
    return (sum(op.split(".")[0] == "STL" for op in operations),
            sum(op.split(".")[0] == "LDL" for op in operations))  # fmt: skip


_LAUNCHES: list[Launch] = []
#: Where ``_compile`` writes each launch's SASS (``--sass``), or None.
_SASS_DIR: list[str | None] = [None]


def _specialized(launch: Launch, target: GPUTarget) -> tuple[ASTSource, dict, str]:
    """The source and options Triton's JIT would compile for this launch on ``target``: with
    its argument specialization (16-byte aligned pointers, integers divisible by 16), which
    decides vector loads and so registers.  Uses the JIT's own binder, a Triton internal:
    where that fails, the plain signature (the same code, less specialized: fewer vector loads,
    other registers), and the report line says UNSPECIALIZED."""
    try:
        from triton import knobs
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        # The JIT's own settings, those this Triton has (3.9 has more than 3.6).
        settings = ("instrumentation_mode", "fpsan_homomorphic_casts")
        kwargs = {**launch.kwargs, "debug": False,
                  **{name: getattr(knobs.compilation, name) for name in settings
                     if hasattr(knobs.compilation, name)}}  # fmt: skip
        bound, specialization, options = binder(*launch.args, **kwargs)
        options, signature, constants, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
        return ASTSource(kernel, signature, constants, attrs), options.__dict__, ""
    except (AttributeError, ImportError, TypeError, KeyError) as error:
        signature, constants, options = _signature(launch)
        note = f" (UNSPECIALIZED: {type(error).__name__}: {error})"
        return ASTSource(launch.kernel, signature, constants), options, note


def _compile(index: int, arch: int) -> str:
    """Compile launch ``index`` of ``_LAUNCHES`` for ``sm_<arch>``: a report line."""
    launch = _LAUNCHES[index]
    name = f"{launch.kernel.fn.__name__} [{launch.label}]"
    target = GPUTarget("cuda", arch, 32)
    try:
        source, options, note = _specialized(launch, target)
        compiled = triton.compile(source, target=target, options=options)
    except Exception as error:  # report every failure, not only the first
        return f"FAILED sm_{arch} {name}: {type(error).__name__}: {str(error)[:2000]}"
    cubin = compiled.asm["cubin"]
    instructions = sass(cubin)
    if _SASS_DIR[0] is not None:
        path = os.path.join(_SASS_DIR[0], f"sm_{arch}-{index:03d}-{launch.kernel.fn.__name__}.sass")
        with open(path, "w") as handle:
            handle.write(f"// {name}\n" + "\n".join(instructions) + "\n")
    used = resources(cubin)
    count = f"{len(instructions)} instructions{note}"
    if used is None:
        return f"ok sm_{arch} {name}: resource usage not available, {count}"
    registers, stack, static = used
    stores, loads = spills(instructions)
    shared = static + compiled.metadata.shared  # Triton's own is dynamic, given at launch
    if shared > PER_BLOCK_SHARED[arch]:  # the launch would fail: out of resources
        return (f"FAILED sm_{arch} {name}: needs {shared} B of shared memory a block, "
                f"sm_{arch} gives at most {PER_BLOCK_SHARED[arch]}")  # fmt: skip
    warps = compiled.metadata.num_warps
    blocks, limit = blocks_per_processor(arch, registers, shared, warps)
    return (f"ok sm_{arch} {name}: {registers} registers, {stack} B stack, {stores} spill "
            f"stores, {loads} spill loads, {shared} B shared, {warps} warps, {blocks} blocks "
            f"per multiprocessor ({limit}), {count}")  # fmt: skip


def _override(text: str) -> tuple[str, dict[str, int]]:
    """``"backward_data:maxnreg=128,num_warps=8"`` → ``("backward_data", {...})``."""
    kernel, _, settings = text.partition(":")
    if kernel not in ops.CONFIG_OVERRIDES or not settings:
        raise argparse.ArgumentTypeError(
            f"expected KERNEL:KEY=VALUE,... with KERNEL one of {sorted(ops.CONFIG_OVERRIDES)}, "
            f"got {text!r}"
        )
    pairs = [item.partition("=") for item in settings.split(",")]
    if not all(key and value.lstrip("-").isdigit() for key, _, value in pairs):
        raise argparse.ArgumentTypeError(f"expected KEY=INTEGER pairs, got {settings!r}")
    return kernel, {key: int(value) for key, _, value in pairs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90],
                        help="compute capabilities among 75 80 86 89 90 (default: 90)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compilations in parallel")  # fmt: skip
    parser.add_argument("--shapes", choices=sorted(_SHAPES), default="small",
                        help="tiny launches, or the benchmarks' first shapes")  # fmt: skip
    parser.add_argument("--sass", metavar="DIR",
                        help="write each launch's SASS to DIR, one instruction a line")  # fmt: skip
    parser.add_argument("--override", metavar="KERNEL:KEY=VALUE,...", action="append",
                        default=[], type=_override,
                        help="launch settings of a convolution kernel (forward, backward_data, "
                             "backward_weight), e.g. backward_data:maxnreg=128")  # fmt: skip
    args = parser.parse_args(argv)
    for kernel, settings in args.override:
        ops.CONFIG_OVERRIDES[kernel].update(settings)
    if args.sass:
        os.makedirs(args.sass, exist_ok=True)
        _SASS_DIR[0] = args.sass
    if not isinstance(ops.deform_conv2d_forward_kernel, triton.runtime.JITFunction):
        print("the kernels are interpreted (TRITON_INTERPRET=1): run with TRITON_INTERPRET=0")
        return 2
    work = []  # (launch index, arch): the distinct launches of each arch
    for arch in args.arch:
        seen = set()
        for launch in record_launches(args.shapes, arch):
            signature, constants, options = _signature(launch)
            key = (launch.kernel.fn.__name__, tuple(sorted(signature.items())),
                   tuple(sorted(constants.items())), tuple(sorted(options.items())))  # fmt: skip
            if key not in seen:
                seen.add(key)
                work.append((len(_LAUNCHES), arch))
                _LAUNCHES.append(launch)
    # Forked workers inherit the recorded launches; each compiles its share.
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        lines = pool.starmap(_compile, work)
    for line in lines:
        print(line)
    failures = sum(line.startswith("FAILED") for line in lines)
    arches = ", ".join(f"sm_{arch}" for arch in args.arch)
    print(f"{len(work)} compilations (launches for {arches}), {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
