"""Reused CPU buffers of the torch backend: kept per thread and slot, within their budget,
and never seen outside a call (no result aliases them)."""

from __future__ import annotations

import threading

import pytest
import torch

import deformconv
from deformconv.backends import scratch


@pytest.fixture(autouse=True)
def _fresh_buffers():
    scratch.release()
    yield
    scratch.release()


def test_a_slot_reuses_its_buffer_and_slots_do_not_share():
    first = scratch.scratch("a", (4, 5), torch.float32, torch.device("cpu"))
    again = scratch.scratch("a", (3, 2), torch.float64, torch.device("cpu"))
    other = scratch.scratch("b", (4, 5), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == first.data_ptr()
    assert other.data_ptr() != first.data_ptr()
    assert again.shape == (3, 2) and again.dtype == torch.float64 and again.is_contiguous()
    assert scratch.kept_bytes() == 2 * 4 * 5 * 4


def test_buffers_stay_within_the_budget(monkeypatch):
    monkeypatch.setattr(scratch, "SCRATCH_BYTES", 1000)
    kept = scratch.scratch("a", (100,), torch.float32, torch.device("cpu"))  # 400 bytes
    scratch.scratch("b", (200,), torch.float32, torch.device("cpu"))  # 400 + 800: not kept
    assert scratch.kept_bytes() == 400
    again = scratch.scratch("a", (10,), torch.float32, torch.device("cpu"))
    assert again.data_ptr() == kept.data_ptr()
    assert scratch.scratch("c", (4,), torch.float32, torch.device("meta")).device.type == "meta"
    assert scratch.kept_bytes() == 400


def test_threads_keep_their_own_buffers():
    here = scratch.scratch("a", (8,), torch.float32, torch.device("cpu")).data_ptr()
    there = []
    thread = threading.Thread(
        target=lambda: there.append(
            scratch.scratch("a", (8,), torch.float32, torch.device("cpu")).data_ptr()
        )
    )
    thread.start()
    thread.join()
    assert there[0] != here


# Shapes where a result could come out as a view of a buffer: a 1×1 output, a 1×1 kernel,
# weight groups, 3-D.
CASES = {
    "1x1-output": ((2, 4, 3, 3), (3, 4, 3, 3), {"padding": 0}),
    "1x1-kernel": ((2, 6, 5, 4), (4, 6, 1, 1), {}),
    "groups": ((2, 6, 5, 4), (4, 3, 3, 3), {"padding": 1}),
    "3-d": ((1, 4, 3, 4, 5), (2, 4, 2, 3, 2), {"padding": 1}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_no_result_is_overwritten_by_the_next_call(name):
    input_shape, weight_shape, options = CASES[name]
    function = deformconv.deform_conv3d if len(input_shape) == 5 else deformconv.deform_conv2d

    def call(seed):
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(weight_shape, generator=generator, requires_grad=True)
        input = torch.randn(input_shape, generator=generator, requires_grad=True)
        dims = len(input_shape) - 2
        out_size = [
            n + 2 * options.get("padding", 0) - k + 1
            for n, k in zip(input_shape[2:], weight_shape[2:], strict=True)
        ]
        taps = weight.shape[2:].numel()
        offset = torch.randn(input_shape[0], dims * taps, *out_size, generator=generator)
        offset.requires_grad_()
        mask = torch.rand(input_shape[0], taps, *out_size, generator=generator)
        mask.requires_grad_()
        out = function(input, offset, weight, mask=mask, **options)
        out.backward(torch.randn(out.shape, generator=generator))
        return [out.detach(), input.grad, offset.grad, mask.grad, weight.grad]

    with deformconv.use_backend("torch"):
        first = call(0)
        kept = [t.clone() for t in first]
        call(1)
    for name_, now, before in zip(["out", "input", "offset", "mask", "weight"], first, kept,
                                  strict=True):  # fmt: skip
        assert torch.equal(now, before), name_
    assert scratch.kept_bytes() > 0


@pytest.mark.parametrize("op", ["dcnv3", "dcnv4"])
def test_no_dcnv3_result_is_overwritten_by_the_next_call(op):
    """The DCNv3 backend's buffers too (DCNv4: a mask read from the fused tensor, a copy)."""

    def call(seed):
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(shape, generator=generator).requires_grad_()

        input = randn(2, 4, 5, 6)
        if op == "dcnv3":
            leaves = (input, randn(2, 4, 5, 2 * 9 * 2), torch.rand(2, 4, 5, 2 * 9).requires_grad_())
            out = deformconv.dcnv3(*leaves, kernel_size=3, padding=1, group=2)
        else:
            leaves = (input, randn(2, 4, 5, deformconv.dcnv4_offset_mask_channels(2, 3)))
            out = deformconv.dcnv4(*leaves, kernel_size=3, padding=1, group=2)
        out.backward(torch.randn(out.shape, generator=generator))
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    with deformconv.use_backend("torch"):
        first = call(0)
        kept = [t.clone() for t in first]
        call(1)
    for index, (now, before) in enumerate(zip(first, kept, strict=True)):
        assert torch.equal(now, before), index
    assert scratch.kept_bytes() > 0


def test_calls_in_two_threads_at_once_give_their_own_results():
    """Each thread takes its own buffers (and the grid cache is shared safely): concurrent
    calls on different inputs give what each gives alone."""

    def call(seed):
        generator = torch.Generator().manual_seed(seed)
        input = torch.randn(2, 8, 9, 7, generator=generator, requires_grad=True)
        offset = torch.randn(2, 18, 9, 7, generator=generator, requires_grad=True)
        weight = torch.randn(6, 8, 3, 3, generator=generator, requires_grad=True)
        out = deformconv.deform_conv2d(input, offset, weight, padding=1)
        grads = torch.autograd.grad(out.square().sum(), (input, offset, weight))
        return [out.detach(), *grads]

    together = {}
    errors = []

    def worker(seed):
        try:
            for _ in range(5):
                together[seed] = call(seed)
        except Exception as error:  # reported below
            errors.append(error)

    with deformconv.use_backend("torch"):  # a process-wide setting: set once, outside
        alone = {seed: call(seed) for seed in (0, 1)}
        threads = [threading.Thread(target=worker, args=(seed,)) for seed in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    for seed in (0, 1):
        for mine, theirs in zip(together[seed], alone[seed], strict=True):
            assert torch.equal(mine, theirs)
