"""ms_deform_attn as PyTorch operators: ``torch.ops.deformarray.ms_deform_attn`` and its
explicit backward, with fake implementations (``torch.compile(fullgraph=True)``), an
autograd formula and autocast to float32. No maths: the array API computes.

spatial_shapes and level_start_index are int64 tensors (or lists, made tensors here):
the levels' geometry, read on the host when the operator runs (one small device-to-host
copy on CUDA), never differentiated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _api, _validate_msda
from . import _onnx_nodes
from ._glue import OP_TAGS, _call_array_api, _cast_back, _common_dtype, _deterministic_flag, _register_autocast


def _geometry(t: Tensor) -> np.ndarray:
    """The values of an integer geometry tensor, on the host."""
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"spatial_shapes and level_start_index must hold integers, got dtype {t.dtype}")
    return t.detach().to("cpu", torch.int64).numpy()


def _as_geometry(value: Any, name: str) -> Tensor:
    """A list, tuple or NumPy array of ints as an int64 CPU tensor; tensors pass."""
    if isinstance(value, Tensor):
        return value
    return torch.as_tensor(_validate_msda.as_integers(np.asarray(value), name, typed=False, shown=repr(value)))


@torch.library.custom_op("deformarray::ms_deform_attn", mutates_args=(), tags=OP_TAGS)
def _ms_deform_attn_op(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    out = _call_array_api(
        _api.ms_deform_attn,
        dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights),
        spatial_shapes=_geometry(spatial_shapes),
        level_start_index=_geometry(level_start_index),
    )
    return out.contiguous()


def _msda_out_shape(value: Tensor, sampling_locations: Tensor, attention_weights: Tensor) -> tuple:
    # Only what shapes tell: the geometry's values are checked when the operator runs.
    if value.dim() != 4:
        raise ValueError(f"value must have shape (N, S, M, D), got {tuple(value.shape)}")
    if sampling_locations.dim() != 6:
        shape = tuple(sampling_locations.shape)
        raise ValueError(f"sampling_locations must have shape (N, Lq, M, L, P, 2), got {shape}")
    if attention_weights.dim() != 5:
        raise ValueError(f"attention_weights must have shape (N, Lq, M, L, P), got {tuple(attention_weights.shape)}")
    return (value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3])


@_ms_deform_attn_op.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    _common_dtype(dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights))
    return value.new_empty(_msda_out_shape(value, sampling_locations, attention_weights))


@torch.library.custom_op("deformarray::ms_deform_attn_backward", mutates_args=(), tags=OP_TAGS)
def _ms_deform_attn_backward_op(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (value, sampling_locations, attention_weights)."""
    g = _call_array_api(
        _api.ms_deform_attn_backward,
        dict(
            grad_output=grad_output,
            value=value,
            sampling_locations=sampling_locations,
            attention_weights=attention_weights,
        ),
        spatial_shapes=_geometry(spatial_shapes),
        level_start_index=_geometry(level_start_index),
        deterministic=True if deterministic else None,
    )
    return g.value.contiguous(), g.sampling_locations.contiguous(), g.attention_weights.contiguous()


@_ms_deform_attn_backward_op.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, deterministic):
    like = dict(memory_format=torch.contiguous_format)
    return (
        torch.empty_like(value, **like),
        torch.empty_like(sampling_locations, **like),
        torch.empty_like(attention_weights, **like),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    gv, gl, ga = _ms_deform_attn_backward_op(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        _deterministic_flag(),
    )
    return gv, None, None, gl, ga


_ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)
_register_autocast(_ms_deform_attn_op)
_register_autocast(_ms_deform_attn_backward_op)


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor | Sequence[Sequence[int]],
    level_start_index: Tensor | Sequence[int],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention (Deformable DETR), differentiable in value,
    sampling_locations and attention_weights; the numbers of the ``grid_sample``
    composition of Deformable DETR, mmcv and transformers.

    value ``(N, S, M, D)``; spatial_shapes ``(L, 2)`` rows ``(H_l, W_l)`` and
    level_start_index ``(L,)``, integer tensors (any device) or lists; sampling_locations
    ``(N, Lq, M, L, P, 2)`` in [0, 1] (x, y); attention_weights ``(N, Lq, M, L, P)``.
    Returns ``(N, Lq, M*D)``. See docs/ms_deform_attn.md.
    """
    args = (
        value,
        _as_geometry(spatial_shapes, "spatial_shapes"),
        _as_geometry(level_start_index, "level_start_index"),
        sampling_locations,
        attention_weights,
    )
    if _onnx_nodes.exporting():  # torch.onnx.export: a deformarray::MultiScaleDeformableAttention node
        _common_dtype(dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights))
        shape = _msda_out_shape(value, sampling_locations, attention_weights)
        return _onnx_nodes.emit(_onnx_nodes.ms_deform_attn_node, shape, *args)
    return _cast_back(_ms_deform_attn_op(*args), value)
