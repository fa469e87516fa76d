"""dcnv3 and dcnv4 on JAX arrays; the geometry (kernel size, stride, ...) is static."""

from __future__ import annotations

from .. import _api, _validate_dcn
from ._machinery import Op, apply, checked_specs

_GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "group", "group_channels", "offset_scale", "remove_center")


def _dcnv3_out_shape(arrays: dict, statics: dict) -> tuple:
    a = checked_specs(arrays)
    return _validate_dcn.dcnv3_params(a["input"], a["offset"], a["mask"], **statics).out_shape


def _dcnv4_out_shape(arrays: dict, statics: dict) -> tuple:
    a = checked_specs(arrays)
    return _validate_dcn.dcnv4_params(a["input"], a["offset_mask"], **statics).out_shape


_DCNV3 = Op(
    name="dcnv3",
    arrays=("input", "offset", "mask"),
    ndims=dict(input=4, offset=4, mask=4, grad_output=4),
    forward=_api.dcnv3,
    backward=_api.dcnv3_backward,
    out_shape=_dcnv3_out_shape,
    per_image=("input", "offset", "mask"),
)

_DCNV4 = Op(
    name="dcnv4",
    arrays=("input", "offset_mask"),
    ndims=dict(input=4, offset_mask=4, grad_output=4),
    forward=_api.dcnv4,
    backward=_api.dcnv4_backward,
    out_shape=_dcnv4_out_shape,
    per_image=("input", "offset_mask"),
)


def dcnv3(
    input,
    offset,
    mask,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group=1,
    group_channels=None,
    offset_scale=1.0,
    remove_center=False,
):
    """``deformarray.dcnv3`` on JAX arrays (jit, grad, vmap). Gradients flow to input,
    offset and mask. See docs/dcnv3.md."""
    values = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return apply(_DCNV3, dict(input=input, offset=offset, mask=mask), dict(zip(_GEOMETRY, values)))


def dcnv4(
    input,
    offset_mask,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    group=1,
    group_channels=None,
    offset_scale=1.0,
    remove_center=False,
):
    """``deformarray.dcnv4`` on JAX arrays (jit, grad, vmap). Gradients flow to input and
    offset_mask (zeros in its padding). See docs/dcnv3.md."""
    values = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return apply(_DCNV4, dict(input=input, offset_mask=offset_mask), dict(zip(_GEOMETRY, values)))
