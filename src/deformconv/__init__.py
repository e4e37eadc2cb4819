"""deformconv: deformable convolution for PyTorch.

The catalogue:

* :func:`deform_conv2d` -- the op (v1, or modulated v2 with ``mask``), a drop-in for
  ``torchvision.ops.deform_conv2d``, registered as ``torch.ops.deformconv.deform_conv2d``.
* :class:`DeformConv2d` -- the layer that takes offsets as input (torchvision's layout).
* :class:`DeformableConv2d` -- the self-contained layer that predicts its own offsets
  (mmcv's ``DeformConv2dPack`` / ``ModulatedDeformConv2dPack`` layout).
* :func:`deform_conv1d`, :class:`DeformConv1d`, :class:`DeformableConv1d` -- the same for
  sequences (the 2-D op on one row).
* :func:`deform_conv3d`, :class:`DeformConv3d`, :class:`DeformableConv3d` -- the same for
  volumes and video clips (trilinear sampling), registered as
  ``torch.ops.deformconv.deform_conv3d``.
* :func:`dcnv3`, :func:`dcnv4`, :class:`DCNv3`, :class:`DCNv4` (and ``DCNv3NCHW``,
  ``DCNv4NCHW``) -- the newer generation: InternImage's and FlashInternImage's grouped
  deformable sampling operators and layers, with their checkpoint keys.
* :func:`deform_roi_pool`, :class:`DeformRoIPool`, :class:`DeformRoIPoolPack`,
  :class:`ModulatedDeformRoIPoolPack` -- deformable RoI pooling (mmcv's semantics and keys).
* :func:`convert_to_deformable`, :func:`offset_parameters`, :func:`deformable_layers` -- turn
  the convolutions of any model into deformable ones and train their offset predictors.
* :func:`set_backend`, :func:`get_backend`, :func:`use_backend`, :func:`available_backends`
  -- which implementation runs the op; :func:`set_column_budget` bounds the torch backend's
  temporary memory; :func:`set_cpu_compile` turns its compiled CPU sampling on or off;
  :func:`release_cpu_buffers` frees the CPU buffers it reuses between calls.

``deformconv.checkpoints`` loads torchvision, mmcv, detectron2 and DCNv2 checkpoints into these
layers; ``torch.onnx.export(..., opset_version=19)`` writes the standard ``DeformConv``
operator (:mod:`deformconv.onnx_export`).  ``deformconv.viz`` draws learned sampling
locations (needs matplotlib); ``deformconv.demo`` is the scaled-digits experiment behind the
``deformconv`` command.
"""

from __future__ import annotations

from . import checkpoints
from .backends import available_backends, get_backend, set_backend, use_backend
from .backends.compiled import set_cpu_compile
from .backends.pytorch import column_budget, set_column_budget
from .backends.scratch import release as release_cpu_buffers
from .convert import convert_to_deformable, deformable_layers, offset_parameters
from .dcnv3 import dcnv3, dcnv4, dcnv4_offset_mask_channels
from .dcnv3_layers import DCNv3, DCNv3NCHW, DCNv4, DCNv4NCHW
from .deform_conv1d import DeformableConv1d, DeformConv1d, deform_conv1d
from .deform_conv2d import DeformConv2d, deform_conv2d
from .deform_conv3d import DeformableConv3d, DeformConv3d, deform_conv3d
from .deform_roi_pool import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
)
from .deformable_conv2d import DeformableConv2d

__version__ = "0.1.0"

__all__ = [
    "DCNv3",
    "DCNv3NCHW",
    "DCNv4",
    "DCNv4NCHW",
    "DeformConv1d",
    "DeformConv2d",
    "DeformConv3d",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "DeformableConv1d",
    "DeformableConv2d",
    "DeformableConv3d",
    "ModulatedDeformRoIPoolPack",
    "__version__",
    "available_backends",
    "checkpoints",
    "column_budget",
    "convert_to_deformable",
    "dcnv3",
    "dcnv4",
    "dcnv4_offset_mask_channels",
    "deform_conv1d",
    "deform_conv2d",
    "deform_conv3d",
    "deform_roi_pool",
    "deformable_layers",
    "get_backend",
    "offset_parameters",
    "release_cpu_buffers",
    "set_backend",
    "set_column_budget",
    "set_cpu_compile",
    "use_backend",
]
