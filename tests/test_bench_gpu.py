"""The GPU benchmark's kernel breakdown, run on small CPU tensors in Triton's interpreter with
the timer replaced: every case runs, and each launch setting it tries reaches the kernels and
is undone afterwards."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deformconv.bench import gpu
from deformconv.kernels import ops


@pytest.mark.parametrize("dtype_name", ["fp16", "tf32"])
def test_breakdown_runs_every_case_with_its_launch_settings(monkeypatch, dtype_name):
    def small_inputs(shape, seed=0):
        g = torch.Generator().manual_seed(seed)
        n, c, s = shape.batch, shape.channels, shape.size
        return {
            "input": torch.randn(n, c, s, s, generator=g, dtype=torch.float64),
            "offset": torch.randn(n, 18, s, s, generator=g, dtype=torch.float64),
            "mask": torch.rand(n, 9, s, s, generator=g, dtype=torch.float64),
            "weight": torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64),
            "bias": torch.randn(c, generator=g, dtype=torch.float64),
            "grad": torch.randn(n, c, s, s, generator=g, dtype=torch.float64),
        }

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
