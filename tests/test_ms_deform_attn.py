"""ms_deform_attn / ms_deform_attn_backward on NumPy arrays.

- forward and every gradient against the float64 loops of reference_msda.py, float32 and
  float64: levels of very different sizes (1x1 included), one level, one point, Lq = 0,
  N = 0, locations outside [0, 1], NaN / inf locations;
- locations whose pixel coordinate is exactly on, or one ulp either side of, -2, -1, 0, an
  integer, H-1 and H (the point rule, grid_sample's zero padding, the floor);
- the ``grid_sample`` composition of Deformable DETR / mmcv / transformers
  (``ms_deform_attn_core_pytorch``) in float64, forward and torch autograd gradients;
- the backward is the adjoint of the forward (value and attention weights: the operator is
  linear in both) and matches central differences for the locations away from the kinks;
- Hypothesis: random shapes (zero sizes too) with edge locations, the shift property at
  pixel centres, linearity in the attention weights;
- non-contiguous inputs; bitwise determinism (runs, thread counts, channel blocks, calls
  from several threads at once); no workspace beyond the outputs.

Default shapes are tiny: CI also runs this file with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import checks
import numpy as np
import pytest
from checks import (
    DTYPES,
    VIEWS,
    assert_close,
    check_bitwise_deterministic,
    check_calls_from_threads,
)
from edges import around, edge_targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_msda import (
    level_layout,
    make_msda_case,
    pixel_coordinate,
    ref_ms_deform_attn,
    ref_ms_deform_attn_backward,
)

import deformarray as da

GRAD_NAMES = ("value", "sampling_locations", "attention_weights")
FLOATS = ("value", "sampling_locations", "attention_weights")


def run_forward(c):
    return da.ms_deform_attn(**c)


def run_backward(go, c, **extra):
    return da.ms_deform_attn_backward(go, **c, **extra)


def check_against_reference(c, rng, dtype):
    """Forward and the three gradients against the reference; returns (y, grads)."""
    return checks.check_against_reference(
        run_forward, run_backward, ref_ms_deform_attn, ref_ms_deform_attn_backward, da.MsDeformAttnGrads, c, rng, dtype
    )


# ---------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------

CASES = {
    "three_levels": dict(),
    "very_different_levels": dict(shapes=((9, 7), (1, 1), (1, 6), (5, 1)), lq=2, p=3),
    "one_level": dict(shapes=((5, 4),), lq=4),
    "one_point": dict(p=1, m=3, d=2),
    "one_pixel_levels": dict(shapes=((1, 1), (1, 1)), spread=(-1.0, 2.0)),
    "one_channel_far_outside": dict(d=1, spread=(-1.5, 2.5)),
    "inside_only": dict(spread=(0.0, 1.0), n=1, lq=5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("geom", list(CASES.values()), ids=list(CASES))
def test_matches_reference(geom, dtype, rng):
    c = make_msda_case(rng, dtype=dtype, **geom)
    _, grads = check_against_reference(c, rng, dtype)
    for name in GRAD_NAMES:
        assert np.abs(getattr(grads, name)).max() > 0, name


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("sizes", [dict(lq=0), dict(n=0), dict(n=0, lq=0)], ids=["lq0", "n0", "both"])
def test_empty(sizes, dtype, rng):
    c = make_msda_case(rng, dtype=dtype, **sizes)
    y = run_forward(c)
    assert y.shape == (c["value"].shape[0], c["sampling_locations"].shape[1], 6) and y.dtype == dtype
    grads = run_backward(np.zeros(y.shape, dtype), c)
    for name in GRAD_NAMES:
        got = getattr(grads, name)
        assert got.shape == c[name].shape and got.dtype == dtype and not got.any(), name


def test_non_finite_locations_give_zero(rng):
    """NaN and infinite locations are not processed: they contribute nothing, whatever the
    attention weight (NaN here), and get zero gradients."""
    c = make_msda_case(rng, n=1, lq=2, shapes=((3, 4), (2, 2)), p=3)
    loc, a = c["sampling_locations"], c["attention_weights"]
    bad = [(0, 0, 0, 0, np.nan, 0.5), (0, 0, 1, 1, 0.5, np.inf), (0, 1, 1, 0, -np.inf, np.nan)]
    for n, q, m, lv, x, y in bad:
        loc[n, q, m, lv, 1] = (x, y)
        a[n, q, m, lv, 1] = np.nan
    y, grads = check_against_reference(c, rng, np.float64)
    assert np.isfinite(y).all()
    for name in GRAD_NAMES:
        assert np.isfinite(getattr(grads, name)).all(), name
    for n, q, m, lv, _, _ in bad:
        assert not grads.sampling_locations[n, q, m, lv, 1].any()
        assert grads.attention_weights[n, q, m, lv, 1] == 0.0


# ---------------------------------------------------------------------------------------
# Locations on the edges
# ---------------------------------------------------------------------------------------

EDGE_SHAPES = ((4, 8), (3, 5), (1, 2))  # powers of two (exact pixel coordinates) and not


def _edge_pixels(size, dtype):
    """Pixel coordinates to aim at: edges.edge_targets plus -2, -1.5, -0.5, size - 0.5, with
    their neighbours."""
    extra = {t for base in (-2.0, -1.5, -0.5, size - 0.5) for t in around(base, dtype)}
    return sorted(set(edge_targets(size, dtype)) | extra)


def _location_of(t, size, dtype):
    """The normalised location whose pixel coordinate is t (exactly when size is a power
    of two and t + 0.5 is representable), in dtype."""
    return (np.asarray(t, dtype) + dtype(0.5)) / dtype(size)


def edge_case(dtype, rng):
    """Every (target h, target w) pair of each level as the first point of a query (L
    levels, M = 1, P = 2, the second point at a random interior location), twice: at the
    location of the target pixel coordinate, then at one ulp of that location (alternately
    up and down)."""
    spatial, starts, s = level_layout(EDGE_SHAPES)
    pairs = [[(a, b) for a in _edge_pixels(h, dtype) for b in _edge_pixels(w, dtype)] for h, w in EDGE_SHAPES]
    lq = 2 * max(map(len, pairs))
    loc = rng.uniform(0.1, 0.9, (1, lq, 1, len(spatial), 2, 2)).astype(dtype)
    for lv, ((h, w), lv_pairs) in enumerate(zip(EDGE_SHAPES, pairs)):
        for q in range(lq):
            ty, tx = lv_pairs[(q // 2) % len(lv_pairs)]
            y, x = _location_of(ty, h, dtype), _location_of(tx, w, dtype)
            if q % 2:
                up = dtype(np.inf if q % 4 == 1 else -np.inf)
                y, x = np.nextafter(y, up), np.nextafter(x, -up)
            loc[0, q, 0, lv, 0] = (x, y)
    return dict(
        value=rng.standard_normal((1, s, 1, 3)).astype(dtype),
        spatial_shapes=spatial,
        level_start_index=starts,
        sampling_locations=loc,
        attention_weights=rng.uniform(0.5, 1.5, (1, lq, 1, len(spatial), 2)).astype(dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_edge_locations(dtype, rng):
    """Pixel coordinates on and one ulp either side of the kinks and borders: forward and
    gradients match the reference (which samples the same pixel coordinates: in the
    input's dtype, product then subtraction), so the point rule, the floor and the corner
    checks are those of the contract."""
    c = edge_case(dtype, rng)
    loc = c["sampling_locations"]
    # the targets are hit exactly where the arithmetic is exact (power-of-two sizes)
    hits = {float(pixel_coordinate(loc[0, q, 0, 0, 0, 1], 4, dtype)) for q in range(loc.shape[1])}
    assert {-2.0, -1.0, 0.0, 1.0, 3.0, 4.0} <= hits
    assert float(np.nextafter(dtype(-1.0), dtype(0))) in hits
    check_against_reference(c, rng, dtype)


def test_edge_values_by_hand(rng):
    """Hand-checked values on a 4x8 level: at h = -1 exactly the sample is 0 but its
    gradient along y is not (grid_sample's zero padding); at -2 and at H nothing; at a
    pixel centre the sample is the pixel."""
    H, W = 4, 8
    spatial, starts, s = level_layout([(H, W)])
    value = rng.standard_normal((1, s, 1, 2))
    pts = [(-1.0, 3.0), (-2.0, 3.0), (float(H), 3.0), (2.0, 5.0), (0.0, -1.0), (1.0, float(W - 1))]
    loc = np.array([[(tw + 0.5) / W, (th + 0.5) / H] for th, tw in pts]).reshape(1, len(pts), 1, 1, 1, 2)
    c = dict(
        value=value,
        spatial_shapes=spatial,
        level_start_index=starts,
        sampling_locations=loc,
        attention_weights=np.ones((1, len(pts), 1, 1, 1)),
    )
    y = run_forward(c).reshape(len(pts), 2)
    g = run_backward(np.ones((1, len(pts), 2)), c)
    gy = g.sampling_locations[0, :, 0, 0, 0, 1]
    gx = g.sampling_locations[0, :, 0, 0, 0, 0]
    v = value[0, :, 0].reshape(H, W, 2)
    assert not y[0].any() and gy[0] == H * (v[0, 3].sum()) and gx[0] == 0.0  # h = -1
    assert not y[1].any() and gy[1] == 0.0 and gx[1] == 0.0  # h = -2: not processed
    assert not y[2].any() and gy[2] == 0.0  # h = H: not processed
    np.testing.assert_array_equal(y[3], v[2, 5])  # a pixel centre
    np.testing.assert_array_equal(y[4], 0.0)  # w = -1
    assert gx[4] == W * v[0, 0].sum()
    np.testing.assert_array_equal(y[5], v[1, W - 1])  # last column: the right corners are absent
    assert gx[5] == W * (0.0 - v[1, W - 1].sum())
    check_against_reference(c, rng, np.float64)


# ---------------------------------------------------------------------------------------
# The grid_sample composition that Deformable DETR, mmcv and transformers ship
# ---------------------------------------------------------------------------------------


def grid_sample_msda(value, spatial_shapes, sampling_locations, attention_weights):
    """``ms_deform_attn_core_pytorch`` (Deformable DETR) / ``multi_scale_deformable_attention``
    (mmcv, transformers): value split by level, grids ``2*loc - 1``, bilinear
    ``F.grid_sample`` with zero padding and ``align_corners=False``, weighted sum."""
    import torch
    import torch.nn.functional as F

    n, _, m, d = value.shape
    _, lq, _, nl, npt, _ = sampling_locations.shape
    value_list = value.split([int(h) * int(w) for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for lv, (h, w) in enumerate(spatial_shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_l = value_list[lv].flatten(2).transpose(1, 2).reshape(n * m, d, int(h), int(w))
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_l = grids[:, :, :, lv].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, nl * npt)
    out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


@pytest.mark.parametrize("edges", [False, True], ids=["random", "edges"])
def test_matches_grid_sample_composition(edges, rng):
    """float64, forward and autograd gradients. 'edges': pixel coordinates exactly on -2,
    -1, 0, integers, H-1, H on power-of-two levels (where 2*loc - 1 and grid_sample's
    unnormalisation are exact, so both sample the same points)."""
    torch = pytest.importorskip("torch")
    if edges:
        shapes = ((4, 8), (2, 2), (1, 4))
        spatial, starts, s = level_layout(shapes)
        c = make_msda_case(rng, n=1, lq=1, m=1, d=3, shapes=shapes, p=1)
        pts = []
        for lv, (h, w) in enumerate(shapes):
            th = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.25, h - 1.0, h - 0.5, float(h), h + 1.0]
            tw = [-2.0, -1.0, -0.75, 0.0, w - 1.0, w - 0.5, float(w)]
            pts.append([((x + 0.5) / w, (y + 0.5) / h) for y in th for x in tw])
        lq = max(map(len, pts))
        loc = np.empty((1, lq, 1, len(shapes), 1, 2))
        for lv, lv_pts in enumerate(pts):
            for q in range(lq):
                loc[0, q, 0, lv, 0] = lv_pts[q % len(lv_pts)]
        c["sampling_locations"] = loc
        c["attention_weights"] = rng.uniform(0.5, 1.5, (1, lq, 1, len(shapes), 1))
    else:
        c = make_msda_case(rng, n=2, lq=4, m=2, d=3, shapes=((5, 6), (3, 2), (1, 1)), p=2, spread=(-0.3, 1.3))
    y = run_forward(c)
    go = rng.standard_normal(y.shape)
    grads = run_backward(go, c)

    t = {k: torch.tensor(c[k], requires_grad=True) for k in FLOATS}
    y_t = grid_sample_msda(t["value"], c["spatial_shapes"].tolist(), t["sampling_locations"], t["attention_weights"])
    y_t.backward(torch.from_numpy(go))
    assert_close(y, y_t.detach().numpy(), np.float64, "output")
    for name in GRAD_NAMES:
        assert_close(getattr(grads, name), t[name].grad.numpy(), np.float64, f"grad {name}")
    assert np.abs(grads.sampling_locations).max() > 0


# ---------------------------------------------------------------------------------------
# Gradients by definition (float64)
# ---------------------------------------------------------------------------------------


def _loss(go, c, **changed):
    return float(np.sum(go * run_forward(dict(c, **changed))))


def test_adjoint_value_and_attention_weights(rng):
    """The forward is linear in the value and in the attention weights, so
    <go, f(dv)> = <grad_value, dv> and <go, f(a = da)> = <grad_attention, da> up to rounding
    (and f(v) . go = grad_value . v itself)."""
    c = make_msda_case(rng, spread=(-0.6, 1.6))
    go = rng.standard_normal(run_forward(c).shape)
    grads = run_backward(go, c)
    base = _loss(go, c)
    assert abs(base - float(np.sum(grads.value * c["value"]))) <= 1e-12 * (1 + abs(base))
    assert abs(base - float(np.sum(grads.attention_weights * c["attention_weights"]))) <= 1e-12 * (1 + abs(base))
    dv = rng.standard_normal(c["value"].shape)
    lhs = _loss(go, c, value=dv)
    assert abs(lhs - float(np.sum(grads.value * dv))) <= 1e-12 * (1 + abs(lhs))
    dw = rng.standard_normal(c["attention_weights"].shape)
    lhs = _loss(go, c, attention_weights=dw)
    assert abs(lhs - float(np.sum(grads.attention_weights * dw))) <= 1e-12 * (1 + abs(lhs))


def test_location_gradient_central_differences(rng):
    """Central differences of <go, f> along each location coordinate, for points whose
    pixel coordinates stay at least 1e-3 from an integer (the kinks) while moving."""
    c = make_msda_case(rng, n=1, lq=3, shapes=((5, 6), (2, 3), (1, 1)), p=2, spread=(-0.3, 1.3))
    go = rng.standard_normal(run_forward(c).shape)
    grads = run_backward(go, c)
    loc = c["sampling_locations"]
    shapes = c["spatial_shapes"]
    eps = 1e-7
    checked = 0
    for idx in np.ndindex(loc.shape[:-1]):
        h, w = (int(v) for v in shapes[idx[3]])
        ph, pw = loc[idx + (1,)] * h - 0.5, loc[idx + (0,)] * w - 0.5
        if min(abs(ph - round(ph)), abs(pw - round(pw))) < 1e-3:
            continue
        for axis in (0, 1):
            up, down = loc.copy(), loc.copy()
            up[idx + (axis,)] += eps
            down[idx + (axis,)] -= eps
            fd = (_loss(go, c, sampling_locations=up) - _loss(go, c, sampling_locations=down)) / (2 * eps)
            assert abs(fd - grads.sampling_locations[idx + (axis,)]) <= 1e-6 * (1 + abs(fd)), (idx, axis)
            checked += 1
    assert checked >= 20, checked
    assert np.count_nonzero(grads.sampling_locations) > 10


# ---------------------------------------------------------------------------------------
# Properties (Hypothesis)
# ---------------------------------------------------------------------------------------

SETTINGS = settings(deadline=None, max_examples=25, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def msda_geometries(draw):
    n_levels = draw(st.integers(1, 3))
    shapes = [(draw(st.integers(1, 5)), draw(st.integers(1, 5))) for _ in range(n_levels)]
    return dict(
        n=draw(st.integers(0, 2)),
        lq=draw(st.integers(0, 3)),
        m=draw(st.integers(1, 2)),
        d=draw(st.integers(1, 3)),
        p=draw(st.integers(1, 3)),
        shapes=tuple(shapes),
    )


@SETTINGS
@given(
    geom=msda_geometries(),
    dtype=st.sampled_from(DTYPES),
    edge_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes_property(geom, dtype, edge_fraction, seed):
    """Any small geometry, zero sizes included, with a fraction of the coordinates put on
    edge pixel coordinates (``edges.edge_targets`` of the level), matches the reference."""
    rng = np.random.default_rng(seed)
    c = make_msda_case(rng, dtype=dtype, spread=(-0.4, 1.4), **geom)
    loc = c["sampling_locations"]
    for idx in np.ndindex(loc.shape):
        if rng.random() < edge_fraction:
            size = int(c["spatial_shapes"][idx[3], 1 - idx[5]])
            targets = edge_targets(size, dtype)
            loc[idx] = _location_of(targets[rng.integers(len(targets))], size, dtype)
    check_against_reference(c, rng, dtype)


@SETTINGS
@given(
    size_pow=st.tuples(st.integers(0, 3), st.integers(0, 3)),
    n_points=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
def test_pixel_centres_reproduce_value_rows(size_pow, n_points, dtype, seed):
    """Shift property: at pixel centres (H, W powers of two, so exact) with unit weights the
    output is the sum of the sampled rows, added in point order, bit for bit; and the value
    gradient puts g on exactly those rows."""
    rng = np.random.default_rng(seed)
    H, W = 2 ** size_pow[0], 2 ** size_pow[1]
    c = make_msda_case(rng, n=2, lq=3, m=2, d=3, shapes=((H, W),), p=n_points, dtype=dtype)
    rows = rng.integers(0, H * W, (2, 3, 2, n_points))
    ys, xs = rows // W, rows % W
    c["sampling_locations"][..., 0, :, 0] = (xs + dtype(0.5)) / dtype(W)
    c["sampling_locations"][..., 0, :, 1] = (ys + dtype(0.5)) / dtype(H)
    c["attention_weights"][:] = 1
    y = run_forward(c).reshape(2, 3, 2, 3)
    go = np.ones(y.shape, dtype)
    grads = run_backward(go.reshape(2, 3, 6), c)
    counts = np.zeros((2, H * W, 2), dtype)
    for n, q, m in np.ndindex(2, 3, 2):
        want = np.zeros(3, dtype)
        for pt in range(n_points):
            want = want + c["value"][n, rows[n, q, m, pt], m]
            counts[n, rows[n, q, m, pt], m] += 1
        assert y[n, q, m].tobytes() == want.tobytes(), (n, q, m)
    np.testing.assert_array_equal(grads.value, np.repeat(counts[..., None], 3, axis=-1))


@SETTINGS
@given(geom=msda_geometries(), scale=st.sampled_from([0.5, 2.0, -4.0]), seed=st.integers(0, 2**32 - 1))
def test_linear_in_attention_weights(geom, scale, seed):
    """f(a + b) = f(a) + f(b) (to rounding) and f(s * a) = s * f(a) exactly for a power of
    two s; the value and location gradients are linear in the attention weights too."""
    rng = np.random.default_rng(seed)
    c = make_msda_case(rng, **geom)
    a, b = c["attention_weights"], rng.standard_normal(c["attention_weights"].shape)
    fa, fb = run_forward(c), run_forward(dict(c, attention_weights=b))
    np.testing.assert_allclose(run_forward(dict(c, attention_weights=a + b)), fa + fb, rtol=1e-12, atol=1e-12)
    # exact (assert_array_equal: untouched entries are +0 where scale * 0 is -0)
    np.testing.assert_array_equal(run_forward(dict(c, attention_weights=scale * a)), scale * fa)
    go = rng.standard_normal(fa.shape)
    ga, gs = run_backward(go, c), run_backward(go, dict(c, attention_weights=scale * a))
    np.testing.assert_array_equal(gs.value, scale * ga.value)
    np.testing.assert_array_equal(gs.sampling_locations, scale * ga.sampling_locations)
    assert gs.attention_weights.tobytes() == ga.attention_weights.tobytes()


# ---------------------------------------------------------------------------------------
# Layouts, determinism, memory
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@VIEWS
def test_non_contiguous_inputs(make_view, dtype, rng):
    c = make_msda_case(rng, dtype=dtype)
    checks.check_non_contiguous_inputs(run_forward, run_backward, c, rng, dtype, make_view, FLOATS)


def _determinism_case(rng, big):
    if big:  # enough work per call for the threads to interleave
        return make_msda_case(rng, n=2, lq=60, m=4, d=8, shapes=((16, 16), (8, 8), (4, 4), (1, 1)), p=4)
    return make_msda_case(rng, n=2, lq=4, m=2, d=3, shapes=((4, 3), (2, 2)), p=2)


@pytest.mark.parametrize("big", [False, pytest.param(True, marks=pytest.mark.jit_only)], ids=["small", "big"])
def test_bitwise_deterministic(big, rng):
    """Same bits on every run, with one thread or all, and with deterministic=False (the CPU
    backend always is)."""
    c = _determinism_case(rng, big)
    # many queries on few pixels: each value gradient entry gets many additions
    check_bitwise_deterministic(run_forward, run_backward, c, rng)


def test_value_gradient_does_not_depend_on_channel_blocks(monkeypatch, rng):
    """The value-gradient kernel splits each (n, m) into blocks of channels (one task
    each): from one block to one channel per block, the same bits."""
    from deformarray.cpu import ms_deform_attn as cpu_msda

    c = make_msda_case(rng, n=1, lq=5, m=2, d=5, shapes=((3, 3), (1, 2)), p=3)
    checks.check_channel_blocks(monkeypatch, cpu_msda, run_forward, run_backward, c, rng, "value")


@pytest.mark.parametrize("big", [False, pytest.param(True, marks=pytest.mark.jit_only)], ids=["small", "big"])
def test_calls_from_threads_at_once(big, rng):
    """Four threads calling forward and backward together get the bits of a call alone."""
    check_calls_from_threads(run_forward, run_backward, _determinism_case(rng, big), rng)


def test_no_workspace_beyond_the_outputs(rng):
    """The module docstring's claim: contiguous inputs, a tiny workspace bound, and the
    peak of traced memory is the outputs plus bookkeeping (a copy of the value alone would
    be 400 KiB)."""
    c = make_msda_case(rng, n=2, lq=3, m=1, d=2, shapes=((100, 125),), p=1)
    go = rng.standard_normal((2, 3, 2))
    checks.check_no_workspace(run_forward, run_backward, c, go)
