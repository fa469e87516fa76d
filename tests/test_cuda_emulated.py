"""The CUDA backend's launch code and kernels, run on the CPU (no GPU needed).

``tests/cuda_emulation.py`` compiles ``kernels_cu/deform_conv.cu`` with the host C++
compiler and runs ``deformarray/cuda/deform_conv.py`` on NumPy arrays through it. The
results are compared with an autograd reference written from the SPEC's equations in
float64 PyTorch (CPU): forward and every gradient, both col2im paths, chunking, 16-bit
types. What stays unchecked without a GPU: NVRTC code generation beyond compiling
(tests/test_nvrtc_compile.py), CuPy's own functions, cuBLAS, concurrency.
"""

from __future__ import annotations

import edges
import numpy as np
import pytest
import reference

import deformarray
from deformarray import _chunking
from deformarray._validate import conv_params

cuda_emulation = pytest.importorskip("cuda_emulation")

if cuda_emulation.compiler() is None:  # pragma: no cover
    pytest.skip("no host C++ compiler (g++) for the kernel emulation", allow_module_level=True)

from deformarray.cuda import deform_conv as cuda_deform_conv  # noqa: E402


@pytest.fixture(scope="module")
def backend():
    return cuda_emulation.EmulatedBackend()


# ---------------------------------------------------------------------------------------
# Reference: the SPEC's sampling rule with torch autograd (float64).


def _reference(x, off, w, b, m, stride, padding, dilation):
    """Forward from the SPEC's equations; autograd gives the gradients. The floor corners
    are detached, so d/dh is (1-lw)(v3-v1) + lw(v4-v2) exactly; an invalid point
    (h <= -1, h >= H, w <= -1 or w >= W) has value and gradient 0."""
    import torch

    n, c, hh, ww = x.shape
    c_out, cpg, kh, kw = w.shape
    groups = c // cpg
    k = kh * kw
    og = off.shape[1] // (2 * k)
    cpo = c // og
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho = (hh + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (ww + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    base_h = (torch.arange(ho, dtype=x.dtype) * sh - ph).view(1, ho, 1)
    base_w = (torch.arange(wo, dtype=x.dtype) * sw - pw).view(1, 1, wo)
    cols = []  # per (k): (N, C, Ho, Wo)
    flat = x.reshape(n, c, hh * ww)
    for i in range(kh):
        for j in range(kw):
            kk = i * kw + j
            per_group = []
            for g in range(og):
                dy = off[:, 2 * (g * k + kk)]
                dx = off[:, 2 * (g * k + kk) + 1]
                h = base_h + i * dh + dy
                wq = base_w + j * dw + dx
                valid = (h > -1) & (h < hh) & (wq > -1) & (wq < ww)
                hl = torch.floor(h).detach()
                wl = torch.floor(wq).detach()
                lh, lw = h - hl, wq - wl
                xs = flat[:, g * cpo : (g + 1) * cpo]

                def corner(yy, xx, xs=xs):
                    inside = (yy >= 0) & (yy <= hh - 1) & (xx >= 0) & (xx <= ww - 1)
                    idx = (yy.clamp(0, hh - 1) * ww + xx.clamp(0, ww - 1)).long().view(n, 1, -1)
                    v = xs.gather(2, idx.expand(-1, cpo, -1)).view(n, cpo, ho, wo)
                    return v * inside.unsqueeze(1)

                val = (
                    ((1 - lh) * (1 - lw)).unsqueeze(1) * corner(hl, wl)
                    + ((1 - lh) * lw).unsqueeze(1) * corner(hl, wl + 1)
                    + (lh * (1 - lw)).unsqueeze(1) * corner(hl + 1, wl)
                    + (lh * lw).unsqueeze(1) * corner(hl + 1, wl + 1)
                )
                val = torch.where(valid.unsqueeze(1), val, torch.zeros_like(val))
                if m is not None:
                    val = val * m[:, g * k + kk].unsqueeze(1)
                per_group.append(val)
            cols.append(torch.cat(per_group, dim=1))
    col = torch.stack(cols, dim=2)  # (N, C, K, Ho, Wo)
    col = col.view(n, groups, cpg * k, ho * wo)
    wg = w.reshape(groups, c_out // groups, cpg * k)
    out = torch.einsum("gok,ngkp->ngop", wg, col).reshape(n, c_out, ho, wo)
    if b is not None:
        out = out + b.view(1, -1, 1, 1)
    return out


def _case(
    rng,
    n=2,
    c=4,
    h=7,
    w=6,
    c_out=6,
    kh=3,
    kw=2,
    stride=(1, 2),
    padding=(1, 0),
    dilation=(1, 2),
    groups=2,
    og=2,
    bias=True,
    mask=True,
    spread=2.0,
):
    k = kh * kw
    ho = (h + 2 * padding[0] - (dilation[0] * (kh - 1) + 1)) // stride[0] + 1
    wo = (w + 2 * padding[1] - (dilation[1] * (kw - 1) + 1)) // stride[1] + 1
    arrays = dict(
        input=rng.standard_normal((n, c, h, w)),
        offset=rng.uniform(-spread, spread, (n, 2 * og * k, ho, wo)),
        weight=rng.standard_normal((c_out, c // groups, kh, kw)),
        bias=rng.standard_normal((c_out,)) if bias else None,
        mask=rng.uniform(0.0, 1.5, (n, og * k, ho, wo)) if mask else None,
    )
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    return arrays, geometry


def _run_reference(arrays, geometry, grad_out):
    torch = pytest.importorskip("torch")
    t = {
        k: (torch.tensor(v, dtype=torch.float64, requires_grad=True) if v is not None else None)
        for k, v in arrays.items()
    }
    out = _reference(
        t["input"],
        t["offset"],
        t["weight"],
        t["bias"],
        t["mask"],
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
    )
    out.backward(torch.tensor(grad_out))
    grads = [t[k].grad.numpy() if t[k] is not None else None for k in ("input", "offset", "weight", "bias", "mask")]
    return out.detach().numpy(), grads


def _params(arrays, geometry):
    return conv_params(
        arrays["input"],
        arrays["offset"],
        arrays["weight"],
        arrays["bias"],
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
        arrays["mask"],
    )


def _run_emulated(be, arrays, geometry, grad_out, dtype, deterministic):
    cast = {k: (v.astype(dtype) if v is not None else None) for k, v in arrays.items()}
    p = _params(cast, geometry)
    out = cuda_deform_conv._forward(be, p, cast["input"], cast["offset"], cast["weight"], cast["bias"], cast["mask"])
    grads = cuda_deform_conv._backward(
        be,
        p,
        grad_out.astype(dtype),
        cast["input"],
        cast["offset"],
        cast["weight"],
        cast["bias"],
        cast["mask"],
        deterministic,
    )
    return out, grads


def _assert_close(got, want, rtol, atol, what):
    assert got.shape == want.shape, what
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), want, rtol=rtol, atol=atol, err_msg=what)


NAMES = ("input", "offset", "weight", "bias", "mask")

CASES = [
    dict(),
    dict(groups=1, og=1, bias=False, mask=False),
    dict(
        n=3,
        c=6,
        h=5,
        w=5,
        c_out=3,
        kh=3,
        kw=3,
        stride=(2, 1),
        padding=(2, 1),
        dilation=(1, 1),
        groups=3,
        og=3,
        spread=4.0,
    ),  # many samples leave the image
    dict(
        n=1,
        c=2,
        h=4,
        w=9,
        c_out=2,
        kh=1,
        kw=1,
        stride=(1, 1),
        padding=(0, 0),
        dilation=(1, 1),
        groups=1,
        og=2,
        mask=False,
    ),
    # The deterministic input gradient's threads own channels j, j + J, ... (J = ceil(C/OG / 8)):
    # strides that cross conv groups (J = 2 over groups of 6; J = 3 over groups of 2).
    dict(c=18, c_out=6, groups=3, og=2, spread=3.0),
    dict(n=1, c=24, h=5, w=5, c_out=12, groups=12, og=1, spread=3.0),
]


# Geometries for tests/reference.py's make_case (the CPU tests' reference, hand-derived
# gradients).
REF_CASES = {
    **{k: reference.CONV_CASES[k] for k in ("basic_v2", "dilation2_groups2_og2", "rect_kernel_pairs")},
    "v1_stride2_nopad": reference.CONV_CASES["v1_no_bias_stride2_nopad"],
    **{k: reference.CONV_CASES[k] for k in ("large_offsets_leave_image", "zero_offsets_pad1")},
    "integer_offsets": dict(offset_scale=0.0, padding=2),
    # sample points on and one ulp either side of -1, 0, H-1, H (H, W powers of two)
    "one_ulp_edges": dict(height=4, width=8, offset_groups=2),
}


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("name", sorted(REF_CASES))
def test_matches_project_reference(backend, name, deterministic):
    rng = np.random.default_rng(sum(map(ord, name)))
    case = reference.make_case(rng, **REF_CASES[name])
    if name == "integer_offsets":
        case.offset[:] = rng.integers(-2, 3, case.offset.shape)
    if name == "one_ulp_edges":
        off, _, _ = edges.targeted_offsets(rng, case, edges.edge_targets(4), edges.edge_targets(8))
        case = case._replace(offset=off)
    arrays = dict(input=case.input, offset=case.offset, weight=case.weight, bias=case.bias, mask=case.mask)
    geometry = dict(stride=case.stride, padding=case.padding, dilation=case.dilation)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    want_out = reference.ref_deform_conv2d(case.input, case.offset, case.weight, **case.kwargs())
    want_grads = reference.ref_deform_conv2d_backward(grad_out, case.input, case.offset, case.weight, **case.kwargs())
    out, grads = _run_emulated(backend, arrays, geometry, grad_out, np.float64, deterministic)
    _assert_close(out, want_out, 1e-10, 1e-10, "output")
    for gname, g, wg in zip(NAMES, grads, want_grads):
        if wg is None:
            assert g is None, gname
        else:
            _assert_close(g, wg, 1e-10, 1e-10, f"grad {gname}")


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference_float64(backend, case, deterministic):
    rng = np.random.default_rng(case)
    arrays, geometry = _case(rng, **CASES[case])
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want_grads = _run_reference(arrays, geometry, grad_out)
    out, grads = _run_emulated(backend, arrays, geometry, grad_out, np.float64, deterministic)
    _assert_close(out, want_out, 1e-10, 1e-10, "output")
    for name, g, wg in zip(NAMES, grads, want_grads):
        if wg is None:
            assert g is None, name
        else:
            _assert_close(g, wg, 1e-10, 1e-10, f"grad {name}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reduced_precision(backend, dtype):
    rng = np.random.default_rng(7)
    arrays, geometry = _case(rng)
    # the reference sees the inputs rounded to the dtype, as the kernels do
    arrays = {k: (v.astype(dtype).astype(np.float64) if v is not None else None) for k, v in arrays.items()}
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape).astype(dtype).astype(np.float64)
    want_out, want_grads = _run_reference(arrays, geometry, grad_out)
    tol = 1e-4 if dtype == "float32" else 1e-2
    for deterministic in (False, True):
        out, grads = _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), deterministic)
        assert out.dtype == np.dtype(dtype)
        scale = np.abs(want_out).max()
        _assert_close(out, want_out, tol, tol * scale, "output")
        for name, g, wg in zip(NAMES, grads, want_grads):
            assert g.dtype == np.dtype(dtype), name
            _assert_close(g, wg, tol, tol * np.abs(wg).max(), f"grad {name}")


def test_bfloat16(backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    rng = np.random.default_rng(8)
    arrays, geometry = _case(rng)
    arrays = {k: (v.astype(bf16).astype(np.float64) if v is not None else None) for k, v in arrays.items()}
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape).astype(bf16).astype(np.float64)
    want_out, want_grads = _run_reference(arrays, geometry, grad_out)
    out, grads = _run_emulated(backend, arrays, geometry, grad_out, bf16, True)
    assert out.dtype == bf16
    # bfloat16 keeps 8 bits: compare to 2**-7 of each array's scale
    tol = 2.0**-7
    _assert_close(out, want_out, tol, tol * np.abs(want_out).max(), "output")
    for name, g, wg in zip(NAMES, grads, want_grads):
        assert g.dtype == bf16
        _assert_close(g, wg, tol, tol * np.abs(wg).max(), f"grad {name}")


@pytest.mark.parametrize("dtype", ["float64", "float16"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_chunking_matches_unchunked(backend, dtype, deterministic, monkeypatch):
    """Whole-image chunks and within-image chunks (a workspace bound smaller than one image)
    give the unchunked numbers."""
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 1)  # chunks of a few pixels in tiny images
    rng = np.random.default_rng(11)
    arrays, geometry = _case(rng, n=3)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    full_out, full_grads = _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), deterministic)
    # a pixel or a few per chunk, part of an image, whole images (an image's channels-last
    # copy and input-gradient accumulator take 2688 bytes of each bound in float64)
    for limit in (3000, 4000, 20000):
        with deformarray.workspace_limit(limit):
            out, grads = _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), deterministic)
        tol = 1e-12 if dtype == "float64" else 2e-3
        _assert_close(out, full_out.astype(np.float64), tol, tol, f"output, limit {limit}")
        for name, g, fg in zip(NAMES, grads, full_grads):
            if fg is None:
                continue
            _assert_close(g, fg.astype(np.float64), tol, tol, f"grad {name}, limit {limit}")


def test_plan_bounds_workspace(monkeypatch):
    plan = cuda_deform_conv._plan
    chunks = list(plan(5, 10, 8, 0, 8 * 10 * 2))  # two images per chunk
    assert [(c.n0, c.nb, c.q0, c.length) for c in chunks] == [(0, 2, 0, 20), (2, 2, 20, 20), (4, 1, 40, 10)]
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 1)  # the within-image arithmetic on tiny images
    chunks = list(plan(2, 10, 8, 16, 8 * 4 + 16))  # four pixels per chunk within an image
    assert [(c.q0, c.length, c.starts_image, c.ends_image) for c in chunks] == [
        (0, 4, True, False),
        (4, 4, False, False),
        (8, 2, False, True),
        (10, 4, True, False),
        (14, 4, False, False),
        (18, 2, False, True),
    ]
    with pytest.raises(ValueError, match=r"at least .*\(89 bytes\)"):  # 100 bytes / (9/8)
        list(plan(1, 3, 100, 0, 1))


def test_plan_within_an_image_has_a_chunk_floor():
    """A 16-bit backward charges the image's float32 input-gradient accumulator to the
    bound: for 1x256x512x512 float16 it fills the default bound, and the plan fell to one
    pixel per chunk (262,144 chunks of about 10 launches). Now: chunks of at least 512
    pixels, within 1/8 over the bound, or an error naming the smallest bound that works."""
    plan = cuda_deform_conv._plan
    pixels, c_in, c_out, k = 512 * 512, 256, 256, 9
    per_pixel = (c_in * k + c_out) * 4
    per_image = c_in * pixels * 4  # 256 MiB
    limit = 256 << 20
    chunks = list(plan(1, pixels, per_pixel, per_image, limit, "the accumulator"))
    assert 1 < len(chunks) <= pixels // _chunking.MIN_CHUNK_PIXELS
    assert sum(c.length for c in chunks) == pixels
    assert per_image + chunks[0].length * per_pixel <= limit * (1 + _chunking.OVERSHOOT)
    with pytest.raises(ValueError, match=r"bound of 128 MiB .*\(the accumulator and 512 output pixels"):
        list(plan(1, pixels, per_pixel, per_image, 128 << 20, "the accumulator"))


def test_integer_offset_at_minus_one_has_zero_gradient(backend):
    """Zero offsets with padding 1 put kernel row 0 at h = -1: value 0 and, unlike
    torchvision, zero offset gradient (SPEC)."""
    rng = np.random.default_rng(3)
    arrays, geometry = _case(
        rng,
        n=1,
        c=1,
        h=4,
        w=4,
        c_out=1,
        kh=3,
        kw=3,
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
        og=1,
        mask=False,
        bias=False,
    )
    arrays["offset"][:] = 0.0
    p = _params(arrays, geometry)
    grad_out = np.ones(p.out_shape)
    _, grads = _run_emulated(backend, arrays, geometry, grad_out, np.float64, False)
    g_off = grads[1].reshape(1, 9, 2, 4, 4)
    assert np.all(g_off[0, 0:3, :, 0, :] == 0.0)  # kernel row 0 at output row 0 samples h = -1
    assert np.all(g_off[0, [0, 3, 6], :, :, 0] == 0.0)  # kernel column 0 at output column 0: w = -1


def test_deterministic_is_bitwise_repeatable_and_equals_sequential_sum(backend):
    rng = np.random.default_rng(5)
    arrays, geometry = _case(rng, spread=0.6)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    first = _run_emulated(backend, arrays, geometry, grad_out, np.float32, True)[1]
    second = _run_emulated(backend, arrays, geometry, grad_out, np.float32, True)[1]
    for a, b in zip(first, second):
        if a is not None:
            assert a.tobytes() == b.tobytes()


def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(9)
    arrays, geometry = _case(rng)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    want_out, want_grads = _run_emulated(backend, arrays, geometry, grad_out, np.float64, True)
    strided = {k: (np.asfortranarray(v) if v is not None else None) for k, v in arrays.items()}
    out = cuda_deform_conv._forward(
        backend, p, strided["input"], strided["offset"], strided["weight"], strided["bias"], strided["mask"]
    )
    grads = cuda_deform_conv._backward(
        backend,
        p,
        np.asfortranarray(grad_out),
        strided["input"],
        strided["offset"],
        strided["weight"],
        strided["bias"],
        strided["mask"],
        True,
    )
    np.testing.assert_array_equal(out, want_out)
    for g, w in zip(grads, want_grads):
        np.testing.assert_array_equal(g, w)


def test_empty_batch(backend):
    rng = np.random.default_rng(1)
    arrays, geometry = _case(rng, n=0)
    p = _params(arrays, geometry)
    out, grads = _run_emulated(backend, arrays, geometry, np.zeros(p.out_shape), np.float32, False)
    assert out.shape == p.out_shape
    assert grads[0].shape == arrays["input"].shape and grads[1].shape == arrays["offset"].shape
    assert np.all(grads[2] == 0) and np.all(grads[3] == 0) and grads[4].shape == arrays["mask"].shape


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "within_image_chunks"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_results_do_not_depend_on_thread_order(backend, deterministic, dtype, chunked, monkeypatch):
    """Forward and every gradient, with the kernels' threads run forwards and backwards:
    the same bits, except the float-atomic input gradient (rounding only), also when the
    workspace bound splits images into chunks."""
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 1)  # chunks of a few pixels in tiny images
    # a bound that cuts the backward's images into pieces
    limit = 3000 if chunked else None
    rng = np.random.default_rng(21)
    arrays, geometry = _case(rng, n=2, c=4, h=6, w=6, kh=3, kw=3, padding=(1, 1), dilation=(1, 1), spread=1.5)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)

    half = dtype == "float16"
    with cuda_emulation.workspace_bound(limit):
        cuda_emulation.assert_thread_order_free(
            backend,
            lambda: _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), deterministic),
            NAMES,
            atomic=() if deterministic else ("input",),
            rtol=2e-3 if half else 1e-5,
            # float16 rounds the float32 atomic sums to 11 bits, which may hide their order
            check_applied=not half,
        )


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_launch_code_allocates_within_the_workspace_bound(backend, deterministic, dtype, monkeypatch):
    """The launch code's buffers, beyond its results, stay within the bound of docs/cuda.md
    (plus the weight-sized ones it leaves out) at bounds that cut the batch into several
    images per chunk, one image, and pieces of an image; unbounded, the same call takes
    many times more."""
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 1)  # pieces of 16x16 images
    rng = np.random.default_rng(31)
    arrays, geometry = _case(
        rng, n=8, c=8, h=16, w=16, c_out=8, kh=3, kw=3, stride=(1, 1), padding=(1, 1), dilation=(1, 1)
    )
    p = _params(arrays, geometry)
    cast = {k: (v.astype(dtype) if v is not None else None) for k, v in arrays.items()}
    go = rng.standard_normal(p.out_shape).astype(dtype)
    args = (cast["input"], cast["offset"], cast["weight"], cast["bias"], cast["mask"])
    # left out of the documented bound: the permuted weight and grad weight's accumulator
    weight_acc = cast["weight"].nbytes
    grad_weight_acc = cast["weight"].size * 4
    peaks = {}
    # per image: 82 KB of forward columns; the deterministic backward adds 4.3 KB per pixel
    for limit in (None, 400_000, 100_000, 30_000):
        with cuda_emulation.workspace_bound(limit):
            with backend.metered() as fwd:
                out = cuda_deform_conv._forward(backend, p, *args)
            with backend.metered() as bwd:
                grads = cuda_deform_conv._backward(backend, p, go, *args, deterministic)
        results = sum(g.nbytes for g in grads if g is not None)
        peaks[limit] = (fwd.peak - out.nbytes, bwd.peak - results)
        if limit is not None:
            assert fwd.peak - out.nbytes <= limit + weight_acc, (limit, fwd.peak, out.nbytes)
            assert bwd.peak - results <= limit + weight_acc + grad_weight_acc, (limit, bwd.peak, results)
    # unbounded (256 MiB) takes the whole batch at once: the bound is what kept them small
    assert min(peaks[None]) > 3.5 * 100_000, peaks


# ---------------------------------------------------------------------------------------
# The kernels of issue 14: index paths, deterministic sub-chunks, GemmEx dtypes, TF32.


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_index_paths_are_bitwise_equal(backend, dtype, deterministic, monkeypatch):
    """The _i64 kernels (taken here for every launch by lowering the 32-bit limit) give the
    bits of the _i32 ones; a recording shows which path each launch took."""
    rng = np.random.default_rng(41)
    arrays, geometry = _case(rng, spread=3.0)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    launched = []
    real = backend.launch

    def recording(kernel, *args):
        launched.append(kernel)
        return real(kernel, *args)

    monkeypatch.setattr(backend, "launch", recording)
    out32, grads32 = _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), deterministic)
    assert any(k.endswith("_i32") for k in launched) and not any(k.endswith("_i64") for k in launched)
    launched.clear()
    monkeypatch.setattr(cuda_deform_conv, "_INDEX32_MAX", 0)
    out64, grads64 = _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), deterministic)
    assert any(k.endswith("_i64") for k in launched) and not any(k.endswith("_i32") for k in launched)
    assert out32.tobytes() == out64.tobytes()
    for name, a, b in zip(NAMES, grads32, grads64):
        if a is not None:
            assert a.tobytes() == b.tobytes(), name


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_deterministic_sub_chunks(backend, dtype, monkeypatch):
    """Many sub-chunks (partial buffers summed in order) and one (no buffer): the same
    numbers up to rounding, each independent of the thread order, bitwise repeatable."""
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 1)
    rng = np.random.default_rng(43)
    arrays, geometry = _case(rng, n=2, c=6, h=6, w=7, kh=3, kw=3, padding=(1, 1), groups=3, og=3, spread=2.5)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    partials = []
    real = backend.launch

    def recording(kernel, dt, total, args):
        if kernel.startswith("deform_conv_col2im_owned"):
            partials.append(int(args[-2]))  # S
        return real(kernel, dt, total, args)

    monkeypatch.setattr(backend, "launch", recording)
    run = lambda: _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dtype), True)  # noqa: E731
    _, one = run()
    assert partials and max(partials) == 1
    monkeypatch.setattr(cuda_deform_conv, "_DET_MIN_PIXELS", 1)
    monkeypatch.setattr(cuda_deform_conv, "_DET_THREADS", 1 << 30)
    for limit in (None, 16000):  # whole images; pieces of an image (8000 bytes left: 3 partials)
        partials.clear()
        with cuda_emulation.workspace_bound(limit):
            cuda_emulation.assert_thread_order_free(backend, run, NAMES)
            _, many = run()
            _, again = run()
        assert max(partials) >= 3, partials
        tol = 1e-12 if dtype == "float64" else 2e-3
        for name, a, b, c in zip(NAMES, one, many, again):
            if a is not None:
                assert b.tobytes() == c.tobytes(), name
                _assert_close(b, a.astype(np.float64), tol, tol * max(1.0, np.abs(a).max()), name)


def _round_to(a, dtype):
    return a.astype(dtype).astype(np.float64) if a is not None else None


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_16_bit_products_against_float32(backend, half, deterministic):
    """16-bit columns and operands with float32 accumulation (the GemmEx path, here its NumPy
    stand-in) against the float32 path on the same rounded inputs: within the 16-bit type's
    rounding of the columns and the results."""
    if half == "bfloat16":
        half = np.dtype(pytest.importorskip("ml_dtypes").bfloat16)
    half = np.dtype(half)
    rng = np.random.default_rng(47)
    arrays, geometry = _case(rng, groups=2, og=2)
    arrays = {k: _round_to(v, half) for k, v in arrays.items()}
    p = _params(arrays, geometry)
    grad_out = _round_to(rng.standard_normal(p.out_shape), half)
    out16, grads16 = _run_emulated(backend, arrays, geometry, grad_out, half, deterministic)
    out32, grads32 = _run_emulated(backend, arrays, geometry, grad_out, np.float32, deterministic)
    tol = 2.0**-7 if half.name == "bfloat16" else 2.0**-9
    assert out16.dtype == half
    _assert_close(out16, out32.astype(np.float64), tol, tol * np.abs(out32).max(), "output")
    for name, g16, g32 in zip(NAMES, grads16, grads32):
        assert g16.dtype == half, name
        _assert_close(g16, g32.astype(np.float64), tol, tol * np.abs(g32).max(), f"grad {name}")


def test_gemm_stand_in_dtype_semantics():
    """_launch.gemm without cuBLAS: 16-bit operands widened exactly, float32 accumulation
    into a float32 result, beta accumulates, op() transposes."""
    from deformarray.cuda import _launch

    class NoBlas:
        pass

    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 4)).astype(np.float16)
    b = rng.standard_normal((5, 4)).astype(np.float16)
    c = np.ones((3, 5), dtype=np.float32)
    _launch.gemm(NoBlas(), a, b, c, trans_b=True, beta=1.0)
    want = a.astype(np.float32) @ b.astype(np.float32).T + 1
    np.testing.assert_array_equal(c, want)
    assert c.dtype == np.float32
    e = rng.standard_normal((3, 5)).astype(np.float16)
    d = np.empty((4, 5), dtype=np.float32)
    _launch.gemm(NoBlas(), a, e, d, trans_a=True)
    np.testing.assert_array_equal(d, a.astype(np.float32).T @ e.astype(np.float32))


def test_tf32_switch(backend, monkeypatch):
    """Off by default; deformarray.set_allow_tf32 / allow_tf32 (scoped) switch it; the cuBLAS
    compute type follows it for float32 only; in the emulation's stand-in it rounds float32
    operands to 10 mantissa bits, so float32 results move (a little) and the others do not."""
    from deformarray import _config
    from deformarray.cuda import _launch

    assert deformarray.get_allow_tf32() is False
    assert _launch._compute_type(np.float32, np.float32) == _launch._CUBLAS_COMPUTE_32F
    assert _launch._compute_type(np.float16, np.float32) == _launch._CUBLAS_COMPUTE_32F
    assert _launch._compute_type(np.float64, np.float64) == _launch._CUBLAS_COMPUTE_64F
    rng = np.random.default_rng(53)
    arrays, geometry = _case(rng)
    p = _params(arrays, geometry)
    grad_out = rng.standard_normal(p.out_shape)
    strict = {
        dt: _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dt), True) for dt in ("float32", "float64")
    }
    with deformarray.allow_tf32(True):
        assert deformarray.get_allow_tf32() is True
        assert _launch._compute_type(np.float32, np.float32) == _launch._CUBLAS_COMPUTE_32F_FAST_TF32
        assert _launch._compute_type(np.float16, np.float32) == _launch._CUBLAS_COMPUTE_32F
        assert _launch._compute_type(np.float64, np.float64) == _launch._CUBLAS_COMPUTE_64F
        tf32 = {
            dt: _run_emulated(backend, arrays, geometry, grad_out, np.dtype(dt), True) for dt in ("float32", "float64")
        }
    assert deformarray.get_allow_tf32() is False
    assert strict["float64"][0].tobytes() == tf32["float64"][0].tobytes()
    assert strict["float32"][0].tobytes() != tf32["float32"][0].tobytes()
    _assert_close(tf32["float32"][0], strict["float32"][0].astype(np.float64), 2e-3, 2e-2, "tf32 output")
    monkeypatch.setitem(_config._state, "allow_tf32", False)
    deformarray.set_allow_tf32(True)
    assert deformarray.get_allow_tf32() is True
    with deformarray.allow_tf32(False):
        assert deformarray.get_allow_tf32() is False
    deformarray.set_allow_tf32(False)
    assert deformarray.get_allow_tf32() is False


def test_round_tf32():
    from deformarray.cuda import _launch

    x = np.array([1.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-10, np.inf, -np.inf, 3.0], dtype=np.float32)
    r = _launch._round_tf32(x)
    np.testing.assert_array_equal(r, [1.0, 1.0, 1.0 + 2.0**-9, 1.0 + 2.0**-10, np.inf, -np.inf, 3.0])
    assert np.isnan(_launch._round_tf32(np.array([np.nan], dtype=np.float32)))[0]
