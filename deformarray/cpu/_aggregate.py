"""The shared core of the channels-last grouped operators: a weighted sum of bilinear
samples of D-channel vectors (ms_deform_attn now; DCNv3 / DCNv4 next).

Every helper works on a *plane*: a 2-D view ``(rows, D)`` of one image (or one level) and
one group (or head), row ``y*W + x``, the D channels of that group in its columns, e.g.
``value[n, start:start + H*W, m]`` of an ``(N, S, M, D)`` array or ``x[n, :, g]`` of an
``(N, H*W, G, D)`` one. The operator modules own the loops (which query, which point, the
parallel split); these helpers own the numbers. CUDA's ``kernels_cu/aggregate.cuh`` keeps
the same contract, so both backends agree to rounding, and bit for bit where the order of
the sums agrees.

Contract (every user of the core keeps it)
------------------------------------------
- Accumulation type ``acc``: float64 for float64 data, float32 for float32 data (on the
  CPU, the data's own type). Every product and sum below is done in ``acc``, one rounding
  per operation, never fused (no fast-math flags in any kernel using these helpers).
- Pixel coordinates ``(h, w)`` are computed by the operator in ``acc``. For normalised
  locations (ms_deform_attn: 0 and 1 are the outer edges, ``grid_sample(align_corners=False)``
  of the grid ``2*loc - 1`` up to rounding): ``w = x * W - 0.5``, ``h = y * H - 0.5``, a
  product then a subtraction (``pixel``).
- A point is processed only if ``h > lower and h < H and w > lower and w < W``
  (ms_deform_attn: ``lower = -2``, grid_sample's zero padding). Other points, NaN and
  infinities included, contribute nothing and get zero gradient; the operator skips them
  (``corners(...)[0]`` is False).
- ``h_low = floor(h)`` (a real floor), ``w_low = floor(w)``, ``lh = h - h_low``,
  ``lw = w - w_low``, ``hh = 1 - lh``, ``hw = 1 - lw``. Corners, in this order:
  1 ``(h_low, w_low)`` weight ``hh*hw``, 2 ``(h_low, w_low+1)`` ``hh*lw``,
  3 ``(h_low+1, w_low)`` ``lh*hw``, 4 ``(h_low+1, w_low+1)`` ``lh*lw``. A corner outside
  ``[0, H) x [0, W)`` is absent (zero padding per corner): it is skipped, its value counts
  as 0. So at ``h = -1`` exactly the sample is 0 but its derivative along h is not.
- Sample ``S_d = v1*w1 + v2*w2 + v3*w3 + v4*w4``: a sum from 0 in corner order over the
  present corners. The operator adds ``a * S_d`` (``a`` its weight for the point) into
  its accumulator, in its own fixed order of points.
- Backward, with ``g_d`` the output gradient of the point's D-vector:
  value: ``plane[corner row, d] += (a * w_corner) * g_d``;
  weight: ``sum_d g_d * S_d``;
  ``dS_d/dh = hw*(v3 - v1) + lw*(v4 - v2)``, ``dS_d/dw = hh*(v2 - v1) + lh*(v4 - v3)``
  (absent corners 0); the operator turns ``sum_d g_d * dS_d/dh`` and ``.../dw`` into its
  coordinate gradients (ms_deform_attn: ``H * a * ...`` and ``W * a * ...``). Each sum
  over d starts from 0 and runs d = 0, 1, ..., D-1.

Everything is ``inline="always"``: the helpers cost nothing over writing the loops out, and
each kernel that uses them compiles them for its own types.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def pixel(t, size):
    """The pixel coordinate of the normalised coordinate ``t`` (0 and 1 the outer edges)
    along an axis of ``size`` pixels: ``t * size - 0.5`` in t's type, a product then a
    subtraction."""
    f = type(t)
    return t * f(size) - f(0.5)


@njit(cache=True, inline="always")
def corners(h, w, height, width, lower):
    """The corner setup of the point at pixel coordinates ``(h, w)`` (acc-typed) in a
    ``height x width`` plane, computed once per point.

    Returns ``(ok, r1, r2, r3, r4, w1, w2, w3, w4, lh, lw, hh, hw)``: ``ok`` whether the
    point is processed (``lower < h < height`` and ``lower < w < width``), the plane rows
    of corners 1-4 (-1 where absent) and their weights, and the fractions. A point that is
    not processed comes back with every corner absent and zero weights.
    """
    f = type(h)
    zero = f(0.0)
    if not ((h > lower) and (h < f(height)) and (w > lower) and (w < f(width))):
        return False, -1, -1, -1, -1, zero, zero, zero, zero, zero, zero, zero, zero
    hf = np.floor(h)
    wf = np.floor(w)
    hl = int(hf)
    wl = int(wf)
    lh = h - hf
    lw = w - wf
    hh = f(1.0) - lh
    hw = f(1.0) - lw
    # lower < h < height puts h_low in [lower - 1, height - 1]: each corner checks both ends
    # it can cross (with lower = -2, h_low + 1 = -1 below the plane)
    top = hl >= 0
    bottom = (hl + 1 >= 0) and (hl + 1 < height)
    left = wl >= 0
    right = (wl + 1 >= 0) and (wl + 1 < width)
    base = hl * width + wl
    r1 = base if top and left else -1
    r2 = base + 1 if top and right else -1
    r3 = base + width if bottom and left else -1
    r4 = base + width + 1 if bottom and right else -1
    return True, r1, r2, r3, r4, hh * hw, hh * lw, lh * hw, lh * lw, lh, lw, hh, hw


@njit(cache=True, inline="always")
def add_sample(plane, c, a, acc):
    """``acc[d] += a * S_d`` for d < D, the sample of the point set up in ``c``
    (``corners``) from the plane's rows."""
    r1, r2, r3, r4 = c[1], c[2], c[3], c[4]
    w1, w2, w3, w4 = c[5], c[6], c[7], c[8]
    zero = type(a)(0.0)
    for d in range(acc.shape[0]):
        s = zero
        if r1 >= 0:
            s += plane[r1, d] * w1
        if r2 >= 0:
            s += plane[r2, d] * w2
        if r3 >= 0:
            s += plane[r3, d] * w3
        if r4 >= 0:
            s += plane[r4, d] * w4
        acc[d] += a * s


@njit(cache=True, inline="always")
def _scatter_corner(gplane, r, aw, g):
    for d in range(g.shape[0]):
        gplane[r, d] += aw * g[d]


@njit(cache=True, inline="always")
def scatter(gplane, c, a, g):
    """The value gradient of one point: ``gplane[corner row, d] += (a * w_corner) * g[d]``
    for each present corner, in corner order."""
    if c[1] >= 0:
        _scatter_corner(gplane, c[1], a * c[5], g)
    if c[2] >= 0:
        _scatter_corner(gplane, c[2], a * c[6], g)
    if c[3] >= 0:
        _scatter_corner(gplane, c[3], a * c[7], g)
    if c[4] >= 0:
        _scatter_corner(gplane, c[4], a * c[8], g)


@njit(cache=True, inline="always")
def dots(plane, c, g):
    """``(sum_d g[d]*S_d, sum_d g[d]*dS_d/dh, sum_d g[d]*dS_d/dw)`` of the point set up in
    ``c``, each summed from 0 in channel order."""
    r1, r2, r3, r4 = c[1], c[2], c[3], c[4]
    w1, w2, w3, w4 = c[5], c[6], c[7], c[8]
    lh, lw, hh, hw = c[9], c[10], c[11], c[12]
    zero = type(lh)(0.0)
    gs = zero
    gh = zero
    gw = zero
    for d in range(g.shape[0]):
        s = zero
        v1 = zero
        v2 = zero
        v3 = zero
        v4 = zero
        if r1 >= 0:
            v1 = plane[r1, d]
            s += v1 * w1
        if r2 >= 0:
            v2 = plane[r2, d]
            s += v2 * w2
        if r3 >= 0:
            v3 = plane[r3, d]
            s += v3 * w3
        if r4 >= 0:
            v4 = plane[r4, d]
            s += v4 * w4
        gd = g[d]
        gs += gd * s
        gh += gd * (hw * (v3 - v1) + lw * (v4 - v2))
        gw += gd * (hh * (v2 - v1) + lh * (v4 - v3))
    return gs, gh, gw
