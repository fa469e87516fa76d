"""Matrix products on Numba's own threads, each a single-threaded BLAS call.

Why: the operators alternate Numba kernels with BLAS products. Any other set of threads
for the products competes for the cores with Numba's OpenMP workers, which spin for a
while after each parallel region (libgomp: 300,000 iterations, 10-20 ms on recent x86),
and OpenBLAS's own workers spin the same way after a product. On the 2-core VM the
product after the sampling kernel took 16 ms instead of 8.4 ms that way
(``benchmarks/NOTES.md``). So each product is cut into tasks (blocks of rows or columns
of the result) and a Numba ``prange`` loop calls the BLAS ``gemm`` on each, through a
function pointer, with the BLAS library held to one thread.

The ``gemm`` is the ILP64 CBLAS one exported by the OpenBLAS that NumPy's wheels bundle
(``scipy_cblas_sgemm64_``, ``cblas_sgemm64_``). The kernel gets its address as an integer
and calls it through ``_call_gemm`` (a Numba intrinsic): with a ctypes function passed as
an argument instead, once a second dtype had been compiled every call went through Numba's
Python-level type matching and allocated about 150 KB on the way (the workspace-bound test
caught it). Where
there is no such library (NumPy built against MKL or Accelerate), no ``threadpoolctl``, or
with ``NUMBA_DISABLE_JIT``, products fall back to ``np.matmul`` on BLAS's own threads.

Every element of a result is computed by one BLAS call over the whole inner dimension,
and reductions over images (``accumulate=True``) run in image order inside one task, so
the bits depend on the shapes and the thread count only, never on scheduling.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_SYMBOLS: dict[np.dtype, tuple[str, str]] = {  # ILP64 names only: their integer arguments are certainly 64-bit
    np.dtype(np.float32): ("scipy_cblas_sgemm64_", "cblas_sgemm64_"),
    np.dtype(np.float64): ("scipy_cblas_dgemm64_", "cblas_dgemm64_"),
}
_ROW = 11  # task-table columns: a, b, c (addresses), m, n, k, lda, ldb, ldc, trans_a, trans_b

_lock = threading.Lock()
_state: dict[str, Any] = {"checked": False, "gemm": {}, "get_threads": None, "set_threads": None}


def is_numpys(path: str) -> bool:
    """Whether a library file is one of NumPy's own: inside ``numpy/`` (``.dylibs`` on
    macOS) or ``numpy.libs/`` (Linux and Windows wheels)."""
    numpy_dir = os.path.dirname(os.path.abspath(np.__file__))
    path = os.path.abspath(path)
    return any(path.startswith(d + os.sep) for d in (numpy_dir, numpy_dir + ".libs"))


def _find_library(controller: Any) -> tuple[dict[np.dtype, int], Any, Any]:
    """The OpenBLAS bundled with NumPy: its ``gemm`` addresses by dtype, and its functions
    that get and set the (process-wide) thread count, or ``({}, None, None)``."""
    for lib in controller.lib_controllers:
        if not _is_ours(lib):
            continue
        handle = ctypes.CDLL(os.path.abspath(lib.filepath))
        found: dict[np.dtype, int] = {}
        for dtype, names in _SYMBOLS.items():
            for name in names:
                fn = getattr(handle, name, None)
                address = ctypes.cast(fn, ctypes.c_void_p).value if fn is not None else None
                if address:
                    found.setdefault(dtype, address)
                    break
        get, set_ = (_symbol(handle, f"openblas_{verb}_num_threads") for verb in ("get", "set"))
        if found and get is not None and set_ is not None:
            get.restype, get.argtypes = ctypes.c_int, []
            set_.restype, set_.argtypes = None, [ctypes.c_int]
            return found, get, set_
    return {}, None, None


def _symbol(handle: Any, base: str) -> Any:
    """``base`` as NumPy's OpenBLAS builds name it (``scipy_`` prefix, ``64_`` suffix for
    the ILP64 builds), or None."""
    for prefix in ("scipy_", ""):
        for suffix in ("64_", "_64", ""):
            fn = getattr(handle, prefix + base + suffix, None)
            if fn is not None:
                return fn
    return None


def _is_ours(lib: Any) -> bool:
    return lib.internal_api == "openblas" and is_numpys(lib.filepath or "")


def _setup() -> None:
    with _lock:
        if _state["checked"]:
            return
        _state["checked"] = True
        if numba.config.DISABLE_JIT:
            return  # the intrinsic below only exists in compiled code
        try:
            from threadpoolctl import ThreadpoolController

            gemms, get, set_ = _find_library(ThreadpoolController())
        except Exception:
            return
        if gemms:
            _state["gemm"], _state["get_threads"], _state["set_threads"] = gemms, get, set_


def numba_gemm(dtype: np.dtype) -> int | None:
    """Address of the ``gemm`` for ``dtype``, or None (products use ``np.matmul``)."""
    _setup()
    return _state["gemm"].get(np.dtype(dtype))


# NumPy's OpenBLAS (pthreads build) has one thread count for the whole process, and
# threadpoolctl lets only the first Python thread that limits it do so (from any other
# thread its limit silently does nothing, and the products ran multi-threaded, with other
# bits). So the count is set here directly, once for all concurrent calls: the first call
# in sets it to 1, the last call out restores the count it found, unless someone else
# changed it meanwhile (then theirs stays).
_guard: dict[str, Any] = {"calls": 0, "saved": None}


@contextmanager
def own_threads() -> Iterator[None]:
    """Hold NumPy's BLAS to one thread while any call is inside such a block (when products
    run on Numba's threads; otherwise BLAS keeps its own threads)."""
    _setup()
    get, set_ = _state.get("get_threads"), _state.get("set_threads")
    if get is None or set_ is None:
        yield
        return
    with _lock:
        if _guard["calls"] == 0:
            _guard["saved"] = get()
            if _guard["saved"] != 1:
                set_(1)
        _guard["calls"] += 1
    try:
        yield
    finally:
        with _lock:
            _guard["calls"] -= 1
            if _guard["calls"] == 0 and _guard["saved"] != 1 and get() == 1:
                set_(_guard["saved"])


@intrinsic
def _call_gemm(typingctx, address, row, alpha, beta):
    """cblas_?gemm64_(RowMajor, row[9], row[10], row[3:6], alpha, row[0], row[6], row[1],
    row[7], beta, row[2], row[8]) through the function at ``address``. Matrix addresses are
    passed as 64-bit integers: the same calling convention as pointers on the 64-bit ABIs
    NumPy ships for, and it keeps the task table one integer array."""
    sig = types.void(address, row, alpha, beta)

    def codegen(context, builder, signature, args):
        addr, row_arr, a_val, b_val = args
        i32, i64 = ir.IntType(32), ir.IntType(64)
        real = context.get_value_type(signature.args[2])
        fnty = ir.FunctionType(ir.VoidType(), [i32] * 3 + [i64] * 3 + [real] + [i64] * 4 + [real] + [i64] * 2)
        fn = builder.inttoptr(addr, fnty.as_pointer())
        ary = context.make_array(signature.args[1])(context, builder, row_arr)

        def col(i):
            return builder.load(builder.gep(ary.data, [ir.Constant(i64, i)]))

        flags = [ir.Constant(i32, _ROW_MAJOR), builder.trunc(col(9), i32), builder.trunc(col(10), i32)]
        builder.call(fn, flags + [col(3), col(4), col(5), a_val, col(0), col(6), col(1), col(7), b_val, col(2), col(8)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, parallel=True)
def _run_tasks(address, table, alpha, beta):
    """table[t, s] is the s-th product of task t; a task runs its products in order."""
    for t in prange(table.shape[0]):
        for s in range(table.shape[1]):
            r = table[t, s]  # contiguous (11,) int64 row
            if r[3] > 0 and r[4] > 0:  # rows/columns left empty by an uneven split
                _call_gemm(address, r, alpha, beta)


def _operand(x: np.ndarray, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(transpose flag, leading dimension, row stride, column stride) of a matrix view, the
    strides in bytes: one stride must be the element size, the other a whole number of
    elements at least the matrix's width (a stride of an axis of length 1 does not matter)."""
    s_row, s_col, item = x.strides[-2], x.strides[-1], x.itemsize
    for trans, unit, outer, outer_len, width in (
        (_NO_TRANS, s_col, s_row, rows, cols),
        (_TRANS, s_row, s_col, cols, rows),
    ):
        if unit != item and width > 1:
            continue
        if outer_len == 1:
            return trans, max(width, 1), s_row, s_col
        if outer > 0 and outer % item == 0 and outer // item >= width:
            return trans, outer // item, s_row, s_col
    raise ValueError("matrix operand needs a unit stride in one of its last two axes and a row stride of whole rows")


def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray, accumulate: bool = False) -> None:
    """``out[...] = a @ b``, or with ``accumulate`` ``out += sum over axis 0 of a @ b``
    (``a`` and ``b`` then carry a leading axis that ``out`` lacks; images are added in
    order). Leading axes broadcast like ``np.matmul``; ``out`` is written in place."""
    gemm = numba_gemm(out.dtype)
    if gemm is None or a.dtype != out.dtype or b.dtype != out.dtype:
        if accumulate:
            for j in range(a.shape[0]):
                out += np.matmul(a[j], b[j])
        else:
            np.matmul(a, b, out=out)
        return
    chain = a.shape[0] if accumulate else 1
    lead = out.shape[:-2]
    m, k, n = out.shape[-2], a.shape[-1], out.shape[-1]
    aa = np.broadcast_to(a, ((chain,) if accumulate else ()) + lead + (m, k))
    bb = np.broadcast_to(b, ((chain,) if accumulate else ()) + lead + (k, n))
    if not accumulate:
        aa, bb = aa[None], bb[None]
    ta, lda, ra, _ = _operand(aa, m, k)
    tb, ldb, _, cb = _operand(bb, k, n)
    tc, ldc, rc, cc = _operand(out, m, n)
    if tc != _NO_TRANS:
        raise ValueError("matmul writes row-major results only")
    if m == 0 or n == 0:
        return
    products = int(np.prod(lead, dtype=np.int64))
    # Enough tasks for every thread: split rows, or columns where the images are chained
    # (a task must own its part of ``out`` for the whole chain).
    blocks = max(1, -(-numba.get_num_threads() // max(products, 1)))
    by_rows = not accumulate and m >= n
    span = m if by_rows else n
    blocks = min(blocks, span)
    table = np.zeros((products * blocks, chain, _ROW), dtype=np.int64)
    t = 0
    for idx in np.ndindex(*lead):
        for blk in range(blocks):
            lo, hi = span * blk // blocks, span * (blk + 1) // blocks
            for s in range(chain):
                pa = aa[(s,) + idx].ctypes.data
                pb = bb[(s,) + idx].ctypes.data
                pc = out[idx].ctypes.data
                if by_rows:
                    row = (pa + lo * ra, pb, pc + lo * rc, hi - lo, n)
                else:
                    row = (pa, pb + lo * cb, pc + lo * cc, m, hi - lo)
                table[t, s] = (*row, k, lda, ldb, ldc, ta, tb)
            t += 1
    real = out.dtype.type
    _run_tasks(gemm, table, real(1.0), real(1.0 if accumulate else 0.0))


__all__ = ["is_numpys", "matmul", "numba_gemm", "own_threads"]
