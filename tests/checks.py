"""Comparison helpers shared by the CPU operator tests."""

from __future__ import annotations

import numpy as np

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
