"""The shared core of the channels-last grouped operators: a weighted sum of bilinear
samples of D-channel vectors (ms_deform_attn now; DCNv3 / DCNv4 next).

Every helper works on a *plane*: the ``(rows, D)`` view of one image (or one level) and
one group (or head), row ``y*W + x``, the D channels of that group in its columns, e.g.
``value[n, start:start + H*W, m]`` of an ``(N, S, M, D)`` array or ``x[n, :, g]`` of an
``(N, H*W, G, D)`` one, passed as a flat array, a base and a row stride (below).
The operator modules own the loops (which query, which point, the
parallel split); these helpers own the numbers, and ``split`` / ``channel_block`` the index
arithmetic of the splits the operators share. CUDA's ``kernels_cu/aggregate.cuh`` keeps
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

How the helpers reach the data. A plane is ``(flat, base, stride)``: element ``(row, d)``
of the plane is ``flat[base + row*stride + d]`` of a 1-D C-contiguous view of the whole
array (``value.reshape(-1)``, with ``base`` the flat index of the plane's ``(0, 0)`` and
``stride`` the distance between rows, e.g. ``M*D``); a D-vector is ``(flat, offset)``. The
inner loops run over d at unit stride with unsigned indices (``_u``: Numba wraps negative
signed indices, a select per access that keeps LLVM from vectorising), so LLVM vectorises
them ACROSS channels: each channel keeps its own sequence of operations, the order above,
one rounding each; only the sums over d (``dots``) are reductions, and those run as a
separate scalar loop over d from 0 in order on products computed (vectorised) into a
scratch buffer. A point with all four corners present (almost all of them) takes that
branch-free path; a point with an absent corner takes the scalar path with a test per
corner, which gives the same numbers (the contract's order either way).

Everything is ``inline="always"``: the helpers cost nothing over writing the loops out, and
each kernel that uses them compiles them for its own types. Numba's cache does not see an
edit here (inlined into the kernels' cached code): delete ``deformarray/cpu/__pycache__``'s
``*.nbi`` / ``*.nbc`` after editing this file.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

if numba.config.DISABLE_JIT:  # pragma: no cover - CI's pure-Python run

    def _u(i):
        """An index as is (plain Python: no wrap-around to avoid, and ints are faster)."""
        return i

else:

    @njit(cache=True, inline="always")
    def _u(i):
        """An index as uint64: Numba does not wrap-around-check unsigned indices, so the
        loops over d stay free of selects and vectorise."""
        return np.uint64(i)


@njit(cache=True, inline="always")
def split(task, n1, n2):
    """``(i0, i1, i2)`` of ``task = (i0*n1 + i1)*n2 + i2``: a parallel task over three axes,
    the last fastest."""
    i0 = task // (n1 * n2)
    rest = task - i0 * (n1 * n2)
    i1 = rest // n2
    return i0, i1, rest - i1 * n2


@njit(cache=True, inline="always")
def channel_block(b, blocks, depth):
    """Channels ``[d0, d1)`` of block b of ``blocks`` over ``depth`` channels (empty when
    there are more blocks than channels)."""
    return b * depth // blocks, (b + 1) * depth // blocks


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
def _all_present(c):
    return c[1] >= 0 and c[2] >= 0 and c[3] >= 0 and c[4] >= 0


@njit(cache=True, inline="always")
def _offsets(base, stride, c):
    """Flat indices of the rows of corners 1-4 (all present) in the plane, unsigned."""
    return _u(base + c[1] * stride), _u(base + c[2] * stride), _u(base + c[3] * stride), _u(base + c[4] * stride)


@njit(cache=True, inline="always")
def _sample(flat, o1, o2, o3, o4, w1, w2, w3, w4, d, zero):
    """``S_d`` with all four corners present: from 0, in corner order."""
    s = zero
    s += flat[o1 + d] * w1
    s += flat[o2 + d] * w2
    s += flat[o3 + d] * w3
    s += flat[o4 + d] * w4
    return s


@njit(cache=True, inline="always")
def add_sample(flat, base, stride, c, a, acc, off, depth):
    """``acc[off + d] += a * S_d`` for d < depth, the sample of the point set up in ``c``
    (``corners``) from the plane ``(flat, base, stride)``."""
    r1, r2, r3, r4 = c[1], c[2], c[3], c[4]
    w1, w2, w3, w4 = c[5], c[6], c[7], c[8]
    zero = type(a)(0.0)
    if _all_present(c):
        o1, o2, o3, o4 = _offsets(base, stride, c)
        oa = _u(off)
        for d in range(_u(depth)):
            acc[oa + d] += a * _sample(flat, o1, o2, o3, o4, w1, w2, w3, w4, d, zero)
        return
    for d in range(depth):
        s = zero
        if r1 >= 0:
            s += flat[base + r1 * stride + d] * w1
        if r2 >= 0:
            s += flat[base + r2 * stride + d] * w2
        if r3 >= 0:
            s += flat[base + r3 * stride + d] * w3
        if r4 >= 0:
            s += flat[base + r4 * stride + d] * w4
        acc[off + d] += a * s


@njit(cache=True, inline="always")
def _scatter_corner(gflat, o, aw, g, goff, depth):
    og = _u(goff)
    for d in range(_u(depth)):
        gflat[o + d] += aw * g[og + d]


@njit(cache=True, inline="always")
def scatter(gflat, base, stride, c, a, g, goff, depth):
    """The value gradient of one point into the plane ``(gflat, base, stride)``:
    ``plane[corner row, d] += (a * w_corner) * g[goff + d]`` for d < depth, for each
    present corner, in corner order."""
    if c[1] >= 0:
        _scatter_corner(gflat, _u(base + c[1] * stride), a * c[5], g, goff, depth)
    if c[2] >= 0:
        _scatter_corner(gflat, _u(base + c[2] * stride), a * c[6], g, goff, depth)
    if c[3] >= 0:
        _scatter_corner(gflat, _u(base + c[3] * stride), a * c[7], g, goff, depth)
    if c[4] >= 0:
        _scatter_corner(gflat, _u(base + c[4] * stride), a * c[8], g, goff, depth)


@njit(cache=True, inline="always")
def dots(flat, base, stride, c, g, goff, depth, buf):
    """``(sum_d g_d*S_d, sum_d g_d*dS_d/dh, sum_d g_d*dS_d/dw)`` of the point set up in
    ``c`` from the plane ``(flat, base, stride)``, ``g_d = g[goff + d]``, each summed from 0
    in channel order. ``buf``: scratch of ``3*depth`` entries (the products, computed
    vectorised across d, before the in-order sums)."""
    r1, r2, r3, r4 = c[1], c[2], c[3], c[4]
    w1, w2, w3, w4 = c[5], c[6], c[7], c[8]
    lh, lw, hh, hw = c[9], c[10], c[11], c[12]
    zero = type(lh)(0.0)
    gs = zero
    gh = zero
    gw = zero
    if _all_present(c):
        o1, o2, o3, o4 = _offsets(base, stride, c)
        og = _u(goff)
        uh = _u(depth)
        uw = _u(2 * depth)
        # three loops, one store each: few enough runtime alias checks for LLVM to vectorise
        for d in range(_u(depth)):
            buf[d] = g[og + d] * _sample(flat, o1, o2, o3, o4, w1, w2, w3, w4, d, zero)
        for d in range(_u(depth)):
            buf[uh + d] = g[og + d] * (hw * (flat[o3 + d] - flat[o1 + d]) + lw * (flat[o4 + d] - flat[o2 + d]))
        for d in range(_u(depth)):
            buf[uw + d] = g[og + d] * (hh * (flat[o2 + d] - flat[o1 + d]) + lh * (flat[o4 + d] - flat[o3 + d]))
        for d in range(_u(depth)):
            gs += buf[d]
            gh += buf[uh + d]
            gw += buf[uw + d]
        return gs, gh, gw
    for d in range(depth):
        s = zero
        v1 = zero
        v2 = zero
        v3 = zero
        v4 = zero
        if r1 >= 0:
            v1 = flat[base + r1 * stride + d]
            s += v1 * w1
        if r2 >= 0:
            v2 = flat[base + r2 * stride + d]
            s += v2 * w2
        if r3 >= 0:
            v3 = flat[base + r3 * stride + d]
            s += v3 * w3
        if r4 >= 0:
            v4 = flat[base + r4 * stride + d]
            s += v4 * w4
        gd = g[goff + d]
        gs += gd * s
        gh += gd * (hw * (v3 - v1) + lw * (v4 - v2))
        gw += gd * (hh * (v2 - v1) + lh * (v4 - v3))
    return gs, gh, gw
