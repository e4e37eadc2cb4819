"""The torch backend's sampling on the CPU as C loops compiled at run time.

The loops of ``kernels/corners.c`` (plain C, no PyTorch headers) do in one pass each what
the tensor operations of :mod:`~deformconv.backends.plan` and
:mod:`~deformconv.backends.gather` do in many: the forward plans every sample from its offset
and mask inside the gather that sums its weighted corners into the column buffer
(:func:`sample_sums`); the backward plans the samples in one pass (:func:`sample_plan`, the
same plan bit for bit) and, in another (:func:`corner_grads`), forms every corner's dot
product with the sample's column gradient, the mask and position gradients, and the input
gradient.  Threads split the input gradient by table rows, so that each sum is formed in the
same order whatever the number of threads (bit-identical results, no atomics); they are
PyTorch's own OpenMP threads where the compiler has OpenMP.

The source is compiled on first use by the system's C compiler (``$CC``, else ``cc``) into a
shared library kept in ``$DEFORMCONV_CACHE`` (default ``~/.cache/deformconv``), named by a hash
of the source, the compiler and the machine, so later processes load it at once; it is
called through :mod:`ctypes`.  Where there is no compiler or anything else fails, the backend
warns once and uses the tensor operations (same results up to rounding).
``DEFORMCONV_COMPILE=0`` or ``deformconv.set_cpu_compile(False)`` turns it off with the rest of
the compiled CPU sampling; ``DEFORMCONV_COMPILE=native`` keeps only these loops.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import compiled
from .plan import Grid, corner_deltas
from .scratch import scratch

SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "corners.c"
CACHE_VAR = "DEFORMCONV_CACHE"
#: A thread of its own for at least this many multiply-adds; fewer run on the caller's.
WORK_PER_THREAD = 2**16

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None
_SUFFIXES = {torch.float32: "f32", torch.float64: "f64", torch.int32: "i32", torch.int64: "i64"}


def failure() -> str | None:
    """Why the C loops could not be built or loaded in this process, or ``None``."""
    return _failure


def available(table: Tensor) -> bool:
    """Whether the C loops run for ``table``: on the CPU, in float32 or float64, where
    :func:`runs_here`."""
    return (table.device.type == "cpu" and table.dtype in (torch.float32, torch.float64)
            and runs_here())  # fmt: skip


def runs_here() -> bool:
    """Whether the C loops run in this process: the compiled CPU sampling is on and the
    library builds (built on the first call)."""
    return compiled.native_enabled() and _load() is not None


def _cache_dir() -> Path:
    configured = os.environ.get(CACHE_VAR)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deformconv"


def _compiler() -> list[str]:
    configured = os.environ.get("CC") or sysconfig.get_config_var("CC") or ""
    command = configured.split()
    if command and shutil.which(command[0]):
        return command
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")


def _build(directory: Path) -> Path:
    """The library for this source, compiler and machine, compiled into ``directory`` unless
    it is there already."""
    source = SOURCE.read_bytes()
    compiler = _compiler()
    flags = ["-O3", "-fPIC", "-shared", "-std=c11"]
    machine = f"{platform.machine()} {platform.processor()} {_cpu_flags()}"
    key = hashlib.sha256(b"\0".join([source, " ".join(compiler + flags).encode(),
                                     machine.encode()])).hexdigest()[:20]  # fmt: skip
    library = directory / f"corners-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        target = Path(work) / library.name
        errors = ""
        # -march=native: this machine's vector instructions; -fopenmp: PyTorch's threads (on
        # Linux PyTorch brings libgomp.so.1, which the library then shares).  Each where the
        # compiler takes it.
        for extra in (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], []):
            result = subprocess.run([*compiler, *flags, *extra, "-o", str(target), str(SOURCE)],
                                    capture_output=True, text=True, timeout=300)  # fmt: skip
            if result.returncode == 0:
                os.replace(target, library)  # atomic: other processes see all of it or none
                return library
            errors = result.stderr.strip()
    raise RuntimeError(f"{' '.join(compiler)} failed: {errors[-500:]}")


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared between machines keeps one
    library per kind of CPU."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _load() -> ctypes.CDLL | None:
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                try:
                    path = _build(_cache_dir())
                except OSError:  # e.g. a read-only home: a private temporary directory
                    user = os.getuid() if hasattr(os, "getuid") else "user"
                    path = _build(Path(tempfile.gettempdir()) / f"deformconv-{user}")
                _library = _declare(ctypes.CDLL(str(path)))
            except Exception as error:  # no compiler, a read-only cache, an odd platform...
                _failure = f"{type(error).__name__}: {str(error).strip()[:300]}"
                warnings.warn(
                    f"deformconv: building the CPU corner loops failed ({_failure}); using "
                    f"tensor operations instead (same results, slower).  Set "
                    f"{compiled.ENV_VAR}=0 to skip building them.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _library


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    p, n = ctypes.c_void_p, ctypes.c_int64
    signatures = {  # name: (argument types, result type)
        "corner_sums": ([p, p, n, p, p, n, n, n, n, n, p, n], None),
        "sample_sums": ([p, p, p, p, p, p, n, n, n, n, p, p, p, p, n], ctypes.c_int),
        "sample_plan": ([p, p, p, p, n, p, p, p, n], ctypes.c_int),
        "corner_grads": ([p, p, n, p, p, n, n, n, n, p, n, n, p, p, p, p, p, p, p, n], None),
    }
    for value in ("f32", "f64"):
        for index in ("i32", "i64"):
            for name, (arguments, result) in signatures.items():
                function = getattr(library, f"{name}_{value}_{index}")
                function.argtypes, function.restype = arguments, result
    return library


def _function(kind: str, values: Tensor, index: torch.dtype):
    return getattr(_load(), f"{kind}_{_SUFFIXES[values.dtype]}_{_SUFFIXES[index]}")


def _parts(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // WORK_PER_THREAD))


def _address(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _deltas(deltas: list[int]) -> Tensor:
    return torch.tensor(deltas, dtype=torch.int64)


def _check(values: Tensor, index: Tensor, *others: Tensor | None) -> None:
    """The loops read raw memory: every tensor contiguous (``index`` may be strided) on the
    CPU, in ``values``' dtype, ``index`` in int32 or int64."""
    tensors = [values, *(other for other in others if other is not None)]
    if any(t.dtype != values.dtype or t.device.type != "cpu" for t in tensors) or (
        index.dtype not in (torch.int32, torch.int64) or index.device.type != "cpu"
    ) or not all(t.is_contiguous() for t in tensors):  # fmt: skip
        raise TypeError("native corner loops: mismatched tensors")


def _planned(result: int, dims: int) -> None:
    """The loops plan samples of 1 to 3 axes only (and then return 1)."""
    if not result:
        raise ValueError(f"native corner loops: samples of 1 to 3 axes, got {dims}")


def _check_bags(table: Tensor, first: Tensor, weights: Tensor) -> None:
    if table.dim() != 2 or first.shape != weights.shape[:1] or weights.dim() != 2:
        raise TypeError("native corner loops: mismatched tensors")


def _check_shapes(*expected: tuple[Tensor | None, tuple[int, ...]]) -> None:
    """Each given tensor has its expected shape (the loops write and read by it)."""
    if any(t is not None and tuple(t.shape) != shape for t, shape in expected):
        raise TypeError("native corner loops: mismatched shapes")


def _grid(grid: Grid, offsets: Tensor, masks: Tensor | None, strict: bool) -> tuple:
    """The grid's numbers for the C loops (see ``grid_t`` in ``corners.c``), and the tensors
    whose addresses they hold, to be kept alive for the call."""
    dims = len(grid.bases)
    if offsets.shape != (grid.first.shape[0], dims) or (
        masks is not None and masks.shape != (offsets.shape[0],)
    ) or not all(base.dtype == grid.first.dtype and base.is_contiguous()
                 for base in grid.bases) or not grid.first.is_contiguous():  # fmt: skip
        raise TypeError("native corner loops: mismatched grid")
    geometry = torch.tensor(
        [dims, grid.dead, int(strict), grid.first.data_ptr(), *grid.sizes, *grid.strides,
         *(base.data_ptr() for base in grid.bases)], dtype=torch.int64,
    )  # fmt: skip
    reaches = torch.tensor(grid.reaches, dtype=torch.float64)
    return geometry, reaches


def sample_plan(offsets: Tensor, masks: Tensor | None, grid: Grid,
                strict: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The plan of :func:`~deformconv.backends.plan.plan_from_grid` for samples at
    ``offsets`` ``(M, d)`` with ``masks`` ``(M,)`` (or ``None``): first rows ``(M,)``, masked
    corner weights ``(M, 2**d)`` and fractional positions ``(M, d)``, in this thread's reused
    buffers (:mod:`~deformconv.backends.scratch`: the next plan overwrites them)."""
    _check(offsets, grid.first, masks)
    geometry, reaches = _grid(grid, offsets, masks, strict)
    samples, dims = offsets.shape
    first = scratch("plan_first", (samples,), grid.first.dtype, offsets.device)
    weights = scratch("plan_weights", (samples, 2**dims), offsets.dtype, offsets.device)
    fractions = scratch("plan_fractions", (samples, dims), offsets.dtype, offsets.device)
    planned = _function("sample_plan", offsets, first.dtype)(
        offsets.data_ptr(), _address(masks), geometry.data_ptr(), reaches.data_ptr(), samples,
        first.data_ptr(), weights.data_ptr(), fractions.data_ptr(), _parts(samples * 16),
    )  # fmt: skip
    _planned(planned, dims)
    return first, weights, fractions


def sample_sums(table: Tensor, offsets: Tensor, masks: Tensor | None, grid: Grid, out: Tensor,
                *, strict: bool = False, bag: int = 1) -> Tensor:  # fmt: skip
    """:func:`corner_sums` of the samples at ``offsets`` ``(M, d)`` with ``masks`` (or
    ``None``), planned on the way (:func:`sample_plan`); returns ``out``."""
    _check(table, grid.first, offsets, masks, out)
    geometry, reaches = _grid(grid, offsets, masks, strict)
    samples, dims = offsets.shape
    if table.dim() != 2 or samples % bag:
        raise TypeError("native corner loops: mismatched tensors")
    _check_shapes((out, (samples // bag, table.shape[1])))
    steps = _deltas(corner_deltas(grid.strides))  # (kept alive for the call, as all below)
    planned = _function("sample_sums", table, grid.first.dtype)(
        table.data_ptr(), offsets.data_ptr(), _address(masks), geometry.data_ptr(),
        reaches.data_ptr(), steps.data_ptr(), samples, table.shape[1], table.shape[0], bag,
        out.data_ptr(), None, None, None, _parts(samples * 2**dims * table.shape[1]),
    )  # fmt: skip
    _planned(planned, dims)
    return out


def corner_sums(table: Tensor, first: Tensor, weights: Tensor, deltas: list[int], out: Tensor,
                bag: int = 1) -> Tensor:  # fmt: skip
    """``out[b // bag] = Σ Σ_k weights[b, k] · table[first[b] + deltas[k]]`` (the sum over
    ``bag`` consecutive bags), ``out`` ``(B / bag, D)``; returns ``out``.  ``first`` may be
    strided (e.g. a column of a plan's rows)."""
    _check(table, first, weights, out)
    _check_bags(table, first, weights)
    bags, corners = weights.shape
    if bags % bag:
        raise TypeError("native corner loops: mismatched tensors")
    _check_shapes((out, (bags // bag, table.shape[1])))
    steps = _deltas(deltas)
    _function("corner_sums", table, first.dtype)(
        table.data_ptr(), first.data_ptr(), first.stride(0), weights.data_ptr(),
        steps.data_ptr(), bags, corners, table.shape[1], table.shape[0], bag, out.data_ptr(),
        _parts(bags * corners * table.shape[1]),
    )  # fmt: skip
    return out


def corner_grads(table: Tensor, first: Tensor, weights: Tensor, deltas: list[int], grad: Tensor,
                 *, share: int, skip_from: int, table_grad: Tensor | None, dots: bool = False,
                 fractions: Tensor | None = None, masks: Tensor | None = None,
                 mask_grad: Tensor | None = None, position_grad: Tensor | None = None,
                 columns: Tensor | None = None) -> Tensor | None:  # fmt: skip
    """For bags with gradient rows ``grad`` ``(B / share, D)``, one per ``share`` consecutive
    bags: adds ``weights[b, k] · grad[b // share]`` to ``table_grad[first[b] + deltas[k]]`` for
    bags with ``first[b] < skip_from`` (where ``table_grad`` is given); writes, from the
    plan's ``fractions`` ``(B, d)`` (and ``masks``), the mask gradients into ``mask_grad``
    ``(B,)`` and the masked position gradients into ``position_grad`` ``(B, d)`` (those of
    :func:`~deformconv.backends.compiled.dot_terms`), and :func:`corner_sums` into
    ``columns`` ``(B, D)`` (with ``share`` 1), each where given; with ``dots``, returns every
    corner row's dot product with its gradient row ``(B, K)`` (else ``None``)."""
    _check(table, first, weights, grad, table_grad, fractions, masks, mask_grad, position_grad,
           columns)  # fmt: skip
    _check_bags(table, first, weights)
    bags, corners = weights.shape
    depth, dims = table.shape[1], corners.bit_length() - 1
    if bags % share:
        raise TypeError("native corner loops: mismatched tensors")
    _check_shapes((grad, (bags // share, depth)), (table_grad, tuple(table.shape)),
                  (fractions, (bags, dims)), (masks, (bags,)), (mask_grad, (bags,)),
                  (position_grad, (bags, dims)), (columns, (bags, depth)))  # fmt: skip
    positions = mask_grad is not None or position_grad is not None
    if positions and fractions is None:
        raise TypeError("native corner loops: position terms need the plan's fractions")
    out = table.new_empty(bags, corners) if dots else None
    steps = _deltas(deltas)
    passes = int(dots or positions) + int(table_grad is not None) + int(columns is not None)
    _function("corner_grads", table, first.dtype)(
        table.data_ptr(), first.data_ptr(), first.stride(0), weights.data_ptr(),
        steps.data_ptr(), bags, corners, table.shape[1], table.shape[0], grad.data_ptr(), share,
        skip_from, _address(out), _address(table_grad), _address(fractions), _address(masks),
        _address(mask_grad), _address(position_grad), _address(columns),
        _parts(bags * corners * table.shape[1] * passes),
    )  # fmt: skip
    return out
