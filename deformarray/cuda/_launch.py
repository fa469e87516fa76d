"""What every CUDA operator module shares: the kernel launcher and small array helpers.

Production uses CuPy; the tests substitute a host emulation (tests/cuda_emulation.py: NumPy
arrays, kernels built for the CPU) with the same interface as :class:`CupyBackend`, to run
the operators' real launch code on a machine without a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _loader

BLOCK = 256
MAX_BLOCKS = 1 << 20  # grid-stride loops cover the rest


class CupyBackend:
    """CuPy as the array module, and launches of the kernels of one ``.cu`` file."""

    def __init__(self, filename: str) -> None:
        import cupy

        self.xp = cupy
        self.filename = filename
        self.null = np.uint64(0)  # a null pointer kernel argument

    def device(self, arr: Any):
        return arr.device

    def launch(self, kernel: str, dtype: Any, total: int, args: tuple) -> None:
        if total <= 0:
            return
        fn = _loader.get_kernel(self.filename, kernel, dtype)
        blocks = min((total + BLOCK - 1) // BLOCK, MAX_BLOCKS)
        fn((blocks,), (BLOCK,), args)  # CuPy's current stream

    def argsort_stable(self, a: Any) -> Any:
        return self.xp.argsort(a)  # CuPy's argsort is always stable (thrust radix sort)

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)  # synchronises with the current stream


_backends: dict[str, CupyBackend] = {}


def backend(filename: str) -> CupyBackend:
    """The CupyBackend of one kernel file, created on first use."""
    if filename not in _backends:
        _backends[filename] = CupyBackend(filename)
    return _backends[filename]


def contiguous(be: Any, x: Any) -> Any:
    """C-contiguous ``x``; 16-bit arrays are copied as uint16 so that no CuPy elementwise
    kernel has to know float16 / bfloat16 (CuPy's need the CUDA fp16/bf16 headers)."""
    if x is None or x.flags.c_contiguous:
        return x
    if x.dtype.itemsize == 2:
        return be.xp.ascontiguousarray(x.view(np.uint16)).view(x.dtype)
    return be.xp.ascontiguousarray(x)


def acc_dtype(dtype: Any) -> np.dtype:
    """The accumulator type: float64 for float64, float32 for everything else."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def i64(*values: int) -> tuple:
    return tuple(np.int64(v) for v in values)


def same_device(arrays: dict) -> None:
    """All given arrays (None skipped) on one CUDA device, else ValueError."""
    devices = {name: a.device.id for name, a in arrays.items() if a is not None}
    if len(set(devices.values())) > 1:
        detail = ", ".join(f"{k} on device {v}" for k, v in devices.items())
        raise ValueError(f"all arrays must be on one CUDA device, got {detail}")
