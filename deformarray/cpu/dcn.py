"""DCNv3 (InternImage) and DCNv4 (FlashInternImage) on NumPy arrays.

Both operators are one computation: DCNv4 differs only in where the offsets and masks are
(``DcnParams``: for DCNv4 ``offset is mask``, the packed ``offset_mask``), so every kernel
here serves both through the generic indexing of ``DcnParams``:

    off_x = offset[n, q, g*off_group + 2*k], off_y = offset[n, q, g*off_group + 2*k + 1]
    m     = mask[n, q, mask_base + g*mask_group + k]

with ``q = ho*W_out + wo``. The numbers are the shared core's (``_aggregate``: its contract
is written there) with DCN's sampling location, computed in the data's type (acc; one
rounding per operation, never fused):

    e_w = (dw*(kw-1)) // 2                  base_x = acc(wo*sw - pw + e_w) - acc(e_w)*s
    x   = base_x + (acc(i*dw) + off_x) * s  (and the same along the height with j, dh, ph)

tap (i, j) with i along the width (outer loop) and j along the height (inner), k counting
the kept taps (the centre skipped with remove_center). A point is processed when
``-1 < y < H`` and ``-1 < x < W`` (``lower = -1``; NaN and infinities are not); the plane of
image n and group g is ``input[n].reshape(H*W, G, D)[:, g, :]``, and
``out[n, ho, wo, g*D + d] = sum over k of m * S_d``.

forward   parallel over (n, q, g): a task sums its points (k in order) straight into its
          own D entries of the output.
backward  two kernels, each value of each gradient written by one task in a fixed order,
          so the bits do not depend on the thread count or the split:
          - ``_grad_point_kernel``, parallel over (n, q, g): per point, the three dot
            products of ``_aggregate.dots`` give the mask gradient ``sum_d g_d*S_d`` and
            the offset gradients ``(m*s) * sum_d g_d*dS_d/dx`` (and dy), each entry owned
            by the task. Points that are not processed keep their +0.
          - ``_grad_input_kernel``, parallel over (n, g, block of channels): a task owns
            ``grad_input[n, :, :, g*D + d0 : g*D + d1]`` and walks the output pixels in
            order (q, then k, then the corners), adding ``(m*w) * g`` into it. The blocks
            only give the threads more tasks when N*G is small; every channel sees the
            same sequence of additions whatever the blocks (tests/test_dcnv3.py checks it).
          ``deterministic`` is accepted for symmetry with CUDA: this backend always is.

For DCNv4 the offset and mask gradients are one array of offset_mask's shape (zeros in the
padding of its last axis), returned as both ``grad_offset`` and ``grad_mask``.

Memory. No workspace: the kernels write the outputs (and gradients) directly; the only
allocation is the point-gradient kernel's scratch of 3*D entries per chunk of tasks.
The only other memory is a C-contiguous copy of an argument that is not
C-contiguous already (``np.ascontiguousarray``), the size of that argument, as every CPU
operator does; the workspace bound (``_config``) has nothing to bound here. Indices are
64-bit (Numba's intp) throughout.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .._validate_dcn import DcnParams
from ._aggregate import add_sample, channel_block, corners, dots, scatter, split

# DCN's window: a point is processed only for -1 < y < H and -1 < x < W (InternImage's
# CUDA test; at exactly -1 every gradient of the point is 0, unlike grid_sample).
_LOWER = -1

# geo (int64): kh, kw, sh, sw, ph, pw, dh, dw, remove_center, off_group, mask_base,
# mask_group, w_out, height, width
_KH, _KW, _SH, _SW, _PH, _PW, _DH, _DW, _RC, _OFF_GROUP, _MASK_BASE, _MASK_GROUP, _W_OUT, _H, _W = range(15)

# tasks per parallel chunk of the point-gradient kernel (one scratch buffer of 3*D per chunk)
_CHUNK = 64


@njit(cache=True, inline="always")
def _base(pos, e, s):
    """``acc(pos) - acc(e) * s``: the sampling position of the kernel's first tap without
    offset, a product then a subtraction (s typed as acc)."""
    f = type(s)
    return f(pos) - f(e) * s


@njit(cache=True, inline="always")
def _location(base, tap, off, s):
    """``base + (acc(tap) + off) * s``: a sum, a product, a sum, in that order."""
    f = type(s)
    return base + (f(tap) + off) * s


@njit(cache=True, inline="always")
def _window(geo, scale):
    """What every kernel reads of ``geo`` and ``scale``, once: ``(taps, s, w_out, sh, sw,
    ph, pw, eh, ew, off_group, mask_base, mask_group, height, width)``, with ``taps[k]``
    the (width, height) distance ``(i*dw, j*dh)`` of kept tap k from the first: i along the
    width (outer), j along the height (inner), the centre skipped with remove_center."""
    kh, kw, sh, sw, ph, pw = geo[_KH], geo[_KW], geo[_SH], geo[_SW], geo[_PH], geo[_PW]
    dh, dw, rc = geo[_DH], geo[_DW], geo[_RC]
    taps = np.empty((kh * kw - (1 if rc != 0 else 0), 2), np.int64)
    k = 0
    for i in range(kw):
        for j in range(kh):
            if rc != 0 and i == kw // 2 and j == kh // 2:
                continue
            taps[k, 0] = i * dw
            taps[k, 1] = j * dh
            k += 1
    eh = (dh * (kh - 1)) // 2
    ew = (dw * (kw - 1)) // 2
    w_out, height, width = geo[_W_OUT], geo[_H], geo[_W]
    off_group, mask_base, mask_group = geo[_OFF_GROUP], geo[_MASK_BASE], geo[_MASK_GROUP]
    return taps, scale[0], w_out, sh, sw, ph, pw, eh, ew, off_group, mask_base, mask_group, height, width


@njit(cache=True, inline="always")
def _pixel(win, q, g):
    """Output pixel q of group g: (first offset column, first mask column, base_y, base_x)."""
    _, s, w_out, sh, sw, ph, pw, eh, ew, off_group, mask_base, mask_group, _, _ = win
    ho = q // w_out
    wo = q - ho * w_out
    return g * off_group, mask_base + g * mask_group, _base(ho * sh - ph + eh, eh, s), _base(wo * sw - pw + ew, ew, s)


@njit(cache=True, inline="always")
def _tap(win, offset, n, q, o0, k, base_y, base_x):
    """``corners`` of tap k of output pixel q (offset columns from o0)."""
    taps, s, height, width = win[0], win[1], win[12], win[13]
    x = _location(base_x, taps[k, 0], offset[n, q, o0 + 2 * k], s)
    y = _location(base_y, taps[k, 1], offset[n, q, o0 + 2 * k + 1], s)
    return corners(y, x, height, width, _LOWER)


@njit(cache=True, parallel=True)
def _forward_kernel(inp, offset, mask, scale, geo, out):
    """out[n, q, g, :] = sum_k m * sample; inp (N, H*W, G, D), offset / mask (N, Q, *),
    out (N, Q, G, D) zeros."""
    n_img, n_rows, n_groups, depth = inp.shape
    n_q = out.shape[1]
    win = _window(geo, scale)
    n_taps = win[0].shape[0]
    xflat = inp.reshape(-1)
    oflat = out.reshape(-1)
    stride = n_groups * depth
    for task in prange(n_img * n_q * n_groups):
        n, q, g = split(task, n_q, n_groups)
        base = (n * n_rows * n_groups + g) * depth  # inp[n, 0, g, 0]
        off = task * depth  # out[n, q, g, 0]
        o0, m0, base_y, base_x = _pixel(win, q, g)
        for k in range(n_taps):
            c = _tap(win, offset, n, q, o0, k, base_y, base_x)
            if c[0]:
                add_sample(xflat, base, stride, c, mask[n, q, m0 + k], oflat, off, depth)


@njit(cache=True, parallel=True)
def _grad_point_kernel(inp, offset, mask, scale, geo, go, grad_offset, grad_mask):
    """Offset and mask gradients; ``go`` (N, Q, G, D); outputs zeros (for DCNv4 both are
    the same array: the entries written are disjoint)."""
    n_img, n_rows, n_groups, depth = inp.shape
    n_q = go.shape[1]
    win = _window(geo, scale)
    n_taps = win[0].shape[0]
    s = win[1]
    xflat = inp.reshape(-1)
    gflat = go.reshape(-1)
    stride = n_groups * depth
    n_tasks = n_img * n_q * n_groups
    for chunk in prange((n_tasks + _CHUNK - 1) // _CHUNK):
        buf = np.empty(3 * depth, dtype=inp.dtype)
        for task in range(chunk * _CHUNK, min(n_tasks, (chunk + 1) * _CHUNK)):
            n, q, g = split(task, n_q, n_groups)
            base = (n * n_rows * n_groups + g) * depth  # inp[n, 0, g, 0]
            goff = task * depth  # go[n, q, g, 0]
            o0, m0, base_y, base_x = _pixel(win, q, g)
            for k in range(n_taps):
                c = _tap(win, offset, n, q, o0, k, base_y, base_x)
                if c[0]:
                    ms = mask[n, q, m0 + k] * s
                    gs, gy, gx = dots(xflat, base, stride, c, gflat, goff, depth, buf)
                    grad_mask[n, q, m0 + k] = gs
                    grad_offset[n, q, o0 + 2 * k] = ms * gx
                    grad_offset[n, q, o0 + 2 * k + 1] = ms * gy


@njit(cache=True, parallel=True)
def _grad_input_kernel(grad_input, offset, mask, scale, geo, go, blocks):
    """grad_input[n, row, g, d] += (m * w) * g_d, parallel over (n, g, channel block);
    grad_input (N, H*W, G, D) zeros.

    (grad_input comes first: the cold-cache notice reads a kernel's dtype from its first
    array argument, ``_warmup._array_dtype``.)"""
    n_img, n_rows, n_groups, depth = grad_input.shape
    n_q = go.shape[1]
    win = _window(geo, scale)
    n_taps = win[0].shape[0]
    xflat = grad_input.reshape(-1)
    gflat = go.reshape(-1)
    stride = n_groups * depth
    for task in prange(n_img * n_groups * blocks):
        n, g, b = split(task, n_groups, blocks)
        d0, d1 = channel_block(b, blocks, depth)
        if d1 == d0:
            continue
        base = (n * n_rows * n_groups + g) * depth + d0  # grad_input[n, 0, g, d0]
        for q in range(n_q):
            goff = ((n * n_q + q) * n_groups + g) * depth + d0  # go[n, q, g, d0]
            o0, m0, base_y, base_x = _pixel(win, q, g)
            for k in range(n_taps):
                c = _tap(win, offset, n, q, o0, k, base_y, base_x)
                if c[0]:
                    scatter(xflat, base, stride, c, mask[n, q, m0 + k], gflat, goff, d1 - d0)


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def _geo(p: DcnParams) -> np.ndarray:
    return np.array(
        [
            p.kh,
            p.kw,
            p.stride[0],
            p.stride[1],
            p.padding[0],
            p.padding[1],
            p.dilation[0],
            p.dilation[1],
            int(p.remove_center),
            p.off_group,
            p.mask_base,
            p.mask_group,
            p.w_out,
            p.h,
            p.w,
        ],
        dtype=np.int64,
    )


def _blocks(n_img: int, n_groups: int, depth: int) -> int:
    """Channel blocks per (n, g) for the input-gradient kernel: about two tasks per thread
    in all, each block at least one channel."""
    return max(1, min(depth, -(-2 * numba.get_num_threads() // max(1, n_img * n_groups))))


def _arrays(p: DcnParams, input, offset, mask):
    """C-contiguous views: input (N, H*W, G, D), offset / mask (N, Q, channels); for DCNv4
    (``offset is mask``) one array for both."""
    q = p.h_out * p.w_out
    x = np.ascontiguousarray(input).reshape(p.n, p.h * p.w, p.group, p.group_channels)
    off = np.ascontiguousarray(offset).reshape(p.n, q, p.off_channels)
    m = off if mask is offset else np.ascontiguousarray(mask).reshape(p.n, q, p.mask_channels)
    return x, off, m


def forward(p: DcnParams, input, offset, mask):
    dtype = input.dtype
    q = p.h_out * p.w_out
    out = np.zeros((p.n, q, p.group, p.group_channels), dtype=dtype)
    if p.n:
        x, off, m = _arrays(p, input, offset, mask)
        _forward_kernel(x, off, m, np.array([p.offset_scale], dtype=dtype), _geo(p), out)
    return out.reshape(p.out_shape)


def backward(p: DcnParams, grad_output, input, offset, mask, deterministic=True):
    dtype = input.dtype
    q = p.h_out * p.w_out
    grad_input = np.zeros((p.n, p.h * p.w, p.group, p.group_channels), dtype=dtype)
    grad_offset = np.zeros((p.n, q, p.off_channels), dtype=dtype)
    grad_mask = grad_offset if p.packed else np.zeros((p.n, q, p.mask_channels), dtype=dtype)
    if p.n:
        x, off, m = _arrays(p, input, offset, mask)
        go = np.ascontiguousarray(grad_output).reshape(p.n, q, p.group, p.group_channels)
        scale, geo = np.array([p.offset_scale], dtype=dtype), _geo(p)
        _grad_point_kernel(x, off, m, scale, geo, go, grad_offset, grad_mask)
        _grad_input_kernel(grad_input, off, m, scale, geo, go, _blocks(p.n, p.group, p.group_channels))
    grad_input = grad_input.reshape(p.n, p.h, p.w, p.channels)
    grad_offset = grad_offset.reshape(p.n, p.h_out, p.w_out, p.off_channels)
    if p.packed:
        return grad_input, grad_offset, grad_offset
    return grad_input, grad_offset, grad_mask.reshape(p.n, p.h_out, p.w_out, p.mask_channels)
