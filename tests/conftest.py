"""Every Triton kernel that the interpreter runs in a test is bounds-checked: an access outside
the tensors of its launch fails the test (``interpreter_bounds``).  ``composite_calls`` lists
the calls of the composite a test makes."""

import importlib.util
import os

import pytest

from deformconv import composite


@pytest.fixture(autouse=True)
def _interpreter_bounds_checks():
    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        yield
        return
    from interpreter_bounds import checking_bounds

    with checking_bounds():
        yield


@pytest.fixture
def composite_calls(monkeypatch) -> list[str]:
    """The names of the composite functions called while the test runs."""
    calls: list[str] = []
    for name in ("deform_conv", "dcnv3"):
        original = getattr(composite, name)

        def counting(*args, _name=name, _original=original):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(composite, name, counting)
    return calls
