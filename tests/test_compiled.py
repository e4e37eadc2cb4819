"""The torch backend's compiled CPU sampling: the same results as the uncompiled path, a
clean fallback where compiling fails, and its switch."""

from __future__ import annotations

import shutil

import pytest
import torch

import deformconv
from cases import LOPSIDED, assert_falls_back_once, make_inputs, output_and_grads
from deformconv.backends import compiled, native

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(name) for name in ("g++", "c++", "clang++")),
    reason="compiling needs a C++ compiler",
)


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    """No failure and nothing compiled yet; the switch as it was afterwards; the small calls
    of these tests compiled as large ones are; no C loops (this is the tier that runs where
    they do not build)."""
    monkeypatch.setattr(native, "available", lambda table: False)
    monkeypatch.setattr(compiled, "_failure", None)
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_enabled", compiled._enabled)
    monkeypatch.setattr(compiled, "MIN_SAMPLES", 0)


def _both_ways(function):
    compiled.set_cpu_compile(False)
    expected = function()
    compiled.set_cpu_compile(True)
    return expected, function()


def _assert_compiled_matches(run, functions: set[str]):
    """``run()``'s results compiled equal its results uncompiled, having compiled
    ``functions``."""
    expected, actual = _both_ways(run)
    assert compiled.compile_failure() is None
    assert set(compiled._compiled) == functions
    for first, second in zip(expected, actual, strict=True):
        torch.testing.assert_close(second, first, atol=1e-4, rtol=1e-5)


@needs_compiler
def test_compiled_2d_matches_uncompiled_forward_and_every_gradient():
    config = LOPSIDED["straddling-groups"]  # 3 offset groups of 2 channels: compiled
    tensors = make_inputs(config, dtype=torch.float32, seed=6)
    expected, actual = _both_ways(lambda: output_and_grads(deformconv.deform_conv2d, tensors,
                                                           config))  # fmt: skip
    assert compiled.compile_failure() is None
    assert set(compiled._compiled) == {"columns", "corner_terms"}
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], atol=1e-4, rtol=1e-5)


@needs_compiler
def test_compiled_wide_rows_match_uncompiled_forward_and_every_gradient():
    """Rows wider than NARROW_ROWS: the plan and the offset and mask gradients compiled, the
    gathers uncompiled."""
    generator = torch.Generator().manual_seed(11)
    channels = 2 * (compiled.NARROW_ROWS + 3)  # 2 offset groups of 35 channels
    input = torch.randn(2, channels, 7, 6, generator=generator, requires_grad=True)
    offset = 2 * torch.randn(2, 2 * 2 * 6, 4, 4, generator=generator)
    mask = torch.rand(2, 2 * 6, 4, 4, generator=generator)
    weight = torch.randn(5, channels, 3, 2, generator=generator, requires_grad=True)
    bias = torch.randn(5, generator=generator, requires_grad=True)
    leaves = [input, offset.requires_grad_(), mask.requires_grad_(), weight, bias]

    def run():
        out = deformconv.deform_conv2d(input, offset, weight, bias, stride=(2, 1),
                                       padding=(1, 0), dilation=(1, 2), mask=mask)  # fmt: skip
        return out, *torch.autograd.grad(out.square().sum(), leaves)

    _assert_compiled_matches(run, {"corners", "dot_terms"})


@needs_compiler
def test_one_compilation_serves_other_sizes_and_geometries():
    """Dynamic shapes, the constants as tensors and no view relations: other input sizes,
    channels, groups, kernels, strides and batches reuse the first compilation.  (A first
    call whose channels per offset group equal the number of axes, 2, compiles that
    equality in: the first different count then compiles once more.)"""
    from torch._dynamo.utils import counters

    compiled.set_cpu_compile(True)
    torch._dynamo.reset()  # what earlier tests compiled does not count
    counters.clear()
    settings = ((3, 4, 7, 1, 3, 1), (2, 8, 9, 4, 3, 1), (1, 6, 13, 3, 5, 2), (2, 10, 6, 5, 1, 1))
    for batch, channels, size, groups, kernel, stride in settings:
        generator = torch.Generator().manual_seed(size)
        taps = kernel * kernel
        input = torch.randn(batch, channels, size, size, generator=generator, requires_grad=True)
        out_size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        offset = torch.randn(batch, 2 * groups * taps, out_size, out_size, generator=generator)
        mask = torch.rand(batch, groups * taps, out_size, out_size, generator=generator)
        weight = torch.randn(channels, channels, kernel, kernel, generator=generator)
        out = deformconv.deform_conv2d(input, offset.requires_grad_(), weight, stride=stride,
                                       padding=kernel // 2, mask=mask.requires_grad_())  # fmt: skip
        out.sum().backward()
    assert compiled.compile_failure() is None
    assert counters["stats"]["unique_graphs"] == 2  # columns and corner_terms, once each


@needs_compiler
def test_compiled_3d_without_mask_matches_uncompiled():
    generator = torch.Generator().manual_seed(7)
    input = torch.randn(2, 4, 5, 6, 4, generator=generator, requires_grad=True)
    offset = (2 * torch.randn(2, 3 * 2 * 12, 5, 3, 5, generator=generator)).requires_grad_(True)
    weight = torch.randn(3, 4, 3, 2, 2, generator=generator, requires_grad=True)

    def run():
        out = deformconv.deform_conv3d(input, offset, weight, stride=(1, 2, 1),
                                       padding=(1, 0, 1))  # fmt: skip
        return out, *torch.autograd.grad(out.square().sum(), (input, offset, weight))

    _assert_compiled_matches(run, {"columns", "corner_terms"})


def test_a_failed_compilation_warns_once_and_runs_uncompiled(monkeypatch):
    def broken(function, **options):
        def call(*args, **options):
            raise RuntimeError("no C++ compiler here")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, dtype=torch.float32, seed=8)
    compiled.set_cpu_compile(False)
    expected = output_and_grads(deformconv.deform_conv2d, tensors, config)
    compiled.set_cpu_compile(True)
    assert_falls_back_once(lambda: output_and_grads(deformconv.deform_conv2d, tensors, config),
                           expected, match="no C.. compiler here")  # fmt: skip
    assert "no C++ compiler here" in compiled.compile_failure()
    assert not compiled.active(torch.empty(1, 2))


@needs_compiler
def test_calls_of_few_samples_stay_uncompiled(monkeypatch):
    monkeypatch.setattr(compiled, "MIN_SAMPLES", 10**6)
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, dtype=torch.float32, seed=6)
    compiled.set_cpu_compile(True)
    output_and_grads(deformconv.deform_conv2d, tensors, config)
    assert compiled._compiled == {}
    assert not compiled.worthwhile(torch.empty(5, 4), 10**6 - 1)
    assert compiled.worthwhile(torch.empty(5, 4), 10**6)


def test_which_tables_compile_and_the_switch(monkeypatch):
    compiled.set_cpu_compile(True)
    assert compiled.fuses_gathers(torch.empty(5, compiled.NARROW_ROWS))
    assert not compiled.fuses_gathers(torch.empty(5, compiled.NARROW_ROWS + 1))  # wide rows
    assert compiled.active(torch.empty(5, compiled.NARROW_ROWS + 1))
    assert not compiled.active(torch.empty(5, 4, dtype=torch.float16))
    assert not compiled.active(torch.empty(5, 4, device="meta"))
    deformconv.set_cpu_compile(False)
    assert not compiled.compile_enabled() and not compiled.active(torch.empty(5, 4))
    monkeypatch.setenv(compiled.ENV_VAR, "1")
    deformconv.set_cpu_compile(None)
    assert compiled.compile_enabled()
    with pytest.raises(ValueError, match="True, False or None, got 'yes'"):
        deformconv.set_cpu_compile("yes")


@needs_compiler
def test_compiled_non_finite_and_huge_offsets_sample_zero():
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, dtype=torch.float32, seed=9)
    poisoned = tensors["offset"].detach().clone()
    poisoned[:, 0] = float("nan")
    poisoned[:, 1, 0] = float("inf")
    poisoned[:, 2, 1] = -1e30
    tensors["offset"] = poisoned.requires_grad_(True)
    expected, actual = _both_ways(lambda: output_and_grads(deformconv.deform_conv2d, tensors,
                                                           config))  # fmt: skip
    assert compiled.compile_failure() is None
    assert torch.isfinite(actual[0]).all()
    torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
    for name in expected[1]:
        assert torch.isfinite(actual[1][name]).all(), name
        torch.testing.assert_close(actual[1][name], expected[1][name], atol=1e-4, rtol=1e-5)


@needs_compiler
def test_compiled_dcnv3_matches_uncompiled():
    generator = torch.Generator().manual_seed(10)
    group, depth, points = 3, 5, 8  # remove_center: 8 points of a 3×3 kernel
    input = torch.randn(2, 7, 6, group * depth, generator=generator, requires_grad=True)
    offset = 2 * torch.randn(2, 4, 6, group * points * 2, generator=generator)
    mask = torch.rand(2, 4, 6, group * points, generator=generator)
    leaves = [input, offset.requires_grad_(), mask.requires_grad_()]

    def run():
        out = deformconv.dcnv3(input, offset, mask, (3, 3), stride=(2, 1), padding=(1, 1),
                               dilation=(1, 1), group=group, group_channels=depth,
                               offset_scale=0.7, remove_center=True)  # fmt: skip
        return out, *torch.autograd.grad(out.square().sum(), leaves)

    _assert_compiled_matches(run, {"columns", "corner_terms"})
