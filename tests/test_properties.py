"""Property tests (Hypothesis) for deform_conv2d on NumPy arrays, all in float64.

- zero offsets and a unit mask give plain convolution (a direct float64 sum over taps);
- constant integer offsets give the convolution of a shifted, zero-filled input;
- the output is linear in the weight and in the mask;
- the backward is the adjoint of the forward's Jacobian (dot-product test), for the
  input, offset, weight, mask and bias directions;
- every gradient agrees with central finite differences away from the integer kinks.

Geometries are small and random; arrays come from a NumPy generator seeded by Hypothesis.
"""

from __future__ import annotations

import numpy as np
import pytest
from edges import edge_targets, targeted_offsets
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import Case, ref_deform_conv2d, ref_deform_conv2d_backward

import deformarray as da

# database=None: no .hypothesis/ directory in the work tree; failures print their example.
SETTINGS = settings(deadline=None, max_examples=30, database=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 2]))
    offset_groups = draw(st.sampled_from([1, 2]))
    c_in = draw(st.sampled_from([2, 4]))
    c_out = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    dh, dw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    height, width = draw(st.integers(3, 7)), draw(st.integers(3, 7))
    n = draw(st.integers(1, 2))
    h_out = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    assume(h_out >= 1 and w_out >= 1)
    return dict(
        n=n,
        c_in=c_in,
        c_out=c_out,
        height=height,
        width=width,
        kh=kh,
        kw=kw,
        stride=(sh, sw),
        padding=(ph, pw),
        dilation=(dh, dw),
        groups=groups,
        offset_groups=offset_groups,
        h_out=h_out,
        w_out=w_out,
    )


def _arrays(g, rng, offsets="smooth"):
    """x, offset, weight, bias, mask for geometry g.

    offsets="smooth": integer part in [-3, 2] plus a fractional part in [0.1, 0.9], so that
    no sample point lies within 0.1 of an integer (where the bilinear kernel has kinks).
    """
    K = g["kh"] * g["kw"]
    x = rng.standard_normal((g["n"], g["c_in"], g["height"], g["width"]))
    oshape = (g["n"], 2 * g["offset_groups"] * K, g["h_out"], g["w_out"])
    if offsets == "smooth":
        off = rng.integers(-3, 3, oshape) + rng.uniform(0.1, 0.9, oshape)
    else:
        off = np.zeros(oshape)
    w = rng.standard_normal((g["c_out"], g["c_in"] // g["groups"], g["kh"], g["kw"]))
    b = rng.standard_normal(g["c_out"])
    m = rng.uniform(0.1, 1.0, (g["n"], g["offset_groups"] * K, g["h_out"], g["w_out"]))
    return x, off, w, b, m


def _conv(g, x, w, bias=None, padding=None):
    """Plain (grouped, strided, dilated) convolution in float64, written directly: for
    each kernel tap, a strided slice of the zero-padded input times the tap's weights."""
    ph, pw = g["padding"] if padding is None else (padding, padding)
    (sh, sw), (dh, dw) = g["stride"], g["dilation"]
    n, c_in, height, width = x.shape
    c_out, cg, kh, kw = w.shape
    h_out = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    w_out = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    xp = np.zeros((n, c_in, height + 2 * ph, width + 2 * pw))
    xp[:, :, ph : ph + height, pw : pw + width] = x
    out = np.zeros((n, c_out, h_out, w_out))
    groups = c_in // cg
    cog = c_out // groups
    for r in range(groups):
        for i in range(kh):
            for j in range(kw):
                tap = xp[
                    :,
                    r * cg : (r + 1) * cg,
                    i * dh : i * dh + (h_out - 1) * sh + 1 : sh,
                    j * dw : j * dw + (w_out - 1) * sw + 1 : sw,
                ]  # (n, cg, h_out, w_out)
                out[:, r * cog : (r + 1) * cog] += np.einsum("oc,nchw->nohw", w[r * cog : (r + 1) * cog, :, i, j], tap)
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def _dc(g, x, off, w, b=None, m=None):
    return da.deform_conv2d(x, off, w, b, g["stride"], g["padding"], g["dilation"], m)


def _dc_back(g, go, x, off, w, b=None, m=None):
    return da.deform_conv2d_backward(go, x, off, w, b, g["stride"], g["padding"], g["dilation"], m)


def _close(a, b, rel=1e-10):
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, rtol=rel, atol=rel * scale)


@SETTINGS
@given(g=geometries(), seed=st.integers(0, 2**32 - 1), unit_mask=st.booleans(), bias=st.booleans())
def test_zero_offsets_is_plain_convolution(g, seed, unit_mask, bias):
    rng = np.random.default_rng(seed)
    x, off, w, b, m = _arrays(g, rng, offsets="zero")
    b = b if bias else None
    m = np.ones_like(m) if unit_mask else None
    _close(_dc(g, x, off, w, b, m), _conv(g, x, w, b))


def _shift_pad(x, dy, dx, ph, pw):
    """Zero-padded canvas S[a, b] = x[a - ph + dy, b - pw + dx] (0 outside x)."""
    n, c, height, width = x.shape
    out = np.zeros((n, c, height + 2 * ph, width + 2 * pw))
    a_lo, a_hi = max(0, ph - dy), min(height + 2 * ph, ph - dy + height)
    b_lo, b_hi = max(0, pw - dx), min(width + 2 * pw, pw - dx + width)
    if a_lo < a_hi and b_lo < b_hi:
        out[:, :, a_lo:a_hi, b_lo:b_hi] = x[:, :, a_lo - ph + dy : a_hi - ph + dy, b_lo - pw + dx : b_hi - pw + dx]
    return out


@SETTINGS
@given(g=geometries(), seed=st.integers(0, 2**32 - 1), with_mask=st.booleans())
def test_constant_integer_offsets_is_shifted_convolution(g, seed, with_mask):
    """Offset (dy, dx) constant per (offset group, kernel point), integer: kernel point k of
    the deformable conv equals kernel point k of a plain conv on the input shifted by
    (dy, dx) with zero fill; an optional mask constant per (group, point) scales it."""
    rng = np.random.default_rng(seed)
    x, _, w, b, _ = _arrays(g, rng)
    G, kh, kw = g["offset_groups"], g["kh"], g["kw"]
    K = kh * kw
    shifts = rng.integers(-3, 4, (G, K, 2))
    scales = rng.uniform(0.1, 1.0, (G, K)) if with_mask else np.ones((G, K))
    off = np.zeros((g["n"], 2 * G * K, g["h_out"], g["w_out"]))
    off[:, 0::2] = shifts[:, :, 0].reshape(-1)[None, :, None, None]
    off[:, 1::2] = shifts[:, :, 1].reshape(-1)[None, :, None, None]
    m = np.broadcast_to(scales.reshape(1, G * K, 1, 1), (g["n"], G * K, g["h_out"], g["w_out"]))
    m = np.ascontiguousarray(m) if with_mask else None

    ph, pw = g["padding"]
    cpo = g["c_in"] // G
    expected = np.zeros((g["n"], g["c_out"], g["h_out"], g["w_out"])) + b[None, :, None, None]
    for k in range(K):
        i, j = divmod(k, kw)
        canvas = np.concatenate(
            [
                scales[og, k] * _shift_pad(x[:, og * cpo : (og + 1) * cpo], shifts[og, k, 0], shifts[og, k, 1], ph, pw)
                for og in range(G)
            ],
            axis=1,
        )
        w_k = np.zeros_like(w)
        w_k[:, :, i, j] = w[:, :, i, j]
        expected += _conv(g, canvas, w_k, padding=0)
    _close(_dc(g, x, off, w, b, m), expected)


@SETTINGS
@given(g=geometries(), seed=st.integers(0, 2**32 - 1), a=st.floats(-3, 3), c=st.floats(-3, 3))
def test_linear_in_weight_and_mask(g, seed, a, c):
    rng = np.random.default_rng(seed)
    x, off, w1, _, m1 = _arrays(g, rng)
    _, _, w2, _, m2 = _arrays(g, rng)
    _close(
        _dc(g, x, off, a * w1 + c * w2, None, m1),
        a * _dc(g, x, off, w1, None, m1) + c * _dc(g, x, off, w2, None, m1),
        rel=1e-9,
    )
    _close(
        _dc(g, x, off, w1, None, a * m1 + c * m2),
        a * _dc(g, x, off, w1, None, m1) + c * _dc(g, x, off, w1, None, m2),
        rel=1e-9,
    )
    # and in the input (v1 and v2)
    x2 = rng.standard_normal(x.shape)
    for m in (None, m1):
        _close(
            _dc(g, a * x + c * x2, off, w1, None, m),
            a * _dc(g, x, off, w1, None, m) + c * _dc(g, x2, off, w1, None, m),
            rel=1e-9,
        )


def _dot(a, b):
    return float(np.sum(a * b))


def _assert_dot_equal(lhs, rhs, terms_scale, what):
    assert abs(lhs - rhs) <= 1e-8 * max(1.0, terms_scale), f"{what}: <go, Jv> = {lhs}, <J^T go, v> = {rhs}"


@SETTINGS
@given(g=geometries(), seed=st.integers(0, 2**32 - 1), with_mask=st.booleans(), bias=st.booleans())
def test_backward_is_adjoint_of_forward(g, seed, with_mask, bias):
    """<grad_out, J v> == <J^T grad_out, v> for each argument direction v."""
    rng = np.random.default_rng(seed)
    x, off, w, b, m = _arrays(g, rng)
    b = b if bias else None
    m = m if with_mask else None
    y = _dc(g, x, off, w, b, m)
    go = rng.standard_normal(y.shape)
    grads = _dc_back(g, go, x, off, w, b, m)

    # The forward is linear in x, in w and in m (without bias): J v = f(v).
    v = rng.standard_normal(x.shape)
    jv = _dc(g, v, off, w, None, m)
    _assert_dot_equal(_dot(go, jv), _dot(grads.input, v), float(np.abs(go * jv).sum()), "input")

    v = rng.standard_normal(w.shape)
    jv = _dc(g, x, off, v, None, m)
    _assert_dot_equal(_dot(go, jv), _dot(grads.weight, v), float(np.abs(go * jv).sum()), "weight")

    if m is not None:
        v = rng.standard_normal(m.shape)
        jv = _dc(g, x, off, w, None, v)
        _assert_dot_equal(_dot(go, jv), _dot(grads.mask, v), float(np.abs(go * jv).sum()), "mask")
    else:
        assert grads.mask is None

    if b is not None:
        v = rng.standard_normal(b.shape)
        jv = np.broadcast_to(v[None, :, None, None], y.shape)
        _assert_dot_equal(_dot(go, jv), _dot(grads.bias, v), float(np.abs(go * jv).sum()), "bias")
    else:
        assert grads.bias is None

    # Offsets: fractional parts in [0.1, 0.9] and |eps * v| <= 1e-3, so no sample crosses an
    # integer; along a line the bilinear sample is quadratic, so the central difference is exact.
    v = rng.uniform(-1.0, 1.0, off.shape)
    eps = 1e-3
    jv = (_dc(g, x, off + eps * v, w, b, m) - _dc(g, x, off - eps * v, w, b, m)) / (2 * eps)
    roundoff = 1e-15 * float(np.abs(go).sum() * max(1.0, np.abs(y).max())) / eps
    lhs, rhs = _dot(go, jv), _dot(grads.offset, v)
    assert abs(lhs - rhs) <= 1e-8 * max(1.0, float(np.abs(go * jv).sum())) + roundoff, (lhs, rhs)


@SETTINGS
@given(g=geometries(), seed=st.integers(0, 2**32 - 1), with_mask=st.booleans(), bias=st.booleans())
def test_gradients_match_finite_differences(g, seed, with_mask, bias):
    """Central differences of L = <go, f(...)> in a few random entries of every argument."""
    rng = np.random.default_rng(seed)
    args = dict(zip(("x", "off", "w", "b", "m"), _arrays(g, rng)))
    if not bias:
        args["b"] = None
    if not with_mask:
        args["m"] = None
    go = rng.standard_normal((g["n"], g["c_out"], g["h_out"], g["w_out"]))
    grads = _dc_back(g, go, **args)
    by_name = {"x": grads.input, "off": grads.offset, "w": grads.weight, "b": grads.bias, "m": grads.mask}

    def loss(**changed):
        return _dot(go, _dc(g, **{**args, **changed}))

    eps = 1e-3  # offsets keep 0.1 from integers; the loss is quadratic along one entry
    for name, arr in args.items():
        if arr is None:
            assert by_name[name] is None, name
            continue
        grad = by_name[name]
        assert grad.shape == arr.shape and grad.dtype == arr.dtype, name
        flat = rng.choice(arr.size, size=min(arr.size, 4), replace=False)
        for f in flat:
            idx = np.unravel_index(f, arr.shape)
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += eps
            minus[idx] -= eps
            fd = (loss(**{name: plus}) - loss(**{name: minus})) / (2 * eps)
            assert abs(fd - grad[idx]) <= 1e-7 * max(1.0, abs(fd)), (name, idx, fd, grad[idx])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_properties_hold_in_float32_too(dtype):
    """One smoke check that the zero-offset identity also holds for float32 (looser)."""
    g = dict(
        n=2,
        c_in=4,
        c_out=4,
        height=6,
        width=5,
        kh=3,
        kw=3,
        stride=(1, 2),
        padding=(1, 1),
        dilation=(1, 1),
        groups=2,
        offset_groups=2,
        h_out=6,
        w_out=3,
    )
    rng = np.random.default_rng(7)
    x, off, w, b, _ = _arrays(g, rng, offsets="zero")
    y = _dc(g, x.astype(dtype), off.astype(dtype), w.astype(dtype), b.astype(dtype))
    assert y.dtype == np.dtype(dtype)
    rel = 1e-4 if dtype == np.float32 else 1e-10
    _close(
        y.astype(np.float64),
        _conv(
            g,
            x.astype(dtype).astype(np.float64),
            w.astype(dtype).astype(np.float64),
            b.astype(dtype).astype(np.float64),
        ),
        rel=rel,
    )


@SETTINGS
@given(
    g=geometries(),
    seed=st.integers(0, 2**32 - 1),
    with_mask=st.booleans(),
    pow2=st.sampled_from([(4, 4), (4, 8), (8, 4)]),
)
def test_edge_sample_points_match_reference(g, seed, with_mask, pow2):
    """Every sample point on, or one ulp either side of, -1, 0, H-1, H, an interior
    integer, or at -1e-17 / -1e-40 (H and W powers of two, where ``h + 1.0`` rounds up one
    ulp below H): forward and every gradient equal the float64 reference."""
    height, width = pow2
    h_out = (height + 2 * g["padding"][0] - (g["dilation"][0] * (g["kh"] - 1) + 1)) // g["stride"][0] + 1
    w_out = (width + 2 * g["padding"][1] - (g["dilation"][1] * (g["kw"] - 1) + 1)) // g["stride"][1] + 1
    assume(h_out >= 1 and w_out >= 1)
    g = dict(g, height=height, width=width, h_out=h_out, w_out=w_out)
    rng = np.random.default_rng(seed)
    x, off, w, b, m = _arrays(g, rng)
    x[-1] *= 1000.0  # a corner read from the next image's plane shows
    m = m if with_mask else None
    case = Case(x, off, w, b, g["stride"], g["padding"], g["dilation"], m)
    off, _, _ = targeted_offsets(rng, case, edge_targets(height, interior=(1, 2)), edge_targets(width, interior=(1, 2)))
    y = _dc(g, x, off, w, b, m)
    _close(y, ref_deform_conv2d(x, off, w, b, g["stride"], g["padding"], g["dilation"], m))
    go = rng.standard_normal(y.shape)
    got = _dc_back(g, go, x, off, w, b, m)
    want = ref_deform_conv2d_backward(go, x, off, w, b, g["stride"], g["padding"], g["dilation"], m)
    for name in ("input", "offset", "weight", "bias", "mask"):
        if getattr(want, name) is None:
            assert getattr(got, name) is None, name
        else:
            _close(getattr(got, name), getattr(want, name))
