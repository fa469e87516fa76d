"""Bilinear sampling helpers shared by the Numba operators."""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def corners(h, w, height, width):
    """The four bilinear corners of the point ``(h, w)`` in an ``height x width`` plane.

    Returns ``(i0, i1, i2, i3, e0, e1, e2, e3, lh, lw)``: flat indices of the corners
    (low,low), (low,high), (high,low), (high,high); ``e*`` is 1.0 for a corner inside the
    image and 0.0 otherwise, and its index is then ``height*width``: callers keep one
    extra zero row there, so gathers and scatters need no branch; ``lh, lw`` are the
    fractional parts. Bilinear weights are ``e0*(1-lh)*(1-lw), e1*(1-lh)*lw,
    e2*lh*(1-lw), e3*lh*lw``.

    Rule (torchvision forward, mmcv gradient): a point with h <= -1, h >= H, w <= -1 or
    w >= W has all ``e* = 0``: it samples 0 and has zero gradient. At integer coordinates
    the floor corner is the low one (a one-sided derivative). NaN coordinates fail every
    comparison and sample 0, as in torchvision.
    """
    if not (h > -1.0 and w > -1.0 and h < height and w < width):
        out = height * width
        return out, out, out, out, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    # h, w > -1 here, so truncating h + 1 is floor(h) + 1 (cheaper than a floor call)
    hl = int(h + 1.0) - 1
    wl = int(w + 1.0) - 1
    lh = h - hl
    lw = w - wl
    top = hl >= 0
    bottom = hl + 1 <= height - 1
    left = wl >= 0
    right = wl + 1 <= width - 1
    out = height * width
    i0 = hl * width + wl if top and left else out
    i1 = hl * width + wl + 1 if top and right else out
    i2 = (hl + 1) * width + wl if bottom and left else out
    i3 = (hl + 1) * width + wl + 1 if bottom and right else out
    e0 = 1.0 if top and left else 0.0
    e1 = 1.0 if top and right else 0.0
    e2 = 1.0 if bottom and left else 0.0
    e3 = 1.0 if bottom and right else 0.0
    return i0, i1, i2, i3, e0, e1, e2, e3, lh, lw
