"""DCNv3 and DCNv4 as PyTorch operators: ``torch.ops.deformarray.dcnv3`` /
``deformarray::dcnv4`` and their explicit backwards, with fake implementations
(``torch.compile(fullgraph=True)``), autograd formulas and autocast to float32. No maths:
the array API computes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _api
from .._validate import sliding_output_size
from .._validate_dcn import implied_group_channels
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
    window = zip(kernel_size, stride, padding, dilation)
    h_out, w_out = (sliding_output_size(size, *axis) for size, axis in zip((h, w), window))
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


def _register(op, backward_op, tensors: int) -> None:
    """Autograd and autocast of ``op``, whose first ``tensors`` arguments are the tensors
    (each one differentiable, its gradient from ``backward_op``) and the rest geometry."""

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:tensors])
        ctx.geometry = inputs[tensors:]

    def backward(ctx, grad_output):
        grads = backward_op(grad_output, *ctx.saved_tensors, *ctx.geometry, _deterministic_flag())
        return tuple(grads) + (None,) * len(ctx.geometry)

    op.register_autograd(backward, setup_context=setup_context)
    _register_autocast(op)
    _register_autocast(backward_op)


_register(_dcnv3_op, _dcnv3_backward_op, 3)


def _normalised(channels, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center):
    """The operators' argument values: int pairs as lists, ints and floats checked."""
    group = _int_arg(group, "group", 1)
    if group_channels is None:
        group_channels = implied_group_channels(channels, group)
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


def _call(op, node, tensors: dict[str, Tensor], geometry: tuple) -> Tensor:
    """A public DCN function: ``op`` on the tensors (in order) and the checked geometry, in
    the input's dtype; under torch.onnx.export the ``node`` (a deformarray::DCNv3 / DCNv4
    node, docs/deployment.md) instead."""
    input = tensors["input"]
    args = _normalised(input.shape[-1], *geometry)
    if _onnx_nodes.exporting():
        _common_dtype(tensors)
        return _onnx_nodes.emit(node, _out_shape(input, *args[:4]), *tensors.values(), *args)
    return _cast_back(op(*tensors.values(), *args), input)


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
    geometry = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return _call(_dcnv3_op, _onnx_nodes.dcnv3_node, dict(input=input, offset=offset, mask=mask), geometry)


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


_register(_dcnv4_op, _dcnv4_backward_op, 2)


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
    geometry = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return _call(_dcnv4_op, _onnx_nodes.dcnv4_node, dict(input=input, offset_mask=offset_mask), geometry)
