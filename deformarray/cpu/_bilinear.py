"""Bilinear sampling helpers shared by the Numba operators."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def tile_corners(h0, w0, h_add, w_add, dy, dx, height, width, idx, valid, frac_h, frac_w, count):
    """Corners of the points ``(h0[j] + h_add + dy[j], w0[j] + w_add + dx[j])``, j < count.

    Writes, for each point j: ``idx[q, j]`` the flat index of corner q in an
    ``height x width`` plane (q = (low,low), (low,high), (high,low), (high,high)),
    ``valid[q, j]`` 1.0 if that corner is inside the image else 0.0 (its index is then
    ``height*width``: callers keep one extra zero row there, so gathers and scatters need
    no branch), and the fractional parts ``frac_h[j], frac_w[j]``. Bilinear weights are
    ``v0*(1-fh)*(1-fw), v1*(1-fh)*fw, v2*fh*(1-fw), v3*fh*fw``.

    Rule (torchvision forward, mmcv gradient): a point with h <= -1, h >= H, w <= -1 or
    w >= W has no valid corner: it samples 0 and has zero gradient. At integer coordinates
    the floor corner is the low one (a one-sided derivative). NaN coordinates fail every
    comparison and sample 0, as in torchvision.

    Branch-free (selects only), so LLVM vectorises the loop over points.
    """
    out = height * width
    for j in range(count):
        h = h0[j] + h_add + dy[j]
        w = w0[j] + w_add + dx[j]
        inside = (h > -1.0) & (w > -1.0) & (h < height) & (w < width)
        hc = h if inside else 0.0
        wc = w if inside else 0.0
        # A real floor: truncating hc + 1 (the old trick) rounds up for hc one ulp below an
        # integer >= 1/2 ulp of hc + 1 (h = nextafter(4, 0) gave hl = 4, a corner outside
        # the image marked valid) and for hc in (-2**-54, 0) (hl = 0 instead of -1).
        hf = np.floor(hc)
        wf = np.floor(wc)
        hl = int(hf)
        wl = int(wf)
        frac_h[j] = hc - hf
        frac_w[j] = wc - wf
        top = inside & (hl >= 0)
        bottom = inside & (hl + 1 <= height - 1)
        left = wl >= 0
        right = wl + 1 <= width - 1
        base = hl * width + wl
        idx[0, j] = base if top & left else out
        idx[1, j] = base + 1 if top & right else out
        idx[2, j] = base + width if bottom & left else out
        idx[3, j] = base + width + 1 if bottom & right else out
        valid[0, j] = 1.0 if top & left else 0.0
        valid[1, j] = 1.0 if top & right else 0.0
        valid[2, j] = 1.0 if bottom & left else 0.0
        valid[3, j] = 1.0 if bottom & right else 0.0


# ---------------------------------------------------------------------------------------
# Clamped bilinear sampling (RoIAlign rule), used by the RoI pooling operators
# ---------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def clamped_axis(t, size, margin):
    """One axis of a clamped bilinear sample at coordinate ``t`` in ``[0, size)``.

    Returns ``(ok, low, high, frac, slope)``:

    - ``ok``: the point is used, ``-margin <= t <= size - 1 + margin`` (False for NaN).
      deform_roi_pool (RoIAlign) uses margin 1 (a point below -1 or above ``size`` samples
      0); deform_psroi_pool (MXNet) uses margin 0.5 (a point outside
      ``[-0.5, size - 0.5]`` is skipped).
    - the point clamped into ``[0, size - 1]`` is ``low + frac`` with ``low`` = its floor
      and ``high = min(low + 1, size - 1)``: weights ``1 - frac`` on ``low``, ``frac`` on
      ``high`` (at ``size - 1``, ``frac`` is 0).
    - ``slope``: 1.0 where the sample moves with ``t``, i.e. ``0 <= t < size - 1``, else
      0.0 (clamped points do not move). The derivative of the sampled value along this
      axis is ``slope * (v[high] - v[low])`` weighted by the other axis: at an integer
      ``t`` this is the derivative from the right, as for deformable convolution.

    Indices come back unsigned (callers index with them in vectorised channel loops).
    """
    ok = (t >= -margin) & (t <= (size - 1) + margin)
    tc = min(max(t, 0.0), size - 1.0) if ok else 0.0
    low = int(tc)  # tc >= 0: truncation is the floor
    high = min(low + 1, size - 1)
    frac = tc - low
    slope = 1.0 if ok & (t >= 0.0) & (t < size - 1.0) else 0.0
    return ok, np.uint64(low), np.uint64(high), frac, slope


@njit(cache=True, inline="always")
def axis_weights(base, shift, num, den, count, size, margin, wgt, slope, idx, cw, cs):
    """Per-pixel weights along one axis of a bin's grid of samples.

    The samples of a bin form a grid (every row coordinate with every column coordinate),
    and a sample is used when both its coordinates are (``clamped_axis``), so a bin's sum
    of bilinear samples is separable: ``sum_{qy, qx} A[qy] * B[qx] * x[qy, qx]`` with
    ``A[q] = sum of the row weights the used rows put on pixel row q`` (same for B). This
    computes one axis for the coordinates ``t_k = base + (k + shift) * num / den``,
    ``k < count`` (written in this order so the coordinates are bitwise those of the
    original operators), and returns ``(used, m)``: the number of used coordinates and of
    touched pixels, listed compactly in ``idx[:m]`` (unsigned, increasing), ``cw[:m]``
    (weight) and ``cs[:m]`` (slope: the derivative of the weight when every coordinate
    moves together, ``clamped_axis``'s rule). ``wgt`` and ``slope`` are scratch arrays of
    ``size`` zeros, left zeroed.
    """
    used = 0
    first = size
    last = -1
    for k in range(count):
        ok, lo, hi, fr, sl = clamped_axis(base + (k + shift) * num / den, size, margin)
        if ok:
            used += 1
            wgt[lo] += 1.0 - fr
            wgt[hi] += fr
            slope[lo] -= sl
            slope[hi] += sl
            first = min(first, np.int64(lo))
            last = max(last, np.int64(hi))
    m = 0
    for q in range(first, last + 1):
        if wgt[q] != 0.0 or slope[q] != 0.0:
            idx[m] = q
            cw[m] = wgt[q]
            cs[m] = slope[q]
            m += 1
        wgt[q] = 0.0
        slope[q] = 0.0
    return used, m


@njit(cache=True, inline="always")
def axis_scratch(size):
    """Scratch and output arrays of ``axis_weights`` for an axis of ``size`` pixels."""
    return (np.zeros(size), np.zeros(size), np.empty(size, np.uint64), np.empty(size), np.empty(size))
