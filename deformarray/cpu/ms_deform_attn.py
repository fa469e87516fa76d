"""Multi-scale deformable attention (Deformable DETR's MSDA) on NumPy arrays.

The numbers are the shared core's (``_aggregate``: the contract is written there): for
query q, head m, level l and point p, the location ``(x, y)`` becomes the pixel coordinate
``(y*H_l - 0.5, x*W_l - 0.5)`` of level l (``grid_sample(align_corners=False)``), a point
is processed when ``-2 < h < H_l`` and ``-2 < w < W_l`` (zero padding per corner, as
grid_sample), and ``out[n, q, m*D + d] = sum over l, then p, of a * S_d``. This module
holds only MSDA's loops; each plane is ``value[n, start_l : start_l + H_l*W_l, m]``.

forward   parallel over (n, m, block of ``_QUERY_BLOCK`` queries): a task walks its block
          level by level (for each level, each query, its points in order), adding into
          the queries' own D entries of the output, so every output entry still sums its
          points levels in order, then points; one head and one level at a time keeps the
          small levels' rows in cache (most of the points' corners).
backward  two kernels, each value of each gradient written by one task in a fixed order,
          so the bits do not depend on the thread count or the split:
          - ``_grad_point_kernel``, parallel over (n, m, block of queries), level by level
            as the forward: for each (q, l, p) the three dot products of
            ``_aggregate.dots`` give the attention-weight gradient and both location
            gradients of that point (each owned by the task).
          - ``_grad_value_kernel``, parallel over (n, m, block of channels): a task owns
            ``grad_value[n, :, m, d0:d1]`` and walks the levels, then the queries in order
            (l, then q, then p, then the corners), adding ``a * w * g`` into it: a row
            belongs to one level, so each entry gets its additions in the order (q, p,
            corner), and one level at a time keeps the small levels in cache. The blocks only give the
            threads more tasks when N*M is small; every channel sees the same sequence of
            additions whatever the blocks (tests/test_ms_deform_attn.py checks it).
          ``deterministic`` is accepted for symmetry with CUDA: this backend always is.

Speed. The loops over the D channels run on flat views with unsigned indices
(``_aggregate``), which LLVM vectorises across channels (the numbers stay those of the
contract: each channel keeps its own order of operations).

Memory. No workspace: the kernels write the outputs (and gradients) directly; the only
allocation in a task is the point-gradient kernel's scratch of 3*D entries.
The only other memory is a C-contiguous copy of an argument that is not
C-contiguous already (``np.ascontiguousarray``), the size of that argument, as every CPU
operator does; the workspace bound (``_config``) has nothing to bound here.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from .._validate_msda import MsdaParams
from ._aggregate import add_sample, channel_block, corners, dots, pixel, scatter, split

# grid_sample's zero padding: points with h or w in (-2, -1] still have a corner whose
# weight or derivative counts (at -1 exactly the sample is 0, its gradient is not).
_LOWER = -2


# queries per task of the forward and point-gradient kernels (see the module docstring:
# each task walks its block level by level, so the small levels stay in cache)
_QUERY_BLOCK = 2048


@njit(cache=True, inline="always")
def _query_block(task, n_heads, n_q):
    """Task (image n, head m, block of queries) of the forward and point-gradient kernels:
    (n, m, first query, end query)."""
    n, m, blk = split(task, n_heads, (n_q + _QUERY_BLOCK - 1) // _QUERY_BLOCK)
    q0 = blk * _QUERY_BLOCK
    return n, m, q0, min(n_q, q0 + _QUERY_BLOCK)


@njit(cache=True, inline="always")
def _level(shapes, starts, lv, n, m, n_rows, n_heads, depth):
    """Level lv's plane of image n and head m in an (N, S, M, D) array: (height, width,
    flat index of its (0, 0))."""
    return shapes[lv, 0], shapes[lv, 1], ((n * n_rows + starts[lv]) * n_heads + m) * depth


@njit(cache=True, inline="always")
def _point(loc, n, q, m, lv, pt, height, width):
    """``corners`` of point pt of query q and head m at level lv (height x width)."""
    h = pixel(loc[n, q, m, lv, pt, 1], height)
    w = pixel(loc[n, q, m, lv, pt, 0], width)
    return corners(h, w, height, width, _LOWER)


@njit(cache=True, parallel=True)
def _forward_kernel(value, shapes, starts, loc, attn, out):
    """out[n, q, m, :] = sum_{l, p} attn * sample; ``out`` (N, Lq, M, D) zeros."""
    n_img, n_rows, n_heads, depth = value.shape
    n_q, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
    vflat = value.reshape(-1)
    oflat = out.reshape(-1)
    stride = n_heads * depth
    for task in prange(n_img * n_heads * ((n_q + _QUERY_BLOCK - 1) // _QUERY_BLOCK)):
        n, m, q0, q1 = _query_block(task, n_heads, n_q)
        for lv in range(n_levels):
            height, width, base = _level(shapes, starts, lv, n, m, n_rows, n_heads, depth)
            for q in range(q0, q1):
                off = ((n * n_q + q) * n_heads + m) * depth  # out[n, q, m, 0]
                for pt in range(n_points):
                    c = _point(loc, n, q, m, lv, pt, height, width)
                    if c[0]:
                        add_sample(vflat, base, stride, c, attn[n, q, m, lv, pt], oflat, off, depth)


@njit(cache=True, parallel=True)
def _grad_point_kernel(value, shapes, starts, loc, attn, go, grad_loc, grad_attn):
    """Location and attention-weight gradients; ``go`` (N, Lq, M, D); outputs zeros."""
    n_img, n_rows, n_heads, depth = value.shape
    n_q, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
    vflat = value.reshape(-1)
    gflat = go.reshape(-1)
    stride = n_heads * depth
    for task in prange(n_img * n_heads * ((n_q + _QUERY_BLOCK - 1) // _QUERY_BLOCK)):
        n, m, q0, q1 = _query_block(task, n_heads, n_q)
        buf = np.empty(3 * depth, dtype=value.dtype)
        for lv in range(n_levels):
            height, width, base = _level(shapes, starts, lv, n, m, n_rows, n_heads, depth)
            for q in range(q0, q1):
                goff = ((n * n_q + q) * n_heads + m) * depth  # go[n, q, m, 0]
                for pt in range(n_points):
                    c = _point(loc, n, q, m, lv, pt, height, width)
                    if c[0]:
                        f = type(c[9])  # the locations' type
                        a = attn[n, q, m, lv, pt]
                        gs, gh, gw = dots(vflat, base, stride, c, gflat, goff, depth, buf)
                        grad_attn[n, q, m, lv, pt] = gs
                        grad_loc[n, q, m, lv, pt, 0] = f(width) * a * gw
                        grad_loc[n, q, m, lv, pt, 1] = f(height) * a * gh


@njit(cache=True, parallel=True)
def _grad_value_kernel(grad_value, shapes, starts, loc, attn, go, blocks):
    """grad_value[n, row, m, d] += a * w * g, parallel over (n, m, channel block).

    (grad_value comes first: the cold-cache notice reads a kernel's dtype from its first
    array argument, ``_warmup._array_dtype``.)"""
    n_img, n_rows, n_heads, depth = grad_value.shape
    n_q, n_levels, n_points = loc.shape[1], loc.shape[3], loc.shape[4]
    vflat = grad_value.reshape(-1)
    gflat = go.reshape(-1)
    stride = n_heads * depth
    for task in prange(n_img * n_heads * blocks):
        n, m, b = split(task, n_heads, blocks)
        d0, d1 = channel_block(b, blocks, depth)
        if d1 == d0:
            continue
        # level by level: a row of grad_value belongs to one level, so each entry still
        # sees its additions in the order (q, p, corner), and the small levels stay in cache
        for lv in range(n_levels):
            height, width, base = _level(shapes, starts, lv, n, m, n_rows, n_heads, depth)
            for q in range(n_q):
                goff = ((n * n_q + q) * n_heads + m) * depth + d0  # go[n, q, m, d0]
                for pt in range(n_points):
                    c = _point(loc, n, q, m, lv, pt, height, width)
                    if c[0]:
                        scatter(vflat, base + d0, stride, c, attn[n, q, m, lv, pt], gflat, goff, d1 - d0)


# ---------------------------------------------------------------------------------------
# Drivers
# ---------------------------------------------------------------------------------------


def _levels(p: MsdaParams):
    return np.array(p.shapes, dtype=np.int64).reshape(p.l, 2), np.array(p.starts, dtype=np.int64)


def _blocks(n_img: int, n_heads: int, depth: int) -> int:
    """Channel blocks per (n, m) for the value-gradient kernel: about two tasks per thread
    in all, each block at least one channel."""
    return max(1, min(depth, -(-2 * numba.get_num_threads() // max(1, n_img * n_heads))))


def forward(p: MsdaParams, value, sampling_locations, attention_weights):
    out = np.zeros((p.n, p.lq, p.m, p.d), dtype=value.dtype)
    if p.n * p.lq:
        shapes, starts = _levels(p)
        _forward_kernel(
            np.ascontiguousarray(value),
            shapes,
            starts,
            np.ascontiguousarray(sampling_locations),
            np.ascontiguousarray(attention_weights),
            out,
        )
    return out.reshape(p.out_shape)


def backward(p: MsdaParams, grad_output, value, sampling_locations, attention_weights, deterministic=True):
    dtype = value.dtype
    grad_value = np.zeros((p.n, p.s, p.m, p.d), dtype=dtype)
    grad_loc = np.zeros((p.n, p.lq, p.m, p.l, p.p, 2), dtype=dtype)
    grad_attn = np.zeros((p.n, p.lq, p.m, p.l, p.p), dtype=dtype)
    if p.n * p.lq:
        shapes, starts = _levels(p)
        v = np.ascontiguousarray(value)
        loc = np.ascontiguousarray(sampling_locations)
        attn = np.ascontiguousarray(attention_weights)
        go = np.ascontiguousarray(grad_output).reshape(p.n, p.lq, p.m, p.d)
        _grad_point_kernel(v, shapes, starts, loc, attn, go, grad_loc, grad_attn)
        _grad_value_kernel(grad_value, shapes, starts, loc, attn, go, _blocks(p.n, p.m, p.d))
    return grad_value, grad_loc, grad_attn
