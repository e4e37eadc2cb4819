"""Corner gathers and scatters of the torch backend as C loops compiled at run time.

The loops of ``kernels/corners.c`` (plain C, no PyTorch headers) do in one pass each what
the tensor operations of :mod:`~deformconv.backends.gather` do in several: the weighted corner
sums of the forward, and, in the backward, every corner's dot product with its sample's
column gradient and the input gradient's accumulation, split over threads by table rows so
that each sum is formed in the same order whatever the number of threads (bit-identical
results, no atomics).

The source is compiled on first use by the system's C compiler (``$CC``, else ``cc``) into a
shared library kept in ``$DEFORMCONV_CACHE`` (default ``~/.cache/deformconv``), named by a hash
of the source, the compiler and the machine, so later processes load it at once; it is
called through :mod:`ctypes`.  Where there is no compiler or anything else fails, the backend
warns once and uses :mod:`~deformconv.backends.gather`'s tensor operations (same results up to
rounding).  ``DEFORMCONV_COMPILE=0`` or ``deformconv.set_cpu_compile(False)`` turns it off with
the rest of the compiled CPU sampling; ``DEFORMCONV_COMPILE=native`` keeps only these loops.
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
    """Whether the C loops run for ``table``: on the CPU, in float32 or float64, where the
    compiled CPU sampling is on and the library builds."""
    if not (compiled.native_enabled() and table.device.type == "cpu"
            and table.dtype in (torch.float32, torch.float64)):  # fmt: skip
        return False
    return _load() is not None


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
                _library = _declare(ctypes.CDLL(str(_build(_cache_dir()))))
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
    pointer, number = ctypes.c_void_p, ctypes.c_int64
    for value in ("f32", "f64"):
        for index in ("i32", "i64"):
            sums = getattr(library, f"corner_sums_{value}_{index}")
            sums.argtypes = [pointer, pointer, number, pointer, pointer, *[number] * 5, pointer,
                             number]  # fmt: skip
            sums.restype = None
            grads = getattr(library, f"corner_grads_{value}_{index}")
            grads.argtypes = [pointer, pointer, number, pointer, pointer, *[number] * 4, pointer,
                              number, number, pointer, pointer, number]  # fmt: skip
            grads.restype = None
    return library


def _function(kind: str, table: Tensor, first: Tensor):
    return getattr(_load(), f"corner_{kind}_{_SUFFIXES[table.dtype]}_{_SUFFIXES[first.dtype]}")


def _parts(work: int) -> int:
    return max(1, min(torch.get_num_threads(), work // WORK_PER_THREAD))


def _deltas(deltas: list[int]) -> Tensor:
    return torch.tensor(deltas, dtype=torch.int64)


def _check(table: Tensor, first: Tensor, weights: Tensor, *others: Tensor | None) -> None:
    """The loops read raw memory: every tensor on the CPU, in the table's dtype (``first`` in
    int32 or int64), ``weights`` ``(B, K)`` and ``first`` ``(B,)``."""
    values = [weights, *(other for other in others if other is not None)]
    if any(t.dtype != table.dtype or t.device != table.device for t in values) or (
        first.dtype not in (torch.int32, torch.int64) or first.device != table.device
    ) or first.shape[0] != weights.shape[0] or table.dim() != 2:  # fmt: skip
        raise TypeError("native corner loops: mismatched tensors")


def corner_sums(table: Tensor, first: Tensor, weights: Tensor, deltas: list[int], out: Tensor,
                bag: int = 1) -> Tensor:  # fmt: skip
    """``out[b // bag] = Σ Σ_k weights[b, k] · table[first[b] + deltas[k]]`` (the sum over
    ``bag`` consecutive bags), ``out`` ``(B / bag, D)`` contiguous; returns ``out``.  ``first``
    may be strided (e.g. a column of a plan's rows)."""
    _check(table, first, weights, out)
    bags, corners = weights.shape
    depth = table.shape[1]
    table, weights = table.contiguous(), weights.contiguous()
    steps = _deltas(deltas)
    _function("sums", table, first)(
        table.data_ptr(), first.data_ptr(), first.stride(0), weights.data_ptr(),
        steps.data_ptr(), bags, corners, depth, table.shape[0], bag, out.data_ptr(),
        _parts(bags * corners * depth),
    )  # fmt: skip
    return out


def corner_grads(table: Tensor, first: Tensor, weights: Tensor, deltas: list[int], grad: Tensor,
                 *, share: int, skip_from: int, dots: bool,
                 table_grad: Tensor | None) -> Tensor | None:  # fmt: skip
    """For bags with gradient rows ``grad`` ``(B / share, D)``, one per ``share`` consecutive
    bags: adds ``weights[b, k] · grad[b // share]`` to ``table_grad[first[b] + deltas[k]]`` for
    bags with ``first[b] < skip_from`` (where ``table_grad`` is given, contiguous), and, with
    ``dots``, returns ``(B, K)``: every corner row's dot product with its gradient row."""
    _check(table, first, weights, grad, table_grad)
    bags, corners = weights.shape
    depth = table.shape[1]
    table, weights, grad = table.contiguous(), weights.contiguous(), grad.contiguous()
    out = table.new_empty(bags, corners) if dots else None
    steps = _deltas(deltas)
    _function("grads", table, first)(
        table.data_ptr(), first.data_ptr(), first.stride(0), weights.data_ptr(),
        steps.data_ptr(), bags, corners, depth, table.shape[0], grad.data_ptr(), share,
        skip_from, None if out is None else out.data_ptr(),
        None if table_grad is None else table_grad.data_ptr(),
        _parts(bags * corners * depth * (int(dots) + int(table_grad is not None))),
    )  # fmt: skip
    return out
