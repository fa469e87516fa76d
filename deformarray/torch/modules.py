"""PyTorch adapter: deformarray's operators as PyTorch operators and ``nn.Module`` s.

Import it as ``deformarray.torch`` (PyTorch is an optional dependency: nothing else in
deformarray imports torch). What it provides:

* Functions with the signatures of ``torchvision.ops.deform_conv2d`` (and of the
  RoI poolings of the array API), differentiable with autograd.
* Real PyTorch operators in the ``deformarray`` namespace, declared with
  ``torch.library.custom_op``: ``torch.ops.deformarray.deform_conv2d`` and its explicit
  backward ``torch.ops.deformarray.deform_conv2d_backward`` (likewise for the RoI
  poolings). Each has a fake (meta) implementation, so ``torch.compile(fullgraph=True)``
  traces models using them without a graph break, and an autograd formula that calls the
  backward operator, which calls the array API's ``*_backward`` function.
* Modules: ``DeformConv2d`` (torchvision's constructor, parameters and initialisation),
  ``ModulatedDeformConv2d``, ``DeformConv2dPack`` and ``ModulatedDeformConv2dPack``
  (mmcv's, with their ``conv_offset`` layer), and the RoI pooling modules.

This file holds no maths. Tensors cross to NumPy (CPU) or CuPy (CUDA) through DLPack
without copying, any strides included; results come back the same way. On CUDA the work
runs on PyTorch's current stream of the tensors' device (CuPy is pointed at it through
``cupy.cuda.ExternalStream``).

dtypes: float32 and float64 everywhere; float16 and bfloat16 run natively on CUDA, and on
the CPU (whose kernels have no half types) are computed in float32 and returned in the
input's dtype. Under ``torch.autocast`` (CPU or CUDA) the operators run in float32, like
torchvision's: floating inputs are cast to float32 and the result is cast back to the
dtype of ``input``.

Determinism: ``torch.use_deterministic_algorithms(True)`` makes the backward pass request
the deterministic reduction (``deterministic=True`` of the array API's backward
functions); otherwise deformarray's own default (``deformarray.set_deterministic``)
applies. The CPU backward is deterministic in every case.

See docs/torch.md.
"""

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import init

from .. import _api, _warmup
from .._validate import MAX_SAMPLES_PER_SIDE, check_int_range

_warmup.notice_torch_import()  # a first use since installation: say what the first call costs

__all__ = [
    "deform_conv2d",
    "deform_roi_pool",
    "deform_psroi_pool",
    "DeformConv2d",
    "ModulatedDeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "ModulatedDeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------
# Crossing between tensors and arrays (DLPack, no copy)


def _to_array(t: Tensor | None) -> Any:
    """The NumPy (CPU) or CuPy (CUDA) view of a tensor, sharing its memory and strides."""
    if t is None:
        return None
    t = t.detach()  # DLPack refuses tensors that require grad; detach() copies nothing
    kind = t.device.type
    if kind == "cpu":
        return np.from_dlpack(t)
    if kind == "cuda":
        import cupy

        try:
            return cupy.from_dlpack(t)
        except Exception:  # a CuPy without DLPack bfloat16: carry the bits as int16
            if t.dtype != torch.bfloat16:
                raise
            import ml_dtypes

            return cupy.from_dlpack(t.view(torch.int16)).view(ml_dtypes.bfloat16)
    raise TypeError(f"deformarray.torch supports CPU and CUDA tensors, got a tensor on {t.device}")


def _to_tensor(a: Any) -> Tensor:
    """A tensor sharing the memory of a NumPy or CuPy array (the array stays alive)."""
    if isinstance(a, np.ndarray):
        return torch.from_dlpack(a)
    try:
        return torch.from_dlpack(a)
    except Exception:  # bfloat16 CuPy array that DLPack cannot carry: as int16 bits
        if getattr(a.dtype, "name", "") != "bfloat16":
            raise
        import cupy

        return torch.from_dlpack(a.view(cupy.int16)).view(torch.bfloat16)


@contextmanager
def _on_device(device: torch.device) -> Iterator[None]:
    """On CUDA: make the tensor's device and PyTorch's current stream CuPy's current ones,
    so the kernels are ordered with the surrounding PyTorch work, with no synchronisation."""
    if device.type != "cuda":
        yield
        return
    import cupy

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index):
        yield


def _common_dtype(tensors: dict[str, Tensor | None]) -> torch.dtype:
    """The one floating dtype shared by the given tensors (None skipped), else TypeError."""
    present = {k: v for k, v in tensors.items() if v is not None}
    (first_name, first), *_ = present.items()
    for name, t in present.items():
        if t.dtype != first.dtype:
            raise TypeError(f"all tensors must share one dtype: {first_name} is {first.dtype}, {name} is {t.dtype}")
    return first.dtype


def _call_array_api(fn: Callable, tensors: dict[str, Tensor | None], **kwargs) -> Any:
    """Call the array function ``fn(**tensors, **kwargs)`` on array views of the tensors.

    Every tensor must share one dtype (TypeError otherwise, as the array API). Half types on
    the CPU are computed in float32 (the CPU kernels have float32/float64 only) and cast back.
    Returns the result (one array or a named tuple of arrays/None) as tensors of that dtype.
    """
    dtype = _common_dtype(tensors)
    device = next(t for t in tensors.values() if t is not None).device
    if device.type == "cpu" and dtype in _HALF:
        tensors = {k: None if v is None else v.float() for k, v in tensors.items()}
    with _on_device(device):
        arrays = {k: _to_array(v) for k, v in tensors.items()}
        result = fn(**arrays, **kwargs)

        def back(a: Any) -> Tensor | None:
            if a is None:
                return None
            t = _to_tensor(a)
            return t if t.dtype == dtype else t.to(dtype)

        if isinstance(result, tuple):
            # named tuples of gradients keep their type
            return type(result)(*(back(a) for a in result))  # type: ignore[arg-type]
        return back(result)


def _static_shapes(*tensors: Tensor | None) -> bool:
    """True when every shape is made of plain ints (no symbolic sizes under torch.compile)."""
    return all(isinstance(s, int) for t in tensors if t is not None for s in t.shape)


def _int_arg(value: Any, name: str, minimum: int, maximum: int | None = None, shown: Any = None) -> int:
    """An int argument of an operator, in the array API's range: the operators' schemas hold
    int64, so a larger value would fail in the dispatcher before any check could name it."""
    v = int(value)
    shown = value if shown is None else shown
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown!r}")
    if maximum is None:
        check_int_range(v, name, shown)
    else:
        check_int_range(v, name, shown, maximum)
    return v


def _pair_list(value: Any, name: str, minimum: int) -> list[int]:
    """An int or a pair of ints as a two-int list (the operators' ``int[]`` arguments), each
    at least ``minimum`` and at most 2**31 - 1 (the array API's errors)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return [_int_arg(value, name, minimum, shown=value)] * 2
    if isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return [_int_arg(v, name, minimum, shown=value) for v in value]
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _empty_like_nothing(like: Tensor) -> Tensor:
    """Placeholder output for a gradient that does not exist (an absent bias or mask):
    custom operators return tensors, so it is an empty tensor the autograd formula drops."""
    return like.new_empty((0,))


def _deterministic_flag() -> bool:
    """What the backward operators receive: True when PyTorch asks for deterministic
    algorithms; False means "deformarray's own default" (``set_deterministic``)."""
    return torch.are_deterministic_algorithms_enabled()


def _register_autocast(op: Any) -> None:
    """Under autocast, run ``op`` in float32 (like torchvision's deformable operators)."""
    for device_type in ("cpu", "cuda"):
        try:
            op.register_autocast(device_type, torch.float32)
        except (ValueError, RuntimeError):  # a build without that autocast backend
            pass
        except AttributeError:  # PyTorch < 2.5: no register_autocast (mixed dtypes raise)
            return


def _cast_back(out: Tensor, input: Tensor) -> Tensor:
    """Under autocast the operator ran in float32: return the dtype of ``input``."""
    return out if out.dtype == input.dtype else out.to(input.dtype)


# ---------------------------------------------------------------------------------------
# deform_conv2d


def _strides_like_channels_last(t: Tensor) -> bool:
    """``Tensor.suggest_memory_format() == torch.channels_last``, decided from the strides as
    ATen decides it (c10's ``is_channels_last_strides_2d``): a 4-D tensor whose strides
    order its dimensions C, W, H, N from fastest to slowest. Ambiguous strides (a size-1
    channel dimension that is also plain contiguous, say) follow ATen's tie rules; an empty
    tensor is not channels_last."""
    if t.dim() != 4:
        return False
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < least:
            return False
        if d == 0 and least == strides[1]:
            return False
        least = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def _conv_memory_format(input: Tensor, weight: Tensor) -> torch.memory_format:
    """The memory format of deform_conv2d's output and of the input and weight gradients:
    channels_last when ``input`` or ``weight`` suggests it, as ``torch.nn.functional.conv2d``
    decides on the CPU (and on CUDA through cuDNN); otherwise contiguous (NCHW). The
    kernels work in NCHW: a channels_last result is one copy made here."""
    if _strides_like_channels_last(input) or _strides_like_channels_last(weight):
        return torch.channels_last
    return torch.contiguous_format


@torch.library.custom_op("deformarray::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Tensor | None,
) -> Tensor:
    out = _call_array_api(
        _api.deform_conv2d,
        dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
    )
    return out.contiguous(memory_format=_conv_memory_format(input, weight))


def _conv_out_shape(input, offset, weight, bias, stride, padding, dilation, mask):
    if _static_shapes(input, offset, weight, bias, mask):
        # Same ValueError as the eager call, raised while tracing
        from .._validate import conv_params

        return conv_params(input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation), mask).out_shape
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    h_out = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    w_out = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    return (n, c_out, h_out, w_out)


@_deform_conv2d_op.register_fake
def _(input, offset, weight, bias, stride, padding, dilation, mask):
    _common_dtype(dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask))
    shape = _conv_out_shape(input, offset, weight, bias, stride, padding, dilation, mask)
    fmt = _conv_memory_format(input, weight)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)


@torch.library.custom_op("deformarray::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    mask: Tensor | None,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (input, offset, weight, bias, mask); an absent bias or mask gives an
    empty tensor. ``deterministic=False`` means deformarray's default, not "fast"."""
    g = _call_array_api(
        _api.deform_conv2d_backward,
        dict(grad_output=grad_output, input=input, offset=offset, weight=weight, bias=bias, mask=mask),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        deterministic=True if deterministic else None,
    )
    fmt = _conv_memory_format(input, weight)
    return (
        g.input.contiguous(memory_format=fmt),
        g.offset.contiguous(),
        g.weight.contiguous(memory_format=fmt),
        _empty_like_nothing(input) if g.bias is None else g.bias.contiguous(),
        _empty_like_nothing(input) if g.mask is None else g.mask.contiguous(),
    )


@_deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, weight, bias, stride, padding, dilation, mask, deterministic):
    fmt = _conv_memory_format(input, weight)
    return (
        torch.empty_like(input, memory_format=fmt),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=fmt),
        input.new_empty((0,)) if bias is None else torch.empty_like(bias),
        input.new_empty((0,)) if mask is None else torch.empty_like(mask, memory_format=torch.contiguous_format),
    )


def _deform_conv2d_setup_context(ctx, inputs, output):
    input, offset, weight, bias, stride, padding, dilation, mask = inputs
    ctx.save_for_backward(input, offset, weight, bias, mask)
    ctx.geometry = (stride, padding, dilation)


def _deform_conv2d_backward(ctx, grad_output):
    input, offset, weight, bias, mask = ctx.saved_tensors
    stride, padding, dilation = ctx.geometry
    gi, go, gw, gb, gm = _deform_conv2d_backward_op(
        grad_output,
        input,
        offset,
        weight,
        bias,
        stride,
        padding,
        dilation,
        mask,
        _deterministic_flag(),
    )
    return (gi, go, gw, None if bias is None else gb, None, None, None, None if mask is None else gm)


_deform_conv2d_op.register_autograd(_deform_conv2d_backward, setup_context=_deform_conv2d_setup_context)
_register_autocast(_deform_conv2d_op)
_register_autocast(_deform_conv2d_backward_op)


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: int | tuple[int, int] = (1, 1),
    padding: int | tuple[int, int] = (0, 0),
    dilation: int | tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable convolution v1 (``mask=None``) or v2 (modulated), differentiable.

    A drop-in for ``torchvision.ops.deform_conv2d``: same arguments, layouts and numbers
    (see docs/deform_conv2d.md for the one border case where the gradients follow mmcv).
    input ``(N, C_in, H, W)``, offset ``(N, 2*G*kh*kw, H_out, W_out)`` as (dy, dx) pairs,
    weight ``(C_out, C_in // groups, kh, kw)``, bias ``(C_out,)``,
    mask ``(N, G*kh*kw, H_out, W_out)``. Returns ``(N, C_out, H_out, W_out)``.
    """
    out = _deform_conv2d_op(
        input,
        offset,
        weight,
        bias,
        _pair_list(stride, "stride", 1),
        _pair_list(padding, "padding", 0),
        _pair_list(dilation, "dilation", 1),
        mask,
    )
    return _cast_back(out, input)


# ---------------------------------------------------------------------------------------
# deform_roi_pool (mmcv's DeformRoIPool numbers; modulated with ``mask``)


@torch.library.custom_op("deformarray::deform_roi_pool", mutates_args=())
def _deform_roi_pool_op(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    mask: Tensor | None,
) -> Tensor:
    out = _call_array_api(
        _api.deform_roi_pool,
        dict(input=input, rois=rois, offset=offset, mask=mask),
        output_size=tuple(output_size),
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        gamma=gamma,
    )
    return out.contiguous()


def _roi_out_shape(input: Tensor, rois: Tensor, ph: Any, pw: Any) -> tuple:
    # Only what shapes tell: the values of rois (batch indices, order) are checked when the
    # operator runs, as they cannot be read while tracing.
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, C, H, W), got {tuple(input.shape)}")
    if rois.dim() != 2 or (_static_shapes(rois) and rois.shape[1] != 5):
        raise ValueError(
            f"rois must have shape (R, 5) with rows [batch_index, x1, y1, x2, y2], got {tuple(rois.shape)}"
        )
    return (rois.shape[0], input.shape[1], ph, pw)


@_deform_roi_pool_op.register_fake
def _(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask):
    _common_dtype(dict(input=input, rois=rois, offset=offset, mask=mask))
    return input.new_empty(_roi_out_shape(input, rois, output_size[0], output_size[1]))


@torch.library.custom_op("deformarray::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward_op(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    mask: Tensor | None,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, offset, mask); an absent offset or mask gives an empty tensor."""
    g = _call_array_api(
        _api.deform_roi_pool_backward,
        dict(grad_output=grad_output, input=input, rois=rois, offset=offset, mask=mask),
        output_size=tuple(output_size),
        spatial_scale=spatial_scale,
        sampling_ratio=sampling_ratio,
        gamma=gamma,
        deterministic=True if deterministic else None,
    )
    return (
        g.input.contiguous(),
        _empty_like_nothing(input) if g.offset is None else g.offset.contiguous(),
        _empty_like_nothing(input) if g.mask is None else g.mask.contiguous(),
    )


@_deform_roi_pool_backward_op.register_fake
def _(grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, deterministic):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        input.new_empty((0,)) if offset is None else torch.empty_like(offset, memory_format=torch.contiguous_format),
        input.new_empty((0,)) if mask is None else torch.empty_like(mask, memory_format=torch.contiguous_format),
    )


def _deform_roi_pool_setup_context(ctx, inputs, output):
    input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask = inputs
    ctx.save_for_backward(input, rois, offset, mask)
    ctx.args = (output_size, spatial_scale, sampling_ratio, gamma)


def _deform_roi_pool_backward(ctx, grad_output):
    input, rois, offset, mask = ctx.saved_tensors
    gi, go, gm = _deform_roi_pool_backward_op(grad_output, input, rois, offset, *ctx.args, mask, _deterministic_flag())
    # rois get no gradient (as in mmcv and torchvision)
    return (gi, None, None if offset is None else go, None, None, None, None, None if mask is None else gm)


_deform_roi_pool_op.register_autograd(_deform_roi_pool_backward, setup_context=_deform_roi_pool_setup_context)
_register_autocast(_deform_roi_pool_op)
_register_autocast(_deform_roi_pool_backward_op)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    output_size: int | tuple[int, int] = (7, 7),
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """Deformable RoI pooling with mmcv's ``deform_roi_pool`` arguments and numbers
    (modulated, DCNv2, when ``mask`` is given), differentiable in input, offset and mask.

    input ``(N, C, H, W)``; rois ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` of the
    same dtype; offset ``(R, 2, ph, pw)`` (channel 0 = x, 1 = y); mask ``(R, 1, ph, pw)``.
    Returns ``(R, C, ph, pw)``. See docs/deform_roi_pool.md.
    """
    out = _deform_roi_pool_op(
        input,
        rois,
        offset,
        _pair_list(output_size, "output_size", 1),
        float(spatial_scale),
        _int_arg(sampling_ratio, "sampling_ratio", 0, MAX_SAMPLES_PER_SIDE),
        float(gamma),
        mask,
    )
    return _cast_back(out, input)


# ---------------------------------------------------------------------------------------
# deform_psroi_pool (MXNet's DeformablePSROIPooling numbers)


@torch.library.custom_op("deformarray::deform_psroi_pool", mutates_args=())
def _deform_psroi_pool_op(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None,
    sample_per_part: int,
    trans_std: float,
    spatial_scale: float,
) -> Tensor:
    out = _call_array_api(
        _api.deform_psroi_pool,
        dict(input=input, rois=rois, offset=offset),
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
        trans_std=trans_std,
        spatial_scale=spatial_scale,
    )
    return out.contiguous()


@_deform_psroi_pool_op.register_fake
def _(input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale):
    _common_dtype(dict(input=input, rois=rois, offset=offset))
    r, _, ph, pw = _roi_out_shape(input, rois, pooled_size, pooled_size)
    return input.new_empty((r, output_dim, ph, pw))


@torch.library.custom_op("deformarray::deform_psroi_pool_backward", mutates_args=())
def _deform_psroi_pool_backward_op(
    grad_output: Tensor,
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None,
    sample_per_part: int,
    trans_std: float,
    spatial_scale: float,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients (input, offset); an absent offset gives an empty tensor."""
    g = _call_array_api(
        _api.deform_psroi_pool_backward,
        dict(grad_output=grad_output, input=input, rois=rois, offset=offset),
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
        trans_std=trans_std,
        spatial_scale=spatial_scale,
        deterministic=True if deterministic else None,
    )
    return (
        g.input.contiguous(),
        _empty_like_nothing(input) if g.offset is None else g.offset.contiguous(),
    )


@_deform_psroi_pool_backward_op.register_fake
def _(
    grad_output,
    input,
    rois,
    offset,
    output_dim,
    group_size,
    pooled_size,
    part_size,
    sample_per_part,
    trans_std,
    spatial_scale,
    deterministic,
):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        input.new_empty((0,)) if offset is None else torch.empty_like(offset, memory_format=torch.contiguous_format),
    )


def _deform_psroi_pool_setup_context(ctx, inputs, output):
    input, rois, offset, *args = inputs
    ctx.save_for_backward(input, rois, offset)
    ctx.args = tuple(args)


def _deform_psroi_pool_backward(ctx, grad_output):
    input, rois, offset = ctx.saved_tensors
    gi, go = _deform_psroi_pool_backward_op(grad_output, input, rois, offset, *ctx.args, _deterministic_flag())
    return (gi, None, None if offset is None else go) + (None,) * len(ctx.args)


_deform_psroi_pool_op.register_autograd(_deform_psroi_pool_backward, setup_context=_deform_psroi_pool_setup_context)
_register_autocast(_deform_psroi_pool_op)
_register_autocast(_deform_psroi_pool_backward_op)


def deform_psroi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Tensor | None = None,
    *,
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: int | None = None,
    sample_per_part: int = 4,
    trans_std: float = 0.1,
    spatial_scale: float = 1.0,
) -> Tensor:
    """Deformable position-sensitive RoI pooling (R-FCN; MXNet's
    ``DeformablePSROIPooling`` numbers; plain PS RoI pooling when ``offset`` is None),
    differentiable in input and offset.

    input ``(N, output_dim*group_size**2, H, W)``; rois ``(R, 5)`` rows
    ``[batch_index, x1, y1, x2, y2]`` of the same dtype; offset
    ``(R, 2*num_classes, part_size, part_size)``. Returns
    ``(R, output_dim, pooled_size, pooled_size)``. See docs/deform_psroi_pool.md.
    """
    out = _deform_psroi_pool_op(
        input,
        rois,
        offset,
        _int_arg(output_dim, "output_dim", 1),
        _int_arg(group_size, "group_size", 1),
        _int_arg(pooled_size, "pooled_size", 1),
        None if part_size is None else _int_arg(part_size, "part_size", 1),
        _int_arg(sample_per_part, "sample_per_part", 1, MAX_SAMPLES_PER_SIDE),
        float(trans_std),
        float(spatial_scale),
    )
    return _cast_back(out, input)


# ---------------------------------------------------------------------------------------
# Modules: deformable convolution


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[1]))
    return (int(value), int(value))


class DeformConv2d(nn.Module):
    """``torchvision.ops.DeformConv2d``: same constructor, parameters (``weight``,
    ``bias``), initialisation and ``forward(input, offset, mask=None)``, so torchvision
    checkpoints load as they are. The offset groups follow from ``offset``'s channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError("in_channels must be divisible by groups")
        if out_channels % groups != 0:
            raise ValueError("out_channels must be divisible by groups")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's (and ``nn.Conv2d``'s) initialisation."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input: Tensor, offset: Tensor, mask: Tensor | None = None) -> Tensor:
        return deform_conv2d(
            input,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def extra_repr(self) -> str:
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        return s


def _mmcv_init_weight(weight: Tensor, in_channels: int, kernel_size: tuple[int, int]) -> None:
    """mmcv's ModulatedDeformConv2d weight init: U(-s, s), s = 1/sqrt(in_channels*kh*kw)."""
    stdv = 1.0 / math.sqrt(in_channels * kernel_size[0] * kernel_size[1])
    with torch.no_grad():
        weight.uniform_(-stdv, stdv)


class _MmcvConvBase(nn.Module):
    """Constructor and parameters shared by the mmcv-style modules."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool | str = False,
    ) -> None:
        super().__init__()
        if in_channels % groups != 0:
            raise ValueError(f"in_channels {in_channels} must be divisible by groups {groups}")
        if out_channels % groups != 0:
            raise ValueError(f"out_channels {out_channels} must be divisible by groups {groups}")
        if in_channels % deform_groups != 0:
            raise ValueError(f"in_channels {in_channels} must be divisible by deform_groups {deform_groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        # nn.Conv2d look-alike attributes (mmcv sets them too; some tools read them)
        self.transposed = False
        self.output_padding = (0,)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:  # mmcv: a truthy value, 'auto' included, means a bias
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

    def _deform(self, x: Tensor, offset: Tensor, mask: Tensor | None) -> Tensor:
        return deform_conv2d(
            x,
            offset,
            self.weight,
            self.bias,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            mask=mask,
        )

    def _make_conv_offset(self, per_point: int) -> nn.Conv2d:
        """The offset (and mask) predictor, zero-initialised: offsets 0 (and masks
        sigmoid(0) = 0.5) at the start of training, as in the papers and mmcv."""
        conv = nn.Conv2d(
            self.in_channels,
            self.deform_groups * per_point * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(cast(Tensor, conv.bias))
        return conv

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class ModulatedDeformConv2d(_MmcvConvBase):
    """mmcv's ``ModulatedDeformConv2d``: ``forward(x, offset, mask)``, parameters ``weight``
    and ``bias`` (default ``bias=True``), mmcv's initialisation (weight
    U(-1/sqrt(in_channels*kh*kw), +...), bias 0)."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias: bool | str = True,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias)
        self.init_weights()

    def init_weights(self) -> None:
        _mmcv_init_weight(self.weight, self.in_channels, self.kernel_size)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            offset_conv = cast(nn.Conv2d, self.conv_offset)
            nn.init.zeros_(offset_conv.weight)
            nn.init.zeros_(cast(Tensor, offset_conv.bias))

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self._deform(x, offset, mask)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (DCNv2 layer): a drop-in for ``nn.Conv2d``
    that predicts its own offsets and masks with ``conv_offset`` (an ``nn.Conv2d`` with
    ``3*deform_groups*kh*kw`` outputs, zero-initialised). Its output is split in three
    equal parts ``o1, o2, m``: the offsets are ``cat(o1, o2)`` read as (dy, dx) pairs, the
    mask is ``sigmoid(m)``. ``state_dict`` keys: ``weight``, ``bias``, ``conv_offset.weight``,
    ``conv_offset.bias``, as mmcv's, so mmcv/mmdet checkpoints load."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._make_conv_offset(3)
        self.init_weights()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        o1, o2, m = torch.chunk(self.conv_offset(x), 3, dim=1)
        return self._deform(x, torch.cat((o1, o2), dim=1), torch.sigmoid(m))


class DeformConv2dPack(_MmcvConvBase):
    """mmcv's ``DeformConv2dPack`` (DCNv1 layer): a drop-in for ``nn.Conv2d`` that
    predicts its own offsets with ``conv_offset`` (an ``nn.Conv2d`` with
    ``2*deform_groups*kh*kw`` outputs read as (dy, dx) pairs, zero-initialised, so the
    layer starts as a plain convolution).

    Constructor as mmcv's: ``(in_channels, out_channels, kernel_size, stride=1, padding=0,
    dilation=1, groups=1, deform_groups=1, bias=False, im2col_step=32)``; mmcv allows no
    bias, here ``bias=True`` adds one (key ``bias``). ``im2col_step`` is accepted and
    ignored (deformarray bounds its workspace itself). Weight init as mmcv's
    (``kaiming_uniform_(nonlinearity='relu')``). ``state_dict`` keys: ``weight``
    (``bias``), ``conv_offset.weight``, ``conv_offset.bias``. ``forward(x)``.
    """

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        deform_groups=1,
        bias: bool | str = False,
        im2col_step: int = 32,
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias)
        self.im2col_step = im2col_step
        self.reset_parameters()  # before conv_offset exists: mmcv's order of random draws
        self.conv_offset = self._make_conv_offset(2)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(cast(Tensor, self.conv_offset.bias))

    def forward(self, x: Tensor) -> Tensor:
        return self._deform(x, self.conv_offset(x), None)


# ---------------------------------------------------------------------------------------
# Modules: RoI pooling


class DeformRoIPool(nn.Module):
    """mmcv's ``DeformRoIPool``: ``forward(input, rois, offset=None)``, no parameters."""

    def __init__(
        self,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def _pool(self, input: Tensor, rois: Tensor, offset: Tensor | None, mask: Tensor | None = None) -> Tensor:
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma, mask
        )

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class ModulatedDeformRoIPool(DeformRoIPool):
    """Modulated deformable RoI pooling (DCNv2): ``forward(input, rois, offset=None,
    mask=None)``, each bin's average multiplied by ``mask`` ``(R, 1, ph, pw)``."""

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        return self._pool(input, rois, offset, mask)


def _roi_fc(
    in_features: int, hidden: int, out_features: int, layers: int, final: nn.Module | None = None
) -> nn.Sequential:
    """mmcv's offset/mask heads: ``layers`` Linear layers with ReLU between them (and an
    optional final activation), the last Linear zero-initialised."""
    mods: list[nn.Module] = []
    width = in_features
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    last = nn.Linear(width, out_features)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    mods.append(last)
    if final is not None:
        mods.append(final)
    return nn.Sequential(*mods)


class DeformRoIPoolPack(DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack``: pools without offsets, predicts the offsets from that
    with ``offset_fc`` (Linear-ReLU-Linear-ReLU-Linear, last layer zero-initialised), then
    pools again with them. Same constructor and ``state_dict`` keys
    (``offset_fc.{0,2,4}.{weight,bias}``) as mmcv. ``forward(input, rois)``."""

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        ph, pw = self.output_size
        self.offset_fc = _roi_fc(ph * pw * output_channels, deform_fc_channels, ph * pw * 2, 3)

    def _check_channels(self, input: Tensor) -> None:
        if input.shape[1] != self.output_channels:
            raise ValueError(
                f"input must have output_channels = {self.output_channels} channels, got shape {tuple(input.shape)}"
            )

    def _offset(self, pooled: Tensor) -> Tensor:
        r = pooled.shape[0]
        return self.offset_fc(pooled.reshape(r, -1)).reshape(r, 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        return self._pool(input, rois, self._offset(self._pool(input, rois, None)))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """mmcv's ``ModulatedDeformRoIPoolPack``: as ``DeformRoIPoolPack`` plus a mask head
    ``mask_fc`` (Linear-ReLU-Linear-Sigmoid, last Linear zero-initialised, so masks start at
    0.5). ``state_dict`` keys as mmcv's: ``offset_fc.{0,2,4}.*``, ``mask_fc.{0,2}.*``.
    ``forward(input, rois)``."""

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ) -> None:
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        ph, pw = self.output_size
        self.mask_fc = _roi_fc(ph * pw * output_channels, deform_fc_channels, ph * pw, 2, final=nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = self._pool(input, rois, None)
        r = pooled.shape[0]
        mask = self.mask_fc(pooled.reshape(r, -1)).reshape(r, 1, *self.output_size)
        return self._pool(input, rois, self._offset(pooled), mask)


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling (R-FCN), no parameters:
    ``forward(input, rois, offset=None)``; see ``deform_psroi_pool``."""

    def __init__(
        self,
        output_dim: int,
        group_size: int,
        pooled_size: int,
        part_size: int | None = None,
        sample_per_part: int = 4,
        trans_std: float = 0.1,
        spatial_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.output_dim = int(output_dim)
        self.group_size = int(group_size)
        self.pooled_size = int(pooled_size)
        self.part_size = None if part_size is None else int(part_size)
        self.sample_per_part = int(sample_per_part)
        self.trans_std = float(trans_std)
        self.spatial_scale = float(spatial_scale)

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor | None = None) -> Tensor:
        return deform_psroi_pool(
            input,
            rois,
            offset,
            output_dim=self.output_dim,
            group_size=self.group_size,
            pooled_size=self.pooled_size,
            part_size=self.part_size,
            sample_per_part=self.sample_per_part,
            trans_std=self.trans_std,
            spatial_scale=self.spatial_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, group_size={self.group_size}, "
            f"pooled_size={self.pooled_size}, part_size={self.part_size}, "
            f"sample_per_part={self.sample_per_part}, trans_std={self.trans_std}, "
            f"spatial_scale={self.spatial_scale}"
        )
