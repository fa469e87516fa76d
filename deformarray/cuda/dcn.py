"""CUDA DCNv3 / DCNv4: launch code for ``kernels_cu/dcn.cu``.

Called by ``deformarray._api`` with arguments that ``_validate_dcn`` has already checked
(``DcnParams``). One module serves both operators: DCNv4 differs only in where the offsets
and masks are (``p.packed``: ``offset is mask is offset_mask``), which the kernels read
through ``DcnParams``' generic indexing (off_group, mask_base, mask_group, the two arrays'
channel counts). The numbers are the CPU backend's (``deformarray/cpu/dcn.py``; see the
kernel file's header); the sampling and accumulation core is ``kernels_cu/aggregate.cuh``
with DCN's point rule ``-1 < y < H``, ``-1 < x < W``.

* Forward: ``dcn_forward``, one thread per output element ``(n, ho, wo, g, d)`` (``d``
  fastest: neighbouring threads read neighbouring channels), summing over the points.
* Backward:

  - offset and mask gradients: ``dcn_backward_point``, one thread per point
    ``(n, q, g, k)`` summing over the group's ``D`` channels from channel 0 (no atomics:
    deterministic in both modes);
  - input gradient, ``deterministic=False`` (default): the same kernel adds each point's
    ``(m * w_corner) * g_d`` to the four corners with floating-point ``atomicAdd``
    (float32 for float16 / bfloat16, into a float32 buffer cast at the end, images in
    chunks within the workspace bound). The last bits vary from run to run.
  - input gradient, ``deterministic=True``: the ``Q = H_out*W_out`` output pixels are cut
    into ``K`` chunks; one thread per ``(chunk, image, g, d)`` (``dcn_grad_input_owned``)
    is the only writer of column ``(g, d)`` of that image in the chunk's partial buffer
    ``(K, nb, H*W, G*D)`` and adds its pixels' contributions in the order (pixel, point,
    corner); ``dcn_sum_chunks`` then adds the ``K`` partials in chunk order and casts. No
    atomics, no sort, nothing read back: the same bits on every run for the same inputs
    and workspace bound (which sets ``K``). float32 / float64 with ``K = 1`` write
    ``grad_input`` directly. ``K`` is the smallest that gives about ``_DET_THREADS``
    threads (at most ``Q``), within the workspace bound.

For DCNv4 the offset and mask gradients are one array of offset_mask's shape (zeros in the
padding of its last axis: the kernels never write there), returned as both.

Workspace (``_config.get_workspace_limit()``, read once per call; ``E = H*W*G*D`` input
elements per image, ``a`` = 8 bytes for float64, 4 otherwise): nothing for the forward
and for the default backward of float32 / float64. float16 / bfloat16, default backward: a
float32 input-gradient buffer of ``E*4`` bytes per image, images in chunks that fit (at
least one). Deterministic backward: ``K*nb*E*a`` bytes for ``nb`` images,
``K*nb*E*a <= bound`` (at least ``K = nb = 1``, which float32 / float64 need no buffer for:
they then write the gradient directly; the 16-bit types need at least one image's float32
buffer). Arguments that are not C-contiguous are copied first, as by every CUDA operator.

Index arithmetic is 32-bit when every array, buffer and work range of a launch has fewer
than 2**31 elements (kernels ``*_i32``), else 64-bit (``*_i64``); the tap geometry is always
64-bit. All kernels run on CuPy's current stream of ``input``'s device, with no host
synchronisation. Nothing in this module or in dcn.cu has been run on a GPU yet: see
docs/cuda.md.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .. import _config
from ._launch import acc_dtype as _acc_dtype
from ._launch import backend as _launch_backend
from ._launch import contiguous as _contiguous
from ._launch import deterministic_plan as _deterministic_plan
from ._launch import i64 as _i64
from ._launch import image_chunks as _image_chunks
from ._launch import index_suffix as _index_suffix
from ._launch import same_device as _same_device

_FILE = "dcn.cu"
# Largest element count that the kernels' 32-bit index path takes (a test lowers it to run
# the 64-bit path on small arrays).
_INDEX32_MAX = 2**31 - 1
# Deterministic input gradient: pixel chunks are added until about this many threads run
# (one per (chunk, image, group, channel)); more chunks cost workspace and a longer final sum.
_DET_THREADS = 1 << 17


def _backend() -> Any:
    return _launch_backend(_FILE)


def _suffix(*sizes: int) -> str:
    """``_i32`` when every size fits 32-bit index arithmetic, else ``_i64``."""
    return _index_suffix(_INDEX32_MAX, *sizes)


def _dims(p: Any) -> tuple:
    """The kernels' DFA_DCN_PARAMS, in order."""
    return _i64(
        p.n,
        p.h,
        p.w,
        p.group,
        p.group_channels,
        p.h_out,
        p.w_out,
        p.kh,
        p.kw,
        p.stride[0],
        p.stride[1],
        p.padding[0],
        p.padding[1],
        p.dilation[0],
        p.dilation[1],
        int(p.remove_center),
        p.p,
        p.off_channels,
        p.off_group,
        p.mask_channels,
        p.mask_base,
        p.mask_group,
    ) + (np.float64(p.offset_scale),)


def _arrays(be: Any, input: Any, offset: Any, mask: Any) -> tuple:
    """C-contiguous arguments; DCNv4's one ``offset_mask`` (``offset is mask``) copied once."""
    x = _contiguous(be, input)
    off = _contiguous(be, offset)
    m = off if mask is offset else _contiguous(be, mask)
    return x, off, m


# ---------------------------------------------------------------------------------------
# Forward


def forward(p, input, offset, mask):
    """Output ``(N, H_out, W_out, G*D)`` of ``dcnv3`` / ``dcnv4`` on CuPy arrays (for DCNv4
    ``offset is mask``, the packed offset_mask)."""
    be = _backend()
    _same_device(dict(input=input, offset=offset, mask=mask))
    with be.device(input):
        return _forward(be, p, input, offset, mask)


def _forward(be, p, input, offset, mask):
    out = be.xp.empty(p.out_shape, dtype=input.dtype)
    if out.size == 0:
        return out
    x, off, m = _arrays(be, input, offset, mask)
    kernel = "dcn_forward" + _suffix(x.size, off.size, m.size, out.size)
    be.launch(kernel, x.dtype, out.size, (x, off, m, out) + _dims(p))
    return out


# ---------------------------------------------------------------------------------------
# Backward


def backward(p, grad_output, input, offset, mask, deterministic=False):
    """Gradients ``(input, offset, mask)`` on CuPy arrays; for DCNv4 (``p.packed``) one
    array of offset_mask's shape, returned as both the offset and the mask gradient.

    ``deterministic=True`` computes the input gradient with one writer per element and a
    fixed summation order instead of floating-point atomics (same bits on every run; see
    the module docstring). The offset and mask gradients are deterministic in both modes.
    """
    be = _backend()
    _same_device(dict(grad_output=grad_output, input=input, offset=offset, mask=mask))
    with be.device(input):
        return _backward(be, p, grad_output, input, offset, mask, bool(deterministic))


def deterministic_plan(p: Any, acc_itemsize: int, half: bool, limit: int) -> tuple[int, int]:
    """``(nb, K)`` of the deterministic input gradient: images per chunk and pixel chunks.

    ``K = 0`` means no partial buffer: float32 / float64 write ``grad_input`` directly, all
    images at once. Otherwise each image chunk uses ``K*nb*H*W*G*D*acc_itemsize`` bytes,
    within ``limit`` unless one image alone (``K = nb = 1``) exceeds it.
    """
    per_image = max(1, p.h * p.w * p.channels * acc_itemsize)
    return _deterministic_plan(p.n, per_image, p.h_out * p.w_out, p.channels, half, limit, _DET_THREADS)


def _backward(be, p, grad_output, input, offset, mask, deterministic):
    xp = be.xp
    dtype = input.dtype
    acc = _acc_dtype(dtype)
    half = acc != dtype
    grad_input = xp.zeros(input.shape, dtype=dtype)  # a memset: fine for 16-bit
    grad_offset = xp.zeros(offset.shape, dtype=dtype)
    grad_mask = grad_offset if p.packed else xp.zeros(mask.shape, dtype=dtype)
    q = p.h_out * p.w_out
    if p.n * q == 0:
        return grad_input, grad_offset, grad_mask
    x, off, m = _arrays(be, input, offset, mask)
    go = _contiguous(be, grad_output)
    dims = _dims(p)
    limit = _config.get_workspace_limit()
    points = q * p.group * p.p  # per image
    sizes = (x.size, off.size, m.size, go.size, p.n * points)
    point_kernel = "dcn_backward_point" + _suffix(*sizes)
    image = p.h * p.w * p.channels  # input elements per image

    def points_of(n0, nb, target):
        args = (x, go, off, m, grad_offset, grad_mask, target) + dims + _i64(n0, nb)
        be.launch(point_kernel, dtype, nb * points, args)

    if not deterministic:
        if not half:
            points_of(0, p.n, grad_input)
            return grad_input, grad_offset, grad_mask
        for n0, nb in _image_chunks(p.n, max(1, image * 4), limit):
            buf = xp.zeros((nb, p.h, p.w, p.channels), dtype=np.float32)
            points_of(n0, nb, buf)
            be.launch("dcn_sum_chunks", dtype, buf.size, (buf, grad_input[n0 : n0 + nb]) + _i64(buf.size, 1))
            del buf  # before the next chunk allocates its own (a rebinding frees only after it)
        return grad_input, grad_offset, grad_mask

    points_of(0, p.n, be.null)  # offset and mask gradients only
    nb_max, k = deterministic_plan(p, acc.itemsize, half, limit)
    for n0, nb in _image_chunks(p.n, 1, nb_max):
        kk = max(k, 1)
        qc = -(-q // kk)  # pixels per chunk
        kk = -(-q // qc)  # no empty chunk
        owned = "dcn_grad_input_owned" + _suffix(*sizes, kk * nb * image)
        if k == 0:
            target = grad_input  # float32 / float64, all images
        else:
            target = xp.zeros((kk, nb, p.h, p.w, p.channels), dtype=acc)
        args = (go, off, m, target) + dims + _i64(n0, nb, kk, qc)
        be.launch(owned, dtype, kk * nb * p.channels, args)
        if k > 0:
            out = grad_input[n0 : n0 + nb]
            be.launch("dcn_sum_chunks", dtype, out.size, (target, out) + _i64(out.size, kk))
        del target, args  # before the next chunk allocates its own (args holds it too)
    return grad_input, grad_offset, grad_mask


__all__ = ["forward", "backward"]
