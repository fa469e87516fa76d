"""deform_roi_pool and deform_psroi_pool on JAX arrays: ``rois`` get zero gradients (as in
torchvision and mmcv); their values can only be checked on concrete arrays (under ``jit``,
inside the callback)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .. import _api, _validate
from ._machinery import Op, apply, checked_specs


def _host_rois(rois: Any) -> np.ndarray:
    """The RoIs' values when known, else a valid stand-in of the same shape (all rows
    ``[0, 0, 0, 0, 0]``) so that the shape checks can run at trace time."""
    if isinstance(rois, jax.core.Tracer):
        return np.zeros(tuple(rois.shape), np.dtype(rois.dtype))
    return np.asarray(rois)


def _roi_out_shape(arrays: dict, statics: dict) -> tuple:
    a = checked_specs(arrays)
    return _validate.roi_pool_params(
        a["input"],
        _host_rois(arrays["rois"]),
        a["offset"],
        a["mask"],
        statics["output_size"],
        statics["spatial_scale"],
        statics["sampling_ratio"],
        statics["gamma"],
    ).out_shape


def _psroi_out_shape(arrays: dict, statics: dict) -> tuple:
    a = checked_specs(arrays)
    return _validate.psroi_pool_params(a["input"], _host_rois(arrays["rois"]), a["offset"], **statics).out_shape


_ROI = Op(
    name="deform_roi_pool",
    arrays=("input", "rois", "offset", "mask"),
    ndims=dict(input=4, rois=2, offset=4, mask=4, grad_output=4),
    forward=_api.deform_roi_pool,
    backward=_api.deform_roi_pool_backward,
    out_shape=_roi_out_shape,
    no_grad=("rois",),
)


def deform_roi_pool(
    input, rois, offset=None, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None
):
    """``deformarray.deform_roi_pool`` on JAX arrays. Gradients flow to input, offset and
    mask; ``rois`` gets zeros. See docs/jax.md."""
    arrays = dict(input=input, rois=rois, offset=offset, mask=mask)
    statics = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma)
    return apply(_ROI, arrays, statics)


_PSROI = Op(
    name="deform_psroi_pool",
    arrays=("input", "rois", "offset"),
    ndims=dict(input=4, rois=2, offset=4, grad_output=4),
    forward=_api.deform_psroi_pool,
    backward=_api.deform_psroi_pool_backward,
    out_shape=_psroi_out_shape,
    no_grad=("rois",),
)


def deform_psroi_pool(
    input,
    rois,
    offset=None,
    *,
    output_dim,
    group_size,
    pooled_size,
    part_size=None,
    sample_per_part=4,
    trans_std=0.1,
    spatial_scale=1.0,
):
    """``deformarray.deform_psroi_pool`` on JAX arrays. Gradients flow to input and offset;
    ``rois`` gets zeros. See docs/jax.md."""
    arrays = dict(input=input, rois=rois, offset=offset)
    geometry = (output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    return apply(_PSROI, arrays, dict(zip(_validate.PSROI_POOL_ARGS, geometry)))
