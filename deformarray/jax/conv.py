"""deform_conv2d on JAX arrays."""

from __future__ import annotations

from .. import _api, _validate
from ._machinery import Op, apply, checked_specs


def _conv_out_shape(arrays: dict, statics: dict) -> tuple:
    a = checked_specs(arrays)
    return _validate.conv_params(
        a["input"],
        a["offset"],
        a["weight"],
        a["bias"],
        statics["stride"],
        statics["padding"],
        statics["dilation"],
        a["mask"],
    ).out_shape


_CONV = Op(
    name="deform_conv2d",
    arrays=("input", "offset", "weight", "bias", "mask"),
    ndims=dict(input=4, offset=4, weight=4, bias=1, mask=4, grad_output=4),
    forward=_api.deform_conv2d,
    backward=_api.deform_conv2d_backward,
    out_shape=_conv_out_shape,
    per_image=("input", "offset", "mask"),
)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """``deformarray.deform_conv2d`` on JAX arrays, differentiable (``jax.grad``), and usable
    under ``jax.jit``, ``jax.vmap`` and ``shard_map``. Gradients flow to input, offset,
    weight, bias and mask. See docs/jax.md and docs/deform_conv2d.md."""
    arrays = dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    return apply(_CONV, arrays, dict(stride=stride, padding=padding, dilation=dilation))
