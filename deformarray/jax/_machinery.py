"""The machinery every JAX operator shares: an operator description (``Op``), the call
paths (DLPack for eager GPU arrays; ``jax.experimental.buffer_callback`` otherwise, on XLA's
own buffers: NumPy views on the CPU, CuPy views on XLA's stream on a GPU; ``jax.pure_callback``
where JAX has no buffer_callback or a GPU has no CuPy; vmap's extra axes handled in the
callback), the ``custom_vjp`` built once per operator, and ``shard_map``'s varying axes.
Operator modules describe their operator and call ``apply``; no maths here. See the package
docstring for the paths."""

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
# Calling the array API: DLPack (GPU, eager), jax.experimental.buffer_callback (everything
# else), or jax.pure_callback (JAX without buffer_callback, or a GPU without CuPy)
# --------------------------------------------------------------------------------------

_buffer_callback: Callable[..., Any] | None
try:  # JAX >= 0.6.1
    from jax.experimental import buffer_callback as _bc

    _buffer_callback = _bc.buffer_callback
except ImportError:  # pragma: no cover - older JAX: pure_callback only
    _buffer_callback = None

_HALF = ("float16", "bfloat16")  # computed in float32 by the CPU backend, cast back
_DL_CPU, _DL_CUDA, _DL_ROCM = 1, 2, 10  # DLPack device types


def _dlpack_call(fn: Callable, arrays: dict, statics: dict):
    import cupy

    cp = {k: (None if v is None else cupy.from_dlpack(v)) for k, v in arrays.items()}
    out = fn(**cp, **statics)
    return jax.tree_util.tree_map(jax.dlpack.from_dlpack, out)


def _leading(op: Op, name: str, arr: Any) -> tuple:
    nd = op.ndims[name]
    return arr.shape[: arr.ndim - nd]


def _bits(a: Any) -> Any:
    """``a`` viewed as unsigned integers of its item size: data movement (broadcast,
    reshape, copy) that needs no arithmetic, so that it works for every dtype, even one
    for which CuPy has no kernels (bfloat16)."""
    return a.view(f"u{a.dtype.itemsize}")


def _compute(op: Op, fn: Callable, statics: dict, outputs: tuple | None, out_shapes: tuple, xp: Any, arrays: dict):
    """Runs ``fn`` (forward or backward of ``op``) on ``arrays`` (NumPy or CuPy arrays,
    ``xp`` their module), returning a tuple of results, one per output (a single one when
    ``outputs`` is None, else the listed fields of the returned named tuple), each of shape
    ``batch + out_shape``. Extra leading axes come from ``vmap_method="expand_dims"``: they
    broadcast against each other (unbatched arguments carry axes of size 1)."""
    batch = np.broadcast_shapes(*(_leading(op, k, v) for k, v in arrays.items()))

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
        return one(arrays)
    if (
        outputs is None
        and op.per_image
        and 0 not in batch
        and all(_leading(op, k, v) == (1,) * len(batch) for k, v in arrays.items() if k not in op.per_image)
    ):
        # only per-image arrays are vmapped: fold the vmapped axes into N, one call
        nb = int(np.prod(batch))
        folded = {}
        for k, v in arrays.items():
            core = v.shape[v.ndim - op.ndims[k] :]
            if k in op.per_image:
                v = xp.broadcast_to(_bits(v), batch + core).reshape((nb * core[0],) + core[1:]).view(v.dtype)
            else:
                v = v.reshape(core)
            folded[k] = v
        (out,) = one(folded)
        return (out.reshape(batch + (out.shape[0] // nb,) + out.shape[1:]),)
    # general case: one call per vmapped element
    dtype = arrays[next(iter(arrays))].dtype
    results = [xp.empty(batch + tuple(s), dtype=f"u{dtype.itemsize}") for s in out_shapes]  # as bits
    for idx in np.ndindex(*batch):
        args = {}
        for k, v in arrays.items():
            lead = _leading(op, k, v)
            args[k] = v[tuple(i if n > 1 else 0 for i, n in zip(idx, lead))]
        for dst, src in zip(results, one(args)):
            dst[idx] = _bits(src)
    return tuple(r.view(dtype) for r in results)


def _host_compute(op: Op, fn: Callable, statics: dict, outputs, out_shapes: tuple, host: dict) -> tuple:
    """``_compute`` on NumPy arrays by the CPU backend; float16 and bfloat16 (which it does
    not have) are computed in float32 and the results cast back, as the torch adapter does."""
    dtype = np.dtype(next(iter(host.values())).dtype)
    if dtype.name in _HALF:
        host = {k: v.astype(np.float32) for k, v in host.items()}
    res = _compute(op, fn, statics, outputs, out_shapes, np, host)
    return tuple(r.astype(dtype, copy=False) for r in res)


def _host_call(op: Op, fn: Callable, names: tuple, statics: dict, outputs: tuple, out_shapes: tuple, *arrays):
    """The ``jax.pure_callback`` target: ``arrays`` (named by ``names``) are host arrays;
    returns the result (a tuple of them when ``outputs`` is given)."""
    host = {k: np.asarray(v) for k, v in zip(names, arrays)}
    res = _host_compute(op, fn, statics, outputs, out_shapes, host)
    return res if outputs is not None else res[0]


def _buffer_call(op: Op, fn: Callable, names: tuple, statics: dict, outputs, out_shapes: tuple, ctx, out, *args):
    """The ``buffer_callback`` target: ``args`` (named by ``names``) and ``out`` (a tuple,
    one per output) are XLA's own buffers, on the host (CPU platform: NumPy views, the CPU
    backend, results copied into ``out``) or on a GPU (CuPy views on XLA's stream, the CUDA
    backend; see ``_gpu_buffer_call``)."""
    kind = int(args[0].__dlpack_device__()[0])
    if kind == _DL_CPU:
        host = {k: np.asarray(v) for k, v in zip(names, args)}
        res = _host_compute(op, fn, statics, outputs, out_shapes, host)
        for dst, src in zip(out, res):
            np.copyto(np.asarray(dst), src.reshape(dst.shape))
    elif kind in (_DL_CUDA, _DL_ROCM):
        _gpu_buffer_call(op, fn, names, statics, outputs, out_shapes, ctx, out, args)
    else:  # pragma: no cover - buffer_callback lowers for the CPU and GPUs only
        raise RuntimeError(f"deformarray.jax: buffers on an unknown device type {kind}")


# ---- GPU buffers: CuPy views of XLA's memory, kernels on XLA's stream (unrun here) ----

_capsule_pointer = None


def _buffer_pointer(buf: Any) -> int:
    """Device address of a GPU ``Buffer``: from ``__cuda_array_interface__``, or, for a
    dtype that it cannot describe (bfloat16 on some versions), from the ``data`` field of
    the DLPack tensor (the first field of ``DLManagedTensor``'s ``DLTensor``)."""
    try:
        return int(buf.__cuda_array_interface__["data"][0])
    except Exception:
        pass
    import ctypes

    global _capsule_pointer
    if _capsule_pointer is None:
        proto = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)
        _capsule_pointer = proto(("PyCapsule_GetPointer", ctypes.pythonapi))
    capsule = buf.__dlpack__()  # not consumed: its destructor frees the descriptor only
    managed = _capsule_pointer(capsule, b"dltensor")
    return int(ctypes.c_void_p.from_address(managed).value or 0)


def _cupy_view(cupy: Any, buf: Any, ordinal: int) -> Any:
    """A CuPy array on ``buf``'s memory (no copy; XLA keeps ownership). Built as unsigned
    integers and viewed as the dtype, as the torch adapter does for bfloat16."""
    shape = tuple(int(s) for s in buf.shape)
    dtype = np.dtype(buf.dtype)
    bits = f"u{dtype.itemsize}"
    size = int(np.prod(shape)) * dtype.itemsize
    if size == 0:
        return cupy.empty(shape, bits).view(dtype)
    ptr = _buffer_pointer(buf)
    try:  # the device that holds the pointer, as CUDA reports it
        mem = cupy.cuda.UnownedMemory(ptr, size, buf)
    except Exception:  # pointer attributes unavailable: XLA's device ordinal
        mem = cupy.cuda.UnownedMemory(ptr, size, buf, ordinal)
    return cupy.ndarray(shape, bits, cupy.cuda.MemoryPointer(mem, 0)).view(dtype)


def _xla_stream(ctx: Any) -> int:
    stream = ctx.stream  # a property (JAX 0.10); a method in the first versions
    return int(stream() if callable(stream) else stream)


def _gpu_buffer_call(op: Op, fn: Callable, names: tuple, statics: dict, outputs, out_shapes: tuple, ctx, out, args):
    """GPU buffers: wrapped as CuPy arrays (no copy), the CUDA backend run with XLA's
    stream as CuPy's current stream, so its kernels (and CuPy's allocations, from CuPy's
    pool, per stream) are ordered with XLA's work; the results are copied into XLA's output
    buffers on that stream (device to device). Nothing waits for the GPU here."""
    try:
        import cupy
    except Exception as exc:
        raise RuntimeError(
            "deformarray.jax needs CuPy to run on a GPU under jax.jit (pip install cupy-cuda12x)"
        ) from exc
    try:
        ordinal = int(ctx.device_ordinal)
    except Exception:  # not exposed by this JAX
        ordinal = -1
    views = {k: _cupy_view(cupy, v, ordinal) for k, v in zip(names, args)}
    dests = [_cupy_view(cupy, o, ordinal) for o in out]
    device = next((v.device for v in [*views.values(), *dests] if v.size), cupy.cuda.Device())
    with device:
        try:
            stream = cupy.cuda.ExternalStream(_xla_stream(ctx), device.id)
        except TypeError:  # older CuPy: no device argument
            stream = cupy.cuda.ExternalStream(_xla_stream(ctx))
        with stream:
            res = _compute(op, fn, statics, outputs, out_shapes, cupy, views)
            for dst, src in zip(dests, res):
                if dst.size == 0:
                    continue
                if src.dtype != dst.dtype:  # not expected: the CUDA backend keeps the dtype
                    src = src.astype(dst.dtype)
                bits = cupy.ascontiguousarray(_bits(src).reshape(dst.shape))  # no copy if contiguous
                dst.data.copy_from_device_async(bits.data, dst.nbytes, stream)


def _gpu_platforms() -> set:
    try:
        return {d.platform for d in jax.devices()} & {"gpu", "cuda", "rocm"}
    except Exception:  # pragma: no cover - no backend at all
        return set()


def _cupy_importable() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


def callback_path() -> str:
    """Which callback a traced call takes: ``"buffer_callback"`` (JAX >= 0.6.1: XLA's own
    buffers, on the CPU or, with CuPy, on a GPU) or ``"pure_callback"`` (older JAX, or a GPU
    without CuPy: host arrays, a host round trip on a GPU)."""
    if _buffer_callback is None:
        return "pure_callback"
    if _gpu_platforms() and not _cupy_importable():
        return "pure_callback"
    return "buffer_callback"


def _callback(op: Op, fn: Callable, arrays: dict, statics: dict, outputs, out_shapes, dtype):
    present = {k: v for k, v in arrays.items() if v is not None}
    names = tuple(present)
    sds = tuple(jax.ShapeDtypeStruct(tuple(s), dtype) for s in out_shapes)
    if callback_path() == "buffer_callback" and _buffer_callback is not None:
        target = functools.partial(_buffer_call, op, fn, names, statics, outputs, out_shapes)
        res = _buffer_callback(target, sds, vmap_method="expand_dims")(*present.values())
        return tuple(res) if outputs is not None else res[0]
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


def checked_specs(arrays: dict) -> dict:
    """Every operator's first shape check: the arrays' stand-ins (``specs``), once their
    dtypes pass ``check_dtypes``."""
    check_dtypes(arrays)
    return specs(arrays)


def check_dtypes(arrays: dict) -> None:
    """The array API's dtype check, for the backend the call will take. On the host,
    float16 and bfloat16 are computed in float32 (``_host_compute``): when every array has
    the same one of them, the CPU backend's check sees float32."""
    s = specs(arrays)
    if _on_host(arrays):
        names = {v.dtype.name for v in s.values() if v is not None}
        if len(names) == 1 and names <= set(_HALF):
            for v in s.values():
                if v is not None:
                    v.dtype = np.dtype(np.float32)
    _validate.check_dtypes("numpy" if _on_host(arrays) else "cupy", **s)
