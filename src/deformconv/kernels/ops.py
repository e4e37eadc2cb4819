"""Launchers of the Triton ``deform_conv2d`` kernels (2-D and 3-D), registered as
``torch.library`` ops.

``deformconv::triton_deform_conv2d`` and ``deformconv::triton_deform_conv2d_backward`` are
``triton_op``\\ s: their bodies are plain PyTorch plus ``wrap_triton`` launches, so
``torch.compile`` can trace into them.  Arguments are assumed checked by the public
function; ``precision`` is ``"ieee"`` or ``"tf32"`` (how float32 operands are contracted).
"""

import contextlib
import functools
import math

# The triton_op of PyTorch 2.6 to 2.8 infers its schema from the annotations (it ignores
# ``schema=``) and reads typing.Sequence, not collections.abc.Sequence.
from typing import NamedTuple, Sequence  # noqa: UP035

import torch
import triton
from torch import Tensor
from torch.library import triton_op

from .._geometry import Geometry, geometry
from .deform_conv2d import (
    deform_conv2d_backward_data_kernel,
    deform_conv2d_backward_weight_kernel,
    deform_conv2d_forward_kernel,
)

_INT32_LIMIT = 2**31 - 1
#: Fixed-point sums of the deterministic input gradient stay below 2**_FIXED_POINT_BITS.
_FIXED_POINT_BITS = 61


def _span(tensor: Tensor) -> int:
    """One past the largest element offset ``tensor`` addresses."""
    return 1 + sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def needs_int64(*tensors: Tensor | None) -> bool:
    return any(t is not None and _span(t) > _INT32_LIMIT for t in tensors)


def _block(size: int, low: int, high: int) -> int:
    """A power-of-two block between ``low`` and ``high`` that covers ``size`` if it can."""
    return max(low, min(high, triton.next_power_of_2(max(1, size))))


@functools.cache
def _shared_memory_per_block(index: int) -> int:
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_per_block(device: torch.device) -> int | None:
    """The most shared memory (bytes) one block may use on ``device``, or ``None`` (no GPU:
    the interpreter)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _shared_memory_per_block(index)


#: Shared memory a block needs for the forward's largest tiles: 128 pixels × 256 channels
#: in half precision (about 104 KiB on sm_86/sm_89, 120 KiB on sm_90), 64 × 256 under TF32
#: (72 KiB compiled by Triton 3.6, 104 KiB by Triton 3.2 without the JIT's specialization),
#: with some room.
_ROOMY_SHARED = 128 * 1024


def forward_config(
    shape: Geometry, dtype: torch.dtype, precision: str = "ieee", shared: int | None = None
) -> dict:
    """Tile sizes and launch settings of the forward kernel; ``shared`` is the shared memory a
    block may use on the device (``None``: no limit)."""
    half = dtype in (torch.float16, torch.bfloat16)
    # The largest tiles only where the device's shared memory holds them (A100, H100; not the
    # 99 KiB of sm_86/sm_89).
    roomy = shared is None or shared >= _ROOMY_SHARED
    # Wide output tiles on tensor cores: every gathered sample serves all their channels.
    # Exact float32 products keep two blocks per multiprocessor with half as wide a tile.
    wide = half or (precision == "tf32" and roomy)
    block_n = _block(shape.group_out, 16, 256 if wide else 128)
    block_k = _block(min(shape.group_in, shape.offset_group_in), 16, 32)
    block_m = 128 if half and block_n >= 64 and shape.pixels >= 8192 and roomy else 64
    warps = 8 if block_m * block_n >= 128 * 64 else 4
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "num_warps": warps,
        "num_stages": 3 if half else 2,
    }


def backward_data_config(shape: Geometry, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings of the input/offset/mask gradient kernel."""
    block_k = _block(min(shape.group_in, shape.offset_group_in), 16, 32)
    block_o = _block(shape.group_out, 16, 64)
    return {"BLOCK_M": 64, "BLOCK_O": block_o, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2}


def backward_weight_config(shape: Geometry, dtype: torch.dtype) -> dict:
    """Tile sizes and launch settings of the weight gradient kernel."""
    half = dtype in (torch.float16, torch.bfloat16)
    # Wide output tiles: each tile recomputes its samples, so the fewer tiles the better.
    block_n = _block(shape.group_out, 16, 256 if half else 128)
    block_k = _block(shape.group_in, 16, (64 if block_n > 128 else 128) if half else 64)
    warps = 8 if block_k * block_n >= 64 * 128 else 4
    return {
        "BLOCK_M": 64,
        "BLOCK_N": block_n,
        "BLOCK_K": block_k,
        "num_warps": warps,
        "num_stages": 2,
    }


#: Per-kernel settings that replace the heuristics above (for tuning runs): tile sizes and
#: Triton's launch options (``num_warps``, ``num_stages``, ``maxnreg``).
CONFIG_OVERRIDES: dict[str, dict] = {"forward": {}, "backward_data": {}, "backward_weight": {}}


def _config(name: str, heuristic: dict) -> dict:
    return {**heuristic, **CONFIG_OVERRIDES[name]}


def _weight_matrix(weight: Tensor, shape: Geometry) -> Tensor:
    """``(O, gi, kh, kw)`` → contiguous ``(groups, K, gi, go)``."""
    return shape.tap_major_weight(weight).contiguous()


def _splits(pixel_tiles: int, tiles: int, device: torch.device) -> int:
    """How many splits of the pixel tiles keep every multiprocessor busy in the weight
    gradient, with at least four pixel tiles per split."""
    if device.type != "cuda":
        return 1
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = triton.cdiv(4 * processors, max(1, tiles))
    return max(1, min(wanted, pixel_tiles // 4))


def _sizes(shape: Geometry) -> tuple[int, ...]:
    """The sizes every kernel takes: height, width, out_w, the output positions of one image,
    out_channels."""
    return (shape.height, shape.width, shape.out_w, math.prod(shape.out_size),
            shape.out_channels)  # fmt: skip


def _plane_args(shape: Geometry) -> tuple[int, ...]:
    """Stride, padding and dilation along height and width: (sh, sw, ph, pw, dh, dw)."""
    return (*shape.stride[-2:], *shape.padding[-2:], *shape.dilation[-2:])


def _strides(tensor: Tensor) -> tuple[int, ...]:
    """A ``(N, C, [D,] H, W)`` tensor's strides along N, C, H and W."""
    return (*tensor.stride()[:2], *tensor.stride()[-2:])


def _depth_args(shape: Geometry, *tensors: Tensor) -> tuple[int, ...]:
    """What the kernels take for a third axis: the depth, the output height, the tensors'
    strides along depth, and stride, padding, dilation and kernel size along depth (in 2-D:
    1, the output height, a 0 stride per tensor, 1, 0, 1, 1)."""
    strides = tuple(tensor.stride(2) if tensor.dim() == 5 else 0 for tensor in tensors)
    if shape.dims == 3:
        return (shape.size[0], shape.out_h, *strides, shape.stride[0], shape.padding[0],
                shape.dilation[0], shape.kernel[0])  # fmt: skip
    return (1, shape.out_h, *strides, 1, 0, 1, 1)


def _groups(shape: Geometry) -> tuple[int, ...]:
    """Channels per weight group (in, out), channels per offset group, offset groups."""
    return (shape.group_in, shape.group_out, shape.offset_group_in, shape.offset_groups)


def _tiles_per_image(shape: Geometry, block_m: int) -> int:
    return triton.cdiv(math.prod(shape.out_size), block_m)


def launching_on(device: torch.device):
    """Where Triton launches: on the current CUDA device, which this makes ``device`` (a
    tensor on ``cuda:1`` while ``cuda:0`` is current would not be reachable otherwise)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, which lets ``torch.compile`` trace its launches;
    in Triton's CPU interpreter the kernel itself, as recent PyTorch returns it (2.6 to 2.8
    refuse interpreted kernels)."""
    if not isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


#: Memory order of the input gradient's atomic adds ("relaxed" suffices: they commute).
ATOMIC_SEMANTICS = "relaxed"

#: Gather from a channels-last copy of the input: a tile's channels are then contiguous.
GATHER_CHANNELS_LAST = True


def _gather_layout(input: Tensor) -> Tensor:
    if GATHER_CHANNELS_LAST:
        layout = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        return input.contiguous(memory_format=layout)
    return input


@triton_op(
    "deformconv::triton_deform_conv2d",
    mutates_args=(),
    schema="(Tensor input, Tensor offset, Tensor? mask, Tensor weight, Tensor? bias, "
    "int[] stride, int[] padding, int[] dilation, str precision) -> Tensor",
)
def triton_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    precision: str,
) -> Tensor:
    shape = geometry(input, offset, weight, tuple(stride), tuple(padding), tuple(dilation))
    out = input.new_empty(shape.batch, shape.out_channels, *shape.out_size)
    if out.numel() == 0:
        return out
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    bias = None if bias is None else bias.contiguous()  # the kernel reads it unstrided
    shared = shared_memory_per_block(input.device)
    config = _config("forward", forward_config(shape, input.dtype, precision, shared))
    tiles = _tiles_per_image(shape, config["BLOCK_M"])
    grid = (
        shape.batch * tiles,
        shape.weight_groups * triton.cdiv(shape.group_out, config["BLOCK_N"]),
    )
    input = _gather_layout(input)
    with launching_on(input.device):
        wrap_triton(deform_conv2d_forward_kernel)[grid](
            input,
            offset,
            offset if mask is None else mask,
            _weight_matrix(weight, shape),
            offset if bias is None else bias,
            out,
            tiles,
            *_sizes(shape),
            *_strides(input),
            *_plane_args(shape),
            *_groups(shape),
            shape.kernel_h,
            shape.kernel_w,
            *_depth_args(shape, input),
            HAS_MASK=mask is not None,
            HAS_BIAS=bias is not None,
            INDEX64=needs_int64(input, offset, mask, out),
            PRECISION=precision,
            DIMS=shape.dims,
            **config,
        )
    return out


def _fixed_point_scale(
    grad_output: Tensor, mask: Tensor | None, weight: Tensor, shape: Geometry
) -> tuple[Tensor, Tensor]:
    """A power of two ``s`` such that ``s · Σ|contributions|`` to any input-gradient element
    stays below ``2**_FIXED_POINT_BITS`` (one-element float32 tensor, no host sync), and the
    bound on that sum it was chosen from."""
    per_channel = weight.detach().abs().float()
    per_channel = per_channel.reshape(shape.weight_groups, shape.group_out, -1).sum(1).amax()
    bound = abs_max(grad_output) * per_channel
    if mask is not None:
        bound = bound * abs_max(mask)
    bound = bound * float(math.prod(shape.out_size) * shape.taps)
    return fixed_point_scale(bound), bound


def abs_max(tensor: Tensor) -> Tensor:
    """The largest magnitude in ``tensor``, a float32 scalar tensor (no host sync); 0 when
    ``tensor`` is empty."""
    if tensor.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=tensor.device)
    return tensor.detach().abs().amax().float()


def fixed_point_scale(bound: Tensor) -> Tensor:
    """A power of two ``s`` with ``s · bound < 2**_FIXED_POINT_BITS``, where ``bound`` bounds
    the sum of the magnitudes of every contribution to one gradient element (one-element
    float32 tensor, no host sync)."""
    exponent = torch.floor(_FIXED_POINT_BITS - torch.log2(bound)).clamp(-100.0, 100.0)
    return torch.exp2(torch.nan_to_num(exponent, nan=0.0)).reshape(1)


@triton_op(
    "deformconv::triton_deform_conv2d_backward",
    mutates_args=(),
    schema="(Tensor grad_output, Tensor input, Tensor offset, Tensor? mask, Tensor weight, "
    "int[] stride, int[] padding, int[] dilation, bool[4] needs_grad, str precision, "
    "bool deterministic) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def triton_deform_conv2d_backward(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    needs_grad: Sequence[bool],
    precision: str,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (input, offset, mask, weight, bias); an empty tensor where not needed."""
    need_input, need_offset, need_mask, need_weight = needs_grad
    need_mask = need_mask and mask is not None
    shape = geometry(input, offset, weight, tuple(stride), tuple(padding), tuple(dilation))
    grad_output = grad_output.contiguous()
    offset = offset.contiguous()
    mask = None if mask is None else mask.contiguous()
    axes = [0, *range(2, grad_output.dim())]
    grad_bias = grad_output.sum(axes, dtype=torch.float32).to(grad_output.dtype)
    source = _gather_layout(input)
    launch = _Launch(
        shape=shape,
        index64=needs_int64(source, offset, mask, grad_output),
        precision=precision,
        active=shape.pixels > 0 and input.numel() > 0,
    )
    grad_offset = torch.empty_like(offset) if need_offset else input.new_empty(0)
    grad_mask = torch.empty_like(mask) if need_mask else input.new_empty(0)
    accumulator = scale = bound = None
    if need_input:
        if deterministic:
            accumulator = torch.zeros_like(source, dtype=torch.int64)
            scale, bound = _fixed_point_scale(grad_output, mask, weight, shape)
        else:
            accumulator = torch.zeros_like(source, dtype=torch.float32)
    grad_weight = input.new_empty(0)
    with launching_on(input.device):
        if need_input or need_offset or need_mask:
            _launch_backward_data(
                launch, grad_output, source, offset, mask, weight, accumulator, grad_offset,
                grad_mask, scale,
            )  # fmt: skip
        if need_weight:
            grad_weight = _launch_backward_weight(
                launch, grad_output, source, offset, mask, weight, deterministic
            )
    del source  # the channels-last copy is not needed for the input gradient's conversion
    grad_input = input.new_empty(0)
    if accumulator is not None:
        grad_input = torch.empty_like(input, memory_format=torch.contiguous_format)
        if deterministic:
            # Exact integer sums → float32 → times a power of two: bit-reproducible.
            # ``bound * 0`` is 0, or NaN when the gradients hold NaN or infinity.
            grad_input.copy_(accumulator.float().div_(scale).add_(bound * 0))
        else:
            grad_input.copy_(accumulator)
    return grad_input, grad_offset, grad_mask, grad_weight, grad_bias


class _Launch(NamedTuple):
    """What every backward launch shares."""

    shape: Geometry
    index64: bool
    precision: str
    active: bool


def _launch_backward_data(
    launch: _Launch,
    grad_output: Tensor,
    source: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    accumulator: Tensor | None,
    grad_offset: Tensor,
    grad_mask: Tensor,
    scale: Tensor | None,
) -> None:
    """Input (into ``accumulator``), offset and mask gradients."""
    shape = launch.shape
    if not launch.active:
        grad_offset.zero_()
        grad_mask.zero_()
        return
    config = _config("backward_data", backward_data_config(shape, source.dtype))
    tiles = _tiles_per_image(shape, config["BLOCK_M"])
    grid = (shape.batch * tiles, shape.taps, shape.offset_groups)
    need_input = accumulator is not None
    wrap_triton(deform_conv2d_backward_data_kernel)[grid](
        grad_output,
        source,
        offset,
        offset if mask is None else mask,
        _weight_matrix(weight, shape),
        accumulator if need_input else offset,
        grad_offset if grad_offset.numel() else offset,
        grad_mask if grad_mask.numel() else offset,
        offset if scale is None else scale,
        tiles,
        *_sizes(launch.shape),
        *_strides(source),
        *_strides(accumulator if need_input else source),
        *_plane_args(shape),
        *_groups(launch.shape),
        shape.kernel_h,
        shape.kernel_w,
        *_depth_args(shape, source, accumulator if need_input else source),
        HAS_MASK=mask is not None,
        NEED_INPUT=need_input,
        NEED_OFFSET=grad_offset.numel() > 0,
        NEED_MASK=grad_mask.numel() > 0,
        DETERMINISTIC=scale is not None,
        ATOMIC_SEM=ATOMIC_SEMANTICS,
        INDEX64=launch.index64 or (need_input and needs_int64(accumulator)),
        PRECISION=launch.precision,
        DIMS=shape.dims,
        **config,
    )


def _launch_backward_weight(
    launch: _Launch,
    grad_output: Tensor,
    source: Tensor,
    offset: Tensor,
    mask: Tensor | None,
    weight: Tensor,
    deterministic: bool,
) -> Tensor:
    shape = launch.shape
    config = _config("backward_weight", backward_weight_config(shape, source.dtype))
    tiles = (
        shape.weight_groups
        * shape.taps
        * triton.cdiv(shape.group_in, config["BLOCK_K"])
        * triton.cdiv(shape.group_out, config["BLOCK_N"])
    )
    per_image = _tiles_per_image(shape, config["BLOCK_M"])
    pixel_tiles = shape.batch * per_image
    splits = _splits(pixel_tiles, tiles, source.device)
    per_split = triton.cdiv(pixel_tiles, splits)
    # Deterministic mode keeps one partial sum per split; otherwise the splits add atomically.
    sums = torch.zeros(
        splits if deterministic else 1,
        shape.weight_groups,
        shape.taps,
        shape.group_in,
        shape.group_out,
        dtype=torch.float32,
        device=source.device,
    )
    if launch.active:
        wrap_triton(deform_conv2d_backward_weight_kernel)[(tiles, splits)](
            grad_output,
            source,
            offset,
            offset if mask is None else mask,
            sums,
            pixel_tiles,
            per_split,
            per_image,
            *_sizes(launch.shape),
            *_strides(source),
            *_plane_args(shape),
            *_groups(launch.shape),
            shape.kernel_h,
            shape.kernel_w,
            *_depth_args(shape, source),
            HAS_MASK=mask is not None,
            ACCUMULATE=not deterministic,
            INDEX64=launch.index64,
            PRECISION=launch.precision,
            DIMS=shape.dims,
            **config,
        )
    return sums.sum(0).permute(0, 3, 2, 1).reshape(weight.shape).to(weight.dtype)
