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
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=rel, atol=rel * scale,
                               err_msg=name)
