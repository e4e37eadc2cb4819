"""The CPU benchmark's timing protocol and table, on a tiny shape."""

from __future__ import annotations

import pytest
import torch

from deformconv.bench import cpu


@pytest.mark.parametrize("cold", [False, True])
def test_every_implementation_timed_in_rounds(monkeypatch, cold):
    calls = []
    original = cpu.runner

    def counting(name, shape, tensors, mode):
        run = original(name, shape, tensors, mode)
        return lambda: calls.append((name, mode)) or run()

    monkeypatch.setattr(cpu, "runner", counting)
    monkeypatch.setattr(
        cpu, "implementations", lambda: {"deformconv": cpu.deformconv.deform_conv2d}
    )
    rows = cpu.time_shapes([cpu.Shape(1, 4, 4, 6)], repeats=3, cold=cold)
    assert [(row["mode"], row["impl"]) for row in rows] == [
        ("fwd", "deformconv"), ("fwd", "nn.Conv2d"),
        ("fwd+bwd", "deformconv"), ("fwd+bwd", "nn.Conv2d"),
    ]  # fmt: skip
    assert all(row["ms"] > 0 for row in rows)
    # a warm-up each, then per round one timed call each, after an untimed one unless cold
    per_round = 1 if cold else 2
    assert len(calls) == 2 * 2 * (1 + 3 * per_round)
    if not cold:  # rounds alternate the implementations, each timed call after its own
        fwd = [name for name, mode in calls if mode == "fwd"]
        assert fwd[2:8] == ["deformconv"] * 2 + ["nn.Conv2d"] * 2 + ["deformconv"] * 2
    table = cpu.markdown(rows, {})
    assert "| N=1 C=4→4 6² k3 | fwd+bwd |" in table


def test_gradient_penalty_mode_leaves_torchvision_out(monkeypatch):
    """``--penalty`` times a double backward of deformconv and nn.Conv2d; torchvision, whose
    op has no double backward, shows as "—" there."""
    op = cpu.deformconv.deform_conv2d
    impls = {"deformconv": op, "torchvision": op}  # a stand-in: torchvision need not import
    monkeypatch.setattr(cpu, "implementations", lambda: impls)
    rows = cpu.time_shapes([cpu.Shape(1, 4, 4, 6)], repeats=1, penalty=True)
    timed = [(row["mode"], row["impl"]) for row in rows if row["mode"] == "fwd+bwd+penalty"]
    assert timed == [("fwd+bwd+penalty", "deformconv"), ("fwd+bwd+penalty", "nn.Conv2d")]
    table = cpu.markdown(rows, {})
    assert "| N=1 C=4→4 6² k3 | fwd+bwd+penalty | " in table and "| — |" in table


def test_transform_modes_time_deformconv_and_conv2d(monkeypatch):
    """``--transforms`` times torch.func.grad, vmap(grad) and jvp(grad) of deformconv and
    nn.Conv2d; their gradients are autograd's (per sample: summed over the batch, for the
    shared weight and bias), the Hessian-vector product autograd's double backward's."""
    shape = cpu.Shape(2, 4, 4, 6)
    op = cpu.deformconv.deform_conv2d
    monkeypatch.setattr(cpu, "implementations", lambda: {"deformconv": op, "torchvision": op})
    rows = cpu.time_shapes([shape], repeats=1, transforms=True)
    timed = [(row["mode"], row["impl"]) for row in rows if row["mode"] in cpu.TRANSFORMS]
    assert timed == [(mode, name) for mode in cpu.TRANSFORMS
                     for name in ("deformconv", "nn.Conv2d")]  # fmt: skip
    tensors = cpu.make_inputs(shape)
    by_func = cpu.runner("deformconv", shape, tensors, "torch.func.grad")()
    per_sample = cpu.runner("deformconv", shape, tensors, "vmap(grad)")()
    cpu.runner("deformconv", shape, tensors, "fwd+bwd")()
    for (name, tensor), whole, samples in zip(tensors.items(), by_func, per_sample, strict=True):
        torch.testing.assert_close(whole, tensor.grad, msg=name)
        summed = samples.sum(0) if name in ("weight", "bias") else samples.squeeze(1)
        torch.testing.assert_close(summed, tensor.grad, msg=name)
    # jvp(grad): the Hessian-vector product along (input, weight), for the gradients of all
    # five; by the Hessian's symmetry, the gradient of <grad_input, v_x> + <grad_weight, v_w>
    products = cpu.runner("deformconv", shape, tensors, "jvp(grad)")()
    generator = torch.Generator().manual_seed(1)
    v_x, v_w = (torch.randn(tensors[n].shape, generator=generator) for n in ("input", "weight"))
    leaves = list(tensors.values())
    out = op(tensors["input"], tensors["offset"], tensors["weight"], tensors["bias"],
             stride=shape.stride, padding=shape.padding, mask=tensors["mask"])  # fmt: skip
    grads = dict(zip(tensors, torch.autograd.grad(out.sum(), leaves, create_graph=True),
                     strict=True))  # fmt: skip
    inner = (grads["input"] * v_x).sum() + (grads["weight"] * v_w).sum()
    expected = torch.autograd.grad(inner, leaves, allow_unused=True)
    for name, have, want in zip(tensors, products, expected, strict=True):
        torch.testing.assert_close(have, torch.zeros_like(have) if want is None else want,
                                   msg=name)  # fmt: skip


def test_memory_rows_per_mode():
    memory = {"deformconv": {("S", "fwd+bwd"): 1.0, ("S", "torch.func.grad"): 4.5},
              "nn.Conv2d": {("S", "fwd+bwd"): 12.0}}  # fmt: skip
    table = cpu.markdown([], memory)
    assert "| S (extra peak RSS, fwd+bwd) | 1 MiB | 12 MiB |" in table
    assert "| S (extra peak RSS, torch.func.grad) | 4 MiB | — |" in table
    shape = cpu.Shape(1, 4, 4, 6)
    assert cpu._measure_in_process("deformconv", shape, "torch.func.grad") >= 0
