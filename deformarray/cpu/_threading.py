"""Numba's threading layer: TBB where it is installed, so that forked processes work.

Why: Numba's default layer on Linux is GNU OpenMP, and libgomp cannot be used again in a
child forked after the parent used it: Numba then kills the child ("fork() called from a
process already using GNU OpenMP, this is unsafe"). ``multiprocessing.Pool`` with fork
(Python's default on Linux before 3.14) hung and a PyTorch DataLoader with workers died at
its second epoch. TBB is fork-safe and thread-safe.

The ``tbb`` wheel (a dependency on Linux x86-64, the platform it exists for) puts
``libtbb.so.12`` in the environment's ``lib/``, where Numba's TBB pool does not look;
loading it first (``RTLD_GLOBAL``) lets the pool find it by name. This runs at
``import deformarray``, before any parallel kernel; it chooses nothing when the user did
(``NUMBA_THREADING_LAYER`` or ``numba.config.THREADING_LAYER``) or when Numba's threads
already run (their layer is fixed for the process).

Without TBB, a child forked from a parent that used GNU OpenMP gets a RuntimeError that
says what to do, instead of being killed.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import os
import sys

import numba

_state: dict[str, str | None] = {"chosen": None, "layer_at_fork": None}


def _launched_layer() -> str | None:
    """The layer Numba's threads run on, or None before the first parallel kernel."""
    try:
        return str(numba.threading_layer())
    except ValueError:
        return None


def _load_tbb() -> bool:
    """Load the ``tbb`` wheel's libtbb.so.12 globally and check Numba's TBB pool imports."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        files = importlib.metadata.files("tbb") or []
        dist = importlib.metadata.distribution("tbb")
    except importlib.metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name == "libtbb.so.12":
            try:
                ctypes.CDLL(str(dist.locate_file(f)), mode=ctypes.RTLD_GLOBAL)
                importlib.import_module("numba.np.ufunc.tbbpool")  # fails if libtbb is unusable
            except (OSError, ImportError):
                return False
            return True
    return False


def configure() -> str | None:
    """Choose TBB when nothing else is chosen and it loads; returns the layer chosen here
    (None: Numba's own choice stands). Registers the fork check once."""
    if _state["chosen"] is None:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _state["chosen"] = ""
        user_choice = os.environ.get("NUMBA_THREADING_LAYER") or numba.config.THREADING_LAYER != "default"
        # loaded whatever the choice: a user's NUMBA_THREADING_LAYER=tbb needs it too
        tbb = _launched_layer() is None and _load_tbb()
        if tbb and not user_choice:
            numba.config.THREADING_LAYER = "tbb"
            _state["chosen"] = "tbb"
    return _state["chosen"] or None


def _after_fork_in_child() -> None:
    _state["layer_at_fork"] = _launched_layer()


def _gnu_openmp() -> bool:
    try:
        omppool = importlib.import_module("numba.np.ufunc.omppool")
        return str(getattr(omppool, "openmp_vendor", "GNU")) == "GNU"
    except ImportError:
        return False


def check_fork_safe() -> None:
    """Raise a RuntimeError in a child forked from a parent whose kernels ran on GNU
    OpenMP (a kernel call would kill the process)."""
    if _state["layer_at_fork"] == "omp" and _gnu_openmp():
        raise RuntimeError(
            "deformarray: this process was forked from one whose CPU kernels already ran on Numba's GNU OpenMP "
            "threading layer, which cannot run again after fork(). Install TBB (`pip install tbb`; deformarray "
            "then uses it, and forked processes work), or start workers with the 'spawn' or 'forkserver' method "
            "(multiprocessing.set_start_method, or DataLoader(multiprocessing_context='spawn'))."
        )
