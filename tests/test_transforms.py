"""torch.func transforms and forward-mode AD on the ops (:mod:`deformconv._transforms`).

One differentiating transform (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``jacfwd``), with any
``vmap`` around or inside it, runs the ops and their backward ops through autograd.Functions,
and ``vmap`` runs each op once through its batching rule (:mod:`deformconv._batching`); the
composite serves only the derivative along the offsets in forward mode and stacked
differentiating transforms.  Every result is compared with ordinary autograd on the ops, one
problem at a time, in float64 on lopsided settings.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import deformconv
from cases import LOPSIDED, make_inputs, needs_functions, needs_kernels, strided_copy
from deformconv import _transforms, composite
from test_dcnv3 import CASES as DCNV3_CASES
from test_dcnv3 import make_inputs as dcnv3_inputs
from test_deform_conv3d import CONFIG as CONFIG_3D
from test_deform_conv3d import make_inputs as inputs_3d

pytestmark = [
    needs_functions,
    # A vmap that falls back to a loop over the op warns so: every op has a batching rule.
    pytest.mark.filterwarnings("error:There is a performance drop"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
]

CONFIG = LOPSIDED["straddling-groups"]  # kernel 3x2, stride/padding/dilation all different
NAMES = ("input", "offset", "mask", "weight", "bias")


def _conv(x, offset, mask, weight, bias):
    return deformconv.deform_conv2d(x, offset, weight, bias, mask=mask, **CONFIG.conv_args)


def _loss(*args):
    return _conv(*args).square().sum()


def _primals(seed: int = 0, batch: int | None = None) -> list[torch.Tensor]:
    config = CONFIG if batch is None else type(CONFIG)(**{**CONFIG.__dict__, "batch": batch})
    tensors = make_inputs(config, seed=seed, requires_grad=False)
    return [tensors[name] for name in NAMES]


def _autograd(function, primals, cotangent=None):
    """Output and gradients of every primal by ordinary autograd on the op."""
    leaves = [p.detach().clone().requires_grad_() for p in primals]
    out = function(*leaves)
    grads = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
    return out.detach(), grads


def _assert_all_close(actual, expected, names=NAMES):
    for name, have, want in zip(names, actual, expected, strict=True):
        torch.testing.assert_close(have, want, msg=name)


def test_grad_vjp_and_jacrev_run_the_kernels(composite_calls):
    primals = _primals()
    _, expected = _autograd(_loss, primals)
    _assert_all_close(grad(_loss, argnums=tuple(range(5)))(*primals), expected)

    out, pullback = vjp(_conv, *primals)
    cotangent = torch.randn_like(out)
    _assert_all_close(pullback(cotangent), _autograd(_conv, primals, cotangent)[1])

    for index in (1, 3):  # offset, weight
        jacobian = jacrev(_conv, argnums=index)(*primals)
        flat = jacobian.reshape(out.numel(), -1)
        torch.testing.assert_close(cotangent.reshape(-1) @ flat,
                                   pullback(cotangent)[index].reshape(-1))  # fmt: skip
    assert not composite_calls


@pytest.mark.parametrize("name", NAMES)
def test_jvp_along_each_input(name, composite_calls):
    """⟨J·u, v⟩ = ⟨u, Jᵀ·v⟩ for a tangent on one input at a time, with torch.func.jvp and
    with forward_ad; only the offsets' tangent calls the composite."""
    primals = _primals(seed=1)
    index = NAMES.index(name)
    tangents = [torch.zeros_like(p) for p in primals]
    tangents[index] = torch.randn_like(primals[index])

    def along(value):
        return _conv(*primals[:index], value, *primals[index + 1 :])

    out, tangent = jvp(along, (primals[index],), (tangents[index],))
    cotangent = torch.randn_like(out)
    expected = (_autograd(_conv, primals, cotangent)[1][index] * tangents[index]).sum()
    torch.testing.assert_close((tangent * cotangent).sum(), expected)
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(primals[index], tangents[index])
        dual_tangent = forward_ad.unpack_dual(along(dual)).tangent
    torch.testing.assert_close(dual_tangent, tangent)
    assert composite_calls == (["deform_conv"] * 2 if name == "offset" else [])


def test_jacfwd_equals_jacrev(composite_calls):
    primals = _primals(seed=2)
    for index in (0, 2, 3, 4):  # input, mask, weight, bias: the kernels alone
        torch.testing.assert_close(jacfwd(_conv, argnums=index)(*primals),
                                   jacrev(_conv, argnums=index)(*primals))  # fmt: skip
    assert not composite_calls


def test_per_sample_gradients(composite_calls):
    """vmap(grad): every sample's gradients of everything, the weights' too (the batching
    rule turns the problems into weight groups), and of input and bias alone (into the
    batch, with a bias gradient per problem)."""
    samples = 3
    primals = _primals(seed=3, batch=1)
    batched = [p.unsqueeze(0) * torch.linspace(0.5, 1.5, samples, dtype=p.dtype).view(
        samples, *[1] * p.dim()) for p in primals]  # fmt: skip
    everything = vmap(grad(_loss, argnums=tuple(range(5))))(*batched)
    data_and_bias = vmap(grad(_loss, argnums=(0, 4)), in_dims=(0, 0, 0, None, None))(
        *batched[:3], *primals[3:]
    )
    for i in range(samples):
        _, expected = _autograd(_loss, [b[i] for b in batched])
        _assert_all_close([g[i] for g in everything], expected)
        _, expected = _autograd(_loss, [b[i] for b in batched[:3]] + primals[3:])
        _assert_all_close([g[i] for g in data_and_bias], [expected[0], expected[4]],
                          names=("input", "bias"))  # fmt: skip
    assert not composite_calls


@pytest.mark.parametrize(
    "in_dims",
    [(0, None, None, None, None), (None, 0, 0, None, None), (None, None, None, 0, 0),
     (1, 2, None, 0, None), (0, 0, 0, 0, 0)],
    ids=["input", "offset-mask", "ensemble", "mixed-dims", "all"],
)  # fmt: skip
def test_vmap_is_one_call_per_op(in_dims, composite_calls, monkeypatch):
    """vmap over any of the tensors, at any position, equals a loop, forward and backward,
    on strided inputs too; the op runs once."""
    samples = 2
    primals = _primals(seed=4)
    batched = []
    for index, p in enumerate(primals):
        dim = in_dims[index]
        if dim is None:
            batched.append(p)
            continue
        stacked = torch.stack([p * (1 + 0.5 * i) for i in range(samples)], dim)
        batched.append(strided_copy(stacked) if index == 0 else stacked)
    calls = []
    original = deformconv._library.deform_conv2d_op

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(deformconv._library, "deform_conv2d_op", counting)
    out = vmap(_conv, in_dims=in_dims)(*batched)
    assert len(calls) == 1

    def select(i):
        return [p if d is None else p.select(d, i) for p, d in zip(batched, in_dims, strict=True)]

    cotangent = torch.randn_like(out)
    pullback = vjp(lambda *b: vmap(_conv, in_dims=in_dims)(*b), *batched)[1]
    grads = pullback(cotangent)
    expected_grads = [torch.zeros_like(p) for p in batched]
    for i in range(samples):
        want, sample_grads = _autograd(_conv, select(i), cotangent[i])
        torch.testing.assert_close(out[i], want)
        for index, g in enumerate(sample_grads):
            dim = in_dims[index]
            if dim is None:
                expected_grads[index] += g
            else:
                expected_grads[index].select(dim, i).copy_(g)
    _assert_all_close(grads, expected_grads)
    assert not composite_calls


def test_many_problems_fold_into_groups_over_several_calls(monkeypatch):
    """Problems folded into groups take one call per GROUPS_PER_CALL groups: here 2 weight
    and 3 offset groups a problem, 6 groups a call, so 5 problems take calls of 2, 2 and 1;
    the results equal a loop."""
    monkeypatch.setattr(deformconv._batching, "GROUPS_PER_CALL", 6)
    counts = {"forward": 0, "backward": 0}
    backend = deformconv.backends.pytorch
    for name in counts:
        original = getattr(backend, name)

        def counting(*args, _name=name, _original=original):
            counts[_name] += 1
            return _original(*args)

        monkeypatch.setattr(backend, name, counting)
    samples = 5
    primals = _primals(seed=9, batch=1)
    batched = [torch.stack([p * (1 + 0.25 * i) for i in range(samples)]) for p in primals]
    per_sample = vmap(grad(_loss, argnums=tuple(range(5))))(*batched)
    assert counts == {"forward": 3, "backward": 3}
    for i in range(samples):
        _, expected = _autograd(_loss, [b[i] for b in batched])
        _assert_all_close([g[i] for g in per_sample], expected)


def test_batched_cotangents_of_ordinary_autograd(composite_calls):
    """``autograd.grad(..., is_grads_batched=True)`` and ``jacobian(vectorize=True)`` vmap the
    backward op over the cotangents alone: its batching rule, equal to one call each."""
    primals = _primals(seed=10, batch=1)
    leaves = [p.clone().requires_grad_() for p in primals]
    out = _conv(*leaves)
    cotangents = torch.randn(3, *out.shape, dtype=out.dtype)
    batched = torch.autograd.grad(out, leaves, cotangents, is_grads_batched=True,
                                  retain_graph=True)  # fmt: skip
    for i in range(3):
        _assert_all_close([g[i] for g in batched], _autograd(_conv, primals, cotangents[i])[1])
    vectorized = torch.autograd.functional.jacobian(_conv, tuple(primals), vectorize=True)
    for have, want in zip(vectorized, torch.autograd.functional.jacobian(_conv, tuple(primals)),
                          strict=True):  # fmt: skip
        torch.testing.assert_close(have, want)
    assert not composite_calls


def test_vmap_without_mask_and_over_an_empty_batch(composite_calls):
    primals = _primals(seed=5)
    x, offset, _, weight, bias = primals
    batched_offset = torch.stack([offset, offset.flip(0)])
    out = vmap(lambda o: deformconv.deform_conv2d(x, o, weight, **CONFIG.conv_args))(batched_offset)
    for i in range(2):
        torch.testing.assert_close(out[i], deformconv.deform_conv2d(
            x, batched_offset[i], weight, **CONFIG.conv_args))  # fmt: skip
    empty = [p[:0] if name in ("input", "offset", "mask") else p
             for p, name in zip(_primals(seed=5), NAMES, strict=True)]  # fmt: skip
    grads = vmap(grad(_loss, argnums=(0, 3)), in_dims=(None, None, None, 0, None))(
        *empty[:3], torch.stack([weight, weight]), bias
    )
    assert grads[0].shape == (2, *empty[0].shape) and not grads[1].any()
    # A vmap over an empty dimension: no problem, results of the right shapes.
    none = [p.unsqueeze(0)[:0] for p in primals]
    assert vmap(_conv)(*none).shape == (0, *_conv(*primals).shape)
    for in_dims in [(0, 0, 0, 0, 0), (0, None, None, None, None)]:
        args = [n if d == 0 else p for n, p, d in zip(none, primals, in_dims, strict=True)]
        grads = vmap(grad(_loss, argnums=tuple(range(5))), in_dims=in_dims)(*args)
        assert [g.shape for g in grads] == [(0, *p.shape) for p in primals]
    dcnv3_args = [t.unsqueeze(0)[:0] for t in dcnv3_inputs(DCNV3_CASES["lopsided"]).values()]
    settings = {"kernel_size": (3, 2), "group": 2, "stride": (1, 2), "padding": (2, 0),
                "dilation": (1, 2), "offset_scale": 0.7}  # fmt: skip
    assert vmap(lambda *t: deformconv.dcnv3(*t, **settings))(*dcnv3_args).shape[0] == 0
    assert not composite_calls


def test_vmap_inside_a_forward_ad_level(composite_calls):
    """A vmap over dual tensors (forward_ad's level, not torch.func.jvp's): tangents of the
    offsets and of the input, equal to torch.func.jvp one problem at a time."""
    x, offset, _, weight, _ = _primals(seed=8)
    batched = {"input": torch.stack([x, -x]), "offset": torch.stack([offset, 0.5 * offset])}
    for name in ("offset", "input"):
        tangent = torch.randn_like(batched[name])
        with forward_ad.dual_level():
            given = dict(batched, **{name: forward_ad.make_dual(batched[name], tangent)})
            out = vmap(lambda x, o: deformconv.deform_conv2d(x, o, weight, **CONFIG.conv_args))(
                given["input"], given["offset"]
            )
            got = forward_ad.unpack_dual(out).tangent
        for i in range(2):

            def along(value, i=i, name=name):
                args = {k: v[i] for k, v in batched.items()} | {name: value}
                return deformconv.deform_conv2d(args["input"], args["offset"], weight,
                                                **CONFIG.conv_args)  # fmt: skip

            want = jvp(along, (batched[name][i],), (tangent[i],))[1]
            torch.testing.assert_close(got[i], want, msg=name)
    assert composite_calls


def test_stacked_transforms_along_the_offsets(composite_calls):
    """grad of grad (the composite throughout) and jvp of grad (the Hessian-vector product
    torch.func recommends: the ops, with the composite's derivatives along the offsets) equal
    autograd's double backward through the ops."""
    primals = _primals(seed=6)
    vector = torch.randn_like(primals[1])

    def offset_loss(offset):
        return _loss(primals[0], offset, *primals[2:])

    leaf = primals[1].clone().requires_grad_()
    (first,) = torch.autograd.grad(offset_loss(leaf), leaf, create_graph=True)
    (expected,) = torch.autograd.grad(first, leaf, vector)
    assert not composite_calls or set(composite_calls) == {"deform_conv"}
    torch.testing.assert_close(jvp(grad(offset_loss), (primals[1],), (vector,))[1], expected)
    penalty = grad(lambda o: grad(offset_loss)(o).mul(vector).sum())(primals[1])
    torch.testing.assert_close(penalty, expected)
    assert composite_calls


def _composite_loss(x, offset, mask, weight, bias):
    conv = (CONFIG.stride, CONFIG.padding, CONFIG.dilation)
    return composite.deform_conv(x, offset, mask, weight, bias, *conv).square().sum()


def _hvp(loss, primals, vectors, indices):
    """The Hessian-vector product of ``loss`` in the ``primals`` at ``indices`` (the others
    fixed) with those ``vectors``: torch.func's ``jvp`` of ``grad``."""

    def partial(*chosen):
        args = list(primals)
        for i, value in zip(indices, chosen, strict=True):
            args[i] = value
        return loss(*args)

    def gradient(*chosen):
        return grad(partial, argnums=tuple(range(len(chosen))))(*chosen)

    return jvp(gradient, tuple(primals[i] for i in indices),
               tuple(vectors[i] for i in indices))[1]  # fmt: skip


@pytest.mark.parametrize("names", [("input",), ("mask",), ("weight",),
                                   ("input", "mask", "weight", "bias"), NAMES])  # fmt: skip
def test_hessian_vector_products(names, composite_calls):
    """jvp of grad along input, mask, weight and bias runs the ops and their backward ops
    alone (the backward ops' tangents), equal to the composite's Hessian-vector product;
    where the offsets vary too, the composite runs it."""
    primals = _primals(seed=7)
    vectors = [torch.randn_like(p) for p in primals]
    indices = [NAMES.index(name) for name in names]
    actual = _hvp(_loss, primals, vectors, indices)
    assert composite_calls == (["deform_conv"] if "offset" in names else [])
    expected = _hvp(_composite_loss, primals, vectors, indices)
    _assert_all_close(actual, expected, [NAMES[i] for i in indices])


@pytest.mark.skipif(not _transforms.HESSIANS_SUPPORTED, reason="PyTorch 2.5 runs the composite")
def test_hessian_runs_the_kernels(composite_calls):
    """torch.func.hessian (jacfwd of jacrev: vmap over jvp of vjp) of the weight and of the
    input: the ops and their backward ops, equal to autograd's double backward through them
    and to the composite's Hessian."""
    primals = _primals(seed=8, batch=1)
    for index in (3, 0):  # weight, input

        def loss(value, index=index, function=_loss):
            return function(*primals[:index], value, *primals[index + 1 :])

        composite_calls.clear()  # the composite's own Hessian of the round before
        actual = hessian(loss)(primals[index])
        assert not composite_calls
        expected = torch.autograd.functional.hessian(loss, primals[index])
        torch.testing.assert_close(actual, expected)
        torch.testing.assert_close(
            actual, hessian(lambda v, index=index: loss(v, index, _composite_loss))(primals[index])
        )


def test_3d_under_transforms(composite_calls):
    tensors = inputs_3d(dict(CONFIG_3D, batch=1))
    primals = [tensors[name] for name in NAMES]
    args = {name: CONFIG_3D[name] for name in ("stride", "padding", "dilation")}

    def loss(x, offset, mask, weight, bias):
        return deformconv.deform_conv3d(x, offset, weight, bias, mask=mask, **args).square().sum()

    _, expected = _autograd(loss, primals)
    _assert_all_close(grad(loss, argnums=tuple(range(5)))(*primals), expected)
    batched = [torch.stack([p, 0.5 * p]) for p in primals]
    per_sample = vmap(grad(loss, argnums=(0, 3)))(*batched)
    for i in range(2):
        _, want = _autograd(loss, [b[i] for b in batched])
        _assert_all_close([g[i] for g in per_sample], [want[0], want[3]], ("input", "weight"))
    assert not composite_calls
    vectors = [torch.randn_like(p) for p in primals]  # a Hessian-vector product
    actual = _hvp(loss, primals, vectors, (0, 2, 3, 4))
    assert not composite_calls
    conv = [args["stride"], args["padding"], args["dilation"]]

    def composite_loss(x, offset, mask, weight, bias):
        return composite.deform_conv(x, offset, mask, weight, bias, *conv).square().sum()

    _assert_all_close(
        actual,
        _hvp(composite_loss, primals, vectors, (0, 2, 3, 4)),
        [NAMES[i] for i in (0, 2, 3, 4)],
    )


@pytest.mark.parametrize("fused", [False, True], ids=["dcnv3", "dcnv4"])
def test_dcnv3_and_dcnv4_under_transforms(fused, composite_calls):
    case = DCNV3_CASES["lopsided"]
    tensors = dcnv3_inputs(case, batch=2)
    settings = {"kernel_size": case["kernel"], "stride": case["stride"],
                "padding": case["padding"], "dilation": case["dilation"], "group": case["group"],
                "offset_scale": case["scale"]}  # fmt: skip
    if fused:
        group, points = case["group"], case["kernel"][0] * case["kernel"][1]
        fused_tensor = torch.cat(
            [
                tensors["offset"].unflatten(-1, (group, 2 * points)),
                tensors["mask"].unflatten(-1, (group, points)),
            ],
            -1,
        )
        padding = torch.zeros(*fused_tensor.shape[:3], 4, dtype=fused_tensor.dtype)
        primals = [tensors["input"], torch.cat([fused_tensor.flatten(-2), padding], -1)]

        def function(x, offset_mask):
            return deformconv.dcnv4(x, offset_mask, **settings)
    else:
        primals = [tensors["input"], tensors["offset"], tensors["mask"]]

        def function(x, offset, mask):
            return deformconv.dcnv3(x, offset, mask, **settings, remove_center=case["remove"])

    def loss(*args):
        return function(*args).square().sum()

    argnums = tuple(range(len(primals)))
    _, expected = _autograd(loss, primals)
    names = NAMES[: len(primals)]
    _assert_all_close(grad(loss, argnums=argnums)(*primals), expected, names)
    batched = [torch.stack([p, 0.5 * p]) for p in primals]
    per_sample = vmap(grad(loss, argnums=argnums))(*batched)
    for i in range(2):
        _, want = _autograd(loss, [b[i] for b in batched])
        _assert_all_close([g[i] for g in per_sample], want, names)
    out = function(*primals)
    tangent = torch.randn_like(primals[0])
    got = jvp(lambda x: function(x, *primals[1:]), (primals[0],), (tangent,))[1]
    cotangent = torch.randn_like(out)
    _, grads = _autograd(function, primals, cotangent)
    torch.testing.assert_close((got * cotangent).sum(), (grads[0] * tangent).sum())
    assert not composite_calls


@pytest.mark.parametrize("name", ["input", "mask", "input-mask", "all"])
def test_dcnv3_hessian_vector_products(name, composite_calls):
    """jvp of grad of DCNv3 along input or mask: the ops and their backward ops alone, equal
    to the composite's; along all three, the composite."""
    case = DCNV3_CASES["lopsided"]
    tensors = dcnv3_inputs(case, batch=2)
    settings = {"kernel_size": case["kernel"], "stride": case["stride"],
                "padding": case["padding"], "dilation": case["dilation"], "group": case["group"],
                "offset_scale": case["scale"], "remove_center": case["remove"]}  # fmt: skip
    primals = [tensors["input"], tensors["offset"], tensors["mask"]]
    vectors = [torch.randn_like(p) for p in primals]
    indices = {"input": (0,), "mask": (2,), "input-mask": (0, 2), "all": (0, 1, 2)}[name]

    def hvp(function):
        return _hvp(lambda *args: function(*args).square().sum(), primals, vectors, indices)

    actual = hvp(lambda x, offset, mask: deformconv.dcnv3(x, offset, mask, **settings))
    assert composite_calls == (["dcnv3"] if name == "all" else [])
    group = case["group"]

    def reference(x, offset, mask):
        op_settings = [list(case["kernel"]), list(case["stride"]), list(case["padding"]),
                       list(case["dilation"]), group, case["scale"], case["remove"]]  # fmt: skip
        out = composite.dcnv3(x, offset.unflatten(-1, (group, -1)),
                              mask.unflatten(-1, (group, -1)), *op_settings)  # fmt: skip
        return out.flatten(-2) if out.dim() == 5 else out

    _assert_all_close(actual, hvp(reference), [("input", "offset", "mask")[i] for i in indices])


def test_layers_with_functional_call(composite_calls):
    """Meta-learning style: the gradient of a layer's loss in its parameters by
    ``functional_call`` and ``grad``, and per-sample gradients of a model."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        deformconv.DeformableConv2d(3, 4, 3, padding=1, modulated=True, offset_groups=3),
        torch.nn.ReLU(),
        deformconv.DeformableConv2d(4, 2, (2, 3), padding=(1, 0), groups=2),
    ).double()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.conv_offset.weight.normal_(0, 0.3)
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)

    def loss(params, x):
        return torch.func.functional_call(model, params, (x,)).square().sum()

    got = grad(loss)(params, x)
    model.zero_grad()
    loss(dict(model.named_parameters()), x).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(got[name], parameter.grad, msg=name)
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(per_sample[name].sum(0), parameter.grad, msg=name)
    assert not composite_calls


def test_per_sample_gradients_on_the_triton_kernels():
    """The same batching rules and Functions on the Triton kernels (on the CPU, in Triton's
    interpreter): per-sample gradients of everything in float32 against float64."""
    needs_kernels()
    from triton_cases import DEVICE, TOLERANCES, relative_error

    primals = _primals(seed=7, batch=1)
    batched = [torch.stack([p, 0.5 * p]) for p in primals]
    gradients = vmap(grad(_loss, argnums=tuple(range(5))))
    expected = gradients(*batched)
    with deformconv.use_backend("triton"):
        got = gradients(*[b.to(DEVICE, torch.float32) for b in batched])
    for name, have, want in zip(NAMES, got, expected, strict=True):
        assert relative_error(have, want) <= TOLERANCES[torch.float32], name


def test_hessian_vector_products_on_the_triton_kernels():
    """jvp of grad on the Triton kernels (Triton's interpreter on the CPU), float32 against
    the float64 composite, along the input and along input, mask, weight and bias."""
    needs_kernels()
    from triton_cases import DEVICE, TOLERANCES, relative_error

    primals = _primals(seed=9, batch=1)
    vectors = [torch.randn_like(p) for p in primals]
    for indices in [(0,), (0, 2, 3, 4)]:
        expected = _hvp(_composite_loss, primals, vectors, indices)
        with deformconv.use_backend("triton"):
            got = _hvp(_loss, *[[t.to(DEVICE, torch.float32) for t in ts]
                                for ts in (primals, vectors)], indices)  # fmt: skip
        for i, have, want in zip(indices, got, expected, strict=True):
            assert relative_error(have, want) <= TOLERANCES[torch.float32], NAMES[i]


@pytest.mark.parametrize("kind", ["DeformableConv2d", "DCNv4NCHW"])
def test_model_ensembles_by_stack_module_state(kind, composite_calls):
    """torch.func's ensembling recipe: the stacked parameters of three layers, one vmapped
    call (the weights fold into groups), equal to each layer's own output."""
    torch.manual_seed(1)

    def make():
        if kind == "DCNv4NCHW":
            return deformconv.DCNv4NCHW(16, group=2)
        return deformconv.DeformableConv2d(8, 8, 3, padding=1, modulated=True, offset_groups=2)

    layers = [make().double() for _ in range(3)]
    with torch.no_grad():
        for parameter in (p for layer in layers for p in layer.parameters()):
            parameter.add_(0.1 * torch.randn_like(parameter))
    params, buffers = torch.func.stack_module_state(layers)
    base = make().to("meta")
    x = torch.randn(2, 16 if kind == "DCNv4NCHW" else 8, 6, 7, dtype=torch.float64)
    out = vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,)))(params, buffers)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(out[i], layer(x))
    assert not composite_calls
