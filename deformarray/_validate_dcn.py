"""Argument checking for DCNv3 (InternImage) and DCNv4 (FlashInternImage): ``dcnv3`` and
``dcnv4`` share their geometry and differ only in how offsets and masks are laid out.

Returns ``DcnParams`` or raises a ``ValueError`` naming the argument and the expected
shape, or a ``TypeError``. Unlike the reference implementations, any kernel size, any
group_channels and any batch size are accepted.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._validate import (
    _check_ndim,
    _finite_real,
    _itemsize,
    _pair,
    _shape_error,
    _window,
    _window_pairs,
    _window_text,
    check_int_range,
    check_output_size,
    check_shape,
)


@dataclass(frozen=True)
class DcnParams:
    """Normalised geometry of one ``dcnv3`` / ``dcnv4`` call.

    Kernel point ``k`` (``0 <= k < p``) is tap ``(i, j)`` of the kernel, ``i`` along the
    width (outer) and ``j`` along the height (inner): ``k = i*kh + j``, skipping the centre
    ``(kw // 2, kh // 2)`` when ``remove_center``. Offsets of point ``k`` of group ``g`` are
    at ``g*off_group + 2*k`` (x) and ``+ 1`` (y) of the offset array's last axis,
    its mask at ``mask_base + g*mask_group + k`` of the mask array's last axis (for DCNv4
    both arrays are ``offset_mask``).
    """

    n: int
    h: int
    w: int
    group: int
    group_channels: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    offset_scale: float
    remove_center: bool
    h_out: int
    w_out: int
    p: int  # kernel points per group: kh*kw - remove_center
    off_channels: int  # length of the offset array's last axis
    off_group: int  # offset-array stride between groups
    mask_channels: int  # length of the mask array's last axis
    mask_base: int  # first mask entry of group 0
    mask_group: int  # mask-array stride between groups

    @property
    def packed(self) -> bool:
        """DCNv4's layout: offsets and masks in one array (``offset_mask``)."""
        return self.mask_base > 0

    @property
    def channels(self) -> int:
        return self.group * self.group_channels

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.h_out, self.w_out, self.channels)


def implied_group_channels(c: int, g: int) -> int:
    """group_channels when not given: the input's C channels split evenly over the groups."""
    if c % g:
        raise ValueError(f"input channels C = {c} must be a multiple of group = {g} (input is (N, H, W, G*D))")
    return c // g


def _group_args(c: int, group: Any, group_channels: Any) -> tuple[int, int]:
    if isinstance(group, (bool, np.bool_)) or not isinstance(group, numbers.Integral):
        raise TypeError(f"group must be an int, got {group!r}")
    if int(group) < 1:
        raise ValueError(f"group must be >= 1, got {group!r}")
    g = int(group)
    check_int_range(g, "group")
    if group_channels is None:
        return g, implied_group_channels(c, g)
    if isinstance(group_channels, (bool, np.bool_)) or not isinstance(group_channels, numbers.Integral):
        raise TypeError(f"group_channels must be an int or None, got {group_channels!r}")
    d = int(group_channels)
    if d < 1:
        raise ValueError(f"group_channels must be >= 1, got {group_channels!r}")
    if g * d != c:
        raise ValueError(
            f"input must have shape (N, H, W, group*group_channels) = (N, H, W, {g}*{d}), got C = {c} channels"
        )
    return g, d


def _geometry(
    input: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    group: Any,
    group_channels: Any,
    offset_scale: Any,
    remove_center: Any,
) -> dict:
    n, h, w, c = _check_ndim("input", input, "(N, H, W, G*D)")
    if h < 1 or w < 1 or c < 1:
        raise _shape_error("input", "(N, H, W, G*D) with H, W, G*D >= 1", input.shape)
    g, d = _group_args(c, group, group_channels)
    kh, kw = _pair(kernel_size, "kernel_size", 1)
    stride, padding, dilation = _window_pairs(stride, padding, dilation)
    scale = _finite_real(offset_scale, "offset_scale")
    if not isinstance(remove_center, (bool, np.bool_, numbers.Integral)) or int(remove_center) not in (0, 1):
        raise TypeError(f"remove_center must be a bool, got {remove_center!r}")
    rc = bool(remove_center)
    if rc and (kh % 2 == 0 or kw % 2 == 0):
        raise ValueError(f"remove_center needs an odd kernel_size (a centre tap to remove), got ({kh}, {kw})")
    p = kh * kw - int(rc)
    if p < 1:
        raise ValueError(f"kernel_size ({kh}, {kw}) with remove_center leaves no kernel point")
    window = _window(h, w, kh, kw, stride, padding, dilation)
    check_output_size(
        (n, window["h_out"], window["w_out"], c),
        "(N, H_out, W_out, G*D)",
        _itemsize(input),
        _window_text(h, w, window),
    )
    return dict(
        window,
        n=n,
        h=h,
        w=w,
        group=g,
        group_channels=d,
        offset_scale=scale,
        remove_center=rc,
        p=p,
    )


def _check_per_pixel(name: str, arr: Any, geo: dict, last: int, layout: str) -> None:
    check_shape(name, arr, (geo["n"], geo["h_out"], geo["w_out"], last), layout)


def dcnv3_params(
    input: Any,
    offset: Any,
    mask: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    group: Any,
    group_channels: Any,
    offset_scale: Any,
    remove_center: Any,
) -> DcnParams:
    """Check the arguments of ``dcnv3`` (layouts in its docstring)."""
    geo = _geometry(input, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    g, p = geo["group"], geo["p"]
    _check_per_pixel("offset", offset, geo, g * p * 2, "(N, H_out, W_out, G*P*2)")
    _check_per_pixel("mask", mask, geo, g * p, "(N, H_out, W_out, G*P)")
    return DcnParams(
        **geo,
        off_channels=g * p * 2,
        off_group=2 * p,
        mask_channels=g * p,
        mask_base=0,
        mask_group=p,
    )


def dcnv4_params(
    input: Any,
    offset_mask: Any,
    kernel_size: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    group: Any,
    group_channels: Any,
    offset_scale: Any,
    remove_center: Any,
) -> DcnParams:
    """Check the arguments of ``dcnv4``: offset_mask ``(N, H_out, W_out, K)`` with
    ``K >= 3*G*P`` (DCNv4 pads K to a multiple of 8; the padding is ignored)."""
    geo = _geometry(input, kernel_size, stride, padding, dilation, group, group_channels, offset_scale, remove_center)
    g, p = geo["group"], geo["p"]
    shape = _check_ndim("offset_mask", offset_mask, "(N, H_out, W_out, K)")
    need = 3 * g * p
    if shape[:3] != (geo["n"], geo["h_out"], geo["w_out"]) or shape[3] < need:
        expected = f"(N, H_out, W_out, K >= 3*G*P) = ({geo['n']}, {geo['h_out']}, {geo['w_out']}, K >= {need})"
        raise _shape_error("offset_mask", expected, shape)
    return DcnParams(
        **geo,
        off_channels=shape[3],
        off_group=3 * p,
        mask_channels=shape[3],
        mask_base=2 * p,
        mask_group=3 * p,
    )
