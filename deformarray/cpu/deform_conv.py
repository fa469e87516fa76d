"""Deformable convolution v1/v2 on NumPy arrays: Numba sampling kernels + BLAS products.

Layout. The kernels work channels-last: the input is read as ``(N, H*W, C)`` so that the
four bilinear corners of a sample point are four contiguous channel vectors, and every
inner loop runs over channels (vectorised, no gathers). A sample point is shared by all
channels of its offset group, so its coordinates are computed once per point.

Columns. ``cols`` is ``(nc, P, groups * K * Cg)``: for output pixel p, conv group r,
kernel point k and channel c of the group, entry ``r*K*Cg + k*Cg + c`` (matching the
weight reordered to ``(groups, C_out/groups, K*Cg)``), so each conv group's product is one
BLAS call per image.

forward   ``_im2col`` -> one product per image and conv group, channels-last result
          (``cols @ W^T``: BLAS runs it faster than ``W @ cols^T`` on these shapes) ->
          ``to_channels_first`` (to NCHW, + bias)
backward  ``_im2col`` -> grad weight = grad_out @ cols -> grad cols = grad_out^T @ W
          (written over the column buffer) -> ``_col2im`` (parallel over blocks of input
          channels: a task owns its channels' values in every pixel, so it adds without
          races, and always in pixel order) -> ``_coord_grad`` (parallel over output-pixel
          tiles; each offset/mask gradient value is written once) -> ``to_channels_first``
          (input gradient to NCHW, col2im's spill buffers added in part order).

Chunking. Images are processed in chunks whose buffers fit the workspace bound
(``deformarray.set_workspace_limit``); an image too large for the bound is split over its
output pixels. Every reduction has a fixed order that depends only on the shapes and the
bound, never on thread scheduling: the backward gives the same bits on every run.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _config
from .._chunking import pixels_per_chunk
from .._validate import ConvParams, check_plane_size
from ._bilinear import tile_corners
from ._blas import matmul, own_threads
from ._layout import to_channels_first, to_channels_last
from ._scratch import nbytes, workspace

_TILE = 64  # output pixels per parallel task
# Reassociation lets LLVM vectorise the channel dot products; the order is still fixed
# at compile time, so results stay bitwise reproducible. No 'nnan'/'ninf': NaN propagates.
_FM = {"reassoc", "contract"}


# Each kernel task works on tiles of at most _TILE output pixels. For every kernel point
# it first computes the tile's sample points in one vectorised loop (``tile_corners``:
# corner indices, validity, fractional parts), then runs the channel loops: a point's
# corners are shared by all channels of its offset group.


@njit(cache=True, inline="always")
def _tile_buffers(like):
    """A task's per-tile arrays: pixel bases h0, w0, fractions fh, fw, corner indices,
    validity, and weights in the precision of ``like``."""
    return (
        np.empty(_TILE),
        np.empty(_TILE),
        np.empty(_TILE),
        np.empty(_TILE),
        np.empty((4, _TILE), np.uint64),
        np.empty((4, _TILE)),
        np.empty((4, _TILE), like.dtype),
    )


@njit(cache=True, inline="always")
def _tile_bases(p_lo, cnt, geo, h0, w0):
    """Top-left input coordinate of each output pixel p_lo .. p_lo+cnt-1 of the tile."""
    w_out, sh, sw, ph, pw = geo[2], geo[4], geo[5], geo[6], geo[7]
    for j in range(cnt):
        p = p_lo + j
        ho = p // w_out
        h0[j] = ho * sh - ph
        w0[j] = (p - ho * w_out) * sw - pw


@njit(cache=True, inline="always")
def _tile_points(off, mask, has_mask, n, ch, k, p_lo, cnt, geo, bufs):
    """Sample points of kernel point k (offset channel pair ch) for the tile, and their
    bilinear weights times the mask in ``wts`` (the data's precision); ``bufs``: the
    task's ``_tile_buffers``."""
    h0, w0, fh, fw, idx, valid, wts = bufs
    height, width, kw, dh, dw = geo[0], geo[1], geo[3], geo[8], geo[9]
    tile_corners(
        h0,
        w0,
        (k // kw) * dh,
        (k % kw) * dw,
        off[n, 2 * ch, p_lo : p_lo + cnt],
        off[n, 2 * ch + 1, p_lo : p_lo + cnt],
        height,
        width,
        idx,
        valid,
        fh,
        fw,
        cnt,
    )
    for j in range(cnt):
        s = mask[n, ch, p_lo + j] if has_mask else 1.0
        wts[0, j] = valid[0, j] * (1.0 - fh[j]) * (1.0 - fw[j]) * s
        wts[1, j] = valid[1, j] * (1.0 - fh[j]) * fw[j] * s
        wts[2, j] = valid[2, j] * fh[j] * (1.0 - fw[j]) * s
        wts[3, j] = valid[3, j] * fh[j] * fw[j] * s


@njit(cache=True, inline="always")
def _tile(task, n_tiles, n_pix):
    """Task (image n, tile of output pixels) of the kernels parallel over tiles: (n, first
    pixel of the tile, pixels in it)."""
    lo = (task % n_tiles) * _TILE
    return task // n_tiles, lo, min(_TILE, n_pix - lo)


@njit(cache=True, inline="always")
def _quad(a, j):
    """Point j's four corner entries of a (4, _TILE) tile array, in corner order."""
    return a[0, j], a[1, j], a[2, j], a[3, j]


# Channel runs. A "block" is a set of channels of one offset group (so they share sample
# points); its channels form contiguous runs inside one conv group each. runs[b, j] =
# (first channel, length, column index of the first channel at kernel point 0); the column
# index at kernel point k adds k * Cg. Inner loops then run over contiguous channels.
# Arrays are indexed in full inside the loops: per-point views would cost refcounting.
# Corner indices, runs and channel counters are unsigned: Numba adds a negative-index
# wraparound select to every signed index it cannot prove non-negative, which stops the
# channel loops from vectorising (measured: 2.3x slower gathers).


@njit(cache=True, inline="always")
def _run(runs, b, r, k, cg):
    """Run r of block b at kernel point k: (first channel, first column, length)."""
    return runs[b, r, 0], runs[b, r, 2] + np.uint64(k * cg), runs[b, r, 1]


@njit(cache=True, parallel=True, fastmath=_FM)
def _im2col(xt, off, mask, has_mask, n0, p0, geo, cg, block_group, n_runs, runs, cols):
    """cols[n, pp, r*K*Cg + k*Cg + c] = mask * bilinear sample of channel c at its point.

    xt is (nc, H*W + 1, C) with a zero last row, read for corners outside the image.
    """
    n_k = geo[10]
    nc, n_pix = cols.shape[0], cols.shape[1]
    n_tiles = (n_pix + _TILE - 1) // _TILE
    for task in prange(nc * n_tiles):
        n, lo, cnt = _tile(task, n_tiles, n_pix)
        bufs = _tile_buffers(xt)
        h0, w0, _, _, idx, _, wts = bufs
        _tile_bases(p0 + lo, cnt, geo, h0, w0)
        for b in range(block_group.shape[0]):
            g = block_group[b]
            for k in range(n_k):
                _tile_points(off, mask, has_mask, n0 + n, g * n_k + k, k, p0 + lo, cnt, geo, bufs)
                for j in range(cnt):
                    i0, i1, i2, i3 = _quad(idx, j)
                    a0, a1, a2, a3 = _quad(wts, j)
                    for r in range(n_runs[b]):
                        c0, d0, length = _run(runs, b, r, k, cg)
                        for cc in range(length):
                            cols[n, lo + j, d0 + cc] = (
                                a0 * xt[n, i0, c0 + cc]
                                + a1 * xt[n, i1, c0 + cc]
                                + a2 * xt[n, i2, c0 + cc]
                                + a3 * xt[n, i3, c0 + cc]
                            )


@njit(cache=True, parallel=True, fastmath=_FM)
def _col2im(gcols, off, mask, has_mask, n0, p0, geo, cg, block_group, n_runs, runs, grad_xt, spill, fresh):
    """grad_xt += adjoint of _im2col, without races and in a fixed order.

    Task (image, channel block, part): it owns those channels for its part of the output
    pixels and adds in pixel order. Part 0 adds into grad_xt, part s > 0 into its own
    buffer spill[s - 1] (the caller adds the spills in part order). Parts exist only when
    images x blocks alone give too few tasks. grad_xt and spill are (nc, H*W + 1, C): the
    last row absorbs corners outside the image. With ``fresh`` (the first pixel range of a
    chunk) each task first zeroes what it owns: the buffers come uninitialised, and zeroing
    here runs in parallel.
    """
    n_k = geo[10]
    nc, n_pix = gcols.shape[0], gcols.shape[1]
    n_blocks = block_group.shape[0]
    n_parts = spill.shape[0] + 1
    for task in prange(nc * n_blocks * n_parts):
        n = task // (n_blocks * n_parts)
        b = (task // n_parts) % n_blocks
        part = task % n_parts
        g = block_group[b]
        dst = grad_xt if part == 0 else spill[part - 1]
        if fresh:
            for i in range(dst.shape[1]):
                for r in range(n_runs[b]):
                    c0 = runs[b, r, 0]
                    for cc in range(runs[b, r, 1]):
                        dst[n, i, c0 + cc] = 0
        bufs = _tile_buffers(grad_xt)
        h0, w0, _, _, idx, _, wts = bufs
        for lo in range(part * n_pix // n_parts, (part + 1) * n_pix // n_parts, _TILE):
            cnt = min(_TILE, (part + 1) * n_pix // n_parts - lo)
            _tile_bases(p0 + lo, cnt, geo, h0, w0)
            for k in range(n_k):
                _tile_points(off, mask, has_mask, n0 + n, g * n_k + k, k, p0 + lo, cnt, geo, bufs)
                for j in range(cnt):
                    i0, i1, i2, i3 = _quad(idx, j)
                    a0, a1, a2, a3 = _quad(wts, j)
                    for r in range(n_runs[b]):
                        c0, d0, length = _run(runs, b, r, k, cg)
                        for cc in range(length):
                            v = gcols[n, lo + j, d0 + cc]
                            dst[n, i0, c0 + cc] += a0 * v
                            dst[n, i1, c0 + cc] += a1 * v
                            dst[n, i2, c0 + cc] += a2 * v
                            dst[n, i3, c0 + cc] += a3 * v


@njit(cache=True, parallel=True, fastmath=_FM)
def _coord_grad(xt, gcols, off, mask, has_mask, n0, p0, geo, cg, block_group, n_runs, runs, grad_off, grad_mask):
    """Offset and mask gradients. With S_q = sum_c gcol_c * x_c(corner q) over the point's
    channels, d/dh = sum_q dh_q S_q, d/dw = sum_q dw_q S_q and d/dmask = sum_q bw_q S_q.
    Blocks here are whole offset groups; each output value is written by one task."""
    n_k = geo[10]
    nc, n_pix = gcols.shape[0], gcols.shape[1]
    n_tiles = (n_pix + _TILE - 1) // _TILE
    for task in prange(nc * n_tiles):
        n, lo, cnt = _tile(task, n_tiles, n_pix)
        bufs = _tile_buffers(xt)
        h0, w0, fh, fw, idx, valid, wts = bufs
        zero = xt[n, xt.shape[1] - 1, 0]  # the zero row: a zero typed like the data
        _tile_bases(p0 + lo, cnt, geo, h0, w0)
        for b in range(block_group.shape[0]):
            g = block_group[b]
            for k in range(n_k):
                ch = g * n_k + k
                _tile_points(off, mask, False, n0 + n, ch, k, p0 + lo, cnt, geo, bufs)
                for j in range(cnt):
                    i0, i1, i2, i3 = _quad(idx, j)
                    s0 = zero
                    s1 = zero
                    s2 = zero
                    s3 = zero
                    for r in range(n_runs[b]):
                        c0, d0, length = _run(runs, b, r, k, cg)
                        for cc in range(length):
                            v = gcols[n, lo + j, d0 + cc]
                            s0 += v * xt[n, i0, c0 + cc]
                            s1 += v * xt[n, i1, c0 + cc]
                            s2 += v * xt[n, i2, c0 + cc]
                            s3 += v * xt[n, i3, c0 + cc]
                    v0, v1, v2, v3 = _quad(valid, j)
                    lh, lw = fh[j], fw[j]
                    # invalid corners read the zero row, but their S may still be NaN (0 * NaN
                    # grad), so each term is also gated by its validity
                    gy = -(1.0 - lw) * v0 * s0 - lw * v1 * s1 + (1.0 - lw) * v2 * s2 + lw * v3 * s3
                    gx = -(1.0 - lh) * v0 * s0 + (1.0 - lh) * v1 * s1 - lh * v2 * s2 + lh * v3 * s3
                    p = p0 + lo + j
                    if v0 + v1 + v2 + v3 == 0.0:
                        gy = 0.0  # outside the image: zero gradients, NaN or not
                        gx = 0.0
                    if has_mask:
                        m = mask[n0 + n, ch, p]
                        grad_off[n0 + n, 2 * ch, p] = gy * m
                        grad_off[n0 + n, 2 * ch + 1, p] = gx * m
                        gm = wts[0, j] * s0 + wts[1, j] * s1 + wts[2, j] * s2 + wts[3, j] * s3
                        grad_mask[n0 + n, ch, p] = gm if v0 + v1 + v2 + v3 != 0.0 else 0.0
                    else:
                        grad_off[n0 + n, 2 * ch, p] = gy
                        grad_off[n0 + n, 2 * ch + 1, p] = gx


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def _chunks(p: ConvParams, itemsize: int, planes: int, limit: int, share: float = 1.0):
    """``(n0, nc, ranges)`` chunks: images n0 .. n0+nc-1 and their output-pixel ranges
    ``(p0, np_)`` (a lazy sequence), the largest chunk first.

    Workspace of a chunk: ``planes`` channels-last copies of its images (input, and in the
    backward the input gradient) plus, per output pixel, a column (C_in*K values) and one
    output value per C_out (the forward's channels-last product, before it goes to NCHW).
    Chunks use ``share`` of the bound ``limit`` (the backward keeps a quarter for col2im's
    spill buffers). Within an image, ``_chunking.pixels_per_chunk`` sets the chunk size: at
    least 512 output pixels, up to 1/8 over the share when an image needs it, else an error
    naming the smallest bound that works.
    """
    hw = p.h_out * p.w_out
    fixed = planes * itemsize * (p.c_in * p.h * p.w + p.c_in)  # + the zero row
    per_pixel = itemsize * (p.c_in * p.k + p.c_out)
    per_image = fixed + per_pixel * hw
    if per_image <= limit * share:
        step = max(1, int(limit * share) // per_image)
        return [(n0, min(step, p.n - n0), _Ranges(hw, hw)) for n0 in range(0, p.n, step)]
    what = f"{planes} channels-last cop{'ies' if planes > 1 else 'y'} of the image"
    ranges = _Ranges(hw, pixels_per_chunk(hw, per_pixel, fixed, limit, share, what))
    return [(n0, 1, ranges) for n0 in range(p.n)]


class _Ranges:
    """The pixel ranges ``(p0, min(step, total - p0))`` of an image, made lazily (a list
    of tens of millions of pairs for a large image used to exhaust memory)."""

    def __init__(self, total: int, step: int) -> None:
        self.total, self.step = total, max(1, step)

    def __len__(self) -> int:
        return -(-self.total // self.step)

    def __getitem__(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        p0 = i * self.step
        return p0, min(self.step, self.total - p0)

    def __iter__(self):
        for p0 in range(0, self.total, self.step):
            yield p0, min(self.step, self.total - p0)


def _geometry(p: ConvParams):
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    return (p.h, p.w, p.w_out, p.kw, sh, sw, ph, pw, dh, dw, p.k)


def _channel_runs(p: ConvParams, block: int):
    """Blocks of at most ``block`` channels of one offset group, split into runs that stay
    in one conv group: ``(block_group (B,), n_runs (B,), runs (B, R, 3))``."""
    cg = p.c_in // p.groups
    cgo = p.c_in // p.offset_groups
    groups, blocks = [], []
    for g in range(p.offset_groups):
        for lo in range(g * cgo, (g + 1) * cgo, block):
            hi = min(lo + block, (g + 1) * cgo)
            block_runs = []
            c = lo
            while c < hi:
                r = c // cg
                stop = min(hi, (r + 1) * cg)
                block_runs.append((c, stop - c, r * (p.k - 1) * cg + c))
                c = stop
            groups.append(g)
            blocks.append(block_runs)
    runs = np.zeros((len(blocks), max(len(b) for b in blocks), 3), dtype=np.uint64)
    for i, block_runs in enumerate(blocks):
        runs[i, : len(block_runs)] = block_runs
    return np.array(groups, dtype=np.int64), np.array([len(b) for b in blocks], dtype=np.int64), runs


def _flat(p: ConvParams, offset, mask, dtype):
    """Offset and mask as contiguous (N, channels, H_out*W_out); a dummy mask if absent."""
    off = np.ascontiguousarray(offset).reshape(p.n, -1, p.h_out * p.w_out)
    if mask is None:
        return off, np.zeros((1, 1, 1), dtype=dtype)  # Numba needs an array of this type
    return off, np.ascontiguousarray(mask).reshape(p.n, -1, p.h_out * p.w_out)


def _channels_last(input, images, buf):
    """(len(images), H*W + 1, C) channels-last copy of those images, plus a zero row that
    the kernels read for corners outside the image."""
    _, c, h, w = input.shape
    xt = buf.empty((len(images), h * w + 1, c), input.dtype)
    to_channels_last(input, images, 0, xt)
    xt[:, h * w] = 0
    return xt


def _grouped_weight(p: ConvParams, weight):
    """(C_out, Cg, kh, kw) -> (groups, C_out/groups, K*Cg), kernel point major like cols."""
    cg = p.c_in // p.groups
    w = np.asarray(weight).reshape(p.groups, p.c_out // p.groups, cg, p.k)
    return np.ascontiguousarray(w.transpose(0, 1, 3, 2)).reshape(p.groups, p.c_out // p.groups, p.k * cg)


def _cols_by_group(p: ConvParams, cols):
    """View cols (nc, P, groups*K*Cg) as (nc, groups, P, K*Cg)."""
    nc, np_ = cols.shape[0], cols.shape[1]
    return cols.reshape(nc, np_, p.groups, -1).transpose(0, 2, 1, 3)


_MIN_TASKS = 8  # parallel tasks wanted per kernel call (a fixed figure, not the thread count)


def _col2im_split(p: ConvParams, nc: int, xt_bytes: int, limit: int):
    """(channels per col2im block, pixel parts) for a chunk of nc images.

    Blocks are at least 16 channels wide (one AVX-512 vector of float32) so the scatter
    vectorises; if images x blocks still give fewer than _MIN_TASKS tasks, the pixels are
    split into parts with their own buffers, as many as a quarter of the workspace bound
    allows. Both depend only on shapes and the bound (never on the thread count), so the
    summation order, and the bits, do too.
    """
    cgo = p.c_in // p.offset_groups
    cb = 64
    while cb > 16 and nc * p.offset_groups * -(-cgo // cb) < _MIN_TASKS:
        cb //= 2
    tasks = nc * p.offset_groups * -(-cgo // cb)
    parts = -(-_MIN_TASKS // tasks)
    parts = max(1, min(parts, 1 + limit // (4 * xt_bytes)))
    return cb, parts


def forward(p: ConvParams, input, offset, weight, bias, mask):
    check_plane_size(p)
    dtype = input.dtype
    hw = p.h_out * p.w_out
    out = np.empty((p.n, p.c_out, hw), dtype=dtype)
    if p.n == 0:
        return out.reshape(p.out_shape)
    with own_threads():
        _forward(p, input, offset, weight, bias, mask, out, _config.get_workspace_limit())
    return out.reshape(p.out_shape)


def _forward(p: ConvParams, input, offset, weight, bias, mask, out, limit: int):
    dtype = input.dtype
    off, m = _flat(p, offset, mask, dtype)
    geo = _geometry(p)
    cg = p.c_in // p.groups
    runs = _channel_runs(p, p.c_in // p.offset_groups)
    wg_t = _grouped_weight(p, weight).transpose(0, 2, 1)  # (groups, K*Cg, C_out/groups)
    no_spill = np.empty((0, 1, 1, 1), dtype)
    b = np.zeros(p.c_out, dtype) if bias is None else np.ascontiguousarray(bias, dtype)
    chunks = _chunks(p, dtype.itemsize, planes=1, limit=limit)
    nc_max, np_max = chunks[0][1], chunks[0][2][0][1]  # the first chunk is the largest
    xt_shape = (nc_max, p.h * p.w + 1, p.c_in)
    buf = workspace(
        nbytes(xt_shape, dtype)
        + nbytes((nc_max, np_max, p.c_in * p.k), dtype)
        + nbytes((nc_max, np_max, p.c_out), dtype)
    )
    for n0, nc, ranges in chunks:
        buf.reset()
        images = np.arange(n0, n0 + nc)
        xt = _channels_last(input, images, buf)
        cols_chunk = buf.empty((nc, np_max, p.c_in * p.k), dtype)
        res_chunk = buf.empty((nc, np_max, p.c_out), dtype)
        for p0, np_ in ranges:
            cols = cols_chunk[:, :np_]  # contiguous: several ranges only when nc == 1
            _im2col(xt, off, m, mask is not None, n0, p0, geo, cg, *runs, cols)
            res = res_chunk[:, :np_]
            matmul(_cols_by_group(p, cols), wg_t, _cols_by_group(p, res))
            to_channels_first(res, no_spill, b, images, 0, p0, out)


def backward(p: ConvParams, grad_output, input, offset, weight, bias, mask, deterministic=True):
    # ``deterministic`` is accepted for API symmetry: this backend always is.
    check_plane_size(p)
    dtype = input.dtype
    hw = p.h_out * p.w_out
    grad_x = np.empty((p.n, p.c_in, p.h, p.w), dtype=dtype)
    grad_off = np.zeros((p.n, 2 * p.offset_groups * p.k, hw), dtype=dtype)
    grad_m = np.zeros((p.n, p.offset_groups * p.k, hw), dtype=dtype) if mask is not None else None
    wg = _grouped_weight(p, weight)
    grad_wg = np.zeros_like(wg)
    go = np.ascontiguousarray(grad_output).reshape(p.n, p.groups, p.c_out // p.groups, hw)
    grad_b = go.sum(axis=(0, 3)).reshape(p.c_out) if bias is not None else None
    if p.n > 0:
        with own_threads():
            _backward(p, go, input, offset, wg, mask, grad_x, grad_off, grad_m, grad_wg, _config.get_workspace_limit())
    cg = p.c_in // p.groups
    grad_w = grad_wg.reshape(p.groups, p.c_out // p.groups, p.k, cg).transpose(0, 1, 3, 2)
    return (
        grad_x,
        grad_off.reshape(offset.shape),
        np.ascontiguousarray(grad_w).reshape(weight.shape),
        grad_b,
        grad_m.reshape(mask.shape) if grad_m is not None else None,
    )


def _backward(p: ConvParams, go, input, offset, wg, mask, grad_x, grad_off, grad_m, grad_wg, limit: int):
    """``limit``: the workspace bound, read once when the call started (a bound set by
    another thread meanwhile must not change the plan halfway)."""
    dtype = input.dtype
    off, m = _flat(p, offset, mask, dtype)
    gm = grad_m if grad_m is not None else np.zeros((1, 1, 1), dtype=dtype)
    geo = _geometry(p)
    cg = p.c_in // p.groups
    runs = _channel_runs(p, p.c_in // p.offset_groups)
    zero_bias = np.zeros(p.c_in, dtype)
    # 3/4 of the bound for the chunks, the last quarter for col2im's spill buffers
    chunks = _chunks(p, dtype.itemsize, planes=2, limit=limit, share=0.75)
    nc_max, np_max = chunks[0][1], chunks[0][2][0][1]  # the first chunk is the largest
    xt_shape = (nc_max, p.h * p.w + 1, p.c_in)
    _, parts_max = _col2im_split(p, nc_max, nbytes(xt_shape, dtype), limit)
    buf = workspace((1 + parts_max) * nbytes(xt_shape, dtype) + nbytes((nc_max, np_max, p.c_in * p.k), dtype))
    for n0, nc, ranges in chunks:
        buf.reset()
        images = np.arange(n0, n0 + nc)
        xt = _channels_last(input, images, buf)
        grad_xt = buf.empty(xt.shape, dtype)  # zeroed by _col2im
        cb, col_parts = _col2im_split(p, nc, xt.nbytes, limit)
        block_runs = _channel_runs(p, cb)
        spill = buf.empty((col_parts - 1,) + xt.shape, dtype)
        cols_chunk = buf.empty((nc, np_max, p.c_in * p.k), dtype)
        for p0, np_ in ranges:
            cols = cols_chunk[:, :np_]  # contiguous: several ranges only when nc == 1
            _im2col(xt, off, m, mask is not None, n0, p0, geo, cg, *runs, cols)
            cols_g = _cols_by_group(p, cols)  # (nc, groups, P, K*Cg)
            go_chunk = go[n0 : n0 + nc, :, :, p0 : p0 + np_]  # (nc, groups, Cog, P)
            matmul(go_chunk, cols_g, grad_wg, accumulate=True)  # images added in order
            # the column buffer now receives grad cols = grad_out^T @ W
            matmul(go_chunk.transpose(0, 1, 3, 2), wg, cols_g)
            _col2im(cols, off, m, mask is not None, n0, p0, geo, cg, *block_runs, grad_xt, spill, p0 == 0)
            _coord_grad(xt, cols, off, m, mask is not None, n0, p0, geo, cg, *runs, grad_off, gm)
        # input gradient to NCHW, the spills added in part order (deterministic)
        hw_in = p.h * p.w
        to_channels_first(grad_xt[:, :hw_in], spill, zero_bias, images, 0, 0, grad_x.reshape(p.n, p.c_in, hw_in))
