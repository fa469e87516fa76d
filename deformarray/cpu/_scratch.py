"""Scratch buffers reused across the chunks of one operator call."""

from __future__ import annotations

import math

import numpy as np


class Scratch:
    """Named scratch arrays: each name is allocated once, at its largest request.

    Chunks of one call are all the same size but the last, so the first chunk allocates
    and the rest reuse warm pages; the peak stays at one chunk's workspace instead of
    two (a new buffer is never allocated while the old one of that name is alive).
    """

    def __init__(self) -> None:
        self._raw: dict[str, np.ndarray] = {}

    def empty(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        raw = self._raw.get(name)
        if raw is None or raw.nbytes < nbytes:
            self._raw.pop(name, None)  # free the smaller buffer before allocating
            raw = np.empty(max(nbytes, 1), dtype=np.uint8)
            self._raw[name] = raw
        return raw[:nbytes].view(dtype).reshape(shape)

    def zeros(self, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        arr = self.empty(name, shape, dtype)
        arr.fill(0)
        return arr
