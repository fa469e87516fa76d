"""ms_deform_attn on JAX arrays: spatial_shapes and level_start_index are concrete statics
(the levels' geometry, not data); gradients flow to the three float arrays."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .. import _api, _validate_msda
from ._machinery import Op, apply, checked_specs, freeze


def _msda_out_shape(arrays: dict, statics: dict) -> tuple:
    a = checked_specs(arrays)
    return _validate_msda.msda_params(
        a["value"],
        statics["spatial_shapes"],
        statics["level_start_index"],
        a["sampling_locations"],
        a["attention_weights"],
    ).out_shape


_MSDA = Op(
    name="ms_deform_attn",
    arrays=("value", "sampling_locations", "attention_weights"),
    ndims=dict(value=4, sampling_locations=6, attention_weights=5, grad_output=3),
    forward=_api.ms_deform_attn,
    backward=_api.ms_deform_attn_backward,
    out_shape=_msda_out_shape,
    per_image=("value", "sampling_locations", "attention_weights"),
)


def _geometry(arr: Any, name: str) -> tuple:
    """``spatial_shapes`` / ``level_start_index`` as nested tuples of ints (hashable
    statics); a traced array cannot be read, so it is refused with the way out."""
    if isinstance(arr, jax.core.Tracer):
        raise TypeError(
            f"{name} must be concrete (a list, a NumPy array or a concrete JAX array), got a traced "
            f"array: under jax.jit close over it or mark it static (static_argnames); it is the "
            f"levels' geometry, not data"
        )
    # typed=False: an empty one passes whatever its dtype (the shape checks then refuse it)
    return freeze(_validate_msda.as_integers(np.asarray(arr), name, typed=False).tolist())


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """``deformarray.ms_deform_attn`` on JAX arrays: differentiable, usable under ``jax.jit``
    and ``jax.vmap``. Gradients flow to value, sampling_locations and attention_weights;
    spatial_shapes and level_start_index must be concrete. See docs/ms_deform_attn.md."""
    arrays = dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    statics = dict(
        spatial_shapes=_geometry(spatial_shapes, "spatial_shapes"),
        level_start_index=_geometry(level_start_index, "level_start_index"),
    )
    return apply(_MSDA, arrays, statics)
