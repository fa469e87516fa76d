"""dcnv3 / dcnv4 and their backwards on CuPy arrays (needs a CUDA GPU).

float64 and float32 are compared with the NumPy backend on the same inputs (1e-10, 1e-4,
relative to each array's largest magnitude), in both backward modes. float16 / bfloat16
are compared (1e-2) with the CUDA float32 run on the same inputs rounded to the 16-bit
type: both compute sampling locations in float32 from the same values, so they agree on
the corners. Also: DCNv4's padding (NaN ignored, zero gradient), bitwise determinism of
``deterministic=True``, chunked == unchunked, non-contiguous inputs, a non-default stream,
an empty batch, the 64-bit index path. Not yet run on a GPU (docs/cuda.md).
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_checks import DTYPES, MODES, TOL, assert_close, check_chunked_equals_unchunked, dtype_of, strided, to_gpu
from reference_dcn import dcnv4_case, make_dcn_case

import deformarray as da

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

OPS = pytest.mark.parametrize("v4", [False, True], ids=["dcnv3", "dcnv4"])
_ARRAYS = ("input", "offset", "mask", "offset_mask")


def dcn_case(rng, v4, **kw):
    c = make_dcn_case(rng, **kw)
    return dcnv4_case(c) if v4 else c


CASES = {
    "internimage_like": dict(n=2, h=9, w=8, group=4, group_channels=16),
    "3x5_stride2_dilation2": dict(kernel_size=(3, 5), stride=2, padding=(2, 4), dilation=2, h=11, w=10),
    "remove_center_scale": dict(kernel_size=5, padding=2, remove_center=True, offset_scale=0.5, group=3),
    "odd_channels_1x1": dict(kernel_size=1, padding=0, group=5, group_channels=7, spread=3.0),
    "wide_group": dict(n=1, h=6, w=6, group=1, group_channels=96),
}


def _run(c, grad_out, cast, deterministic):
    a = {k: (cast(v) if k in _ARRAYS else v) for k, v in c.items()}
    go = cast(grad_out)
    if "offset_mask" in c:
        return da.dcnv4(**a), tuple(da.dcnv4_backward(go, **a, deterministic=deterministic))
    return da.dcnv3(**a), tuple(da.dcnv3_backward(go, **a, deterministic=deterministic))


def _reference(c, grad_out, dt):
    """NumPy backend for float32 / float64; CUDA float32 on rounded inputs for 16-bit."""
    if dt.itemsize == 2:
        c = {k: (v.astype(dt).astype(np.float32) if k in _ARRAYS else v) for k, v in c.items()}
        grad_out = grad_out.astype(dt).astype(np.float32)
        want = _run(c, grad_out, lambda a: to_gpu(a, np.float32), False)
    else:
        want = _run(c, grad_out, lambda a: np.asarray(a).astype(dt), True)
    return c, grad_out, want


@OPS
@MODES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_dcn_matches_numpy_backend(rng, name, dtype, deterministic, v4):
    dt = dtype_of(dtype)
    c = dcn_case(rng, v4, **CASES[name])
    out_np = da.dcnv4(**c) if v4 else da.dcnv3(**c)
    grad_out = rng.standard_normal(out_np.shape)
    c, grad_out, (want_out, want) = _reference(c, grad_out, dt)
    out, grads = _run(c, grad_out, lambda a: to_gpu(a, dt), deterministic)
    assert isinstance(out, cupy.ndarray) and out.dtype == dt
    assert_close(out, want_out, TOL[dtype], "output")
    for i, (g, wg) in enumerate(zip(grads, want)):
        assert isinstance(g, cupy.ndarray) and g.dtype == dt, i
        assert_close(g, wg, TOL[dtype], f"grad {i}")
    if v4:  # the NaN padding of offset_mask is ignored and gets +0
        used = 3 * c["group"] * (np.prod(np.broadcast_to(c["kernel_size"], 2)) - int(c["remove_center"]))
        pad = cupy.asnumpy(grads[1][..., used:]).view(np.uint8)
        assert not pad.any()


@OPS
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dcn_deterministic_is_bitwise_repeatable(rng, dtype, v4):
    # many output pixels sampling few input pixels: atomics would reorder the sums
    c = dcn_case(rng, v4, n=1, h=4, w=4, kernel_size=7, padding=20, group=2, group_channels=8, spread=0.5)
    out = da.dcnv4(**c) if v4 else da.dcnv3(**c)
    grad_out = rng.standard_normal(out.shape)
    cast = lambda a: to_gpu(a, dtype)  # noqa: E731
    runs = [_run(c, grad_out, cast, True)[1] for _ in range(5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


@MODES
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_dcn_chunked_equals_unchunked(rng, dtype, deterministic):
    c = dcn_case(rng, True, n=3, h=8, w=7, group=2, group_channels=16)
    grad_out = rng.standard_normal(da.dcnv4(**c).shape)
    cast = lambda a: to_gpu(a, dtype)  # noqa: E731
    check_chunked_equals_unchunked(lambda: _run(c, grad_out, cast, deterministic), dtype)


@OPS
def test_dcn_non_contiguous_and_stream(rng, v4):
    c = dcn_case(rng, v4, **CASES["internimage_like"])
    grad_out = rng.standard_normal((2, 9, 8, 64))
    want = _run(c, grad_out, lambda a: to_gpu(a, np.float32), True)
    got = _run(c, grad_out, lambda a: strided(a, np.float32), True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_stream = _run(c, grad_out, lambda a: to_gpu(a, np.float32), True)
    stream.synchronize()
    for res in (got, on_stream):
        np.testing.assert_array_equal(cupy.asnumpy(res[0]), cupy.asnumpy(want[0]))
        for g, w in zip(res[1], want[1]):
            np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


@OPS
def test_dcn_64bit_index_path(rng, monkeypatch, v4):
    from deformarray.cuda import dcn as cuda_dcn

    c = dcn_case(rng, v4, **CASES["remove_center_scale"])
    grad_out = rng.standard_normal((2, 5, 4, 9))
    cast = lambda a: to_gpu(a, np.float64)  # noqa: E731
    narrow = _run(c, grad_out, cast, True)
    monkeypatch.setattr(cuda_dcn, "_INDEX32_MAX", 0)
    wide = _run(c, grad_out, cast, True)
    np.testing.assert_array_equal(cupy.asnumpy(wide[0]), cupy.asnumpy(narrow[0]))
    for a, b in zip(wide[1], narrow[1]):
        np.testing.assert_array_equal(cupy.asnumpy(a), cupy.asnumpy(b))


@OPS
def test_dcn_empty_batch(rng, v4):
    c = dcn_case(rng, v4, n=0)
    out, grads = _run(c, np.zeros((0, 5, 4, 6)), lambda a: to_gpu(a, np.float32), False)
    assert out.shape == (0, 5, 4, 6) and isinstance(out, cupy.ndarray)
    assert grads[0].shape == c["input"].shape
