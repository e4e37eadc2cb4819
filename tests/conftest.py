"""Every Triton kernel that the interpreter runs in a test is bounds-checked: an access outside
the tensors of its launch fails the test (``interpreter_bounds``)."""

import importlib.util
import os

import pytest


@pytest.fixture(autouse=True)
def _interpreter_bounds_checks():
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        yield
        return
    from interpreter_bounds import checking_bounds

    with checking_bounds():
        yield
