"""The demo: offline digits, training in one process and under torchrun, the experiment's
outputs, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from deformconv import cli
from deformconv.demo import experiment
from deformconv.demo.digits import SCALE_RANGE, render_digits
from deformconv.demo.models import DigitNet
from deformconv.demo.training import evaluate, train

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def test_digits_are_deterministic_and_well_formed():
    images, labels = render_digits(200, seed=3)
    again, again_labels = render_digits(200, seed=3)
    other, _ = render_digits(200, seed=4)
    assert torch.equal(images, again) and torch.equal(labels, again_labels)
    assert not torch.equal(images, other)
    assert images.shape == (200, 1, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert set(labels.tolist()) == set(range(10))
    assert (images.flatten(1).amax(1) > 0.5).all()  # every image shows a digit


def test_scaled_digits_vary_in_size():
    def ink(images):
        return images.sum((1, 2, 3))

    plain = ink(render_digits(400, seed=0)[0])
    scaled = ink(render_digits(400, seed=0, scale_range=SCALE_RANGE)[0])
    # Ink grows with the square of the scale: 0.5-1.6x spreads it far more than the styles do.
    assert scaled.std() / scaled.mean() > 1.5 * plain.std() / plain.mean()
    assert scaled.min() < 0.5 * plain.mean() < plain.mean() * 1.8 < scaled.max()


def test_training_learns_and_evaluate_counts(monkeypatch):
    images, labels = render_digits(256, seed=1)
    torch.manual_seed(0)
    model = DigitNet(widths=(8, 16, 16, 16))
    model.classifier.bias.requires_grad_(False)  # a frozen parameter stays frozen
    history = train(model, images, labels, epochs=4, batch_size=32, lr=1e-2, seed=0,
                    progress=False)  # fmt: skip
    assert history[-1] < history[0]
    assert not model.classifier.bias.requires_grad and model.conv1.weight.requires_grad
    with torch.no_grad():
        expected = (model(images).argmax(1) == labels).float().mean().item()
    assert evaluate(model, images, labels, batch_size=100) == pytest.approx(expected)
    from deformconv.demo import training

    monkeypatch.setattr(training, "world", lambda: (0, 2))
    with pytest.raises(ValueError, match="batch_size 33 is not divisible by the world size 2"):
        train(model, images, labels, epochs=1, batch_size=33, lr=1e-3, seed=0, progress=False)


def _run(args, **kwargs):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)])}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_torchrun_ends_with_the_weights_of_one_process(tmp_path):
    single, double = tmp_path / "single.pt", tmp_path / "double.pt"
    worker = str(TESTS / "ddp_worker.py")
    one = _run([sys.executable, worker, str(single)])
    assert one.returncode == 0, one.stderr
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", worker, str(double)])  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    expected, actual = torch.load(single), torch.load(double)
    assert expected.keys() == actual.keys()
    moved = 0
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, atol=1e-5, rtol=1e-4, msg=name)
        moved += "conv_offset" in name and value.abs().sum() > 0
    assert moved  # the offset predictors were trained too


def test_experiment_writes_results_and_pictures(tmp_path):
    settings = experiment.Settings(train_size=96, test_size=48, epochs=1, finetune_epochs=1,
                                   deformable_epochs=1, batch_size=32)  # fmt: skip
    results = experiment.run(settings, tmp_path, torch.device("cpu"), progress=False)
    rows = results["results"]
    assert [r["model"] for r in rows] == [
        "regular CNN", "deformable (converted)", "regular CNN", "deformable CNN"
    ]  # fmt: skip
    for row in rows:
        assert 0 <= row["unscaled"] <= 100 and 0 <= row["scaled"] <= 100
    assert json.loads((tmp_path / "results.json").read_text()) == results
    table = (tmp_path / "results.md").read_text()
    assert "| deformable (converted) | offsets fine-tuned on scaled digits |" in table
    for picture in ("sampling_locations.png", "offset_magnitudes.png"):
        assert (tmp_path / picture).read_bytes()[:4] == b"\x89PNG"


def test_cli_info_help_and_version(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "deformconv 0.1.0" in text and "backends: auto, torch, triton" in text
    assert "CPU tensors run on: 2-D torch, 3-D torch, DCNv3/v4 torch" in text
    from deformconv.backends import native

    loops = native.runs_here()  # where a C compiler builds them
    sampling = "C loops, compiled on first use" if loops else "tensor operations ("
    assert f"torch backend on the CPU: {sampling}" in text
    assert "float32 products in the Triton kernels: exact" in text  # PyTorch's default
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert cli.main(["info"]) == 0
        assert "Triton kernels: on TF32 tensor cores" in capsys.readouterr().out
    finally:
        torch.set_float32_matmul_precision(previous)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    assert "demo" in capsys.readouterr().out
    module = _run([sys.executable, "-m", "deformconv", "--version"])
    assert module.returncode == 0 and module.stdout.strip() == "deformconv 0.1.0"


def test_cli_demo_arguments():
    args = cli._parser().parse_args(["demo", "--quick", "--out", "x", "--seed", "3"])
    assert (args.quick, args.out, args.seed, args.device) == (True, Path("x"), 3, "auto")
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["bench", "--cpu", "--gpu"])


@pytest.mark.parametrize(
    ("device", "backend", "expected"),
    [("cuda", "nccl", torch.device("cuda", 1)), ("cpu", "gloo", "cpu")],
)
def test_cli_demo_under_torchrun_takes_one_gpu_per_process(
    device, backend, expected, monkeypatch, tmp_path
):
    """What ``torchrun`` gives a process (``WORLD_SIZE``, ``LOCAL_RANK``) picks the process
    group (NCCL on GPUs, gloo on CPUs) and, on GPUs, the process's own device."""
    import torch.distributed as dist

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda b: calls.append(("init", b)))
    monkeypatch.setattr(dist, "barrier", lambda: calls.append(("barrier",)))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    monkeypatch.setattr(experiment, "run", lambda settings, out, d, progress: calls.append(
        ("run", d)))  # fmt: skip
    assert cli.main(["demo", "--quick", "--device", device, "--out", str(tmp_path)]) == 0
    expected = torch.device(expected)
    setup = [("set_device", expected)] if expected.type == "cuda" else []
    assert calls == [*setup, ("init", backend), ("run", expected), ("barrier",), ("destroy",)]


def test_quickstart_example_runs():
    example = TESTS.parent / "examples" / "quickstart.py"
    result = _run([sys.executable, str(example)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_cli_bench_runs_the_cpu_benchmark_with_its_arguments(monkeypatch):
    from deformconv.bench import cpu

    seen = []
    monkeypatch.setattr(cpu, "main", lambda argv: seen.append(argv))
    assert cli.main(["bench", "--cpu", "--", "--quick", "--no-memory"]) == 0
    assert seen == [["--quick", "--no-memory"]]


def test_cli_bench_3d_runs_the_video_benchmark(tmp_path, capsys):
    out = tmp_path / "rows.csv"
    assert cli.main(["bench", "--3d", "--", "--quick", "--device", "cpu", "--repeats", "1",
                     "--csv", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| N=1 C=16 T=4 28² k3×3×3 | cpu | float32 | fwd+bwd |" in printed
    assert out.read_text().splitlines()[0].startswith("shape,device,dtype,mode")
