"""Naive float64 reference for DCNv3 / DCNv4, used only by the tests.

Written from the formula (InternImage's DCNv3 operator, channels-last), not from the
library's kernels:

    out[n, ho, wo, g*D + d] = sum_k m_k * V_{g,d}(y_k, x_k)

over the kept taps (i, j) of the kernel, i along the width (outer), j along the height
(inner), the centre (kw // 2, kh // 2) skipped with remove_center; point k of group g has
offsets (off_x, off_y) at ``offset[..., (g*P + k)*2 + 0 / 1]`` and its mask at
``mask[..., g*P + k]``. The sampling location, computed in the data's type (float32 data:
float32, one rounding per operation, in the order of the contract), then used in float64:

    e_w = (dw*(kw-1)) // 2,  x = (acc(wo*sw - pw + e_w) - acc(e_w)*s) + (acc(i*dw) + off_x)*s

(and y alike with ho, sh, ph, e_h, j, dh). V is bilinear interpolation of the group's
channels written with hat functions, ``V(y, x) = sum_{r, c} k(r - y) k(c - x) v[r, c]``,
``k(t) = max(0, 1 - |t|)``, over the pixels of the image (zero padding). Only points with
``-1 < y < H`` and ``-1 < x < W`` are used (others, NaN included, give 0 and zero
gradients). The derivative of the hat is taken from the right at its kinks.

DCNv4 (``ref_dcnv4*``) unpacks its offset_mask into DCNv3's two arrays, runs the DCNv3
reference and packs the gradients back (zeros in the padding).

Loops are plain Python over (n, ho, wo, g, k) and the 2x2 pixels, vectorised over channels
only: keep cases small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class Geometry(NamedTuple):
    n: int
    h: int
    w: int
    g: int
    d: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    scale: float
    rc: bool
    h_out: int
    w_out: int
    taps: list  # [(i, j)] of the kept taps, in point order


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def geometry(input, kernel_size, stride=1, padding=0, dilation=1, group=1, offset_scale=1.0, remove_center=False):
    n, h, w, c = input.shape
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    taps = [(i, j) for i in range(kw) for j in range(kh) if not (remove_center and i == kw // 2 and j == kh // 2)]
    h_out = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return Geometry(
        n,
        h,
        w,
        group,
        c // group,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        dh,
        dw,
        float(offset_scale),
        bool(remove_center),
        h_out,
        w_out,
        taps,
    )


def location(base_int: int, e: int, tap: int, off, scale: float, dtype) -> float:
    """``(acc(base_int) - acc(e)*s) + (acc(tap) + off)*s`` in ``dtype``, as a float."""
    f = np.dtype(dtype).type
    s = f(scale)
    base = f(base_int) - f(e) * s
    return float(base + (f(tap) + f(off)) * s)


def sample_location(geo: Geometry, ho: int, wo: int, i: int, j: int, off_x, off_y, dtype) -> tuple[float, float]:
    """The pixel coordinates (y, x) of tap (i, j) of output pixel (ho, wo), in ``dtype``."""
    eh = (geo.dh * (geo.kh - 1)) // 2
    ew = (geo.dw * (geo.kw - 1)) // 2
    y = location(ho * geo.sh - geo.ph + eh, eh, j * geo.dh, off_y, geo.scale, dtype)
    x = location(wo * geo.sw - geo.pw + ew, ew, i * geo.dw, off_x, geo.scale, dtype)
    return y, x


def _axis_terms(t: float, size: int):
    """[(pixel r, k(r - t), dk(r - t)/dt)] for the two pixels around t inside [0, size)."""
    lo = math.floor(t)
    fr = t - lo
    return [(r, k, dk) for r, k, dk in ((lo, 1.0 - fr, -1.0), (lo + 1, fr, 1.0)) if 0 <= r < size]


def sample_terms(y: float, x: float, height: int, width: int):
    """[(r, c, weight, d weight/dy, d weight/dx)], or None when the point is not used."""
    if not (-1.0 < y < height and -1.0 < x < width):
        return None
    return [
        (r, c, ky * kx, dky * kx, ky * dkx)
        for r, ky, dky in _axis_terms(y, height)
        for c, kx, dkx in _axis_terms(x, width)
    ]


def _points(geo: Geometry, offset, dtype):
    """For every (n, ho, wo, g, k): (index, sample_terms)."""
    p = len(geo.taps)
    for n, ho, wo, g in np.ndindex(geo.n, geo.h_out, geo.w_out, geo.g):
        for k, (i, j) in enumerate(geo.taps):
            ch = (g * p + k) * 2
            y, x = sample_location(geo, ho, wo, i, j, offset[n, ho, wo, ch], offset[n, ho, wo, ch + 1], dtype)
            yield (n, ho, wo, g, k), sample_terms(y, x, geo.h, geo.w)


def ref_dcnv3(input, offset, mask, kernel_size, **kw):
    dtype = np.asarray(input).dtype
    geo = geometry(input, kernel_size, **kw)
    v = np.asarray(input, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    p, d = len(geo.taps), geo.d
    out = np.zeros((geo.n, geo.h_out, geo.w_out, geo.g * d))
    for (n, ho, wo, g, k), terms in _points(geo, np.asarray(offset), dtype):
        if terms is None:
            continue
        sample = np.zeros(d)
        for r, c, wgt, _, _ in terms:
            sample += wgt * v[n, r, c, g * d : (g + 1) * d]
        out[n, ho, wo, g * d : (g + 1) * d] += m[n, ho, wo, g * p + k] * sample
    return out


class Dcnv3Grads(NamedTuple):
    input: np.ndarray
    offset: np.ndarray
    mask: np.ndarray


def ref_dcnv3_backward(grad_output, input, offset, mask, kernel_size, **kw):
    """Hand-derived gradients, gv = grad_output[n, ho, wo, g*D : g*D + D]:

    dL/dinput[n, r, c, g*D:...] = sum over the points touching (r, c) of m * weight * gv
    dL/dmask[k]                 = gv . V(y, x)
    dL/doffset[k, x]            = s * m * gv . dV/dx     (dx/doff_x = s)
    dL/doffset[k, y]            = s * m * gv . dV/dy
    """
    dtype = np.asarray(input).dtype
    geo = geometry(input, kernel_size, **kw)
    v = np.asarray(input, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    go = np.asarray(grad_output, dtype=np.float64)
    p, d = len(geo.taps), geo.d
    g_in = np.zeros_like(v)
    g_off = np.zeros(np.shape(offset))
    g_mask = np.zeros(np.shape(mask))
    s = float(np.dtype(dtype).type(geo.scale))
    for (n, ho, wo, g, k), terms in _points(geo, np.asarray(offset), dtype):
        if terms is None:
            continue
        cs = slice(g * d, (g + 1) * d)
        gv = go[n, ho, wo, cs]
        a = m[n, ho, wo, g * p + k]
        sample, dy, dx = np.zeros(d), np.zeros(d), np.zeros(d)
        for r, c, wgt, wdy, wdx in terms:
            x = v[n, r, c, cs]
            g_in[n, r, c, cs] += a * wgt * gv
            sample += wgt * x
            dy += wdy * x
            dx += wdx * x
        g_mask[n, ho, wo, g * p + k] = float(gv @ sample)
        g_off[n, ho, wo, (g * p + k) * 2] = s * a * float(gv @ dx)
        g_off[n, ho, wo, (g * p + k) * 2 + 1] = s * a * float(gv @ dy)
    return Dcnv3Grads(g_in, g_off, g_mask)


# ---------------------------------------------------------------------------------------
# DCNv4's packed layout
# ---------------------------------------------------------------------------------------


def pack(offset, mask, group: int, k_total: int | None = None, fill=0.0):
    """DCNv4's offset_mask from DCNv3's offset and mask: per group 2P offsets then P mask
    values; the last axis padded with ``fill`` to ``k_total`` (default: a multiple of 8)."""
    n, ho, wo, gp2 = offset.shape
    p = gp2 // (2 * group)
    packed = np.concatenate([offset.reshape(n, ho, wo, group, 2 * p), mask.reshape(n, ho, wo, group, p)], axis=-1)
    packed = packed.reshape(n, ho, wo, 3 * group * p)
    k_total = -(-3 * group * p // 8) * 8 if k_total is None else k_total
    out = np.full((n, ho, wo, k_total), fill, dtype=offset.dtype)
    out[..., : 3 * group * p] = packed
    return out


def unpack(offset_mask, group: int, p: int):
    """(offset, mask) of DCNv3's layouts from DCNv4's offset_mask."""
    n, ho, wo, _ = offset_mask.shape
    blocks = offset_mask[..., : 3 * group * p].reshape(n, ho, wo, group, 3 * p)
    offset = np.ascontiguousarray(blocks[..., : 2 * p]).reshape(n, ho, wo, 2 * group * p)
    mask = np.ascontiguousarray(blocks[..., 2 * p :]).reshape(n, ho, wo, group * p)
    return offset, mask


def _points_per_group(kernel_size, remove_center=False, **_):
    kh, kw = _pair(kernel_size)
    return kh * kw - int(bool(remove_center))


def ref_dcnv4(input, offset_mask, kernel_size, **kw):
    offset, mask = unpack(offset_mask, kw.get("group", 1), _points_per_group(kernel_size, **kw))
    return ref_dcnv3(input, offset, mask, kernel_size, **kw)


class Dcnv4Grads(NamedTuple):
    input: np.ndarray
    offset_mask: np.ndarray


def ref_dcnv4_backward(grad_output, input, offset_mask, kernel_size, **kw):
    group = kw.get("group", 1)
    offset, mask = unpack(offset_mask, group, _points_per_group(kernel_size, **kw))
    g = ref_dcnv3_backward(grad_output, input, offset, mask, kernel_size, **kw)
    return Dcnv4Grads(g.input, pack(g.offset, g.mask, group, offset_mask.shape[-1]))


# ---------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------


def make_dcn_case(
    rng,
    n=2,
    h=5,
    w=4,
    group=2,
    group_channels=3,
    kernel_size=3,
    stride=1,
    padding=1,
    dilation=1,
    offset_scale=1.0,
    remove_center=False,
    spread=1.5,
    dtype=np.float64,
):
    """A dict of dcnv3's arguments: random input, offsets uniform in [-spread, spread]
    (pixels: some points leave the image), masks positive and negative."""
    x = rng.standard_normal((n, h, w, group * group_channels)).astype(dtype)
    kw = dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        group=group,
        offset_scale=offset_scale,
        remove_center=remove_center,
    )
    geo = geometry(x, kernel_size, **kw)
    p = len(geo.taps)
    return dict(
        input=x,
        offset=rng.uniform(-spread, spread, (n, geo.h_out, geo.w_out, group * p * 2)).astype(dtype),
        mask=rng.uniform(-0.5, 1.0, (n, geo.h_out, geo.w_out, group * p)).astype(dtype),
        kernel_size=kernel_size,
        **kw,
    )


def geometry_of(case) -> Geometry:
    """The Geometry of a make_dcn_case dict."""
    kw = {k: case[k] for k in ("stride", "padding", "dilation", "group", "offset_scale", "remove_center")}
    return geometry(case["input"], case["kernel_size"], **kw)


def dcnv4_case(case, k_total=None, fill=np.nan):
    """The DCNv4 arguments of a DCNv3 case (offset_mask packed, padding filled with
    ``fill``: NaN by default, which must be ignored)."""
    c = {k: v for k, v in case.items() if k not in ("offset", "mask")}
    c["offset_mask"] = pack(case["offset"], case["mask"], case["group"], k_total, fill)
    return c
