"""The machinery every JAX operator shares: an operator description (``Op``), the call
paths (DLPack for eager GPU arrays, ``jax.pure_callback`` otherwise, with vmap's extra axes
handled on the host), the ``custom_vjp`` built once per operator, and ``shard_map``'s
varying axes. Operator modules describe their operator and call ``apply``; no maths here.
See the package docstring for the paths."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate

# --------------------------------------------------------------------------------------
# Operator descriptions: everything the generic machinery needs to know about one operator
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # hashed by identity (lru_cache below)
class Op:
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


def specs(arrays: dict) -> dict:
    return {k: (None if v is None else _Spec(v)) for k, v in arrays.items()}


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


def _leading(op: Op, name: str, arr: np.ndarray) -> tuple:
    nd = op.ndims[name]
    return arr.shape[: arr.ndim - nd]


def _host_call(op: Op, fn: Callable, names: tuple, statics: dict, outputs: tuple, out_shapes: tuple, *arrays):
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


def _callback(op: Op, fn: Callable, arrays: dict, statics: dict, outputs, out_shapes, dtype):
    present = {k: v for k, v in arrays.items() if v is not None}
    names = tuple(present)
    sds = tuple(jax.ShapeDtypeStruct(tuple(s), dtype) for s in out_shapes)
    host_fn = functools.partial(_host_call, op, fn, names, statics, outputs, out_shapes)
    result_shape = sds if outputs is not None else sds[0]
    return jax.pure_callback(host_fn, result_shape, *present.values(), vmap_method="expand_dims")


def _forward(op: Op, statics: dict, arrays: dict):
    shape = op.out_shape(arrays, statics)
    if _use_dlpack(arrays):
        return _dlpack_call(op.forward, arrays, statics)
    dtype = arrays[op.arrays[0]].dtype
    out = _callback(op, op.forward, arrays, statics, None, (shape,), dtype)
    return _make_varying(out, _varying_axes(*arrays.values()))


def _backward(op: Op, statics: dict, arrays: dict, grad_output) -> dict:
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
def _differentiable(op: Op):
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


def freeze(value: Any) -> Any:
    """Statics must be hashable: lists become tuples."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def apply(op: Op, arrays: dict, statics: dict):
    for k, v in arrays.items():
        if v is not None and not isinstance(v, jax.Array):
            arrays[k] = jnp.asarray(v)
    # Under shard_map, make every argument varying over the mesh axes any of them varies
    # over, as JAX's own primitives do implicitly; the transpose of that cast (a psum)
    # then sums the gradient of a replicated argument, outside the custom_vjp.
    axes = _varying_axes(*arrays.values())
    arrays = {k: _make_varying(v, axes) for k, v in arrays.items()}
    frozen = tuple((k, freeze(v)) for k, v in statics.items())
    return _differentiable(op)(frozen, *(arrays[k] for k in op.arrays))


def check_dtypes(arrays: dict) -> None:
    """The array API's dtype check, for the backend the call will take."""
    _validate.check_dtypes("numpy" if _on_host(arrays) else "cupy", **specs(arrays))
