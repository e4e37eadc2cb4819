"""The GPU benchmark's kernel breakdown and tile sweep, run on small CPU tensors in Triton's
interpreter with the timer replaced: every case runs, and each launch setting it tries reaches
the kernels and is undone afterwards."""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("torch", minversion="2.6")  # torch.library.triton_op

import deformconv
from deformconv.bench import gpu
from deformconv.kernels import ops

#: The benchmark's inputs, on the CPU.
small_inputs = functools.partial(gpu.make_inputs, device="cpu")


@pytest.mark.parametrize("dtype_name", ["fp16", "tf32"])
def test_breakdown_runs_every_case_with_its_launch_settings(monkeypatch, dtype_name):
    launched = []  # per timed case, the settings of each launch of its timed run
    current = []
    real_config = ops._config

    def recording_config(name, heuristic):
        config = real_config(name, heuristic)
        current.append((name, config))
        return config

    def one_run(run):
        current.clear()
        run()
        launched.append(list(current))
        return 1.0

    monkeypatch.setattr(gpu, "make_inputs", small_inputs)
    monkeypatch.setattr(gpu, "bench", one_run)
    monkeypatch.setattr(ops, "_config", recording_config)
    rows = gpu.breakdown(gpu.Shape(1, 8, 5), dtype_name)

    names = [row["kernel"] for row in rows]
    assert "grad input+offset+mask" in names
    assert [row for row in rows if "error" in row] == []
    assert all(row["fwd_bwd_ms"] == 1.0 and row["dtype"] == dtype_name for row in rows)
    by_name = dict(zip(names, launched, strict=True))
    for kernel, caps in gpu.REGISTER_CAPS.items():
        for cap in caps:
            capped = [name for name in names if name.endswith(f"≤ {cap} registers")]
            settings = [config for name in capped for launch, config in by_name[name]
                        if launch == kernel]  # fmt: skip
            assert settings and all(config["maxnreg"] == cap for config in settings)
    # The uncapped cases ran with the heuristics' settings, and nothing stays overridden.
    assert all("maxnreg" not in config for _, config in by_name["grad input+offset+mask"])
    assert all(not settings for settings in ops.CONFIG_OVERRIDES.values())
    assert ops.ATOMIC_SEMANTICS == "relaxed"


def test_tuning_times_each_configuration_and_restores_the_defaults(monkeypatch):
    seen = []

    def one_run(run):
        seen.append({kernel: dict(config) for kernel, config in ops.CONFIG_OVERRIDES.items()})
        run()
        return 1.0

    launch = {"BLOCK_K": 16, "num_warps": 4, "num_stages": 2}
    table = {
        "backward_data": [gpu._capped({"BLOCK_M": 16, "BLOCK_O": 16, **launch})],
        "backward_weight": [{"BLOCK_M": 16, "BLOCK_N": 16, **launch, "maxnreg": 96}],
    }
    monkeypatch.setattr(gpu, "make_inputs", small_inputs)
    monkeypatch.setattr(gpu, "bench", one_run)
    monkeypatch.setattr(gpu, "TUNING", table)
    with deformconv.use_backend("triton"):
        rows = gpu.tune(gpu.Shape(1, 8, 5), "fp16", budget=1e9)

    assert [row["kernel"] for row in rows] == ["backward_data", "backward_weight",
                                               "gather from NCHW"]  # fmt: skip
    assert [row for row in rows if "error" in row] == []
    assert rows[0]["maxnreg"] == 128 and rows[1]["maxnreg"] == 96
    # Each configuration was in force while it was timed (forward, then forward+backward).
    assert seen[0]["backward_data"] == table["backward_data"][0] == seen[1]["backward_data"]
    assert seen[2]["backward_weight"] == table["backward_weight"][0]
    assert all(not config for config in ops.CONFIG_OVERRIDES.values())
    assert ops.GATHER_CHANNELS_LAST


def test_tune_dtype_takes_a_list_and_names_what_it_refuses(capsys):
    with pytest.raises(SystemExit):
        gpu.main(["--breakdown", "--tune-dtype", "bf16,fp8"])
    error = capsys.readouterr().err
    assert "--tune-dtype" in error and "got fp8" in error and "tf32" in error


def test_derivative_costs_time_deformconv_and_the_convolution(monkeypatch):
    runs = []

    def one_run(run):
        runs.append(run())
        return 1.0

    monkeypatch.setattr(gpu, "make_inputs", small_inputs)
    monkeypatch.setattr(gpu, "bench", one_run)
    rows = gpu.derivative_costs(gpu.Shape(2, 4, 5), "fp32")
    assert [row["impl"] for row in rows] == ["deformconv", "cuDNN conv2d"]
    assert all(row["fwd_bwd_ms"] == row["penalty_ms"] == row["func_grad_ms"]
               == row["per_sample_ms"] == 1.0 for row in rows)  # fmt: skip
    assert len(runs) == 8 and all(len(grads) == 5 for grads in runs)
    # The per-sample gradients stack torch.func.grad's (input, offsets, mask) or sum to them
    # (the shared weight and bias).
    func_grads, per_sample = runs[2], runs[3]
    for index, (whole, samples) in enumerate(zip(func_grads, per_sample, strict=True)):
        torch.testing.assert_close(samples.squeeze(1) if index < 3 else samples.sum(0), whole)


def test_steps_past_the_budget_are_skipped_and_logged(monkeypatch, capsys):
    monkeypatch.setattr(gpu, "START", gpu.time.perf_counter() - 100.0)
    assert gpu.within(150.0, "derivatives bf16")
    assert not gpu.within(50.0, "derivatives fp32")
    assert "budget spent: skipping derivatives fp32" in capsys.readouterr().out
