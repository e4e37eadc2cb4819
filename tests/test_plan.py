"""The torch backends' padded table, sampling plan and corner scatter, piece by piece."""

from __future__ import annotations

import pytest
import torch

import deformconv
from deformconv.backends import gather
from deformconv.backends.gather import scatter_corners
from deformconv.backends.plan import Table
from reference import deform_conv2d_reference


def test_table_layout_in_2d_and_3d():
    flat = Table(planes=2, size=(3, 4))
    assert flat.padded == (5, 6)
    assert flat.strides == [6, 1]
    assert flat.deltas == [0, 1, 6, 7]
    assert (flat.dead, flat.rows) == (60, 68)
    assert flat.index_dtype == torch.int32
    volume = Table(planes=1, size=(2, 3, 4))
    assert volume.deltas == [0, 1, 6, 7, 30, 31, 36, 37]
    assert volume.rows == 4 * 5 * 6 + 38


def test_table_holds_the_input_inside_a_zero_border():
    table = Table(planes=6, size=(3, 4))
    grouped = torch.randn(2, 3, 4, 3, 5).transpose(2, 3)  # (N, G, H, W, D), not contiguous
    rows = table.fill(grouped, torch.float64)
    assert rows.shape == (table.rows, 5) and rows.dtype == torch.float64
    assert torch.equal(table.interior(rows).view(2, 3, 3, 4, 5), grouped.double())
    border = table.planes_of(rows).clone()
    border[:, 1:-1, 1:-1] = 0
    assert (border == 0).all() and (rows[table.dead :] == 0).all()
    # into a given buffer of any contents: the same table
    buffer = torch.full((table.rows, 5), float("nan"), dtype=torch.float64)
    assert table.fill(grouped, torch.float64, buffer) is buffer and torch.equal(buffer, rows)
    volume = Table(planes=2, size=(2, 3, 2))
    cells = torch.randn(2, 2, 3, 2, 4)
    buffer = torch.full((volume.rows, 4), float("nan"))
    assert torch.equal(volume.fill(cells, torch.float32, buffer), volume.fill(cells, torch.float32))


@pytest.mark.parametrize("path", ["dense", "wide", "spread", "sparse", "sparse-per-corner"])
@pytest.mark.parametrize("gap_rows", [1024, 1, 0], ids=["one-range", "split", "split-all"])
@pytest.mark.parametrize("share", [1, 3])
def test_scatter_corners_matches_a_loop_of_index_add(share, gap_rows, path, monkeypatch):
    """Dense: more bags than rows (a sorted gather per corner); a wide range (rows times
    channels), or bags spread over more rows than there are bags: every (bag, corner) pair
    sorted, one gather; sparse:
    far more rows than pairs (bag by bag on the CPU, all corners in one ``index_add_`` or,
    past its byte limit, one per corner).  As in the backends, skipped bags start at one dead
    row and no corner of the others reaches it."""
    span = {"dense": 40, "wide": 40, "spread": 400}.get(path, 4000)
    if path == "wide":
        monkeypatch.setattr(gather, "WIDE_RANGE", 2)
    if path == "sparse-per-corner":
        monkeypatch.setattr(gather, "ONE_ADD_BYTES", 0)
    monkeypatch.setattr(gather, "GAP_ROWS", gap_rows)
    taken = []

    def spy(name):
        original = getattr(gather, name)
        return lambda *args: taken.append(name) or original(*args)

    for name in ("_add_bag_by_bag", "_gather_pairs"):
        monkeypatch.setattr(gather, name, spy(name))
    generator = torch.Generator().manual_seed(0)
    bags, corners, depth, deltas = 60, 4, 5, [0, 1, 6, 7]
    skip_from = span + deltas[-1]
    first = torch.randint(0, span, (bags,), generator=generator, dtype=torch.int32)
    first[::7] = skip_from
    weights = torch.randn(bags, corners, generator=generator, dtype=torch.float64)
    grad = torch.randn(bags // share, depth, generator=generator, dtype=torch.float64)
    actual = torch.zeros(skip_from + deltas[-1] + 1, depth, dtype=torch.float64)
    scatter_corners(actual, first, deltas, weights, grad, share=share, skip_from=skip_from)
    expected = torch.zeros_like(actual)
    for b in range(bags):
        if first[b] < skip_from:
            for k, delta in enumerate(deltas):
                expected[first[b] + delta] += weights[b, k] * grad[b // share]
    # the rows from skip_from on are scratch space
    torch.testing.assert_close(actual[:skip_from], expected[:skip_from], atol=1e-12, rtol=0)
    paths = {"wide": "_gather_pairs", "spread": "_gather_pairs", "sparse": "_add_bag_by_bag",
             "sparse-per-corner": "_add_bag_by_bag"}  # fmt: skip
    assert taken == ([paths[path]] if path in paths else [])


def test_every_bag_skipped_leaves_the_gradient_alone():
    table_grad = torch.zeros(10, 2)
    scatter_corners(table_grad, torch.full((4,), 8, dtype=torch.int32), [0, 1],
                    torch.ones(4, 2), torch.ones(4, 2), share=1, skip_from=8)  # fmt: skip
    assert (table_grad == 0).all()


def test_positions_a_rounding_step_from_an_integer_take_the_exact_corner():
    """``base + Δ`` rounds to an integer in float32 where ``Δ`` is tiny: the corners, the
    border decision and the one-sided derivative follow the exact position, as in float64."""
    generator = torch.Generator().manual_seed(1)
    input = torch.randn(1, 2, 5, 5, generator=generator)
    weight = torch.randn(1, 2, 3, 3, generator=generator)
    offset = torch.zeros(1, 18, 5, 5)
    offset[0, 0, 0, 0] = -1e-9  # tap (0, 0) at output (0, 0): y just below -1, no corner
    offset[0, 8, 2, 2] = -1e-9  # centre tap at output (2, 2): y just below 2
    offset[0, 17, 3, 4] = -1e-7  # tap (2, 2) at output (3, 4): x just below 5, one corner
    offset[0, 0, 1, 3] = -1e-9  # tap (0, 0) at output (1, 3): y just below 0, corners -1, 0
    mask = torch.rand(1, 9, 5, 5, generator=generator)
    tensors = [t.clone().requires_grad_(True) for t in (input, offset, weight, mask)]
    out = deformconv.deform_conv2d(tensors[0], tensors[1], tensors[2], padding=1,
                                   mask=tensors[3])  # fmt: skip
    grad_out = torch.randn(out.shape, generator=generator)
    grads = torch.autograd.grad(out, tensors, grad_out)
    exact = [t.detach().double().requires_grad_(True) for t in (input, offset, weight, mask)]
    expected = deform_conv2d_reference(exact[0], exact[1], exact[2], padding=(1, 1),
                                       mask=exact[3])  # fmt: skip
    expected_grads = torch.autograd.grad(expected, exact, grad_out.double())
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
    for actual, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual.double(), reference, atol=1e-5, rtol=1e-5)
    assert grads[1][0, 0, 0, 0] == 0  # no corner inside: no derivative
    assert grads[1][0, 17, 3, 4] != 0  # one corner inside: a derivative


def test_torch_backend_gradients_are_bit_identical_across_runs():
    generator = torch.Generator().manual_seed(2)
    input = torch.randn(2, 8, 9, 7, generator=generator, requires_grad=True)
    offset = (3 * torch.randn(2, 2 * 4 * 9, 9, 7, generator=generator)).requires_grad_(True)
    weight = torch.randn(4, 8, 3, 3, generator=generator, requires_grad=True)
    runs = []
    for _ in range(2):
        out = deformconv.deform_conv2d(input, offset, weight, padding=1)
        runs.append(torch.autograd.grad(out.square().sum(), (input, offset, weight)))
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


def test_cached_and_fresh_grids_give_the_same_results():
    from deformconv.backends import plan

    generator = torch.Generator().manual_seed(3)
    input = torch.randn(2, 6, 7, 5, generator=generator, requires_grad=True)
    offset = (2 * torch.randn(2, 2 * 3 * 6, 4, 6, generator=generator)).requires_grad_(True)
    weight = torch.randn(4, 3, 3, 2, generator=generator, requires_grad=True)

    def run():
        out = deformconv.deform_conv2d(input, offset, weight, stride=(2, 1), padding=(1, 1))
        return out, *torch.autograd.grad(out.square().sum(), (input, offset, weight))

    plan._grid_cache.clear()
    fresh = run()
    assert len(plan._grid_cache) > 0
    for first, second in zip(fresh, run(), strict=True):  # the second run from the cache
        assert torch.equal(first, second)


def test_grid_cache_stays_within_its_budget(monkeypatch):
    """Least recently used grids leave first; grids over a quarter of the budget are not kept."""
    from deformconv._geometry import geometry
    from deformconv.backends import plan

    geo = geometry(torch.empty(1, 4, 9, 9), torch.empty(1, 18, 9, 9), torch.empty(2, 4, 3, 3),
                   (1, 1), (1, 1), (1, 1))  # fmt: skip
    one = plan._nbytes(plan._grid(geo, 0, 9, None, False, torch.device("cpu")))
    monkeypatch.setattr(plan, "GRID_CACHE_BYTES", 4 * one + 1)
    plan._grid_cache.clear()
    try:
        for start in range(0, 81, 9):
            plan.grid_of(geo, start, 9, torch.device("cpu"))
            assert plan._grid_cache.nbytes <= plan.GRID_CACHE_BYTES
        assert len(plan._grid_cache) == 4
        assert (geo, 0, 9, None, False, torch.device("cpu")) not in plan._grid_cache._grids
        again = plan.grid_of(geo, 72, 9, torch.device("cpu"))  # the most recent: kept
        assert torch.equal(again.first, plan._grid(geo, 72, 9, None, False, again.first.device)[0])
        plan.grid_of(geo, 0, 18, torch.device("cpu"))  # twice the size: over a quarter
        assert len(plan._grid_cache) == 4
    finally:
        plan._grid_cache.clear()


@pytest.mark.parametrize("size", [100, 6000, 20000, 2**15])
def test_stable_sort_pads_mid_sized_keys_to_the_same_result(size):
    generator = torch.Generator().manual_seed(size)
    keys = torch.randint(0, 3000, (size,), generator=generator, dtype=torch.int32)
    keys[-5:] = torch.iinfo(torch.int32).max - 1
    values, order = gather._stable_sort(keys)
    expected_values, expected_order = torch.sort(keys, stable=True)
    assert torch.equal(values, expected_values) and torch.equal(order, expected_order)


def test_int64_rows_give_the_same_results(monkeypatch):
    """Tables of 2**31 rows or more take int64 row numbers: forced here on a small input."""
    from deformconv.backends import plan

    generator = torch.Generator().manual_seed(5)
    input = torch.randn(2, 6, 7, 5, generator=generator, requires_grad=True)
    offset = (2 * torch.randn(2, 2 * 3 * 6, 4, 6, generator=generator)).requires_grad_(True)
    mask = torch.rand(2, 3 * 6, 4, 6, generator=generator, requires_grad=True)
    weight = torch.randn(4, 3, 3, 2, generator=generator, requires_grad=True)

    def run():
        out = deformconv.deform_conv2d(input, offset, weight, stride=(2, 1), padding=(1, 1),
                                       mask=mask)  # fmt: skip
        return out, *torch.autograd.grad(out.square().sum(), (input, offset, mask, weight))

    narrow = run()
    monkeypatch.setattr(plan.Table, "index_dtype", property(lambda self: torch.int64))
    plan._grid_cache.clear()
    try:
        wide = run()
    finally:
        plan._grid_cache.clear()
    for first, second in zip(narrow, wide, strict=True):
        torch.testing.assert_close(first, second, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("index", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_corner_sums_and_dots_match_the_fused_gathers(index, dtype):
    """The sparse products for the corners of single samples: the same sums as
    ``embedding_bag`` (into a buffer whose NaNs they ignore) and the same dot products."""
    generator = torch.Generator().manual_seed(2)
    table = torch.randn(30, 7, generator=generator, dtype=dtype)
    first = torch.randint(0, 20, (11,), generator=generator)
    rows = (first[:, None] + torch.tensor([0, 1, 6, 7])).to(index)
    weights = torch.randn(11, 4, generator=generator, dtype=dtype)
    grad = torch.randn(11, 7, generator=generator, dtype=dtype)
    out = torch.full((11, 7), float("nan"), dtype=dtype)
    assert gather.corner_sums(table, rows, weights, out) is out
    torch.testing.assert_close(out, gather.weighted_rows(table, rows, weights))
    torch.testing.assert_close(gather.corner_sums(table, rows, weights), out)
    torch.testing.assert_close(gather.corner_dots(grad, table, rows),
                               gather.row_dots(grad, table, rows))  # fmt: skip
    none = rows[:0]
    assert gather.corner_sums(table, none, weights[:0]).shape == (0, 7)
    assert gather.corner_dots(grad[:0], table, none).shape == (0, 4)


@pytest.mark.parametrize("size", [3000, 20000, 50000])
@pytest.mark.parametrize("spread", [1000, 2**15 - 2, 2**15 - 1, 10**6])
def test_stable_sort_of_keys_matches_torch_sort(size, spread):
    """Padded to the fast size or not, on 16-bit keys where their range allows or not."""
    generator = torch.Generator().manual_seed(size + spread)
    keys = (torch.randint(0, spread, (size,), generator=generator) + 7).to(torch.int32)
    keys[0], keys[-1] = 7, 7 + spread - 1  # the whole range
    values, order = gather._stable_sort(keys)
    expected_values, expected_order = torch.sort(keys, stable=True)
    assert values.dtype == keys.dtype
    assert torch.equal(values, expected_values) and torch.equal(order, expected_order)
