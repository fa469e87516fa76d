"""The CPU backend's matrix products (deformarray/cpu/_blas.py) against np.matmul in float64
and float32: every operand layout the operators use, broadcasting, the image-ordered
accumulation, the split into tasks, and the np.matmul fallback."""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest

from deformarray.cpu import _blas


def _layout(x: np.ndarray, transposed: bool) -> np.ndarray:
    """x itself, or the same values held column-major in the last two axes (a view)."""
    if not transposed:
        return x
    return np.ascontiguousarray(np.swapaxes(x, -1, -2)).swapaxes(-1, -2)


class _threads:
    """numba.set_num_threads for a block (the task split depends on it)."""

    def __init__(self, n: int):
        self.n = min(n, numba.config.NUMBA_NUM_THREADS)

    def __enter__(self):
        self.old = numba.get_num_threads()
        numba.set_num_threads(self.n)

    def __exit__(self, *exc):
        numba.set_num_threads(self.old)


@pytest.fixture(params=["gemm", "fallback"])
def path(request, monkeypatch):
    if request.param == "gemm":
        if _blas.numba_gemm(np.float64) is None:
            pytest.skip("NumPy's BLAS exports no ILP64 CBLAS gemm here: only the fallback runs")
    else:
        monkeypatch.setattr(_blas, "numba_gemm", lambda dtype: None)
    return request.param


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize(
    "lead_a, lead_b, m, k, n", [((3, 2), (2,), 37, 19, 5), ((1,), (1,), 5, 8, 300), ((), (), 1, 3, 1)]
)
def test_matmul_matches_numpy(path, dtype, tol, trans_a, trans_b, lead_a, lead_b, m, k, n):
    rng = np.random.default_rng(0)
    a = _layout(rng.standard_normal(lead_a + (m, k)).astype(dtype), trans_a)
    b = _layout(rng.standard_normal(lead_b + (k, n)).astype(dtype), trans_b)
    out = np.full(np.broadcast_shapes(lead_a, lead_b) + (m, n), np.nan, dtype)
    _blas.matmul(a, b, out)
    expected = np.matmul(a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * np.sqrt(k))


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_matmul_writes_into_strided_views(path, dtype, tol):
    """Results land in a column slice of a larger buffer (how grad cols is written) and
    nothing outside the view changes."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2, 3, 11, 4)).astype(dtype).swapaxes(-1, -2)  # (2, 3, 4, 11), column-major
    b = rng.standard_normal((3, 11, 6)).astype(dtype)
    big = np.full((2, 4, 3 * 6 + 2), -7.0, dtype)
    out = big[:, :, 1:19].reshape(2, 4, 3, 6).transpose(0, 2, 1, 3)  # (2, 3, 4, 6), row stride 20
    _blas.matmul(a, b, out)
    np.testing.assert_allclose(out, np.matmul(a.astype(np.float64), b), rtol=tol, atol=tol * 4)
    assert np.all(big[:, :, 0] == -7.0) and np.all(big[:, :, 19:] == -7.0)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-4)])
@pytest.mark.parametrize("threads", [1, 2])
def test_accumulate_adds_every_image(path, dtype, tol, threads):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((4, 2, 7, 33)).astype(dtype)  # (images, groups, Cog, pixels)
    b = rng.standard_normal((4, 2, 33, 9)).astype(dtype)
    start = rng.standard_normal((2, 7, 9)).astype(dtype)
    out = start.copy()
    with _threads(threads):
        _blas.matmul(a, b, out, accumulate=True)
    expected = start + np.einsum("igmk,igkn->gmn", a.astype(np.float64), b.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * 10)


def test_accumulate_is_bitwise_repeatable():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((5, 1, 16, 500)).astype(np.float32)
    b = rng.standard_normal((5, 1, 500, 24)).astype(np.float32)
    first = np.zeros((1, 16, 24), np.float32)
    _blas.matmul(a, b, first, accumulate=True)
    for _ in range(5):
        again = np.zeros_like(first)
        _blas.matmul(a, b, again, accumulate=True)
        assert np.array_equal(again, first)


def test_operands_without_a_unit_stride_are_refused():
    if _blas.numba_gemm(np.float64) is None:
        pytest.skip("only the gemm path reads strides itself (np.matmul takes any)")
    a = np.zeros((6, 6))[::2, ::2]
    with pytest.raises(ValueError, match="unit stride"):
        _blas.matmul(a, np.zeros((3, 2)), np.zeros((3, 2)))
    rows_repeated = np.broadcast_to(np.arange(4.0), (3, 4))  # row stride 0
    with pytest.raises(ValueError, match="whole rows"):
        _blas.matmul(rows_repeated, np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="whole rows"):
        _blas.matmul(np.zeros((3, 4))[::-1], np.zeros((4, 2)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="row-major"):
        _blas.matmul(np.zeros((3, 4)), np.zeros((4, 2)), np.zeros((2, 3)).T)


def test_own_threads_restores_the_blas_thread_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def counts():  # NumPy's BLAS, the one the products call (others may load later)
        info = threadpoolctl.threadpool_info()
        return [p["num_threads"] for p in info if p["user_api"] == "blas" and _blas.is_numpys(p["filepath"])]

    before = counts()
    with _blas.own_threads():
        if _blas.numba_gemm(np.float64) is not None:
            assert set(counts()) == {1}
    assert counts() == before


def test_only_numpys_own_libraries_are_used():
    numpy_dir = os.path.dirname(os.path.abspath(np.__file__))
    site = os.path.dirname(numpy_dir)
    assert _blas.is_numpys(os.path.join(numpy_dir + ".libs", "libscipy_openblas64_-x.so"))
    assert _blas.is_numpys(os.path.join(numpy_dir, ".dylibs", "libscipy_openblas64_.dylib"))
    assert not _blas.is_numpys(os.path.join(site, "scipy.libs", "libscipy_openblas-x.so"))
    assert not _blas.is_numpys(os.path.join(site, "numpy_other", "libopenblas.so"))


def _blas_threads():
    """Get and set NumPy's OpenBLAS thread count through the library itself (a process-wide
    value, the same from every thread), or skip."""
    import ctypes

    threadpoolctl = pytest.importorskip("threadpoolctl")
    if _blas.numba_gemm(np.float32) is None:
        pytest.skip("products do not run through NumPy's OpenBLAS here")
    for lib in threadpoolctl.threadpool_info():
        if lib["internal_api"] == "openblas" and _blas.is_numpys(lib["filepath"]):
            handle = ctypes.CDLL(lib["filepath"])
            names = [p + "openblas_{}_num_threads" + s for p in ("scipy_", "") for s in ("64_", "_64", "")]
            get = next(getattr(handle, n.format("get")) for n in names if hasattr(handle, n.format("get")))
            set_ = next(getattr(handle, n.format("set")) for n in names if hasattr(handle, n.format("set")))
            get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
            return get, set_
    pytest.skip("NumPy's OpenBLAS not found")


def _conv_case():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 64, 32, 32), dtype=np.float32)
    w = rng.standard_normal((64, 64, 3, 3), dtype=np.float32)
    off = rng.standard_normal((2, 18, 32, 32), dtype=np.float32)
    return x, off, w


def test_results_do_not_depend_on_the_calling_thread():
    """A forward from another Python thread, and four at once, give the bits of the same
    call made alone in the main thread. threadpoolctl limits OpenBLAS from one thread
    only, so from another thread the products ran multi-threaded: off by 1.7e-5."""
    import threading

    import deformarray as da

    get, set_ = _blas_threads()
    before = get()
    set_(2)  # OpenBLAS multi-threaded, as on any machine with cores to spare
    user = get()  # 2, or fewer where OpenBLAS has fewer cores
    try:
        x, off, w = _conv_case()
        want = da.deform_conv2d(x, off, w, padding=1).tobytes()
        got: dict[int, bytes] = {}

        def call(i):
            got[i] = da.deform_conv2d(x, off, w, padding=1).tobytes()

        for n_threads in (1, 4):
            threads = [threading.Thread(target=call, args=(i,)) for i in range(n_threads)]
            [t.start() for t in threads]
            [t.join(60) for t in threads]
            assert len(got) == n_threads and all(v == want for v in got.values())
            got.clear()
        assert get() == user
    finally:
        set_(before)


def test_concurrent_calls_leave_the_users_blas_setting():
    """After calls from several threads at once, NumPy's BLAS has the thread count it had
    (the last call used to restore the 1 another call had set); a count the user sets
    while calls run is kept."""
    import threading

    import deformarray as da

    get, set_ = _blas_threads()
    before = get()
    try:
        set_(2)
        user = get()  # 2, or fewer where OpenBLAS has fewer cores
        x, off, w = _conv_case()
        start = threading.Barrier(4)

        def call():
            start.wait(30)
            for _ in range(3):
                da.deform_conv2d(x, off, w, padding=1)

        threads = [threading.Thread(target=call) for _ in range(4)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
        assert get() == user
        with _blas.own_threads():
            set_(user)  # the user's own change while a call runs
        assert get() == user
    finally:
        set_(before)
