"""DCNv3 and DCNv4 as PyTorch operators: ``torch.ops.deformarray.dcnv3`` /
``deformarray::dcnv4`` and their explicit backwards, with fake implementations
(``torch.compile(fullgraph=True)``), autograd formulas and autocast to float32. No maths:
the array API computes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _api
from . import _onnx_nodes
from ._glue import (
    OP_TAGS,
    _call_array_api,
    _cast_back,
    _common_dtype,
    _deterministic_flag,
    _int_arg,
    _pair_list,
    _register_autocast,
)


def _geometry_kwargs(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center):
    return dict(
        kernel_size=tuple(kernel_size),
        stride=tuple(stride),
        padding=tuple(padding),
        dilation=tuple(dilation),
        group=group,
        group_channels=group_channels,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )


def _out_shape(input: Tensor, kernel_size, stride, padding, dilation) -> tuple:
    # Only what shapes tell; the array API checks everything when the operator runs.
    if input.dim() != 4:
        raise ValueError(f"input must have shape (N, H, W, G*D), got {tuple(input.shape)}")
    n, h, w, c = input.shape
    h_out = (h + 2 * padding[0] - (dilation[0] * (kernel_size[0] - 1) + 1)) // stride[0] + 1
    w_out = (w + 2 * padding[1] - (dilation[1] * (kernel_size[1] - 1) + 1)) // stride[1] + 1
    return (n, h_out, w_out, c)


def _like(t: Tensor) -> Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------
# dcnv3


@torch.library.custom_op("deformarray::dcnv3", mutates_args=(), tags=OP_TAGS)
def _dcnv3_op(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    geo = _geometry_kwargs(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return _call_array_api(_api.dcnv3, dict(input=input, offset=offset, mask=mask), **geo).contiguous()


@_dcnv3_op.register_fake
def _(input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center):
    _common_dtype(dict(input=input, offset=offset, mask=mask))
    return input.new_empty(_out_shape(input, kernel_size, stride, padding, dilation))


@torch.library.custom_op("deformarray::dcnv3_backward", mutates_args=(), tags=OP_TAGS)
def _dcnv3_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (input, offset, mask)."""
    geo = _geometry_kwargs(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    g = _call_array_api(
        _api.dcnv3_backward,
        dict(grad_output=grad_output, input=input, offset=offset, mask=mask),
        **geo,
        deterministic=True if deterministic else None,
    )
    return g.input.contiguous(), g.offset.contiguous(), g.mask.contiguous()


@_dcnv3_backward_op.register_fake
def _(grad_output, input, offset, mask, *args):
    return _like(input), _like(offset), _like(mask)


def _dcnv3_setup_context(ctx, inputs, output):
    input, offset, mask, *geometry = inputs
    ctx.save_for_backward(input, offset, mask)
    ctx.geometry = geometry


def _dcnv3_backward(ctx, grad_output):
    input, offset, mask = ctx.saved_tensors
    gi, go, gm = _dcnv3_backward_op(grad_output, input, offset, mask, *ctx.geometry, _deterministic_flag())
    return (gi, go, gm) + (None,) * len(ctx.geometry)


_dcnv3_op.register_autograd(_dcnv3_backward, setup_context=_dcnv3_setup_context)
_register_autocast(_dcnv3_op)
_register_autocast(_dcnv3_backward_op)


def _normalised(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center, channels):
    """The operators' argument values: int pairs as lists, ints and floats checked."""
    group = _int_arg(group, "group", 1)
    if group_channels is None:
        if channels % group:
            raise ValueError(f"input channels C = {channels} must be a multiple of group = {group}")
        group_channels = channels // group
    return (
        _pair_list(kernel_size, "kernel_size", 1),
        _pair_list(stride, "stride", 1),
        _pair_list(padding, "padding", 0),
        _pair_list(dilation, "dilation", 1),
        group,
        _int_arg(group_channels, "group_channels", 1),
        float(offset_scale),
        bool(remove_center),
    )


def dcnv3(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    group: int = 1,
    group_channels: int | None = None,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    """DCNv3 (InternImage's ``DCNv3Function`` numbers), differentiable in input, offset and
    mask. Channels-last: input ``(N, H, W, G*D)``, offset ``(N, H_out, W_out, G*P*2)``,
    mask ``(N, H_out, W_out, G*P)`` (no softmax here). Returns ``(N, H_out, W_out, G*D)``.
    See docs/dcnv3.md."""
    args = _normalised(
        kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center, input.shape[-1]
    )
    if _onnx_nodes.exporting():  # torch.onnx.export: a deformarray::DCNv3 node (docs/deployment.md)
        _common_dtype(dict(input=input, offset=offset, mask=mask))
        shape = _out_shape(input, *args[:4])
        return _onnx_nodes.emit(_onnx_nodes.dcnv3_node, shape, input, offset, mask, *args)
    return _cast_back(_dcnv3_op(input, offset, mask, *args), input)


# ---------------------------------------------------------------------------------------
# dcnv4


@torch.library.custom_op("deformarray::dcnv4", mutates_args=(), tags=OP_TAGS)
def _dcnv4_op(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
) -> Tensor:
    geo = _geometry_kwargs(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return _call_array_api(_api.dcnv4, dict(input=input, offset_mask=offset_mask), **geo).contiguous()


@_dcnv4_op.register_fake
def _(input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center):
    _common_dtype(dict(input=input, offset_mask=offset_mask))
    return input.new_empty(_out_shape(input, kernel_size, stride, padding, dilation))


@torch.library.custom_op("deformarray::dcnv4_backward", mutates_args=(), tags=OP_TAGS)
def _dcnv4_backward_op(
    grad_output: Tensor,
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    group: int,
    group_channels: int,
    offset_scale: float,
    remove_center: bool,
    deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients (input, offset_mask)."""
    geo = _geometry_kwargs(kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    g = _call_array_api(
        _api.dcnv4_backward,
        dict(grad_output=grad_output, input=input, offset_mask=offset_mask),
        **geo,
        deterministic=True if deterministic else None,
    )
    return g.input.contiguous(), g.offset_mask.contiguous()


@_dcnv4_backward_op.register_fake
def _(grad_output, input, offset_mask, *args):
    return _like(input), _like(offset_mask)


def _dcnv4_setup_context(ctx, inputs, output):
    input, offset_mask, *geometry = inputs
    ctx.save_for_backward(input, offset_mask)
    ctx.geometry = geometry


def _dcnv4_backward(ctx, grad_output):
    input, offset_mask = ctx.saved_tensors
    gi, gom = _dcnv4_backward_op(grad_output, input, offset_mask, *ctx.geometry, _deterministic_flag())
    return (gi, gom) + (None,) * len(ctx.geometry)


_dcnv4_op.register_autograd(_dcnv4_backward, setup_context=_dcnv4_setup_context)
_register_autocast(_dcnv4_op)
_register_autocast(_dcnv4_backward_op)


def dcnv4(
    input: Tensor,
    offset_mask: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    group: int = 1,
    group_channels: int | None = None,
    offset_scale: float = 1.0,
    remove_center: bool = False,
) -> Tensor:
    """DCNv4 (``DCNv4Function`` numbers, without its limits), differentiable in input and
    offset_mask. input ``(N, H, W, G*D)``; offset_mask ``(N, H_out, W_out, K)``, per group
    P (x, y) offset pairs then P mask values, K >= 3*G*P (DCNv4 pads K to a multiple of 8).
    Returns ``(N, H_out, W_out, G*D)``. See docs/dcnv3.md."""
    args = _normalised(
        kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center, input.shape[-1]
    )
    if _onnx_nodes.exporting():  # torch.onnx.export: a deformarray::DCNv4 node (docs/deployment.md)
        _common_dtype(dict(input=input, offset_mask=offset_mask))
        shape = _out_shape(input, *args[:4])
        return _onnx_nodes.emit(_onnx_nodes.dcnv4_node, shape, input, offset_mask, *args)
    return _cast_back(_dcnv4_op(input, offset_mask, *args), input)
