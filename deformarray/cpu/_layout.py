"""NCHW <-> channels-last copies as parallel Numba kernels, shared by the CPU operators.

The sampling kernels read and write channels-last arrays ``(images, H*W, channels)``,
in which a pixel is one contiguous channel vector. NumPy's transposing copies run on one
thread and walk the strided side with no blocking (9.5 ms for 2 x 256 x 64 x 64 float32
back to NCHW, measured); these run in parallel over tiles of ``TILE`` pixels, so the
strided side of a tile stays in cache.

``images`` lists, for each leading slot of the channels-last array, the image of the NCHW
array it holds (int64); ``c0`` is the first NCHW channel it holds.
"""

from __future__ import annotations

from numba import njit, prange

TILE = 64  # pixels per parallel task


@njit(cache=True, inline="always")
def _tile(task, n_tiles, n_pix):
    """(slot, first pixel, end pixel) of parallel task ``task``: slot-major tiles of TILE."""
    s = task // n_tiles
    lo = (task % n_tiles) * TILE
    return s, lo, min(lo + TILE, n_pix)


@njit(cache=True, parallel=True)
def to_channels_last(x, images, c0, xt):
    """xt[s, h*W + w, c] = x[images[s], c0 + c, h, w] for the first H*W rows of xt (rows
    past H*W, such as a zero row the caller keeps, are not touched)."""
    nc, _, n_ch = xt.shape
    width = x.shape[3]
    n_pix = x.shape[2] * width
    n_tiles = (n_pix + TILE - 1) // TILE
    for task in prange(nc * n_tiles):
        s, lo, hi = _tile(task, n_tiles, n_pix)
        n = images[s]
        for j in range(lo, hi):
            for c in range(n_ch):
                xt[s, j, c] = x[n, c0 + c, j // width, j % width]


@njit(cache=True, parallel=True)
def to_channels_first(src, spill, bias, images, c0, p0, dst):
    """dst[images[s], c0 + c, p0 + j] = src[s, j, c] + spill[0, s, j, c] + ... + bias[c],
    added in that order (``spill`` may have zero length; ``dst`` is (N, C, pixels))."""
    nc, n_pix, n_ch = src.shape
    n_tiles = (n_pix + TILE - 1) // TILE
    for task in prange(nc * n_tiles):
        s, lo, hi = _tile(task, n_tiles, n_pix)
        n = images[s]
        for c in range(n_ch):
            for j in range(lo, hi):
                v = src[s, j, c]
                for k in range(spill.shape[0]):
                    v += spill[k, s, j, c]
                dst[n, c0 + c, p0 + j] = v + bias[c]
