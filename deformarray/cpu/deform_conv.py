"""Deformable convolution v1/v2 on NumPy arrays: Numba sampling kernels + BLAS products.

Per chunk of the batch (or, for very large images, of one image's output pixels) whose
buffers fit the workspace bound (``deformarray.set_workspace_limit``):

forward   plan (corners + weights of every sample point, shared by all channels of an
          offset group) -> ``_im2col`` -> ``np.matmul`` per conv group -> + bias
backward  plan with derivative weights -> columns -> grad weight = grad_out @ cols^T
          -> grad cols = W^T @ grad_out (reusing the column buffer) -> ``_col2im``
          (parallel over input-channel blocks: each thread owns its planes, so no races
          and the same bits every run) -> ``_coord_grad`` (parallel over offset group x
          kernel point x pixel tile, each writing its own outputs).

Every reduction runs in a fixed order, so the backward is bitwise deterministic for a
given thread count and workspace bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import _config
from .._validate import ConvParams, check_plane_size
from ._bilinear import plan_point

_TILE = 256  # output pixels per parallel task: keeps a task's plan slice in L1
_CBLOCK = 8  # input channels per col2im task: its planes stay in L2


# ---------------------------------------------------------------------------------------
# Numba kernels. Shapes: x (N, C, H*W); offset (N, 2*G*K, HWo); mask (N, G*K, HWo);
# plan arrays (nc, G, K, P, 4) for the chunk's images n0..n0+nc and pixels p0..p0+P.
# ---------------------------------------------------------------------------------------


@njit(cache=True, parallel=True)
def _plan(offset, n0, p0, idx, bw, dhw, dww, with_grad, height, width, w_out, kw,
          sh, sw, ph, pw, dh, dw):
    nc, n_groups, n_k, n_pix = idx.shape[0], idx.shape[1], idx.shape[2], idx.shape[3]
    for task in prange(nc * n_groups * n_k):
        n = task // (n_groups * n_k)
        g = (task // n_k) % n_groups
        k = task % n_k
        i = k // kw
        j = k % kw
        off_y = offset[n0 + n, 2 * (g * n_k + k)]
        off_x = offset[n0 + n, 2 * (g * n_k + k) + 1]
        pi = idx[n, g, k]
        pb = bw[n, g, k]
        pdh = dhw[n, g, k] if with_grad else dhw[0, 0, 0]
        pdw = dww[n, g, k] if with_grad else dww[0, 0, 0]
        for pp in range(n_pix):
            p = p0 + pp
            ho = p // w_out
            wo = p - ho * w_out
            h = ho * sh - ph + i * dh + off_y[p]
            w = wo * sw - pw + j * dw + off_x[p]
            plan_point(h, w, height, width, pi, pb, pdh, pdw, pp, with_grad)


@njit(cache=True, parallel=True)
def _im2col(x, mask, has_mask, n0, p0, idx, bw, cols):
    """cols[n, c*K + k, pp] = mask * bilinear sample of channel c at plan point (g(c), k, pp)."""
    nc, n_groups, n_k, n_pix = idx.shape[0], idx.shape[1], idx.shape[2], idx.shape[3]
    c_per_g = x.shape[1] // n_groups
    n_tiles = (n_pix + _TILE - 1) // _TILE
    for task in prange(nc * n_groups * n_k * n_tiles):
        t = task % n_tiles
        k = (task // n_tiles) % n_k
        g = (task // (n_tiles * n_k)) % n_groups
        n = task // (n_tiles * n_k * n_groups)
        lo = t * _TILE
        hi = min(lo + _TILE, n_pix)
        pi = idx[n, g, k]
        pb = bw[n, g, k]
        m = mask[n0 + n, g * n_k + k] if has_mask else mask[0, 0]
        for cl in range(c_per_g):
            c = g * c_per_g + cl
            plane = x[n0 + n, c]
            row = cols[n, c * n_k + k]
            for pp in range(lo, hi):
                v = (pb[pp, 0] * plane[pi[pp, 0]] + pb[pp, 1] * plane[pi[pp, 1]]
                     + pb[pp, 2] * plane[pi[pp, 2]] + pb[pp, 3] * plane[pi[pp, 3]])
                if has_mask:
                    v *= m[p0 + pp]
                row[pp] = v


@njit(cache=True, parallel=True)
def _col2im(gcols, mask, has_mask, n0, p0, idx, bw, grad_x):
    """grad_x[n, c] += adjoint of _im2col. Tasks own disjoint channel blocks: race-free."""
    nc, n_groups, n_k, n_pix = idx.shape[0], idx.shape[1], idx.shape[2], idx.shape[3]
    c_per_g = grad_x.shape[1] // n_groups
    blocks_per_g = (c_per_g + _CBLOCK - 1) // _CBLOCK
    n_tiles = (n_pix + _TILE - 1) // _TILE
    for task in prange(nc * n_groups * blocks_per_g):
        n = task // (n_groups * blocks_per_g)
        g = (task // blocks_per_g) % n_groups
        b = task % blocks_per_g
        c_lo = g * c_per_g + b * _CBLOCK
        c_hi = min(c_lo + _CBLOCK, (g + 1) * c_per_g)
        for k in range(n_k):
            pi = idx[n, g, k]
            pb = bw[n, g, k]
            m = mask[n0 + n, g * n_k + k] if has_mask else mask[0, 0]
            for t in range(n_tiles):
                lo = t * _TILE
                hi = min(lo + _TILE, n_pix)
                for c in range(c_lo, c_hi):
                    plane = grad_x[n0 + n, c]
                    row = gcols[n, c * n_k + k]
                    for pp in range(lo, hi):
                        v = row[pp]
                        if has_mask:
                            v *= m[p0 + pp]
                        plane[pi[pp, 0]] += pb[pp, 0] * v
                        plane[pi[pp, 1]] += pb[pp, 1] * v
                        plane[pi[pp, 2]] += pb[pp, 2] * v
                        plane[pi[pp, 3]] += pb[pp, 3] * v


@njit(cache=True, parallel=True)
def _coord_grad(x, gcols, mask, has_mask, n0, p0, idx, bw, dhw, dww, grad_offset, grad_mask):
    """Offset and mask gradients: per sample point, a gather over its group's channels."""
    nc, n_groups, n_k, n_pix = idx.shape[0], idx.shape[1], idx.shape[2], idx.shape[3]
    c_per_g = x.shape[1] // n_groups
    n_tiles = (n_pix + _TILE - 1) // _TILE
    for task in prange(nc * n_groups * n_k * n_tiles):
        t = task % n_tiles
        k = (task // n_tiles) % n_k
        g = (task // (n_tiles * n_k)) % n_groups
        n = task // (n_tiles * n_k * n_groups)
        lo = t * _TILE
        hi = min(lo + _TILE, n_pix)
        pi = idx[n, g, k]
        pb = bw[n, g, k]
        pdh = dhw[n, g, k]
        pdw = dww[n, g, k]
        gy = grad_offset[n0 + n, 2 * (g * n_k + k)]
        gx = grad_offset[n0 + n, 2 * (g * n_k + k) + 1]
        gm = grad_mask[n0 + n, g * n_k + k] if has_mask else grad_mask[0, 0]
        for cl in range(c_per_g):
            c = g * c_per_g + cl
            plane = x[n0 + n, c]
            row = gcols[n, c * n_k + k]
            for pp in range(lo, hi):
                v0 = plane[pi[pp, 0]]
                v1 = plane[pi[pp, 1]]
                v2 = plane[pi[pp, 2]]
                v3 = plane[pi[pp, 3]]
                gc = row[pp]
                gy[p0 + pp] += gc * (pdh[pp, 0] * v0 + pdh[pp, 1] * v1 + pdh[pp, 2] * v2 + pdh[pp, 3] * v3)
                gx[p0 + pp] += gc * (pdw[pp, 0] * v0 + pdw[pp, 1] * v1 + pdw[pp, 2] * v2 + pdw[pp, 3] * v3)
                if has_mask:
                    gm[p0 + pp] += gc * (pb[pp, 0] * v0 + pb[pp, 1] * v1 + pb[pp, 2] * v2 + pb[pp, 3] * v3)
        if has_mask:
            # the offset gradient is scaled by the mask once, after the channel sum
            m = mask[n0 + n, g * n_k + k]
            for pp in range(lo, hi):
                gy[p0 + pp] *= m[p0 + pp]
                gx[p0 + pp] *= m[p0 + pp]


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def _chunks(p: ConvParams, itemsize: int, plan_weights: int):
    """Yield (n0, nc, p0, np_) so that each chunk's buffers fit the workspace bound.

    Bytes per output pixel of one image: its column (C_in*K values), its plan
    (G*K points x 4 corners x (int32 index + plan_weights floats)) and one output/grad
    column (C_out values) for products that cannot write in place.
    """
    hw = p.h_out * p.w_out
    per_pixel = itemsize * (p.c_in * p.k + p.c_out) + p.offset_groups * p.k * 4 * (4 + plan_weights * itemsize)
    limit = _config.get_workspace_limit()
    per_image = per_pixel * hw
    if per_image <= limit:
        step = max(1, limit // per_image)
        for n0 in range(0, p.n, step):
            yield n0, min(step, p.n - n0), 0, hw
    else:
        step = max(1, limit // per_pixel)
        for n0 in range(p.n):
            for p0 in range(0, hw, step):
                yield n0, 1, p0, min(step, hw - p0)


def _flat_inputs(p: ConvParams, input, offset, mask):
    """Contiguous (N, C, H*W)-style views; non-contiguous arrays are copied once."""
    x = np.ascontiguousarray(input).reshape(p.n, p.c_in, p.h * p.w)
    off = np.ascontiguousarray(offset).reshape(p.n, -1, p.h_out * p.w_out)
    if mask is not None:
        m = np.ascontiguousarray(mask).reshape(p.n, -1, p.h_out * p.w_out)
    else:
        m = np.zeros((1, 1, 1), dtype=x.dtype)  # placeholder: Numba needs an array
    return x, off, m


def _make_plan(p: ConvParams, off, dtype, n0, nc, p0, np_, with_grad):
    shape = (nc, p.offset_groups, p.k, np_, 4)
    idx = np.empty(shape, dtype=np.int32)
    bw = np.empty(shape, dtype=dtype)
    if with_grad:
        dhw = np.empty(shape, dtype=dtype)
        dww = np.empty(shape, dtype=dtype)
    else:
        dhw = dww = np.zeros((1, 1, 1, 1, 4), dtype=dtype)
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    _plan(off, n0, p0, idx, bw, dhw, dww, with_grad, p.h, p.w, p.w_out, p.kw, sh, sw, ph, pw, dh, dw)
    return idx, bw, dhw, dww


def _grouped_weight(p: ConvParams, weight):
    """weight (C_out, C_in/groups, kh, kw) -> (groups, C_out/groups, C_in/groups*K)."""
    return np.ascontiguousarray(weight).reshape(p.groups, p.c_out // p.groups, -1)


def forward(p: ConvParams, input, offset, weight, bias, mask):
    check_plane_size(p)
    dtype = input.dtype
    hw = p.h_out * p.w_out
    out = np.empty((p.n, p.c_out, hw), dtype=dtype)
    if p.n == 0:
        return out.reshape(p.out_shape)
    x, off, m = _flat_inputs(p, input, offset, mask)
    wg = _grouped_weight(p, weight)
    cog = p.c_out // p.groups
    for n0, nc, p0, np_ in _chunks(p, dtype.itemsize, plan_weights=1):
        idx, bw, _, _ = _make_plan(p, off, dtype, n0, nc, p0, np_, with_grad=False)
        cols = np.empty((nc, p.c_in * p.k, np_), dtype=dtype)
        _im2col(x, m, mask is not None, n0, p0, idx, bw, cols)
        cols4 = cols.reshape(nc, p.groups, -1, np_)
        if np_ == hw:
            np.matmul(wg, cols4, out=out[n0:n0 + nc].reshape(nc, p.groups, cog, hw))
        else:
            out[n0, :, p0:p0 + np_] = np.matmul(wg, cols4).reshape(p.c_out, np_)
    if bias is not None:
        out += np.asarray(bias)[None, :, None]
    return out.reshape(p.out_shape)


def backward(p: ConvParams, grad_output, input, offset, weight, bias, mask, deterministic=True):
    # ``deterministic`` is accepted for API symmetry: this backend always is.
    check_plane_size(p)
    dtype = input.dtype
    hw = p.h_out * p.w_out
    grad_x = np.zeros((p.n, p.c_in, p.h * p.w), dtype=dtype)
    grad_off = np.zeros((p.n, 2 * p.offset_groups * p.k, hw), dtype=dtype)
    grad_m = np.zeros((p.n, p.offset_groups * p.k, hw), dtype=dtype) if mask is not None else None
    wg = _grouped_weight(p, weight)
    grad_w = np.zeros_like(wg)
    go = np.ascontiguousarray(grad_output).reshape(p.n, p.groups, p.c_out // p.groups, hw)
    grad_b = go.sum(axis=(0, 3)).reshape(p.c_out) if bias is not None else None
    if p.n > 0:
        x, off, m = _flat_inputs(p, input, offset, mask)
        gm = grad_m if grad_m is not None else np.zeros((1, 1, 1), dtype=dtype)
        wgt = np.ascontiguousarray(wg.transpose(0, 2, 1))
        for n0, nc, p0, np_ in _chunks(p, dtype.itemsize, plan_weights=3):
            idx, bw, dhw, dww = _make_plan(p, off, dtype, n0, nc, p0, np_, with_grad=True)
            cols = np.empty((nc, p.c_in * p.k, np_), dtype=dtype)
            _im2col(x, m, mask is not None, n0, p0, idx, bw, cols)
            cols4 = cols.reshape(nc, p.groups, -1, np_)
            go_chunk = go[n0:n0 + nc, :, :, p0:p0 + np_]
            for j in range(nc):
                grad_w += np.matmul(go_chunk[j], cols4[j].transpose(0, 2, 1))
            np.matmul(wgt, go_chunk, out=cols4)  # the column buffer now holds grad cols
            _col2im(cols, m, mask is not None, n0, p0, idx, bw, grad_x)
            _coord_grad(x, cols, m, mask is not None, n0, p0, idx, bw, dhw, dww, grad_off, gm)
    return (
        grad_x.reshape(input.shape),
        grad_off.reshape(offset.shape),
        grad_w.reshape(weight.shape),
        grad_b,
        grad_m.reshape(mask.shape) if grad_m is not None else None,
    )
