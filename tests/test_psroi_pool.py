"""deform_psroi_pool / deform_psroi_pool_backward on NumPy arrays.

- hand-checked values: the channel map (c*group_size + gi)*group_size + gj, C's round()
  (halves away from zero) and the "+1" end of the RoI, the class of each output channel;
- forward and both gradients against the float64 loops of reference_roi.py (several
  classes, part_size and group_size different from pooled_size, no offset; RoIs inside,
  smaller than a pixel, larger than the image, partly outside, zero-sized);
- adjoint (input) and central differences (input, offset) away from the kinks;
- Hypothesis over RoI sizes; R = 0; non-contiguous input (the chunked copy path);
- bitwise determinism (runs, thread counts, workspace bounds), bounded workspace.
"""

from __future__ import annotations

import tracemalloc

import numba
import numpy as np
import pytest
from checks import DTYPES, assert_close, reversed_view, strided_view
from edges import edge_coordinate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_roi import (
    psroi_bins,
    psroi_param_dict,
    random_rois,
    ref_deform_psroi_pool,
    ref_deform_psroi_pool_backward,
)

import deformarray as da


def make_case(
    rng,
    n=2,
    output_dim=4,
    group_size=3,
    pooled_size=3,
    part_size=None,
    sample_per_part=3,
    trans_std=0.2,
    spatial_scale=0.5,
    num_classes=2,
    offset=True,
    height=7,
    width=8,
    r=6,
    offset_scale=1.0,
    kinds=("inside", "tiny", "large", "partial", "degenerate"),
    dtype=np.float64,
):
    c = output_dim * group_size**2
    part = pooled_size if part_size is None else part_size
    arrays = dict(
        input=rng.standard_normal((n, c, height, width)).astype(dtype),
        rois=random_rois(rng, r, n, height, width, spatial_scale, kinds).astype(dtype),
        offset=(offset_scale * rng.standard_normal((r, 2 * num_classes, part, part))).astype(dtype) if offset else None,
    )
    kw = dict(
        output_dim=output_dim,
        group_size=group_size,
        pooled_size=pooled_size,
        part_size=part_size,
        sample_per_part=sample_per_part,
        trans_std=trans_std,
        spatial_scale=spatial_scale,
    )
    return arrays, kw


def run_forward(a, kw):
    return da.deform_psroi_pool(a["input"], a["rois"], a["offset"], **kw)


def run_backward(go, a, kw, **extra):
    return da.deform_psroi_pool_backward(go, a["input"], a["rois"], a["offset"], **kw, **extra)


def check_against_reference(a, kw, rng, dtype):
    y = run_forward(a, kw)
    y_ref = ref_deform_psroi_pool(a["input"], a["rois"], a["offset"], **kw)
    assert_close(y, y_ref, dtype, "output")
    go = rng.standard_normal(y_ref.shape).astype(dtype)
    grads = run_backward(go, a, kw)
    assert isinstance(grads, da.DeformPSRoiPoolGrads)
    ref = ref_deform_psroi_pool_backward(go, a["input"], a["rois"], a["offset"], **kw)
    assert_close(grads.input, ref.input, dtype, "grad input")
    assert_close(grads.offset, ref.offset, dtype, "grad offset")
    return y, grads


# ---------------------------------------------------------------------------------------
# Hand-checked values
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("gs,ps", [(3, 3), (2, 3), (3, 2)])
def test_channel_map(gs, ps):
    """Input channel ch filled with ch: every bin with a valid sample gives its channel
    (c*gs + gi)*gs + gj with gi = floor(i*gs/ps)."""
    out_dim, H, W = 2, 6, 6
    x = np.broadcast_to(
        np.arange(out_dim * gs * gs, dtype=np.float64)[None, :, None, None], (1, out_dim * gs * gs, H, W)
    ).copy()
    rois = np.array([[0.0, 0.0, 0.0, 5.0, 5.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    y = da.deform_psroi_pool(x, rois, output_dim=out_dim, group_size=gs, pooled_size=ps)
    for c in range(out_dim):
        for i in range(ps):
            for j in range(ps):
                want = (c * gs + (i * gs) // ps) * gs + (j * gs) // ps
                np.testing.assert_allclose(y[:, c, i, j], want, rtol=1e-15)


@pytest.mark.parametrize(
    "x1,x2,start,size",
    [
        (0.5, 4.5, 0.5, 5.0),  # round(0.5) = 1, round(4.5) = 5 (NumPy's round gives 0 and 4)
        (2.5, 2.5, 2.5, 1.0),  # a one-pixel box: ends at (round(x2) + 1) - 0.5
        (1.49, 3.51, 0.5, 4.0),
    ],
)
def test_rounding_and_ends(x1, x2, start, size):
    """A horizontal ramp x[..., w] = w: without clamping, output = mean sample column =
    start + j*bin_w + (spp - 1)/2 * bin_w/spp, with start = round(x1) - 0.5 and
    size = round(x2) + 1 - round(x1) (spatial_scale 1)."""
    W, spp, ps = 40, 4, 2
    x = np.broadcast_to(np.arange(W, dtype=np.float64) - 10.0, (1, 1, 4, W)).copy()
    rois = np.array([[0.0, x1 + 10, 1.0, x2 + 10, 2.0]])  # +10: keep every sample inside
    y = da.deform_psroi_pool(x, rois, output_dim=1, group_size=1, pooled_size=ps, sample_per_part=spp)
    bin_w = size / ps
    for j in range(ps):
        want = start + j * bin_w + (spp - 1) / 2 * bin_w / spp
        np.testing.assert_allclose(y[0, 0, :, j], want, rtol=0, atol=1e-12)


def test_negative_halves_round_away_from_zero():
    """round(-0.5) = -1: the box [-0.5, 1.4] starts at -1.5 and is 3 wide, so on the ramp
    x[w] = w the first bin's samples -1.5, -1.125, -0.75 are skipped and -0.375 is clamped
    to column 0 (value 0); the second bin's are 0, 0.375, 0.75, 1.125. (Rounding half to
    even would start at -0.5 and give 0.140625 in the first bin.)"""
    x = np.broadcast_to(np.arange(8, dtype=np.float64), (1, 1, 4, 8)).copy()
    rois = np.array([[0.0, -0.5, 1.0, 1.4, 2.0]])
    kw = dict(output_dim=1, group_size=1, pooled_size=2, sample_per_part=4)
    y = da.deform_psroi_pool(x, rois, **kw)
    np.testing.assert_allclose(y[0, 0], [[0.0, 0.5625], [0.0, 0.5625]], rtol=0, atol=1e-15)
    assert_close(y, ref_deform_psroi_pool(x, rois, **kw), np.float64, "output")


def test_small_rois_are_at_least_0_1():
    """An empty rounded box (spatial_scale tiny) still has size 0.1: its bins sample."""
    x = np.random.default_rng(0).standard_normal((1, 4, 5, 5))
    rois = np.array([[0.0, 8.0, 8.0, 8.0, 8.0]])
    kw = dict(output_dim=1, group_size=2, pooled_size=2, spatial_scale=1e-3)
    y = da.deform_psroi_pool(x, rois, **kw)
    assert_close(y, ref_deform_psroi_pool(x, rois, **kw), np.float64, "output")
    # start = 8e-3 - 0.5, size 0.1: every sample in [-0.5, -0.39]: clamped to column 0
    np.testing.assert_allclose(y[0, 0], [[x[0, 0, 0, 0], x[0, 1, 0, 0]], [x[0, 2, 0, 0], x[0, 3, 0, 0]]], rtol=1e-14)


def test_class_of_each_output_channel(rng):
    """Offset classes: output channel c uses class c // (output_dim // num_classes)."""
    a, kw = make_case(rng, output_dim=6, num_classes=3, r=3, kinds=("inside",))
    plain = run_forward(dict(a, offset=None), kw)
    for cls in range(3):
        off = np.zeros_like(a["offset"])
        off[:, 2 * cls : 2 * cls + 2] = a["offset"][:, 2 * cls : 2 * cls + 2]
        y = run_forward(dict(a, offset=off), kw)
        for c in range(6):
            same = np.array_equal(y[:, c], plain[:, c])
            assert same == (c // 2 != cls), (cls, c)


def test_zero_offset_is_plain_pooling(rng):
    a, kw = make_case(rng)
    zero = run_forward(dict(a, offset=np.zeros_like(a["offset"])), kw)
    assert run_forward(dict(a, offset=None), kw).tobytes() == zero.tobytes()


# ---------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------

CASES = {
    "two_classes": dict(),
    "one_class": dict(num_classes=1),
    "class_per_channel": dict(num_classes=4),
    "no_offset": dict(offset=False),
    "part2_pooled3": dict(part_size=2),
    "part4_pooled3": dict(part_size=4, sample_per_part=2),
    "group2_pooled3": dict(group_size=2, pooled_size=3, num_classes=4),
    "group3_pooled2_scale1": dict(group_size=3, pooled_size=2, spatial_scale=1.0, offset_scale=3.0),
    "spp1_tiny": dict(sample_per_part=1, kinds=("tiny",), r=4),
    "single_row_image": dict(height=1, width=6, spatial_scale=1.0, r=5),
    "negative_trans_std": dict(trans_std=-0.3, n=1, output_dim=2, num_classes=1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("geom", list(CASES.values()), ids=list(CASES))
def test_matches_reference(geom, dtype, rng):
    a, kw = make_case(rng, dtype=dtype, **geom)
    check_against_reference(a, kw, rng, dtype)


def test_samples_on_kinks_and_borders(rng):
    """Samples exactly on -0.5 (kept), 0, integers and H-0.5 (kept), and just outside."""
    H, W = 4, 5
    x = rng.standard_normal((1, 1, H, W))
    targets = [-0.75, -0.5, -0.25, 0.0, 1.0, 2.5, H - 1.0, H - 0.5, H - 0.25]
    # one bin, one sample at its top-left corner: start = round(x1) - 0.5 (spatial_scale 1),
    # plus the offset trans_std * offset * roi_size with roi size 1 (x2 = x1)
    rois, offs = [], []
    for ty in targets:
        for tx in targets:
            rois.append([0.0, 3.0, 3.0, 3.0, 3.0])
            offs.append([[[tx - 2.5]], [[ty - 2.5]]])
    rois, off = np.array(rois), np.array(offs)
    a = dict(input=x, rois=rois, offset=off)
    kw = dict(output_dim=1, group_size=1, pooled_size=1, sample_per_part=1, trans_std=1.0)
    y, _ = check_against_reference(a, kw, rng, np.float64)
    k = 0
    for ty in targets:
        for tx in targets:
            inside = -0.5 <= ty <= H - 0.5 and -0.5 <= tx <= W - 0.5
            if not inside:
                assert y[k, 0, 0, 0] == 0.0, (ty, tx)
            elif float(ty).is_integer() and float(tx).is_integer():
                qy, qx = int(min(max(ty, 0), H - 1)), int(min(max(tx, 0), W - 1))
                np.testing.assert_allclose(y[k, 0, 0, 0], x[0, 0, qy, qx], rtol=1e-14)
            k += 1


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_zero_rois(dtype, rng):
    a, kw = make_case(rng, r=0, dtype=dtype)
    y = run_forward(a, kw)
    assert y.shape == (0, 4, 3, 3) and y.dtype == np.dtype(dtype)
    grads = run_backward(np.zeros(y.shape, dtype), a, kw)
    assert grads.input.shape == a["input"].shape and not grads.input.any()
    assert grads.offset.shape == a["offset"].shape and not grads.offset.any()
    assert run_backward(np.zeros(y.shape, dtype), dict(a, offset=None), kw).offset is None


def test_nan_offset_skips_samples(rng):
    """A NaN offset leaves its bins without valid samples: 0, zero gradients."""
    a, kw = make_case(rng, r=2, num_classes=1, kinds=("inside",))
    a["offset"][0, :, 1, 1] = np.nan
    y = run_forward(a, kw)
    assert np.all(y[0, :, 1, 1] == 0.0) and np.isfinite(y).all()
    grads = run_backward(np.ones_like(y), a, kw)
    assert np.isfinite(grads.input).all() and np.isfinite(grads.offset).all()
    assert np.all(grads.offset[0, :, 1, 1] == 0.0)


# ---------------------------------------------------------------------------------------
# Gradients by definition (float64)
# ---------------------------------------------------------------------------------------


def _loss(go, a, kw, **changed):
    return float(np.sum(go * run_forward(dict(a, **changed), kw)))


def test_adjoint_input(rng):
    a, kw = make_case(rng, r=8)
    go = rng.standard_normal(run_forward(a, kw).shape)
    grads = run_backward(go, a, kw)
    base = _loss(go, a, kw)
    assert abs(base - float(np.sum(grads.input * a["input"]))) <= 1e-12 * (1 + abs(base))
    d = rng.standard_normal(a["input"].shape)
    lin = _loss(go, a, kw, input=a["input"] + d) - base
    assert abs(lin - float(np.sum(grads.input * d))) <= 1e-11 * (1 + abs(base))


def _clean_offsets(a, kw, delta):
    """Offset entries (r, cls, pi, pj) all of whose samples (used or skipped) lie at least
    delta from a multiple of 0.5 (the kinks: integers, the clamp at 0 and H-1; the
    validity borders -0.5 and H-0.5)."""
    p = psroi_param_dict(a["input"], **kw)
    cec = kw["output_dim"] // (a["offset"].shape[1] // 2)
    dirty = set()
    for r in range(len(a["rois"])):
        for c in range(kw["output_dim"]):
            _, bins = psroi_bins(a["rois"], r, c, p, a["offset"], all_points=True)
            for i, j, ch, pts, roi_h, roi_w, cls, pi, pj in bins:
                if any(abs(2 * t - round(2 * t)) < 2 * delta for pt in pts for t in pt):
                    dirty.add((r, cls, pi, pj))
    n_cls, part = a["offset"].shape[1] // 2, a["offset"].shape[2]
    assert cec * n_cls == kw["output_dim"]
    return [
        (r, cls, pi, pj)
        for r in range(len(a["rois"]))
        for cls in range(n_cls)
        for pi in range(part)
        for pj in range(part)
        if (r, cls, pi, pj) not in dirty
    ]


def test_central_differences(rng):
    a, kw = make_case(
        rng,
        r=5,
        spatial_scale=1.0,
        part_size=2,
        sample_per_part=2,
        offset_scale=2.0,
        kinds=("inside", "tiny", "large", "partial"),
    )
    go = rng.standard_normal(run_forward(a, kw).shape)
    grads = run_backward(go, a, kw)
    eps = 1e-6
    clean = _clean_offsets(a, kw, delta=1e-3)
    assert len(clean) >= 8, len(clean)
    for r, cls, pi, pj in clean:
        for d in (0, 1):
            idx = (r, 2 * cls + d, pi, pj)
            up, down = a["offset"].copy(), a["offset"].copy()
            up[idx] += eps
            down[idx] -= eps
            fd = (_loss(go, a, kw, offset=up) - _loss(go, a, kw, offset=down)) / (2 * eps)
            assert abs(fd - grads.offset[idx]) <= 1e-6 * (1 + abs(fd)), idx
    assert np.count_nonzero(grads.offset) > 8
    arr = a["input"]
    for idx in [tuple(rng.integers(0, s) for s in arr.shape) for _ in range(8)]:
        up, down = arr.copy(), arr.copy()
        up[idx] += eps
        down[idx] -= eps
        fd = (_loss(go, a, kw, input=up) - _loss(go, a, kw, input=down)) / (2 * eps)
        assert abs(fd - grads.input[idx]) <= 1e-6 * (1 + abs(fd)), idx


# ---------------------------------------------------------------------------------------
# Hypothesis over RoI sizes
# ---------------------------------------------------------------------------------------

SETTINGS = settings(deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    box=st.tuples(st.floats(-6, 12), st.floats(-6, 12), st.floats(0, 16), st.floats(0, 16)),
    scale=st.sampled_from([0.25, 0.5, 1.0]),
    spp=st.integers(1, 3),
    sizes=st.sampled_from([(1, 1, 1), (2, 2, 2), (2, 3, 1), (3, 2, 3)]),
    seed=st.integers(0, 2**32 - 1),
)
def test_roi_sizes_property(box, scale, spp, sizes, seed):
    rng = np.random.default_rng(seed)
    gs, ps, part = sizes
    x1, y1, w, h = box
    a = dict(
        input=rng.standard_normal((1, 2 * gs * gs, 5, 6)),
        rois=np.array([[0.0, x1, y1, x1 + w, y1 + h]]),
        offset=rng.standard_normal((1, 4, part, part)),
    )
    kw = dict(
        output_dim=2,
        group_size=gs,
        pooled_size=ps,
        part_size=part,
        sample_per_part=spp,
        trans_std=0.1,
        spatial_scale=scale,
    )
    check_against_reference(a, kw, rng, np.float64)


@SETTINGS
@given(
    points=st.lists(st.tuples(edge_coordinate(4), edge_coordinate(8)), min_size=1, max_size=6),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_edge_sample_points_property(points, dtype, seed):
    """One sample per RoI on or one ulp either side of -1, 0, H-1, H, an integer, or at a
    tiny negative (H = 4, W = 8: powers of two): forward and gradients match the
    reference. Each RoI is a point at (3, 3) (size 1 after MXNet's rounding) and its
    offset (trans_std 1) moves the one sample to the target, up to the rounding of
    ``2.5 + (target - 2.5)``; the reference computes the same coordinate."""
    rng = np.random.default_rng(seed)
    H, W = 4, 8
    rois = np.array([[0.0, 3.0, 3.0, 3.0, 3.0]] * len(points))
    off = np.array([[[[tx - 2.5]], [[ty - 2.5]]] for ty, tx in points])
    a = dict(input=rng.standard_normal((2, 1, H, W)).astype(dtype), rois=rois.astype(dtype), offset=off.astype(dtype))
    a["input"][1] = 1000.0  # a read past the first image's plane shows
    kw = dict(output_dim=1, group_size=1, pooled_size=1, sample_per_part=1, trans_std=1.0)
    check_against_reference(a, kw, rng, dtype)


# ---------------------------------------------------------------------------------------
# Layouts, determinism, workspace
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(
    "make_view", [strided_view, reversed_view, np.asfortranarray], ids=["strided", "reversed", "fortran"]
)
def test_non_contiguous_inputs(make_view, dtype, rng):
    a, kw = make_case(rng, dtype=dtype)
    go = rng.standard_normal(run_forward(a, kw).shape).astype(dtype)
    y = run_forward(a, kw)
    grads = run_backward(go, a, kw)
    view = {k: make_view(v) for k, v in a.items()}
    y_v = run_forward(view, kw)
    grads_v = run_backward(make_view(go), view, kw)
    assert y_v.tobytes() == y.tobytes()
    assert grads_v.input.tobytes() == grads.input.tobytes()
    assert grads_v.offset.tobytes() == grads.offset.tobytes()


def test_backward_bitwise_deterministic(rng):
    a, kw = make_case(
        rng,
        n=3,
        output_dim=6,
        group_size=3,
        pooled_size=3,
        num_classes=3,
        height=16,
        width=18,
        r=40,
        spatial_scale=1.0,
        kinds=("inside", "large", "partial"),
    )
    go = rng.standard_normal(run_forward(a, kw).shape)
    first = run_backward(go, a, kw)
    for _ in range(2):
        again = run_backward(go, a, kw)
        assert again.input.tobytes() == first.input.tobytes()
        assert again.offset.tobytes() == first.offset.tobytes()
    loose = run_backward(go, a, kw, deterministic=False)
    assert loose.input.tobytes() == first.input.tobytes()
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run_backward(go, a, kw)
    finally:
        numba.set_num_threads(threads)
    assert single.input.tobytes() == first.input.tobytes()
    assert single.offset.tobytes() == first.offset.tobytes()
    assert np.abs(first.input).max() > 0 and np.abs(first.offset).max() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_workspace_chunking(dtype, rng):
    """A non-contiguous input is copied in chunks: of images, or of one image's channel
    groups; the backward's offset-gradient terms (16 bytes per output channel, bin and RoI)
    are made in passes of channel and RoI ranges, for a contiguous input too. Output and
    gradients are bitwise the same whatever the chunks: every value is added in one order."""
    a, kw = make_case(rng, n=4, r=10, dtype=dtype)
    go = rng.standard_normal(run_forward(a, kw).shape).astype(dtype)
    y = run_forward(a, kw)
    grads = run_backward(go, a, kw)
    a_nc = dict(a, input=strided_view(a["input"]))
    group = 9 * 7 * 8 * np.dtype(dtype).itemsize  # group_size**2 planes
    terms = 9 * 16  # one output channel and one RoI (whole: 4 * 10 of these)
    for arrays in (a_nc, a):
        for limit in (2 * 4 * group, 4 * group, 2 * group, 2 * 4 * 3 * terms, 2 * 3 * terms, 2 * terms, 1):
            with da.workspace_limit(limit):
                y_c = run_forward(arrays, kw)
                grads_c = run_backward(go, arrays, kw)
            assert y_c.tobytes() == y.tobytes(), limit
            assert grads_c.input.tobytes() == grads.input.tobytes(), limit
            assert grads_c.offset.tobytes() == grads.offset.tobytes(), limit


def test_workspace_bound_holds(rng):
    """Contiguous input: only the backward's offset-gradient terms (8 output channels * 16
    bins * 120 RoIs * 16 bytes: 240 KiB as a whole), made in passes within the bound.
    Non-contiguous: chunks of the input too (60 images: 1.9 MiB as a whole)."""
    a, kw = make_case(
        rng, n=60, output_dim=8, group_size=2, pooled_size=4, height=8, width=16, r=120, kinds=("inside",)
    )
    go = rng.standard_normal(run_forward(a, kw).shape)
    limit = 16 * 1024
    slack = 48 * 1024
    a_nc = dict(a, input=strided_view(a["input"]))
    for arrays in (a, a_nc):
        with da.workspace_limit(limit):
            da.release_workspace()
            tracemalloc.start()
            try:
                tracemalloc.reset_peak()
                start, _ = tracemalloc.get_traced_memory()
                y = run_forward(arrays, kw)
                grads = run_backward(go, arrays, kw)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        assert peak - start <= y.nbytes + grads.input.nbytes + grads.offset.nbytes + limit + slack
