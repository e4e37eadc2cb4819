"""Benchmarks behind ``deformconv bench``: :mod:`.cpu` (against torchvision and
``nn.Conv2d``) and :mod:`.gpu` (Triton kernels against torchvision and cuDNN)."""
