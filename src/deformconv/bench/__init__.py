"""Benchmarks behind ``deformconv bench``: :mod:`.cpu` (against torchvision and
``nn.Conv2d``), :mod:`.gpu` (Triton kernels against torchvision and cuDNN), :mod:`.video`
(3-D against ``nn.Conv3d``), :mod:`.dcnv3` (DCNv3/DCNv4 against ``grid_sample``) and
:mod:`.onnx_runtime` (exported layers in onnxruntime against PyTorch)."""

import time

import torch


def timed(run, device: torch.device) -> float:
    """Seconds one call of ``run`` takes, the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
