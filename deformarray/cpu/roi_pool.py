"""Deformable RoI pooling (mmcv ``DeformRoIPool`` numbers) on NumPy arrays.

RoI r = [b, x1, y1, x2, y2] covers ``x1*s - 0.5 .. x2*s - 0.5`` (s = spatial_scale), same
for y; bin (i, j) starts at ``start + (i*bin_h, j*bin_w) + gamma*offset*(roi_h, roi_w)``
and averages ``gy*gx`` samples at its sub-bin centres, each a clamped bilinear sample
(``_bilinear.clamped_axis`` with margin 1: RoIAlign's rule), times the mask if given.

Separable bins. A bin's samples are a grid (gy rows x gx columns) and a sample is used
when its row and its column are, so the bin's sum is ``sum_q A[qy] B[qx] x[q]`` with A, B
the per-pixel weights of the rows and columns (``_bilinear.axis_weights``). The kernels
visit each touched pixel once, about (gy+1)*(gx+1) pixels instead of 4*gy*gx corners, and
compute the bin's geometry in O(gy + gx).

Layout. The kernels read the input channels-last, ``(images, H*W, C)``: a pixel is one
contiguous channel vector and the inner loops run over channels (vectorised).

forward   parallel over (RoI, bin row): each task sums its bins into a channel vector and
          writes ``out[r, :, i, j]``.
backward  input: parallel over (image, band of pixel rows). A task owns its rows of one
          image's channels-last gradient, visits that image's RoIs in order and scatters
          the part of each bin inside its rows (no races; every value is added in one fixed
          order, so the result does not depend on the bands, the thread count or the
          workspace bound).
          offset / mask: parallel over (RoI, bin row); per touched pixel the dot product
          ``S_q = sum_c g_c x_c(q)`` gives the value and both slopes; each gradient value
          is owned by one task.

Chunking. Only images that some RoI uses are copied. The channels-last copies (and in the
backward the input gradient) are made for as many images as fit the workspace bound,
or for one image and a range of channels when one image does not fit. That is all the
workspace this operator needs: ``planes * C * H * W * itemsize`` per image, planes = 1
(forward), 1 (backward without offset or mask) or 2.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .. import _config
from .._validate import RoiPoolParams
from ._bilinear import axis_scratch, axis_weights
from ._layout import to_channels_first, to_channels_last
from ._scratch import nbytes, workspace

# Fast-math subset of the coordinate-gradient kernel (as deform_conv's): reassociation lets
# LLVM vectorise its channel dot products; the order is fixed at compile time, so results
# stay bitwise reproducible. The other kernels need none (their channel loops have no
# reduction) and keep strict IEEE arithmetic.
_FM = {"reassoc", "contract"}
_MARGIN = 1.0  # RoIAlign: a sample below -1 or above the size gives 0

# Kernel argument ``bins`` is the tuple (box, grid, offset, mask, has_off, has_mask, gamma,
# height, width) (``_bins``): ``box`` holds per RoI start_h, start_w, roi_h, roi_w, bin_h,
# bin_w (float64), ``grid`` gy, gx (samples per bin side). Channel counters, image slots
# and corner indices are unsigned: Numba adds a negative-index wraparound select to signed
# indices, which stops the channel loops from vectorising.


@njit(cache=True, inline="always")
def _bin_origin(bins, r, i, j):
    """Top-left corner (h, w) of bin (i, j) of RoI r, moved by its offset."""
    box, _, off, _, has_off, _, gamma, _, _ = bins
    hs = box[r, 0]
    ws = box[r, 1]
    if has_off:
        ws += gamma * box[r, 3] * off[r, 0, i, j]
        hs += gamma * box[r, 2] * off[r, 1, i, j]
    return hs + i * box[r, 4], ws + j * box[r, 5]


@njit(cache=True, inline="always")
def _roi_row(task, ph, rlist, rslot):
    """Task (RoI rlist[k], bin row i) of the kernels parallel over both: (r, image slot, i)."""
    k = task // ph
    i = task - k * ph
    return rlist[k], rslot[k], i


@njit(cache=True, inline="always")
def _typed(wv, v):
    """``v`` rounded to the data's type (``wv``: a 1-element array of it), so that the
    channel loops multiply in that type."""
    wv[0] = v
    return wv[0]


@njit(cache=True, inline="always")
def _bin_scale(bins, wv, r, i, j, cnt):
    """The bin's mask (1 without) over its ``cnt`` > 0 samples, in the data's type."""
    mask, has_mask = bins[3], bins[5]
    return _typed(wv, (mask[r, 0, i, j] if has_mask else 1.0) / cnt)


@njit(cache=True, inline="always")
def _bin_axes(bins, r, i, j, ys, xs):
    """Row and column weights of bin (i, j) of RoI r (``axis_weights`` into the
    ``axis_scratch`` tuples ys, xs): (rows, cols)."""
    box, grid, _, _, _, _, _, height, width = bins
    h0, w0 = _bin_origin(bins, r, i, j)
    y_w, y_s, y_idx, y_cw, y_cs = ys
    x_w, x_s, x_idx, x_cw, x_cs = xs
    _, my = axis_weights(h0, 0.5, box[r, 4], grid[r, 0], grid[r, 0], height, _MARGIN, y_w, y_s, y_idx, y_cw, y_cs)
    _, mx = axis_weights(w0, 0.5, box[r, 5], grid[r, 1], grid[r, 1], width, _MARGIN, x_w, x_s, x_idx, x_cw, x_cs)
    return my, mx


@njit(cache=True)
def _bin_axes_strict(bins, r, i, j, ys, xs):
    """``_bin_axes`` compiled on its own, without fast-math: the coordinate-gradient kernel
    calls it so that its sample coordinates are bitwise the forward's (fast-math could fuse
    or reorder their additions)."""
    return _bin_axes(bins, r, i, j, ys, xs)


@njit(cache=True, parallel=True)
def _forward_kernel(xt, c0, rlist, rslot, bins, out):
    """out[r, c0 + c, i, j] = mask * mean over the bin's samples of channel c."""
    grid, height, width = bins[1], bins[7], bins[8]
    cc = np.uint64(xt.shape[2])
    ph, pw = out.shape[2], out.shape[3]
    nr = rlist.shape[0]
    wd = np.uint64(width)
    for task in prange(nr * ph):
        r, n, i = _roi_row(task, ph, rlist, rslot)
        acc = np.empty(cc, xt.dtype)
        wv = np.empty(1, xt.dtype)
        ys = axis_scratch(height)
        xs = axis_scratch(width)
        _, _, y_idx, y_cw, _ = ys
        _, _, x_idx, x_cw, _ = xs
        cnt = grid[r, 0] * grid[r, 1]
        for j in range(pw):
            for c in range(cc):
                acc[c] = 0.0
            my, mx = _bin_axes(bins, r, i, j, ys, xs)
            for a in range(my):
                row = y_idx[a] * wd
                for b in range(mx):
                    w = _typed(wv, y_cw[a] * x_cw[b])
                    if w == 0.0:
                        continue
                    q = row + x_idx[b]
                    for c in range(cc):
                        acc[c] += w * xt[n, q, c]
            # no sample: 0 (acc is 0 too; a NaN mask is not read)
            s = _bin_scale(bins, wv, r, i, j, cnt) if cnt > 0 else _typed(wv, 0.0)
            for c in range(cc):
                out[r, c0 + c, i, j] = acc[c] * s


@njit(cache=True, parallel=True)
def _grad_input_kernel(go, c0, rlist, rslot, bounds, bins, bands, gxt):
    """gxt[slot, pixel, c] += adjoint of the forward, parallel over (image, band of rows).

    A task owns rows ``band * H // bands .. (band + 1) * H // bands`` of one image's
    gradient (all its channels), visits that image's RoIs (``rlist[bounds[s]:bounds[s+1]]``)
    in order and adds the part of each bin that falls in its rows. Every value is added in
    the same order (RoI, bin, pixel) whatever the number of bands.
    """
    box, grid, height, width = bins[0], bins[1], bins[7], bins[8]
    cc = np.uint64(gxt.shape[2])
    ph, pw = go.shape[2], go.shape[3]
    wd = np.uint64(width)
    for task in prange(gxt.shape[0] * bands):
        slot = task // bands
        band = task - slot * bands
        row_lo = np.uint64(band * height // bands)
        row_hi = np.uint64((band + 1) * height // bands)
        g = np.empty(cc, gxt.dtype)
        wv = np.empty(1, gxt.dtype)
        ys = axis_scratch(height)
        xs = axis_scratch(width)
        _, _, y_idx, y_cw, _ = ys
        _, _, x_idx, x_cw, _ = xs
        for k in range(bounds[slot], bounds[slot + 1]):
            r = rlist[k]
            n = rslot[k]
            cnt = grid[r, 0] * grid[r, 1]
            if cnt == 0:
                continue  # no sample: zero output, zero gradient
            for i in range(ph):
                for j in range(pw):
                    # a bin's samples lie in [h0, h0 + bin_h] and touch rows up to 1 beyond
                    h0, _ = _bin_origin(bins, r, i, j)
                    if not (h0 + box[r, 4] + 1.0 >= row_lo and h0 - 1.0 < row_hi):
                        continue  # (a NaN origin is skipped too: it touches nothing)
                    my, mx = _bin_axes(bins, r, i, j, ys, xs)
                    gathered = False
                    for a in range(my):
                        if y_idx[a] < row_lo or y_idx[a] >= row_hi:
                            continue
                        if not gathered:  # the bin's output gradient, once it is needed
                            s = _bin_scale(bins, wv, r, i, j, cnt)
                            for c in range(cc):
                                g[c] = go[r, c0 + c, i, j] * s
                            gathered = True
                        row = y_idx[a] * wd
                        for b in range(mx):
                            w = _typed(wv, y_cw[a] * x_cw[b])
                            if w == 0.0:
                                continue
                            q = row + x_idx[b]
                            for c in range(cc):
                                gxt[n, q, c] += w * g[c]


@njit(cache=True, parallel=True, fastmath=_FM)
def _grad_coord_kernel(xt, go, c0, rlist, rslot, bins, grad_off, grad_mask):
    """Offset and mask gradients of the chunk's channels, added into grad_off / grad_mask.

    With S_q = sum_c g_c x_c(q) for each pixel q the bin touches, the bin's sum of samples
    is sum_q A B S_q, and its derivatives along y and x (all samples move together) are
    sum_q A' B S_q and sum_q A B' S_q (``axis_weights``' weights and slopes).
    """
    box, grid, _, mask, has_off, has_mask, gamma, height, width = bins
    cc = np.uint64(xt.shape[2])
    ph, pw = go.shape[2], go.shape[3]
    nr = rlist.shape[0]
    wd = np.uint64(width)
    for task in prange(nr * ph):
        r, n, i = _roi_row(task, ph, rlist, rslot)
        cnt = grid[r, 0] * grid[r, 1]
        if cnt == 0:
            continue
        gv = np.empty(cc, xt.dtype)
        zero = np.zeros(1, xt.dtype)[0]  # a zero typed like the data
        ys = axis_scratch(height)
        xs = axis_scratch(width)
        _, _, y_idx, y_cw, y_cs = ys
        _, _, x_idx, x_cw, x_cs = xs
        for j in range(pw):
            for c in range(cc):
                gv[c] = go[r, c0 + c, i, j]
            my, mx = _bin_axes_strict(bins, r, i, j, ys, xs)
            s_val = 0.0
            s_y = 0.0
            s_x = 0.0
            for a in range(my):
                row = y_idx[a] * wd
                ay = y_cw[a]
                dy = y_cs[a]
                for b in range(mx):
                    ax = x_cw[b]
                    dx = x_cs[b]
                    if (ay == 0.0 and dy == 0.0) or (ax == 0.0 and dx == 0.0):
                        continue
                    q = row + x_idx[b]
                    sq = zero
                    for c in range(cc):
                        sq += gv[c] * xt[n, q, c]
                    s_val += ay * ax * sq
                    if dy != 0.0:
                        s_y += dy * ax * sq
                    if dx != 0.0:
                        s_x += ay * dx * sq
            m = mask[r, 0, i, j] if has_mask else 1.0
            if has_mask:
                grad_mask[r, 0, i, j] += s_val / cnt
            if has_off:
                grad_off[r, 0, i, j] += gamma * box[r, 3] * m * s_x / cnt
                grad_off[r, 1, i, j] += gamma * box[r, 2] * m * s_y / cnt


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def _boxes(p: RoiPoolParams, rois):
    """Per-RoI geometry in float64: ``box`` (R, 6), ``grid`` (R, 2), batch indices (R,)."""
    v = np.asarray(rois, dtype=np.float64)
    s = p.spatial_scale
    start_w = v[:, 1] * s - 0.5
    start_h = v[:, 2] * s - 0.5
    roi_w = (v[:, 3] * s - 0.5) - start_w
    roi_h = (v[:, 4] * s - 0.5) - start_h
    box = np.ascontiguousarray(
        np.stack([start_h, start_w, roi_h, roi_w, roi_h / p.pooled_h, roi_w / p.pooled_w], axis=1)
    )
    if p.sampling_ratio > 0:
        grid = np.full((p.r, 2), p.sampling_ratio, dtype=np.int64)
    else:
        grid = np.stack([np.ceil(roi_h / p.pooled_h), np.ceil(roi_w / p.pooled_w)], axis=1).astype(np.int64)
    return box, grid, v[:, 0].astype(np.int64)


def plan_chunks(batch, n_channels: int, plane_bytes: int, limit: int):
    """Chunks ``(images, c0, cc)`` over the images that some RoI uses: as many images
    (all channels) as fit ``limit`` bytes at ``plane_bytes`` per channel plane, or one
    image and a range of channels when one image does not fit.

    Returns ``((images, channels), chunks)``: the size of the first chunk, the largest,
    and an iterator that makes the chunks one at a time (there can be images x channel
    ranges of them: a list of their index views took tens of KiB at small bounds)."""
    used = np.unique(batch)
    per_image = plane_bytes * n_channels
    if per_image <= limit:
        step = max(1, limit // per_image)
        chunks = ((used[k : k + step], 0, n_channels) for k in range(0, len(used), step))
        return (min(step, len(used)), n_channels), chunks
    cstep = max(1, limit // plane_bytes)
    chunks = (
        (used[k : k + 1], c0, min(cstep, n_channels - c0))
        for k in range(len(used))
        for c0 in range(0, n_channels, cstep)
    )
    return (1, min(cstep, n_channels)), chunks


def chunk_rois(batch, order, sorted_batch, images):
    """RoIs of the given (sorted) images, in their original order within each image, and
    the slot of each one's image in ``images``."""
    lo = np.searchsorted(sorted_batch, images[0], side="left")
    hi = np.searchsorted(sorted_batch, images[-1], side="right")
    rlist = order[lo:hi]
    slots = np.searchsorted(images, batch[rlist]).astype(np.uint64)
    return rlist, slots


def _channels_last(input, images, c0, cc, buf):
    """(len(images), H*W, cc) channels-last copy of channels c0..c0+cc of those images."""
    _, _, h, w = input.shape
    xt = buf.empty((len(images), h * w, cc), input.dtype)
    to_channels_last(input, images, c0, xt)
    return xt


def _bins(p: RoiPoolParams, rois, offset, mask, dtype):
    """The kernels' ``bins`` tuple (offset and mask as arrays Numba can take: a 1-element
    dummy when absent) and the RoIs' batch indices."""
    box, grid, batch = _boxes(p, rois)
    dummy = np.zeros((1, 1, 1, 1), dtype=dtype)
    off = np.ascontiguousarray(offset) if offset is not None else dummy
    m = np.ascontiguousarray(mask) if mask is not None else dummy
    return (box, grid, off, m, offset is not None, mask is not None, p.gamma, p.h, p.w), batch


def forward(p: RoiPoolParams, input, rois, offset, mask):
    dtype = input.dtype
    out = np.empty(p.out_shape, dtype=dtype)  # every value is written once
    if p.r == 0 or p.c == 0:
        return out
    bins, batch = _bins(p, rois, offset, mask, dtype)
    order = np.argsort(batch, kind="stable")
    sorted_batch = batch[order]
    (ni, nch), chunks = plan_chunks(batch, p.c, p.h * p.w * dtype.itemsize, _config.get_workspace_limit())
    buf = workspace(nbytes((ni, p.h * p.w, nch), dtype))
    for images, c0, cc in chunks:
        buf.reset()
        xt = _channels_last(input, images, c0, cc, buf)
        rlist, slots = chunk_rois(batch, order, sorted_batch, images)
        _forward_kernel(xt, np.uint64(c0), rlist, slots, bins, out)
    return out


def _bands(n_images: int, height: int) -> int:
    """Bands of rows per image for the input-gradient kernel: two tasks per thread in all
    (load balance), each band at least one row. Whole pixel rows per task: with the
    channels split between threads instead, the scatter ran no faster on 2 threads than on
    1 (15.3-16.4 ms either way on the bench's first RoI row; bands: 7.7-7.9 ms on 2
    threads, 2-core VM)."""
    return max(1, min(height, -(-2 * numba.get_num_threads() // n_images)))


def backward(p: RoiPoolParams, grad_output, input, rois, offset, mask, deterministic=True):
    # ``deterministic`` is accepted for API symmetry: this backend always is.
    dtype = input.dtype
    grad_x = np.zeros(input.shape, dtype=dtype)
    grad_off = np.zeros(offset.shape, dtype=dtype) if offset is not None else None
    grad_m = np.zeros(mask.shape, dtype=dtype) if mask is not None else None
    if p.r == 0 or p.c == 0:
        return grad_x, grad_off, grad_m
    bins, batch = _bins(p, rois, offset, mask, dtype)
    go = np.ascontiguousarray(grad_output)
    coords = offset is not None or mask is not None
    gof = grad_off if grad_off is not None else np.zeros((1, 1, 1, 1), dtype=dtype)
    gm = grad_m if grad_m is not None else np.zeros((1, 1, 1, 1), dtype=dtype)
    order = np.argsort(batch, kind="stable")
    sorted_batch = batch[order]
    planes = 2 if coords else 1
    no_spill = np.empty((0, 1, 1, 1), dtype)
    zero_bias = np.zeros(p.c, dtype)
    (ni, nch), chunks = plan_chunks(batch, p.c, planes * p.h * p.w * dtype.itemsize, _config.get_workspace_limit())
    buf = workspace(planes * nbytes((ni, p.h * p.w, nch), dtype))
    for images, c0, cc in chunks:
        buf.reset()
        rlist, slots = chunk_rois(batch, order, sorted_batch, images)
        gxt = buf.zeros((len(images), p.h * p.w, cc), dtype)
        bounds = np.searchsorted(slots, np.arange(len(images) + 1, dtype=np.uint64))
        _grad_input_kernel(go, np.uint64(c0), rlist, slots, bounds, bins, _bands(len(images), p.h), gxt)
        to_channels_first(gxt, no_spill, zero_bias[:cc], images, c0, 0, grad_x.reshape(p.n, p.c, p.h * p.w))
        if coords:
            xt = _channels_last(input, images, c0, cc, buf)
            _grad_coord_kernel(xt, go, np.uint64(c0), rlist, slots, bins, gof, gm)
    return grad_x, grad_off, grad_m
