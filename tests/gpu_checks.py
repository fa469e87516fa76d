"""Helpers shared by the CuPy tests of the operators (test_cuda_*.py without ``_emulated``;
they need a CUDA GPU): dtypes by name, host <-> device copies, the relative comparison.
CuPy is imported inside the helpers: the test modules skip themselves without it."""

from __future__ import annotations

import numpy as np
import pytest

TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2}
DTYPES = ["float64", "float32", "float16", "bfloat16"]
MODES = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])


def bfloat16():
    """ml_dtypes' bfloat16, or skip when it or this CuPy's support is missing."""
    import cupy

    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = np.dtype(ml_dtypes.bfloat16)
    try:
        cupy.asarray(np.zeros(2, dtype=dt))
    except Exception as exc:  # CuPy < 14 has no bfloat16
        pytest.skip(f"this CuPy has no bfloat16 arrays: {exc}")
    return dt


def dtype_of(name):
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def to_gpu(a, dtype):
    import cupy

    return None if a is None else cupy.asarray(np.asarray(a).astype(dtype))


def to_host64(a):
    import cupy

    if a is None:
        return None
    return cupy.asnumpy(a).astype(np.float64) if isinstance(a, cupy.ndarray) else np.asarray(a, np.float64)


def assert_close(got, want, tol, what):
    """Relative to ``want``'s largest magnitude (at least 1); None must match None."""
    if want is None:
        assert got is None, what
        return
    got, want = to_host64(got), to_host64(want)
    assert got.shape == want.shape, what
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=what)


def check_chunked_equals_unchunked(run, dtype, limits=(1, 20_000, 200_000)):
    """``run()`` -> (output, gradients) under each workspace limit against the unbounded run:
    float64 to 1e-12, the others to 2e-3 (the chunks sum in another order)."""
    import deformarray as da

    full = run()
    tol = 1e-12 if dtype == "float64" else 2e-3
    for limit in limits:
        with da.workspace_limit(limit):
            chunked = run()
        assert_close(chunked[0], full[0], tol, f"output, limit {limit}")
        for g, f in zip(chunked[1], full[1]):
            assert_close(g, f, tol, f"grads, limit {limit}")


def strided(a, dtype):
    """``a`` as ``dtype`` on the GPU, every axis strided by 2 inside a larger buffer."""
    import cupy

    big = cupy.zeros(tuple(2 * s for s in a.shape), dtype=dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = cupy.asarray(np.asarray(a).astype(dtype))
    assert not view.flags.c_contiguous
    return view
