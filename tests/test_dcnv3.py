"""dcnv3 / dcnv3_backward on NumPy arrays.

- forward and every gradient against the float64 loops of reference_dcn.py, float32 and
  float64: kernels 1x1, 3x3, 5x5, 3x5, 5x3 and 2x2, stride 2, padding 0/1/2, dilation 2,
  group 1/3, group_channels 1/5, offset_scale 0.5/2, remove_center, N = 0, NaN / inf;
- offsets that put the pixel coordinate exactly on, or one ulp either side of, -1, 0,
  integers, H-1 and H (the window -1 < y < H, the floor, the corner checks);
- the ``grid_sample`` composition of InternImage (``dcnv3_core_pytorch``) in float64,
  forward and torch autograd gradients, away from exactly -1 (where the two differ);
- the backward is the adjoint of the forward (input and mask: the operator is linear in
  both) and matches central differences for the offsets away from the kinks;
- Hypothesis: random geometries with edge offsets; zero and integer offsets with unit
  masks are a plain (shifted) depthwise aggregation, bit for bit;
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
from dcn_cases import SETTINGS, dcn_geometries, edge_coords, targeted
from edges import around, edge_targets
from hypothesis import given
from hypothesis import strategies as st
from reference_dcn import (
    geometry_of,
    make_dcn_case,
    ref_dcnv3,
    ref_dcnv3_backward,
    sample_location,
)

import deformarray as da

GRAD_NAMES = ("input", "offset", "mask")


def run_forward(c):
    return da.dcnv3(**c)


def run_backward(go, c, **extra):
    return da.dcnv3_backward(go, **c, **extra)


def check_against_reference(c, rng, dtype):
    """Forward and the three gradients against the reference; returns (y, grads)."""
    return checks.check_against_reference(
        run_forward, run_backward, ref_dcnv3, ref_dcnv3_backward, da.Dcnv3Grads, c, rng, dtype
    )


# ---------------------------------------------------------------------------------------
# Against the reference
# ---------------------------------------------------------------------------------------

CASES = {
    "3x3": dict(),
    "1x1": dict(kernel_size=1, padding=0, n=1),
    "5x5_pad2": dict(kernel_size=5, padding=2, h=6, w=5, n=1, group=1),
    "3x5": dict(kernel_size=(3, 5), padding=(1, 2), n=1),
    "5x3_remove_center": dict(kernel_size=(5, 3), padding=(2, 1), remove_center=True, n=1),
    "2x2_even": dict(kernel_size=2, padding=0, group=1, group_channels=2),
    "stride2": dict(stride=2, h=7, w=6),
    "dilation2_pad2": dict(dilation=2, padding=2, n=1),
    "pad0": dict(padding=0, h=6, w=5),
    "group3_channels1": dict(group=3, group_channels=1, n=1),
    "group1_channels5": dict(group=1, group_channels=5, n=1),
    "scale_half": dict(offset_scale=0.5),
    "scale_2": dict(offset_scale=2.0, n=1),
    "remove_center": dict(remove_center=True),
    "mixed": dict(kernel_size=(3, 2), stride=(2, 1), padding=(0, 2), dilation=(1, 2), n=1, spread=2.5),
    "far_outside": dict(spread=6.0, n=1),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("geom", list(CASES.values()), ids=list(CASES))
def test_matches_reference(geom, dtype, rng):
    c = make_dcn_case(rng, dtype=dtype, **geom)
    _, grads = check_against_reference(c, rng, dtype)
    for name in GRAD_NAMES:
        assert np.abs(getattr(grads, name)).max() > 0, name


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_empty_batch(dtype, rng):
    c = make_dcn_case(rng, n=0, dtype=dtype)
    y = run_forward(c)
    assert y.shape == (0, 5, 4, 6) and y.dtype == dtype
    grads = run_backward(np.zeros(y.shape, dtype), c)
    for name in GRAD_NAMES:
        got = getattr(grads, name)
        assert got.shape == c[name].shape and got.dtype == dtype, name


def test_non_finite_offsets_give_zero(rng):
    """NaN and infinite offsets are not processed: they contribute nothing, whatever the
    mask (NaN here), and get +0 offset and mask gradients."""
    c = make_dcn_case(rng, n=1, group=2)
    off, m = c["offset"], c["mask"]
    bad = [(0, 0, 0, 0, np.nan, 0.5), (0, 1, 2, 4, 0.5, np.inf), (0, 4, 3, 10, -np.inf, np.nan)]  # (n, ho, wo, g*P+k)
    for n, ho, wo, gk, x, y in bad:
        off[n, ho, wo, 2 * gk : 2 * gk + 2] = (x, y)
        m[n, ho, wo, gk] = np.nan
    y, grads = check_against_reference(c, rng, np.float64)
    assert np.isfinite(y).all()
    for name in GRAD_NAMES:
        assert np.isfinite(getattr(grads, name)).all(), name
    for n, ho, wo, gk, _, _ in bad:
        assert grads.offset[n, ho, wo, 2 * gk : 2 * gk + 2].tobytes() == np.zeros(2).tobytes()
        assert grads.mask[n, ho, wo, gk].tobytes() == np.zeros(()).tobytes()


# ---------------------------------------------------------------------------------------
# Offsets that put the sample on the edges
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.7], ids=["s1", "s0.5", "s0.7"])
def test_edge_locations(scale, dtype, rng):
    """Pixel coordinates on and one ulp either side of -1, 0, the integers, H-1 and H:
    forward and gradients match the reference (which samples the same coordinates: in the
    data's dtype, with the contract's roundings), so the window, the floor and the corner
    checks are those of the contract. H = 4 (a power of two) and W = 5."""
    h, w = 4, 5
    # s = 0.7 with dilation 3: e = 3 and acc(e)*s rounds in float32
    dilation, padding = (3, 3) if scale == 0.7 else (1, 1)
    c = make_dcn_case(
        rng,
        n=2,
        h=h,
        w=w,
        group=1,
        group_channels=2,
        offset_scale=scale,
        dtype=dtype,
        dilation=dilation,
        padding=padding,
    )
    hit_y, hit_x = targeted(c, rng, edge_coords(h, dtype), edge_coords(w, dtype), dtype)
    for size, hits in ((h, hit_y), (w, hit_x)):
        for t in (-1.0, 0.0, 1.0, size - 1.0, float(size)):
            # with s != 1 the offset-free position is not an integer: the subnormals next to
            # 0 are not reachable (base + t rounds), 0 itself is. s = 0.7 is not dyadic (the
            # roundings of base = acc(pos) - acc(e)*s matter there): the integers themselves
            want = set(around(t, dtype)) if scale == 1.0 or (t != 0.0 and scale == 0.5) else {t}
            assert want <= hits, (size, t, sorted(want - hits))
    check_against_reference(c, rng, dtype)


def test_edge_values_by_hand(rng):
    """Hand-checked values on a 4x5 image, 1x1 kernel, unit masks on the first output row
    (zero elsewhere): at y = -1 exactly the point is not processed (no gradient at all,
    unlike grid_sample); one ulp inside it is; at H nothing; at a pixel the sample is the
    pixel; on the last column the right corners are absent."""
    H, W = 4, 5
    pts = [(-1.0, 2.0), (float(np.nextafter(-1.0, 0.0)), 2.0), (float(H), 1.0), (2.0, 3.0), (1.0, float(W - 1))]
    offset = np.zeros((1, H, W, 2))
    mask = np.zeros((1, H, W, 1))
    for q, (ty, tx) in enumerate(pts):  # output pixel (0, q) samples (ty, tx)
        offset[0, 0, q] = (tx - q, ty)
        mask[0, 0, q] = 1.0
    c = dict(input=rng.standard_normal((1, H, W, 2)), offset=offset, mask=mask, kernel_size=1)
    y = run_forward(c)[0, 0]
    g = run_backward(np.ones((1, H, W, 2)), c)
    gx, gy, gm = g.offset[0, 0, :, 0], g.offset[0, 0, :, 1], g.mask[0, 0, :, 0]
    v = c["input"][0]
    assert not y[0].any() and gy[0] == 0.0 and gx[0] == 0.0 and gm[0] == 0.0  # y = -1: dropped
    assert gy[1] == v[0, 2].sum() and gm[1] != 0.0  # one ulp inside: row 0 counts
    assert not y[2].any() and gy[2] == 0.0 and gx[2] == 0.0  # y = H: dropped
    np.testing.assert_array_equal(y[3], v[2, 3])  # a pixel
    np.testing.assert_array_equal(y[4], v[1, W - 1])  # last column
    assert gx[4] == 0.0 - v[1, W - 1].sum()
    check_against_reference(c, rng, np.float64)


# ---------------------------------------------------------------------------------------
# InternImage's grid_sample composition (dcnv3_core_pytorch), written here
# ---------------------------------------------------------------------------------------


def grid_sample_dcnv3(input, offset, mask, kernel_size, stride, padding, dilation, group, offset_scale, remove_center):
    """In the style of InternImage's ``dcnv3_core_pytorch``: pad, reference points at the
    window centres, the dilation grid times offset_scale, offsets * offset_scale divided by
    the padded size, ``grid_sample(align_corners=False, padding_mode='zeros')`` of
    ``2*loc - 1``, mask-weighted sum. float64 throughout (InternImage builds its grids in
    float32). InternImage pads with ``F.pad(input, [0, 0, pad_h, pad_h, pad_w, pad_w])``,
    which pads the W axis with pad_h and the H axis with pad_w (an axis swap): only equal
    pads are used here, where it does not matter."""
    import torch
    import torch.nn.functional as F

    kh, kw = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
    sh, sw = (stride, stride) if np.isscalar(stride) else stride
    dh, dw = (dilation, dilation) if np.isscalar(dilation) else dilation
    assert np.isscalar(padding)
    pad = padding
    x = F.pad(input, [0, 0, pad, pad, pad, pad])
    n, hp, wp, c = x.shape
    _, h_out, w_out, _ = offset.shape
    d = c // group
    eh, ew = (dh * (kh - 1)) // 2, (dw * (kw - 1)) // 2
    f64 = torch.float64
    ref_y = (eh + 0.5 + torch.arange(h_out, dtype=f64) * sh) / hp
    ref_x = (ew + 0.5 + torch.arange(w_out, dtype=f64) * sw) / wp
    ry, rx = torch.meshgrid(ref_y, ref_x, indexing="ij")
    ref = torch.stack([rx, ry], -1)  # (H_out, W_out, 2), x first
    taps = [(i, j) for i in range(kw) for j in range(kh) if not (remove_center and i == kw // 2 and j == kh // 2)]
    p = len(taps)
    grid = torch.tensor([[(i * dw - ew) / wp, (j * dh - eh) / hp] for i, j in taps], dtype=f64)  # (P, 2)
    loc = ref[:, :, None, None, :] + grid[None, None, None] * offset_scale  # (H_out, W_out, 1, P, 2)
    norm = torch.tensor([wp, hp], dtype=f64)
    loc = loc[None] + offset.view(n, h_out, w_out, group, p, 2) * offset_scale / norm
    grids = 2 * loc - 1
    value = x.view(n, hp * wp, c).transpose(1, 2).reshape(n * group, d, hp, wp)
    grid_ = grids.view(n, h_out * w_out, group, p, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(value, grid_, mode="bilinear", padding_mode="zeros", align_corners=False)
    m = mask.view(n, h_out * w_out, group, p).transpose(1, 2).reshape(n * group, 1, h_out * w_out, p)
    out = (sampled * m).sum(-1).view(n, c, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, c)


GS_CASES = {
    "3x3": dict(),
    "3x5_stride2_dil2": dict(kernel_size=(3, 5), stride=2, dilation=2, padding=2, h=7, w=8, n=1),
    "remove_center_scale2": dict(remove_center=True, offset_scale=2.0, n=1),
    "2x2_pad0_group3": dict(kernel_size=2, padding=0, group=3, group_channels=1, offset_scale=0.5),
}


@pytest.mark.parametrize("geom", list(GS_CASES.values()), ids=list(GS_CASES))
def test_matches_grid_sample_composition(geom, rng):
    """float64, random offsets (never exactly -1): forward and autograd gradients."""
    torch = pytest.importorskip("torch")
    c = make_dcn_case(rng, spread=2.0, **geom)
    _compare_with_grid_sample(c, rng, torch)


def test_matches_grid_sample_composition_on_edges(rng):
    """Pixel coordinates exactly on 0, the integers, H-1, H, H+1 and halves (padded image
    8x8, dyadic offsets: the normalisation of the composition is exact, so both sample the
    same points). Not -1: there grid_sample interpolates towards row/column 0 inside the
    padding and has a non-zero location gradient, while DCNv3 (InternImage's CUDA kernel,
    this library) drops the point and all its gradients."""
    torch = pytest.importorskip("torch")
    c = make_dcn_case(rng, n=1, h=6, w=6, group=2, group_channels=2)
    targets = [-1.5, -0.5, 0.0, 0.5, 1.0, 2.0, 3.5, 5.0, 5.5, 6.0, 7.0]
    hit_y, hit_x = targeted(c, rng, targets, targets, np.float64)
    assert -1.0 not in hit_y | hit_x and {0.0, 5.0, 6.0} <= hit_y & hit_x
    y, grads = _compare_with_grid_sample(c, rng, torch)
    assert np.abs(grads.offset).max() > 0


def _compare_with_grid_sample(c, rng, torch):
    y = run_forward(c)
    go = rng.standard_normal(y.shape)
    grads = run_backward(go, c)
    t = {k: torch.tensor(c[k], requires_grad=True) for k in GRAD_NAMES}
    kw = {k: c[k] for k in ("kernel_size", "stride", "padding", "dilation", "group", "offset_scale", "remove_center")}
    y_t = grid_sample_dcnv3(t["input"], t["offset"], t["mask"], **kw)
    y_t.backward(torch.from_numpy(go))
    assert_close(y, y_t.detach().numpy(), np.float64, "output")
    for name in GRAD_NAMES:
        assert_close(getattr(grads, name), t[name].grad.numpy(), np.float64, f"grad {name}")
    return y, grads


# ---------------------------------------------------------------------------------------
# Gradients by definition (float64)
# ---------------------------------------------------------------------------------------


def _loss(go, c, **changed):
    return float(np.sum(go * run_forward(dict(c, **changed))))


@pytest.mark.parametrize("geom", [dict(), dict(kernel_size=(3, 2), stride=2, padding=2, remove_center=False)])
def test_adjoint_input_and_mask(geom, rng):
    """The forward is linear in the input and in the mask, so <go, f(dx)> =
    <grad_input, dx> and <go, f(mask = dm)> = <grad_mask, dm> up to rounding."""
    c = make_dcn_case(rng, spread=2.5, **geom)
    go = rng.standard_normal(run_forward(c).shape)
    grads = run_backward(go, c)
    base = _loss(go, c)
    assert abs(base - float(np.sum(grads.input * c["input"]))) <= 1e-12 * (1 + abs(base))
    assert abs(base - float(np.sum(grads.mask * c["mask"]))) <= 1e-12 * (1 + abs(base))
    dx = rng.standard_normal(c["input"].shape)
    lhs = _loss(go, c, input=dx)
    assert abs(lhs - float(np.sum(grads.input * dx))) <= 1e-12 * (1 + abs(lhs))
    dm = rng.standard_normal(c["mask"].shape)
    lhs = _loss(go, c, mask=dm)
    assert abs(lhs - float(np.sum(grads.mask * dm))) <= 1e-12 * (1 + abs(lhs))


@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_offset_gradient_central_differences(scale, rng):
    """Central differences of <go, f> along each offset, for points whose pixel
    coordinates stay at least 1e-3 from an integer (the kinks, and the window's edges)."""
    c = make_dcn_case(rng, n=1, h=3, w=4, group=1, group_channels=2, offset_scale=scale, spread=2.0)
    geo = geometry_of(c)
    go = rng.standard_normal(run_forward(c).shape)
    grads = run_backward(go, c)
    off = c["offset"]
    eps = 1e-7
    checked = 0
    p = len(geo.taps)
    for n, ho, wo, g in np.ndindex(geo.n, geo.h_out, geo.w_out, geo.g):
        for k, (i, j) in enumerate(geo.taps):
            ch = 2 * (g * p + k)
            y, x = sample_location(geo, ho, wo, i, j, off[n, ho, wo, ch], off[n, ho, wo, ch + 1], np.float64)
            if min(abs(y - round(y)), abs(x - round(x))) < 1e-3:
                continue
            for axis in (0, 1):
                up, down = off.copy(), off.copy()
                up[n, ho, wo, ch + axis] += eps
                down[n, ho, wo, ch + axis] -= eps
                fd = (_loss(go, c, offset=up) - _loss(go, c, offset=down)) / (2 * eps)
                got = grads.offset[n, ho, wo, ch + axis]
                assert abs(fd - got) <= 1e-6 * (1 + abs(fd)), (n, ho, wo, g, k, axis, fd, got)
                checked += 1
    assert checked >= 80, checked
    assert np.count_nonzero(grads.offset) > 50


# ---------------------------------------------------------------------------------------
# Properties (Hypothesis)
# ---------------------------------------------------------------------------------------


@SETTINGS
@given(
    geom=dcn_geometries(),
    dtype=st.sampled_from(DTYPES),
    edge_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_geometry_property(geom, dtype, edge_fraction, seed):
    """Any small geometry, N = 0 included, with a fraction of the points put on edge pixel
    coordinates (``edges.edge_targets``), matches the reference."""
    rng = np.random.default_rng(seed)
    c = make_dcn_case(rng, dtype=dtype, spread=2.0, **geom)
    if edge_fraction and c["input"].shape[0]:
        keep = c["offset"].copy()
        targeted(c, rng, edge_targets(geom["h"], dtype), edge_targets(geom["w"], dtype), dtype)
        chosen = rng.random(keep.shape[:-1] + (keep.shape[-1] // 2,)) < edge_fraction
        chosen = np.repeat(chosen, 2, axis=-1)
        c["offset"] = np.where(chosen, c["offset"], keep)
    check_against_reference(c, rng, dtype)


def shifted_depthwise(x, kernel_size, stride, padding, dilation, group, shifts):
    """NumPy: out[n, ho, wo, g*D + d] = sum over the taps k = (i, j), in order, from 0, of
    x[n, ho*sh - ph + j*dh + sy, wo*sw - pw + i*dw + sx, g*D + d] with zero padding, where
    (sx, sy) = shifts[n, ho, wo, g, k] (integers)."""
    n, h, w, c = x.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    _, h_out, w_out, _, p, _ = shifts.shape
    d = c // group
    margin = int(np.abs(shifts).max(initial=0)) + max(ph, pw) + max(kh * dh, kw * dw) + 1
    big = np.zeros((n, h + 2 * margin, w + 2 * margin, c), x.dtype)
    big[:, margin : margin + h, margin : margin + w] = x
    out = np.zeros((n, h_out, w_out, c), x.dtype)
    nn, hh, ww = np.meshgrid(np.arange(n), np.arange(h_out), np.arange(w_out), indexing="ij")
    taps = [(i, j) for i in range(kw) for j in range(kh)]
    for k, (i, j) in enumerate(taps):
        for g in range(group):
            rows = hh * sh - ph + j * dh + shifts[:, :, :, g, k, 1] + margin
            cols = ww * sw - pw + i * dw + shifts[:, :, :, g, k, 0] + margin
            out[..., g * d : (g + 1) * d] += big[nn, rows, cols, g * d : (g + 1) * d]
    return out


@SETTINGS
@given(geom=dcn_geometries(), dtype=st.sampled_from(DTYPES), shifted=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_integer_offsets_are_a_shifted_depthwise_sum(geom, dtype, shifted, seed):
    """offset_scale 1, unit masks: zero offsets with one group give the plain depthwise
    aggregation with zero padding, integer offsets the shifted one, bit for bit (samples
    at integers are the pixels, added in tap order); the input gradient of a unit
    grad_output counts the taps reading each pixel."""
    rng = np.random.default_rng(seed)
    geom = dict(geom, offset_scale=1.0, remove_center=False)
    if not shifted:
        geom["group"] = 1
    c = make_dcn_case(rng, dtype=dtype, **geom)
    n, h_out, w_out, gp2 = c["offset"].shape
    group = geom["group"]
    p = gp2 // (2 * group)
    shifts = (
        rng.integers(-3, 4, (n, h_out, w_out, group, p, 2)) if shifted else np.zeros((n, h_out, w_out, group, p, 2))
    )
    shifts = shifts.astype(np.int64)
    c["offset"] = shifts.reshape(c["offset"].shape).astype(dtype)
    c["mask"][:] = 1
    y = run_forward(c)
    want = shifted_depthwise(
        c["input"], geom["kernel_size"], geom["stride"], geom["padding"], geom["dilation"], group, shifts
    )
    np.testing.assert_array_equal(y, want)
    grads = run_backward(np.ones(y.shape, dtype), c)
    ones = np.ones_like(c["input"])
    # the transpose of the gather applied to ones: count by adding each tap's ones in turn
    counts = np.zeros_like(c["input"])
    _scatter_counts(counts, ones, geom, shifts)
    np.testing.assert_array_equal(grads.input, counts)


def _scatter_counts(counts, ones, geom, shifts):
    n, h, w, c = counts.shape
    kh, kw = geom["kernel_size"]
    (sh, sw), (ph, pw), (dh, dw) = geom["stride"], geom["padding"], geom["dilation"]
    group = geom["group"]
    d = c // group
    _, h_out, w_out, _, p, _ = shifts.shape
    taps = [(i, j) for i in range(kw) for j in range(kh)]
    for b, ho, wo, g in np.ndindex(n, h_out, w_out, group):
        for k, (i, j) in enumerate(taps):
            r = ho * sh - ph + j * dh + shifts[b, ho, wo, g, k, 1]
            q = wo * sw - pw + i * dw + shifts[b, ho, wo, g, k, 0]
            if 0 <= r < h and 0 <= q < w:
                counts[b, r, q, g * d : (g + 1) * d] += 1


# ---------------------------------------------------------------------------------------
# Layouts, determinism, memory
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@VIEWS
def test_non_contiguous_inputs(make_view, dtype, rng):
    c = make_dcn_case(rng, n=1, dtype=dtype)
    checks.check_non_contiguous_inputs(run_forward, run_backward, c, rng, dtype, make_view, GRAD_NAMES)


def _determinism_case(rng, big):
    if big:  # enough work per call for the threads to interleave
        return make_dcn_case(rng, n=2, h=16, w=16, group=4, group_channels=8, spread=3.0)
    return make_dcn_case(rng, n=2, h=4, w=3, group=2, group_channels=3, spread=2.0)


@pytest.mark.parametrize("big", [False, pytest.param(True, marks=pytest.mark.jit_only)], ids=["small", "big"])
def test_bitwise_deterministic(big, rng):
    """Same bits on every run, with one thread or all, and with deterministic=False (the CPU
    backend always is)."""
    c = _determinism_case(rng, big)
    check_bitwise_deterministic(run_forward, run_backward, c, rng)


def test_input_gradient_does_not_depend_on_channel_blocks(monkeypatch, rng):
    """The input-gradient kernel splits each (n, g) into blocks of channels (one task
    each): from one block to one channel per block, the same bits."""
    from deformarray.cpu import dcn as cpu_dcn

    c = make_dcn_case(rng, n=1, h=3, w=3, group=2, group_channels=5, spread=1.0)
    checks.check_channel_blocks(monkeypatch, cpu_dcn, run_forward, run_backward, c, rng, "input")


@pytest.mark.parametrize("big", [False, pytest.param(True, marks=pytest.mark.jit_only)], ids=["small", "big"])
def test_calls_from_threads_at_once(big, rng):
    """Four threads calling forward and backward together get the bits of a call alone."""
    check_calls_from_threads(run_forward, run_backward, _determinism_case(rng, big), rng)


def test_no_workspace_beyond_the_outputs(rng):
    """The module docstring's claim: contiguous inputs, a tiny workspace bound, and the
    peak of traced memory is the outputs plus bookkeeping (a copy of the input alone would
    be 400 KiB)."""
    c = make_dcn_case(rng, n=1, h=100, w=250, group=1, group_channels=2, kernel_size=1, padding=0, stride=50)
    y = run_forward(c)
    go = rng.standard_normal(y.shape)
    checks.check_no_workspace(run_forward, run_backward, c, go)
