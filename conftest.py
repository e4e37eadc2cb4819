"""Test-session setup shared by the tests and the doctests.

Without a GPU the Triton kernels run in Triton's CPU interpreter; the switch must be set
before the kernels are defined.  The torch backend's CPU sampling runs uncompiled.  Without
Triton the kernel modules are not collected.
"""

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The torch backend's compiled CPU sampling costs seconds of compilation per new setting;
# tests/test_compiled.py checks it against the uncompiled path, which every other test runs.
os.environ.setdefault("DEFORMCONV_COMPILE", "0")

collect_ignore = [] if importlib.util.find_spec("triton") else ["src/deformconv/kernels"]


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    """Docstring examples use ``torch`` without importing it."""
    doctest_namespace["torch"] = torch
