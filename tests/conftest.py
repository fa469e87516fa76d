"""Shared fixtures, and the skip rule for tests marked ``gpu``.

The markers ``gpu`` and ``slow`` are declared in pyproject.toml. A test marked ``gpu``
is skipped, with the reason, when CuPy cannot be imported or no CUDA device is usable.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import reference


@functools.cache
def gpu_unavailable_reason():
    """None when CuPy imports and sees at least one CUDA device, else why not."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising on import
        return f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError when there is no driver / device
        return f"no usable CUDA device (getDeviceCount raised {type(exc).__name__}: {exc})"
    if count == 0:
        return "no usable CUDA device (getDeviceCount() returned 0)"
    return None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"gpu test skipped: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's id, so every test is reproducible."""
    seed = sum(ord(ch) * (i + 1) for i, ch in enumerate(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)


@pytest.fixture
def make_case(rng):
    """``make_case(**geometry)`` -> a random ``reference.Case`` drawn from ``rng``."""
    return functools.partial(reference.make_case, rng)


@pytest.fixture
def restore_threads():
    """bench sets Numba's (and torch's) thread count: give other tests theirs back."""
    import sys

    import numba

    torch = sys.modules.get("torch")
    before = numba.get_num_threads(), torch.get_num_threads() if torch else None
    yield
    numba.set_num_threads(before[0])
    if torch is not None and before[1] is not None:
        torch.set_num_threads(before[1])


@pytest.fixture
def fake_cupy(monkeypatch):
    """A stand-in ``cupy`` module in sys.modules, so the mixed-backend checks run on the CPU;
    its arrays have ``.get()`` (a device -> host copy)."""
    import sys
    import types

    class ndarray:
        def __init__(self, a):
            self._a = np.asarray(a)
            self.shape = self._a.shape
            self.dtype = self._a.dtype
            self.ndim = self._a.ndim

        def get(self):
            return self._a.copy()

    mod = types.ModuleType("cupy")
    mod.ndarray = ndarray
    monkeypatch.setitem(sys.modules, "cupy", mod)
    return mod


@pytest.fixture(scope="module")
def jax_x64():
    """float64 in JAX for a module's numerical checks; restored afterwards so that other
    test modules in the same process see JAX's default."""
    jax = pytest.importorskip("jax")
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)
