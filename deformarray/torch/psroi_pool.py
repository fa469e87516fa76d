"""``deformarray::deform_psroi_pool`` and ``deformarray::deform_psroi_pool_backward``
(MXNet's DeformablePSROIPooling numbers): the custom operators and the public
``deform_psroi_pool``.
"""

import torch
from torch import Tensor

from .. import _api
from .._validate import MAX_SAMPLES_PER_SIDE, PSROI_POOL_ARGS
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
    _register_autocast,
    _roi_out_shape,
)


@torch.library.custom_op("deformarray::deform_psroi_pool", mutates_args=(), tags=OP_TAGS)
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
    geometry = (output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    out = _call_array_api(
        _api.deform_psroi_pool, dict(input=input, rois=rois, offset=offset), **dict(zip(PSROI_POOL_ARGS, geometry))
    )
    return out.contiguous()


@_deform_psroi_pool_op.register_fake
def _(input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale):
    _common_dtype(dict(input=input, rois=rois, offset=offset))
    r, _, ph, pw = _roi_out_shape(input, rois, pooled_size, pooled_size)
    return input.new_empty((r, output_dim, ph, pw))


@torch.library.custom_op("deformarray::deform_psroi_pool_backward", mutates_args=(), tags=OP_TAGS)
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
    geometry = (output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    g = _call_array_api(
        _api.deform_psroi_pool_backward,
        dict(grad_output=grad_output, input=input, rois=rois, offset=offset),
        **dict(zip(PSROI_POOL_ARGS, geometry)),
        deterministic=True if deterministic else None,
    )
    return g.input.contiguous(), _grad_or_nothing(g.offset, input)


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
    return torch.empty_like(input, memory_format=torch.contiguous_format), _fake_grad_or_nothing(offset, input)


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
    args = (
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
    if _onnx_nodes.exporting():  # torch.onnx.export: a deformarray::DeformPSRoIPool node (docs/deployment.md)
        _common_dtype(dict(input=input, rois=rois, offset=offset))
        r, _, ph, pw = _roi_out_shape(input, rois, args[5], args[5])
        return _onnx_nodes.emit(_onnx_nodes.deform_psroi_pool_node, (r, args[3], ph, pw), *args)
    return _cast_back(_deform_psroi_pool_op(*args), input)
