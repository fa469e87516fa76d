"""Comparison helpers shared by the CPU operator tests."""

from __future__ import annotations

import threading
import tracemalloc

import numba
import numpy as np
import pytest

import deformarray as da

DTYPES = [np.float64, np.float32]
# relative tolerance per dtype, scaled by the expected array's largest magnitude
REL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def assert_close(actual, expected, dtype, name, rel=None):
    """Relative comparison scaled by the expected array's largest magnitude; also checks
    that ``actual`` is a NumPy array of ``dtype`` and of the expected shape (or None)."""
    dtype = np.dtype(dtype)
    if expected is None:
        assert actual is None, f"{name}: expected None, got {type(actual)}"
        return
    assert isinstance(actual, np.ndarray), f"{name}: not a numpy array ({type(actual)})"
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, expected {expected.shape}"
    rel = REL[dtype] if rel is None else rel
    scale = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rel, atol=rel * scale, err_msg=name)


# Non-contiguous views with the same values, for the layout tests of every operator.


def transposed_view(a):
    """Same values, non-contiguous (last two axes stored swapped)."""
    if a.ndim < 2:
        return strided_view(a)
    axes = list(range(a.ndim))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    v = np.ascontiguousarray(a.transpose(axes)).transpose(axes)
    assert not v.flags.c_contiguous or min(a.shape[-2:]) <= 1
    return v


def strided_view(a):
    """Same values, every axis strided by 2 inside a larger buffer."""
    big = np.full(tuple(2 * s for s in a.shape), np.nan, dtype=a.dtype)
    sl = tuple(slice(None, None, 2) for _ in a.shape)
    big[sl] = a
    v = big[sl]
    assert not v.flags.c_contiguous
    return v


def reversed_view(a):
    """Same values through negative strides on every axis."""
    flip = tuple(slice(None, None, -1) for _ in a.shape)
    return np.ascontiguousarray(a[flip])[flip]


# the layouts of the operators' non-contiguous input tests
VIEWS = pytest.mark.parametrize(
    "make_view",
    [transposed_view, strided_view, reversed_view, np.asfortranarray],
    ids=["transposed", "strided", "reversed", "fortran"],
)


# Determinism, threads and workspace checks of an operator's forward and backward
# (``run_forward(case)``, ``run_backward(grad_output, case, **extra)``; the gradients a tuple).


def same_bits(a, b):
    """Every array of the tuples ``a`` and ``b`` has the same bytes."""
    return all(x.tobytes() == y.tobytes() for x, y in zip(a, b))


def check_bitwise_deterministic(run_forward, run_backward, c, rng):
    """Same bits on every run, with one thread or all, and with deterministic=False (the CPU
    backend always is); every gradient nonzero somewhere."""
    y = run_forward(c)
    go = rng.standard_normal(y.shape)
    first = run_backward(go, c)
    assert same_bits(run_backward(go, c), first) and run_forward(c).tobytes() == y.tobytes()
    assert same_bits(run_backward(go, c, deterministic=False), first)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run_backward(go, c)
        y_single = run_forward(c)
    finally:
        numba.set_num_threads(threads)
    assert same_bits(single, first) and y_single.tobytes() == y.tobytes()
    assert all(np.abs(a).max() > 0 for a in first)


def check_calls_from_threads(run_forward, run_backward, c, rng):
    """Four threads calling forward and backward together get the bits of a call alone."""
    y = run_forward(c)
    go = rng.standard_normal(y.shape)
    want = run_backward(go, c)
    start = threading.Barrier(4)
    got: dict[int, tuple] = {}

    def call(i):
        start.wait(60)
        got[i] = (run_forward(c), run_backward(go, c))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join(300) for t in threads]
    assert len(got) == 4
    for yi, gi in got.values():
        assert yi.tobytes() == y.tobytes() and same_bits(gi, want)


def traced_peak(fn):
    """``(fn(), peak of traced memory during it)``, the workspace released first."""
    da.release_workspace()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - start


# Shared test bodies of the sampling operators (dcnv3, ms_deform_attn): ``grads`` is a named
# tuple of the gradients, in ``grad_names`` order.


def check_against_reference(run_forward, run_backward, ref_forward, ref_backward, grads_type, c, rng, dtype):
    """Forward and every gradient against the float64 reference; returns (y, grads)."""
    y = run_forward(c)
    assert_close(y, ref_forward(**c), dtype, "output")
    assert y.flags.c_contiguous
    go = rng.standard_normal(y.shape).astype(dtype)
    grads = run_backward(go, c)
    assert isinstance(grads, grads_type)
    ref = ref_backward(go, **c)
    for name in grads_type._fields:
        got = getattr(grads, name)
        assert got.shape == c[name].shape and got.flags.c_contiguous, name
        assert_close(got, getattr(ref, name), dtype, f"grad {name}")
    return y, grads


def check_non_contiguous_inputs(run_forward, run_backward, c, rng, dtype, make_view, names):
    """The arrays ``names`` of case ``c`` (and the output gradient) as ``make_view`` views:
    the bits of the contiguous call."""
    y = run_forward(c)
    go = rng.standard_normal(y.shape).astype(dtype)
    grads = run_backward(go, c)
    view = dict(c, **{k: make_view(c[k]) for k in names})
    for k in names:
        assert np.array_equal(view[k], c[k])
    assert run_forward(view).tobytes() == y.tobytes()
    grads_v = run_backward(make_view(go), view)
    for name in grads._fields:
        assert getattr(grads_v, name).tobytes() == getattr(grads, name).tobytes(), name


def check_channel_blocks(monkeypatch, cpu_module, run_forward, run_backward, c, rng, grad_name):
    """``cpu_module._blocks`` forced from one block of channels to one channel per block:
    gradient ``grad_name`` keeps its bits (and is nonzero somewhere)."""
    go = rng.standard_normal(run_forward(c).shape)
    seen = []
    for blocks in (1, 2, 3, 5, 7):
        monkeypatch.setattr(cpu_module, "_blocks", lambda *shape, b=blocks: b)
        seen.append(getattr(run_backward(go, c), grad_name))
    assert np.abs(seen[0]).max() > 0
    for blocks, grad in zip((2, 3, 5, 7), seen[1:]):
        assert grad.tobytes() == seen[0].tobytes(), blocks


def check_no_workspace(run_forward, run_backward, c, go, slack=16 * 1024):
    """Under a 1 KiB workspace bound, the traced peak of forward and backward is their
    outputs plus ``slack`` of bookkeeping."""
    with da.workspace_limit(1024):
        y, peak_f = traced_peak(lambda: run_forward(c))
        grads, peak_b = traced_peak(lambda: run_backward(go, c))
    assert peak_f <= y.nbytes + slack, peak_f
    assert peak_b <= sum(getattr(grads, n).nbytes for n in grads._fields) + slack, peak_b


# The emulated CUDA kernels' tests (test_cuda_*_emulated.py): dtypes by name, 16-bit included.


def dtype_of(name):
    """``np.dtype(name)``, bfloat16 through ml_dtypes (skip without it)."""
    if name == "bfloat16":
        return np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    return np.dtype(name)


def close(got, want, tol, what):
    """Any float arrays (16-bit too) compared in float64, relative to ``want``'s largest
    magnitude (at least 1)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


def masked(a):
    """``a`` as a numpy.ma.MaskedArray that masks nothing."""
    return np.ma.masked_array(a, mask=np.zeros(a.shape, bool))


def check_masked_array_raises(name, args, out_shape, forward, backward):
    """``name`` (an argument of ``forward(**args)`` / ``backward(grad_output, **args)``, or
    grad_output) as a numpy.ma.MaskedArray: TypeError naming it and the ways out (its mask
    would otherwise be ignored, silently)."""
    grad_output = np.ones(out_shape)
    if name == "grad_output":
        grad_output = masked(grad_output)
    else:
        args[name] = masked(args[name])
    message = rf"^{name} is a numpy masked array.*{name}\.filled\(0\).*np\.asarray"
    with pytest.raises(TypeError, match=message):
        backward(grad_output, **args)
    if name != "grad_output":
        with pytest.raises(TypeError, match=message):
            forward(**args)
