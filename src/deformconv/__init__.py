"""deformconv: deformable convolution for PyTorch.

The catalogue:

* :func:`deform_conv2d` -- the op (v1, or modulated v2 with ``mask``), a drop-in for
  ``torchvision.ops.deform_conv2d``, registered as ``torch.ops.deformconv.deform_conv2d``.
* :class:`DeformConv2d` -- the layer that takes offsets as input (torchvision's layout).
* :class:`DeformableConv2d` -- the self-contained layer that predicts its own offsets
  (mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` layout).
* :func:`set_backend`, :func:`get_backend`, :func:`use_backend`, :func:`available_backends`
  -- which implementation runs the op.
"""

from __future__ import annotations

from .backends import available_backends, get_backend, set_backend, use_backend
from .deform_conv2d import DeformConv2d, deform_conv2d
from .deformable_conv2d import DeformableConv2d

__version__ = "0.1.0"

__all__ = [
    "DeformConv2d",
    "DeformableConv2d",
    "__version__",
    "available_backends",
    "deform_conv2d",
    "get_backend",
    "set_backend",
    "use_backend",
]
