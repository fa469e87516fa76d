"""CUDA deformable PS RoI pooling: launch code for the kernels of ``kernels_cu/psroi_pool.cu``.

Called by ``deformarray._api`` with arguments that ``_validate`` has already checked
(``PSRoiPoolParams``; batch indices in range). MXNet ``DeformablePSROIPooling`` numbers
(see the kernel file's header and docs/deform_psroi_pool.md):

* Forward: ``psroi_pool_forward``, one thread per output element ``(r, c, i, j)``, the mean
  of the valid ``sample_per_part**2`` samples of input channel ``(c*gs + gi)*gs + gj``.
* Backward:

  - offset gradient: ``psroi_pool_coord_grad``, one thread per offset cell
    ``(r, class, pi, pj)`` summing over the class's output channels and the bins of the
    part cell (no atomics: deterministic in both modes);
  - input gradient, ``deterministic=False`` (default): ``psroi_pool_backward_atomic``,
    one thread per output element, floating-point ``atomicAdd`` (float32 for the 16-bit
    types, into a float32 buffer). The last bits vary from run to run.
  - input gradient, ``deterministic=True``: the sparse-matrix product of deform_conv's
    deterministic col2im. Every output element has exactly ``4*sample_per_part**2``
    entries, so nothing has to be read back to the host: ``psroi_pool_coo`` lists them
    (key = input element, value = bilinear weight / count), a stable ``argsort`` groups them
    by input element keeping the entry order, a prefix sum of integer counts gives each
    element's range and ``psroi_pool_gather`` adds each range in that order, one thread
    per input element.

Workspace (``_config.get_workspace_limit()``): none for the forward and for the atomic
backward of float32 / float64. The 16-bit types need a float32 accumulator of ``C*H*W*4``
bytes per image (images in chunks that fit, at least one). Deterministic mode adds
``C*H*W*24`` bytes per image (row counts and starts) and ``4*spp**2*(a + 48)`` bytes per
output element (keys, values, the sort's buffers; ``a`` = 8 for float64, else 4): images
take at most half the bound, the output elements are cut into chunks that fit the rest (at
least one).

All kernels run on CuPy's current stream of the input's device, with no host
synchronisation. Indices are 64-bit.
Nothing in this module or in psroi_pool.cu has been run on a GPU yet: see docs/cuda.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _config
from ._launch import acc_dtype as _acc_dtype
from ._launch import backend as _launch_backend
from ._launch import contiguous as _contiguous
from ._launch import i64 as _i64
from ._launch import same_device as _same_device
from .roi_pool import _args, _image_chunks

_FILE = "psroi_pool.cu"
_DET_BYTES_PER_ENTRY = 48  # int64 key + cupy.argsort's buffers (as deform_conv)
_DET_BYTES_PER_ROW = 24  # int64 counts, int64 row starts, the prefix sum's temporary
# Most entries in one deterministic chunk: psroi_pool_gather maps an entry to its output
# element with a 32-bit division.
_DET_MAX_ENTRIES = 2**31 - 1


def _backend() -> Any:
    return _launch_backend(_FILE)


def _geom_args(p: Any) -> tuple:
    """The kernels' DFA_PSROI_PARAMS, in order."""
    return _i64(p.n, p.c, p.h, p.w, p.r, p.output_dim, p.group_size, p.pooled_size, p.part_size, p.sample_per_part) + (
        np.float64(p.trans_std),
        np.float64(p.spatial_scale),
        np.int64(p.num_classes if p.has_offset else 1),
    )


# ---------------------------------------------------------------------------------------
# Forward


def forward(p, input, rois, offset):
    """Output ``(R, output_dim, pooled_size, pooled_size)`` of ``deform_psroi_pool``."""
    be = _backend()
    _same_device(dict(input=input, rois=rois, offset=offset))
    with be.device(input):
        return _forward(be, p, input, rois, offset)


def _forward(be, p, input, rois, offset):
    out = be.xp.empty(p.out_shape, dtype=input.dtype)
    if out.size == 0:
        return out
    input, rois, offset = (_contiguous(be, a) for a in (input, rois, offset))
    be.launch("psroi_pool_forward", input.dtype, out.size, _args(be, input, rois, offset, out) + _geom_args(p))
    return out


# ---------------------------------------------------------------------------------------
# Backward


def backward(p, grad_output, input, rois, offset, deterministic=False):
    """Gradients ``(input, offset or None)`` on CuPy arrays.

    ``deterministic=True`` computes the input gradient by a fixed-order sparse gather
    instead of floating-point atomics (same bits on every run). The offset gradient is
    deterministic in both modes. RoIs get no gradient.
    """
    be = _backend()
    _same_device(dict(grad_output=grad_output, input=input, rois=rois, offset=offset))
    with be.device(input):
        return _backward(be, p, grad_output, input, rois, offset, bool(deterministic))


def _backward(be, p, grad_output, input, rois, offset, deterministic):
    xp = be.xp
    dtype = input.dtype
    acc = _acc_dtype(dtype)
    half = acc != dtype
    grad_input = xp.zeros((p.n, p.c, p.h, p.w), dtype=dtype)  # a memset: fine for 16-bit
    grad_offset = xp.zeros(offset.shape, dtype=dtype) if offset is not None else None
    outputs = p.r * p.output_dim * p.pooled_size * p.pooled_size
    if outputs == 0 or p.h * p.w == 0:
        return grad_input, grad_offset
    grad_output, input, rois, offset = (_contiguous(be, a) for a in (grad_output, input, rois, offset))
    geom = _geom_args(p)
    if offset is not None:
        be.launch(
            "psroi_pool_coord_grad", dtype, offset.size // 2, (input, grad_output, rois, offset, grad_offset) + geom
        )
    limit = _config.get_workspace_limit()
    image = p.c * p.h * p.w
    if not deterministic:
        if not half:
            be.launch(
                "psroi_pool_backward_atomic",
                dtype,
                outputs,
                _args(be, grad_output, rois, offset, grad_input) + geom + _i64(0, p.n),
            )
            return grad_input, grad_offset
        for n0, nb in _image_chunks(p.n, image * 4, limit):
            gin = xp.zeros((nb, p.c, p.h, p.w), dtype=np.float32)
            be.launch(
                "psroi_pool_backward_atomic",
                dtype,
                outputs,
                _args(be, grad_output, rois, offset, gin) + geom + _i64(n0, nb),
            )
            be.launch("psroi_pool_from_acc", dtype, gin.size, (gin, grad_input[n0 : n0 + nb], np.int64(gin.size)))
            del gin  # before the next chunk allocates its own (a rebinding frees only after it)
        return grad_input, grad_offset

    per_image = image * (_DET_BYTES_PER_ROW + (4 if half else 0))
    per_output = 4 * p.sample_per_part**2 * (acc.itemsize + _DET_BYTES_PER_ENTRY)
    if 4 * p.sample_per_part**2 > _DET_MAX_ENTRIES:
        raise ValueError(
            f"deterministic=True needs 4*sample_per_part**2 < 2**31 on the CUDA backend, got "
            f"sample_per_part = {p.sample_per_part}"
        )
    for n0, nb in _image_chunks(p.n, 2 * per_image, limit):  # images: at most half the bound
        target = xp.zeros((nb, p.c, p.h, p.w), dtype=np.float32) if half else grad_input[n0 : n0 + nb]
        step = max(1, min((limit - nb * per_image) // per_output, _DET_MAX_ENTRIES // (4 * p.sample_per_part**2)))
        for q0 in range(0, outputs, step):
            _gather_chunk(
                be, p, dtype, acc, grad_output, rois, offset, target, geom, n0, nb, q0, min(step, outputs - q0)
            )
        if half:
            be.launch(
                "psroi_pool_from_acc", dtype, target.size, (target, grad_input[n0 : n0 + nb], np.int64(target.size))
            )
        del target  # before the next chunk allocates its own
    return grad_input, grad_offset


def _gather_chunk(be, p, dtype, acc, grad_output, rois, offset, target, geom, n0, nb, q0, L):
    """Input gradient of output elements q0 .. q0+L-1 for images n0 .. n0+nb-1, summed in a
    fixed order (see psroi_pool_coo / psroi_pool_gather)."""
    xp = be.xp
    entries = 4 * p.sample_per_part**2 * L
    rows = nb * p.c * p.h * p.w
    keys = xp.empty((entries,), dtype=np.int64)
    vals = xp.empty((entries,), dtype=acc)
    counts = xp.zeros((rows,), dtype=np.int64)
    be.launch("psroi_pool_coo", dtype, L, _args(be, rois, offset, keys, vals, counts) + geom + _i64(n0, nb, q0, L))
    order = be.argsort_stable(keys)  # entries of each row stay in increasing entry order
    del keys
    row_start = xp.zeros((rows + 1,), dtype=np.int64)
    row_start[1:] = xp.cumsum(counts)  # row r is order[row_start[r]:row_start[r + 1]]
    del counts
    be.launch("psroi_pool_gather", dtype, rows, (order, row_start, vals, grad_output, target) + geom + _i64(nb, q0))


__all__ = ["forward", "backward"]
