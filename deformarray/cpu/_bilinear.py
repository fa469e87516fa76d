"""Bilinear sampling helpers shared by the Numba operators."""

from __future__ import annotations

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
        # hc, wc > -1 here, so truncating hc + 1 is floor(hc) + 1 (no floor call)
        hl = int(hc + 1.0) - 1
        wl = int(wc + 1.0) - 1
        frac_h[j] = hc - hl
        frac_w[j] = wc - wl
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
