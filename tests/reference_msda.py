"""Naive float64 reference for multi-scale deformable attention, used only by the tests.

Written from the formula of docs/ms_deform_attn.md (Deformable DETR's ``grid_sample``
composition), not from the library's kernels:

    out[n, q, m*D + d] = sum_{l, p} a[n, q, m, l, p] * V_{l,m,d}(h, w),
    h = y * H_l - 0.5,  w = x * W_l - 0.5,

with V the bilinear interpolation of level l's pixels written with hat functions,
``V(h, w) = sum_{qy, qx} k(qy - h) k(qx - w) v[qy, qx]``, ``k(t) = max(0, 1 - |t|)``, over
the pixels of the level (zero padding: pixels outside count as 0). Only the points with
``-2 < h < H_l`` and ``-2 < w < W_l`` are used (others, NaN included, give 0 and zero
gradient). The derivative of the hat is taken from the right at its kinks (at an integer
h the pixel floor(h) is the low one): ``d k(q - h)/dh = -1`` for ``floor(h) = q`` and
``+1`` for ``floor(h) = q - 1``.

The pixel coordinate is computed in the input's dtype, a product then a subtraction (as
the library's contract says, so that float32 cases sample the same points), then the rest
in float64. Loops are plain Python over (n, q, m, l, p) and the 2x2 pixels, vectorised
over channels only: keep cases small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np


class MsdaGrads(NamedTuple):
    value: np.ndarray
    sampling_locations: np.ndarray
    attention_weights: np.ndarray


def pixel_coordinate(t, size: int, dtype) -> float:
    """``t * size - 0.5`` computed in ``dtype`` (product, then subtraction), as a float."""
    ft = np.asarray(t, dtype=dtype)[()]
    prod = ft * np.asarray(size, dtype=dtype)[()]
    return float(prod - np.asarray(0.5, dtype=dtype)[()])


def _axis_terms(t: float, size: int):
    """[(pixel q, k(q - t), dk(q - t)/dt)] for the two pixels around t inside [0, size)."""
    lo = math.floor(t)  # a real floor: the kink at an integer t belongs to the right
    fr = t - lo  # k(lo - t) = 1 - fr, k(lo + 1 - t) = fr
    return [(q, k, dk) for q, k, dk in ((lo, 1.0 - fr, -1.0), (lo + 1, fr, 1.0)) if 0 <= q < size]


def sample_terms(h: float, w: float, height: int, width: int):
    """[(row y*W + x, weight, d weight/dh, d weight/dw)] of the point (h, w) (empty when no
    pixel is near), or None when the point is not used."""
    if not (-2.0 < h < height and -2.0 < w < width):
        return None
    return [
        (qy * width + qx, ky * kx, dky * kx, ky * dkx)
        for qy, ky, dky in _axis_terms(h, height)
        for qx, kx, dkx in _axis_terms(w, width)
    ]


def _points(spatial_shapes, level_start_index, loc, dtype):
    """For every (n, q, m, l, p): (start, H, W, sample_terms)."""
    n, lq, m, nl, npt, _ = loc.shape
    for idx in np.ndindex(n, lq, m, nl, npt):
        lv = idx[3]
        height, width = (int(v) for v in spatial_shapes[lv])
        h = pixel_coordinate(loc[idx + (1,)], height, dtype)
        w = pixel_coordinate(loc[idx + (0,)], width, dtype)
        yield idx, int(level_start_index[lv]), height, width, sample_terms(h, w, height, width)


def ref_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    dtype = np.asarray(value).dtype
    v = np.asarray(value, dtype=np.float64)
    loc = np.asarray(sampling_locations)
    a = np.asarray(attention_weights, dtype=np.float64)
    n, s, m, d = v.shape
    out = np.zeros((n, loc.shape[1], m, d))
    for idx, start, _, _, terms in _points(spatial_shapes, level_start_index, loc, dtype):
        b, q, head = idx[:3]
        if terms is None:
            continue
        sample = np.zeros(d)
        for row, wgt, _, _ in terms:
            sample += wgt * v[b, start + row, head]
        out[b, q, head] += a[idx] * sample
    return out.reshape(n, loc.shape[1], m * d)


def ref_ms_deform_attn_backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    """Hand-derived gradients, g = grad_output[n, q, m*D : m*D + D]:

    dL/dvalue[n, start + row, m]   = sum over the points touching row of a * weight * g
    dL/da[n, q, m, l, p]           = g . V(h, w)
    dL/dloc[n, q, m, l, p, 0 (x)]  = W_l * a * g . dV/dw   (dw/dx = W_l)
    dL/dloc[n, q, m, l, p, 1 (y)]  = H_l * a * g . dV/dh
    """
    dtype = np.asarray(value).dtype
    v = np.asarray(value, dtype=np.float64)
    loc = np.asarray(sampling_locations)
    a = np.asarray(attention_weights, dtype=np.float64)
    n, s, m, d = v.shape
    go = np.asarray(grad_output, dtype=np.float64).reshape(n, loc.shape[1], m, d)
    g_value = np.zeros_like(v)
    g_loc = np.zeros(loc.shape)
    g_attn = np.zeros(a.shape)
    for idx, start, height, width, terms in _points(spatial_shapes, level_start_index, loc, dtype):
        b, q, head = idx[:3]
        if terms is None:
            continue
        g = go[b, q, head]
        sample = np.zeros(d)
        dh = np.zeros(d)
        dw = np.zeros(d)
        for row, wgt, wdh, wdw in terms:
            x = v[b, start + row, head]
            g_value[b, start + row, head] += a[idx] * wgt * g
            sample += wgt * x
            dh += wdh * x
            dw += wdw * x
        g_attn[idx] = float(g @ sample)
        g_loc[idx + (0,)] = width * a[idx] * float(g @ dw)
        g_loc[idx + (1,)] = height * a[idx] * float(g @ dh)
    return MsdaGrads(g_value, g_loc, g_attn)


# ---------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------


def level_layout(shapes):
    """(spatial_shapes (L, 2) int64, level_start_index (L,) int64, S) of the level sizes."""
    spatial = np.array(shapes, dtype=np.int64).reshape(-1, 2)
    sizes = spatial[:, 0] * spatial[:, 1]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return spatial, starts, int(sizes.sum())


def make_msda_case(
    rng, n=2, lq=3, m=2, d=3, shapes=((4, 5), (2, 3), (1, 1)), p=2, spread=(-0.2, 1.2), dtype=np.float64
):
    """A dict of the operator's arguments: random values, locations uniform in ``spread``
    (outside [0, 1] at both ends by default), positive and negative attention weights."""
    spatial, starts, s = level_layout(shapes)
    nl = len(spatial)
    return dict(
        value=rng.standard_normal((n, s, m, d)).astype(dtype),
        spatial_shapes=spatial,
        level_start_index=starts,
        sampling_locations=rng.uniform(*spread, (n, lq, m, nl, p, 2)).astype(dtype),
        attention_weights=rng.uniform(-0.5, 1.0, (n, lq, m, nl, p)).astype(dtype),
    )
