"""Every Triton kernel launch compiles for Ampere (sm_80) and Hopper (sm_90) GPUs, with no GPU:
``tests/compile_kernels.py`` records the launches the launchers make and compiles each with
Triton's compiler down to a cubin.  The interpreter tests check what the kernels compute; this
checks that the real compiler takes them, in every dtype and mode."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("torch", minversion="2.6")  # torch.library.triton_op

TESTS = Path(__file__).parent
KERNELS = ["deform_conv2d_forward_kernel", "deform_conv2d_backward_data_kernel",
           "deform_conv2d_backward_weight_kernel", "dcnv3_forward_kernel",
           "dcnv3_backward_kernel"]  # fmt: skip


def _compile(*arguments: str) -> subprocess.CompletedProcess:
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version < (3, 9):
        pytest.skip(f"written against Triton 3.9's compiler API, found {triton.__version__}")
    nvidia = Path(triton.__file__).parent / "backends" / "nvidia"
    if not (nvidia / "bin" / "ptxas").exists():
        pytest.skip("this Triton build has no NVIDIA backend with ptxas")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    return subprocess.run(
        [sys.executable, str(TESTS / "compile_kernels.py"), *arguments],
        capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip


def test_benchmark_shapes_fit_the_shared_memory_of_rtx_gpus():
    """At 256 channels the tiles are at their largest; on sm_89 (RTX 40, L4; sm_86 has the
    same 99 KiB a block) every launch must fit, or it would fail there with "out of
    resources"."""
    result = _compile("--arch", "89", "--shapes", "benchmark")
    report = result.stdout
    assert result.returncode == 0, report[-5000:] + result.stderr[-5000:]
    assert report.rstrip().endswith("0 failed"), report[-2000:]
    shared = [int(n) for n in re.findall(r"^ok sm_89 .*, (\d+) B shared, ", report, re.M)]
    assert len(shared) >= 50 and max(shared) <= 99 * 1024, report[-2000:]


def test_every_kernel_compiles_for_ampere_and_hopper():
    result = _compile("--arch", "80", "90")
    report = result.stdout
    assert result.returncode == 0, report[-5000:] + result.stderr[-5000:]
    assert report.rstrip().endswith("0 failed"), report[-2000:]
    for arch in ("sm_80", "sm_90"):
        for kernel in KERNELS:
            assert f"ok {arch} {kernel} " in report, f"{kernel} was not compiled for {arch}"
    # Every launch's SASS was read back: its instruction count is in its line.
    counts = re.findall(r"^ok .*, (\d+) instructions$", report, re.M)
    assert len(counts) == report.count("\nok ") + report.startswith("ok "), report[-2000:]
    assert min(int(count) for count in counts) > 100, report[-2000:]
    # And how many blocks a multiprocessor holds, from registers and shared memory.
    held = re.findall(r"^ok .*, (\d+) blocks per multiprocessor \((\w[\w ]*)\), ", report, re.M)
    assert len(held) == len(counts), report[-2000:]
    # And the stack frame and spill instructions (ptxas spills to the stack, not "local").
    frames = re.findall(r"^ok .*: \d+ registers, (\d+) B stack, (\d+) spill stores, "
                        r"(\d+) spill loads, ", report, re.M)  # fmt: skip
    assert len(frames) == len(counts), report[-2000:]
    assert all(int(blocks) >= 1 for blocks, _ in held), report[-2000:]
