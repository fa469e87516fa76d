"""The CPU workspace: one arena per thread, kept between calls.

Page-faulting tens of MiB of fresh buffers on every call cost up to a third of a forward
pass in our measurements, so each thread keeps one byte arena and carves a call's
temporary arrays out of it. A call asks for the arena once, with the total of its largest
chunk (which the chunk planner keeps within the workspace bound), so the arena never
holds more than the largest single call needed. ``release_workspace()`` frees it.
"""

from __future__ import annotations

import math
import threading

import numpy as np

_ALIGN = 64  # cache-line (and AVX-512) alignment of every carved array


def nbytes(shape: tuple[int, ...], dtype) -> int:
    """Bytes an array of this shape and dtype takes in the arena, alignment included."""
    n = math.prod(shape) * np.dtype(dtype).itemsize
    return -(-n // _ALIGN) * _ALIGN


class Carver:
    """Hands out consecutive arrays from an arena; ``reset()`` starts over."""

    def __init__(self, raw: np.ndarray) -> None:
        self._raw = raw
        self._offset = 0
        # the raw buffer itself may start anywhere: skip to the first aligned byte
        self._base = (-raw.ctypes.data) % _ALIGN

    def reset(self) -> None:
        self._offset = 0

    def empty(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        start = self._base + self._offset
        if start + size > self._raw.nbytes:
            raise RuntimeError("deformarray internal error: workspace arena too small")
        self._offset += nbytes(shape, dtype)
        return self._raw[start : start + size].view(dtype).reshape(shape)

    def zeros(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        arr = self.empty(shape, dtype)
        arr.fill(0)
        return arr


_local = threading.local()


def workspace(total: int) -> Carver:
    """A Carver over the calling thread's arena, grown (never shrunk) to ``total`` bytes."""
    need = total + _ALIGN
    raw = getattr(_local, "raw", None)
    if raw is None or raw.nbytes < need:
        raw = _local.raw = None  # drop both references: the old arena is freed first
        raw = _local.raw = np.empty(need, dtype=np.uint8)
    return Carver(raw)


def release_workspace() -> None:
    """Free the CPU workspace arena that the calling thread keeps between calls."""
    _local.raw = None
