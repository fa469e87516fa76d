"""``deformarray::deform_conv2d`` and ``deformarray::deform_conv2d_backward``: the custom
operators (torch.library definitions, fake kernels, autograd formula, autocast) and the
public ``deform_conv2d``. Its output and the input and weight gradients keep channels_last
as ``torch.nn.functional.conv2d`` does (the kernels work in NCHW: one copy here).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _api
from .._validate import conv_params, sliding_output_size
from . import _onnx_nodes
from ._glue import (
    OP_TAGS,
    _call_array_api,
    _cast_back,
    _common_dtype,
    _deterministic_flag,
    _fake_grad_or_nothing,
    _grad_or_nothing,
    _pair_list,
    _register_autocast,
    _static_shapes,
)


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


@torch.library.custom_op("deformarray::deform_conv2d", mutates_args=(), tags=OP_TAGS)
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
        return conv_params(input, offset, weight, bias, tuple(stride), tuple(padding), tuple(dilation), mask).out_shape
    n, _, h, w = input.shape
    c_out, _, kh, kw = weight.shape
    h_out = sliding_output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = sliding_output_size(w, kw, stride[1], padding[1], dilation[1])
    return (n, c_out, h_out, w_out)


@_deform_conv2d_op.register_fake
def _(input, offset, weight, bias, stride, padding, dilation, mask):
    _common_dtype(dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask))
    shape = _conv_out_shape(input, offset, weight, bias, stride, padding, dilation, mask)
    fmt = _conv_memory_format(input, weight)
    return torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt)


@torch.library.custom_op("deformarray::deform_conv2d_backward", mutates_args=(), tags=OP_TAGS)
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
        _grad_or_nothing(g.bias, input),
        _grad_or_nothing(g.mask, input),
    )


@_deform_conv2d_backward_op.register_fake
def _(grad_output, input, offset, weight, bias, stride, padding, dilation, mask, deterministic):
    fmt = _conv_memory_format(input, weight)
    return (
        torch.empty_like(input, memory_format=fmt),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=fmt),
        _fake_grad_or_nothing(bias, input),
        _fake_grad_or_nothing(mask, input),
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
    args = (
        input,
        offset,
        weight,
        bias,
        _pair_list(stride, "stride", 1),
        _pair_list(padding, "padding", 0),
        _pair_list(dilation, "dilation", 1),
        mask,
    )
    if _onnx_nodes.exporting():  # torch.onnx.export: the ONNX DeformConv node (docs/deployment.md)
        _common_dtype(dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask))
        return _onnx_nodes.emit(_onnx_nodes.deform_conv2d_node, _conv_out_shape(*args), *args)
    return _cast_back(_deform_conv2d_op(*args), input)
