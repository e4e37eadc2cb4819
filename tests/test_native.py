"""The C corner loops of the torch backend on the CPU: against plain loops, bit for bit
whatever the number of threads, odd rows skipped, no access past a tensor (under
AddressSanitizer), and a clean fallback where they do not build.  (The convolution tests run
both with them and without: the ``cpu_gathers`` fixture.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deformconv
from cases import LOPSIDED, assert_falls_back_once, make_inputs, output_and_grads
from deformconv.backends import compiled, native

needs_native = pytest.mark.skipif(
    not native.runs_here(), reason="the C corner loops do not build here"
)
DELTAS = [0, 1, 7, 8]  # the corners of a plane 7 rows wide


def _bags(dtype, index, bags=300, rows=60, depth=11, seed=0):
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(rows, depth, generator=generator, dtype=torch.float64).to(dtype)
    first = torch.randint(0, rows - DELTAS[-1], (bags,), generator=generator).to(index)
    weights = torch.rand(bags, len(DELTAS), generator=generator, dtype=torch.float64).to(dtype)
    return table, first, weights, generator


def _loop_sums(table, first, weights, bag):
    out = torch.zeros(first.shape[0] // bag, table.shape[1], dtype=torch.float64)
    for b in range(first.shape[0]):
        for k, delta in enumerate(DELTAS):
            out[b // bag] += weights[b, k].double() * table[int(first[b]) + delta].double()
    return out


def _loop_grads(table, first, weights, grad, share, skip_from):
    table_grad = torch.zeros(table.shape, dtype=torch.float64)
    dots = torch.zeros(weights.shape, dtype=torch.float64)
    for b in range(first.shape[0]):
        row = grad[b // share].double()
        for k, delta in enumerate(DELTAS):
            target = int(first[b]) + delta
            dots[b, k] = table[target].double() @ row
            if first[b] < skip_from:
                table_grad[target] += weights[b, k].double() * row
    return table_grad, dots


@needs_native
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bag", [1, 3])
def test_sums_match_a_plain_loop(dtype, index, bag):
    table, first, weights, _ = _bags(dtype, index)
    out = torch.full((first.shape[0] // bag, table.shape[1]), float("nan"), dtype=dtype)
    assert native.corner_sums(table, first, weights, DELTAS, out, bag=bag) is out
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), _loop_sums(table, first, weights, bag),
                               atol=tolerance, rtol=tolerance)  # fmt: skip


@needs_native
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("share", [1, 4])
def test_dots_and_input_gradient_match_a_plain_loop(dtype, index, share):
    table, first, weights, generator = _bags(dtype, index)
    grad = torch.randn(first.shape[0] // share, table.shape[1], generator=generator).to(dtype)
    skip_from = 40  # bags from row 40 on give dots but no input gradient
    table_grad = torch.zeros_like(table)
    dots = native.corner_grads(table, first, weights, DELTAS, grad, share=share,
                               skip_from=skip_from, dots=True, table_grad=table_grad)  # fmt: skip
    expected_grad, expected_dots = _loop_grads(table, first, weights, grad, share, skip_from)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(table_grad.double(), expected_grad, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(dots.double(), expected_dots, atol=tolerance, rtol=tolerance)
    # Either part alone.
    alone = torch.zeros_like(table)
    none = native.corner_grads(table, first, weights, DELTAS, grad, share=share,
                               skip_from=skip_from, dots=False, table_grad=alone)  # fmt: skip
    assert none is None
    assert torch.equal(alone, table_grad)
    only_dots = native.corner_grads(table, first, weights, DELTAS, grad, share=share,
                                    skip_from=skip_from, dots=True, table_grad=None)  # fmt: skip
    assert torch.equal(only_dots, dots)


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_results_do_not_depend_on_the_number_of_threads(monkeypatch, threads):
    """Every table row is summed by one thread, in the bags' order: bit-identical."""
    table, first, weights, generator = _bags(torch.float32, torch.int32, bags=2000, depth=24)
    grad = torch.randn(2000, 24, generator=generator)
    out = torch.empty(2000, 24)

    def run():
        table_grad = torch.zeros_like(table)
        dots = native.corner_grads(table, first, weights, DELTAS, grad, share=1, skip_from=60,
                                   dots=True, table_grad=table_grad)  # fmt: skip
        native.corner_sums(table, first, weights, DELTAS, out)
        return table_grad, dots, out.clone()

    monkeypatch.setattr(native, "WORK_PER_THREAD", 1)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = run()
        torch.set_num_threads(threads)
        actual = run()
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(actual, expected, strict=True):
        assert torch.equal(a, b)


@needs_native
def test_rows_outside_the_table_are_skipped():
    """The backend never makes such rows; the loops still read and write nothing outside
    the table: such bags sum to 0, give 0 dot products and no gradient."""
    table, first, weights, generator = _bags(torch.float64, torch.int64, bags=6)
    first[1], first[3], first[4] = -1, table.shape[0] - DELTAS[-1], 2**40
    grad = torch.randn(6, table.shape[1], generator=generator, dtype=torch.float64)
    out = torch.empty(6, table.shape[1], dtype=torch.float64)
    native.corner_sums(table, first, weights, DELTAS, out)
    table_grad = torch.zeros_like(table)
    dots = native.corner_grads(table, first, weights, DELTAS, grad, share=1, skip_from=10**6,
                               dots=True, table_grad=table_grad)  # fmt: skip
    odd = torch.tensor([1, 3, 4])
    assert (out[odd] == 0).all() and (dots[odd] == 0).all()
    kept = torch.tensor([0, 2, 5])
    expected_grad, expected_dots = _loop_grads(table, first[kept], weights[kept], grad[kept], 1,
                                               10**6)  # fmt: skip
    torch.testing.assert_close(table_grad, expected_grad)
    torch.testing.assert_close(dots[kept], expected_dots)


@needs_native
def test_mismatched_tensors_are_refused():
    table, first, weights, _ = _bags(torch.float32, torch.int32)
    out = torch.empty(first.shape[0], table.shape[1], dtype=torch.float64)
    with pytest.raises(TypeError, match="mismatched"):
        native.corner_sums(table, first, weights, DELTAS, out)
    with pytest.raises(TypeError, match="mismatched"):
        native.corner_sums(table, first.float(), weights, DELTAS, out.float())
    with pytest.raises(TypeError, match="mismatched shapes"):  # one row short
        native.corner_sums(table, first, weights, DELTAS, out.float()[1:])
    grad = torch.zeros(first.shape[0] - 1, table.shape[1])
    with pytest.raises(TypeError, match="mismatched shapes"):
        native.corner_grads(table, first, weights, DELTAS, grad, share=1, skip_from=0,
                            table_grad=torch.zeros_like(table))  # fmt: skip


def test_the_switch():
    """``set_cpu_compile`` turns the loops off with the rest; ``DEFORMCONV_COMPILE=native``
    (what the tests run with) keeps them and turns Inductor off."""
    try:
        deformconv.set_cpu_compile(False)
        assert not compiled.native_enabled() and not native.runs_here()
        deformconv.set_cpu_compile(True)
        assert compiled.native_enabled() and compiled.compile_enabled()
    finally:
        deformconv.set_cpu_compile(None)
    assert compiled.native_enabled() and not compiled.compile_enabled()
    assert not native.available(torch.empty(1, 1, dtype=torch.float16))
    assert not native.available(torch.empty(1, 1, device="meta"))


def test_a_failed_build_warns_once_and_uses_tensor_operations(monkeypatch, tmp_path):
    def no_compiler():
        raise RuntimeError("no C compiler found here")

    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, dtype=torch.float32, seed=3)
    monkeypatch.setattr(compiled, "_native", False)
    expected = output_and_grads(deformconv.deform_conv2d, tensors, config)
    monkeypatch.setattr(compiled, "_native", True)
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    monkeypatch.setattr(native, "_compiler", no_compiler)
    monkeypatch.setenv(native.CACHE_VAR, str(tmp_path))  # nothing built there yet
    assert_falls_back_once(lambda: output_and_grads(deformconv.deform_conv2d, tensors, config),
                           expected, match="no C compiler found here")  # fmt: skip
    assert "no C compiler found here" in native.failure()
    assert not native.runs_here()


@needs_native
def test_the_library_is_built_once_and_then_loaded(monkeypatch, tmp_path):
    built = native._build(tmp_path)
    assert built.exists() and built.parent == tmp_path
    assert [path.name for path in tmp_path.iterdir()] == [built.name]  # no temporaries left

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native.subprocess, "run", no_compiling)
    assert native._build(tmp_path) == built


def test_a_compiler_error_is_reported(monkeypatch, tmp_path):
    broken = tmp_path / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match=r"failed|no C compiler"):
        native._build(tmp_path / "cache")


@needs_native
def test_the_convolution_runs_the_loops(monkeypatch):
    """Forward and backward go through the loops (the ``cpu_gathers`` tests' "native" runs
    test them, not the tensor operations)."""
    calls = []
    for name in ("sample_sums", "sample_plan", "corner_grads", "corner_sums"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name, **k: calls.append(_n)
                            or _f(*a, **k))  # fmt: skip
    config = LOPSIDED["straddling-groups"]
    output_and_grads(deformconv.deform_conv2d, make_inputs(config), config)
    # The forward plans inside its sums; the backward plans, then forms every gradient and
    # the weight gradient's columns in one pass.
    assert calls == ["sample_sums", "sample_plan", "corner_grads"]


def _grid_and_offsets(dims: int, dtype, strict: bool = False, seed: int = 5):
    """A lopsided 2-D or 3-D geometry's grid and offsets of every kind: random, integer,
    far outside, NaN and infinite."""
    from deformconv._geometry import geometry
    from deformconv.backends.plan import grid_of

    generator = torch.Generator().manual_seed(seed)
    size, kernel = ((5, 7), (3, 2)) if dims == 2 else ((3, 4, 5), (2, 2, 3))
    stride, padding, dilation = (2, 1, 1)[:dims], (1, 0, 2)[:dims], (1, 2, 1)[:dims]
    input = torch.empty(2, 6, *size)
    weight = torch.empty(4, 6, *kernel)
    axes = zip(size, padding, dilation, kernel, stride, strict=True)
    out_size = [(s + 2 * p - d * (k - 1) - 1) // t + 1 for s, p, d, k, t in axes]
    taps = weight[0, 0].numel()
    offset = torch.empty(2, 3 * taps * dims, *out_size)
    geo = geometry(input, offset, weight, stride, padding, dilation)
    grid = grid_of(geo, 0, geo.pixels, torch.device("cpu"), groups_first=True)
    samples = grid.first.shape[0]
    offsets = 3 * torch.randn(samples, dims, generator=generator, dtype=torch.float64)
    offsets[::7] = offsets[::7].round()
    offsets[1::11, 0] = float("nan")
    offsets[2::13, -1] = float("inf")
    offsets[3::17, 0] = -1e30
    masks = torch.rand(samples, generator=generator, dtype=torch.float64).to(dtype)
    return grid, offsets.to(dtype), masks, geo


@needs_native
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plan_is_the_tensor_plan_bit_for_bit(dtype, dims, masked, strict):
    from deformconv.backends.plan import plan_from_grid

    grid, offsets, masks, _ = _grid_and_offsets(dims, dtype, strict)
    masks = masks if masked else None
    first, weights, fractions = native.sample_plan(offsets, masks, grid, strict)
    expected = plan_from_grid(offsets, grid, strict)
    expected_weights = expected.weights if masks is None else expected.weights * masks[:, None]
    assert (first == grid.dead).any() and (first != grid.dead).any()  # both kinds occur
    assert torch.equal(first, expected.first)
    assert torch.equal(weights, expected_weights)
    assert torch.equal(fractions, torch.stack([high for _, high in expected.pairs], dim=1))


@needs_native
@pytest.mark.parametrize("dims", [2, 3])
def test_planned_sums_and_terms_match_the_tensor_operations(dims):
    """The sums planned on the way equal those of the plan; the mask and position gradients
    equal those of dot_terms from the tensor path's dot products."""
    from deformconv.backends import compiled as tensor_terms
    from deformconv.backends.gather import row_dots
    from deformconv.backends.plan import corner_deltas, table_of

    grid, offsets, masks, geo = _grid_and_offsets(dims, torch.float64)
    layout = table_of(geo)
    generator = torch.Generator().manual_seed(1)
    table = torch.randn(layout.rows, 2, generator=generator, dtype=torch.float64)
    table[layout.dead :] = 0
    first, weights, fractions = native.sample_plan(offsets, masks, grid)
    deltas = corner_deltas(grid.strides)
    out = torch.empty(first.shape[0], 2, dtype=torch.float64)
    planned = native.sample_sums(table, offsets, masks, grid, out.clone())
    assert torch.equal(planned, native.corner_sums(table, first, weights, deltas, out))
    grad = torch.randn(first.shape[0], 2, generator=generator, dtype=torch.float64)
    columns = torch.full_like(out, float("nan"))
    mask_grad = torch.full((first.shape[0],), float("nan"), dtype=torch.float64)
    position_grad = torch.full((first.shape[0], dims), float("nan"), dtype=torch.float64)
    dots = native.corner_grads(
        table, first, weights, deltas, grad, share=1, skip_from=layout.dead, table_grad=None,
        dots=True, fractions=fractions, masks=masks, mask_grad=mask_grad,
        position_grad=position_grad, columns=columns,
    )  # fmt: skip
    assert torch.equal(columns, planned)  # the weight gradient's columns, on the way
    rows = first[:, None] + torch.tensor(deltas)
    torch.testing.assert_close(dots, row_dots(grad, table, rows), rtol=1e-12, atol=1e-12)
    expected = tensor_terms.dot_terms(dots, fractions, masks)
    torch.testing.assert_close(mask_grad, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(position_grad, expected[1], rtol=1e-12, atol=1e-12)
    alone = torch.full_like(position_grad, float("nan"))  # either one alone
    native.corner_grads(table, first, weights, deltas, grad, share=1, skip_from=layout.dead,
                        table_grad=None, fractions=fractions, masks=masks,
                        position_grad=alone)  # fmt: skip
    assert torch.equal(alone, position_grad)


def test_info_says_how_the_cpu_samples(monkeypatch):
    from deformconv import cli

    monkeypatch.setattr(compiled, "_native", False)
    text = cli._cpu_sampling()
    assert text.startswith("tensor operations (DEFORMCONV_COMPILE=0 or set_cpu_compile(False))")
    assert "the plan uncompiled" in text  # conftest: DEFORMCONV_COMPILE=native
    monkeypatch.setattr(compiled, "_native", True)
    monkeypatch.setattr(native, "runs_here", lambda: False)
    monkeypatch.setattr(native, "_failure", "RuntimeError: no C compiler found")
    assert "building the C loops failed: RuntimeError: no C compiler" in cli._cpu_sampling()


@needs_native
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("name", ["straddling-groups", "tall-kernel", "batch-3", "1x1-kernel"])
def test_every_gradient_on_several_threads_matches_the_reference(monkeypatch, name, threads):
    """The backend's calls split over threads (however small), forward and every gradient
    against the float64 reference, and bit for bit what one thread gives."""
    from reference import deform_conv2d_reference

    config = LOPSIDED[name]
    tensors = make_inputs(config, seed=2)
    expected = output_and_grads(deform_conv2d_reference, tensors, config)
    monkeypatch.setattr(native, "WORK_PER_THREAD", 1)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = output_and_grads(deformconv.deform_conv2d, tensors, config)
        torch.set_num_threads(threads)
        split = output_and_grads(deformconv.deform_conv2d, tensors, config)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(split[0], expected[0], atol=1e-10, rtol=0)
    assert torch.equal(split[0], alone[0])
    for key in expected[1]:
        torch.testing.assert_close(split[1][key], expected[1][key], atol=1e-10, rtol=0, msg=key)
        assert torch.equal(split[1][key], alone[1][key]), key


@needs_native
def test_an_unwritable_cache_falls_back_to_a_temporary_directory(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(native.CACHE_VAR, str(blocker / "cache"))  # mkdir fails there
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(native, "_library", None)
    monkeypatch.setattr(native, "_failure", None)
    assert native.runs_here() and native.failure() is None
    assert len(list((tmp_path / "tmp").glob("deformconv-*/corners-*.so"))) == 1


@needs_native
def test_samples_of_more_than_three_axes_are_refused():
    grid, offsets, masks, _ = _grid_and_offsets(2, torch.float64)
    wide = grid._replace(bases=[*grid.bases, *grid.bases], sizes=grid.sizes * 2,
                         reaches=grid.reaches * 2, strides=grid.strides * 2)  # fmt: skip
    with pytest.raises(ValueError, match="1 to 3 axes, got 4"):
        native.sample_plan(torch.cat([offsets, offsets], 1), masks, wide)


def _sanitizer_runtime() -> str | None:
    """The AddressSanitizer runtime of the C compiler the loops build with, where it has one
    (Linux, where it can be preloaded into Python)."""
    if not sys.platform.startswith("linux") or not native.runs_here():
        return None
    command = [*native._compiler(), "-print-file-name=libasan.so"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    path = result.stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _workload_under_sanitizer(cache, *args) -> subprocess.CompletedProcess:
    """``tests/asan_workload.py`` with the loops compiled under AddressSanitizer."""
    runtime = _sanitizer_runtime()
    if runtime is None:
        pytest.skip("no AddressSanitizer runtime for the C compiler here")
    env = {**os.environ, "DEFORMCONV_CACHE": str(cache), compiled.ENV_VAR: "native",
           "CC": " ".join([*native._compiler(), "-fsanitize=address", "-fno-omit-frame-pointer"]),
           "LD_PRELOAD": runtime, "ASAN_OPTIONS": "detect_leaks=0"}  # fmt: skip
    script = Path(__file__).with_name("asan_workload.py")
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_the_loops_stay_inside_their_tensors_under_address_sanitizer(tmp_path):
    """Odd inputs (one-pixel images, NaN, infinite and far offsets, chunks of one position,
    2-D, 3-D and DCNv3, two threads), forward and backward: no access past a tensor."""
    result = _workload_under_sanitizer(tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "calls, forward and backward, on the C loops" in result.stdout


def test_address_sanitizer_catches_a_loop_that_runs_past_its_row(tmp_path):
    """The same workload on loops whose 2-D sample sums write one value past each output row
    (which the results alone do not show: the next row overwrites it)."""
    source = native.SOURCE.read_text()
    loop = "for (int64_t c = 0; c < n; ++c) out[c] = w0 * r0[c]"
    assert source.count(loop) == 1
    bad = tmp_path / "corners.c"
    bad.write_text(source.replace(loop, loop.replace("c < n", "c <= n")))
    result = _workload_under_sanitizer(tmp_path / "cache", bad)
    assert result.returncode != 0
    assert "AddressSanitizer: heap-buffer-overflow" in result.stderr
