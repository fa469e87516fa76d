"""The CUDA ms_deform_attn kernels and launch code, run on the CPU (no GPU needed).

``tests/cuda_emulation.py`` compiles ``kernels_cu/ms_deform_attn.cu`` (with
``aggregate.cuh``) with the host C++ compiler and runs ``deformarray/cuda/ms_deform_attn.py``
on NumPy arrays through it. Compared with the NumPy backend (through the public API) and
with the float64 loops below (the SPEC's numbers written out): forward and the three
gradients, both value-gradient paths (atomic, deterministic) with and without query / image
chunks, 16-bit types, edge locations (on and one ulp either side of pixel centres and of the
borders -2, -1, 0, H-1, H), NaN / inf locations, 1x1 levels, empty batch and no queries,
non-contiguous inputs, the 64-bit index path, the thread order and the workspace meter.
Independent of any reference: the value and attention gradients are exact adjoints of the
forward (linear in each), the location gradient matches central differences.
What stays unchecked without a GPU: NVRTC code generation beyond compiling
(tests/test_nvrtc_compile.py), CuPy's own functions, concurrency.
"""

from __future__ import annotations

import numpy as np
import pytest

import deformarray
from deformarray._validate_msda import MsdaParams

cuda_emulation = pytest.importorskip("cuda_emulation")

if cuda_emulation.compiler() is None:  # pragma: no cover
    pytest.skip("no host C++ compiler (g++) for the kernel emulation", allow_module_level=True)

from checks import close, dtype_of  # noqa: E402

from deformarray.cuda import ms_deform_attn as cuda_msda  # noqa: E402

GRAD_NAMES = ("value", "sampling_locations", "attention_weights")
MODES = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])


@pytest.fixture(scope="module")
def be():
    return cuda_emulation.EmulatedBackend("ms_deform_attn.cu")


# ---------------------------------------------------------------------------------------
# Cases


def params(n, shapes, m, d, lq, p):
    sizes = [h * w for h, w in shapes]
    starts = tuple(int(v) for v in np.concatenate([[0], np.cumsum(sizes)[:-1]]))
    return MsdaParams(n=n, s=sum(sizes), m=m, d=d, lq=lq, l=len(shapes), p=p, shapes=tuple(shapes), starts=starts)


def case(rng, n=2, shapes=((4, 5), (2, 3), (1, 1)), m=2, d=3, lq=5, p=2, spread=0.2):
    """Random inputs; locations in [-spread, 1 + spread], so some points leave a level."""
    pr = params(n, shapes, m, d, lq, p)
    arrays = dict(
        value=rng.standard_normal((n, pr.s, m, d)),
        loc=rng.uniform(-spread, 1 + spread, (n, lq, m, pr.l, p, 2)),
        attn=rng.uniform(-0.5, 1.0, (n, lq, m, pr.l, p)),
    )
    return pr, arrays


def edge_case(rng, shapes=((4, 8), (3, 5), (1, 1)), m=2, d=2, lq=24, p=3):
    """Every location's pixel coordinate on, or one ulp (of the normalised coordinate) either
    side of, the borders -2, -1, 0, size-1, size and an interior pixel centre, plus NaN / inf."""
    edges = pytest.importorskip("edges")
    pr, arrays = case(rng, n=1, shapes=shapes, m=m, d=d, lq=lq, p=p)
    loc = arrays["loc"]
    for li, (hh, ww) in enumerate(pr.shapes):
        for axis, size in ((0, ww), (1, hh)):
            targets = []
            for t in (-2.0, -1.0, 0.0, size - 1.0, float(size), float(size // 2)):
                targets += edges.around((t + 0.5) / size)  # normalised x with x*size - 0.5 = t
            targets += [np.nan, np.inf, -np.inf, 0.5 / size + 1e-17]
            sl = loc[..., li, :, axis]
            sl[...] = np.asarray(targets)[rng.integers(0, len(targets), sl.shape)]
    return pr, arrays


CASES = {
    "three_levels_with_1x1": dict(),
    "one_level_one_point": dict(shapes=((5, 4),), p=1, m=1, d=1, lq=3),
    "wide_channels": dict(shapes=((3, 3), (2, 2)), m=3, d=8, lq=4, p=3, n=1),
    "far_outside": dict(spread=1.5),
    "only_1x1": dict(shapes=((1, 1), (1, 1)), lq=3, p=4),
}


# ---------------------------------------------------------------------------------------
# References


def ref_forward(pr, value, loc, attn):
    """float64 loops of the SPEC: out (N, Lq, M*D)."""
    out = np.zeros((pr.n, pr.lq, pr.m, pr.d))
    for n, q, m, li, k in np.ndindex(pr.n, pr.lq, pr.m, pr.l, pr.p):
        pt = _ref_point(pr, value, loc, n, q, m, li, k)
        if pt is not None:
            out[n, q, m] += attn[n, q, m, li, k] * pt[0]
    return out.reshape(pr.out_shape)


def _ref_point(pr, value, loc, n, q, m, li, k):
    (hh, ww), start = pr.shapes[li], pr.starts[li]
    x, y = loc[n, q, m, li, k]
    w = x * ww - 0.5
    h = y * hh - 0.5
    if not (h > -2 and h < hh and w > -2 and w < ww):
        return None
    h_low, w_low = int(np.floor(h)), int(np.floor(w))
    lh, lw = h - h_low, w - w_low
    hh_, hw = 1 - lh, 1 - lw
    corners = []
    v = []
    for dy, dx, wt in ((0, 0, hh_ * hw), (0, 1, hh_ * lw), (1, 0, lh * hw), (1, 1, lh * lw)):
        yy, xx = h_low + dy, w_low + dx
        inside = 0 <= yy < hh and 0 <= xx < ww
        row = start + yy * ww + xx if inside else None
        corners.append((row, wt))
        v.append(value[n, row, m] if inside else np.zeros(pr.d))
    s = v[0] * corners[0][1] + v[1] * corners[1][1] + v[2] * corners[2][1] + v[3] * corners[3][1]
    ds_dh = hw * (v[2] - v[0]) + lw * (v[3] - v[1])
    ds_dw = hh_ * (v[1] - v[0]) + lh * (v[3] - v[2])
    return s, ds_dh, ds_dw, corners, hh, ww


def ref_backward(pr, grad_out, value, loc, attn):
    g_value = np.zeros_like(value)
    g_loc = np.zeros_like(loc)
    g_attn = np.zeros_like(attn)
    go = grad_out.reshape(pr.n, pr.lq, pr.m, pr.d)
    for n, q, m, li, k in np.ndindex(pr.n, pr.lq, pr.m, pr.l, pr.p):
        pt = _ref_point(pr, value, loc, n, q, m, li, k)
        if pt is None:
            continue
        s, ds_dh, ds_dw, corners, hh, ww = pt
        a = attn[n, q, m, li, k]
        g = go[n, q, m]
        for row, wt in corners:
            if row is not None:
                g_value[n, row, m] += a * wt * g
        g_attn[n, q, m, li, k] = np.dot(g, s)
        g_loc[n, q, m, li, k, 0] = ww * a * np.dot(g, ds_dw)
        g_loc[n, q, m, li, k, 1] = hh * a * np.dot(g, ds_dh)
    return g_value, g_loc, g_attn


def cpu_results(pr, arrays, grad_out):
    """The NumPy backend (deformarray/cpu/ms_deform_attn.py) through the public API, float64."""
    a = {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    shapes = np.array(pr.shapes, dtype=np.int64)
    starts = np.array(pr.starts, dtype=np.int64)
    out = deformarray.ms_deform_attn(a["value"], shapes, starts, a["loc"], a["attn"])
    grads = deformarray.ms_deform_attn_backward(grad_out, a["value"], shapes, starts, a["loc"], a["attn"])
    return out, tuple(grads)


def emulated(be, pr, arrays, grad_out, dtype, deterministic):
    a = {k: np.asarray(v).astype(dtype) for k, v in arrays.items()}
    out = cuda_msda._forward(be, pr, a["value"], a["loc"], a["attn"])
    grads = cuda_msda._backward(be, pr, grad_out.astype(dtype), a["value"], a["loc"], a["attn"], deterministic)
    return out, grads


def _ulps(got, want):
    """Largest difference in units of the last place of the larger magnitude (float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.spacing(np.maximum(np.abs(got), np.abs(want)).max(initial=1.0))
    return float(np.abs(got - want).max(initial=0.0) / scale)


# ---------------------------------------------------------------------------------------
# float64


@MODES
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_cpu_backend(be, name, deterministic):
    rng = np.random.default_rng(sum(map(ord, name)))
    pr, arrays = case(rng, **CASES[name])
    grad_out = rng.standard_normal(pr.out_shape)
    want_out, want = cpu_results(pr, arrays, grad_out)
    out, grads = emulated(be, pr, arrays, grad_out, np.float64, deterministic)
    assert _ulps(out, want_out) <= 4, "output"
    for gname, g, wg in zip(GRAD_NAMES, grads, want):
        assert g.shape == wg.shape and g.dtype == np.float64, gname
        assert _ulps(g, wg) <= 16, gname  # value: the same terms summed in another order


def test_matches_reference_loops(be):
    rng = np.random.default_rng(3)
    pr, arrays = case(rng)
    grad_out = rng.standard_normal(pr.out_shape)
    want_out = ref_forward(pr, arrays["value"], arrays["loc"], arrays["attn"])
    want = ref_backward(pr, grad_out, arrays["value"], arrays["loc"], arrays["attn"])
    for det in (False, True):
        out, grads = emulated(be, pr, arrays, grad_out, np.float64, det)
        close(out, want_out, 1e-13, "output")
        for gname, g, wg in zip(GRAD_NAMES, grads, want):
            close(g, wg, 1e-13, f"grad {gname}")


@MODES
@pytest.mark.parametrize("seed", [0, 1])
def test_edge_locations(be, seed, deterministic):
    """Pixel coordinates on and one ulp around the borders and a pixel centre, NaN and inf:
    the same corners (so the same numbers to rounding) as the CPU backend and the loops."""
    rng = np.random.default_rng(40 + seed)
    pr, arrays = edge_case(rng)
    grad_out = rng.standard_normal(pr.out_shape)
    out, grads = emulated(be, pr, arrays, grad_out, np.float64, deterministic)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    want_out = ref_forward(pr, arrays["value"], arrays["loc"], arrays["attn"])
    want = ref_backward(pr, grad_out, arrays["value"], arrays["loc"], arrays["attn"])
    close(out, want_out, 1e-13, "output (loops)")
    for gname, g, wg in zip(GRAD_NAMES, grads, want):
        close(g, wg, 1e-13, f"grad {gname} (loops)")
    cpu_out, cpu = cpu_results(pr, arrays, grad_out)
    assert _ulps(out, cpu_out) <= 4, "output (CPU backend)"
    for gname, g, wg in zip(GRAD_NAMES, grads, cpu):
        assert _ulps(g, wg) <= 16, f"grad {gname} (CPU backend)"


def test_unused_points_contribute_nothing(be):
    """NaN / inf / far locations and NaN attention weights at unused points: zero output
    share and zero gradients, not NaN."""
    rng = np.random.default_rng(5)
    pr, arrays = case(rng, n=1, lq=3, p=3)
    arrays["loc"][:, :, :, :, 0] = np.nan
    arrays["loc"][:, :, :, :, 1, 0] = np.inf
    arrays["loc"][:, :, :, :, 2, 1] = -2.0  # h = -2H - 0.5 < -2
    arrays["attn"][:, :, :, :, 0] = np.nan
    grad_out = rng.standard_normal(pr.out_shape)
    for det in (False, True):
        out, (gv, gl, ga) = emulated(be, pr, arrays, grad_out, np.float64, det)
        assert not out.any() and not gv.any() and not gl.any() and not ga.any()


def test_gradients_by_definition(be):
    """Independent of any reference: the value and attention gradients are the exact
    adjoints of the forward (linear in each); location gradients match central differences."""
    rng = np.random.default_rng(6)
    pr, arrays = case(rng, spread=0.0)
    arrays["loc"] = rng.uniform(0.05, 0.95, arrays["loc"].shape)
    grad_out = rng.standard_normal(pr.out_shape)
    _, (g_value, g_loc, g_attn) = emulated(be, pr, arrays, grad_out, np.float64, True)

    def loss(**changed):
        a = dict(arrays, **changed)
        return float(np.sum(grad_out * cuda_msda._forward(be, pr, a["value"], a["loc"], a["attn"])))

    base = loss()
    for name, grad in (("value", g_value), ("attn", g_attn)):
        dv = rng.standard_normal(arrays[name].shape)
        lin = loss(**{name: arrays[name] + dv}) - base
        assert abs(lin - float(np.sum(grad * dv))) < 1e-10 * (1 + abs(base)), name
    eps = 1e-7
    for idx in [tuple(rng.integers(0, s) for s in arrays["loc"].shape) for _ in range(12)]:
        plus, minus = arrays["loc"].copy(), arrays["loc"].copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (loss(loc=plus) - loss(loc=minus)) / (2 * eps)
        assert abs(fd - g_loc[idx]) < 1e-5 * (1 + abs(fd)), (idx, fd, g_loc[idx])


# ---------------------------------------------------------------------------------------
# Reduced precision


def _rounded(arrays, grad_out, dt):
    """The inputs rounded to dt, as float64: what the kernels see."""
    return {k: v.astype(dt).astype(np.float64) for k, v in arrays.items()}, grad_out.astype(dt).astype(np.float64)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reduced_precision(be, dtype):
    """float32 against the NumPy backend on the same float32 values; the 16-bit types
    against the kernels' float32 run on the same rounded inputs (both compute coordinates
    in float32, so they agree on the corners)."""
    dt = dtype_of(dtype)
    rng = np.random.default_rng(7)
    pr, arrays = case(rng, m=2, d=4, lq=6, p=3)
    arrays, grad_out = _rounded(arrays, rng.standard_normal(pr.out_shape), dt)
    if dtype == "float32":
        want_out, want = cpu_results(pr, arrays, grad_out)
    else:
        want_out, want = emulated(be, pr, arrays, grad_out, np.float32, False)
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2.0**-7}[dtype]
    for det in (False, True):
        out, grads = emulated(be, pr, arrays, grad_out, dt, det)
        assert out.dtype == dt
        close(out, want_out, tol, "output")
        for gname, g, wg in zip(GRAD_NAMES, grads, want):
            assert g.dtype == dt and g.shape == wg.shape, gname
            close(g, wg, tol, f"grad {gname}")


# ---------------------------------------------------------------------------------------
# Modes, chunks, determinism


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@MODES
def test_chunking_matches_unchunked(be, dtype, deterministic):
    """Image chunks (16-bit accumulators) and query chunks (deterministic partials) give
    the unchunked numbers."""
    rng = np.random.default_rng(11)
    pr, arrays = case(rng, n=3, lq=7)
    grad_out = rng.standard_normal(pr.out_shape)
    full_out, full = emulated(be, pr, arrays, grad_out, np.dtype(dtype), deterministic)
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}[dtype]
    for limit in (1, 400, 3000, 10_000):
        with deformarray.workspace_limit(limit):
            out, grads = emulated(be, pr, arrays, grad_out, np.dtype(dtype), deterministic)
        assert out.tobytes() == full_out.tobytes(), limit
        for gname, g, f in zip(GRAD_NAMES, grads, full):
            if gname == "value":
                close(g, f, tol, f"grad {gname}, limit {limit}")
            else:  # one thread per point in every mode and plan
                assert g.tobytes() == f.tobytes(), (gname, limit)


def test_deterministic_plan():
    plan = cuda_msda.deterministic_plan
    pr = params(2, ((4, 5), (2, 3), (1, 1)), 2, 3, 5, 2)  # S*M*D = 162 elements per image
    per_image = pr.s * pr.m * pr.d * 4
    assert plan(pr, 4, False, 10**9) == (2, 5)  # K up to Lq
    assert plan(pr, 4, False, 3 * per_image) == (2, 0)  # partials for fewer than 2 images: direct
    assert plan(pr, 4, False, 4 * per_image) == (2, 2)
    assert plan(pr, 4, True, 1) == (1, 1)  # one image's float32 buffer at least
    assert plan(pr, 4, True, 3 * per_image) == (2, 1)
    assert plan(pr, 4, True, 7 * per_image) == (2, 3)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("limit", [None, 1500], ids=["whole", "chunked"])
@MODES
def test_results_do_not_depend_on_thread_order(be, deterministic, limit, dtype):
    """Forward and gradients with the kernels' threads forwards and backwards: the same bits,
    except the atomic value gradient (rounding only)."""
    rng = np.random.default_rng(22)
    pr, arrays = case(rng, n=2, shapes=((3, 3), (2, 2)), lq=9, p=4, spread=0.0)  # many points per pixel
    grad_out = rng.standard_normal(pr.out_shape)
    with cuda_emulation.workspace_bound(limit):
        cuda_emulation.assert_thread_order_free(
            be,
            lambda: emulated(be, pr, arrays, grad_out, np.dtype(dtype), deterministic),
            GRAD_NAMES,
            atomic=() if deterministic else ("value",),
            rtol=1e-5 if dtype == "float32" else 1e-2,
            check_applied=dtype == "float32",
        )


def test_deterministic_is_repeatable_and_close_to_atomic(be):
    rng = np.random.default_rng(13)
    pr, arrays = case(rng, n=1, shapes=((3, 4),), lq=16, p=4, spread=0.0)
    grad_out = rng.standard_normal(pr.out_shape)
    first = emulated(be, pr, arrays, grad_out, np.float32, True)[1]
    again = emulated(be, pr, arrays, grad_out, np.float32, True)[1]
    atomic = emulated(be, pr, arrays, grad_out, np.float32, False)[1]
    for a, b, c in zip(first, again, atomic):
        assert a.tobytes() == b.tobytes()
        close(c, a, 1e-5, "atomic vs deterministic")


def test_64bit_index_path_gives_the_same_bits(be, monkeypatch):
    rng = np.random.default_rng(14)
    pr, arrays = case(rng)
    grad_out = rng.standard_normal(pr.out_shape)
    for det in (False, True):
        narrow = emulated(be, pr, arrays, grad_out, np.float32, det)
        monkeypatch.setattr(cuda_msda, "_INDEX32_MAX", 0)
        wide = emulated(be, pr, arrays, grad_out, np.float32, det)
        monkeypatch.undo()
        assert narrow[0].tobytes() == wide[0].tobytes()
        for a, b in zip(narrow[1], wide[1]):
            assert a.tobytes() == b.tobytes()
    assert cuda_msda._suffix(2**31 - 1) == "_i32" and cuda_msda._suffix(10, 2**31) == "_i64"


# ---------------------------------------------------------------------------------------
# Shapes and layouts


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("n, lq", [(0, 4), (2, 0), (0, 0)])
def test_empty_batch_and_no_queries(be, n, lq, dtype):
    rng = np.random.default_rng(1)
    pr, arrays = case(rng, n=n, lq=lq)
    dt = np.dtype(dtype)
    for det in (False, True):
        out, (gv, gl, ga) = emulated(be, pr, arrays, np.zeros(pr.out_shape), dt, det)
        assert out.shape == pr.out_shape and out.dtype == dt
        assert gv.shape == arrays["value"].shape and gv.dtype == dt and not gv.any()
        assert gl.shape == arrays["loc"].shape and ga.shape == arrays["attn"].shape


def test_non_contiguous(be):
    rng = np.random.default_rng(9)
    pr, arrays = case(rng)
    grad_out = rng.standard_normal(pr.out_shape)
    want_out, want = emulated(be, pr, arrays, grad_out, np.float64, True)
    f = {k: np.asfortranarray(v) for k, v in arrays.items()}
    out = cuda_msda._forward(be, pr, f["value"], f["loc"], f["attn"])
    grads = cuda_msda._backward(be, pr, np.asfortranarray(grad_out), f["value"], f["loc"], f["attn"], True)
    np.testing.assert_array_equal(out, want_out)
    for g, w in zip(grads, want):
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------
# Workspace


@pytest.mark.parametrize(
    "dtype, deterministic",
    [("float32", False), ("float32", True), ("float64", True), ("float16", False), ("float16", True)],
    ids=lambda v: str(v),
)
def test_launch_code_allocates_within_the_workspace_bound(be, dtype, deterministic):
    """Beyond its results and the level table, the launch code allocates: nothing for the
    forward and for the float32 atomic backward; within the bound otherwise (down to one
    image's float32 buffer, the least the 16-bit types need); unbounded, the deterministic
    partial buffers take several times more."""
    rng = np.random.default_rng(32)
    pr, arrays = case(rng, n=4, shapes=((6, 6), (3, 3), (1, 1)), m=2, d=4, lq=40, p=2)
    a = {k: v.astype(dtype) for k, v in arrays.items()}
    go = rng.standard_normal(pr.out_shape).astype(dtype)
    table = 24 * pr.l
    one_image = pr.s * pr.m * pr.d * 4
    limits = (None, 10 * one_image, 3 * one_image, one_image)
    peaks = {}
    for limit in limits:
        with cuda_emulation.workspace_bound(limit):
            with be.metered() as fwd:
                out = cuda_msda._forward(be, pr, a["value"], a["loc"], a["attn"])
            with be.metered() as bwd:
                grads = cuda_msda._backward(be, pr, go, a["value"], a["loc"], a["attn"], deterministic)
        peaks[limit] = (fwd.peak - out.nbytes - table, bwd.peak - sum(g.nbytes for g in grads) - table)
    for limit, (fwd, bwd) in peaks.items():
        assert fwd == 0, (limit, fwd)
        if dtype != "float16" and not deterministic:
            assert bwd == 0, (limit, bwd)
        if limit is not None:
            assert bwd <= limit, (limit, bwd)
    if deterministic:  # the bound is what kept the partial buffers small
        assert peaks[None][1] > 3 * peaks[limits[-1]][1], peaks
