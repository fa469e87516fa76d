"""deform_roi_pool / deform_roi_pool_backward on NumPy arrays.

- mmcv's published DeformRoIPool values;
- forward and every gradient against the float64 loops of reference_roi.py (random RoIs:
  inside, smaller than a pixel, larger than the image, partly outside, zero-sized);
- samples exactly on the kinks (integers, 0, H-1) and on the borders -1 and H;
- the backward is the adjoint of the forward (input, mask) and matches central finite
  differences (input, offset, mask) away from the kinks;
- Hypothesis over RoI sizes; R = 0; non-contiguous arrays; unused images; NaN offsets;
- bitwise determinism (also across thread counts and workspace bounds), bounded workspace.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from checks import DTYPES, VIEWS, assert_close, traced_peak
from edges import edge_coordinate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_roi import (
    random_rois,
    ref_deform_roi_pool,
    ref_deform_roi_pool_backward,
    roi_bins,
)

import deformarray as da

GRAD_NAMES = ("input", "offset", "mask")


def make_case(
    rng,
    n=2,
    c=3,
    height=7,
    width=8,
    r=6,
    pooled=(3, 2),
    spatial_scale=0.5,
    sampling_ratio=0,
    gamma=0.1,
    offset=True,
    mask=True,
    offset_scale=1.0,
    kinds=("inside", "tiny", "large", "partial", "degenerate"),
    dtype=np.float64,
):
    """(arrays dict: input, rois, offset, mask; keyword dict) for one random call."""
    ph, pw = pooled
    arrays = dict(
        input=rng.standard_normal((n, c, height, width)).astype(dtype),
        rois=random_rois(rng, r, n, height, width, spatial_scale, kinds).astype(dtype),
        offset=(offset_scale * rng.standard_normal((r, 2, ph, pw))).astype(dtype) if offset else None,
        mask=rng.uniform(0.2, 1.0, (r, 1, ph, pw)).astype(dtype) if mask else None,
    )
    kw = dict(output_size=pooled, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma)
    return arrays, kw


def run_forward(a, kw):
    return da.deform_roi_pool(a["input"], a["rois"], a["offset"], mask=a["mask"], **kw)


def run_backward(go, a, kw, **extra):
    return da.deform_roi_pool_backward(go, a["input"], a["rois"], a["offset"], mask=a["mask"], **kw, **extra)


def check_against_reference(a, kw, rng, dtype):
    y = run_forward(a, kw)
    y_ref = ref_deform_roi_pool(a["input"], a["rois"], a["offset"], mask=a["mask"], **kw)
    assert_close(y, y_ref, dtype, "output")
    go = rng.standard_normal(y_ref.shape).astype(dtype)
    grads = run_backward(go, a, kw)
    assert isinstance(grads, da.DeformRoiPoolGrads)
    ref = ref_deform_roi_pool_backward(go, a["input"], a["rois"], a["offset"], mask=a["mask"], **kw)
    for name in GRAD_NAMES:
        assert_close(getattr(grads, name), getattr(ref, name), dtype, f"grad {name}")
    return y, grads


# ---------------------------------------------------------------------------------------
# mmcv's published values (tests/test_ops/test_deform_roi_pool.py of mmcv: DeformRoIPoolPack,
# whose offset layer starts at zero; 2x2 output, spatial_scale 1, sampling_ratio 2, gamma 0.1)
# ---------------------------------------------------------------------------------------

MMCV_CASES = [
    (
        [[[[1.0, 2.0], [3.0, 4.0]]]],
        [[0.0, 0.0, 0.0, 1.0, 1.0]],
        [[[[1, 1.25], [1.5, 1.75]]]],
        [[[[3.0625, 0.4375], [0.4375, 0.0625]]]],
    ),
    (
        [[[[1.0, 2.0], [3.0, 4.0]], [[4.0, 3.0], [2.0, 1.0]]]],
        [[0.0, 0.0, 0.0, 1.0, 1.0]],
        [[[[1.0, 1.25], [1.5, 1.75]], [[4, 3.75], [3.5, 3.25]]]],
        [[[[3.0625, 0.4375], [0.4375, 0.0625]], [[3.0625, 0.4375], [0.4375, 0.0625]]]],
    ),
    (
        [[[[1.0, 2.0, 5.0, 6.0], [3.0, 4.0, 7.0, 8.0], [9.0, 10.0, 13.0, 14.0], [11.0, 12.0, 15.0, 16.0]]]],
        [[0.0, 0.0, 0.0, 3.0, 3.0]],
        [[[[1.9375, 4.75], [7.5625, 10.375]]]],
        [
            [
                [
                    [0.47265625, 0.4296875, 0.4296875, 0.04296875],
                    [0.4296875, 0.390625, 0.390625, 0.0390625],
                    [0.4296875, 0.390625, 0.390625, 0.0390625],
                    [0.04296875, 0.0390625, 0.0390625, 0.00390625],
                ]
            ]
        ],
    ),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("case", range(len(MMCV_CASES)))
@pytest.mark.parametrize("with_offset", [False, True], ids=["no_offset", "zero_offset"])
def test_mmcv_published_values(case, with_offset, dtype):
    x, rois, want_y, want_gx = (np.array(v, dtype=dtype) for v in MMCV_CASES[case])
    off = np.zeros((1, 2, 2, 2), dtype=dtype) if with_offset else None
    kw = dict(output_size=(2, 2), spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
    y = da.deform_roi_pool(x, rois, off, **kw)
    assert y.dtype == np.dtype(dtype) and y.shape == want_y.shape
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    g = da.deform_roi_pool_backward(np.ones_like(y), x, rois, off, **kw)
    np.testing.assert_allclose(g.input, want_gx, rtol=1e-6)
    assert g.mask is None and (g.offset is None) == (not with_offset)


def test_defaults_are_mmcv_defaults(rng):
    """output_size (7, 7), spatial_scale 1, sampling_ratio 0, gamma 0.1."""
    a, _ = make_case(rng, r=3, pooled=(7, 7), spatial_scale=1.0, kinds=("inside",))
    y = da.deform_roi_pool(a["input"], a["rois"], a["offset"], mask=a["mask"])
    kw = dict(output_size=(7, 7), spatial_scale=1.0, sampling_ratio=0, gamma=0.1)
    assert y.shape == (3, 3, 7, 7)
    np.testing.assert_array_equal(y, run_forward(a, kw))


# ---------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------

CASES = {
    "offset_mask_adaptive": dict(),
    "offset_mask_ratio2": dict(sampling_ratio=2),
    "offset_only": dict(mask=False, sampling_ratio=1),
    "mask_only": dict(offset=False),
    "plain": dict(offset=False, mask=False, pooled=(2, 2)),
    "large_offsets_scale1": dict(spatial_scale=1.0, offset_scale=4.0, gamma=0.3, r=5),
    "square_7x7_one_image": dict(n=1, pooled=(7, 7), r=3, c=2, sampling_ratio=1),
    "tiny_rois_ratio3": dict(kinds=("tiny",), sampling_ratio=3, r=4),
    "negative_gamma_single_pixel_rows": dict(height=1, width=5, gamma=-0.2, r=4),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("geom", list(CASES.values()), ids=list(CASES))
def test_matches_reference(geom, dtype, rng):
    a, kw = make_case(rng, dtype=dtype, **geom)
    check_against_reference(a, kw, rng, dtype)


@pytest.mark.parametrize("with_mask", [False, True], ids=["plain", "modulated"])
def test_samples_on_kinks_and_borders(with_mask, rng):
    """One sample per bin, placed exactly on -1.5, -1, -0.5, 0, integers, H-1, H-0.5, H, H+1
    (same for x): the clamp, the discontinuity at -1 / H and the one-sided derivatives."""
    H, W = 5, 6
    targets_y = [-1.5, -1.0, -0.5, 0.0, 1.0, 2.5, H - 1.0, H - 0.5, float(H), H + 1.0]
    targets_x = [-1.5, -1.0, -0.5, 0.0, 2.0, 3.5, W - 1.0, W - 0.5, float(W), W + 1.0]
    x = rng.standard_normal((1, 3, H, W))
    # a 1x1-bin RoI of size 2 (spatial_scale 1): its one sample (sampling_ratio 1) is its
    # centre, (y1 + y2)/2 - 0.5; the offset is zero so every target is hit exactly
    rois = np.array([[0.0, tx - 0.5, ty - 0.5, tx + 1.5, ty + 1.5] for ty in targets_y for tx in targets_x])
    r = len(rois)
    off = np.zeros((r, 2, 1, 1))
    mask = rng.uniform(0.5, 1.0, (r, 1, 1, 1)) if with_mask else None
    a = dict(input=x, rois=rois, offset=off, mask=mask)
    kw = dict(output_size=1, spatial_scale=1.0, sampling_ratio=1, gamma=0.1)
    for (i, j), (ty, tx) in zip(
        np.ndindex(len(targets_y), len(targets_x)), [(ty, tx) for ty in targets_y for tx in targets_x]
    ):
        _, bins = roi_bins(rois, i * len(targets_x) + j, (1, 1), 1.0, 1, 0.1, off)
        assert bins[0][2] == [(ty, tx)]
    y, _ = check_against_reference(a, kw, rng, np.float64)
    # hand-checked values: clamped inside [-1, H], zero outside
    m = mask[:, 0, 0, 0] if with_mask else np.ones(r)
    k = 0
    for ty in targets_y:
        for tx in targets_x:
            if ty < -1 or ty > H or tx < -1 or tx > W:
                assert np.all(y[k, :, 0, 0] == 0.0), (ty, tx)
            elif float(ty).is_integer() and float(tx).is_integer():
                qy, qx = int(min(max(ty, 0), H - 1)), int(min(max(tx, 0), W - 1))
                np.testing.assert_allclose(y[k, :, 0, 0], m[k] * x[0, :, qy, qx], rtol=1e-14)
            k += 1


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_zero_rois(dtype, rng):
    a, kw = make_case(rng, r=0, dtype=dtype)
    y = run_forward(a, kw)
    assert y.shape == (0, 3, 3, 2) and y.dtype == np.dtype(dtype)
    grads = run_backward(np.zeros(y.shape, dtype), a, kw)
    for name in GRAD_NAMES:
        arr = getattr(grads, name)
        assert arr.shape == a[name].shape and arr.dtype == np.dtype(dtype), name
        assert not arr.any(), name


def test_zero_channels(rng):
    a, kw = make_case(rng, c=0, r=3)
    y = run_forward(a, kw)
    assert y.shape == (3, 0, 3, 2)
    grads = run_backward(np.zeros(y.shape), a, kw)
    assert grads.input.shape == a["input"].shape
    assert not grads.offset.any() and not grads.mask.any()


def test_images_without_rois_get_zero_gradient(rng):
    a, kw = make_case(rng, n=4, r=4, kinds=("inside",))
    a["rois"][:, 0] = [2, 0, 2, 0]
    y, grads = check_against_reference(a, kw, rng, np.float64)
    assert not grads.input[[1, 3]].any()
    assert grads.input[[0, 2]].any()


def test_empty_bins_give_zero_and_zero_gradient(rng):
    """sampling_ratio 0 and a zero-height RoI: ceil(0 / ph) = 0 samples per bin. mmcv's
    backward divides by zero there; we give 0 and zero gradients, whatever the mask."""
    a, kw = make_case(rng, r=2, kinds=("degenerate",))
    a["rois"][:, 4] = a["rois"][:, 2]  # zero height for both
    a["mask"][...] = np.nan  # never read: 0 * (no samples)
    y = run_forward(a, kw)
    assert np.all(y == 0.0)
    grads = run_backward(np.ones_like(y), a, kw)
    for name in GRAD_NAMES:
        assert np.all(getattr(grads, name) == 0.0), name


def test_nan_offset_samples_zero(rng):
    """A NaN offset puts the bin's samples nowhere: they give 0 and zero gradients."""
    a, kw = make_case(rng, r=3, kinds=("inside",), sampling_ratio=2)
    a["offset"][1, :, 0, 1] = np.nan
    y = run_forward(a, kw)
    assert np.all(y[1, :, 0, 1] == 0.0)
    assert np.isfinite(y).all()
    grads = run_backward(np.ones_like(y), a, kw)
    for name in GRAD_NAMES:
        assert np.isfinite(getattr(grads, name)).all(), name
    assert np.all(grads.offset[1, :, 0, 1] == 0.0) and grads.mask[1, 0, 0, 1] == 0.0


# ---------------------------------------------------------------------------------------
# Gradients by definition (float64): adjoint and central differences away from the kinks
# ---------------------------------------------------------------------------------------


def _loss(go, a, kw, **changed):
    b = dict(a, **changed)
    return float(np.sum(go * run_forward(b, kw)))


def _bins_away_from_kinks(a, kw, delta):
    """(r, i, j) of the bins all of whose sample coordinates are at least delta from an
    integer (the kinks: integers, the clamp at 0 and H-1, the jump at -1 and H)."""
    clean = []
    for r in range(len(a["rois"])):
        _, bins = roi_bins(
            a["rois"], r, kw["output_size"], kw["spatial_scale"], kw["sampling_ratio"], kw["gamma"], a["offset"]
        )
        for i, j, pts, count, _, _ in bins:
            if count and all(abs(t - round(t)) >= delta for pt in pts for t in pt):
                clean.append((r, i, j))
    return clean


def test_adjoint_input_and_mask(rng):
    """The forward is linear in the input and in the mask: <go, f(x)> = <grad_x, x>."""
    a, kw = make_case(rng, r=8, sampling_ratio=0, offset_scale=2.0)
    go = rng.standard_normal(run_forward(a, kw).shape)
    grads = run_backward(go, a, kw)
    base = _loss(go, a, kw)
    assert abs(base - float(np.sum(grads.input * a["input"]))) <= 1e-12 * (1 + abs(base))
    assert abs(base - float(np.sum(grads.mask * a["mask"]))) <= 1e-12 * (1 + abs(base))
    d = rng.standard_normal(a["input"].shape)
    lin = _loss(go, a, kw, input=a["input"] + d) - base
    assert abs(lin - float(np.sum(grads.input * d))) <= 1e-11 * (1 + abs(base))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_central_differences(sampling_ratio, rng):
    a, kw = make_case(
        rng,
        r=6,
        sampling_ratio=sampling_ratio,
        spatial_scale=1.0,
        gamma=0.2,
        offset_scale=2.0,
        kinds=("inside", "tiny", "large", "partial"),
    )
    go = rng.standard_normal(run_forward(a, kw).shape)
    grads = run_backward(go, a, kw)
    eps = 1e-6
    # offset: only bins whose samples stay clear of the kinks while moving by
    # gamma * roi_size * eps (roi sizes here are below 20)
    clean = _bins_away_from_kinks(a, kw, delta=1e-3)
    assert len(clean) >= 10, len(clean)
    for r, i, j in clean:
        for ch in (0, 1):
            up, down = a["offset"].copy(), a["offset"].copy()
            up[r, ch, i, j] += eps
            down[r, ch, i, j] -= eps
            fd = (_loss(go, a, kw, offset=up) - _loss(go, a, kw, offset=down)) / (2 * eps)
            assert abs(fd - grads.offset[r, ch, i, j]) <= 1e-6 * (1 + abs(fd)), (r, ch, i, j)
    n_moving = np.count_nonzero(grads.offset)
    assert n_moving > 10
    # input and mask (linear: central differences are exact up to rounding)
    for name in ("input", "mask"):
        arr = a[name]
        for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(8)]:
            up, down = arr.copy(), arr.copy()
            up[idx] += eps
            down[idx] -= eps
            fd = (_loss(go, a, kw, **{name: up}) - _loss(go, a, kw, **{name: down})) / (2 * eps)
            assert abs(fd - getattr(grads, name)[idx]) <= 1e-6 * (1 + abs(fd)), (name, idx)


# ---------------------------------------------------------------------------------------
# Hypothesis over RoI sizes
# ---------------------------------------------------------------------------------------

SETTINGS = settings(deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    box=st.tuples(st.floats(-6, 12), st.floats(-6, 12), st.floats(0, 16), st.floats(0, 16)),
    scale=st.sampled_from([0.25, 0.5, 1.0]),
    ratio=st.integers(0, 3),
    pooled=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    seed=st.integers(0, 2**32 - 1),
)
def test_roi_sizes_property(box, scale, ratio, pooled, seed):
    """Any box size (from zero to larger than the image, anywhere) matches the reference."""
    rng = np.random.default_rng(seed)
    x1, y1, w, h = box
    a = dict(
        input=rng.standard_normal((1, 2, 5, 6)),
        rois=np.array([[0.0, x1, y1, x1 + w, y1 + h]]),
        offset=rng.standard_normal((1, 2) + pooled),
        mask=rng.uniform(0, 1, (1, 1) + pooled),
    )
    kw = dict(output_size=pooled, spatial_scale=scale, sampling_ratio=ratio, gamma=0.1)
    check_against_reference(a, kw, rng, np.float64)


@SETTINGS
@given(
    points=st.lists(st.tuples(edge_coordinate(4), edge_coordinate(8)), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    with_mask=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_edge_sample_points_property(points, dtype, with_mask, seed):
    """One sample per RoI, on or one ulp either side of -1, 0, H-1, H, an integer, or at a
    tiny negative (H = 4, W = 8: powers of two), where a floor by truncation or by adding
    and subtracting goes wrong: forward and gradients match the reference. The RoI is the
    size-2 box centred on the target, so the sample sits on it up to the rounding of
    ``target - 0.5``; the reference computes the same coordinate."""
    rng = np.random.default_rng(seed)
    H, W = 4, 8
    rois = np.array([[0.0, tx - 0.5, ty - 0.5, tx + 1.5, ty + 1.5] for ty, tx in points])
    r = len(rois)
    a = dict(
        input=rng.standard_normal((2, 3, H, W)).astype(dtype),
        rois=rois.astype(dtype),
        offset=np.zeros((r, 2, 1, 1), dtype),
        mask=rng.uniform(0.5, 1.0, (r, 1, 1, 1)).astype(dtype) if with_mask else None,
    )
    a["input"][1] = 1000.0  # a read past the first image's plane shows
    kw = dict(output_size=1, spatial_scale=1.0, sampling_ratio=1, gamma=0.1)
    check_against_reference(a, kw, rng, dtype)


# ---------------------------------------------------------------------------------------
# Layouts, determinism, workspace
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@VIEWS
def test_non_contiguous_inputs(make_view, dtype, rng):
    a, kw = make_case(rng, dtype=dtype)
    go = rng.standard_normal(run_forward(a, kw).shape).astype(dtype)
    y = run_forward(a, kw)
    grads = run_backward(go, a, kw)
    view = {k: make_view(v) for k, v in a.items()}
    for k in a:
        assert np.array_equal(view[k], a[k])
    y_v = run_forward(view, kw)
    grads_v = run_backward(make_view(go), view, kw)
    assert y_v.tobytes() == y.tobytes()
    for name in GRAD_NAMES:
        assert getattr(grads_v, name).tobytes() == getattr(grads, name).tobytes(), name


def test_backward_bitwise_deterministic(rng):
    """Same bits on every run, and whatever the thread count."""
    a, kw = make_case(
        rng,
        n=3,
        c=40,
        height=20,
        width=24,
        r=60,
        pooled=(4, 4),
        spatial_scale=1.0,
        kinds=("inside", "large", "partial"),
    )
    go = rng.standard_normal(run_forward(a, kw).shape)
    first = run_backward(go, a, kw)
    y1 = run_forward(a, kw)
    for _ in range(2):
        again = run_backward(go, a, kw)
        for name in GRAD_NAMES:
            assert getattr(again, name).tobytes() == getattr(first, name).tobytes(), name
    assert run_forward(a, kw).tobytes() == y1.tobytes()
    loose = run_backward(go, a, kw, deterministic=False)  # the CPU ignores the keyword
    for name in GRAD_NAMES:
        assert getattr(loose, name).tobytes() == getattr(first, name).tobytes(), name
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run_backward(go, a, kw)
        y_single = run_forward(a, kw)
    finally:
        numba.set_num_threads(threads)
    for name in GRAD_NAMES:
        assert getattr(single, name).tobytes() == getattr(first, name).tobytes(), name
    assert y_single.tobytes() == y1.tobytes()
    assert all(np.abs(getattr(first, n)).max() > 0 for n in GRAD_NAMES)


def test_input_gradient_does_not_depend_on_row_bands(monkeypatch, rng):
    """The input-gradient kernel splits each image into bands of pixel rows (one task
    each): from one band to one row per band the gradient has the same bits, also with
    bins that straddle bands, leave the image or have NaN offsets."""
    from deformarray.cpu import roi_pool

    a, kw = make_case(
        rng, n=2, c=5, height=11, width=9, r=30, pooled=(3, 4), offset_scale=8.0, kinds=("inside", "large", "partial")
    )  # offsets that large move bins across band edges and out of the image
    a["offset"][3, :, 1, 2] = np.nan
    go = rng.standard_normal(run_forward(a, kw).shape)
    seen = []
    for bands in (1, 2, 3, 5, 11):
        monkeypatch.setattr(roi_pool, "_bands", lambda n_images, height, b=bands: b)
        seen.append(run_backward(go, a, kw).input)
    assert np.abs(seen[0]).max() > 0
    for bands, grad in zip((2, 3, 5, 11), seen[1:]):
        assert grad.tobytes() == seen[0].tobytes(), bands


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_workspace_chunking(dtype, rng):
    """Chunks of images, one image per chunk, and channel ranges of one image: the output
    and the input gradient are bitwise the same; offset / mask gradients add the channel
    ranges' partial sums, so they agree to rounding."""
    a, kw = make_case(rng, n=5, c=6, r=12, dtype=dtype)
    go = rng.standard_normal(run_forward(a, kw).shape).astype(dtype)
    y = run_forward(a, kw)
    grads = run_backward(go, a, kw)
    plane = 7 * 8 * np.dtype(dtype).itemsize
    for limit in (2 * 6 * plane * 2, 6 * plane * 2, 3 * plane, 1):
        with da.workspace_limit(limit):
            y_c = run_forward(a, kw)
            grads_c = run_backward(go, a, kw)
        assert y_c.tobytes() == y.tobytes(), limit
        assert grads_c.input.tobytes() == grads.input.tobytes(), limit
        tight = 1e-12 if dtype == np.float64 else 2e-6
        for name in ("offset", "mask"):
            assert_close(
                getattr(grads_c, name),
                getattr(grads, name).astype(np.float64),
                dtype,
                f"grad {name}, limit {limit}",
                rel=tight,
            )


def test_workspace_bound_holds(rng):
    """Temporary memory beyond outputs and gradients stays within the bound (one image's
    channels-last copy would be 8 KiB; all 100 images' 800 KiB)."""
    a, kw = make_case(rng, n=100, c=8, height=8, width=16, r=200, kinds=("inside",))
    go = rng.standard_normal(run_forward(a, kw).shape)
    limit = 32 * 1024
    slack = 48 * 1024  # per-call bookkeeping: RoI geometry, orderings
    with da.workspace_limit(limit):
        y, peak_f = traced_peak(lambda: run_forward(a, kw))
        grads, peak_b = traced_peak(lambda: run_backward(go, a, kw))
    assert peak_f <= y.nbytes + limit + slack, (peak_f, y.nbytes)
    grads_bytes = sum(getattr(grads, n).nbytes for n in GRAD_NAMES)
    assert peak_b <= grads_bytes + limit + slack, (peak_b, grads_bytes)
