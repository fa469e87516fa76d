"""The CUDA RoI pooling kernels and launch code, run on the CPU (no GPU needed).

``tests/cuda_emulation.py`` compiles ``kernels_cu/roi_pool.cu`` and ``kernels_cu/psroi_pool.cu``
with the host C++ compiler and runs ``deformarray/cuda/roi_pool.py`` /
``deformarray/cuda/psroi_pool.py`` on NumPy arrays through them. Compared with the NumPy
backend (``deformarray.cpu.roi_pool`` / ``psroi_pool``) and with the hand-derived float64
loops of ``tests/reference_roi.py``: forward and every gradient, both input-gradient paths
(atomic and deterministic), workspace chunking, 16-bit types, zero RoIs, non-contiguous
inputs. Independent of both: the input gradient is checked as the exact adjoint of the
(linear in the input) forward, and the offset / mask gradients by central differences.
What stays unchecked without a GPU: NVRTC code generation beyond compiling
(tests/test_nvrtc_compile.py), CuPy's own functions, concurrency.
"""

from __future__ import annotations

import numpy as np
import pytest

import deformarray
from deformarray._validate import PSRoiPoolParams, RoiPoolParams

cuda_emulation = pytest.importorskip("cuda_emulation")

if cuda_emulation.compiler() is None:  # pragma: no cover
    pytest.skip("no host C++ compiler (g++) for the kernel emulation", allow_module_level=True)

from checks import close, dtype_of  # noqa: E402
from reference_roi import image_rois  # noqa: E402

from deformarray.cuda import psroi_pool as cuda_psroi  # noqa: E402
from deformarray.cuda import roi_pool as cuda_roi  # noqa: E402

cpu_roi = pytest.importorskip("deformarray.cpu.roi_pool")
cpu_psroi = pytest.importorskip("deformarray.cpu.psroi_pool")


@pytest.fixture(scope="module")
def roi_be():
    return cuda_emulation.EmulatedBackend("roi_pool.cu")


@pytest.fixture(scope="module")
def ps_be():
    return cuda_emulation.EmulatedBackend("psroi_pool.cu")


# ---------------------------------------------------------------------------------------
# deform_roi_pool


def roi_case(
    rng,
    n=2,
    c=3,
    h=7,
    w=8,
    r=5,
    pooled=(3, 2),
    scale=0.5,
    ratio=0,
    gamma=0.2,
    offset=True,
    mask=True,
    integer=False,
    offset_scale=1.0,
    empty_roi=False,
):
    rois = image_rois(rng, n, r, h, w, scale, integer)
    if empty_roi:  # zero width: with sampling_ratio 0 its bins have no sample
        rois[0, 3] = rois[0, 1]
    ph, pw = pooled
    arrays = dict(
        input=rng.standard_normal((n, c, h, w)),
        rois=rois,
        offset=rng.uniform(-offset_scale, offset_scale, (r, 2, ph, pw)) if offset else None,
        mask=rng.uniform(0.2, 1.5, (r, 1, ph, pw)) if mask else None,
    )
    if integer and offset:
        arrays["offset"] = np.zeros((r, 2, ph, pw))  # samples on integer coordinates
    p = RoiPoolParams(
        n=n,
        c=c,
        h=h,
        w=w,
        r=r,
        pooled_h=ph,
        pooled_w=pw,
        spatial_scale=scale,
        sampling_ratio=ratio,
        gamma=gamma,
        has_offset=offset,
        has_mask=mask,
    )
    return p, arrays


def _cast(arrays, dtype):
    return {k: (None if v is None else np.asarray(v).astype(dtype)) for k, v in arrays.items()}


def _roi_emulated(be, p, arrays, grad_out, dtype, deterministic):
    a = _cast(arrays, dtype)
    out = cuda_roi._forward(be, p, a["input"], a["rois"], a["offset"], a["mask"])
    grads = cuda_roi._backward(
        be, p, grad_out.astype(dtype), a["input"], a["rois"], a["offset"], a["mask"], deterministic
    )
    return out, grads


def _roi_cpu(p, arrays, grad_out):
    a = _cast(arrays, np.float64)
    out = cpu_roi.forward(p, a["input"], a["rois"], a["offset"], a["mask"])
    grads = cpu_roi.backward(p, grad_out, a["input"], a["rois"], a["offset"], a["mask"])
    return out, grads


ROI_CASES = {
    "adaptive_offset_mask": dict(),
    "ratio2_plain": dict(ratio=2, offset=False, mask=False),
    "ratio3_offset_only": dict(ratio=3, mask=False, pooled=(2, 3), scale=1.0, h=6, w=9),
    "mask_only_empty_bins": dict(offset=False, empty_roi=True),
    # zero offsets, integer RoIs, scale 1: samples on integer coordinates, some exactly at 0
    # and at the last row / column (the one-sided derivative rules)
    "integer_samples": dict(integer=True, scale=1.0, pooled=(2, 2), r=6),
    "large_offsets_leave_image": dict(offset_scale=6.0, r=4),
}

GRAD_NAMES = ("input", "offset", "mask")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("name", sorted(ROI_CASES))
def test_roi_matches_cpu_backend(roi_be, name, deterministic):
    rng = np.random.default_rng(sum(map(ord, name)))
    p, arrays = roi_case(rng, **ROI_CASES[name])
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want = _roi_cpu(p, arrays, grad_out)
    out, grads = _roi_emulated(roi_be, p, arrays, grad_out, np.float64, deterministic)
    close(out, want_out, 1e-10, "output")
    for gname, g, wg in zip(GRAD_NAMES, grads, want):
        if wg is None:
            assert g is None, gname
        else:
            close(g, wg, 1e-10, f"grad {gname}")


def test_roi_matches_reference_loops(roi_be):
    reference_roi = pytest.importorskip("reference_roi")
    rng = np.random.default_rng(21)
    p, arrays = roi_case(rng, r=4, pooled=(2, 3), integer=False)
    grad_out = rng.standard_normal(p.out_shape)
    kw = dict(
        output_size=(p.pooled_h, p.pooled_w),
        spatial_scale=p.spatial_scale,
        sampling_ratio=p.sampling_ratio,
        gamma=p.gamma,
        mask=arrays["mask"],
    )
    want_out = reference_roi.ref_deform_roi_pool(arrays["input"], arrays["rois"], arrays["offset"], **kw)
    want = reference_roi.ref_deform_roi_pool_backward(grad_out, arrays["input"], arrays["rois"], arrays["offset"], **kw)
    out, grads = _roi_emulated(roi_be, p, arrays, grad_out, np.float64, True)
    close(out, want_out, 1e-10, "output")
    for gname, g, wg in zip(GRAD_NAMES, grads, want):
        close(g, wg, 1e-10, f"grad {gname}")


def test_roi_gradients_by_definition(roi_be):
    """Independent of any reference: the input gradient is the exact adjoint of the forward
    (linear in the input); offset and mask gradients match central differences."""
    rng = np.random.default_rng(5)
    p, arrays = roi_case(rng, scale=1.0, h=6, w=7, r=3)
    grad_out = rng.standard_normal(p.out_shape)
    _, (g_in, g_off, g_m) = _roi_emulated(roi_be, p, arrays, grad_out, np.float64, False)

    def loss(**changed):
        a = dict(arrays, **changed)
        return float(np.sum(grad_out * cuda_roi._forward(roi_be, p, a["input"], a["rois"], a["offset"], a["mask"])))

    d = rng.standard_normal(arrays["input"].shape)
    assert abs(loss(input=arrays["input"] + d) - loss() - float(np.sum(g_in * d))) < 1e-10 * (1 + abs(loss()))
    eps = 1e-6
    for name, grad in (("offset", g_off), ("mask", g_m)):
        base = arrays[name]
        for idx in [tuple(rng.integers(0, s) for s in base.shape) for _ in range(8)]:
            plus, minus = base.copy(), base.copy()
            plus[idx] += eps
            minus[idx] -= eps
            fd = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * eps)
            assert abs(fd - grad[idx]) < 1e-5 * (1 + abs(fd)), (name, idx, fd, grad[idx])


def _rounded(arrays, grad_out, dt):
    """The inputs rounded to dt, as float64: what the kernels see."""
    arrays = {k: (None if v is None else v.astype(dt).astype(np.float64)) for k, v in arrays.items()}
    return arrays, grad_out.astype(dt).astype(np.float64)


# Reduced precision. float32 is compared with the NumPy backend (float64 on the same
# float32 values). The 16-bit types are compared with the kernels' float32 run on the same
# rounded inputs: the kernels compute sample coordinates in float32, the NumPy backend in
# float64, and 16-bit offsets and RoIs put samples exactly on integer coordinates often
# enough that the two round to different sides of a pixel, where the one-sided offset
# derivative jumps (docs/cuda.md).


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_roi_reduced_precision(roi_be, dtype):
    dt = dtype_of(dtype)
    rng = np.random.default_rng(7)
    p, arrays = roi_case(rng, c=4, r=6)
    arrays, grad_out = _rounded(arrays, rng.standard_normal(p.out_shape), dt)
    if dtype == "float32":
        want_out, want = _roi_cpu(p, arrays, grad_out)
    else:
        want_out, want = _roi_emulated(roi_be, p, arrays, grad_out, np.float32, False)
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2.0**-7}[dtype]
    for deterministic in (False, True):
        out, grads = _roi_emulated(roi_be, p, arrays, grad_out, dt, deterministic)
        assert out.dtype == dt
        close(out, want_out, tol, "output")
        for gname, g, wg in zip(GRAD_NAMES, grads, want):
            assert g.dtype == dt, gname
            close(g, wg, tol, f"grad {gname}")


@pytest.mark.parametrize("ratio", [0, 2])  # per-RoI sample counts read back / fixed
@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_roi_chunking_matches_unchunked(roi_be, dtype, deterministic, ratio):
    """Image chunks (16-bit accumulator, deterministic row buffers) and bin chunks
    (deterministic entries) give the unchunked numbers."""
    rng = np.random.default_rng(11)
    p, arrays = roi_case(rng, n=3, r=7, ratio=ratio)
    grad_out = rng.standard_normal(p.out_shape)
    full_out, full = _roi_emulated(roi_be, p, arrays, grad_out, np.dtype(dtype), deterministic)
    for limit in (1, 3000, 20000):  # one image and one bin per chunk, a few bins, more
        with deformarray.workspace_limit(limit):
            out, grads = _roi_emulated(roi_be, p, arrays, grad_out, np.dtype(dtype), deterministic)
        tol = 1e-12 if dtype == "float64" else 2e-3
        close(out, full_out, tol, f"output, limit {limit}")
        for gname, g, f in zip(GRAD_NAMES, grads, full):
            close(g, f, tol, f"grad {gname}, limit {limit}")


def test_roi_deterministic_is_repeatable_and_close_to_atomic(roi_be):
    rng = np.random.default_rng(13)
    p, arrays = roi_case(rng, n=1, r=8, ratio=2)  # many RoIs on one image: shared pixels
    grad_out = rng.standard_normal(p.out_shape)
    first = _roi_emulated(roi_be, p, arrays, grad_out, np.float32, True)[1]
    again = _roi_emulated(roi_be, p, arrays, grad_out, np.float32, True)[1]
    with deformarray.workspace_limit(5000):  # several bin chunks
        chunked = _roi_emulated(roi_be, p, arrays, grad_out, np.float32, True)[1]
    atomic = _roi_emulated(roi_be, p, arrays, grad_out, np.float32, False)[1]
    for a, b, c, d in zip(first, again, chunked, atomic):
        assert a.tobytes() == b.tobytes()
        close(c, a, 1e-5, "chunked deterministic")
        close(d, a, 1e-5, "atomic vs deterministic")


def test_roi_zero_rois_and_empty(roi_be):
    rng = np.random.default_rng(1)
    p, arrays = roi_case(rng, r=0)
    out, (gi, go, gm) = _roi_emulated(roi_be, p, arrays, np.zeros(p.out_shape), np.float32, True)
    assert out.shape == p.out_shape and out.dtype == np.float32
    assert gi.shape == arrays["input"].shape and not gi.any()
    assert go.shape == (0, 2, 3, 2) and gm.shape == (0, 1, 3, 2)


def test_roi_batch_index_out_of_range_is_guarded(roi_be):
    """The API rejects such RoIs; the kernels still must not read outside the input."""
    rng = np.random.default_rng(2)
    p, arrays = roi_case(rng, r=3)
    arrays["rois"][1, 0] = 7  # N = 2
    arrays["rois"][2, 0] = -3
    grad_out = rng.standard_normal(p.out_shape)
    for det in (False, True):
        out, (gi, go, gm) = _roi_emulated(roi_be, p, arrays, grad_out, np.float64, det)
        assert not out[1:].any() and not go[1:].any() and not gm[1:].any()
        keep = dict(arrays, rois=arrays["rois"][:1], offset=arrays["offset"][:1], mask=arrays["mask"][:1])
        p1 = RoiPoolParams(**{**p.__dict__, "r": 1})
        _, (gi1, _, _) = _roi_emulated(roi_be, p1, keep, grad_out[:1], np.float64, det)
        np.testing.assert_array_equal(gi, gi1)


def test_roi_non_contiguous(roi_be):
    rng = np.random.default_rng(9)
    p, arrays = roi_case(rng)
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want = _roi_emulated(roi_be, p, arrays, grad_out, np.float64, True)
    f = {k: np.asfortranarray(v) for k, v in arrays.items()}
    out = cuda_roi._forward(roi_be, p, f["input"], f["rois"], f["offset"], f["mask"])
    grads = cuda_roi._backward(
        roi_be, p, np.asfortranarray(grad_out), f["input"], f["rois"], f["offset"], f["mask"], True
    )
    np.testing.assert_array_equal(out, want_out)
    for g, w in zip(grads, want):
        np.testing.assert_array_equal(g, w)


def test_cut_bounds_cost():
    cut = cuda_roi._cut
    assert list(cut(np.array([3, 3, 3, 3, 3]), 7)) == [(0, 2), (2, 4), (4, 5)]
    assert list(cut(np.array([10, 1, 1]), 5)) == [(0, 1), (1, 3)]  # one item may exceed it
    assert list(cut(np.array([1, 1]), 100)) == [(0, 2)]
    assert list(cuda_roi._image_chunks(5, 10, 25)) == [(0, 2), (2, 2), (4, 1)]
    assert list(cuda_roi._image_chunks(2, 10, 3)) == [(0, 1), (1, 1)]


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
    h=8,
    w=7,
    r=5,
    num_classes=2,
    offset=True,
    integer=True,
    offset_scale=1.0,
    on_grid=False,
):
    part = pooled if part is None else part
    c = output_dim * group_size * group_size
    rois = image_rois(rng, n, r, h, w, scale, integer)
    if on_grid:
        # scale 1, RoIs [x1, x1 + 1] (width 2), pooled 2, spp 2, zero offsets: sub-bins of
        # 0.5 put every other sample on an integer coordinate, including 0 and W-1 / H-1
        assert scale == 1.0 and pooled == 2 and spp == 2
        rois[:, 1] = rng.integers(0, w - 1, r)
        rois[:, 2] = rng.integers(0, h - 1, r)
        rois[0, 1:3] = 0
        rois[1, 1:3] = (w - 2, h - 2)
        rois[:, 3] = rois[:, 1] + 1
        rois[:, 4] = rois[:, 2] + 1
        offset_scale = 0.0
    arrays = dict(
        input=rng.standard_normal((n, c, h, w)),
        rois=rois,
        offset=rng.uniform(-offset_scale, offset_scale, (r, 2 * num_classes, part, part)) if offset else None,
    )
    p = PSRoiPoolParams(
        n=n,
        c=c,
        h=h,
        w=w,
        r=r,
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled,
        part_size=part,
        sample_per_part=spp,
        trans_std=trans_std,
        spatial_scale=scale,
        num_classes=num_classes if offset else 1,
        has_offset=offset,
    )
    return p, arrays


def _ps_emulated(be, p, arrays, grad_out, dtype, deterministic):
    a = _cast(arrays, dtype)
    out = cuda_psroi._forward(be, p, a["input"], a["rois"], a["offset"])
    grads = cuda_psroi._backward(be, p, grad_out.astype(dtype), a["input"], a["rois"], a["offset"], deterministic)
    return out, grads


def _ps_cpu(p, arrays, grad_out):
    a = _cast(arrays, np.float64)
    out = cpu_psroi.forward(p, a["input"], a["rois"], a["offset"])
    grads = cpu_psroi.backward(p, grad_out, a["input"], a["rois"], a["offset"])
    return out, grads


PS_CASES = {
    "two_classes": dict(),
    "no_offset": dict(offset=False),
    "part_smaller_than_pooled": dict(pooled=4, part=2, group_size=3, output_dim=2, num_classes=1, spp=3),
    "group_smaller_than_pooled": dict(pooled=5, part=5, group_size=2, output_dim=4, num_classes=4, spp=1),
    "float_rois_scale1": dict(integer=False, scale=1.0, spp=4),
    "large_offsets_leave_image": dict(offset_scale=5.0),
    "integer_samples": dict(on_grid=True, scale=1.0, pooled=2, spp=2),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("name", sorted(PS_CASES))
def test_psroi_matches_cpu_backend(ps_be, name, deterministic):
    rng = np.random.default_rng(sum(map(ord, name)))
    p, arrays = ps_case(rng, **PS_CASES[name])
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want = _ps_cpu(p, arrays, grad_out)
    out, grads = _ps_emulated(ps_be, p, arrays, grad_out, np.float64, deterministic)
    close(out, want_out, 1e-10, "output")
    for gname, g, wg in zip(("input", "offset"), grads, want):
        if wg is None:
            assert g is None, gname
        else:
            close(g, wg, 1e-10, f"grad {gname}")


def test_psroi_matches_reference_loops(ps_be):
    reference_roi = pytest.importorskip("reference_roi")
    rng = np.random.default_rng(22)
    p, arrays = ps_case(rng, r=3, pooled=3, part=2, spp=2)
    grad_out = rng.standard_normal(p.out_shape)
    kw = dict(
        output_dim=p.output_dim,
        group_size=p.group_size,
        pooled_size=p.pooled_size,
        part_size=p.part_size,
        sample_per_part=p.sample_per_part,
        trans_std=p.trans_std,
        spatial_scale=p.spatial_scale,
    )
    want_out = reference_roi.ref_deform_psroi_pool(arrays["input"], arrays["rois"], arrays["offset"], **kw)
    want = reference_roi.ref_deform_psroi_pool_backward(
        grad_out, arrays["input"], arrays["rois"], arrays["offset"], **kw
    )
    out, grads = _ps_emulated(ps_be, p, arrays, grad_out, np.float64, True)
    close(out, want_out, 1e-10, "output")
    for gname, g, wg in zip(("input", "offset"), grads, want):
        close(g, wg, 1e-10, f"grad {gname}")


def test_psroi_gradients_by_definition(ps_be):
    rng = np.random.default_rng(6)
    p, arrays = ps_case(rng, integer=False, scale=1.0, r=3, spp=3)
    grad_out = rng.standard_normal(p.out_shape)
    _, (g_in, g_off) = _ps_emulated(ps_be, p, arrays, grad_out, np.float64, True)

    def loss(**changed):
        a = dict(arrays, **changed)
        return float(np.sum(grad_out * cuda_psroi._forward(ps_be, p, a["input"], a["rois"], a["offset"])))

    d = rng.standard_normal(arrays["input"].shape)
    assert abs(loss(input=arrays["input"] + d) - loss() - float(np.sum(g_in * d))) < 1e-10 * (1 + abs(loss()))
    eps = 1e-6
    base = arrays["offset"]
    for idx in [tuple(rng.integers(0, s) for s in base.shape) for _ in range(10)]:
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (loss(offset=plus) - loss(offset=minus)) / (2 * eps)
        assert abs(fd - g_off[idx]) < 1e-5 * (1 + abs(fd)), (idx, fd, g_off[idx])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_psroi_reduced_precision(ps_be, dtype):
    dt = dtype_of(dtype)
    rng = np.random.default_rng(8)
    p, arrays = ps_case(rng, integer=False, scale=1.0)
    arrays, grad_out = _rounded(arrays, rng.standard_normal(p.out_shape), dt)
    if dtype == "float32":
        want_out, want = _ps_cpu(p, arrays, grad_out)
    else:  # see test_roi_reduced_precision
        want_out, want = _ps_emulated(ps_be, p, arrays, grad_out, np.float32, False)
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2.0**-7}[dtype]
    for deterministic in (False, True):
        out, grads = _ps_emulated(ps_be, p, arrays, grad_out, dt, deterministic)
        assert out.dtype == dt
        close(out, want_out, tol, "output")
        for gname, g, wg in zip(("input", "offset"), grads, want):
            assert g.dtype == dt, gname
            close(g, wg, tol, f"grad {gname}")


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_psroi_chunking_matches_unchunked(ps_be, dtype, deterministic):
    rng = np.random.default_rng(12)
    p, arrays = ps_case(rng, n=3, r=6)
    grad_out = rng.standard_normal(p.out_shape)
    full_out, full = _ps_emulated(ps_be, p, arrays, grad_out, np.dtype(dtype), deterministic)
    for limit in (1, 5000, 60000):
        with deformarray.workspace_limit(limit):
            out, grads = _ps_emulated(ps_be, p, arrays, grad_out, np.dtype(dtype), deterministic)
        tol = 1e-12 if dtype == "float64" else 2e-3
        close(out, full_out, tol, f"output, limit {limit}")
        for gname, g, f in zip(("input", "offset"), grads, full):
            close(g, f, tol, f"grad {gname}, limit {limit}")


def test_psroi_zero_rois(ps_be):
    rng = np.random.default_rng(3)
    p, arrays = ps_case(rng, r=0)
    out, (gi, go) = _ps_emulated(ps_be, p, arrays, np.zeros(p.out_shape), np.float16, True)
    assert out.shape == p.out_shape and out.dtype == np.float16
    assert gi.shape == arrays["input"].shape and not gi.any() and go.shape == arrays["offset"].shape


def test_psroi_batch_index_out_of_range_is_guarded(ps_be):
    rng = np.random.default_rng(4)
    p, arrays = ps_case(rng, r=2)
    arrays["rois"][1, 0] = 2  # N = 2
    grad_out = rng.standard_normal(p.out_shape)
    for det in (False, True):
        out, (gi, go) = _ps_emulated(ps_be, p, arrays, grad_out, np.float64, det)
        assert not out[1].any() and not go[1].any()


def test_psroi_non_contiguous(ps_be):
    rng = np.random.default_rng(10)
    p, arrays = ps_case(rng)
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want = _ps_emulated(ps_be, p, arrays, grad_out, np.float64, True)
    f = {k: np.asfortranarray(v) for k, v in arrays.items()}
    out = cuda_psroi._forward(ps_be, p, f["input"], f["rois"], f["offset"])
    grads = cuda_psroi._backward(ps_be, p, np.asfortranarray(grad_out), f["input"], f["rois"], f["offset"], True)
    np.testing.assert_array_equal(out, want_out)
    for g, w in zip(grads, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("limit", [None, 5000], ids=["whole", "chunked"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_roi_results_do_not_depend_on_thread_order(roi_be, deterministic, limit):
    """Forward and gradients with the kernels' threads run forwards and backwards: the same
    bits, except the float-atomic input gradient (rounding only)."""
    rng = np.random.default_rng(22)
    p, arrays = roi_case(rng, n=1, r=8, ratio=2)  # overlapping RoIs on one image
    grad_out = rng.standard_normal(p.out_shape)
    with cuda_emulation.workspace_bound(limit):
        cuda_emulation.assert_thread_order_free(
            roi_be,
            lambda: _roi_emulated(roi_be, p, arrays, grad_out, np.float32, deterministic),
            GRAD_NAMES,
            atomic=() if deterministic else ("input",),
        )


@pytest.mark.parametrize("limit", [None, 5000], ids=["whole", "chunked"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_psroi_results_do_not_depend_on_thread_order(ps_be, deterministic, limit):
    """As for deform_roi_pool; psroi's offset gradient is gathered per (RoI, class, part),
    without atomics, so it too must keep its bits."""
    rng = np.random.default_rng(23)
    p, arrays = ps_case(rng, n=1, r=8, integer=False)
    grad_out = rng.standard_normal(p.out_shape)
    with cuda_emulation.workspace_bound(limit):
        cuda_emulation.assert_thread_order_free(
            ps_be,
            lambda: _ps_emulated(ps_be, p, arrays, grad_out, np.float32, deterministic),
            ("input", "offset"),
            atomic=() if deterministic else ("input",),
        )


def _metered_peaks(be, limits, forward, backward):
    """{limit: (forward bytes, backward bytes)} the launch code allocates beyond its results."""
    peaks = {}
    for limit in limits:
        with cuda_emulation.workspace_bound(limit):
            with be.metered() as fwd:
                out = forward()
            with be.metered() as bwd:
                grads = backward()
        peaks[limit] = (fwd.peak - out.nbytes, bwd.peak - sum(g.nbytes for g in grads if g is not None))
    return peaks


@pytest.mark.parametrize(
    "dtype, deterministic", [("float32", True), ("float16", False), ("float16", True)], ids=lambda v: str(v)
)
def test_roi_launch_code_allocates_within_the_workspace_bound(roi_be, dtype, deterministic):
    """Forward: nothing beyond the output. Backward: within the bound of docs/cuda.md, at
    bounds of several images, one image and a few bins per chunk (the 16-bit accumulators
    and the entry lists); unbounded, the deterministic lists take several times more."""
    rng = np.random.default_rng(32)
    p, arrays = roi_case(rng, n=6, c=8, h=12, w=12, r=20, pooled=(3, 3), ratio=2, scale=1.0)
    a = _cast(arrays, dtype)
    go = rng.standard_normal(p.out_shape).astype(dtype)
    limits = (None, 200_000, 40_000, 20_000, 6000)
    if deterministic:
        limits = limits[:-1]  # 6000 is below two images' rows and accumulators (the minimum)
    peaks = _metered_peaks(
        roi_be,
        limits,
        lambda: cuda_roi._forward(roi_be, p, a["input"], a["rois"], a["offset"], a["mask"]),
        lambda: cuda_roi._backward(roi_be, p, go, a["input"], a["rois"], a["offset"], a["mask"], deterministic),
    )
    for limit, (fwd, bwd) in peaks.items():
        assert fwd == 0, (limit, fwd)
        if limit is not None:
            assert bwd <= limit, (limit, bwd)
    if deterministic:  # the bound is what kept the entry lists small
        assert peaks[None][1] > 3 * peaks[limits[-1]][1], peaks


@pytest.mark.parametrize(
    "dtype, deterministic", [("float32", True), ("float16", False), ("float16", True)], ids=lambda v: str(v)
)
def test_psroi_launch_code_allocates_within_the_workspace_bound(ps_be, dtype, deterministic):
    """As for deform_roi_pool."""
    rng = np.random.default_rng(33)
    p, arrays = ps_case(rng, n=4, output_dim=4, group_size=2, pooled=3, spp=2, h=10, w=10, r=12)
    a = _cast(arrays, dtype)
    go = rng.standard_normal(p.out_shape).astype(dtype)
    # deterministic: one image's rows take 38 KB (45 KB in float16), and must fit half the bound
    limits = (None, 400_000, 120_000) if deterministic else (None, 20_000, 7000)
    peaks = _metered_peaks(
        ps_be,
        limits,
        lambda: cuda_psroi._forward(ps_be, p, a["input"], a["rois"], a["offset"]),
        lambda: cuda_psroi._backward(ps_be, p, go, a["input"], a["rois"], a["offset"], deterministic),
    )
    for limit, (fwd, bwd) in peaks.items():
        assert fwd == 0, (limit, fwd)
        if limit is not None:
            assert bwd <= limit, (limit, bwd)
    if deterministic:
        assert peaks[None][1] > 3 * peaks[limits[-1]][1], peaks
