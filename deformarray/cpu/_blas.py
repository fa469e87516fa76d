"""Matrix products split over our own threads, with the BLAS library single-threaded.

Why: OpenBLAS's worker threads spin for a while after each product. On a machine with
few cores they then compete with the Numba kernel that follows, which ran up to 2x
slower in our measurements (2 cores: the forward of a 16-channel 128x128 image took
6-8 ms instead of 3.8 ms). Running each product's slices on a small thread pool with the
BLAS library limited to one thread keeps the products as fast as BLAS's own threading
(measured: same time within noise) and leaves no spinning threads behind.

``threadpoolctl`` does the limiting; where it is missing, products run on BLAS's own
threads as usual.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np

_lock = threading.Lock()
_state: dict[str, Any] = {"controller": None, "pool": None, "checked": False}


def _controller() -> Any:
    with _lock:
        if not _state["checked"]:
            _state["checked"] = True
            try:
                from threadpoolctl import ThreadpoolController

                _state["controller"] = ThreadpoolController()
            except Exception:
                _state["controller"] = None
        return _state["controller"]


def _pool() -> ThreadPoolExecutor:
    with _lock:
        if _state["pool"] is None:
            _state["pool"] = ThreadPoolExecutor(
                max_workers=max(1, numba.config.NUMBA_NUM_THREADS - 1),
                thread_name_prefix="deformarray-blas",
            )
        return _state["pool"]


@contextmanager
def own_threads() -> Iterator[int]:
    """Limit BLAS to one thread for the block; yields how many parts to split products
    into (Numba's thread count, or 1 when BLAS could not be limited)."""
    ctl = _controller()
    if ctl is None:
        yield 1
        return
    with ctl.limit(limits=1, user_api="blas"):
        yield numba.get_num_threads()


def run_split(fn: Callable[[int, int], None], n: int, parts: int) -> None:
    """Call ``fn(lo, hi)`` on ``parts`` consecutive ranges of [0, n), in parallel."""
    parts = min(parts, n)
    if parts <= 1:
        fn(0, n)
        return
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [_pool().submit(fn, bounds[i], bounds[i + 1]) for i in range(1, parts)]
    fn(bounds[0], bounds[1])  # the calling thread takes the first range
    for f in futures:
        f.result()


def split_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, axis: int, parts: int) -> None:
    """``np.matmul(a, b, out=out)`` with the work split along one axis of ``out``:
    0 (a batch axis, sliced in every operand that has it), -1 (columns: slices ``b``)
    or -2 (rows: slices ``a``). Each output element is computed by one BLAS call."""

    def part(lo: int, hi: int) -> None:
        if axis == 0:
            aa = a[lo:hi] if a.ndim == out.ndim else a
            bb = b[lo:hi] if b.ndim == out.ndim else b
            np.matmul(aa, bb, out=out[lo:hi])
        elif axis == -1:
            np.matmul(a, b[..., lo:hi], out=out[..., lo:hi])
        else:
            np.matmul(a[..., lo:hi, :], b, out=out[..., lo:hi, :])

    run_split(part, out.shape[axis], parts)


__all__ = ["own_threads", "run_split", "split_matmul"]
