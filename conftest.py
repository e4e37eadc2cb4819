"""Test-session setup shared by the tests and the doctests.

Without a GPU the Triton kernels run in Triton's CPU interpreter; the switch must be set
before the kernels are defined.  The torch backend's CPU sampling runs uncompiled but for
its C corner loops.  Without Triton the kernel modules are not collected.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The torch backend's compiled CPU sampling costs seconds of compilation per new setting;
# tests/test_compiled.py checks it against the uncompiled path, which every other test runs.
os.environ.setdefault("DEFORMCONV_COMPILE", "native")

collect_ignore = [] if importlib.util.find_spec("triton") else ["src/deformconv/kernels"]


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
