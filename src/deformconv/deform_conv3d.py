"""3-D (spatio-temporal) deformable convolution, v1 and modulated v2: ``deform_conv3d`` and its
layers.

The same op as the 2-D one with a third axis: each tap of each output position samples the
input by trilinear interpolation at its regular position shifted by a learned (Δd, Δh, Δw),
optionally multiplied by the mask.  Backends as in 2-D: the Triton kernels for CUDA tensors
(trilinear sampling, eight corners), the torch backend elsewhere.
"""

from __future__ import annotations

from torch import Tensor

from . import _library
from ._checks import check_arguments
from ._layers import _OffsetsAsInput, _SelfContained
from ._utils import IntOrTriple, _ntuple, autocast_inputs

__all__ = ["DeformConv3d", "DeformableConv3d", "deform_conv3d"]


def deform_conv3d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrTriple = 1,
    padding: IntOrTriple = 0,
    dilation: IntOrTriple = 1,
    mask: Tensor | None = None,
) -> Tensor:
    r"""3-D deformable convolution (v1), or modulated (v2) when ``mask`` is given.

    For output position ``(od, oh, ow)``, tap ``(i, j, l)`` and offset group ``g`` the sample
    lies at ``d = od·stride_d − pad_d + i·dilation_d + Δd``, and likewise for ``h`` and ``w``,
    with ``(Δd, Δh, Δw) = offset[:, g·3K + 3k : g·3K + 3k + 3]``, ``k = (i·kernel_h + j)·kernel_w
    + l`` and ``K = kernel_d·kernel_h·kernel_w``: the 2-D layout with one more coordinate per
    tap.  Trilinear corners outside the input count as 0; non-finite offsets sample 0 and
    receive a zero gradient.  Weight groups and offset groups are inferred as in
    :func:`deformconv.deform_conv2d`.

    Args:
        input (Tensor[batch, in_channels, depth, height, width]): input volume or clip.
        offset (Tensor[batch, 3 * offset_groups * K, out_depth, out_height, out_width]):
            (Δd, Δh, Δw) of every tap, for each offset group.
        weight (Tensor[out_channels, in_channels // groups, kernel_d, kernel_h, kernel_w]).
        bias (Tensor[out_channels], optional): added to the output.
        stride, padding, dilation (int or Tuple[int, int, int]): as in
            :func:`torch.nn.functional.conv3d`.
        mask (Tensor[batch, offset_groups * K, out_depth, out_height, out_width], optional):
            modulation scalars, applied as given.

    Returns:
        Tensor[batch, out_channels, out_depth, out_height, out_width], in input's dtype.

    Example:
        >>> x = torch.randn(1, 4, 5, 8, 8)
        >>> weight = torch.randn(6, 4, 3, 3, 3)
        >>> out = deform_conv3d(x, torch.zeros(1, 81, 5, 8, 8), weight, padding=1)
        >>> torch.allclose(out, torch.nn.functional.conv3d(x, weight, padding=1), atol=1e-4)
        True
    """
    stride = _ntuple(stride, "stride", 3)
    padding = _ntuple(padding, "padding", 3)
    dilation = _ntuple(dilation, "dilation", 3)
    input, offset, weight, bias, mask = autocast_inputs(input, offset, weight, bias, mask)
    check_arguments(input, offset, weight, bias, mask, stride, padding, dilation)
    return _library.deform_conv(input, offset, mask, weight, bias, stride, padding, dilation)


class DeformConv3d(_OffsetsAsInput):
    """3-D deformable convolution layer whose offsets (and mask) are inputs:
    ``forward(input, offset, mask=None)``.  Parameters and initialisation follow
    :class:`torch.nn.Conv3d`.

    Shape:
        - input ``(N, in_channels, D, H, W)``; offset ``(N, 3·G·K, Do, Ho, Wo)``; mask
          ``(N, G·K, Do, Ho, Wo)``, ``K = kd·kh·kw``, for any number of offset groups ``G``.
        - output ``(N, out_channels, Do, Ho, Wo)``.

    >>> layer = DeformConv3d(4, 8, kernel_size=(1, 3, 3), padding=(0, 1, 1))
    >>> layer(torch.randn(1, 4, 3, 6, 6), torch.zeros(1, 27, 3, 6, 6)).shape
    torch.Size([1, 8, 3, 6, 6])
    """

    _dims = 3
    _function = staticmethod(deform_conv3d)


class DeformableConv3d(_SelfContained):
    """3-D deformable convolution that predicts its own offsets (and mask): a zero-initialised
    ``conv_offset`` (:class:`torch.nn.Conv3d` with the layer's kernel size, stride, padding
    and dilation) gives ``3·G·K`` offsets, then ``G·K`` mask logits when ``modulated``
    (mask = ``mask_scale`` · sigmoid).  A fresh v1 layer computes ``F.conv3d``; a fresh v2
    layer ``mask_scale / 2`` of it.  Arguments as for :class:`deformconv.DeformableConv2d`,
    per axis (depth, height, width).

    >>> layer = DeformableConv3d(4, 8, kernel_size=3, padding=1, modulated=True)
    >>> layer(torch.randn(2, 4, 4, 10, 10)).shape
    torch.Size([2, 8, 4, 10, 10])
    """

    _dims = 3
    _function = staticmethod(deform_conv3d)
