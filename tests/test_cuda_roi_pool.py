"""deform_roi_pool / deform_psroi_pool and their backwards on CuPy arrays (needs a CUDA GPU).

float64 and float32 are compared with the NumPy backend on the same inputs (1e-10, 1e-4,
relative to each array's largest magnitude), in both backward modes. float16 / bfloat16
are compared (1e-2) with the CUDA float32 run on the same inputs rounded to the 16-bit
type: both compute the sample coordinates in float32 from the same values, so they agree
on which pixel a sample falls in. The NumPy backend computes coordinates in float64, and
16-bit offsets and RoIs put samples exactly on integer coordinates (and on the edge of the
image) often enough that float32 and float64 round them to different sides there, where
the one-sided offset derivative (or a skipped sample) is discontinuous. Also: torchvision's
``roi_align`` (aligned=True) and ``ps_roi_align`` where
the formulas coincide (no offset, no mask; for ps_roi_align RoIs inside the image with the
box shifted so that the sample points coincide, see ``test_psroi_matches_torchvision``),
bitwise determinism of ``deterministic=True``, chunked == unchunked, non-contiguous inputs,
non-default streams, zero RoIs.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_checks import DTYPES, MODES, TOL, assert_close, dtype_of, to_gpu, to_host64
from reference_roi import image_rois

import deformarray as da

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu


# ---------------------------------------------------------------------------------------
# deform_roi_pool


def roi_case(
    rng,
    n=2,
    c=5,
    h=9,
    w=10,
    r=7,
    pooled=(3, 2),
    scale=0.5,
    ratio=0,
    gamma=0.2,
    offset=True,
    mask=True,
    integer=False,
    offset_scale=1.0,
):
    ph, pw = pooled
    arrays = dict(
        input=rng.standard_normal((n, c, h, w)),
        rois=image_rois(rng, n, r, h, w, scale, integer),
        offset=rng.uniform(-offset_scale, offset_scale, (r, 2, ph, pw)) if offset else None,
        mask=rng.uniform(0.2, 1.5, (r, 1, ph, pw)) if mask else None,
    )
    if integer and offset:
        arrays["offset"][:] = 0.0  # samples on integer coordinates
    kw = dict(output_size=pooled, spatial_scale=scale, sampling_ratio=ratio, gamma=gamma)
    return arrays, kw


ROI_CASES = {
    "adaptive_offset_mask": dict(),
    "ratio2_plain": dict(ratio=2, offset=False, mask=False),
    "ratio3_offset_only": dict(ratio=3, mask=False, pooled=(2, 3), scale=1.0, h=6, w=9),
    "mask_only": dict(offset=False),
    "integer_samples": dict(integer=True, scale=1.0, pooled=(2, 2)),
    "large_offsets_leave_image": dict(offset_scale=6.0),
    "wider": dict(n=3, c=32, h=20, w=24, r=20, pooled=(7, 7), scale=0.25),
}


def _roi_run(arrays, kw, grad_out, cast, deterministic):
    x, rois, off, m = (cast(arrays[k]) for k in ("input", "rois", "offset", "mask"))
    out = da.deform_roi_pool(x, rois, off, mask=m, **kw)
    grads = da.deform_roi_pool_backward(cast(grad_out), x, rois, off, mask=m, deterministic=deterministic, **kw)
    return out, grads


def _reference(arrays, grad_out, dt, run):
    """The expected numbers: the NumPy backend on the same inputs for float32 / float64; for
    the 16-bit types the CUDA float32 run on the inputs rounded to the 16-bit type (see the
    module docstring). Returns the inputs the tested run should use and the result."""
    if dt.itemsize == 2:
        arrays = {k: (None if v is None else v.astype(dt).astype(np.float32)) for k, v in arrays.items()}
        grad_out = grad_out.astype(dt).astype(np.float32)
        return arrays, grad_out, run(arrays, grad_out, lambda a: to_gpu(a, np.float32), False)
    return arrays, grad_out, run(arrays, grad_out, lambda a: None if a is None else a.astype(dt), True)


@MODES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(ROI_CASES))
def test_roi_matches_numpy_backend(rng, name, dtype, deterministic):
    dt = dtype_of(dtype)
    arrays, kw = roi_case(rng, **ROI_CASES[name])
    grad_out = rng.standard_normal((len(arrays["rois"]), arrays["input"].shape[1]) + kw["output_size"])
    arrays, grad_out, (want_out, want) = _reference(
        arrays, grad_out, dt, lambda a, g, cast, det: _roi_run(a, kw, g, cast, det)
    )
    want_out, want = to_host64(want_out), [to_host64(g) for g in want]
    out, grads = _roi_run(arrays, kw, grad_out, lambda a: to_gpu(a, dt), deterministic)
    assert isinstance(out, cupy.ndarray) and out.dtype == dt
    assert_close(out, want_out, TOL[dtype], "output")
    for gname, g, wg in zip(("input", "offset", "mask"), grads, want):
        if g is not None:
            assert isinstance(g, cupy.ndarray) and g.dtype == dt, gname
        assert_close(g, wg, TOL[dtype], f"grad {gname}")


@pytest.mark.parametrize("ratio", [0, 2])
def test_roi_matches_torchvision(rng, ratio):
    """No offset and no mask: mmcv's DeformRoIPool is torchvision's roi_align(aligned=True)
    (same RoI, grid, RoIAlign sampling and count)."""
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    arrays, kw = roi_case(
        rng, n=2, c=6, h=11, w=13, r=9, pooled=(3, 4), scale=0.7, ratio=ratio, offset=False, mask=False
    )
    x, rois = to_gpu(arrays["input"], np.float64), to_gpu(arrays["rois"], np.float64)
    out = da.deform_roi_pool(x, rois, **kw)
    grad_out = to_gpu(rng.standard_normal(out.shape), np.float64)
    g_in = da.deform_roi_pool_backward(grad_out, x, rois, **kw).input
    tx = torch.from_dlpack(x).clone().requires_grad_(True)
    t_out = tv_ops.roi_align(
        tx,
        torch.from_dlpack(rois),
        output_size=kw["output_size"],
        spatial_scale=kw["spatial_scale"],
        sampling_ratio=ratio,
        aligned=True,
    )
    t_out.backward(torch.from_dlpack(grad_out))
    assert_close(out, t_out.detach().cpu().numpy(), 1e-10, "output")
    assert_close(g_in, tx.grad.cpu().numpy(), 1e-10, "grad input")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_roi_deterministic_is_bitwise_repeatable(rng, dtype):
    # many overlapping RoIs on one image: atomics would reorder the sums
    arrays, kw = roi_case(rng, n=1, c=16, h=12, w=12, r=64, pooled=(7, 7), ratio=2)
    grad_out = rng.standard_normal((64, 16, 7, 7))
    x, rois, off, m = (to_gpu(arrays[k], dtype) for k in ("input", "rois", "offset", "mask"))
    go = to_gpu(grad_out, dtype)
    runs = [da.deform_roi_pool_backward(go, x, rois, off, mask=m, deterministic=True, **kw) for _ in range(5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


@MODES
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_roi_chunked_equals_unchunked(rng, dtype, deterministic):
    arrays, kw = roi_case(rng, n=3, r=9)
    grad_out = rng.standard_normal((9, 5, 3, 2))
    cast = lambda a: to_gpu(a, dtype)  # noqa: E731
    full = _roi_run(arrays, kw, grad_out, cast, deterministic)
    tol = 1e-12 if dtype == "float64" else 2e-3
    for limit in (1, 3000, 20000):  # one image / one bin per chunk, a few bins, more
        with da.workspace_limit(limit):
            chunked = _roi_run(arrays, kw, grad_out, cast, deterministic)
        assert_close(chunked[0], to_host64(full[0]), tol, f"output, limit {limit}")
        for gname, g, f in zip(("input", "offset", "mask"), chunked[1], full[1]):
            assert_close(g, to_host64(f), tol, f"grad {gname}, limit {limit}")


def _strided(a, dtype):
    """Same values in a non-contiguous view (every other element of a bigger buffer)."""
    if a is None:
        return None
    big = cupy.zeros(tuple(2 * s for s in a.shape), dtype=dtype)
    view = big[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = cupy.asarray(np.asarray(a).astype(dtype))
    assert not view.flags.c_contiguous
    return view


def test_roi_non_contiguous_and_stream(rng):
    arrays, kw = roi_case(rng)
    grad_out = rng.standard_normal((7, 5, 3, 2))
    want = _roi_run(arrays, kw, grad_out, lambda a: to_gpu(a, np.float32), True)
    got = _roi_run(arrays, kw, grad_out, lambda a: _strided(a, np.float32), True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_stream = _roi_run(arrays, kw, grad_out, lambda a: to_gpu(a, np.float32), True)
    stream.synchronize()
    for res in (got, on_stream):
        np.testing.assert_array_equal(cupy.asnumpy(res[0]), cupy.asnumpy(want[0]))
        for g, w in zip(res[1], want[1]):
            np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


def test_roi_zeroimage_rois(rng):
    arrays, kw = roi_case(rng, r=0)
    x, rois, off, m = (to_gpu(arrays[k], np.float32) for k in ("input", "rois", "offset", "mask"))
    out = da.deform_roi_pool(x, rois, off, mask=m, **kw)
    assert out.shape == (0, 5, 3, 2)
    grads = da.deform_roi_pool_backward(cupy.zeros(out.shape, np.float32), x, rois, off, mask=m, **kw)
    assert grads.input.shape == x.shape and float(abs(grads.input).max()) == 0.0
    assert grads.offset.shape == off.shape and grads.mask.shape == m.shape


# ---------------------------------------------------------------------------------------
# deform_psroi_pool


def ps_case(
    rng,
    n=2,
    output_dim=4,
    group_size=2,
    pooled=3,
    part=None,
    spp=2,
    trans_std=0.15,
    scale=0.5,
    h=9,
    w=8,
    r=6,
    num_classes=2,
    offset=True,
    integer=True,
    offset_scale=1.0,
):
    part = pooled if part is None else part
    c = output_dim * group_size * group_size
    arrays = dict(
        input=rng.standard_normal((n, c, h, w)),
        rois=image_rois(rng, n, r, h, w, scale, integer),
        offset=rng.uniform(-offset_scale, offset_scale, (r, 2 * num_classes, part, part)) if offset else None,
    )
    kw = dict(
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled,
        part_size=part,
        sample_per_part=spp,
        trans_std=trans_std,
        spatial_scale=scale,
    )
    return arrays, kw


PS_CASES = {
    "two_classes": dict(),
    "no_offset": dict(offset=False),
    "part_smaller_than_pooled": dict(pooled=4, part=2, group_size=3, output_dim=2, num_classes=1, spp=3),
    "group_smaller_than_pooled": dict(pooled=5, part=5, group_size=2, output_dim=4, num_classes=4, spp=1),
    "float_rois_scale1": dict(integer=False, scale=1.0, spp=4),
    "large_offsets_leave_image": dict(offset_scale=5.0),
    "wider": dict(n=3, output_dim=8, group_size=3, pooled=3, spp=4, h=20, w=24, r=16, scale=0.25, num_classes=4),
}


def _ps_run(arrays, kw, grad_out, cast, deterministic):
    x, rois, off = (cast(arrays[k]) for k in ("input", "rois", "offset"))
    out = da.deform_psroi_pool(x, rois, off, **kw)
    grads = da.deform_psroi_pool_backward(cast(grad_out), x, rois, off, deterministic=deterministic, **kw)
    return out, grads


@MODES
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(PS_CASES))
def test_psroi_matches_numpy_backend(rng, name, dtype, deterministic):
    dt = dtype_of(dtype)
    arrays, kw = ps_case(rng, **PS_CASES[name])
    p = kw["pooled_size"]
    grad_out = rng.standard_normal((len(arrays["rois"]), kw["output_dim"], p, p))
    arrays, grad_out, (want_out, want) = _reference(
        arrays, grad_out, dt, lambda a, g, cast, det: _ps_run(a, kw, g, cast, det)
    )
    want_out, want = to_host64(want_out), [to_host64(g) for g in want]
    out, grads = _ps_run(arrays, kw, grad_out, lambda a: to_gpu(a, dt), deterministic)
    assert isinstance(out, cupy.ndarray) and out.dtype == dt
    assert_close(out, want_out, TOL[dtype], "output")
    for gname, g, wg in zip(("input", "offset"), grads, want):
        if g is not None:
            assert isinstance(g, cupy.ndarray) and g.dtype == dt, gname
        assert_close(g, wg, TOL[dtype], f"grad {gname}")


def test_psroi_matches_torchvision(rng):
    """No offset, group_size == pooled_size, RoIs whose samples all lie inside the image:
    MXNet's PS RoI pooling of RoI [x1, x2] (integers) samples at
    x1*s - 0.5 + j*bin + iw*bin/spp with bin = (x2 + 1 - x1)*s/P, and torchvision's
    ps_roi_align of the box [X1, X1 + x2 + 1 - x1] with sampling_ratio = spp at
    X1*s - 0.5 + j*bin + (iw + 0.5)*bin/spp: the same points for
    X1 = x1 - (x2 + 1 - x1)/(2*P*spp). Inside the image no sample is skipped (MXNet) or
    zeroed (torchvision), so both are the mean of the same spp**2 values."""
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    P, od, spp, s, h, w, n = 3, 3, 2, 0.5, 9, 8, 2
    x = rng.standard_normal((n, od * P * P, h, w))
    r = 8
    x1 = rng.integers(0, w / s - 4, r)
    y1 = rng.integers(0, h / s - 4, r)
    x2 = np.array([rng.integers(a, w / s - 1) for a in x1])  # (x2 + 1)*s <= w: inside
    y2 = np.array([rng.integers(a, h / s - 1) for a in y1])
    rois = np.stack([rng.integers(0, n, r), x1, y1, x2, y2], axis=1).astype(np.float64)
    wid, hei = x2 + 1 - x1, y2 + 1 - y1
    bx1 = x1 - wid / (2 * P * spp)
    by1 = y1 - hei / (2 * P * spp)
    boxes = np.stack([rois[:, 0], bx1, by1, bx1 + wid, by1 + hei], axis=1)
    kw = dict(output_dim=od, group_size=P, pooled_size=P, sample_per_part=spp, spatial_scale=s)
    gx, grois = to_gpu(x, np.float64), to_gpu(rois, np.float64)
    out = da.deform_psroi_pool(gx, grois, **kw)
    grad_out = to_gpu(rng.standard_normal(out.shape), np.float64)
    g_in = da.deform_psroi_pool_backward(grad_out, gx, grois, **kw).input
    tx = torch.from_dlpack(gx).clone().requires_grad_(True)
    t_out = tv_ops.ps_roi_align(
        tx, torch.from_dlpack(to_gpu(boxes, np.float64)), output_size=P, spatial_scale=s, sampling_ratio=spp
    )
    t_out.backward(torch.from_dlpack(grad_out))
    assert_close(out, t_out.detach().cpu().numpy(), 1e-10, "output")
    assert_close(g_in, tx.grad.cpu().numpy(), 1e-10, "grad input")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_psroi_deterministic_is_bitwise_repeatable(rng, dtype):
    arrays, kw = ps_case(rng, n=1, r=48, h=10, w=10, scale=1.0, spp=4)
    grad_out = rng.standard_normal((48, 4, 3, 3))
    x, rois, off = (to_gpu(arrays[k], dtype) for k in ("input", "rois", "offset"))
    go = to_gpu(grad_out, dtype)
    runs = [da.deform_psroi_pool_backward(go, x, rois, off, deterministic=True, **kw) for _ in range(5)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b).tobytes()


@MODES
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_psroi_chunked_equals_unchunked(rng, dtype, deterministic):
    arrays, kw = ps_case(rng, n=3, r=8)
    grad_out = rng.standard_normal((8, 4, 3, 3))
    cast = lambda a: to_gpu(a, dtype)  # noqa: E731
    full = _ps_run(arrays, kw, grad_out, cast, deterministic)
    tol = 1e-12 if dtype == "float64" else 2e-3
    for limit in (1, 5000, 60000):
        with da.workspace_limit(limit):
            chunked = _ps_run(arrays, kw, grad_out, cast, deterministic)
        assert_close(chunked[0], to_host64(full[0]), tol, f"output, limit {limit}")
        for gname, g, f in zip(("input", "offset"), chunked[1], full[1]):
            assert_close(g, to_host64(f), tol, f"grad {gname}, limit {limit}")


def test_psroi_non_contiguous_and_stream(rng):
    arrays, kw = ps_case(rng)
    grad_out = rng.standard_normal((6, 4, 3, 3))
    want = _ps_run(arrays, kw, grad_out, lambda a: to_gpu(a, np.float32), True)
    got = _ps_run(arrays, kw, grad_out, lambda a: _strided(a, np.float32), True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        on_stream = _ps_run(arrays, kw, grad_out, lambda a: to_gpu(a, np.float32), True)
    stream.synchronize()
    for res in (got, on_stream):
        np.testing.assert_array_equal(cupy.asnumpy(res[0]), cupy.asnumpy(want[0]))
        for g, w in zip(res[1], want[1]):
            np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


def test_psroi_zeroimage_rois(rng):
    arrays, kw = ps_case(rng, r=0)
    x, rois, off = (to_gpu(arrays[k], np.float16) for k in ("input", "rois", "offset"))
    out = da.deform_psroi_pool(x, rois, off, **kw)
    assert out.shape == (0, 4, 3, 3) and out.dtype == np.float16
    grads = da.deform_psroi_pool_backward(cupy.zeros(out.shape, np.float16), x, rois, off, **kw)
    assert grads.input.shape == x.shape and grads.offset.shape == off.shape
