"""CUDA deformable RoI pooling: launch code for the kernels of ``kernels_cu/roi_pool.cu``.

Called by ``deformarray._api`` with arguments that ``_validate`` has already checked
(``RoiPoolParams``; batch indices in range). mmcv ``DeformRoIPool`` numbers (see the
kernel file's header and docs/deform_roi_pool.md):

* Forward: ``roi_pool_forward``, one thread per output element ``(r, c, i, j)``, averaging
  the bin's ``gy*gx`` RoIAlign samples (times the mask). No temporary buffers.
* Backward:

  - offset / mask gradients: ``roi_pool_coord_grad``, one thread per bin ``(r, i, j)``
    summing over channels and samples (no atomics: deterministic in both modes);
  - input gradient, ``deterministic=False`` (default): ``roi_pool_backward_atomic``, one
    thread per output element scattering its samples' bilinear weights with floating-point
    ``atomicAdd`` (float32 for float16 / bfloat16, into a float32 buffer cast at the end).
    Fast; the order of the additions, so the last bits, varies from run to run.
  - input gradient, ``deterministic=True``: the scatter as a sparse-matrix product in a fixed
    order, as deform_conv's col2im. All channels share the sample points, so one sparse
    matrix ``S`` (rows = input pixels ``(n, y, x)``, columns = bins) serves every channel:
    ``grad_input[n, c] = S @ grad_output[:, c]``. ``roi_pool_coo`` lists ``S``'s entries
    (4 per sample), ``argsort`` (stable) groups them by pixel keeping the entry order, a
    prefix sum of integer counts gives each pixel's range, and ``roi_pool_gather`` has one
    thread per input element add its range in that order. The entry count of a bin depends
    on its RoI's size when ``sampling_ratio == 0``; the launch code then reads the per-RoI
    sample counts back to the host (``roi_pool_roi_info``, one device-to-host copy of
    ``2*R`` integers: the only host synchronisation of the module).

Workspace (``_config.get_workspace_limit()``): the forward and the atomic backward of
float32 / float64 use none. The 16-bit types need a float32 input-gradient accumulator of
``C*H*W*4`` bytes per image: images are processed in chunks that fit the bound (at least one
image per chunk); each chunk's kernel launch skips the RoIs of other images. Deterministic
mode adds, per chunk, ``H*W*24`` bytes per image (row counts and starts; the images of a
chunk take at most half the bound) and ``4*gy*gx*(a + 56)`` bytes per bin (keys, column
ids, values, the sort's buffers; ``a`` = 8 for float64, else 4) plus 16 bytes per bin (work
list): the bins are cut into chunks that fit what the images leave (at least one bin per
chunk).

All kernels run on CuPy's current stream of the input's device. Indices are 64-bit.
Nothing in this module or in roi_pool.cu has been run on a GPU yet: see docs/cuda.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _config
from ._launch import acc_dtype as _acc_dtype
from ._launch import backend as _launch_backend
from ._launch import contiguous as _contiguous
from ._launch import i64 as _i64
from ._launch import image_chunks as _image_chunks
from ._launch import same_device as _same_device

_FILE = "roi_pool.cu"
# Bytes per sparse entry in deterministic mode, beyond its value: int64 key, int64 column
# (bin) id, plus what cupy.argsort allocates (a copy of the keys, the int64 result, the radix
# sort's double buffers), rounded up: as deform_conv's 48 + 8 for the column id.
_DET_BYTES_PER_ENTRY = 56
# Bytes per row (input pixel) in deterministic mode: int64 counts, int64 row starts, and the
# prefix sum's temporary.
_DET_BYTES_PER_ROW = 24
# Bytes per work item (bin) in deterministic mode: its bin id and first entry (int64 each).
_DET_BYTES_PER_ITEM = 16


def _backend() -> Any:
    return _launch_backend(_FILE)


# ---------------------------------------------------------------------------------------
# Helpers (also used by psroi_pool.py)


def _cut(cost: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``[a, b)`` ranges of items whose summed ``cost`` stays within ``budget``
    (at least one item per range, so a single item may exceed it)."""
    ends = np.cumsum(cost, dtype=np.int64)
    a, done = 0, 0
    n = len(cost)
    while a < n:
        b = int(np.searchsorted(ends, done + budget, side="right"))
        b = max(b, a + 1)
        yield a, b
        done = int(ends[b - 1])
        a = b


# ---------------------------------------------------------------------------------------
# Geometry


def _geom_args(p: Any) -> tuple:
    """The kernels' DFA_ROI_PARAMS, in order."""
    return _i64(p.n, p.c, p.h, p.w, p.r, p.pooled_h, p.pooled_w) + (
        np.float64(p.spatial_scale),
        np.int64(p.sampling_ratio),
        np.float64(p.gamma),
    )


def _args(be: Any, *arrays: Any) -> tuple:
    return tuple(be.null if a is None else a for a in arrays)


# ---------------------------------------------------------------------------------------
# Forward


def forward(p, input, rois, offset, mask):
    """Output ``(R, C, pooled_h, pooled_w)`` of ``deform_roi_pool`` on CuPy arrays."""
    be = _backend()
    _same_device(dict(input=input, rois=rois, offset=offset, mask=mask))
    with be.device(input):
        return _forward(be, p, input, rois, offset, mask)


def _forward(be, p, input, rois, offset, mask):
    out = be.xp.empty(p.out_shape, dtype=input.dtype)
    if out.size == 0:
        return out
    input, rois, offset, mask = (_contiguous(be, a) for a in (input, rois, offset, mask))
    be.launch("roi_pool_forward", input.dtype, out.size, _args(be, input, rois, offset, mask, out) + _geom_args(p))
    return out


# ---------------------------------------------------------------------------------------
# Backward


def backward(p, grad_output, input, rois, offset, mask, deterministic=False):
    """Gradients ``(input, offset or None, mask or None)`` on CuPy arrays.

    ``deterministic=True`` computes the input gradient by a fixed-order sparse gather
    instead of floating-point atomics (same bits on every run; see the module docstring).
    The offset and mask gradients are deterministic in both modes. RoI coordinates and
    batch indices get no gradient (as in mmcv).
    """
    be = _backend()
    _same_device(dict(grad_output=grad_output, input=input, rois=rois, offset=offset, mask=mask))
    with be.device(input):
        return _backward(be, p, grad_output, input, rois, offset, mask, bool(deterministic))


def _backward(be, p, grad_output, input, rois, offset, mask, deterministic):
    xp = be.xp
    dtype = input.dtype
    acc = _acc_dtype(dtype)
    grad_input = xp.zeros((p.n, p.c, p.h, p.w), dtype=dtype)  # a memset: fine for 16-bit
    grad_offset = xp.zeros(offset.shape, dtype=dtype) if offset is not None else None
    grad_mask = xp.zeros(mask.shape, dtype=dtype) if mask is not None else None
    if p.r * p.c * p.pooled_h * p.pooled_w == 0 or p.h * p.w == 0:
        return grad_input, grad_offset, grad_mask
    grad_output, input, rois, offset, mask = (_contiguous(be, a) for a in (grad_output, input, rois, offset, mask))
    geom = _geom_args(p)
    if offset is not None or mask is not None:
        be.launch(
            "roi_pool_coord_grad",
            dtype,
            p.r * p.pooled_h * p.pooled_w,
            _args(be, input, grad_output, rois, offset, mask, grad_offset, grad_mask) + geom,
        )
    if deterministic:
        _input_grad_deterministic(be, p, dtype, acc, grad_output, rois, offset, mask, grad_input, geom)
    elif acc == dtype:
        be.launch(
            "roi_pool_backward_atomic",
            dtype,
            grad_output.size,
            _args(be, grad_output, rois, offset, mask, grad_input) + geom + _i64(0, p.n),
        )
    else:
        plane = p.c * p.h * p.w
        for n0, nb in _image_chunks(p.n, plane * 4, _config.get_workspace_limit()):
            gin = xp.zeros((nb, p.c, p.h, p.w), dtype=np.float32)
            be.launch(
                "roi_pool_backward_atomic",
                dtype,
                grad_output.size,
                _args(be, grad_output, rois, offset, mask, gin) + geom + _i64(n0, nb),
            )
            be.launch("roi_pool_from_acc", dtype, gin.size, (gin, grad_input[n0 : n0 + nb], np.int64(gin.size)))
            del gin  # before the next chunk allocates its own (a rebinding frees only after it)
    return grad_input, grad_offset, grad_mask


def _samples_per_bin(be, p, dtype, rois, geom):
    """Per RoI: image index (-1 when unknown or out of range) and samples per bin, on the host.

    With a fixed sampling ratio every bin has ``sampling_ratio**2`` samples and nothing is
    read back (the image index is left unknown: the kernels skip RoIs of other images).
    Otherwise one small device-to-host copy."""
    if p.sampling_ratio > 0:
        return np.full(p.r, -1, np.int64), np.full(p.r, p.sampling_ratio**2, np.int64), False
    info = be.xp.empty((p.r, 2), dtype=np.int64)
    be.launch("roi_pool_roi_info", dtype, p.r, (rois, info) + geom)
    info = be.to_host(info)
    return info[:, 0], info[:, 1], True


def _input_grad_deterministic(be, p, dtype, acc, grad_output, rois, offset, mask, grad_input, geom):
    """Input gradient as a sparse product summed in a fixed order (see roi_pool_coo /
    roi_pool_gather)."""
    xp = be.xp
    half = acc != dtype
    limit = _config.get_workspace_limit()
    pb = p.pooled_h * p.pooled_w
    plane = p.h * p.w
    image_batch, per_bin, known = _samples_per_bin(be, p, dtype, rois, geom)
    per_image = plane * _DET_BYTES_PER_ROW + (p.c * plane * 4 if half else 0)
    # the images take at most half the bound, the entries the rest (at least one each)
    nb_max = max(1, min(p.n, limit // (2 * per_image)))
    entry_bytes = acc.itemsize + _DET_BYTES_PER_ENTRY
    for n0 in range(0, p.n, nb_max):
        nb = min(nb_max, p.n - n0)
        keep = per_bin > 0
        if known:
            keep &= (image_batch >= n0) & (image_batch < n0 + nb)
        roi_ids = np.nonzero(keep)[0]
        if half:
            target = xp.zeros((nb, p.c, p.h, p.w), dtype=np.float32)
        else:
            target = grad_input[n0 : n0 + nb]
        if len(roi_ids):
            # work items: every bin of the kept RoIs, in increasing bin id
            bins = (roi_ids[:, None] * pb + np.arange(pb, dtype=np.int64)[None, :]).reshape(-1)
            entries = np.repeat(4 * per_bin[roi_ids], pb)
            cost = entries * entry_bytes + _DET_BYTES_PER_ITEM
            budget = max(limit - nb * per_image, 1)
            for a, b in _cut(cost, budget):
                _gather_chunk(
                    be, p, dtype, acc, grad_output, rois, offset, mask, target, geom, bins[a:b], entries[a:b], n0, nb
                )
        if half:
            be.launch(
                "roi_pool_from_acc", dtype, target.size, (target, grad_input[n0 : n0 + nb], np.int64(target.size))
            )
        del target  # before the next chunk allocates its own


def _gather_chunk(be, p, dtype, acc, grad_output, rois, offset, mask, target, geom, bins, entries, n0, nb):
    xp = be.xp
    first = np.zeros(len(bins), dtype=np.int64)
    np.cumsum(entries[:-1], out=first[1:])
    total = int(first[-1] + entries[-1])
    rows = nb * p.h * p.w
    items = xp.asarray(bins)
    item_entry = xp.asarray(first)
    keys = xp.empty((total,), dtype=np.int64)
    cols = xp.empty((total,), dtype=np.int64)
    vals = xp.empty((total,), dtype=acc)
    counts = xp.zeros((rows,), dtype=np.int64)
    be.launch(
        "roi_pool_coo",
        dtype,
        len(bins),
        _args(be, rois, offset, mask, items, item_entry, keys, vals, cols, counts) + geom + _i64(n0, nb, len(bins)),
    )
    del items, item_entry
    order = be.argsort_stable(keys)  # entries of each row stay in increasing entry order
    del keys
    row_start = xp.zeros((rows + 1,), dtype=np.int64)
    row_start[1:] = xp.cumsum(counts)  # row r is order[row_start[r]:row_start[r + 1]]
    del counts
    be.launch(
        "roi_pool_gather",
        dtype,
        nb * p.c * p.h * p.w,
        (order, row_start, vals, cols, grad_output, target) + geom + _i64(nb),
    )


__all__ = ["forward", "backward"]
