"""``deformarray::deform_roi_pool`` and ``deformarray::deform_roi_pool_backward`` (mmcv's
DeformRoIPool numbers; modulated with ``mask``): the custom operators and the public
``deform_roi_pool``.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _api
from .._validate import MAX_SAMPLES_PER_SIDE
from . import _onnx_nodes
from ._glue import (
    OP_TAGS,
    _call_array_api,
    _cast_back,
    _common_dtype,
    _deterministic_flag,
    _fake_grad_or_nothing,
    _grad_or_nothing,
    _int_arg,
    _pair_list,
    _register_autocast,
    _roi_out_shape,
)


@torch.library.custom_op("deformarray::deform_roi_pool", mutates_args=(), tags=OP_TAGS)
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


@_deform_roi_pool_op.register_fake
def _(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask):
    _common_dtype(dict(input=input, rois=rois, offset=offset, mask=mask))
    return input.new_empty(_roi_out_shape(input, rois, output_size[0], output_size[1]))


@torch.library.custom_op("deformarray::deform_roi_pool_backward", mutates_args=(), tags=OP_TAGS)
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
    return g.input.contiguous(), _grad_or_nothing(g.offset, input), _grad_or_nothing(g.mask, input)


@_deform_roi_pool_backward_op.register_fake
def _(grad_output, input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, mask, deterministic):
    return (
        torch.empty_like(input, memory_format=torch.contiguous_format),
        _fake_grad_or_nothing(offset, input),
        _fake_grad_or_nothing(mask, input),
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
    args = (
        input,
        rois,
        offset,
        _pair_list(output_size, "output_size", 1),
        float(spatial_scale),
        _int_arg(sampling_ratio, "sampling_ratio", 0, MAX_SAMPLES_PER_SIDE),
        float(gamma),
        mask,
    )
    if _onnx_nodes.exporting():  # torch.onnx.export: a deformarray::DeformRoIPool node (docs/deployment.md)
        _common_dtype(dict(input=input, rois=rois, offset=offset, mask=mask))
        shape = _roi_out_shape(input, rois, *args[3])
        return _onnx_nodes.emit(_onnx_nodes.deform_roi_pool_node, shape, *args)
    return _cast_back(_deform_roi_pool_op(*args), input)
