"""Backend selection: function, context manager and environment variable, all checked."""

from __future__ import annotations

import pytest
import torch

import deformconv
from cases import LOPSIDED, call, make_inputs, needs_kernels
from deformconv import backends


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    deformconv.set_backend(None)


def test_default_is_auto_and_torch_runs_it(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert deformconv.get_backend() == "auto"
    assert backends.select(torch.device("cpu")) is backends.pytorch
    assert deformconv.available_backends() == ["auto", "torch", "triton"]


def test_set_backend_and_context_manager(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    deformconv.set_backend("torch")
    assert deformconv.get_backend() == "torch"
    deformconv.set_backend("auto")
    with deformconv.use_backend("torch"):
        assert deformconv.get_backend() == "torch"
    assert deformconv.get_backend() == "auto"
    deformconv.set_backend(None)
    assert deformconv.get_backend() == "auto"


def test_forced_backend_gives_the_same_results():
    config = LOPSIDED["straddling-groups"]
    tensors = make_inputs(config, requires_grad=False)
    expected = call(deformconv.deform_conv2d, tensors, config)
    with deformconv.use_backend("torch"):
        torch.testing.assert_close(
            call(deformconv.deform_conv2d, tensors, config), expected, atol=0, rtol=0
        )


def test_unknown_backend_names_are_refused(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    with pytest.raises(
        ValueError, match=r"backend must be one of \['auto', 'torch', 'triton'\], got 'cuda-fast'"
    ):
        deformconv.set_backend("cuda-fast")
    with pytest.raises(ValueError, match="backend must be one of"), deformconv.use_backend("nope"):
        pass
    assert deformconv.get_backend() == "auto"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert deformconv.get_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "triton-typo")
    with pytest.raises(
        ValueError,
        match=r"environment variable DEFORMCONV_BACKEND must be one of .* got 'triton-typo'",
    ):
        deformconv.get_backend()
    # An explicit choice in code wins over the environment; None returns to it.
    deformconv.set_backend("torch")
    assert deformconv.get_backend() == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "auto")
    deformconv.set_backend(None)
    assert deformconv.get_backend() == "auto"


def test_select_per_operator_family():
    from deformconv.backends import pytorch, pytorch_dcnv3, select, triton_dcnv3

    cpu = torch.device("cpu")
    assert select(cpu, 3) is pytorch and select(cpu, op="dcnv3") is pytorch_dcnv3
    triton_available = backends.triton_backend.unavailable_reason() is None
    cuda = torch.device("cuda")  # no tensor needed: "auto" decides from the device type
    expected = backends.triton_backend if triton_available else pytorch
    assert select(cuda, 2) is expected and select(cuda, 3) is expected
    with deformconv.use_backend("triton"):
        assert select(cpu, op="dcnv3") is triton_dcnv3
    with pytest.raises(ValueError, match=r"op must be one of \['dcnv3', 'deform_conv'\]"):
        select(cpu, op="dcnv5")


@pytest.mark.parametrize("forward_setting, later_setting", [("triton", None), ("torch", "triton")])
def test_backward_runs_on_the_backend_of_its_forward(monkeypatch, forward_setting, later_setting):
    """Autograd runs a backward pass on the backend its forward ran under, though the setting
    changed in between (the ``use_backend`` block ended, or ``set_backend`` was called), for
    the convolution and for DCNv3."""
    needs_kernels()
    from deformconv.backends import pytorch_dcnv3, triton_dcnv3
    from test_dcnv3 import CASES, _args
    from test_dcnv3 import make_inputs as dcnv3_inputs

    ran = []

    def recording(module):
        original = module.backward

        def backward(*args, **kwargs):
            ran.append(module)
            return original(*args, **kwargs)

        return backward

    for module in (backends.pytorch, backends.triton_backend, pytorch_dcnv3, triton_dcnv3):
        monkeypatch.setattr(module, "backward", recording(module))
    config = LOPSIDED["straddling-groups"]
    conv_inputs = make_inputs(config, dtype=torch.float32)
    case = CASES["lopsided"]
    dcnv3_leaves = {k: v.float().requires_grad_() for k, v in dcnv3_inputs(case).items()}
    with deformconv.use_backend(forward_setting):
        conv_out = call(deformconv.deform_conv2d, conv_inputs, config)
        dcnv3_out = deformconv.dcnv3(*dcnv3_leaves.values(), **_args(case))
    deformconv.set_backend(later_setting)
    (conv_out.sum() + dcnv3_out.sum()).backward()
    expected = {"torch": [backends.pytorch, pytorch_dcnv3],
                "triton": [backends.triton_backend, triton_dcnv3]}[forward_setting]  # fmt: skip
    assert sorted(ran, key=id) == sorted(expected, key=id)
    # Outside autograd's backward pass the setting in force applies again.
    assert deformconv.get_backend() == (later_setting or "auto")
