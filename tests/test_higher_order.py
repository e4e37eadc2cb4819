"""Derivatives beyond the kernels' first: double backward, forward mode, torch.func.

The backends compute first derivatives; the backward ops' own backward
(:mod:`deformconv._double_backward`) runs the ops again and :mod:`deformconv.composite` along
the offsets, and the composite serves forward mode along the offsets and stacked torch.func
transforms (single transforms on the ops: ``tests/test_transforms.py``).
Checked against finite differences (``gradcheck``, ``gradgradcheck``), against torch.func's
Hessian and against the backends' first derivatives.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import grad, jacfwd, jacrev, jvp, vjp, vmap

import deformconv
from cases import LOPSIDED, Config, call, make_inputs, needs_functions, strided_copy
from deformconv import _transforms, composite
from test_dcnv3 import CASES as DCNV3_CASES
from test_dcnv3 import make_inputs as dcnv3_inputs
from test_dcnv3 import op_args as dcnv3_op_args
from test_deform_conv3d import CONFIG as CONFIG_3D
from test_deform_conv3d import make_inputs as inputs_3d

# torch's forward-mode AD loads decompositions it scripts with torch.jit on first use.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

SMALL = Config(batch=2, channels=4, height=4, width=5, out_channels=4, weight_groups=2,
               offset_groups=2)  # fmt: skip
NAMES = ("input", "offset", "mask", "weight", "bias")


def _smooth_inputs(config: Config, seed: int = 0, dtype=torch.float64) -> dict:
    """Inputs whose sampling positions lie away from integers, where the interpolation has
    kinks that finite differences cannot follow."""
    tensors = make_inputs(config, dtype=dtype, seed=seed, requires_grad=False)
    offset = tensors["offset"]
    tensors["offset"] = (
        offset.round()
        + 0.2
        + 0.6
        * torch.rand(
            offset.shape, dtype=offset.dtype, generator=torch.Generator().manual_seed(seed)
        )
    )
    for tensor in tensors.values():
        if tensor is not None:
            tensor.requires_grad_()
    return tensors


def _conv2d(config: Config, names: tuple[str, ...], tensors: dict):
    """``deform_conv2d`` as a function of the tensors ``names``, the others fixed."""

    def function(*values):
        given = {**tensors, **dict(zip(names, values, strict=True))}
        return call(deformconv.deform_conv2d, given, config)

    return function


def _present(tensors: dict) -> tuple[str, ...]:
    return tuple(name for name in NAMES if tensors.get(name) is not None)


@pytest.mark.parametrize("name", ["straddling-groups", "no-mask-no-bias", "tall-kernel",
                                  "single-row-input", "batch-0"])  # fmt: skip
def test_composite_matches_the_backend(name):
    """The composite's output and first derivatives equal the torch backend's (float64),
    integer positions and the image's border included."""
    config = LOPSIDED[name]
    tensors = make_inputs(config, offsets="integer" if name == "tall-kernel" else "random")
    names = _present(tensors)
    leaves = [tensors[n] for n in names]
    expected = call(deformconv.deform_conv2d, tensors, config)
    args = (config.stride, config.padding, config.dilation)
    t = tensors
    got = composite.deform_conv(t["input"], t["offset"], t["mask"], t["weight"], t["bias"], *args)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    projection = torch.randn(expected.shape, dtype=expected.dtype)
    grads = torch.autograd.grad(expected, leaves, projection)
    composite_grads = torch.autograd.grad(got, leaves, projection)
    for n, want, have in zip(names, grads, composite_grads, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-11, atol=1e-11, msg=n)


def test_composite_on_strided_and_half_precision_inputs():
    """Views with gaps (NaN between the elements) give the same results; bfloat16 and
    float16 compute in float32."""
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, requires_grad=False)
    names = _present(tensors)
    args = (config.stride, config.padding, config.dilation)

    def run(given):
        t = given
        return composite.deform_conv(t["input"], t["offset"], t["mask"], t["weight"],
                                     t["bias"], *args)  # fmt: skip

    expected = run(tensors)
    strided = dict(tensors, **{n: strided_copy(tensors[n]) for n in names})
    torch.testing.assert_close(run(strided), expected, rtol=1e-12, atol=1e-12)
    for dtype, tolerance in [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)]:
        half = run({n: None if t is None else t.to(dtype) for n, t in tensors.items()})
        assert half.dtype == dtype
        rounded = run({n: None if t is None else t.to(dtype).double() for n, t in tensors.items()})
        error = (half.double() - rounded).norm() / rounded.norm()
        assert error <= tolerance, f"{dtype}: {error:.2e}"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_composite_samples_zero_at_non_finite_and_far_offsets(bad):
    """Like the backends: such a sample is 0 and every gradient stays finite."""
    config = LOPSIDED["straddling-groups"]
    tensors = _smooth_inputs(config)
    with torch.no_grad():
        tensors["offset"][0, 1, 0, 0] = bad
        tensors["offset"][1, 4, 1, 2] = bad
    names = _present(tensors)
    expected = call(deformconv.deform_conv2d, tensors, config)
    with forward_ad.dual_level():  # runs the composite
        dual = forward_ad.make_dual(tensors["input"], torch.ones_like(tensors["input"]))
        got = call(deformconv.deform_conv2d, dict(tensors, input=dual), config)
        got, tangent = forward_ad.unpack_dual(got)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert tangent.isfinite().all()
    grads = torch.autograd.grad(got.sum(), [tensors[n] for n in names])
    assert all(g.isfinite().all() for g in grads)


@pytest.mark.parametrize("config", [SMALL, Config(batch=1, channels=2, height=3, width=4,
                                                  out_channels=2, kernel=(2, 3), stride=(1, 2),
                                                  padding=(0, 1), dilation=(1, 1),
                                                  weight_groups=1, offset_groups=1,
                                                  use_mask=False)],
                         ids=["modulated-groups", "v1"])  # fmt: skip
def test_gradgradcheck(config):
    """Second derivatives of every pair of inputs against finite differences of the
    backend's first derivatives."""
    tensors = _smooth_inputs(config)
    names = _present(tensors)
    torch.autograd.gradgradcheck(_conv2d(config, names, tensors), [tensors[n] for n in names])


def test_forward_mode_and_batched_gradients():
    """``gradcheck`` of forward-mode AD and of vmapped backward passes."""
    tensors = _smooth_inputs(SMALL, seed=1)
    names = _present(tensors)
    torch.autograd.gradcheck(_conv2d(SMALL, names, tensors), [tensors[n] for n in names],
                             check_forward_ad=True, check_batched_grad=True,
                             check_batched_forward_grad=True)  # fmt: skip


def test_forward_ad_tangent_is_never_dropped():
    """A tangent on any one input reaches the output: equal to the vector-Jacobian route."""
    tensors = _smooth_inputs(SMALL, seed=2)
    names = _present(tensors)
    function = _conv2d(SMALL, names, tensors)
    primals = [tensors[n].detach() for n in names]
    for index, name in enumerate(names):
        tangents = [torch.zeros_like(p) for p in primals]
        tangents[index] = torch.randn_like(primals[index])
        with forward_ad.dual_level():
            duals = [forward_ad.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)]
            tangent = forward_ad.unpack_dual(function(*duals)).tangent
        assert tangent is not None, name
        cotangent = torch.randn_like(tangent)
        _, pullback = vjp(function, *primals)
        expected = (pullback(cotangent)[index] * tangents[index]).sum()
        torch.testing.assert_close((tangent * cotangent).sum(), expected, msg=name)


def test_torch_func_transforms():
    """grad, vjp, jacrev, jacfwd, vmap (also of grad) agree with autograd on the backend."""
    config = SMALL
    tensors = _smooth_inputs(config, seed=3)
    names = _present(tensors)
    function = _conv2d(config, names, tensors)
    primals = [tensors[n].detach() for n in names]
    out = function(*[tensors[n] for n in names])
    expected = torch.autograd.grad(out.square().sum(), [tensors[n] for n in names])

    gradients = grad(lambda *p: function(*p).square().sum(), argnums=tuple(range(len(names))))
    for n, want, have in zip(names, expected, gradients(*primals), strict=True):
        torch.testing.assert_close(have, want, msg=n)

    weight = names.index("offset")
    jacobian = jacrev(function, argnums=weight)(*primals)
    forward_jacobian = jacfwd(function, argnums=weight)(*primals)
    torch.testing.assert_close(forward_jacobian, jacobian)
    flat = jacobian.reshape(out.numel(), -1)
    pullback = vjp(function, *primals)[1]
    cotangent = torch.randn_like(out)
    torch.testing.assert_close(cotangent.reshape(-1) @ flat,
                               pullback(cotangent)[weight].reshape(-1))  # fmt: skip

    # vmap over a batch of problems, and per-sample gradients: one call per sample as oracle.
    batched = [p.unsqueeze(0).expand(3, *p.shape) * torch.linspace(0.5, 1.5, 3, dtype=p.dtype)
               .view(3, *[1] * p.dim()) for p in primals]  # fmt: skip
    outputs = vmap(function)(*batched)
    per_sample = vmap(grad(lambda *p: function(*p).square().sum()))(*batched)
    for i in range(3):
        sample = [b[i].clone().requires_grad_() for b in batched]
        result = function(*sample)
        torch.testing.assert_close(outputs[i], result.detach())
        torch.testing.assert_close(per_sample[i], torch.autograd.grad(
            result.square().sum(), sample[0])[0])  # fmt: skip


@needs_functions
def test_torch_func_under_torch_compile():
    """``torch.compile(torch.func.grad(f))`` traces the composite; a plain compiled call
    still holds the op."""
    tensors = _smooth_inputs(SMALL, seed=5)
    function = _conv2d(SMALL, ("input",), tensors)
    x = tensors["input"].detach()

    def loss(x):
        return function(x).square().sum()

    compiled = torch.compile(grad(loss), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), grad(loss)(x))
    graph = torch.export.export(_Wrapped(function), (x,)).graph_module.code
    assert "deformconv.deform_conv2d" in graph


class _Wrapped(torch.nn.Module):
    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.function(x)


def test_hessian_vector_product_of_a_layer():
    """``create_graph`` through a layer (a gradient penalty): the Hessian-vector product of
    the backend's graph equals the composite's."""
    torch.manual_seed(0)
    layer = deformconv.DeformableConv2d(4, 6, 3, padding=1, modulated=True).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    penalty = gx.square().sum()
    hvp = torch.autograd.grad(penalty, [x, layer.weight, layer.conv_offset.weight])

    params = dict(layer.named_parameters())

    def penalty_of(x, params):
        def loss(x):
            return torch.func.functional_call(layer, params, (x,)).square().sum()

        return grad(loss)(x).square().sum()

    expected = grad(penalty_of, argnums=(0, 1))(x.detach(), {k: v.detach() for k, v in
                                                              params.items()})  # fmt: skip
    torch.testing.assert_close(hvp[0], expected[0])
    torch.testing.assert_close(hvp[1], expected[1]["weight"])
    torch.testing.assert_close(hvp[2], expected[1]["conv_offset.weight"])


def test_3d_gradgradcheck_and_forward_mode():
    config = dict(CONFIG_3D, batch=1, channels=2, out_channels=2, size=(2, 3, 2),
                  padding=(1, 0, 1), offset_groups=1, weight_groups=2)  # fmt: skip
    tensors = inputs_3d(config, scale=1.0)
    tensors["offset"] = tensors["offset"].round() + 0.3
    leaves = [tensors[n].requires_grad_() for n in NAMES]
    args = {name: config[name] for name in ("stride", "padding", "dilation")}

    def function(input, offset, mask, weight, bias):
        return deformconv.deform_conv3d(input, offset, weight, bias, mask=mask, **args)

    torch.autograd.gradgradcheck(function, leaves)
    torch.autograd.gradcheck(
        function, leaves, check_forward_ad=True, check_backward_ad=False, fast_mode=True
    )


@pytest.mark.parametrize("name", ["lopsided", "remove-center"])
def test_dcnv3_composite_and_second_derivatives(name):
    case = dict(DCNV3_CASES[name], size=(3, 4) if name == "lopsided" else (4, 4), depth=2,
                group=2)  # fmt: skip
    tensors = dcnv3_inputs(case, batch=1)
    tensors["offset"] = tensors["offset"].round() + 0.35
    args = dcnv3_op_args(tensors, case)
    torch.testing.assert_close(composite.dcnv3(*args), torch.ops.deformconv.dcnv3(*args),
                               rtol=1e-12, atol=1e-12)  # fmt: skip
    empty = tuple(t[:0] for t in args[:3]) + args[3:]  # batch 0
    torch.testing.assert_close(composite.dcnv3(*empty), torch.ops.deformconv.dcnv3(*empty))
    leaves = [tensors[n].requires_grad_() for n in ("input", "offset", "mask")]
    settings = {"kernel_size": case["kernel"], "stride": case["stride"],
                "padding": case["padding"], "dilation": case["dilation"], "group": case["group"],
                "offset_scale": case["scale"], "remove_center": case["remove"]}  # fmt: skip

    def function(input, offset, mask):
        return deformconv.dcnv3(input, offset, mask, **settings)

    torch.autograd.gradgradcheck(function, leaves)
    torch.autograd.gradcheck(
        function, leaves, check_forward_ad=True, check_backward_ad=False, fast_mode=True
    )


def test_dcnv4_fused_layout_under_forward_mode_and_vmap():
    """DCNv4's fused tensor (its padding channels included) through the composite."""
    tensors = dcnv3_inputs(DCNV3_CASES["lopsided"], batch=2)
    group, points = 2, 6
    fused = torch.cat(
        [
            tensors["offset"].unflatten(-1, (group, 2 * points)),
            tensors["mask"].unflatten(-1, (group, points)),
        ],
        -1,
    ).flatten(-2)
    fused = torch.cat([fused, torch.randn(*fused.shape[:3], 5, dtype=fused.dtype)], -1)
    fused = fused.round() + 0.3
    settings = {"kernel_size": (3, 2), "stride": (1, 2), "padding": (2, 0), "dilation": (1, 2),
                "group": group, "offset_scale": 0.7}  # fmt: skip
    input = tensors["input"].requires_grad_()
    fused.requires_grad_()

    def function(input, fused):
        return deformconv.dcnv4(input, fused, **settings)

    torch.autograd.gradcheck(function, (input, fused), check_forward_ad=True,
                             check_backward_ad=False, fast_mode=True)  # fmt: skip
    batched = vmap(function)(input.detach()[:, None], fused.detach()[:, None])
    torch.testing.assert_close(batched[:, 0], function(input, fused).detach())


@needs_functions
def test_ordinary_calls_run_the_backends(composite_calls):
    """The composite runs only where needed: not for a plain call, its backward, a gradient
    penalty on the input, under no_grad, or for a tangent of input, mask or weight; it
    does for a tangent of the offsets and under stacked transforms
    (``tests/test_transforms.py`` has the rest)."""
    calls = composite_calls
    tensors = _smooth_inputs(SMALL)
    out = call(deformconv.deform_conv2d, tensors, SMALL)
    (grad_input,) = torch.autograd.grad(out.sum(), tensors["input"], create_graph=True)
    (out.sum() + grad_input.square().sum()).backward()
    with torch.no_grad():
        call(deformconv.deform_conv2d, tensors, SMALL)
    primals = {name: tensors[name].detach() for name in ("input", "offset")}

    def along(name):
        return lambda x: call(deformconv.deform_conv2d, dict(tensors, **{name: x}), SMALL)

    jvp(along("input"), (primals["input"],), (torch.ones_like(primals["input"]),))
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(primals["input"], torch.ones_like(primals["input"]))
        along("input")(dual)
    assert not calls
    jvp(along("offset"), (primals["offset"],), (torch.ones_like(primals["offset"]),))
    assert len(calls) == 1
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(primals["offset"], torch.ones_like(primals["offset"]))
        along("offset")(dual)
    assert len(calls) == 2
    grad(lambda x: grad(lambda x: along("input")(x).square().sum())(x).sum())(primals["input"])
    assert len(calls) == 3


def test_older_torch_runs_transforms_and_tangents_on_the_composite(monkeypatch, composite_calls):
    """Where the ops cannot run through autograd.Functions (PyTorch 2.4), every transform and
    every forward-mode tangent takes the composite, with the same results; plain calls and
    their backward still take the op."""
    monkeypatch.setattr(_transforms, "FUNCTIONS_SUPPORTED", False)
    calls = composite_calls
    tensors = _smooth_inputs(SMALL, seed=2)
    function = _conv2d(SMALL, ("input",), tensors)
    x = tensors["input"].detach()
    out = function(x.requires_grad_())
    (expected_grad,) = torch.autograd.grad(out.square().sum(), x)
    assert not calls
    torch.testing.assert_close(grad(lambda x: function(x).square().sum())(x), expected_grad)
    assert len(calls) == 1
    direction = torch.randn_like(x)
    _, tangent = jvp(function, (x,), (direction,))
    assert len(calls) == 2
    with forward_ad.dual_level():
        dual_tangent = forward_ad.unpack_dual(function(forward_ad.make_dual(x, direction))).tangent
    assert len(calls) == 3
    # The operator is linear in its input: J·u is the convolution of u without the bias.
    linear = call(deformconv.deform_conv2d, dict(tensors, input=direction, bias=None), SMALL)
    torch.testing.assert_close(tangent, linear.detach())
    torch.testing.assert_close(dual_tangent, linear.detach())
    batched = vmap(function)(torch.stack([x, direction]))
    torch.testing.assert_close(batched[0], out.detach())
    torch.testing.assert_close(batched[1], function(direction))
    assert len(calls) == 4


def test_third_derivatives():
    """The second derivatives are differentiable in turn: gradgradcheck of a gradient."""
    config = Config(batch=1, channels=2, height=3, width=4, out_channels=2, kernel=(2, 2),
                    stride=(1, 1), padding=(1, 0), dilation=(1, 2), weight_groups=1,
                    offset_groups=1, use_bias=False)  # fmt: skip
    tensors = _smooth_inputs(config, seed=4)
    names = ("input", "offset", "mask")
    function = _conv2d(config, names, tensors)

    def gradients(*values):
        return torch.autograd.grad(function(*values).square().sum(), values, create_graph=True)

    torch.autograd.gradgradcheck(gradients, [tensors[n] for n in names])


def test_hessians_of_the_op_and_of_torch_func_agree():
    """The offsets' Hessian by autograd through the backward ops equals torch.func's, which
    runs the composite alone."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 3, 4, dtype=torch.float64, generator=generator)
    weight = torch.randn(2, 1, 3, 2, dtype=torch.float64, generator=generator)
    offset = torch.randn(1, 12, 1, 4, dtype=torch.float64, generator=generator).round() + 0.4

    def loss(offset):
        out = deformconv.deform_conv2d(x, offset, weight, padding=(0, 1), dilation=(1, 2))
        return out.square().sum()

    hessian = torch.autograd.functional.hessian(loss, offset)
    torch.testing.assert_close(hessian, torch.func.hessian(loss)(offset))
    assert hessian.abs().sum() > 0
