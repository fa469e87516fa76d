"""deform_conv2d / deform_conv2d_backward on NumPy arrays against the float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
from checks import DTYPES, assert_close, reversed_view, strided_view, traced_peak, transposed_view
from edges import TINY, around, edge_targets, targeted_offsets
from reference import (
    CONV_CASES,
    geometry,
    make_case,
    ref_deform_conv2d,
    ref_deform_conv2d_backward,
    sample_corners,
    sample_point,
)

import deformarray as da
from deformarray import _chunking
from deformarray._validate import conv_params
from deformarray.cpu import deform_conv as cpu_conv

GRAD_NAMES = ("input", "offset", "weight", "bias", "mask")

# Geometries (keyword arguments of reference.make_case). Small: the reference is slow Python.
CASES = CONV_CASES


def run_forward(case):
    return da.deform_conv2d(case.input, case.offset, case.weight, **case.kwargs())


def run_backward(grad_output, case):
    return da.deform_conv2d_backward(grad_output, case.input, case.offset, case.weight, **case.kwargs())


def check_against_reference(case, rng, dtype):
    """Forward and all five gradients of the library equal the reference."""
    y = run_forward(case)
    y_ref = ref_deform_conv2d(case.input, case.offset, case.weight, **case.kwargs())
    assert_close(y, y_ref, dtype, "output")
    go = rng.standard_normal(y_ref.shape).astype(dtype)
    grads = run_backward(go, case)
    assert isinstance(grads, da.DeformConv2dGrads)
    ref = ref_deform_conv2d_backward(go, case.input, case.offset, case.weight, **case.kwargs())
    for name in GRAD_NAMES:
        assert_close(getattr(grads, name), getattr(ref, name), dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("geom", list(CASES.values()), ids=list(CASES))
def test_matches_reference(geom, dtype, rng):
    case = make_case(rng, dtype=dtype, **geom)
    check_against_reference(case, rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["v2", "v1"])
def test_integer_and_border_sample_points(dtype, with_mask, rng):
    """Samples exactly on integers and on the borders h = -1, 0, H-1, H (same for w)."""
    H, W = 5, 6
    case = make_case(
        rng,
        n=2,
        c_in=4,
        height=H,
        width=W,
        c_out=4,
        kernel=3,
        padding=1,
        offset_groups=2,
        groups=2 if with_mask else 1,
        mask=with_mask,
        dtype=dtype,
    )
    targets_h = [-2.0, -1.5, -1.0, -0.5, 0.0, 1.0, 2.0, 2.5, H - 1.5, H - 1.0, H - 0.5, float(H), H + 1.0]
    targets_w = [-2.0, -1.5, -1.0, -0.5, 0.0, 1.0, 3.0, 3.5, W - 1.5, W - 1.0, W - 0.5, float(W), W + 1.0]
    off, hit_h, hit_w = targeted_offsets(rng, case, targets_h, targets_w)
    for must in (-1.0, 0.0, H - 1.0, float(H)):
        assert must in hit_h
    for must in (-1.0, 0.0, W - 1.0, float(W)):
        assert must in hit_w
    case = case._replace(offset=off.astype(dtype))
    check_against_reference(case, rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("kernel", [1, 3], ids=["1x1", "3x3"])
@pytest.mark.parametrize("with_mask", [True, False], ids=["v2", "v1"])
def test_one_ulp_around_integers_and_borders(dtype, kernel, with_mask, rng):
    """Sample points on and one ulp either side of -1, 0, H-1, H (H, W powers of two, where
    ``h + 1.0`` rounds up one ulp below H), and at -1e-17, -1e-40: forward and every
    gradient equal the float64 reference. The second image holds large values, so a
    corner read from outside the first image's plane shows."""
    H, W = 4, 8
    case = make_case(
        rng,
        n=2,
        c_in=4,
        height=H,
        width=W,
        c_out=4,
        kernel=kernel,
        padding=kernel // 2,
        offset_groups=2,
        mask=with_mask,
        dtype=dtype,
    )
    x = case.input.astype(np.float64)
    x[1] *= 1000.0
    off, hit_h, hit_w = targeted_offsets(rng, case, edge_targets(H, dtype), edge_targets(W, dtype))
    if dtype == np.float64:
        for must in (np.nextafter(H, 0), np.nextafter(0, -1), *TINY, *around(-1.0), *around(H - 1.0)):
            assert must in hit_h, must
        for must in (np.nextafter(W, 0), np.nextafter(0, -1), *TINY):
            assert must in hit_w, must
    case = case._replace(input=x.astype(dtype), offset=off.astype(dtype))
    check_against_reference(case, rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("where", ["below_H", "below_W", "below_0", "minus_1e-17", "minus_1e-40"])
def test_named_edge_points_one_sample(dtype, where, rng):
    """The points of the bug report, one sample each (1x1 kernel at output (0, 0)): the
    forward must not read the next image (1000.0 there), and no gradient may land outside
    the sampled cell."""
    H, W = 4, 4
    h, w = {
        "below_H": (np.nextafter(dtype(H), dtype(0)), 1.0),
        "below_W": (1.0, np.nextafter(dtype(W), dtype(0))),
        "below_0": (np.nextafter(dtype(0), dtype(-1)), 2.0),
        "minus_1e-17": (dtype(-1e-17), 2.0),
        "minus_1e-40": (1.0, dtype(-1e-40)),
    }[where]
    x = np.zeros((2, 1, H, W))
    x[0, 0] = rng.standard_normal((H, W))
    x[1] = 1000.0
    off = np.zeros((2, 2, H, W))
    off[0, 0, 0, 0], off[0, 1, 0, 0] = h, w
    case = make_case(rng, n=2, c_in=1, height=H, width=W, c_out=1, kernel=1, padding=0, dtype=dtype)
    case = case._replace(input=x.astype(dtype), offset=off.astype(dtype))
    check_against_reference(case, rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_empty_batch(dtype, rng):
    case = make_case(rng, n=0, c_in=4, c_out=6, groups=2, offset_groups=2, dtype=dtype)
    y = run_forward(case)
    assert isinstance(y, np.ndarray) and y.dtype == np.dtype(dtype)
    assert y.shape == case.out_shape() and y.shape[0] == 0
    go = np.zeros(y.shape, dtype=dtype)
    grads = run_backward(go, case)
    for name in ("input", "offset", "mask"):
        arr = getattr(grads, name)
        assert arr.shape == getattr(case, name).shape and arr.dtype == np.dtype(dtype), name
    for name in ("weight", "bias"):
        arr = getattr(grads, name)
        assert arr.shape == getattr(case, name).shape and arr.dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(arr, 0.0, err_msg=name)

    v1 = case._replace(mask=None, bias=None)
    grads = run_backward(go, v1)
    assert grads.mask is None and grads.bias is None
    assert grads.input.shape == case.input.shape and grads.offset.shape == case.offset.shape


def _fortran(a):
    return np.asfortranarray(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(
    "make_view",
    [transposed_view, strided_view, reversed_view, _fortran],
    ids=["transposed", "strided", "reversed", "fortran"],
)
def test_non_contiguous_inputs(make_view, dtype, rng):
    case = make_case(rng, c_in=4, c_out=4, groups=2, offset_groups=2, dtype=dtype)
    go = rng.standard_normal(case.out_shape()).astype(dtype)
    y = run_forward(case)
    grads = run_backward(go, case)
    view = case._replace(**{f: make_view(getattr(case, f)) for f in ("input", "offset", "weight", "bias", "mask")})
    for f in ("input", "offset", "weight", "mask"):
        assert np.array_equal(getattr(view, f), getattr(case, f))
    y_v = run_forward(view)
    grads_v = run_backward(make_view(go), view)
    tight = 1e-12 if dtype == np.float64 else 1e-6
    assert_close(y_v, y.astype(np.float64), dtype, "output", rel=tight)
    for name in GRAD_NAMES:
        assert_close(getattr(grads_v, name), getattr(grads, name).astype(np.float64), dtype, f"grad {name}", rel=tight)


@pytest.mark.parametrize("nan_at", [(3, 3), (0, 0), (4, 5)], ids=["interior", "first", "last"])
def test_nan_in_input_propagates(nan_at, rng):
    """A NaN pixel makes exactly the outputs that sample it NaN; the others stay finite.

    Outputs whose samples put positive bilinear weight on the NaN pixel must be NaN. Outputs
    none of whose samples has the NaN pixel among its in-image corners must stay finite
    (corners outside the image and points outside it contribute zero, not 0 * x).
    """
    H, W = 5, 6
    case = make_case(rng, n=1, c_in=4, height=H, width=W, c_out=4, groups=2, offset_groups=2, offset_scale=2.5)
    c_nan = 1  # conv group 0, offset group 0
    x = case.input.copy()
    x[0, c_nan, nan_at[0], nan_at[1]] = np.nan
    y = da.deform_conv2d(x, case.offset, case.weight, **case.kwargs())
    g = geometry(x, case.offset, case.weight, case.stride, case.padding, case.dilation)
    og = c_nan // (g.c_in // g.offset_groups)
    grp = c_nan // (g.c_in // g.groups)
    opg = g.c_out // g.groups
    n_must_nan = n_must_finite = 0
    for ho in range(g.h_out):
        for wo in range(g.w_out):
            touched = positive = False
            for i in range(g.kh):
                for j in range(g.kw):
                    h, w = sample_point(g, case.offset, 0, og, i, j, ho, wo)
                    for qy, qx, wt, _, _ in sample_corners(h, w, H, W):
                        if (qy, qx) == nan_at:
                            touched = True
                            m = case.mask[0, og * g.kh * g.kw + i * g.kw + j, ho, wo]
                            positive |= wt > 0 and m > 0
            for o in range(g.c_out):
                in_group = o // opg == grp
                if in_group and positive:
                    assert np.isnan(y[0, o, ho, wo]), (o, ho, wo)
                    n_must_nan += 1
                elif not (in_group and touched):
                    assert np.isfinite(y[0, o, ho, wo]), (o, ho, wo)
                    n_must_finite += 1
    assert n_must_nan > 0 and n_must_finite > 0


def test_nan_in_input_zero_offsets(rng):
    """With zero offsets the NaN pixel reaches its 3x3 neighbourhood of outputs."""
    case = make_case(rng, n=1, c_in=2, height=7, width=7, c_out=3, offset_scale=0.0)
    x = case.input.copy()
    x[0, 0, 3, 3] = np.nan
    y = da.deform_conv2d(x, case.offset, case.weight, **case.kwargs())
    assert np.isnan(y[0, :, 2:5, 2:5]).all()
    # outputs none of whose samples has (3, 3) among its corners (integer points use the
    # corners (h, w) .. (h + 1, w + 1), so row/col 1 may see it with weight 0)
    assert np.isfinite(y[0, :, :1, :]).all() and np.isfinite(y[0, :, :, :1]).all()
    assert np.isfinite(y[0, :, 5:, :]).all() and np.isfinite(y[0, :, :, 5:]).all()


@pytest.mark.jit_only
def test_backward_bitwise_deterministic(rng):
    """Large enough for several tasks per thread; two runs give the same bits."""
    case = make_case(rng, n=4, c_in=16, height=24, width=24, c_out=16, groups=2, offset_groups=2, offset_scale=3.0)
    go = rng.standard_normal(case.out_shape())
    first = run_backward(go, case)
    y1 = run_forward(case)
    for _ in range(2):
        again = run_backward(go, case)
        for name in GRAD_NAMES:
            assert getattr(again, name).tobytes() == getattr(first, name).tobytes(), name
    assert run_forward(case).tobytes() == y1.tobytes()
    # the CPU backward is deterministic whatever the keyword says
    loose = da.deform_conv2d_backward(go, case.input, case.offset, case.weight, **case.kwargs(), deterministic=False)
    for name in GRAD_NAMES:
        assert getattr(loose, name).tobytes() == getattr(first, name).tobytes(), name
    assert all(np.isfinite(getattr(first, n)).all() and np.abs(getattr(first, n)).max() > 0 for n in GRAD_NAMES)


def _column_bytes_per_image(case):
    g = geometry(case.input, case.offset, case.weight, case.stride, case.padding, case.dilation)
    return g.c_in * g.kh * g.kw * g.h_out * g.w_out * case.input.dtype.itemsize


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_workspace_limit_chunking_gives_same_results(dtype, rng, monkeypatch):
    """Chunking over the batch and over output pixels of one image changes nothing."""
    # chunks of a few pixels, so that a 6x7 image splits (the real floor is 512 pixels)
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 2)
    case = make_case(
        rng, n=5, c_in=4, height=6, width=7, c_out=6, groups=2, offset_groups=2, offset_scale=2.5, dtype=dtype
    )
    go = rng.standard_normal(case.out_shape()).astype(dtype)
    y = run_forward(case)
    grads = run_backward(go, case)
    # also right, not just consistent
    assert_close(y, ref_deform_conv2d(case.input, case.offset, case.weight, **case.kwargs()), dtype, "output")

    itemsize = np.dtype(dtype).itemsize
    copies = 2 * itemsize * 4 * (6 * 7 + 1)  # the backward's two channels-last planes of one image
    per_pixel = itemsize * (4 * 9 + 6)
    per_image = copies + per_pixel * 6 * 7
    limits = [
        4 * 3 * per_image // 3,  # a few images per chunk: batch chunking
        4 * per_image // 3 + 8,  # about one image per chunk
        4 * (copies + per_pixel * 14) // 3,  # part of one image per chunk: pixel chunking
        4 * (copies + per_pixel * 2) // 3,  # the smallest chunk the plan allows
    ]
    tight = 1e-12 if dtype == np.float64 else 2e-6
    old = da.get_workspace_limit()
    for limit in limits:
        with da.workspace_limit(limit):
            assert da.get_workspace_limit() == limit
            y_c = run_forward(case)
            grads_c = run_backward(go, case)
        assert da.get_workspace_limit() == old
        assert_close(y_c, y.astype(np.float64), dtype, f"output, limit {limit}", rel=tight)
        for name in GRAD_NAMES:
            assert_close(
                getattr(grads_c, name),
                getattr(grads, name).astype(np.float64),
                dtype,
                f"grad {name}, limit {limit}",
                rel=tight,
            )


def _params(shape, kernel=3, c_out=None, padding=1, dtype=np.float32):
    """ConvParams of a call on zero-strided dummies (no memory): shapes only."""
    n, c, h, w = shape
    c_out = c if c_out is None else c_out
    x = np.broadcast_to(np.zeros((), dtype), shape)
    h_out, w_out = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
    off = np.broadcast_to(np.zeros((), dtype), (n, 2 * kernel * kernel, h_out, w_out))
    wt = np.broadcast_to(np.zeros((), dtype), (c_out, c, kernel, kernel))
    return conv_params(x, off, wt, None, 1, padding, 1, None)


def test_plan_within_an_image_has_a_chunk_floor():
    """An image whose channels-last copy fills the bound is cut into chunks of at least
    MIN_CHUNK_PIXELS output pixels (it was cut into single pixels: 65,536 chunks and
    59 s for this forward at a 4 MiB bound, and 67 million ranges, a MemoryError, for a
    1x1x8192x8192 image at the default bound); the plan is lazy."""
    p = _params((1, 16, 256, 256))
    chunks = cpu_conv._chunks(p, 4, planes=1, limit=4 << 20)
    ranges = chunks[0][2]
    assert len(ranges) <= 256 * 256 // _chunking.MIN_CHUNK_PIXELS + 1
    assert sum(n for _, n in ranges) == 256 * 256
    assert [r for r in ranges][:2] == [ranges[0], ranges[1]]
    big = _params((1, 1, 8192, 8192), kernel=1, padding=0)
    limit = da.get_workspace_limit()
    for planes, share in ((1, 1.0), (2, 0.75)):
        try:
            chunks = cpu_conv._chunks(big, 4, planes=planes, limit=limit, share=share)
        except ValueError:
            assert planes == 2  # two copies of a 256 MiB image do not fit 256 MiB: a clear error
            continue
        ranges = chunks[0][2]
        assert len(ranges) < 1000 and sum(n for _, n in ranges) == 8192 * 8192
        _, n0 = ranges[0]
        worst = planes * 4 * (8192 * 8192 + 1) + n0 * 4 * 2
        assert worst <= limit * share * (1 + _chunking.OVERSHOOT)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_bound_too_small_for_one_image_names_the_smallest_that_works(direction, rng):
    case = make_case(rng, n=1, c_in=4, height=40, width=40, c_out=4, dtype=np.float32)
    go = np.ones(case.out_shape(), np.float32)
    call = (lambda: run_forward(case)) if direction == "forward" else (lambda: run_backward(go, case))
    with da.workspace_limit(1000), pytest.raises(ValueError, match="workspace bound of .* too small") as info:
        call()
    smallest = int(str(info.value).split("at least ")[1].split("(")[1].split(" bytes")[0])
    assert "set_workspace_limit" in str(info.value)
    with da.workspace_limit(smallest):
        call()  # the bound it names works
    with da.workspace_limit(smallest - 64), pytest.raises(ValueError):
        call()


@pytest.mark.jit_only
def test_workspace_bound_holds_for_large_batch(rng):
    """Temporary memory beyond outputs/gradients stays near the bound, not O(batch).

    Measured with tracemalloc (which sees NumPy allocations); an unchunked run needs about
    10 MiB (forward) / 16 MiB (backward) of columns and plans here. The bound itself is
    allowed, plus a slack for NumPy's own ufunc buffer (8192 elements = 64 KiB in
    float64, used by the broadcast bias add) and per-call bookkeeping.
    """
    case = make_case(rng, n=200, c_in=4, height=8, width=8, c_out=4, offset_scale=2.0)
    go = rng.standard_normal(case.out_shape())
    limit = 64 * 1024
    slack = 80 * 1024
    unbounded = 200 * _column_bytes_per_image(case)
    assert unbounded > 10 * (limit + slack)
    with da.workspace_limit(limit):
        run_forward(case), run_backward(go, case)  # compile / warm up outside the trace
        y, peak_f = traced_peak(lambda: run_forward(case))
        grads, peak_b = traced_peak(lambda: run_backward(go, case))
    assert peak_f <= y.nbytes + limit + slack, (peak_f, y.nbytes)
    grads_bytes = sum(getattr(grads, n).nbytes for n in GRAD_NAMES)
    assert peak_b <= grads_bytes + limit + slack, (peak_b, grads_bytes)


@pytest.mark.jit_only
def test_workspace_kept_between_calls_is_not_doubled(rng):
    """The CPU keeps its workspace arena between calls. Unchunked here, the backward needs
    a larger arena than the forward: the forward's must be freed before the backward's is
    allocated, so forward-then-backward peaks at the larger of the two, not their sum."""
    case = make_case(rng, n=16, c_in=8, height=12, width=12, c_out=4, offset_scale=2.0)
    go = rng.standard_normal(case.out_shape())
    run_forward(case), run_backward(go, case)  # compile / warm up outside the trace
    y, peak_f = traced_peak(lambda: run_forward(case))
    grads, peak_b = traced_peak(lambda: run_backward(go, case))
    extra_f = peak_f - y.nbytes
    grads_bytes = sum(getattr(grads, n).nbytes for n in GRAD_NAMES)
    extra_b = peak_b - grads_bytes
    _, peak_fb = traced_peak(lambda: (run_forward(case), run_backward(go, case)))
    extra_fb = peak_fb - y.nbytes - grads_bytes
    assert extra_fb <= max(extra_f, extra_b) + 80 * 1024, (extra_fb, extra_f, extra_b)
    y_ref = run_forward(case)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_output_dtype_equals_input_dtype(dtype, rng):
    case = make_case(rng, n=1, dtype=dtype)
    y = run_forward(case)
    assert y.dtype == np.dtype(dtype)
    grads = run_backward(np.ones(y.shape, dtype=dtype), case)
    for name in GRAD_NAMES:
        assert getattr(grads, name).dtype == np.dtype(dtype), name
        assert getattr(grads, name).shape == getattr(case, name).shape, name
