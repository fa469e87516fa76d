"""CUDA deformable convolution: launch code for the kernels of ``kernels_cu/deform_conv.cu``.

Called by ``deformarray._api`` with arguments that ``_validate.conv_params`` has already
checked. The kernel file's header describes the design; in short:

* The flattened (image, output pixel) range ``q = n*P + p`` (``P = H_out*W_out``) is cut
  into chunks whose temporary buffers fit ``_config.get_workspace_limit()`` bytes: whole
  images when at least one fits, otherwise pieces of one image (at least 512 pixels, see
  ``_chunking``).
* Each image is copied channels-last once (``deform_conv_to_channels_last``); one thread per
  sample point computes the point and its corner weights once and loops over its offset
  group's channels (``deform_conv_im2col``), writing the transposed columns ``(L, C_in*K)``
  in the input's dtype. Products are cuBLAS GemmEx calls (``_launch.gemm``): float16 /
  bfloat16 operands on tensor cores with float32 accumulation and results; float32 in strict
  fp32 unless ``deformarray.set_allow_tf32(True)`` (the torch adapter follows
  ``torch.backends.cuda.matmul.allow_tf32``); float64 in float64.
* Forward per chunk: im2col, one GEMM per group into ``(L, C_out)``,
  ``deform_conv_store_output`` (bias, layout, cast).
* Backward per chunk: ``grad_out^T`` gathered in the input's dtype; ``grad_bias += 1 @ grad_out^T``
  and ``grad_weight += grad_out^T' @ cols`` (GEMMs accumulating in float32 / float64); the
  columns' memory then receives ``grad_cols = grad_out^T @ W`` in the accumulator type;
  ``deform_conv_coord_grad`` (one thread per point, channels in order: deterministic in both
  modes) gives the offset and mask gradients; the input gradient is accumulated
  channels-last in the accumulator type and written out when an image is complete:

  - ``deterministic=False`` (default): ``deform_conv_col2im_atomic``, one thread per point,
    floating-point ``atomicAdd`` on the corners of each channel. The order of the additions,
    so the last bits of ``grad_input``, varies from run to run.
  - ``deterministic=True``: the chunk's pixels are cut into ``S`` sub-chunks; one thread per
    (sub-chunk, a few channels of an offset group) is the only writer of those channels of a
    partial buffer and adds its points in a fixed order (``deform_conv_col2im_owned``);
    ``deform_conv_sum_partials`` adds the partials in order. No atomics, no sort, nothing
    read back: the same bits on every run for the same inputs, workspace bound and device
    (cuBLAS's own reproducibility assumption). ``S`` is the smallest giving about
    ``_DET_THREADS`` threads, with at least ``_DET_MIN_PIXELS`` pixels each, within what the
    bound leaves after the chunk (``S = 1`` needs no buffer); in this mode chunks are
    planned within half of the bound when they fit there, to leave the other half to the
    partial buffers. Cost model: docs/cuda.md.

Workspace per chunk of ``L`` pixels and ``nb`` images (``t`` = the dtype's bytes, ``a`` = the
accumulator's): forward ``L*(C_in*K*t + C_out*a) + nb*C_in*H*W*t``; backward
``L*(C_in*K*a + C_out*t) + nb*C_in*H*W*(t + a)`` (plus ``L*(t + a)`` with a bias) and, in
deterministic mode, ``S - 1`` more accumulators when they fit; the permuted weight and the
weight gradient's accumulator (weight-sized) are not counted.

Index arithmetic is 32-bit when every array, buffer and work range of a launch has fewer
than 2**31 elements (kernels ``*_i32``), else 64-bit (``*_i64``). All kernels run on CuPy's
current stream of the inputs' device, with no host synchronisation.

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
from ._launch import gemm as _gemm
from ._launch import i64 as _i64
from ._launch import same_device as _same_device

_FILE = "deform_conv.cu"
_MAX_GEMM_DIM = 2**31 - 1  # cuBLAS takes int dimensions
# Largest element count that the kernels' 32-bit index path takes (a test lowers it to run
# the 64-bit path on small arrays).
_INDEX32_MAX = 2**31 - 1
# Deterministic input gradient: sub-chunks are added until about this many threads run (one
# per (sub-chunk, offset group, j < J)), as far as the workspace bound leaves room for their
# buffers.
_DET_THREADS = 1 << 17
# ... each thread owning at most this many channels of its offset group (J = the group's
# channels / this, rounded up): it computes each sample point once for all of them.
_DET_CHANNELS_PER_THREAD = 8
# ... but each sub-chunk has at least this many pixels (or the chunk's all): fewer would add
# partial buffers (an image-sized accumulator each) for little work.
_DET_MIN_PIXELS = 64


def _backend() -> Any:
    return _launch_backend(_FILE)


# ---------------------------------------------------------------------------------------
# Helpers


def _suffix(*sizes: int) -> str:
    """``_i32`` when every size fits 32-bit index arithmetic, else ``_i64``."""
    return "_i32" if max(sizes) <= _INDEX32_MAX else "_i64"


def _geom_args(p: Any) -> tuple:
    """The kernels' DFA_GEOM_PARAMS, in order."""
    (sh, sw), (ph, pw), (dh, dw) = p.stride, p.padding, p.dilation
    return _i64(p.c_in, p.h, p.w, p.kh, p.kw, sh, sw, ph, pw, dh, dw, p.h_out, p.w_out, p.offset_groups, p.groups)


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


def _permuted_weight(be: Any, weight: Any, p: Any) -> Any:
    """The weight as ``(C_out, kh*kw*C_in/groups)`` in its own dtype, column ``k*Cg + cg``:
    the order of the columns' rows (deform_conv.cu)."""
    cg = p.c_in // p.groups
    wp = be.xp.empty((p.c_out, p.k * cg), dtype=weight.dtype)
    be.launch("deform_conv_permute_weight", weight.dtype, p.c_out * p.k, (weight, wp) + _i64(p.c_out, cg, p.k))
    return wp


def _from_acc(be: Any, src: Any, dtype: Any) -> Any:
    """``src`` (accumulator type, C-contiguous) converted to ``dtype``."""
    if src.dtype == dtype:
        return src
    out = be.xp.empty(src.shape, dtype=dtype)
    be.launch("deform_conv_from_acc", dtype, src.size, (src, out, np.int64(src.size)))
    return out


def _channels_last(be: Any, input: Any, p: Any, ch: _Chunk, sfx: str) -> Any:
    """Images ``n0 .. n0+nb-1`` of ``input`` as ``(nb, H*W, C)`` in their own dtype."""
    plane = p.h * p.w
    xcl = be.xp.empty((ch.nb, plane, p.c_in), dtype=input.dtype)
    be.launch(
        "deform_conv_to_channels_last" + sfx,
        input.dtype,
        ch.nb * plane,
        (input, xcl) + _i64(p.c_in, plane, ch.n0, ch.nb),
    )
    return xcl


def _block(a: Any, g: int, width: int) -> Any:
    """Columns ``g*width .. (g+1)*width - 1`` of a 2-D array (a strided view)."""
    return a[:, g * width : (g + 1) * width]


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
    wp = _permuted_weight(be, weight, p)
    geom = _geom_args(p)
    pixels = p.h_out * p.w_out
    ck = p.c_in * p.k
    kcg = ck // p.groups
    og = p.c_out // p.groups
    per_pixel = ck * dtype.itemsize + p.c_out * acc.itemsize  # columns + GEMM result
    per_image = p.c_in * p.h * p.w * dtype.itemsize  # the channels-last copy
    mask_arg = mask if mask is not None else be.null
    bias_arg = bias if bias is not None else be.null
    chunks = list(_plan(p.n, pixels, per_pixel, per_image, _config.get_workspace_limit(), "the channels-last copy"))
    longest = max(c.length for c in chunks)
    sizes = (input.size, offset.size, mask.size if mask is not None else 0, out.size)
    sfx = _suffix(*sizes, longest * ck, longest * p.c_out, p.offset_groups * p.k * longest)
    xcl = None
    for ch in chunks:
        L = ch.length
        if ch.starts_image:
            xcl = None
            xcl = _channels_last(be, input, p, ch, sfx)
        cols = xp.empty((L, ck), dtype=dtype)
        be.launch(
            "deform_conv_im2col" + sfx,
            dtype,
            p.offset_groups * p.k * L,
            (xcl, offset, mask_arg, cols) + geom + _i64(ch.q0, L, ch.n0),
        )
        res = xp.empty((L, p.c_out), dtype=acc)
        for g in range(p.groups):
            _gemm(be, _block(cols, g, kcg), wp[g * og : (g + 1) * og], _block(res, g, og), trans_b=True)
        be.launch(
            "deform_conv_store_output" + sfx,
            dtype,
            L,  # one thread per pixel
            (res, bias_arg, out) + _i64(p.c_out, pixels, ch.q0, L),
        )
        # free before the next chunk allocates its own (a rebinding frees only after it)
        del cols, res
    return out


# ---------------------------------------------------------------------------------------
# Backward


def backward(p, grad_output, input, offset, weight, bias, mask, deterministic=False):
    """Gradients ``(input, offset, weight, bias or None, mask or None)`` on CuPy arrays.

    ``deterministic=True`` computes the input gradient with one owner per (sub-chunk,
    channel) instead of floating-point atomics (same bits on every run; see the module
    docstring for the method and its cost). The other gradients are deterministic in both
    modes.
    """
    be = _backend()
    _same_device(dict(grad_output=grad_output, input=input, offset=offset, weight=weight, bias=bias, mask=mask))
    with be.device(input):
        return _backward(be, p, grad_output, input, offset, weight, bias, mask, bool(deterministic))


def _backward(be, p, grad_output, input, offset, weight, bias, mask, deterministic):
    xp = be.xp
    _check_sizes(p)
    dtype = input.dtype
    acc = _acc_dtype(dtype)
    ck = p.c_in * p.k
    kcg = ck // p.groups
    og = p.c_out // p.groups
    pixels = p.h_out * p.w_out
    plane = p.h * p.w
    image = p.c_in * plane

    grad_input = xp.empty((p.n, p.c_in, p.h, p.w), dtype=dtype)
    grad_offset = xp.empty(offset.shape, dtype=dtype)
    grad_mask = xp.empty(mask.shape, dtype=dtype) if mask is not None else None
    gwp = xp.zeros((p.c_out, kcg), dtype=acc)  # grad weight in the permuted order
    gb = xp.zeros((1, p.c_out), dtype=acc) if bias is not None else None

    if p.n > 0:
        grad_output, input, offset, weight, mask = (
            _contiguous(be, a) for a in (grad_output, input, offset, weight, mask)
        )
        wp = _permuted_weight(be, weight, p)
        geom = _geom_args(p)
        mask_arg = mask if mask is not None else be.null
        grad_mask_arg = grad_mask if grad_mask is not None else be.null
        # columns, then (same memory) grad columns in A; grad_out^T; the bias' ones vector
        per_pixel = ck * acc.itemsize + p.c_out * dtype.itemsize
        per_pixel += (dtype.itemsize + acc.itemsize) if bias is not None else 0
        per_image = image * (dtype.itemsize + acc.itemsize)  # channels-last input, grad accumulator
        limit = _config.get_workspace_limit()
        what = "the image's channels-last copy and input-gradient accumulator"
        chunks = None
        if deterministic:
            # half of the bound for the chunk, so that the rest can hold partial buffers
            # (more owner threads); the whole bound when half is too small for a chunk
            try:
                chunks = list(_plan(p.n, pixels, per_pixel, per_image, limit // 2, what))
            except ValueError:
                pass
        if chunks is None:
            chunks = list(_plan(p.n, pixels, per_pixel, per_image, limit, what))
        longest = max(c.length for c in chunks)
        nb_max = max(c.nb for c in chunks)
        sizes = (input.size, offset.size, mask.size if mask is not None else 0, grad_output.size)
        sfx = _suffix(*sizes, longest * ck, longest * p.c_out, p.offset_groups * p.k * longest, nb_max * image)
        ones = None
        if bias is not None:
            ones = _from_acc(be, xp.ones((1, longest), dtype=acc), dtype)
        xcl = gacc = None
        for ch in chunks:
            L = ch.length
            q_args = _i64(ch.q0, L, ch.n0)
            if ch.starts_image:
                xcl = gacc = None
                xcl = _channels_last(be, input, p, ch, sfx)
                gacc = xp.zeros((ch.nb, plane, p.c_in), dtype=acc)
            # grad_out^T (L, C_out) in T; grad bias += ones @ grad_out^T
            gout = xp.empty((L, p.c_out), dtype=dtype)
            be.launch(
                "deform_conv_gather_grad_output" + sfx,
                dtype,
                L,  # one thread per pixel
                (grad_output, gout) + _i64(p.c_out, pixels, ch.q0, L),
            )
            if gb is not None:
                _gemm(be, ones[:, :L], gout, gb, beta=1.0)
            # columns in T -> grad weight; the same memory then holds the grad columns in A
            buf = xp.empty((L * ck * acc.itemsize,), dtype=np.uint8)
            cols = buf[: L * ck * dtype.itemsize].view(dtype).reshape(L, ck)
            be.launch(
                "deform_conv_im2col" + sfx,
                dtype,
                p.offset_groups * p.k * L,
                (xcl, offset, mask_arg, cols) + geom + q_args,
            )
            for g in range(p.groups):
                gw_g = gwp[g * og : (g + 1) * og]
                _gemm(be, _block(gout, g, og), _block(cols, g, kcg), gw_g, trans_a=True, beta=1.0)
            del cols
            gcols = buf.view(acc).reshape(L, ck)
            for g in range(p.groups):
                _gemm(be, _block(gout, g, og), wp[g * og : (g + 1) * og], _block(gcols, g, kcg))
            del gout
            # offset / mask gradients: one thread per point, channels in order
            be.launch(
                "deform_conv_coord_grad" + sfx,
                dtype,
                p.offset_groups * p.k * L,
                (xcl, offset, mask_arg, gcols, grad_offset, grad_mask_arg) + geom + q_args,
            )
            # input gradient, channels-last in A over images n0 .. n0+nb-1
            if deterministic:
                used = per_pixel * L + per_image * ch.nb
                _col2im_deterministic(be, p, dtype, acc, offset, mask_arg, gcols, gacc, geom, ch, limit - used, sfx)
            else:
                be.launch(
                    "deform_conv_col2im_atomic" + sfx,
                    dtype,
                    p.offset_groups * p.k * L,
                    (offset, mask_arg, gcols, gacc) + geom + q_args,
                )
            del buf, gcols
            if ch.ends_image:
                be.launch(
                    "deform_conv_from_channels_last" + sfx,
                    dtype,
                    ch.nb * plane,  # one thread per pixel row
                    (gacc, grad_input) + _i64(p.c_in, plane, ch.n0, ch.nb),
                )
                xcl = gacc = None

    grad_weight = xp.empty(weight.shape, dtype=dtype)
    cg = p.c_in // p.groups
    be.launch("deform_conv_unpermute_weight", dtype, p.c_out * p.k, (gwp, grad_weight) + _i64(p.c_out, cg, p.k))
    grad_bias = _from_acc(be, gb.reshape(p.c_out), dtype) if gb is not None else None
    return grad_input, grad_offset, grad_weight, grad_bias, grad_mask


def _col2im_deterministic(be, p, dtype, acc, offset, mask_arg, gcols, gacc, geom, ch, room, sfx):
    """Input gradient of one chunk with one owner per (sub-chunk, channel) (see
    deform_conv_col2im_owned: a thread owns up to ``_DET_CHANNELS_PER_THREAD`` channels of an
    offset group): ``S`` sub-chunks, as many as give about ``_DET_THREADS``
    threads with sub-chunks of at least ``_DET_MIN_PIXELS`` pixels and whose partial buffers
    fit ``room`` bytes (``S = 1`` adds to ``gacc`` directly, with no buffer)."""
    L = ch.length
    count = gacc.size  # nb * H*W * C
    fit = max(room, 0) // (count * acc.itemsize)
    cpo = p.c_in // p.offset_groups
    j = -(-cpo // _DET_CHANNELS_PER_THREAD)  # threads per (sub-chunk, offset group)
    s = max(1, min(-(-L // _DET_MIN_PIXELS), -(-_DET_THREADS // (p.offset_groups * j)), fit))
    if s < 2:
        s = 1
    ls = -(-L // s)
    s = -(-L // ls)
    partial = gacc if s == 1 else be.xp.zeros((s,) + gacc.shape, dtype=acc)
    if s * count > _INDEX32_MAX:
        sfx = "_i64"
    be.launch(
        "deform_conv_col2im_owned" + sfx,
        dtype,
        s * p.offset_groups * j,
        (offset, mask_arg, gcols, partial) + geom + _i64(ch.q0, L, ch.n0, ch.nb, j, s, ls),
    )
    if s > 1:
        be.launch("deform_conv_sum_partials" + sfx, dtype, count, (partial, gacc) + _i64(count, s))


__all__ = ["forward", "backward"]
