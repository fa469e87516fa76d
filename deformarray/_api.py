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


def _checked(required: dict[str, Any], optional: dict[str, Any] | None = None) -> tuple[str, tuple[Any, ...]]:
    """Every public function's first step: the array arguments made native, in order, and
    the backend they share, checked to share one dtype it supports."""
    optional = optional or {}
    arrays = dict(zip([*required, *optional], native_arrays(**required, **optional)))
    backend = backend_of({k: arrays[k] for k in required}, {k: arrays[k] for k in optional})
    check_dtypes(backend, **arrays)
    return backend, tuple(arrays.values())


def _deterministic(flag):
    return bool(_config.get_deterministic() if flag is None else flag)


def _forward(backend: str, name: str, module: str, p: Any, *arrays: Any) -> Any:
    """Operator ``name``, forward, from backend module ``module``; ``arrays[0]`` has the dtype."""
    _warmup.notice_if_cold(backend, name, arrays[0].dtype)
    return operator_module(backend, module).forward(p, *arrays)


def _backward(
    backend: str, name: str, module: str, p: Any, layout: str, grad_output: Any, *arrays: Any, deterministic: Any
) -> tuple:
    """Operator ``name``'s gradients from backend module ``module``, once ``grad_output``
    has the forward output's shape (``layout`` names its axes)."""
    check_grad_output(grad_output, p.out_shape, layout)
    _warmup.notice_if_cold(backend, name, arrays[0].dtype)
    return operator_module(backend, module).backward(
        p, grad_output, *arrays, deterministic=_deterministic(deterministic)
    )


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
    backend, arrays = _checked(dict(input=input, offset=offset, weight=weight), dict(bias=bias, mask=mask))
    input, offset, weight, bias, mask = arrays
    p = conv_params(input, offset, weight, bias, stride, padding, dilation, mask)
    return _forward(backend, "deform_conv2d", "deform_conv", p, *arrays)


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
    required = dict(grad_output=grad_output, input=input, offset=offset, weight=weight)
    backend, (grad_output, *arrays) = _checked(required, dict(bias=bias, mask=mask))
    input, offset, weight, bias, mask = arrays
    p = conv_params(input, offset, weight, bias, stride, padding, dilation, mask)
    layout = "(N, C_out, H_out, W_out)"
    grads = _backward(
        backend, "deform_conv2d_backward", "deform_conv", p, layout, grad_output, *arrays, deterministic=deterministic
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
    backend, arrays = _checked(dict(input=input, rois=rois), dict(offset=offset, mask=mask))
    p = roi_pool_params(*arrays, output_size, spatial_scale, sampling_ratio, gamma)
    return _forward(backend, "deform_roi_pool", "roi_pool", p, *arrays)


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
    required = dict(grad_output=grad_output, input=input, rois=rois)
    backend, (grad_output, *arrays) = _checked(required, dict(offset=offset, mask=mask))
    input, rois, offset, mask = arrays
    p = roi_pool_params(input, rois, offset, mask, output_size, spatial_scale, sampling_ratio, gamma)
    layout = "(R, C, ph, pw)"
    grads = _backward(
        backend, "deform_roi_pool_backward", "roi_pool", p, layout, grad_output, *arrays, deterministic=deterministic
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
    backend, arrays = _checked(dict(input=input, rois=rois), dict(offset=offset))
    geometry = (output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    return _forward(backend, "deform_psroi_pool", "psroi_pool", psroi_pool_params(*arrays, *geometry), *arrays)


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
    backend, (grad_output, *arrays) = _checked(
        dict(grad_output=grad_output, input=input, rois=rois), dict(offset=offset)
    )
    geometry = (output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    input, rois, offset = arrays
    p = psroi_pool_params(input, rois, offset, *geometry)
    layout = "(R, output_dim, pooled_size, pooled_size)"
    grads = _backward(
        backend,
        "deform_psroi_pool_backward",
        "psroi_pool",
        p,
        layout,
        grad_output,
        *arrays,
        deterministic=deterministic,
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
    required = dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    backend, arrays = _checked(required)
    value, sampling_locations, attention_weights = arrays
    p = msda_params(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
    return _forward(backend, "ms_deform_attn", "ms_deform_attn", p, *arrays)


def ms_deform_attn_backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, *, deterministic=None
) -> MsDeformAttnGrads:
    """Gradients of ``ms_deform_attn`` given ``grad_output`` of shape ``(N, Lq, M*D)``.

    Returns ``MsDeformAttnGrads(value, sampling_locations, attention_weights)``. The CPU
    backward is always deterministic; on CUDA, ``deterministic=True`` (default:
    ``set_deterministic``) selects the bitwise-reproducible reduction.
    """
    required = dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    backend, (grad_output, *arrays) = _checked(dict(grad_output=grad_output, **required))
    value, sampling_locations, attention_weights = arrays
    p = msda_params(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend)
    layout = "(N, Lq, M*D)"
    grads = _backward(
        backend,
        "ms_deform_attn_backward",
        "ms_deform_attn",
        p,
        layout,
        grad_output,
        *arrays,
        deterministic=deterministic,
    )
    return MsDeformAttnGrads(*grads)


_DCN_LAYOUT = "(N, H_out, W_out, G*D)"  # dcnv3's and dcnv4's output


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
    backend, arrays = _checked(dict(input=input, offset=offset, mask=mask))
    geometry = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    return _forward(backend, "dcnv3", "dcn", dcnv3_params(*arrays, *geometry), *arrays)


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
    backend, (grad_output, *arrays) = _checked(dict(grad_output=grad_output, input=input, offset=offset, mask=mask))
    geometry = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    input, offset, mask = arrays
    p = dcnv3_params(input, offset, mask, *geometry)
    grads = _backward(
        backend, "dcnv3_backward", "dcn", p, _DCN_LAYOUT, grad_output, *arrays, deterministic=deterministic
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
    backend, (input, offset_mask) = _checked(dict(input=input, offset_mask=offset_mask))
    geometry = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    p = dcnv4_params(input, offset_mask, *geometry)
    # the backends take offsets and masks as two arrays: here both are offset_mask
    return _forward(backend, "dcnv4", "dcn", p, input, offset_mask, offset_mask)


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
    backend, (grad_output, input, offset_mask) = _checked(
        dict(grad_output=grad_output, input=input, offset_mask=offset_mask)
    )
    geometry = (kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    p = dcnv4_params(input, offset_mask, *geometry)
    grad_input, grad_offset, _ = _backward(
        backend,
        "dcnv4_backward",
        "dcn",
        p,
        _DCN_LAYOUT,
        grad_output,
        input,
        offset_mask,
        offset_mask,
        deterministic=deterministic,
    )
    return Dcnv4Grads(grad_input, grad_offset)
