"""The torch backend's sampling plan, kept from a forward for its backward: the same results
as recomputing it, used only by the backward of that forward's offsets and mask."""

from __future__ import annotations

import pytest
import torch

import deformconv
from cases import LOPSIDED, call, differentiable, make_inputs, output_and_grads
from deformconv.backends import compiled, handoff, native
from deformconv.backends import pytorch as torch_backend


@pytest.fixture(autouse=True)
def _tensor_operations(monkeypatch):
    """The plans of the tensor operations: the C loops plan inside the forward's gather and
    hand nothing over (see test_the_c_loops_hand_nothing_over)."""
    monkeypatch.setattr(native, "available", lambda table: False)


def _count_plans(monkeypatch) -> list:
    """Every plan computed (compiled or not) appends to the returned list."""
    plans = []
    original = compiled.corners
    monkeypatch.setattr(compiled, "corners", lambda *a, **k: plans.append(1) or original(*a, **k))
    return plans


@pytest.mark.parametrize("split", [False, True])
def test_the_backward_takes_the_forwards_plan_and_agrees_bit_for_bit(monkeypatch, split):
    """Also where the backward runs in two chunks and the forward in one (the column budget
    counts two buffers in the forward, four in the backward)."""
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, seed=3)
    if split:
        pixels = config.batch * config.out_size[0] * config.out_size[1]
        taps = config.kernel[0] * config.kernel[1]
        monkeypatch.setattr(torch_backend, "_column_budget", pixels * taps * config.channels * 16)
    plans = _count_plans(monkeypatch)
    kept = output_and_grads(deformconv.deform_conv2d, tensors, config)
    assert len(plans) == 1  # the forward's, reused
    monkeypatch.setattr(handoff, "KEEP_BYTES", -1)  # nothing kept: the backward recomputes
    recomputed = output_and_grads(deformconv.deform_conv2d, tensors, config)
    assert len(plans) == (4 if split else 3)
    assert torch.equal(kept[0], recomputed[0])
    for name in kept[1]:
        assert torch.equal(kept[1][name], recomputed[1][name]), name


def test_a_plan_serves_only_its_own_tensors():
    offset, mask, other = torch.zeros(3), torch.zeros(2), torch.zeros(3)
    plan = (torch.ones(4),)
    handoff.keep(offset, mask, "key", plan)
    assert handoff.take(other, mask) is None  # another offset tensor
    handoff.keep(offset, mask, "key", plan)
    assert handoff.take(offset, None) is None  # no mask now
    handoff.keep(offset, mask, "key", plan)
    offset.add_(1)  # changed in place since the forward
    assert handoff.take(offset, mask) is None
    handoff.keep(offset, mask, "key", plan)
    kept = handoff.take(offset, mask)
    assert handoff.take(offset, mask) is None  # handed over once
    with handoff.offered(kept):
        assert handoff.offer(offset, mask, "other key") is None
        assert handoff.offer(offset, mask, "key") is plan
        mask.add_(1)
        assert handoff.offer(offset, mask, "key") is None
    assert handoff.offer(offset, mask, "key") is None  # offered only inside


def test_retained_graph_reuses_the_plan_for_a_second_backward(monkeypatch):
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, seed=4)
    leaves = list(differentiable(tensors).values())
    plans = _count_plans(monkeypatch)
    out = call(deformconv.deform_conv2d, tensors, config)
    first = torch.autograd.grad(out.square().sum(), leaves, retain_graph=True)
    second = torch.autograd.grad(out.square().sum(), leaves)
    assert len(plans) == 1
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_large_calls_keep_nothing(monkeypatch):
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, seed=5)
    monkeypatch.setattr(handoff, "KEEP_BYTES", 16)
    plans = _count_plans(monkeypatch)
    output_and_grads(deformconv.deform_conv2d, tensors, config)
    assert len(plans) == 2


def test_the_c_loops_hand_nothing_over(monkeypatch):
    """They plan the forward's samples inside its gather, and the backward's in one pass of
    their own: nothing kept between."""
    monkeypatch.undo()  # the C loops, where they build
    if not native.runs_here():
        pytest.skip("the C loops do not build here")
    kept = []
    original = handoff.keep
    monkeypatch.setattr(handoff, "keep", lambda *a: kept.append(a[-1]) or original(*a))
    config = LOPSIDED["straddling-groups"]
    output_and_grads(deformconv.deform_conv2d, make_inputs(config), config)
    assert kept == [None]
