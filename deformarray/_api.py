"""Public functions: validate -> pick the backend -> call it."""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _config, _warmup
from ._dispatch import backend_of, operator_module
from ._validate import (
    check_dtypes,
    check_grad_output,
    conv_params,
    native_arrays,
    psroi_pool_params,
    roi_pool_params,
)
from ._validate_dcn import dcnv3_params, dcnv4_params
from ._validate_msda import msda_params


class DeformConv2dGrads(NamedTuple):
    """Gradients of ``deform_conv2d`` with respect to each of its array arguments.

    ``bias`` is None when the forward had no bias, ``mask`` is None when it had no mask.
    """

    input: Any
    offset: Any
    weight: Any
    bias: Any | None
    mask: Any | None


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Deformable convolution v1 (``mask=None``) or v2 (modulated, with ``mask``).

    Same argument order, layouts and numbers as ``torchvision.ops.deform_conv2d``:
    input ``(N, C_in, H, W)``, offset ``(N, 2*G*kh*kw, H_out, W_out)`` (dy, dx pairs),
    weight ``(C_out, C_in // groups, kh, kw)``, bias ``(C_out,)``,
    mask ``(N, G*kh*kw, H_out, W_out)``. Returns ``(N, C_out, H_out, W_out)``.
    See docs/deform_conv2d.md for the sampling rules.
    """
    input, offset, weight, bias, mask = native_arrays(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    required = dict(input=input, offset=offset, weight=weight)
    optional = dict(bias=bias, mask=mask)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = conv_params(input, offset, weight, bias, stride, padding, dilation, mask)
    _warmup.notice_if_cold(backend, "deform_conv2d", input.dtype)
    return operator_module(backend, "deform_conv").forward(p, input, offset, weight, bias, mask)


def deform_conv2d_backward(
    grad_output,
    input,
    offset,
    weight,
    bias=None,
    stride=1,
    padding=0,
    dilation=1,
    mask=None,
    *,
    deterministic=None,
) -> DeformConv2dGrads:
    """Gradients of ``deform_conv2d`` given ``grad_output`` of shape ``(N, C_out, H_out, W_out)``.

    Returns ``DeformConv2dGrads(input, offset, weight, bias, mask)``. The CPU backward is
    always deterministic; on CUDA, ``deterministic=True`` (default: ``set_deterministic``)
    selects the bitwise-reproducible reduction.
    """
    grad_output, input, offset, weight, bias, mask = native_arrays(
        grad_output=grad_output, input=input, offset=offset, weight=weight, bias=bias, mask=mask
    )
    required = dict(grad_output=grad_output, input=input, offset=offset, weight=weight)
    optional = dict(bias=bias, mask=mask)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = conv_params(input, offset, weight, bias, stride, padding, dilation, mask)
    check_grad_output(grad_output, p.out_shape, "(N, C_out, H_out, W_out)")
    if deterministic is None:
        deterministic = _config.get_deterministic()
    _warmup.notice_if_cold(backend, "deform_conv2d_backward", input.dtype)
    grads = operator_module(backend, "deform_conv").backward(
        p, grad_output, input, offset, weight, bias, mask, deterministic=bool(deterministic)
    )
    return DeformConv2dGrads(*grads)


class DeformRoiPoolGrads(NamedTuple):
    """Gradients of ``deform_roi_pool``: ``offset`` / ``mask`` are None when not given."""

    input: Any
    offset: Any | None
    mask: Any | None


class DeformPSRoiPoolGrads(NamedTuple):
    """Gradients of ``deform_psroi_pool``: ``offset`` is None when not given."""

    input: Any
    offset: Any | None


def _deterministic(flag):
    return bool(_config.get_deterministic() if flag is None else flag)


def deform_roi_pool(
    input, rois, offset=None, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None
):
    """Deformable RoI pooling (Dai et al. 2017, eq. 6) with mmcv's ``DeformRoIPool`` numbers;
    modulated (DCNv2) when ``mask`` is given.

    input ``(N, C, H, W)``; rois ``(R, 5)`` rows ``[batch_index, x1, y1, x2, y2]``;
    offset ``(R, 2, ph, pw)`` (channel 0 = x, channel 1 = y, in units of the RoI size
    times ``gamma``); mask ``(R, 1, ph, pw)``. Returns ``(R, C, ph, pw)``.
    See docs/deform_roi_pool.md for the sampling rules.
    """
    input, rois, offset, mask = native_arrays(input=input, rois=rois, offset=offset, mask=mask)
    required = dict(input=input, rois=rois)
    optional = dict(offset=offset, mask=mask)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = roi_pool_params(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)
    _warmup.notice_if_cold(backend, "deform_roi_pool", input.dtype)
    return operator_module(backend, "roi_pool").forward(p, input, rois, offset, mask)


def deform_roi_pool_backward(
    grad_output,
    input,
    rois,
    offset=None,
    output_size=(7, 7),
    spatial_scale=1.0,
    sampling_ratio=0,
    gamma=0.1,
    mask=None,
    *,
    deterministic=None,
) -> DeformRoiPoolGrads:
    """Gradients of ``deform_roi_pool`` given ``grad_output`` of shape ``(R, C, ph, pw)``.

    Returns ``DeformRoiPoolGrads(input, offset, mask)`` (no gradient for ``rois``). The CPU
    backward is always deterministic; on CUDA, ``deterministic=True`` (default:
    ``set_deterministic``) selects the bitwise-reproducible reduction.
    """
    grad_output, input, rois, offset, mask = native_arrays(
        grad_output=grad_output, input=input, rois=rois, offset=offset, mask=mask
    )
    required = dict(grad_output=grad_output, input=input, rois=rois)
    optional = dict(offset=offset, mask=mask)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = roi_pool_params(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)
    check_grad_output(grad_output, p.out_shape, "(R, C, ph, pw)")
    _warmup.notice_if_cold(backend, "deform_roi_pool_backward", input.dtype)
    grads = operator_module(backend, "roi_pool").backward(
        p, grad_output, input, rois, offset, mask, deterministic=_deterministic(deterministic)
    )
    return DeformRoiPoolGrads(*grads)


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
    """Deformable position-sensitive RoI pooling (R-FCN) with the numbers of MXNet's
    ``DeformablePSROIPooling``; plain PS RoI pooling when ``offset`` is None.

    input ``(N, output_dim*group_size**2, H, W)``; rois ``(R, 5)`` rows
    ``[batch_index, x1, y1, x2, y2]``; offset ``(R, 2*num_classes, part_size, part_size)``
    (x then y for each class; ``part_size=None`` means ``pooled_size``).
    Returns ``(R, output_dim, pooled_size, pooled_size)``. See docs/deform_psroi_pool.md.
    """
    input, rois, offset = native_arrays(input=input, rois=rois, offset=offset)
    required = dict(input=input, rois=rois)
    optional = dict(offset=offset)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = psroi_pool_params(
        input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale
    )
    _warmup.notice_if_cold(backend, "deform_psroi_pool", input.dtype)
    return operator_module(backend, "psroi_pool").forward(p, input, rois, offset)


def deform_psroi_pool_backward(
    grad_output,
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
    deterministic=None,
) -> DeformPSRoiPoolGrads:
    """Gradients of ``deform_psroi_pool`` given ``grad_output`` of shape
    ``(R, output_dim, pooled_size, pooled_size)``.

    Returns ``DeformPSRoiPoolGrads(input, offset)`` (no gradient for ``rois``). The CPU
    backward is always deterministic; on CUDA, ``deterministic=True`` selects the
    bitwise-reproducible reduction.
    """
    grad_output, input, rois, offset = native_arrays(grad_output=grad_output, input=input, rois=rois, offset=offset)
    required = dict(grad_output=grad_output, input=input, rois=rois)
    optional = dict(offset=offset)
    backend = backend_of(required, optional)
    check_dtypes(backend, **required, **optional)
    p = psroi_pool_params(
        input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale
    )
    check_grad_output(grad_output, p.out_shape, "(R, output_dim, pooled_size, pooled_size)")
    _warmup.notice_if_cold(backend, "deform_psroi_pool_backward", input.dtype)
    grads = operator_module(backend, "psroi_pool").backward(
        p, grad_output, input, rois, offset, deterministic=_deterministic(deterministic)
    )
    return DeformPSRoiPoolGrads(*grads)


class MsDeformAttnGrads(NamedTuple):
    """Gradients of ``ms_deform_attn`` (none for the integer spatial_shapes and
    level_start_index)."""

    value: Any
    sampling_locations: Any
    attention_weights: Any


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR) with the numbers of
    the ``grid_sample`` composition (``align_corners=False``, zero padding) that Deformable
    DETR, mmcv and transformers ship.

    value ``(N, S, M, D)`` with S = sum of H_l*W_l; spatial_shapes ``(L, 2)`` integer rows
    ``(H_l, W_l)``; level_start_index ``(L,)``; sampling_locations ``(N, Lq, M, L, P, 2)``,
    ``(x, y)`` with 0 and 1 the outer edges of each level; attention_weights
    ``(N, Lq, M, L, P)``. Returns ``(N, Lq, M*D)``. See docs/ms_deform_attn.md.
    """
    value, sampling_locations, attention_weights = native_arrays(
        value=value, sampling_locations=sampling_locations, attention_weights=attention_weights
    )
    required = dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    backend = backend_of(required)
    check_dtypes(backend, **required)
    p = msda_params(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
    _warmup.notice_if_cold(backend, "ms_deform_attn", value.dtype)
    return operator_module(backend, "ms_deform_attn").forward(p, value, sampling_locations, attention_weights)


def ms_deform_attn_backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, deterministic=None
) -> MsDeformAttnGrads:
    """Gradients of ``ms_deform_attn`` given ``grad_output`` of shape ``(N, Lq, M*D)``.

    Returns ``MsDeformAttnGrads(value, sampling_locations, attention_weights)``. The CPU
    backward is always deterministic; on CUDA, ``deterministic=True`` (default:
    ``set_deterministic``) selects the bitwise-reproducible reduction.
    """
    grad_output, value, sampling_locations, attention_weights = native_arrays(
        grad_output=grad_output,
        value=value,
        sampling_locations=sampling_locations,
        attention_weights=attention_weights,
    )
    required = dict(
        grad_output=grad_output,
        value=value,
        sampling_locations=sampling_locations,
        attention_weights=attention_weights,
    )
    backend = backend_of(required)
    check_dtypes(backend, **required)
    p = msda_params(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
    check_grad_output(grad_output, p.out_shape, "(N, Lq, M*D)")
    _warmup.notice_if_cold(backend, "ms_deform_attn_backward", value.dtype)
    grads = operator_module(backend, "ms_deform_attn").backward(
        p, grad_output, value, sampling_locations, attention_weights, deterministic=_deterministic(deterministic)
    )
    return MsDeformAttnGrads(*grads)


class Dcnv3Grads(NamedTuple):
    """Gradients of ``dcnv3``."""

    input: Any
    offset: Any
    mask: Any


class Dcnv4Grads(NamedTuple):
    """Gradients of ``dcnv4`` (the padding of offset_mask's last axis gets zeros)."""

    input: Any
    offset_mask: Any


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
    """DCNv3 (InternImage): each output pixel and group is a mask-weighted sum of bilinear
    samples of the group's channels at the kernel's taps moved by learned offsets.

    Channels-last: input ``(N, H, W, G*D)``; offset ``(N, H_out, W_out, G*P*2)`` (x, y
    pairs, point ``k = i*kh + j`` with i along the width); mask ``(N, H_out, W_out, G*P)``
    (no softmax here: the module applies it); P = kh*kw (minus 1 with remove_center).
    Returns ``(N, H_out, W_out, G*D)``. See docs/dcnv3.md for the sampling rule.
    """
    input, offset, mask = native_arrays(input=input, offset=offset, mask=mask)
    required = dict(input=input, offset=offset, mask=mask)
    backend = backend_of(required)
    check_dtypes(backend, **required)
    p = dcnv3_params(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center
    )
    _warmup.notice_if_cold(backend, "dcnv3", input.dtype)
    return operator_module(backend, "dcn").forward(p, input, offset, mask)


def dcnv3_backward(
    grad_output,
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
    *,
    deterministic=None,
) -> Dcnv3Grads:
    """Gradients of ``dcnv3`` given ``grad_output`` ``(N, H_out, W_out, G*D)``: returns
    ``Dcnv3Grads(input, offset, mask)``. The CPU backward is deterministic; on CUDA,
    ``deterministic=True`` (default: ``set_deterministic``) fixes the summation order."""
    grad_output, input, offset, mask = native_arrays(grad_output=grad_output, input=input, offset=offset, mask=mask)
    required = dict(grad_output=grad_output, input=input, offset=offset, mask=mask)
    backend = backend_of(required)
    check_dtypes(backend, **required)
    p = dcnv3_params(
        input, offset, mask, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center
    )
    check_grad_output(grad_output, p.out_shape, "(N, H_out, W_out, G*D)")
    _warmup.notice_if_cold(backend, "dcnv3_backward", input.dtype)
    grads = operator_module(backend, "dcn").backward(
        p, grad_output, input, offset, mask, deterministic=_deterministic(deterministic)
    )
    return Dcnv3Grads(*grads)


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
    """DCNv4 (FlashInternImage): DCNv3's sampling with DCNv4's packed ``offset_mask``
    ``(N, H_out, W_out, K)``: per group, P (x, y) offset pairs then P mask values (no
    softmax), groups one after another; K >= 3*G*P, the rest padding (DCNv4 pads K to a
    multiple of 8). Any kernel size, group_channels and batch size.
    Returns ``(N, H_out, W_out, G*D)``. See docs/dcnv3.md."""
    input, offset_mask = native_arrays(input=input, offset_mask=offset_mask)
    required = dict(input=input, offset_mask=offset_mask)
    backend = backend_of(required)
    check_dtypes(backend, **required)
    p = dcnv4_params(
        input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center
    )
    _warmup.notice_if_cold(backend, "dcnv4", input.dtype)
    return operator_module(backend, "dcn").forward(p, input, offset_mask, offset_mask)


def dcnv4_backward(
    grad_output,
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
    *,
    deterministic=None,
) -> Dcnv4Grads:
    """Gradients of ``dcnv4``: ``Dcnv4Grads(input, offset_mask)`` (zeros in the padding)."""
    grad_output, input, offset_mask = native_arrays(grad_output=grad_output, input=input, offset_mask=offset_mask)
    required = dict(grad_output=grad_output, input=input, offset_mask=offset_mask)
    backend = backend_of(required)
    check_dtypes(backend, **required)
    p = dcnv4_params(
        input, offset_mask, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center
    )
    check_grad_output(grad_output, p.out_shape, "(N, H_out, W_out, G*D)")
    _warmup.notice_if_cold(backend, "dcnv4_backward", input.dtype)
    grad_input, grad_offset, _ = operator_module(backend, "dcn").backward(
        p, grad_output, input, offset_mask, offset_mask, deterministic=_deterministic(deterministic)
    )
    return Dcnv4Grads(grad_input, grad_offset)
