"""Test-session setup shared by the tests and the doctests.

Without a GPU the Triton kernels run in Triton's CPU interpreter; the switch must be set
before the kernels are defined.  The torch backend's CPU sampling runs uncompiled but for
its C corner loops.  Where the kernels cannot run (no Triton, or a PyTorch without
``torch.library.triton_op``, before 2.6), the kernel modules' doctests are not collected and
the tests of the kernels skip.
"""

import dataclasses
import importlib
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The torch backend's compiled CPU sampling costs seconds of compilation per new setting;
# tests/test_compiled.py checks it against the uncompiled path, which every other test runs.
os.environ.setdefault("DEFORMCONV_COMPILE", "native")

from deformconv.backends.triton_backend import unavailable_reason

collect_ignore = []
if unavailable_reason() is not None:  # modules that import the kernels (for their doctests)
    collect_ignore += ["src/deformconv/kernels", "tests/compile_kernels.py"]
if importlib.util.find_spec("PIL") is None:  # the demo's digits, drawn with Pillow
    collect_ignore.append("src/deformconv/demo/digits.py")


@pytest.fixture(autouse=True)
def _interpreter_overflow_checks(request, monkeypatch):
    """Triton's interpreter computes an overflow check for every 32-bit integer add, subtract
    and multiply of a kernel, about 40 % of its time, but acts on it only in debug mode.  Tests
    marked ``overflow_checks`` run in debug mode: an overflow fails them.  The others run
    without the checks.  On the tests' small shapes only non-finite or far offsets can lead to
    such integers, and the tests that give them are marked."""
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    builder = getattr(importlib.import_module("triton.runtime.interpreter"),
                      "interpreter_builder", None)  # fmt: skip
    options = getattr(builder, "options", None)
    if not (dataclasses.is_dataclass(options) and hasattr(options, "sanitize_overflow")):
        return
    checked = request.node.get_closest_marker("overflow_checks") is not None
    changes = {"sanitize_overflow": checked, "debug": checked or options.debug}
    monkeypatch.setattr(builder, "options", dataclasses.replace(options, **changes))


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    """Docstring examples use ``torch`` without importing it."""
    doctest_namespace["torch"] = torch


@pytest.fixture(params=["native", "tensor-ops"])
def cpu_gathers(request, monkeypatch):
    """The torch backend's CPU corner gathers and scatters as the C loops of
    ``deformconv.backends.native`` ("native"; skipped where they do not build) or as the
    tensor operations of ``deformconv.backends.gather`` ("tensor-ops")."""
    from deformconv.backends import compiled, native

    monkeypatch.setattr(compiled, "_native", request.param == "native")
    if request.param == "native" and not native.runs_here():
        pytest.skip(f"the C corner loops do not build here: {native.failure()}")
    return request.param
