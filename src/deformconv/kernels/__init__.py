"""Triton kernels.  Only :mod:`deformconv.backends.triton_backend` imports this package."""
