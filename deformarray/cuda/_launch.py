"""What every CUDA operator module shares: the kernel launcher and small array helpers.

Production uses CuPy; the tests substitute a host emulation (tests/cuda_emulation.py: NumPy
arrays, kernels built for the CPU) with the same interface as :class:`CupyBackend`, to run
the operators' real launch code on a machine without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _config
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

    def gemm(self, a: Any, b: Any, c: Any, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0) -> None:
        """``c = op(a) @ op(b) + beta * c`` by cuBLAS GemmEx on the current stream (see :func:`gemm`)."""
        import cupy
        from cupy.cuda import cublas

        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        compute = _compute_type(a.dtype, c.dtype)
        scalar = np.float64 if compute == _CUBLAS_COMPUTE_64F else np.float32
        alpha_h = np.array(1.0, dtype=scalar)
        beta_h = np.array(beta, dtype=scalar)
        handle = cupy.cuda.device.get_cublas_handle()
        cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
        mode = cublas.getPointerMode(handle)
        cublas.setPointerMode(handle, _CUBLAS_POINTER_MODE_HOST)
        try:
            # Row-major c (m, n) is column-major c^T (n, m) = op(b)^T @ op(a)^T: b and a swap
            # places, and a row-major operand read column-major is its own transpose.
            cublas.gemmEx(
                handle,
                _CUBLAS_OP_T if trans_b else _CUBLAS_OP_N,
                _CUBLAS_OP_T if trans_a else _CUBLAS_OP_N,
                n,
                m,
                k,
                alpha_h.ctypes.data,
                b.data.ptr,
                _CUDA_DATA_TYPES[b.dtype.name],
                _ld(b),
                a.data.ptr,
                _CUDA_DATA_TYPES[a.dtype.name],
                _ld(a),
                beta_h.ctypes.data,
                c.data.ptr,
                _CUDA_DATA_TYPES[c.dtype.name],
                _ld(c),
                compute,
                _CUBLAS_GEMM_DEFAULT,
            )
        finally:
            cublas.setPointerMode(handle, mode)


# cuBLAS / CUDA enumerators (stable ABI values of cublas_api.h and library_types.h).
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_POINTER_MODE_HOST = 0
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32, _CUBLAS_COMPUTE_64F = 68, 77, 70
_CUDA_DATA_TYPES = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 14}


def _compute_type(operand: Any, result: Any) -> int:
    """cuBLAS compute type of a product of ``operand``-typed matrices into ``result``: float64
    in float64; float16 / bfloat16 operands (tensor cores) and float32 ones accumulate in
    float32, float32 operands rounded to TF32 only when ``_config.get_allow_tf32()``."""
    name = np.dtype(operand).name
    if name == "float64":
        return _CUBLAS_COMPUTE_64F
    if name == "float32" and _config.get_allow_tf32():
        return _CUBLAS_COMPUTE_32F_FAST_TF32
    return _CUBLAS_COMPUTE_32F


def _ld(a: Any) -> int:
    """Leading dimension (row stride in elements) of a row-major 2-D operand with unit inner stride."""
    if a.ndim != 2 or a.strides[1] != a.itemsize or a.strides[0] % a.itemsize:
        raise ValueError(f"GEMM operand must be 2-D with unit inner stride, got strides {a.strides}")
    return max(a.strides[0] // a.itemsize, a.shape[1], 1)


def _round_tf32(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to TF32 (10 mantissa bits, nearest even), as tensor cores read them."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    finite = (u & 0x7F800000) != 0x7F800000
    r = np.where(finite, (u + 0xFFF + ((u >> 13) & 1)) & 0xFFFFE000, u).astype(np.uint32)
    return r.view(np.float32)


def host_gemm(a: Any, b: Any, c: Any, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0) -> None:
    """The NumPy stand-in of :meth:`CupyBackend.gemm` (the tests' emulation has no cuBLAS):
    the same dtype semantics, 16-bit operands widened exactly to float32 and multiplied with
    float32 accumulation into ``c`` (float32), float32 operands rounded to TF32 first when
    allowed."""
    x = a.T if trans_a else a
    y = b.T if trans_b else b
    acc = np.float64 if np.dtype(a.dtype) == np.float64 else np.float32
    x = np.asarray(x, dtype=acc)
    y = np.asarray(y, dtype=acc)
    if acc == np.float32 and np.dtype(a.dtype) == np.float32 and _config.get_allow_tf32():
        x, y = _round_tf32(x), _round_tf32(y)
    prod = np.matmul(x, y)
    if beta == 0.0:
        c[...] = prod
    else:
        c[...] = prod + c * c.dtype.type(beta)


def gemm(be: Any, a: Any, b: Any, c: Any, trans_a: bool = False, trans_b: bool = False, beta: float = 0.0) -> None:
    """``c = op(a) @ op(b) + beta * c`` for row-major 2-D views with unit inner stride: ``a``
    and ``b`` of one dtype (float16 / bfloat16 / float32 / float64), ``c`` of the accumulator
    type (float32, or float64 for float64). cuBLAS GemmEx on CuPy (tensor cores for the
    16-bit types, fp32 accumulation; TF32 for float32 only when allowed), the NumPy stand-in
    on a backend without ``gemm``."""
    fn = getattr(be, "gemm", None)
    (fn or host_gemm)(a, b, c, trans_a, trans_b, beta)


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


def index_suffix(index32_max: int, *sizes: int) -> str:
    """``_i32`` when every size is at most ``index32_max`` (the 32-bit index path), else ``_i64``."""
    return "_i32" if max(sizes) <= index32_max else "_i64"


def image_chunks(n: int, per_image: int, limit: int) -> Iterator[tuple[int, int]]:
    """``(n0, nb)`` ranges of images whose ``per_image`` bytes each fit ``limit`` (at least
    one image per chunk)."""
    nb = max(1, min(n, limit // per_image)) if per_image > 0 else max(n, 1)
    for n0 in range(0, n, nb):
        yield n0, min(nb, n - n0)


def deterministic_plan(
    n: int, per_image: int, work: int, width: int, half: bool, limit: int, threads: int
) -> tuple[int, int]:
    """``(nb, K)`` of a deterministic gradient summed over ``K`` chunks of ``work`` items
    (pixels, queries): images per chunk and chunks, for ``n`` images whose partial buffer
    takes ``per_image`` bytes each, about ``threads`` threads of ``nb * width`` per chunk.

    ``K = 0`` means no partial buffer: float32 / float64 (not ``half``) write the gradient
    directly, all images at once. Otherwise each image chunk uses ``K*nb*per_image`` bytes,
    within ``limit`` unless one image alone (``K = nb = 1``) exceeds it.
    """
    fit = limit // per_image  # partial buffers of one image that fit
    if not half and fit < 2 * n:  # parallelism of K*nb <= fit images: no better than direct
        return n, 0
    nb = max(1, min(n, fit))
    k_want = min(work, max(1, -(-threads // (nb * width))))
    k = max(1, min(k_want, fit // nb))
    if not half and k == 1:
        return n, 0
    return nb, k
