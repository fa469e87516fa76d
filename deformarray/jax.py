"""JAX adapter: the deformable operators as differentiable JAX functions.

Each operator is a ``jax.custom_vjp`` whose forward calls the array API's ``op`` and whose
backward calls ``op_backward`` (this module holds no maths). How the arrays reach the
array API depends on where they are and whether JAX is tracing:

* traced (``jax.jit``, ``jax.vmap``, ``shard_map``, ...), or concrete arrays on the CPU:
  ``jax.pure_callback`` hands the operands to Python as host arrays, which are viewed as
  NumPy arrays and run by the Numba CPU backend; on the CPU platform there is no device
  transfer, the results are handed back to XLA (at most a host copy).
* concrete (eager, not traced) arrays on a GPU, when CuPy is importable: zero-copy through
  DLPack (``cupy.from_dlpack``) into the CUDA backend, and back with ``jax.dlpack``.
* traced arrays on a GPU (or eager ones without CuPy): ``jax.pure_callback``, i.e. a
  host round-trip. XLA copies every operand to the host, the Numba CPU backend computes,
  and the result is copied back to the device: cost = device->host and host->device
  transfers of all operands and results, plus CPU compute, on every call (forward and
  backward). There is no GPU lowering (XLA custom call) yet.
  UNVERIFIED: no GPU was available when this was written; both GPU paths are unrun.

``vmap``: the callbacks use ``vmap_method="expand_dims"`` and the host side handles the
extra leading axes: when only the per-image arrays (input, offset, mask of a convolution)
are batched, the vmapped axes are folded into N and the operator runs once; otherwise
(batched weights, RoI pooling, every backward) it loops over the vmapped elements in
NumPy, one array-API call each.

Validation: shapes and dtypes are checked when the function is traced, with the array
API's own messages (``ValueError`` / ``TypeError``). Checks on *values* (the RoIs' batch
indices and coordinates) can only run on concrete arrays: eagerly they raise as usual;
under ``jit`` they run inside the callback, where JAX reports the failure as a runtime
error carrying the same message.

RoI pooling: ``rois`` gets a zero gradient (as in torchvision and mmcv).

Multi-scale deformable attention: ``spatial_shapes`` and ``level_start_index`` are
geometry, not data: they must be concrete (a list, a NumPy array or a concrete JAX array;
under ``jit`` close over them or pass them as static arguments) and get no gradient.

Public functions (same signatures as the array API):
``deform_conv2d``, ``deform_roi_pool``, ``deform_psroi_pool``, ``ms_deform_attn``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _api, _validate, _validate_msda

__all__ = ["deform_conv2d", "deform_roi_pool", "deform_psroi_pool", "ms_deform_attn"]


# --------------------------------------------------------------------------------------
# Operator descriptions: everything the generic machinery needs to know about one operator
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # hashed by identity (lru_cache below)
class _Op:
    """One operator of the array API, seen from JAX.

    arrays:      names of its array arguments, in order (optional ones may be None)
    ndims:       number of axes of each array argument (tells the vmapped axes apart)
    forward:     the array API's ``op`` (called with keyword arguments)
    backward:    the array API's ``op_backward``; returns a named tuple of gradients
    out_shape:   ``(arrays: dict, statics: dict) -> shape``; validates with the library's
                 checks (shapes and dtypes only: arrays may be abstract)
    no_grad:     array arguments with no gradient (they get zeros)
    per_image:   array arguments whose axis 0 is the image axis N and on which nothing
                 else indexes, so vmapped axes can be folded into N (empty: never fold)
    """

    name: str
    arrays: tuple[str, ...]
    ndims: dict
    forward: Callable
    backward: Callable
    out_shape: Callable
    no_grad: tuple[str, ...] = ()
    per_image: tuple[str, ...] = ()


class _Spec:
    """A shape and dtype with no data, for the library's shape checks at trace time."""

    def __init__(self, arr: Any):
        self.shape = tuple(int(s) for s in arr.shape)
        self.dtype = np.dtype(arr.dtype)


def _specs(arrays: dict) -> dict:
    return {k: (None if v is None else _Spec(v)) for k, v in arrays.items()}


def _conv_out_shape(arrays: dict, statics: dict) -> tuple:
    a = _specs(arrays)
    _validate.check_dtypes("numpy" if _on_host(arrays) else "cupy", **a)
    return _validate.conv_params(
        a["input"],
        a["offset"],
        a["weight"],
        a["bias"],
        statics["stride"],
        statics["padding"],
        statics["dilation"],
        a["mask"],
    ).out_shape


def _host_rois(rois: Any) -> np.ndarray:
    """The RoIs' values when known, else a valid stand-in of the same shape (all rows
    ``[0, 0, 0, 0, 0]``) so that the shape checks can run at trace time."""
    if isinstance(rois, jax.core.Tracer):
        return np.zeros(tuple(rois.shape), np.dtype(rois.dtype))
    return np.asarray(rois)


def _roi_out_shape(arrays: dict, statics: dict) -> tuple:
    a = _specs(arrays)
    _validate.check_dtypes("numpy" if _on_host(arrays) else "cupy", **a)
    return _validate.roi_pool_params(
        a["input"],
        _host_rois(arrays["rois"]),
        a["offset"],
        a["mask"],
        statics["output_size"],
        statics["spatial_scale"],
        statics["sampling_ratio"],
        statics["gamma"],
    ).out_shape


def _psroi_out_shape(arrays: dict, statics: dict) -> tuple:
    a = _specs(arrays)
    _validate.check_dtypes("numpy" if _on_host(arrays) else "cupy", **a)
    return _validate.psroi_pool_params(a["input"], _host_rois(arrays["rois"]), a["offset"], **statics).out_shape


def _msda_out_shape(arrays: dict, statics: dict) -> tuple:
    a = _specs(arrays)
    _validate.check_dtypes("numpy" if _on_host(arrays) else "cupy", **a)
    return _validate_msda.msda_params(
        a["value"],
        statics["spatial_shapes"],
        statics["level_start_index"],
        a["sampling_locations"],
        a["attention_weights"],
    ).out_shape


# --------------------------------------------------------------------------------------
# Where the arrays are
# --------------------------------------------------------------------------------------


def _is_concrete(arr: Any) -> bool:
    return arr is None or not isinstance(arr, jax.core.Tracer)


def _on_gpu(arr: Any) -> bool:
    try:
        return any(d.platform in ("gpu", "cuda", "rocm") for d in arr.devices())
    except Exception:  # not a committed jax.Array
        return False


def _use_dlpack(arrays: dict) -> bool:
    """Eager call on GPU arrays with CuPy available: the zero-copy path."""
    present = [v for v in arrays.values() if v is not None]
    if not all(_is_concrete(v) for v in present) or not any(_on_gpu(v) for v in present):
        return False
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def _on_host(arrays: dict) -> bool:
    return not _use_dlpack(arrays)


# --------------------------------------------------------------------------------------
# Calling the array API: DLPack (GPU, eager) or a host callback (everything else)
# --------------------------------------------------------------------------------------


def _dlpack_call(fn: Callable, arrays: dict, statics: dict):
    import cupy

    cp = {k: (None if v is None else cupy.from_dlpack(v)) for k, v in arrays.items()}
    out = fn(**cp, **statics)
    return jax.tree_util.tree_map(jax.dlpack.from_dlpack, out)


def _leading(op: _Op, name: str, arr: np.ndarray) -> tuple:
    nd = op.ndims[name]
    return arr.shape[: arr.ndim - nd]


def _host_call(op: _Op, fn: Callable, names: tuple, statics: dict, outputs: tuple, out_shapes: tuple, *arrays):
    """Runs ``fn`` (forward or backward of ``op``) on NumPy views of the callback's
    arguments. ``names`` names ``arrays``; ``outputs`` selects the results (a single
    array when it is None, else the listed fields of the returned named tuple).
    Extra leading axes come from ``vmap_method="expand_dims"``: they broadcast against
    each other (unbatched arguments carry axes of size 1)."""
    host = {k: np.asarray(v) for k, v in zip(names, arrays)}
    batch = np.broadcast_shapes(*(_leading(op, k, v) for k, v in host.items()))

    def pick(res):
        if outputs is None:
            return (res,)
        return tuple(getattr(res, f) for f in outputs)

    def one(args: dict):
        full = {k: args.get(k) for k in op.arrays}
        if "grad_output" in args:
            full = {"grad_output": args["grad_output"], **full}
        return pick(fn(**full, **statics))

    if batch == ():
        res = one(host)
    elif (
        outputs is None
        and op.per_image
        and 0 not in batch
        and all(_leading(op, k, v) == (1,) * len(batch) for k, v in host.items() if k not in op.per_image)
    ):
        # only per-image arrays are vmapped: fold the vmapped axes into N, one call
        nb = int(np.prod(batch))
        folded = {}
        for k, v in host.items():
            core = v.shape[v.ndim - op.ndims[k] :]
            if k in op.per_image:
                v = np.broadcast_to(v, batch + core).reshape((nb * core[0],) + core[1:])
            else:
                v = v.reshape(core)
            folded[k] = v
        (out,) = one(folded)
        res = (out.reshape(batch + (out.shape[0] // nb,) + out.shape[1:]),)
    else:
        # general case: one call per vmapped element
        results = [np.empty(batch + tuple(s), dtype=host[names[0]].dtype) for s in out_shapes]
        for idx in np.ndindex(*batch):
            args = {}
            for k, v in host.items():
                lead = _leading(op, k, v)
                args[k] = v[tuple(i if n > 1 else 0 for i, n in zip(idx, lead))]
            for dst, src in zip(results, one(args)):
                dst[idx] = src
        res = tuple(results)
    return res if outputs is not None else res[0]


def _callback(op: _Op, fn: Callable, arrays: dict, statics: dict, outputs, out_shapes, dtype):
    present = {k: v for k, v in arrays.items() if v is not None}
    names = tuple(present)
    sds = tuple(jax.ShapeDtypeStruct(tuple(s), dtype) for s in out_shapes)
    host_fn = functools.partial(_host_call, op, fn, names, statics, outputs, out_shapes)
    result_shape = sds if outputs is not None else sds[0]
    return jax.pure_callback(host_fn, result_shape, *present.values(), vmap_method="expand_dims")


def _forward(op: _Op, statics: dict, arrays: dict):
    shape = op.out_shape(arrays, statics)
    if _use_dlpack(arrays):
        return _dlpack_call(op.forward, arrays, statics)
    dtype = arrays[op.arrays[0]].dtype
    out = _callback(op, op.forward, arrays, statics, None, (shape,), dtype)
    return _make_varying(out, _varying_axes(*arrays.values()))


def _backward(op: _Op, statics: dict, arrays: dict, grad_output) -> dict:
    """Gradients of every array argument (None for absent ones, zeros for ``no_grad``)."""
    want = tuple(k for k, v in arrays.items() if v is not None and k not in op.no_grad)
    args = {"grad_output": grad_output, **arrays}
    if _use_dlpack(args):
        res = _dlpack_call(op.backward, args, statics)
        got = dict(zip(want, (getattr(res, k) for k in want)))
    else:
        shapes = tuple(tuple(arrays[k].shape) for k in want)
        dtype = arrays[op.arrays[0]].dtype
        got = dict(zip(want, _callback(op, op.backward, args, statics, want, shapes, dtype)))
    for k in op.no_grad:
        if arrays[k] is not None:
            got[k] = jnp.zeros_like(arrays[k])
    axes = _varying_axes(grad_output, *arrays.values())
    return {k: _make_varying(got.get(k), axes) for k in arrays}


@functools.cache
def _differentiable(op: _Op):
    """The ``jax.custom_vjp`` function of ``op``: ``f(statics, *arrays)``, statics being a
    hashable tuple of (name, value) pairs."""

    def primal(statics, *arrays):
        return _forward(op, dict(statics), dict(zip(op.arrays, arrays)))

    def fwd(statics, *arrays):
        return primal(statics, *arrays), arrays

    def bwd(statics, arrays, g):
        grads = _backward(op, dict(statics), dict(zip(op.arrays, arrays)), g)
        return tuple(grads[k] for k in op.arrays)

    f = jax.custom_vjp(primal, nondiff_argnums=(0,))
    f.defvjp(fwd, bwd)
    return f


def _varying_axes(*arrays) -> tuple:
    """Mesh axes (inside ``shard_map``) over which any of ``arrays`` varies."""
    out: list = []
    for x in arrays:
        if x is None or not isinstance(x, jax.core.Tracer):
            continue
        aval = jax.typeof(x) if hasattr(jax, "typeof") else x.aval
        vma = getattr(aval, "vma", None)
        if vma is None:  # newer JAX: manual axis types
            vma = getattr(getattr(aval, "mat", None), "varying", ()) or ()
        out.extend(a for a in vma if a not in out)
    return tuple(out)


def _make_varying(x, axes: tuple):
    """``x`` cast to vary over ``axes`` (a no-op outside ``shard_map``)."""
    if x is None or not axes:
        return x
    missing = tuple(a for a in axes if a not in _varying_axes(x))
    if not missing:
        return x
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, missing, to="varying")
    return jax.lax.pvary(x, missing)  # type: ignore[attr-defined]  # JAX < 0.7


def _freeze(value: Any) -> Any:
    """Statics must be hashable: lists become tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _apply(op: _Op, arrays: dict, statics: dict):
    for k, v in arrays.items():
        if v is not None and not isinstance(v, jax.Array):
            arrays[k] = jnp.asarray(v)
    # Under shard_map, make every argument varying over the mesh axes any of them varies
    # over, as JAX's own primitives do implicitly; the transpose of that cast (a psum)
    # then sums the gradient of a replicated argument, outside the custom_vjp.
    axes = _varying_axes(*arrays.values())
    arrays = {k: _make_varying(v, axes) for k, v in arrays.items()}
    frozen = tuple((k, _freeze(v)) for k, v in statics.items())
    return _differentiable(op)(frozen, *(arrays[k] for k in op.arrays))


# --------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------

_CONV = _Op(
    name="deform_conv2d",
    arrays=("input", "offset", "weight", "bias", "mask"),
    ndims=dict(input=4, offset=4, weight=4, bias=1, mask=4, grad_output=4),
    forward=_api.deform_conv2d,
    backward=_api.deform_conv2d_backward,
    out_shape=_conv_out_shape,
    per_image=("input", "offset", "mask"),
)


def deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """``deformarray.deform_conv2d`` on JAX arrays, differentiable (``jax.grad``), and usable
    under ``jax.jit``, ``jax.vmap`` and ``shard_map``. Gradients flow to input, offset,
    weight, bias and mask. See docs/jax.md and docs/deform_conv2d.md."""
    arrays = dict(input=input, offset=offset, weight=weight, bias=bias, mask=mask)
    return _apply(_CONV, arrays, dict(stride=stride, padding=padding, dilation=dilation))


_ROI = (
    _Op(
        name="deform_roi_pool",
        arrays=("input", "rois", "offset", "mask"),
        ndims=dict(input=4, rois=2, offset=4, mask=4, grad_output=4),
        forward=_api.deform_roi_pool,
        backward=_api.deform_roi_pool_backward,
        out_shape=_roi_out_shape,
        no_grad=("rois",),
    )
    if hasattr(_api, "deform_roi_pool")
    else None
)


def deform_roi_pool(
    input, rois, offset=None, output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1, mask=None
):
    """``deformarray.deform_roi_pool`` on JAX arrays. Gradients flow to input, offset and
    mask; ``rois`` gets zeros. See docs/jax.md."""
    arrays = dict(input=input, rois=rois, offset=offset, mask=mask)
    statics = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma)
    return _apply(_require(_ROI, "deform_roi_pool"), arrays, statics)


_PSROI = (
    _Op(
        name="deform_psroi_pool",
        arrays=("input", "rois", "offset"),
        ndims=dict(input=4, rois=2, offset=4, grad_output=4),
        forward=_api.deform_psroi_pool,
        backward=_api.deform_psroi_pool_backward,
        out_shape=_psroi_out_shape,
        no_grad=("rois",),
    )
    if hasattr(_api, "deform_psroi_pool")
    else None
)


def deform_psroi_pool(
    input,
    rois,
    offset=None,
    *,
    output_dim,
    group_size,
    pooled_size,
    part_size=None,
    sample_per_part=4,
    trans_std=0.1,
    spatial_scale=1.0,
):
    """``deformarray.deform_psroi_pool`` on JAX arrays. Gradients flow to input and offset;
    ``rois`` gets zeros. See docs/jax.md."""
    arrays = dict(input=input, rois=rois, offset=offset)
    statics = dict(
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
        trans_std=trans_std,
        spatial_scale=spatial_scale,
    )
    return _apply(_require(_PSROI, "deform_psroi_pool"), arrays, statics)


_MSDA = _Op(
    name="ms_deform_attn",
    arrays=("value", "sampling_locations", "attention_weights"),
    ndims=dict(value=4, sampling_locations=6, attention_weights=5, grad_output=3),
    forward=_api.ms_deform_attn,
    backward=_api.ms_deform_attn_backward,
    out_shape=_msda_out_shape,
    per_image=("value", "sampling_locations", "attention_weights"),
)


def _geometry(arr: Any, name: str) -> tuple:
    """``spatial_shapes`` / ``level_start_index`` as nested tuples of ints (hashable
    statics); a traced array cannot be read, so it is refused with the way out."""
    if isinstance(arr, jax.core.Tracer):
        raise TypeError(
            f"{name} must be concrete (a list, a NumPy array or a concrete JAX array), got a traced "
            f"array: under jax.jit close over it or mark it static (static_argnames); it is the "
            f"levels' geometry, not data"
        )
    host = np.asarray(arr)
    if host.dtype == np.bool_ or not np.issubdtype(host.dtype, np.integer):
        if host.size or host.dtype == np.bool_:
            raise TypeError(f"{name} must hold integers, got dtype {host.dtype}")
        host = host.astype(np.int64)
    return _freeze(host.tolist())


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """``deformarray.ms_deform_attn`` on JAX arrays: differentiable, usable under ``jax.jit``
    and ``jax.vmap``. Gradients flow to value, sampling_locations and attention_weights;
    spatial_shapes and level_start_index must be concrete. See docs/ms_deform_attn.md."""
    arrays = dict(value=value, sampling_locations=sampling_locations, attention_weights=attention_weights)
    statics = dict(
        spatial_shapes=_geometry(spatial_shapes, "spatial_shapes"),
        level_start_index=_geometry(level_start_index, "level_start_index"),
    )
    return _apply(_MSDA, arrays, statics)


def _require(op: _Op | None, name: str) -> _Op:
    if op is None:
        raise NotImplementedError(f"this deformarray build has no {name} in its array API")
    return op
