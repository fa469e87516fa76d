"""Bilinear sampling helpers shared by the Numba operators.

A "sampling plan" stores, for one sample point, its four corners as flat indices into an
(H*W) image plane with their bilinear weights and the weights of the two partial
derivatives. Invalid corners get index 0 and zero weights, so the gather loops that use
the plan need no branches.
"""

from __future__ import annotations

import math

from numba import njit


@njit(cache=True, inline="always")
def plan_point(h, w, height, width, idx, bw, dhw, dww, j, with_grad):
    """Fill row ``j`` of the plan arrays (each ``(..., 4)``) for the point ``(h, w)``.

    Rule (torchvision forward, mmcv gradient): a point with h <= -1, h >= H, w <= -1 or
    w >= W samples 0 and has zero gradient; otherwise corners outside the image count
    as 0. At integer coordinates the floor corner is used (one-sided derivative).
    NaN coordinates fail every comparison and so sample 0, as in torchvision.
    """
    for q in range(4):
        idx[j, q] = 0
        bw[j, q] = 0.0
        if with_grad:
            dhw[j, q] = 0.0
            dww[j, q] = 0.0
    if not (h > -1.0 and w > -1.0 and h < height and w < width):
        return
    h_low = math.floor(h)
    w_low = math.floor(w)
    lh = h - h_low
    lw = w - w_low
    hh = 1.0 - lh
    hw = 1.0 - lw
    hl = int(h_low)
    wl = int(w_low)
    top = hl >= 0
    bottom = hl + 1 <= height - 1
    left = wl >= 0
    right = wl + 1 <= width - 1
    # corner order: (low, low), (low, high), (high, low), (high, high)
    if top and left:
        idx[j, 0] = hl * width + wl
        bw[j, 0] = hh * hw
        if with_grad:
            dhw[j, 0] = -hw
            dww[j, 0] = -hh
    if top and right:
        idx[j, 1] = hl * width + wl + 1
        bw[j, 1] = hh * lw
        if with_grad:
            dhw[j, 1] = -lw
            dww[j, 1] = hh
    if bottom and left:
        idx[j, 2] = (hl + 1) * width + wl
        bw[j, 2] = lh * hw
        if with_grad:
            dhw[j, 2] = hw
            dww[j, 2] = -lh
    if bottom and right:
        idx[j, 3] = (hl + 1) * width + wl + 1
        bw[j, 3] = lh * lw
        if with_grad:
            dhw[j, 3] = lw
            dww[j, 3] = lh
