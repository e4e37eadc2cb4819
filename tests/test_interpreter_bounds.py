"""The interpreter's bounds checks (``interpreter_bounds``), which every test runs under."""

import pytest
import torch

pytest.importorskip("triton", minversion="3.2")  # the oldest the kernels run on (torch 2.6)

import triton
import triton.language as tl

from interpreter_bounds import checking_bounds, supported
from triton_cases import DEVICE

pytestmark = pytest.mark.skipif(DEVICE.type == "cuda", reason="checks of the interpreter")


@triton.jit
def _copy_kernel(src_ptr, dst_ptr, n, shift, BLOCK: tl.constexpr, MASKED: tl.constexpr,
                 view=None):  # fmt: skip
    i = tl.arange(0, BLOCK)
    if MASKED:
        values = tl.load(src_ptr + i + shift, mask=(i < n) & (i + shift < n), other=0.0)
    else:
        values = tl.load(src_ptr + i + shift)
    tl.store(dst_ptr + i, values, mask=i < n)


@triton.jit
def _add_kernel(dst_ptr, index):
    tl.atomic_add(dst_ptr + index, 1.0)


def test_this_tritons_interpreter_can_be_checked():
    assert supported(), f"Triton {triton.__version__}: the interpreter's hooks have changed"


def test_accesses_inside_the_tensors_pass():
    src = torch.arange(10.0)
    dst = torch.zeros(10)
    _copy_kernel[(1,)](src, dst, 10, 3, BLOCK=16, MASKED=True)
    assert dst.tolist() == [*range(3, 10), 0, 0, 0]
    _add_kernel[(1,)](dst, 9)
    assert dst[9] == 1.0


def test_views_that_nest_count_as_their_union():
    """A launch given a tensor and a short view inside it: loads anywhere in the tensor pass."""
    storage = torch.arange(20.0)
    dst = torch.zeros(16)
    _copy_kernel[(1,)](storage, dst, 16, 4, BLOCK=16, MASKED=False, view=storage[2:4])
    assert dst.tolist() == list(range(4, 20))


def test_a_load_past_the_end_fails():
    with pytest.raises(Exception, match=r"load of 4 bytes at 0x[0-9a-f]+ \(6 of 16"):
        _copy_kernel[(1,)](torch.arange(10.0), torch.zeros(10), 10, 0, BLOCK=16, MASKED=False)


def test_a_load_before_a_view_of_a_larger_tensor_fails():
    storage = torch.arange(20.0)
    with pytest.raises(Exception, match="load"):
        _copy_kernel[(1,)](storage[4:14], torch.zeros(10), 10, -1, BLOCK=16, MASKED=False)


def test_an_atomic_update_past_the_end_fails():
    with pytest.raises(Exception, match="atomic update"):
        _add_kernel[(1,)](torch.zeros(10), 10)


def test_a_nested_context_gives_back_the_outer_checks():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    outer = builder.__dict__["create_masked_load"]  # the fixture's
    with checking_bounds():
        assert builder.__dict__["create_masked_load"] is not outer
    assert builder.__dict__["create_masked_load"] is outer
    with pytest.raises(Exception, match=r"OutOfBounds.*atomic update"):
        _add_kernel[(1,)](torch.zeros(2), 2)


def test_leaving_the_last_context_removes_the_checks():
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    saved = builder.__dict__.pop("create_masked_load")  # as if no fixture were active
    try:
        with checking_bounds():
            assert "create_masked_load" in builder.__dict__
        assert "create_masked_load" not in builder.__dict__
    finally:
        builder.create_masked_load = saved
