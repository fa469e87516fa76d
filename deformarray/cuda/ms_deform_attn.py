"""CUDA multi-scale deformable attention: launch code for ``kernels_cu/ms_deform_attn.cu``.

Called by ``deformarray._api`` with arguments that ``_validate_msda`` has already checked
(``MsdaParams``: host tuples of the level shapes and starts). The numbers are the CPU
backend's (see the kernel file's header and docs/ms_deform_attn.md); the sampling and
accumulation core is ``kernels_cu/aggregate.cuh``.

* Forward: ``msda_forward``, one thread per output element ``(n, q, m, d)`` (``d``
  fastest: neighbouring threads read neighbouring channels), summing over levels then points.
* Backward:

  - location and attention gradients: ``msda_backward_point``, one thread per point
    ``(n, q, m, l, p)`` summing over the head's ``D`` channels from channel 0 (no atomics:
    deterministic in both modes);
  - value gradient, ``deterministic=False`` (default): the same kernel adds each point's
    ``(a * w_corner) * g_d`` to the four corners with floating-point ``atomicAdd``
    (float32 for float16 / bfloat16, into a float32 buffer cast at the end). The last bits
    vary from run to run.
  - value gradient, ``deterministic=True``: the queries are cut into ``K`` chunks; one
    thread per ``(chunk, image, m, d)`` (``msda_grad_value_owned``) is the only writer of
    column ``(m, d)`` of that image in the chunk's partial buffer ``(K, nb, S, M, D)`` and
    adds its queries' contributions in the order (query, level, point, corner);
    ``msda_sum_chunks`` then adds the ``K`` partials in chunk order and casts. No atomics,
    no sort, nothing read back: the same bits on every run for the same inputs and
    workspace bound (which sets ``K``). float32 / float64 with ``K = 1`` write
    ``grad_value`` directly. ``K`` is the smallest that gives about ``_DET_THREADS``
    threads (at most ``Lq``), within the workspace bound.

Workspace (``_config.get_workspace_limit()``, read once per call; ``E = S*M*D`` value
elements per image, ``a`` = 8 bytes for float64, 4 otherwise): the level table
(``24*L`` bytes) always; nothing else for the forward and for the default backward of
float32 / float64. float16 / bfloat16, default backward: a float32 value-gradient buffer
of ``E*4`` bytes per image, images in chunks that fit (at least one). Deterministic
backward: ``K*nb*E*a`` bytes for ``nb`` images, ``K*nb*E*a <= bound`` (at least
``K = nb = 1``, which float32 / float64 need no buffer for: they then write the gradient
directly; the 16-bit types need at least one image's float32 buffer).

Index arithmetic is 32-bit when every array and work range of a launch has fewer than
2**31 elements (kernels ``*_i32``), else 64-bit (``*_i64``). All kernels run on CuPy's
current stream of ``value``'s device, with no host synchronisation.
Nothing in this module or in ms_deform_attn.cu has been run on a GPU yet: see docs/cuda.md.
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

_FILE = "ms_deform_attn.cu"
# Largest element count that the kernels' 32-bit index path takes (a test lowers it to run
# the 64-bit path on small arrays).
_INDEX32_MAX = 2**31 - 1
# Deterministic value gradient: query chunks are added until about this many threads run
# (one per (chunk, image, head, channel)); more chunks cost workspace and a longer final sum.
_DET_THREADS = 1 << 17


def _backend() -> Any:
    return _launch_backend(_FILE)


def _suffix(*sizes: int) -> str:
    """``_i32`` when every size fits 32-bit index arithmetic, else ``_i64``."""
    return _index_suffix(_INDEX32_MAX, *sizes)


def _dims(p: Any) -> tuple:
    """The kernels' DFA_MSDA_PARAMS, in order."""
    return _i64(p.n, p.s, p.m, p.d, p.lq, p.l, p.p)


def _levels(be: Any, p: Any) -> Any:
    """``(L, 3)`` int64 rows ``(H_l, W_l, start_l)`` on the device."""
    host = np.array([(h, w, s) for (h, w), s in zip(p.shapes, p.starts)], dtype=np.int64).reshape(p.l, 3)
    return be.xp.asarray(host)


# ---------------------------------------------------------------------------------------
# Forward


def forward(p, value, sampling_locations, attention_weights):
    """Output ``(N, Lq, M*D)`` of ``ms_deform_attn`` on CuPy arrays."""
    be = _backend()
    _same_device(dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights))
    with be.device(value):
        return _forward(be, p, value, sampling_locations, attention_weights)


def _forward(be, p, value, loc, attn):
    out = be.xp.empty(p.out_shape, dtype=value.dtype)
    if out.size == 0:
        return out
    value, loc, attn = (_contiguous(be, a) for a in (value, loc, attn))
    levels = _levels(be, p)
    kernel = "msda_forward" + _suffix(value.size, loc.size, out.size)
    be.launch(kernel, value.dtype, out.size, (value, loc, attn, levels, out) + _dims(p))
    return out


# ---------------------------------------------------------------------------------------
# Backward


def backward(p, grad_output, value, sampling_locations, attention_weights, deterministic=False):
    """Gradients ``(value, sampling_locations, attention_weights)`` on CuPy arrays.

    ``deterministic=True`` computes the value gradient with one writer per element and a
    fixed summation order instead of floating-point atomics (same bits on every run; see
    the module docstring). The location and attention gradients are deterministic in both
    modes.
    """
    be = _backend()
    _same_device(
        dict(
            grad_output=grad_output,
            value=value,
            sampling_locations=sampling_locations,
            attention_weights=attention_weights,
        )
    )
    with be.device(value):
        return _backward(be, p, grad_output, value, sampling_locations, attention_weights, bool(deterministic))


def deterministic_plan(p: Any, acc_itemsize: int, half: bool, limit: int) -> tuple[int, int]:
    """``(nb, K)`` of the deterministic value gradient: images per chunk and query chunks.

    ``K = 0`` means no partial buffer: float32 / float64 write ``grad_value`` directly, all
    images at once. Otherwise each image chunk uses ``K*nb*S*M*D*acc_itemsize`` bytes, within
    ``limit`` unless one image alone (``K = nb = 1``) exceeds it.
    """
    per_image = p.s * p.m * p.d * acc_itemsize
    return _deterministic_plan(p.n, per_image, p.lq, p.m * p.d, half, limit, _DET_THREADS)


def _backward(be, p, grad_output, value, loc, attn, deterministic):
    xp = be.xp
    dtype = value.dtype
    acc = _acc_dtype(dtype)
    half = acc != dtype
    grad_value = xp.zeros(value.shape, dtype=dtype)  # a memset: fine for 16-bit
    grad_loc = xp.zeros(loc.shape, dtype=dtype)
    grad_attn = xp.zeros(attn.shape, dtype=dtype)
    if p.n * p.lq == 0:
        return grad_value, grad_loc, grad_attn
    grad_output, value, loc, attn = (_contiguous(be, a) for a in (grad_output, value, loc, attn))
    levels = _levels(be, p)
    dims = _dims(p)
    limit = _config.get_workspace_limit()
    points = p.lq * p.m * p.l * p.p  # per image
    point_kernel = "msda_backward_point" + _suffix(value.size, loc.size, grad_output.size)

    def points_of(n0, nb, target):
        args = (value, grad_output, loc, attn, levels, grad_loc, grad_attn, target) + dims + _i64(n0, nb)
        be.launch(point_kernel, dtype, nb * points, args)

    if not deterministic:
        if not half:
            points_of(0, p.n, grad_value)
            return grad_value, grad_loc, grad_attn
        for n0, nb in _image_chunks(p.n, p.s * p.m * p.d * 4, limit):
            buf = xp.zeros((nb, p.s, p.m, p.d), dtype=np.float32)
            points_of(n0, nb, buf)
            be.launch("msda_sum_chunks", dtype, buf.size, (buf, grad_value[n0 : n0 + nb]) + _i64(buf.size, 1))
            del buf  # before the next chunk allocates its own (a rebinding frees only after it)
        return grad_value, grad_loc, grad_attn

    points_of(0, p.n, be.null)  # location and attention gradients only
    nb_max, k = deterministic_plan(p, acc.itemsize, half, limit)
    for n0, nb in _image_chunks(p.n, 1, nb_max):
        kk = max(k, 1)
        qc = -(-p.lq // kk)  # queries per chunk
        kk = -(-p.lq // qc)  # no empty chunk
        owned = "msda_grad_value_owned" + _suffix(value.size, loc.size, grad_output.size, kk * nb * p.s * p.m * p.d)
        if k == 0:
            target = grad_value  # float32 / float64, all images
        else:
            target = xp.zeros((kk, nb, p.s, p.m, p.d), dtype=acc)
        args = (grad_output, loc, attn, levels, target) + dims + _i64(n0, nb, kk, qc)
        be.launch(owned, dtype, kk * nb * p.m * p.d, args)
        if k > 0:
            out = grad_value[n0 : n0 + nb]
            be.launch("msda_sum_chunks", dtype, out.size, (target, out) + _i64(out.size, kk))
        del target, args  # before the next chunk allocates its own (args holds it too)
    return grad_value, grad_loc, grad_attn


__all__ = ["forward", "backward"]
