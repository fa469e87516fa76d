"""CUDA deformable convolution: launch code for the kernels of ``kernels_cu/deform_conv.cu``.

Called by ``deformarray._api`` with arguments that ``_validate.conv_params`` has already
checked. Same algorithm as the CPU backend, on the GPU:

* The flattened (image, output pixel) range ``q = n*P + p`` (``P = H_out*W_out``) is cut
  into chunks whose temporary buffers fit ``_config.get_workspace_limit()`` bytes: whole
  images when at least one fits, otherwise pieces of one image (down to one output pixel).
* Forward, per chunk of ``L`` pixels: ``deform_conv_im2col`` samples the ``(C_in*kh*kw, L)``
  column matrix; one cuBLAS GEMM per group (``cupy.matmul``) gives ``(C_out, L)``;
  ``deform_conv_store_output`` adds the bias and writes the ``(N, C_out, H_out, W_out)``
  output.
* Backward, per chunk: the columns are recomputed; ``grad_weight += grad_out @ cols^T`` and
  ``grad_bias += sum(grad_out)`` (cuBLAS / CuPy reductions); the same buffer then receives
  ``grad_cols = W^T @ grad_out``; ``deform_conv_coord_grad`` gathers the offset and mask
  gradients over the channels of each offset group (one thread per output value: no
  atomics); the input gradient is scattered back by col2im:

  - ``deterministic=False`` (default): ``deform_conv_col2im_atomic``, floating-point
    ``atomicAdd`` of each sample's four bilinear contributions (float32 for float16 /
    bfloat16 inputs, into a float32 buffer cast at the end). Fast; the order of the
    additions, so the last bits of ``grad_input``, varies from run to run.
  - ``deterministic=True``: col2im as a sparse-matrix product evaluated in a fixed order.
    ``deform_conv_col2im_coo`` lists the (input pixel, column entry, weight) triples of each
    offset group, ``cupy.argsort`` (a stable radix sort) groups them by input pixel keeping
    the entry order, a prefix sum of integer counts gives each pixel's range, and
    ``deform_conv_col2im_gather`` has one thread per input element add its range in that
    order. Same bits on every run (on the same GPU model and CUDA/CuPy versions, which
    cuBLAS's own reproducibility guarantee also assumes), with the same rounding as a
    sequential sum. Cost: the sort and the index buffers; expect the col2im step to take a
    few times longer than the atomic version and the whole backward roughly 1.3-2x (an
    estimate: not yet measured on a GPU), and ``4*G*kh*kw*(48 + itemsize)`` more workspace
    bytes per output pixel (G = offset groups), which shrinks the chunks.

  Everything else in the backward (GEMMs, reductions, coordinate gradients) is
  deterministic in both modes.

dtypes: float32, float64 compute in their own type; float16 and bfloat16 are loaded and
stored as 16-bit and computed in float32 (columns, GEMMs and accumulators are float32).
All kernels run on CuPy's current stream of the inputs' device, with no host
synchronisation. Indices are 64-bit throughout; the only 32-bit limit is cuBLAS's (a GEMM
dimension below 2**31), which the chunking respects.

Nothing in this module or in deform_conv.cu has been run on a GPU yet: see docs/cuda.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .. import _config
from .._chunking import pixels_per_chunk
from ._launch import acc_dtype as _acc_dtype
from ._launch import backend as _launch_backend
from ._launch import contiguous as _contiguous
from ._launch import i64 as _i64
from ._launch import same_device as _same_device

_FILE = "deform_conv.cu"
_MAX_GEMM_DIM = 2**31 - 1  # cuBLAS takes int dimensions
# Bytes per col2im entry in deterministic mode, beyond its value: int64 key, plus what
# cupy.argsort allocates (a copy of the keys, the int64 result, and the radix sort's double
# buffers of keys and indices), rounded up.
_DET_BYTES_PER_ENTRY = 48
# Bytes per row (input pixel of an offset group) in deterministic mode: int64 counts, int64
# row starts and the prefix sum's temporary.
_DET_BYTES_PER_ROW = 24


def _backend() -> Any:
    return _launch_backend(_FILE)


# ---------------------------------------------------------------------------------------
# Helpers


def _geom_args(p: Any) -> tuple:
    """The kernels' DFA_GEOM_PARAMS, in order."""
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    return _i64(p.c_in, p.h, p.w, p.kh, p.kw, sh, sw, ph, pw, dh, dw, p.h_out, p.w_out, p.offset_groups)


class _Chunk(NamedTuple):
    n0: int  # first image
    nb: int  # images touched (1 when the chunk is part of one image)
    q0: int  # first flattened pixel n*P + p
    length: int  # pixels in the chunk (L)
    starts_image: bool  # the chunk's first pixel is pixel 0 of image n0
    ends_image: bool  # the chunk's last pixel is the last pixel of image n0 + nb - 1


def _plan(
    n: int, pixels: int, per_pixel: int, per_image: int, limit: int, what: str = "no per-image buffer"
) -> Iterator[_Chunk]:
    """Chunks of the (image, pixel) range whose workspace ``per_pixel * L + per_image * nb``
    stays within ``limit`` bytes: whole images when at least one fits, otherwise pieces of
    one image of ``_chunking.pixels_per_chunk`` pixels (at least 512, or the whole image:
    the bound may be exceeded by 1/8 for that, and a ValueError names the smallest bound that
    works beyond). ``what`` names the per-image buffer for that message."""
    per_full = per_pixel * pixels + per_image
    nb = min(n, limit // per_full, _MAX_GEMM_DIM // pixels)
    if nb >= 1:
        for n0 in range(0, n, nb):
            k = min(nb, n - n0)
            yield _Chunk(n0, k, n0 * pixels, k * pixels, True, True)
        return
    length = min(pixels_per_chunk(pixels, per_pixel, per_image, limit, 1.0, what), _MAX_GEMM_DIM)
    for n0 in range(n):
        for p0 in range(0, pixels, length):
            m = min(length, pixels - p0)
            yield _Chunk(n0, 1, n0 * pixels + p0, m, p0 == 0, p0 + m == pixels)


def _check_sizes(p: Any) -> None:
    ck = p.c_in * p.k
    if max(ck, p.c_out) > _MAX_GEMM_DIM:
        raise ValueError(
            f"C_in*kh*kw = {ck} and C_out = {p.c_out} must each be below 2**31 on the CUDA backend "
            "(cuBLAS matrix dimensions are 32-bit)"
        )


def _weight_acc(be: Any, weight: Any, acc: np.dtype, p: Any) -> Any:
    """The weight as a (groups, C_out/groups, C_in/groups*kh*kw) array of the accumulator type."""
    shape = (p.groups, p.c_out // p.groups, (p.c_in // p.groups) * p.k)
    if weight.dtype == acc:
        return weight.reshape(shape)
    w = be.xp.empty(shape, dtype=acc)
    be.launch("deform_conv_to_acc", weight.dtype, weight.size, (weight, w, np.int64(weight.size)))
    return w


def _from_acc(be: Any, src: Any, dtype: Any) -> Any:
    """``src`` (accumulator type, C-contiguous) converted to ``dtype``."""
    if src.dtype == dtype:
        return src
    out = be.xp.empty(src.shape, dtype=dtype)
    be.launch("deform_conv_from_acc", dtype, src.size, (src, out, np.int64(src.size)))
    return out


# ---------------------------------------------------------------------------------------
# Forward


def forward(p, input, offset, weight, bias, mask):
    """Output ``(N, C_out, H_out, W_out)`` of ``deform_conv2d`` on CuPy arrays."""
    be = _backend()
    _same_device(dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask))
    with be.device(input):
        return _forward(be, p, input, offset, weight, bias, mask)


def _forward(be, p, input, offset, weight, bias, mask):
    xp = be.xp
    _check_sizes(p)
    dtype = input.dtype
    acc = _acc_dtype(dtype)
    out = xp.empty(p.out_shape, dtype=dtype)
    if p.n == 0:
        return out
    input, offset, weight, bias, mask = (_contiguous(be, a) for a in (input, offset, weight, bias, mask))
    w = _weight_acc(be, weight, acc, p)
    geom = _geom_args(p)
    pixels = p.h_out * p.w_out
    ck = p.c_in * p.k
    ckg = ck // p.groups
    og = p.c_out // p.groups
    per_pixel = (ck + p.c_out) * acc.itemsize  # columns + GEMM result
    mask_arg = mask if mask is not None else be.null
    bias_arg = bias if bias is not None else be.null
    for ch in _plan(p.n, pixels, per_pixel, 0, _config.get_workspace_limit()):
        L = ch.length
        cols = xp.empty((ck, L), dtype=acc)
        be.launch("deform_conv_im2col", dtype, ck * L, (input, offset, mask_arg, cols) + geom + _i64(ch.q0, L))
        res = xp.empty((p.c_out, L), dtype=acc)
        for g in range(p.groups):
            xp.matmul(w[g], cols[g * ckg : (g + 1) * ckg], out=res[g * og : (g + 1) * og])
        be.launch(
            "deform_conv_store_output", dtype, p.c_out * L, (res, bias_arg, out) + _i64(p.c_out, pixels, ch.q0, L)
        )
        # free before the next chunk allocates its own (a rebinding frees only after it)
        del cols, res
    return out


# ---------------------------------------------------------------------------------------
# Backward


def backward(p, grad_output, input, offset, weight, bias, mask, deterministic=False):
    """Gradients ``(input, offset, weight, bias or None, mask or None)`` on CuPy arrays.

    ``deterministic=True`` computes the input gradient by a fixed-order sparse gather
    instead of floating-point atomics (same bits on every run; see the module docstring
    for the method and its cost). The other gradients are deterministic in both modes.
    """
    be = _backend()
    _same_device(dict(grad_output=grad_output, input=input, offset=offset, weight=weight, bias=bias, mask=mask))
    with be.device(input):
        return _backward(be, p, grad_output, input, offset, weight, bias, mask, bool(deterministic))


def _zeros(xp, shape, dtype):
    # cupy.zeros is a memset (no elementwise kernel), so it is safe for 16-bit types too.
    return xp.zeros(shape, dtype=dtype)


def _backward(be, p, grad_output, input, offset, weight, bias, mask, deterministic):
    xp = be.xp
    _check_sizes(p)
    dtype = input.dtype
    acc = _acc_dtype(dtype)
    half = acc != dtype
    ck = p.c_in * p.k
    ckg = ck // p.groups
    og = p.c_out // p.groups
    pixels = p.h_out * p.w_out
    plane = p.h * p.w

    grad_input = _zeros(xp, (p.n, p.c_in, p.h, p.w), dtype)
    grad_offset = xp.empty(offset.shape, dtype=dtype)
    grad_mask = xp.empty(mask.shape, dtype=dtype) if mask is not None else None
    gw = _zeros(xp, (p.groups, og, ckg), acc)
    gb = _zeros(xp, (p.c_out,), acc) if bias is not None else None

    if p.n > 0:
        grad_output, input, offset, weight, mask = (
            _contiguous(be, a) for a in (grad_output, input, offset, weight, mask)
        )
        w = _weight_acc(be, weight, acc, p)
        geom = _geom_args(p)
        mask_arg = mask if mask is not None else be.null
        grad_mask_arg = grad_mask if grad_mask is not None else be.null
        entries_per_pixel = 4 * p.offset_groups * p.k  # col2im entries (deterministic mode)
        per_pixel = (ck + p.c_out) * acc.itemsize  # columns / grad columns + grad_out
        per_image = 0
        if half:
            per_image += p.c_in * plane * 4  # float32 input-gradient accumulator
        if deterministic:
            per_pixel += entries_per_pixel * (acc.itemsize + _DET_BYTES_PER_ENTRY)
            per_image += p.offset_groups * plane * _DET_BYTES_PER_ROW
        gin_acc = None
        parts = ["the image's float32 input-gradient accumulator"] if half else []
        parts += ["the image's deterministic row offsets"] if deterministic else []
        what = " and ".join(parts) or "no per-image buffer"
        for ch in _plan(p.n, pixels, per_pixel, per_image, _config.get_workspace_limit(), what):
            L = ch.length
            q_args = _i64(ch.q0, L)
            # grad_out as (C_out, L) in the accumulator type
            gout = xp.empty((p.c_out, L), dtype=acc)
            be.launch(
                "deform_conv_gather_grad_output",
                dtype,
                p.c_out * L,
                (grad_output, gout) + _i64(p.c_out, pixels, ch.q0, L),
            )
            if gb is not None:
                gb += gout.sum(axis=1)
            # columns -> grad weight; then the same buffer holds the grad columns
            cols = xp.empty((ck, L), dtype=acc)
            be.launch("deform_conv_im2col", dtype, ck * L, (input, offset, mask_arg, cols) + geom + q_args)
            for g in range(p.groups):
                gw[g] += xp.matmul(gout[g * og : (g + 1) * og], cols[g * ckg : (g + 1) * ckg].T)
            gcols = cols
            for g in range(p.groups):
                xp.matmul(w[g].T, gout[g * og : (g + 1) * og], out=gcols[g * ckg : (g + 1) * ckg])
            del gout
            # offset / mask gradients: gather over channels, one writer per value
            be.launch(
                "deform_conv_coord_grad",
                dtype,
                p.offset_groups * p.k * L,
                (input, offset, mask_arg, gcols, grad_offset, grad_mask_arg) + geom + q_args,
            )
            # input gradient, accumulated in the accumulator type over images n0 .. n0+nb-1
            if half:
                if ch.starts_image:
                    gin_acc = _zeros(xp, (ch.nb, p.c_in, p.h, p.w), np.float32)
                target = gin_acc
            else:
                target = grad_input[ch.n0 : ch.n0 + ch.nb]
            if deterministic:
                _col2im_deterministic(be, p, dtype, acc, offset, mask_arg, gcols, target, geom, ch)
            else:
                be.launch(
                    "deform_conv_col2im_atomic",
                    dtype,
                    ck * L,
                    (offset, mask_arg, gcols, target) + geom + q_args + _i64(ch.n0),
                )
            # target may hold the last image's accumulator: let it go before the next one
            del cols, gcols, target
            if half and ch.ends_image:
                be.launch(
                    "deform_conv_from_acc",
                    dtype,
                    gin_acc.size,
                    (gin_acc, grad_input[ch.n0 : ch.n0 + ch.nb], np.int64(gin_acc.size)),
                )
                gin_acc = None

    grad_weight = _from_acc(be, gw.reshape(weight.shape), dtype)
    grad_bias = _from_acc(be, gb, dtype) if gb is not None else None
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _col2im_deterministic(be, p, dtype, acc, offset, mask_arg, gcols, target, geom, ch):
    """Input gradient of one chunk as a sparse product summed in a fixed order (see the
    comments of deform_conv_col2im_coo / deform_conv_col2im_gather)."""
    xp = be.xp
    L = ch.length
    rows = p.offset_groups * ch.nb * p.h * p.w
    entries = 4 * p.offset_groups * p.k * L
    keys = xp.empty((entries,), dtype=np.int64)
    vals = xp.empty((entries,), dtype=acc)
    counts = _zeros(xp, (rows,), np.int64)
    be.launch(
        "deform_conv_col2im_coo",
        dtype,
        p.offset_groups * p.k * L,
        (offset, mask_arg, keys, vals, counts) + geom + _i64(ch.q0, L, ch.n0, ch.nb),
    )
    order = be.argsort_stable(keys)  # entries of each row stay in increasing entry order
    del keys
    row_start = _zeros(xp, (rows + 1,), np.int64)
    row_start[1:] = xp.cumsum(counts)  # exclusive prefix sum: row r is order[start[r]:start[r+1]]
    del counts
    be.launch(
        "deform_conv_col2im_gather",
        dtype,
        ch.nb * p.c_in * p.h * p.w,
        (order, row_start, vals, gcols, target) + geom + _i64(L, ch.nb),
    )


__all__ = ["forward", "backward"]
