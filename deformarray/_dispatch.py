"""Backend dispatch: the type of the array arguments picks the implementation.

``numpy.ndarray`` -> ``deformarray.cpu`` (Numba); ``cupy.ndarray`` -> ``deformarray.cuda``.
CuPy is never imported here: an array can only be a CuPy array if the caller already
imported CuPy, so looking in ``sys.modules`` is enough and keeps CuPy optional.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import numpy as np

_BACKEND_PACKAGES = {"numpy": "deformarray.cpu", "cupy": "deformarray.cuda"}


def _array_backend(name: str, arr: Any) -> str:
    if isinstance(arr, np.ndarray):
        return "numpy"
    cupy = sys.modules.get("cupy")
    if cupy is not None and isinstance(arr, cupy.ndarray):
        return "cupy"
    hint = ""
    mod = type(arr).__module__.split(".")[0]
    if mod in ("torch", "jax", "jaxlib"):
        hint = f" (for {mod} tensors use deformarray.{'jax' if mod != 'torch' else 'torch'})"
    raise TypeError(
        f"{name} must be a numpy.ndarray or cupy.ndarray, got {type(arr).__module__}.{type(arr).__qualname__}{hint}"
    )


def backend_of(required: dict[str, Any], optional: dict[str, Any] | None = None) -> str:
    """Name of the backend shared by all arrays; ``None`` is allowed only among ``optional``.

    Mixed backends, unknown array types or a missing required array raise TypeError.
    """
    found: dict[str, str] = {}
    for name, arr in required.items():
        if arr is None:
            raise TypeError(f"{name} is required: pass a numpy.ndarray or cupy.ndarray, not None")
        found[name] = _array_backend(name, arr)
    for name, arr in (optional or {}).items():
        if arr is not None:
            found[name] = _array_backend(name, arr)
    kinds = set(found.values())
    if len(kinds) > 1:
        detail = ", ".join(f"{k} is {v}" for k, v in found.items())
        raise TypeError(f"all arrays must live on one backend, got {detail}")
    return kinds.pop()


def operator_module(backend: str, operator: str) -> ModuleType:
    """Import ``deformarray.<cpu|cuda>.<operator>`` lazily (CUDA code loads on first GPU call).

    For the CPU, first checks that this process can run Numba's threads (not a child
    forked after GNU OpenMP ran: ``cpu._threading``)."""
    if backend == "numpy":
        from .cpu import _threading

        _threading.check_fork_safe()
    return importlib.import_module(f"{_BACKEND_PACKAGES[backend]}.{operator}")
