"""The CUDA dcnv3 / dcnv4 kernels and launch code, run on the CPU (no GPU needed).

``tests/cuda_emulation.py`` compiles ``kernels_cu/dcn.cu`` (with ``aggregate.cuh``) with the
host C++ compiler and runs ``deformarray/cuda/dcn.py`` on NumPy arrays through it. Compared
with the NumPy backend (``deformarray/cpu/dcn.py``, through the public API) and with the
float64 loops below (the contract's numbers written out): forward and every gradient of
DCNv3 and DCNv4 (padded K: zero gradient in the padding, NaN there ignored), both
input-gradient paths (atomic, deterministic) with and without pixel / image chunks, the
16-bit types, edge points (on and one ulp either side of -1, 0, H-1, H, through
tests/dcn_cases.py's targeted offsets), NaN / inf offsets, kernels 1x1, 2x2, 3x3, 5x5, 3x5,
stride, dilation, offset_scale, remove_center, odd groups and channels, empty batch,
non-contiguous inputs, the 64-bit index path, the thread order and the workspace meter.
Independent of any reference: the input and mask gradients are exact adjoints of the
forward (linear in each), the offset gradient matches central differences.
What stays unchecked without a GPU: NVRTC code generation beyond compiling
(tests/test_nvrtc_compile.py), CuPy's own functions, concurrency.
"""

from __future__ import annotations

import numpy as np
import pytest

import deformarray
from deformarray._validate_dcn import dcnv3_params, dcnv4_params

cuda_emulation = pytest.importorskip("cuda_emulation")

if cuda_emulation.compiler() is None:  # pragma: no cover
    pytest.skip("no host C++ compiler (g++) for the kernel emulation", allow_module_level=True)

from checks import close, dtype_of  # noqa: E402
from dcn_cases import edge_coords, targeted  # noqa: E402
from reference_dcn import dcnv4_case, make_dcn_case  # noqa: E402

from deformarray.cuda import dcn as cuda_dcn  # noqa: E402

MODES = pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
OPS = pytest.mark.parametrize("v4", [False, True], ids=["dcnv3", "dcnv4"])
_GEOM_KEYS = ("kernel_size", "stride", "padding", "dilation", "group", "offset_scale", "remove_center")


@pytest.fixture(scope="module")
def be():
    return cuda_emulation.EmulatedBackend("dcn.cu")


def _ulps(got, want):
    """Largest difference in units of the last place of the larger magnitude (float64)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = np.spacing(np.maximum(np.abs(got), np.abs(want)).max(initial=1.0))
    return float(np.abs(got - want).max(initial=0.0) / scale)


# ---------------------------------------------------------------------------------------
# Cases: make_dcn_case dicts (DCNv3's arguments); DCNv4 packs them (NaN in the padding).


def case(rng, v4=False, **kw):
    c = make_dcn_case(rng, **kw)
    return dcnv4_case(c) if v4 else c


def params(c):
    geo = [c[k] for k in _GEOM_KEYS]
    if "offset_mask" in c:
        return dcnv4_params(c["input"], c["offset_mask"], *geo[:5], None, *geo[5:])
    return dcnv3_params(c["input"], c["offset"], c["mask"], *geo[:5], None, *geo[5:])


def _operands(c, dtype):
    """(input, offset, mask) cast to dtype; for DCNv4 offset is mask (the offset_mask)."""
    x = np.asarray(c["input"]).astype(dtype)
    if "offset_mask" in c:
        om = np.asarray(c["offset_mask"]).astype(dtype)
        return x, om, om
    return x, np.asarray(c["offset"]).astype(dtype), np.asarray(c["mask"]).astype(dtype)


def _grads(c, grads):
    """The API's gradients from the backend's triple: DCNv4 returns offset_mask's twice."""
    return (grads[0], grads[1]) if "offset_mask" in c else tuple(grads)


def grad_names(c):
    return ("input", "offset_mask") if "offset_mask" in c else ("input", "offset", "mask")


def emulated(be, c, grad_out, dtype, deterministic, p=None):
    p = params(c) if p is None else p
    x, off, m = _operands(c, dtype)
    out = cuda_dcn._forward(be, p, x, off, m)
    grads = cuda_dcn._backward(be, p, np.asarray(grad_out).astype(dtype), x, off, m, deterministic)
    if p.packed:
        assert grads[1] is grads[2]
    return out, _grads(c, grads)


def cpu_results(c, grad_out, dtype=np.float64):
    """The NumPy backend (deformarray/cpu/dcn.py) through the public API."""
    a = {k: (np.asarray(v).astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in c.items()}
    go = np.asarray(grad_out).astype(dtype)
    if "offset_mask" in c:
        return deformarray.dcnv4(**a), tuple(deformarray.dcnv4_backward(go, **a))
    return deformarray.dcnv3(**a), tuple(deformarray.dcnv3_backward(go, **a))


# ---------------------------------------------------------------------------------------
# The float64 loops of the contract (DCNv4 through DcnParams' generic indexing)


def _taps(p):
    return [
        (i, j) for i in range(p.kw) for j in range(p.kh) if not (p.remove_center and i == p.kw // 2 and j == p.kh // 2)
    ]


def _point(p, x, off, m, n, ho, wo, g, k, i, j):
    """(m, s, S, dS/dy, dS/dx, corners) of one point, None when not used (float64)."""
    eh, ew = (p.dilation[0] * (p.kh - 1)) // 2, (p.dilation[1] * (p.kw - 1)) // 2
    s = p.offset_scale
    o = g * p.off_group + 2 * k
    px = (float(wo * p.stride[1] - p.padding[1] + ew) - ew * s) + (i * p.dilation[1] + off[n, ho, wo, o]) * s
    py = (float(ho * p.stride[0] - p.padding[0] + eh) - eh * s) + (j * p.dilation[0] + off[n, ho, wo, o + 1]) * s
    if not (-1 < py < p.h and -1 < px < p.w):
        return None
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    ly, lx = py - y0, px - x0
    hy, hx = 1 - ly, 1 - lx
    chans = slice(g * p.group_channels, (g + 1) * p.group_channels)
    corners, v = [], []
    for dy, dx, wt in ((0, 0, hy * hx), (0, 1, hy * lx), (1, 0, ly * hx), (1, 1, ly * lx)):
        r, cc = y0 + dy, x0 + dx
        inside = 0 <= r < p.h and 0 <= cc < p.w
        corners.append(((r, cc) if inside else None, wt))
        v.append(x[n, r, cc, chans] if inside else np.zeros(p.group_channels))
    sample = v[0] * corners[0][1] + v[1] * corners[1][1] + v[2] * corners[2][1] + v[3] * corners[3][1]
    ds_dy = hx * (v[2] - v[0]) + lx * (v[3] - v[1])
    ds_dx = hy * (v[1] - v[0]) + ly * (v[3] - v[2])
    mk = m[n, ho, wo, p.mask_base + g * p.mask_group + k]
    return mk, s, sample, ds_dy, ds_dx, corners, chans


def _points(p, x, off, m):
    for n, ho, wo, g in np.ndindex(p.n, p.h_out, p.w_out, p.group):
        for k, (i, j) in enumerate(_taps(p)):
            yield (n, ho, wo, g, k), _point(p, x, off, m, n, ho, wo, g, k, i, j)


def ref_forward(c):
    p = params(c)
    x, off, m = _operands(c, np.float64)
    out = np.zeros(p.out_shape)
    for (n, ho, wo, g, _), pt in _points(p, x, off, m):
        if pt is not None:
            out[n, ho, wo, pt[6]] += pt[0] * pt[2]
    return out


def ref_backward(c, grad_out):
    p = params(c)
    x, off, m = _operands(c, np.float64)
    g_in, g_off = np.zeros_like(x), np.zeros_like(off)
    g_mask = g_off if p.packed else np.zeros_like(m)
    for (n, ho, wo, g, k), pt in _points(p, x, off, m):
        if pt is None:
            continue
        mk, s, sample, ds_dy, ds_dx, corners, chans = pt
        gv = grad_out[n, ho, wo, chans]
        for rc, wt in corners:
            if rc is not None:
                g_in[n, rc[0], rc[1], chans] += mk * wt * gv
        g_mask[n, ho, wo, p.mask_base + g * p.mask_group + k] = np.dot(gv, sample)
        o = g * p.off_group + 2 * k
        g_off[n, ho, wo, o] = mk * s * np.dot(gv, ds_dx)
        g_off[n, ho, wo, o + 1] = mk * s * np.dot(gv, ds_dy)
    return _grads(c, (g_in, g_off, g_mask))


# ---------------------------------------------------------------------------------------
# float64 against the CPU backend

CASES = {
    "3x3": dict(),
    "1x1": dict(kernel_size=1, padding=0, group=1, group_channels=2),
    "2x2": dict(kernel_size=2, padding=0, h=4, w=5),
    "5x5_rc": dict(kernel_size=5, padding=2, remove_center=True, n=1),
    "3x5_stride2": dict(kernel_size=(3, 5), stride=2, padding=(1, 2), h=6, w=7),
    "dilation2_scale": dict(dilation=(2, 1), padding=(2, 1), offset_scale=1 / 3, h=6, w=5),
    "5x3_rc": dict(kernel_size=(5, 3), padding=(2, 1), remove_center=True, h=6, w=5, group=1),
    "odd_groups_rc_scale2": dict(group=3, group_channels=5, remove_center=True, offset_scale=2.0, n=3, h=3, w=4),
    "far_outside": dict(spread=6.0),
}


@OPS
@MODES
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_cpu_backend(be, name, v4, deterministic):
    rng = np.random.default_rng(sum(map(ord, name)))
    c = case(rng, v4, **CASES[name])
    p = params(c)
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want = cpu_results(c, grad_out)
    out, grads = emulated(be, c, grad_out, np.float64, deterministic, p)
    # The same operations in the same order (the emulation runs the threads in index order,
    # so even the atomic sums come in the CPU backend's order): the same numbers, except the
    # deterministic input gradient, summed in pixel chunks.
    assert out.dtype == np.float64 and np.array_equal(out, want_out), "output"
    for gname, g, wg in zip(grad_names(c), grads, want):
        assert g.shape == wg.shape and g.dtype == np.float64, gname
        if gname == "input" and deterministic:
            assert _ulps(g, wg) <= 16, gname
        else:
            assert np.array_equal(g, wg), gname
    if v4:  # the padding of offset_mask (NaN in the input) gets +0
        used = 3 * p.group * p.p
        assert grads[1][..., used:].tobytes() == np.zeros_like(grads[1][..., used:]).tobytes()


@OPS
def test_matches_reference_loops(be, v4):
    rng = np.random.default_rng(3)
    c = case(rng, v4, kernel_size=(3, 2), stride=(1, 2), padding=1, group=2, group_channels=3, offset_scale=1.5)
    grad_out = rng.standard_normal(params(c).out_shape)
    want_out, want = ref_forward(c), ref_backward(c, grad_out)
    for det in (False, True):
        out, grads = emulated(be, c, grad_out, np.float64, det)
        close(out, want_out, 1e-13, "output")
        for gname, g, wg in zip(grad_names(c), grads, want):
            close(g, wg, 1e-13, f"grad {gname}")


@OPS
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("scale", [1.0, 0.75])
def test_edge_points(be, v4, dtype, scale):
    """Sample points on and one ulp either side of -1, 0, H-1, H (and -1.5, -0.5, H-0.5,
    interior integers): the same corners as the CPU backend (both compute the location in
    the data's type with the same roundings) and, in float64, the loops."""
    rng = np.random.default_rng(50 + int(scale * 4) + len(dtype))
    dt = np.dtype(dtype).type
    c = make_dcn_case(rng, n=1, h=4, w=5, group=2, group_channels=2, offset_scale=scale, dtype=dt)
    hit_y, hit_x = targeted(c, rng, edge_coords(4, dt), edge_coords(5, dt), dt)
    assert {-1.0, 0.0, 3.0, 4.0} <= hit_y and {-1.0, 0.0, 4.0, 5.0} <= hit_x
    c = dcnv4_case(c) if v4 else c
    grad_out = rng.standard_normal(params(c).out_shape).astype(dt)
    cpu_out, cpu = cpu_results(c, grad_out, dt)
    for det in (False, True):
        out, grads = emulated(be, c, grad_out, dt, det)
        assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
        # same corners and order of operations: the same numbers, but for the chunked sums
        assert np.array_equal(out, cpu_out), "output (CPU backend)"
        for gname, g, wg in zip(grad_names(c), grads, cpu):
            assert g.dtype == dt
            if gname == "input" and det:
                close(g, wg, 1e-6 if dtype == "float32" else 1e-14, f"grad {gname} (CPU backend)")
            else:
                assert np.array_equal(g, wg), f"grad {gname} (CPU backend)"
        if dtype == "float64":
            close(out, ref_forward(c), 1e-13, "output (loops)")
            for gname, g, wg in zip(grad_names(c), grads, ref_backward(c, grad_out)):
                close(g, wg, 1e-13, f"grad {gname} (loops)")


def test_point_at_minus_one_has_zero_gradients(be):
    """A point at exactly x = -1 is not used (every gradient 0, though column 0 is one pixel
    away); one ulp inside it is, and its offset gradient is m*s times column 0's values."""
    x = np.arange(1.0, 1 + 3 * 3 * 2).reshape(1, 3, 3, 2)
    for off_x, used in ((-1.0, False), (float(np.nextafter(-1.0, 0.0)), True)):
        offset = np.full((1, 1, 1, 18), -50.0)  # 3x3 kernel, one output pixel: points 1..8 unused
        offset[..., :2] = off_x, 1.0  # point 0 (tap (0, 0)) at (y, x) = (1, off_x)
        c = dict(input=x, offset=offset, mask=np.full((1, 1, 1, 9), 2.0), kernel_size=3, stride=1, padding=0)
        c.update(dilation=1, group=1, offset_scale=1.0, remove_center=False)
        out, (g_in, g_off, g_mask) = emulated(be, c, np.ones((1, 1, 1, 2)), np.float64, False)
        assert bool(g_off.any()) == used and bool(g_in.any()) == used and not g_off[..., 2:].any()
        if used:
            assert g_off[0, 0, 0, 0] == pytest.approx(2.0 * x[0, 1, 0].sum())
            assert np.abs(out).max() < 1e-14
        else:
            assert not out.any() and not g_mask.any()


@MODES
def test_nan_masks_of_points_just_outside(be, deterministic):
    """Points on or just beyond the window (-1 < y < H, -1 < x < W: every corner outside
    the image) with NaN masks: zero output and gradients, where m * 0 would be NaN."""
    targets = [(-1.5, 1), (-1, 1), (1, -1.5), (1, -1), (1, 3), (3, 1), (1, 3.5), (-1.75, -1.25), (3, 3)]
    ho, wo = np.divmod(np.arange(9), 3)
    offset = np.stack([[t[1] for t in targets] - wo, [t[0] for t in targets] - ho], -1).reshape(1, 3, 3, 2)
    c = dict(input=np.ones((1, 3, 3, 2)), offset=offset.astype(np.float64), mask=np.full((1, 3, 3, 1), np.nan))
    c.update(kernel_size=1, stride=1, padding=0, dilation=1, group=1, offset_scale=1.0, remove_center=False)
    out, grads = emulated(be, c, np.ones((1, 3, 3, 2)), np.float64, deterministic)
    assert np.isfinite(out).all() and not out.any()
    for gname, g in zip(grad_names(c), grads):
        assert np.isfinite(g).all() and not g.any(), gname


@OPS
def test_unused_points_contribute_nothing(be, v4):
    """NaN / inf / far offsets and NaN masks at points 0..3 of every group: zero gradients
    there (not NaN), and everything else as with those points' masks set to 0."""
    rng = np.random.default_rng(5)
    c = make_dcn_case(rng, n=1, h=4, w=4)
    p = params(c)
    muted = dict(c, mask=c["mask"].copy())
    muted["mask"].reshape(1, p.h_out, p.w_out, p.group, p.p)[..., :4] = 0.0
    off = c["offset"].reshape(1, p.h_out, p.w_out, p.group, p.p, 2)
    off[..., 0, 0] = np.nan
    off[..., 1, 1] = np.inf
    off[..., 2, 0] = -np.inf
    off[..., 3, 1] = -50.0
    c["mask"].reshape(1, p.h_out, p.w_out, p.group, p.p)[..., :4] = np.nan
    if v4:
        c, muted = dcnv4_case(c), dcnv4_case(muted)
    grad_out = rng.standard_normal(p.out_shape)
    for det in (False, True):
        out, grads = emulated(be, c, grad_out, np.float64, det)
        want_out, want = emulated(be, muted, grad_out, np.float64, det)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(grads[0], want[0])
        if v4:
            om = grads[1].reshape(1, p.h_out, p.w_out, -1)[..., : 3 * p.group * p.p]
            om = om.reshape(1, p.h_out, p.w_out, p.group, 3 * p.p)
            g_off, g_mask = om[..., : 2 * p.p], om[..., 2 * p.p :]
            w_om = want[1][..., : 3 * p.group * p.p].reshape(om.shape)
            w_off, w_mask = w_om[..., : 2 * p.p], w_om[..., 2 * p.p :]
        else:
            g_off, g_mask = grads[1].reshape(*off.shape[:4], -1), grads[2].reshape(*off.shape[:4], -1)
            w_off, w_mask = want[1].reshape(g_off.shape), want[2].reshape(g_mask.shape)
        assert not g_off[..., :8].any() and not g_mask[..., :4].any()  # +0, not NaN
        np.testing.assert_array_equal(g_off[..., 8:], w_off[..., 8:])
        np.testing.assert_array_equal(g_mask[..., 4:], w_mask[..., 4:])


def test_gradients_by_definition(be):
    """Independent of any reference: the input and mask gradients are the exact adjoints of
    the forward (linear in each); offset gradients match central differences."""
    rng = np.random.default_rng(6)
    c = make_dcn_case(rng, n=2, h=5, w=4, group=2, group_channels=3, offset_scale=0.5, spread=0.8)
    p = params(c)
    grad_out = rng.standard_normal(p.out_shape)
    _, (g_in, g_off, g_mask) = emulated(be, c, grad_out, np.float64, True, p)

    def loss(**changed):
        a = dict(c, **changed)
        return float(np.sum(grad_out * cuda_dcn._forward(be, p, a["input"], a["offset"], a["mask"])))

    base = loss()
    for name, grad in (("input", g_in), ("mask", g_mask)):
        dv = rng.standard_normal(c[name].shape)
        lin = loss(**{name: c[name] + dv}) - base
        assert abs(lin - float(np.sum(grad * dv))) < 1e-10 * (1 + abs(base)), name
    eps = 1e-7
    for idx in [tuple(rng.integers(0, s) for s in c["offset"].shape) for _ in range(12)]:
        plus, minus = c["offset"].copy(), c["offset"].copy()
        plus[idx] += eps
        minus[idx] -= eps
        fd = (loss(offset=plus) - loss(offset=minus)) / (2 * eps)
        assert abs(fd - g_off[idx]) < 1e-5 * (1 + abs(fd)), (idx, fd, g_off[idx])


# ---------------------------------------------------------------------------------------
# Reduced precision


def _rounded(c, dt):
    """The arrays rounded to dt, as float64: what the kernels see."""
    return {k: (v.astype(dt).astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in c.items()}


@OPS
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reduced_precision(be, v4, dtype):
    """float32 against the NumPy backend on the same float32 values; the 16-bit types
    against the kernels' float32 run on the same rounded inputs (both compute locations in
    float32, so they agree on the corners)."""
    dt = dtype_of(dtype)
    rng = np.random.default_rng(7)
    c = _rounded(case(rng, v4, group=2, group_channels=4, kernel_size=(3, 5), padding=(1, 2)), dt)
    grad_out = rng.standard_normal(params(c).out_shape).astype(dt).astype(np.float64)
    if dtype == "float32":
        want_out, want = cpu_results(c, grad_out, np.float32)
    else:
        want_out, want = emulated(be, c, grad_out, np.float32, False)
    tol = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 2.0**-7}[dtype]
    for det in (False, True):
        out, grads = emulated(be, c, grad_out, dt, det)
        assert out.dtype == dt
        close(out, want_out, tol, "output")
        for gname, g, wg in zip(grad_names(c), grads, want):
            assert g.dtype == dt and g.shape == wg.shape, gname
            close(g, wg, tol, f"grad {gname}")
        if v4:
            used = 3 * c["group"] * params(c).p
            assert not np.asarray(grads[1][..., used:], np.float64).any()  # NaN padding ignored


# ---------------------------------------------------------------------------------------
# Modes, chunks, determinism


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@MODES
def test_chunking_matches_unchunked(be, dtype, deterministic):
    """Image chunks (16-bit accumulators) and pixel chunks (deterministic partials) give the
    unchunked numbers."""
    rng = np.random.default_rng(11)
    c = case(rng, True, n=3, h=4, w=5, group=2, group_channels=2)
    grad_out = rng.standard_normal(params(c).out_shape)
    full_out, full = emulated(be, c, grad_out, np.dtype(dtype), deterministic)
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 2e-3}[dtype]
    for limit in (1, 400, 1500, 10_000):
        with deformarray.workspace_limit(limit):
            out, grads = emulated(be, c, grad_out, np.dtype(dtype), deterministic)
        assert out.tobytes() == full_out.tobytes(), limit
        for gname, g, f in zip(grad_names(c), grads, full):
            if gname == "input":
                close(g, f, tol, f"grad {gname}, limit {limit}")
            else:  # one thread per point in every mode and plan
                assert g.tobytes() == f.tobytes(), (gname, limit)


def test_deterministic_plan():
    plan = cuda_dcn.deterministic_plan
    rng = np.random.default_rng(0)
    p = params(make_dcn_case(rng, n=2, h=5, w=4, group=2, group_channels=3))  # Q = 20, H*W*G*D = 120
    per_image = p.h * p.w * p.channels * 4
    assert plan(p, 4, False, 10**9) == (2, 20)  # K up to Q
    assert plan(p, 4, False, 3 * per_image) == (2, 0)  # partials for fewer than 2 images: direct
    assert plan(p, 4, False, 4 * per_image) == (2, 2)
    assert plan(p, 4, True, 1) == (1, 1)  # one image's float32 buffer at least
    assert plan(p, 4, True, 3 * per_image) == (2, 1)
    assert plan(p, 4, True, 7 * per_image) == (2, 3)


@OPS
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("limit", [None, 700], ids=["whole", "chunked"])
@MODES
def test_results_do_not_depend_on_thread_order(be, v4, deterministic, limit, dtype):
    """Forward and gradients with the kernels' threads forwards and backwards: the same bits,
    except the atomic input gradient (rounding only)."""
    rng = np.random.default_rng(22)
    c = case(rng, v4, n=2, h=3, w=3, group=2, group_channels=2, spread=0.7)  # many points per pixel
    grad_out = rng.standard_normal(params(c).out_shape)
    with cuda_emulation.workspace_bound(limit):
        cuda_emulation.assert_thread_order_free(
            be,
            lambda: emulated(be, c, grad_out, np.dtype(dtype), deterministic),
            grad_names(c),
            atomic=() if deterministic else ("input",),
            rtol=1e-5 if dtype == "float32" else 1e-2,
            check_applied=dtype == "float32",
        )


def test_deterministic_is_repeatable_and_close_to_atomic(be):
    rng = np.random.default_rng(13)
    c = case(rng, False, n=1, h=3, w=4, kernel_size=5, padding=2, spread=0.5)
    grad_out = rng.standard_normal(params(c).out_shape)
    first = emulated(be, c, grad_out, np.float32, True)[1]
    again = emulated(be, c, grad_out, np.float32, True)[1]
    atomic = emulated(be, c, grad_out, np.float32, False)[1]
    for a, b, d in zip(first, again, atomic):
        assert a.tobytes() == b.tobytes()
        close(d, a, 1e-5, "atomic vs deterministic")


@OPS
def test_64bit_index_path_gives_the_same_bits(be, monkeypatch, v4):
    rng = np.random.default_rng(14)
    c = case(rng, v4, remove_center=True, kernel_size=3, stride=2, h=6, w=5)
    grad_out = rng.standard_normal(params(c).out_shape)
    for dtype in (np.float32, np.float16):
        for det in (False, True):
            narrow = emulated(be, c, grad_out, dtype, det)
            monkeypatch.setattr(cuda_dcn, "_INDEX32_MAX", 0)
            wide = emulated(be, c, grad_out, dtype, det)
            monkeypatch.undo()
            assert narrow[0].tobytes() == wide[0].tobytes()
            for a, b in zip(narrow[1], wide[1]):
                assert a.tobytes() == b.tobytes()
    assert cuda_dcn._suffix(2**31 - 1) == "_i32" and cuda_dcn._suffix(10, 2**31) == "_i64"


def test_64bit_index_path_is_launched(be, monkeypatch):
    """The kernel names the launch code picks: _i32 normally, _i64 when a size is too big."""
    rng = np.random.default_rng(15)
    c = case(rng, False, n=1, h=3, w=3)
    grad_out = rng.standard_normal(params(c).out_shape)
    seen = []
    launch = be.launch
    monkeypatch.setattr(be, "launch", lambda kernel, *a: (seen.append(kernel), launch(kernel, *a))[1])
    emulated(be, c, grad_out, np.float32, True)
    assert {k for k in seen if k.endswith(("_i32", "_i64"))} == {
        "dcn_forward_i32",
        "dcn_backward_point_i32",
        "dcn_grad_input_owned_i32",
    }
    seen.clear()
    monkeypatch.setattr(cuda_dcn, "_INDEX32_MAX", 20)
    emulated(be, c, grad_out, np.float32, True)
    assert {k for k in seen if k.endswith(("_i32", "_i64"))} == {
        "dcn_forward_i64",
        "dcn_backward_point_i64",
        "dcn_grad_input_owned_i64",
    }


# ---------------------------------------------------------------------------------------
# Shapes and layouts


@OPS
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_empty_batch(be, v4, dtype):
    rng = np.random.default_rng(1)
    c = case(rng, v4, n=0)
    p = params(c)
    dt = np.dtype(dtype)
    for det in (False, True):
        out, grads = emulated(be, c, np.zeros(p.out_shape), dt, det, p)
        assert out.shape == p.out_shape and out.dtype == dt
        for gname, g in zip(grad_names(c), grads):
            assert g.shape == np.shape(c[gname]) and g.dtype == dt, gname


@OPS
def test_non_contiguous(be, v4):
    rng = np.random.default_rng(9)
    c = case(rng, v4, group=3, group_channels=1)
    p = params(c)
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want = emulated(be, c, grad_out, np.float64, True, p)
    x, off, m = (np.asfortranarray(a) for a in _operands(c, np.float64))
    m = off if v4 else m
    out = cuda_dcn._forward(be, p, x, off, m)
    grads = _grads(c, cuda_dcn._backward(be, p, np.asfortranarray(grad_out), x, off, m, True))
    np.testing.assert_array_equal(out, want_out)
    for g, w in zip(grads, want):
        assert g.flags.c_contiguous
        np.testing.assert_array_equal(g, w)


# ---------------------------------------------------------------------------------------
# Workspace


@pytest.mark.parametrize(
    "dtype, deterministic",
    [("float32", False), ("float32", True), ("float64", True), ("float16", False), ("bfloat16", True)],
    ids=lambda v: str(v),
)
def test_launch_code_allocates_within_the_workspace_bound(be, dtype, deterministic):
    """Beyond its results the launch code allocates: nothing for the forward and for the
    float32 atomic backward; within the bound otherwise (down to one image's float32
    buffer, the least the 16-bit types need); unbounded, the deterministic partial buffers
    take several times more."""
    rng = np.random.default_rng(32)
    c = case(rng, True, n=4, h=6, w=6, group=2, group_channels=4)
    p = params(c)
    dt = dtype_of(dtype)
    x, om, _ = _operands(c, dt)
    go = rng.standard_normal(p.out_shape).astype(dt)
    one_image = p.h * p.w * p.channels * 4
    limits = (None, 10 * one_image, 3 * one_image, one_image)
    peaks = {}
    for limit in limits:
        with cuda_emulation.workspace_bound(limit):
            with be.metered() as fwd:
                out = cuda_dcn._forward(be, p, x, om, om)
            with be.metered() as bwd:
                g_in, g_om, g_om2 = cuda_dcn._backward(be, p, go, x, om, om, deterministic)
        assert g_om is g_om2
        peaks[limit] = (fwd.peak - out.nbytes, bwd.peak - g_in.nbytes - g_om.nbytes)
    for limit, (fwd, bwd) in peaks.items():
        assert fwd == 0, (limit, fwd)
        if dt.itemsize > 2 and not deterministic:
            assert bwd == 0, (limit, bwd)
        if limit is not None:
            assert bwd <= limit, (limit, bwd)
    if deterministic:  # the bound is what kept the partial buffers small
        assert peaks[None][1] > 3 * peaks[limits[-1]][1], peaks
