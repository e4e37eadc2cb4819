"""dcnv3 / dcnv4 and their layers against the float64 loop reference of DCNv3's definition."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import deformconv
from cases import deterministic_algorithms, needs_kernels, strided_copy
from dcnv3_reference import dcnv3_reference, points

# Lopsided settings: pad_h != pad_w, non-square kernels, stride and dilation per axis,
# offset_scale != 1, remove_center, channels per group not a power of two.
CASES = {
    "lopsided": {"size": (6, 7), "kernel": (3, 2), "stride": (1, 2), "padding": (2, 0),
                 "dilation": (1, 2), "group": 2, "depth": 3, "scale": 0.7, "remove": False},
    "remove-center": {"size": (5, 6), "kernel": (3, 5), "stride": (2, 1), "padding": (1, 2),
                      "dilation": (2, 1), "group": 3, "depth": 5, "scale": 1.0, "remove": True},
    "one-group-1x1": {"size": (4, 3), "kernel": (1, 1), "stride": (1, 1), "padding": (0, 1),
                      "dilation": (1, 1), "group": 1, "depth": 6, "scale": 2.0,
                      "remove": False},
    # more channels per group than one kernel block holds (64): blocks along the channels
    "wide-groups": {"size": (3, 4), "kernel": (1, 3), "stride": (1, 1), "padding": (0, 1),
                    "dilation": (1, 1), "group": 2, "depth": 70, "scale": 1.0, "remove": False},
}  # fmt: skip


def _out_size(case):
    return tuple(
        (n + 2 * p - d * (k - 1) - 1) // s + 1
        for n, k, s, p, d in zip(case["size"], case["kernel"], case["stride"], case["padding"],
                                 case["dilation"], strict=True)
    )  # fmt: skip


def make_inputs(case, batch=2, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    group, count = case["group"], len(points(*case["kernel"], case["remove"]))
    out = _out_size(case)
    channels = group * case["depth"]
    offset = torch.randn(batch, *out, group * count * 2, generator=generator) * 1.5
    offset[..., ::4] = offset[..., ::4].round()  # integer positions too
    return {
        "input": torch.randn(batch, *case["size"], channels, generator=generator).to(dtype),
        "offset": offset.to(dtype),
        "mask": torch.rand(batch, *out, group * count, generator=generator).to(dtype),
    }


def _args(case):
    return {"kernel_size": case["kernel"], "stride": case["stride"], "padding": case["padding"],
            "dilation": case["dilation"], "group": case["group"],
            "offset_scale": case["scale"], "remove_center": case["remove"]}  # fmt: skip


def op_args(tensors, case):
    """Arguments of the registered op: offsets and mask with the groups split out."""
    args = _args(case)
    return (tensors["input"], tensors["offset"].unflatten(-1, (case["group"], -1)),
            tensors["mask"].unflatten(-1, (case["group"], -1)), list(args["kernel_size"]),
            list(args["stride"]), list(args["padding"]), list(args["dilation"]), args["group"],
            args["offset_scale"], args["remove_center"])  # fmt: skip


def _reference(tensors, case):
    return dcnv3_reference(tensors["input"], tensors["offset"], tensors["mask"], case["kernel"],
                           case["stride"], case["padding"], case["dilation"], case["group"],
                           case["scale"], case["remove"])  # fmt: skip


def _check_against_reference(tensors, case, dtype=torch.float64, tolerance=1e-10,
                             layout=lambda tensor: tensor):  # fmt: skip
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    expected = _reference(leaves, case)
    grad = torch.randn_like(expected)
    expected_grads = [torch.zeros_like(leaf) for leaf in leaves.values()]
    if expected.requires_grad:  # not when every sample falls outside the input
        used = torch.autograd.grad(expected, list(leaves.values()), grad, allow_unused=True)
        expected_grads = [g if g is not None else z for g, z in zip(used, expected_grads,
                                                                    strict=True)]  # fmt: skip
    ours_leaves = {k: layout(v.detach().to(dtype)).requires_grad_() for k, v in tensors.items()}
    ours = deformconv.dcnv3(ours_leaves["input"], ours_leaves["offset"], ours_leaves["mask"],
                            **_args(case))  # fmt: skip
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance)
    ours_grads = torch.autograd.grad(ours, list(ours_leaves.values()), grad.to(dtype))
    for name, leaf in ours_leaves.items():  # the op writes none of its inputs
        torch.testing.assert_close(leaf.detach(), tensors[name].to(dtype), rtol=0, atol=0,
                                   equal_nan=True, msg=name)  # fmt: skip
    for name, mine, theirs in zip(leaves, ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(mine.double(), theirs, rtol=tolerance, atol=tolerance,
                                   msg=name)  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.usefixtures("cpu_gathers")
def test_torch_backend_matches_reference(name):
    with deformconv.use_backend("torch"):
        _check_against_reference(make_inputs(CASES[name]), CASES[name])


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernels_match_reference(name):
    needs_kernels()
    with deformconv.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch would warn
        _check_against_reference(make_inputs(CASES[name]), CASES[name], torch.float32, 1e-4)


@pytest.mark.parametrize(
    ("backend", "dtype", "tolerance"),
    [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)],
)
def test_strided_unaligned_inputs(backend, dtype, tolerance):
    """Every input a view with doubled strides at an unaligned address, NaN in between."""
    if backend == "triton":
        needs_kernels()
    case = CASES["lopsided"]
    with deformconv.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch would warn
        _check_against_reference(make_inputs(case), case, dtype, tolerance, strided_copy)


def test_triton_launches_are_made_on_the_inputs_device(monkeypatch):
    needs_kernels()
    from deformconv.kernels import dcnv3_ops

    devices = []
    real = dcnv3_ops.launching_on
    monkeypatch.setattr(dcnv3_ops, "launching_on",
                        lambda device: devices.append(device) or real(device))  # fmt: skip
    case = CASES["lopsided"]
    tensors = {k: v.float().requires_grad_() for k, v in make_inputs(case).items()}
    with deformconv.use_backend("triton"):
        out = deformconv.dcnv3(tensors["input"], tensors["offset"], tensors["mask"], **_args(case))
        out.sum().backward()
    assert devices == [tensors["input"].device] * 2  # the forward, then the backward


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_triton_kernels_in_half_precision(dtype, tolerance):
    needs_kernels()
    case = CASES["lopsided"]
    tensors = make_inputs(case)
    expected = _reference(tensors, case)
    with deformconv.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        half = {k: v.to(dtype) for k, v in tensors.items()}
        ours = deformconv.dcnv3(half["input"], half["offset"], half["mask"], **_args(case))
    assert ours.dtype == dtype
    error = (ours.double() - expected).norm() / expected.norm()
    assert error < tolerance


def test_gradcheck():
    case = {**CASES["lopsided"], "size": (3, 4), "depth": 2}
    tensors = make_inputs(case, batch=1)
    tensors["offset"] = tensors["offset"] + 0.05  # off the integers, where gradients jump
    leaves = tuple(t.requires_grad_() for t in tensors.values())
    with deformconv.use_backend("torch"):
        assert torch.autograd.gradcheck(
            lambda i, o, m: deformconv.dcnv3(i, o, m, **_args(case)), leaves, eps=1e-6, atol=1e-6
        )


def test_zero_offsets_and_uniform_mask_average_the_window():
    x = torch.randn(2, 7, 8, 12)
    offset = torch.zeros(2, 7, 8, 4 * 9 * 2)
    mask = torch.full((2, 7, 8, 4 * 9), 1 / 9)
    out = deformconv.dcnv3(x, offset, mask, 3, padding=1, group=4)
    mean = F.avg_pool2d(x.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, mean, rtol=1e-5, atol=1e-6)


def test_border_offset_gradient_follows_dcnv3():
    """At the initial state (zero offsets, padding (k-1)/2) the border points sit exactly at
    -1, which DCNv3 does not sample: their offset gradient is 0."""
    x = torch.randn(1, 4, 4, 2)
    offset = torch.zeros(1, 4, 4, 9 * 2, requires_grad=True)
    mask = torch.ones(1, 4, 4, 9)
    deformconv.dcnv3(x, offset, mask, 3, padding=1).sum().backward()
    # pixel (0, 0), point 0 = (row 0, column 0): both coordinates at -1
    assert offset.grad[0, 0, 0, 0] == 0 and offset.grad[0, 0, 0, 1] == 0
    assert offset.grad[0, 1, 1].abs().sum() > 0


@pytest.mark.parametrize(
    ("backend", "dtype", "tolerance"),
    [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)],
)
def test_dcnv4_reads_the_fused_layout(backend, dtype, tolerance):
    if backend == "triton":
        needs_kernels()
    case = {**CASES["remove-center"]}
    tensors = make_inputs(case)
    group, count = case["group"], len(points(*case["kernel"], True))
    fused = torch.randn(*tensors["mask"].shape[:3], 3 * group * count + 5, dtype=torch.float64)
    reference_fused = fused.clone().requires_grad_()
    per_group = reference_fused[..., : 3 * group * count].unflatten(-1, (group, 3 * count))
    offset = per_group[..., : 2 * count].flatten(-2)
    mask = per_group[..., 2 * count :].flatten(-2)
    leaves = {"input": tensors["input"].clone().requires_grad_(), "offset": offset, "mask": mask}
    expected = _reference(leaves, case)
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [leaves["input"], reference_fused], grad)
    x = tensors["input"].to(dtype).requires_grad_()
    fused = fused.to(dtype).requires_grad_()
    with deformconv.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch would warn
        ours = deformconv.dcnv4(x, fused, **_args(case))
        grads = torch.autograd.grad(ours, [x, fused], grad.to(dtype))
    torch.testing.assert_close(ours.double(), expected, rtol=tolerance, atol=tolerance)
    for actual, wanted in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual.double(), wanted, rtol=tolerance, atol=tolerance)
    assert (grads[1][..., 3 * group * count :] == 0).all()  # the padding is not read


@pytest.mark.parametrize(
    "settings",
    [{"BLOCK_Q": 16, "BLOCK_D": 4}, {"BLOCK_Q": 16, "BLOCK_D": 4, "index64": True}],
    ids=["narrow-blocks", "64-bit-indexing"],
)
def test_triton_tile_sizes_and_64_bit_indexing(settings, monkeypatch):
    """Channel blocks narrower than a group (several per group: 5 channels in blocks of 4)
    and 64-bit element offsets give the same results."""
    needs_kernels()
    from deformconv.kernels import dcnv3_ops

    settings = dict(settings)
    if settings.pop("index64", False):
        monkeypatch.setattr(dcnv3_ops, "needs_int64", lambda *tensors: True)
    monkeypatch.setitem(dcnv3_ops.CONFIG_OVERRIDES, "forward", settings)
    monkeypatch.setitem(dcnv3_ops.CONFIG_OVERRIDES, "backward", settings)
    for name in ("lopsided", "remove-center"):
        with deformconv.use_backend("triton"), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            _check_against_reference(make_inputs(CASES[name]), CASES[name], torch.float32, 1e-4)


@pytest.mark.overflow_checks
@pytest.mark.parametrize("depth", [4, 16])
def test_triton_forward_reads_whole_channel_blocks_unmasked(depth):
    """Channels per group that fill the kernel's channel blocks (its loads take no mask):
    corners on every border, rows past the last pixel, non-finite offsets."""
    needs_kernels()
    case = {**CASES["lopsided"], "depth": depth, "group": 3}
    tensors = make_inputs(case, batch=3, dtype=torch.float32)
    tensors["offset"][0, 0, :, :2] = math.nan
    tensors["offset"][-1, -1, :, -2:] = -math.inf
    tensors["offset"][1, :, 0, 4:6] = torch.tensor([-0.5, 7.5])  # ends of the image
    expected = _reference({k: v.double() for k, v in tensors.items()}, case)
    with deformconv.use_backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = deformconv.dcnv3(tensors["input"], tensors["offset"], tensors["mask"],
                               **_args(case))  # fmt: skip
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_dcnv4_offset_mask_channels_match_the_original_layer():
    assert deformconv.dcnv4_offset_mask_channels(4, 3) == 112  # ceil(4·9·3 / 8)·8
    assert deformconv.dcnv4_offset_mask_channels(4, 3, remove_center=True) == 96
    assert deformconv.dcnv4_offset_mask_channels(3, (5, 3)) == 136


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_batch_zero_and_non_contiguous(backend):
    if backend == "triton":
        needs_kernels()
    case = CASES["lopsided"]
    tensors = make_inputs(case, dtype=torch.float32)
    with deformconv.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to torch would warn
        expected = deformconv.dcnv3(tensors["input"], tensors["offset"], tensors["mask"],
                                    **_args(case))  # fmt: skip
        # Input and mask with every other channel; offsets with their pixels in column-major
        # order, so that no single stride steps through them (the kernels copy both first).
        strided = {k: torch.cat([v, v], dim=-1)[..., ::2] for k, v in tensors.items()}
        strided["offset"] = tensors["offset"].transpose(1, 2).contiguous().transpose(1, 2)
        for key in strided:
            strided[key].copy_(tensors[key])
        ours = deformconv.dcnv3(strided["input"], strided["offset"], strided["mask"],
                                **_args(case))  # fmt: skip
        torch.testing.assert_close(ours, expected)
        # One mask for the whole batch, expanded (stride 0 over the images).
        shared = tensors["mask"][:1].expand_as(tensors["mask"])
        ours = deformconv.dcnv3(tensors["input"], tensors["offset"], shared, **_args(case))
        expected = deformconv.dcnv3(tensors["input"], tensors["offset"], shared.contiguous(),
                                    **_args(case))  # fmt: skip
        torch.testing.assert_close(ours, expected)
        for deterministic in (False, True):
            empty = {k: v[:0].requires_grad_() for k, v in tensors.items()}
            out = deformconv.dcnv3(empty["input"], empty["offset"], empty["mask"],
                                   **_args(case))  # fmt: skip
            assert out.shape == (0, *expected.shape[1:])
            with deterministic_algorithms(deterministic):
                out.sum().backward()
            assert empty["input"].grad.shape == empty["input"].shape


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"input": torch.zeros(2, 6, 7)}, ValueError, r"input must be a 4-D tensor, got 3-D"),
        ({"group_channels": 4}, ValueError,
         r"input has 6 channels \(last axis\), expected group \* group_channels = 2 \* 4 = 8"),
        ({"offset": torch.zeros(2, 8, 3, 23)}, ValueError,
         r"offset has shape \(2, 8, 3, 23\), expected \(2, 8, 3, 24\)"),
        ({"mask": torch.zeros(2, 8, 3, 11)}, ValueError,
         r"mask has shape \(2, 8, 3, 11\), expected \(2, 8, 3, 12\)"),
        ({"remove_center": True}, ValueError, r"remove_center needs odd kernel sizes, got "
         r"kernel_size \(3, 2\)"),
        ({"mask": None}, TypeError, r"mask must be a Tensor, got NoneType"),
        ({"input": torch.zeros(2, 6, 7, 0)}, ValueError,
         r"input has 0 channels \(last axis\) for 2 groups: every group needs at least one"),
        ({"kernel_size": 1, "remove_center": True}, ValueError,
         r"remove_center leaves no point of kernel_size \(1, 1\)"),
        ({"offset": torch.zeros(2, 8, 3, 24, dtype=torch.float64)}, TypeError,
         r"offset has dtype torch.float64, expected input's dtype torch.float32"),
        ({"stride": 0}, ValueError, r"stride must be positive, got \(0, 0\)"),
    ],
)  # fmt: skip
def test_errors(change, error, message):
    case = CASES["lopsided"]
    args = {**make_inputs(case, dtype=torch.float32), **_args(case), **change}
    with pytest.raises(error, match=message):
        deformconv.dcnv3(**args)


def test_dcnv4_errors():
    x = torch.zeros(1, 5, 5, 8)
    with pytest.raises(
        ValueError,
        match=r"offset_mask has shape \(1, 5, 5, 53\), expected "
        r"\(1, 5, 5, M\) with M >= 3 \* group \* points = 54",
    ):
        deformconv.dcnv4(x, torch.zeros(1, 5, 5, 53), 3, padding=1, group=2)  # fmt: skip


def test_opcheck_and_compile():
    case = CASES["lopsided"]
    tensors = {k: v.float().requires_grad_() for k, v in make_inputs(case).items()}
    with deformconv.use_backend("torch"):
        torch.library.opcheck(torch.ops.deformconv.dcnv3.default, op_args(tensors, case))
        torch._dynamo.reset()
        layer = deformconv.DCNv4(channels=12, group=3)
        with torch.no_grad():
            layer.offset_mask.weight.normal_(std=0.1)
        x = torch.randn(2, 25, 12, requires_grad=True)
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), layer(x))
        compiled(x).sum().backward()
        assert x.grad is not None and layer.offset_mask.weight.grad is not None


def test_benchmark_baseline_agrees_and_the_benchmark_runs(tmp_path, capsys):
    from deformconv import cli
    from deformconv.bench.dcnv3 import grid_sample_dcnv4

    x = torch.randn(2, 9, 11, 12, dtype=torch.float64)
    fused = torch.randn(2, 9, 11, deformconv.dcnv4_offset_mask_channels(3), dtype=torch.float64)
    expected = deformconv.dcnv4(x, fused, 3, padding=1, group=3)
    torch.testing.assert_close(grid_sample_dcnv4(x, fused, 3), expected)
    out = tmp_path / "rows.csv"
    assert cli.main(["bench", "--dcnv3", "--", "--quick", "--device", "cpu", "--repeats", "1",
                     "--csv", str(out)]) == 0  # fmt: skip
    assert "| N=2 14×14 G=4 D=32 | cpu | fp32 | fwd+bwd | grid_sample |" in capsys.readouterr().out
    assert out.read_text().startswith("shape,device,dtype,mode,impl,ms,floor_ms,x_floor")


@pytest.mark.overflow_checks
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -1e30])
def test_non_finite_and_far_offsets_sample_zero(backend, bad):
    if backend == "triton":
        needs_kernels()
    case = CASES["lopsided"]
    tensors = make_inputs(case, dtype=torch.float32)
    tensors["offset"][..., :2] = bad  # point 0 of group 0, both coordinates
    leaves = {k: v.requires_grad_() for k, v in tensors.items()}
    with deformconv.use_backend(backend):
        out = deformconv.dcnv3(leaves["input"], leaves["offset"], leaves["mask"], **_args(case))
        out.sum().backward()
    assert torch.isfinite(out).all()
    for leaf in leaves.values():
        assert torch.isfinite(leaf.grad).all()
    assert (leaves["offset"].grad[..., :2] == 0).all() and (leaves["mask"].grad[..., 0] == 0).all()


def test_triton_deterministic_mode_sums_in_fixed_point():
    needs_kernels()
    case = CASES["remove-center"]
    tensors = make_inputs(case)
    grad = None
    results = []
    for deterministic in (False, True, True):
        leaves = {k: v.float().requires_grad_() for k, v in tensors.items()}
        with deterministic_algorithms(deterministic), deformconv.use_backend("triton"):
            out = deformconv.dcnv3(leaves["input"], leaves["offset"], leaves["mask"],
                                   **_args(case))  # fmt: skip
            grad = torch.randn_like(out) if grad is None else grad
            results.append(torch.autograd.grad(out, list(leaves.values()), grad))
    for float_path, fixed_point in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(fixed_point, float_path, rtol=1e-5, atol=1e-5)
    # The input gradient took the other path: its exact sums round differently somewhere.
    assert not torch.equal(results[0][0], results[1][0])
    for first, second in zip(results[1], results[2], strict=True):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("backend", "dtype", "tolerance"),
    [("torch", torch.float64, 1e-10), ("triton", torch.float32, 1e-4)],
)
@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(0, 2),
    size=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    kernel=st.sampled_from([(1, 1), (1, 3), (3, 1), (3, 3), (2, 3), (3, 5)]),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    group=st.integers(1, 3),
    depth=st.integers(1, 3),
    scale=st.sampled_from([0.5, 1.0, 1.5]),
    remove=st.booleans(),
    seed=st.integers(0, 2**16),
    strided=st.booleans(),
    deterministic=st.booleans(),
)
def test_random_configurations(backend, dtype, tolerance, batch, size, kernel, stride, padding,
                               dilation, group, depth, scale, remove, seed, strided,
                               deterministic):  # fmt: skip
    if backend == "triton":
        needs_kernels()
    removable = kernel[0] % 2 == 1 and kernel[1] % 2 == 1 and kernel != (1, 1)
    case = {"size": size, "kernel": kernel, "stride": stride, "padding": padding,
            "dilation": dilation, "group": group, "depth": depth, "scale": scale,
            "remove": remove and removable}  # fmt: skip
    if min(_out_size(case)) <= 0:
        return
    layout = strided_copy if strided else lambda tensor: tensor
    with deterministic_algorithms(deterministic and backend == "triton"):
        with deformconv.use_backend(backend):
            _check_against_reference(make_inputs(case, batch=batch, seed=seed), case, dtype,
                                     tolerance, layout)  # fmt: skip
