"""ms_deform_attn and its backward on CuPy arrays (needs a CUDA GPU).

float64 and float32 are compared with the NumPy backend on the same inputs (1e-10, 1e-4,
relative to each array's largest magnitude), in both backward modes. float16 / bfloat16
are compared (1e-2) with the CUDA float32 run on the same inputs rounded to the 16-bit
type: both compute pixel coordinates in float32 from the same values, so they agree on the
corners (see tests/test_cuda_roi_pool.py for why the NumPy backend is not the reference
there). Also: bitwise determinism of ``deterministic=True``, chunked == unchunked,
non-contiguous inputs, a non-default stream, empty batch and no queries, the 64-bit index
path. Not yet run on a GPU (docs/cuda.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_checks import DTYPES, MODES, TOL, assert_close, check_chunked_equals_unchunked, dtype_of, strided, to_gpu

import deformarray as da

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu


def msda_case(rng, n=2, shapes=((8, 10), (4, 5), (2, 3), (1, 1)), m=4, d=8, lq=30, p=4, spread=0.1):
    shapes = np.array(shapes, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    n_levels = len(shapes)
    arrays = dict(
        value=rng.standard_normal((n, int(sizes.sum()), m, d)),
        loc=rng.uniform(-spread, 1 + spread, (n, lq, m, n_levels, p, 2)),
        attn=rng.uniform(0.0, 1.0, (n, lq, m, n_levels, p)),
    )
    return arrays, shapes, starts


CASES = {
    "deformable_detr_like": dict(),
    "one_level": dict(shapes=((7, 9),), m=1, d=3, lq=11, p=2),
    "wide_head": dict(n=1, shapes=((6, 6), (3, 3)), m=2, d=64, lq=40, p=3),
    "many_queries_one_pixel": dict(n=1, shapes=((2, 2), (1, 1)), m=2, d=4, lq=300, p=4, spread=0.0),
}


def _run(arrays, shapes, starts, grad_out, cast, deterministic):
    v, loc, a = (cast(arrays[k]) for k in ("value", "loc", "attn"))
    out = da.ms_deform_attn(v, shapes, starts, loc, a)
    grads = da.ms_deform_attn_backward(cast(grad_out), v, shapes, starts, loc, a, deterministic=deterministic)
    return out, grads


def _reference(arrays, grad_out, dt, shapes, starts):
    """NumPy backend for float32 / float64; CUDA float32 on rounded inputs for 16-bit."""
    if dt.itemsize == 2:
        arrays = {k: v.astype(dt).astype(np.float32) for k, v in arrays.items()}
        grad_out = grad_out.astype(dt).astype(np.float32)
        want = _run(arrays, shapes, starts, grad_out, lambda a: to_gpu(a, np.float32), False)
    else:
        want = _run(arrays, shapes, starts, grad_out, lambda a: np.asarray(a).astype(dt), True)
    return arrays, grad_out, want


@MODES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_msda_matches_numpy_backend(rng, name, dtype, deterministic):
    dt = dtype_of(dtype)
    arrays, shapes, starts = msda_case(rng, **CASES[name])
    n, lq, m = arrays["loc"].shape[:3]
    grad_out = rng.standard_normal((n, lq, m * arrays["value"].shape[3]))
    arrays, grad_out, (want_out, want) = _reference(arrays, grad_out, dt, shapes, starts)
    out, grads = _run(arrays, shapes, starts, grad_out, lambda a: to_gpu(a, dt), deterministic)
    assert isinstance(out, cupy.ndarray) and out.dtype == dt
    assert_close(out, want_out, TOL[dtype], "output")
    for gname, g, wg in zip(("value", "sampling_locations", "attention_weights"), grads, want):
        assert isinstance(g, cupy.ndarray) and g.dtype == dt, gname
        assert_close(g, wg, TOL[dtype], f"grad {gname}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_msda_deterministic_is_bitwise_repeatable(rng, dtype):
    # many queries sampling few pixels: atomics would reorder the sums
    arrays, shapes, starts = msda_case(rng, **CASES["many_queries_one_pixel"])
    grad_out = rng.standard_normal((1, 300, 8))
    cast = lambda a: to_gpu(a, dtype)  # noqa: E731
    runs = [_run(arrays, shapes, starts, grad_out, cast, True)[1] for _ in range(5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


@MODES
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_msda_chunked_equals_unchunked(rng, dtype, deterministic):
    arrays, shapes, starts = msda_case(rng, n=3)
    grad_out = rng.standard_normal((3, 30, 32))
    cast = lambda a: to_gpu(a, dtype)  # noqa: E731
    check_chunked_equals_unchunked(lambda: _run(arrays, shapes, starts, grad_out, cast, deterministic), dtype)


def test_msda_non_contiguous_and_stream(rng):
    arrays, shapes, starts = msda_case(rng)
    grad_out = rng.standard_normal((2, 30, 32))
    want = _run(arrays, shapes, starts, grad_out, lambda a: to_gpu(a, np.float32), True)
    got = _run(arrays, shapes, starts, grad_out, lambda a: strided(a, np.float32), True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_stream = _run(arrays, shapes, starts, grad_out, lambda a: to_gpu(a, np.float32), True)
    stream.synchronize()
    for res in (got, on_stream):
        np.testing.assert_array_equal(cupy.asnumpy(res[0]), cupy.asnumpy(want[0]))
        for g, w in zip(res[1], want[1]):
            np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


def test_msda_64bit_index_path(rng, monkeypatch):
    from deformarray.cuda import ms_deform_attn as cuda_msda

    arrays, shapes, starts = msda_case(rng)
    grad_out = rng.standard_normal((2, 30, 32))
    cast = lambda a: to_gpu(a, np.float64)  # noqa: E731
    narrow = _run(arrays, shapes, starts, grad_out, cast, True)
    monkeypatch.setattr(cuda_msda, "_INDEX32_MAX", 0)
    wide = _run(arrays, shapes, starts, grad_out, cast, True)
    np.testing.assert_array_equal(cupy.asnumpy(wide[0]), cupy.asnumpy(narrow[0]))
    for a, b in zip(wide[1], narrow[1]):
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b))


@pytest.mark.parametrize("n, lq", [(0, 5), (2, 0)])
def test_msda_empty(rng, n, lq):
    arrays, shapes, starts = msda_case(rng, n=n, lq=lq)
    v, loc, a = (to_gpu(arrays[k], np.float32) for k in ("value", "loc", "attn"))
    out = da.ms_deform_attn(v, shapes, starts, loc, a)
    assert out.shape == (n, lq, 32) and isinstance(out, cupy.ndarray)
    grads = da.ms_deform_attn_backward(cupy.zeros(out.shape, np.float32), v, shapes, starts, loc, a)
    assert grads.value.shape == v.shape and not bool(grads.value.any())
    assert grads.sampling_locations.shape == loc.shape and grads.attention_weights.shape == a.shape
