"""deform_conv2d / deform_conv2d_backward on CuPy arrays (needs a CUDA GPU).

Compared with the NumPy backend on the same inputs: float64 to 1e-10, float32 to 1e-4,
float16 / bfloat16 to 1e-2 (relative to each array's largest magnitude; for the 16-bit
types the NumPy side computes in float64 on the inputs rounded to the 16-bit type). Also:
torchvision when it is importable with CUDA, bitwise determinism of
``deterministic=True``, chunked == unchunked, non-contiguous inputs, non-default streams,
empty batch, and a tensor past 2**31 elements (slow).
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_checks import TOL, assert_close, dtype_of, to_gpu, to_host64
from reference import CONV_CASES, make_case

import deformarray as da
from deformarray import _chunking

cupy = pytest.importorskip("cupy")

pytestmark = pytest.mark.gpu

GRAD_NAMES = ("input", "offset", "weight", "bias", "mask")

# the NumPy tests' geometries (reference.CONV_CASES), and a wider one
CASES = {
    **{
        k: CONV_CASES[k]
        for k in (
            "basic_v2",
            "v1_no_bias_stride2_nopad",
            "dilation2_groups2_og2",
            "rect_kernel_pairs",
            "depthwise_og4_v1",
            "large_offsets_leave_image",
            "zero_offsets_pad1",
            "kernel1x1",
        )
    },
    "wider": dict(n=3, c_in=16, c_out=8, height=11, width=9, groups=2, offset_groups=4),
}


def _arrays(case):
    return [case.input, case.offset, case.weight, case.bias, case.mask]


def _run(arrays, kw, grad_out, xp_cast, deterministic):
    x, off, w, b, m = (xp_cast(a) for a in arrays)
    go = xp_cast(grad_out)
    out = da.deform_conv2d(x, off, w, b, mask=m, **kw)
    grads = da.deform_conv2d_backward(go, x, off, w, b, mask=m, deterministic=deterministic, **kw)
    return out, grads


def _geometry_kwargs(case):
    return dict(stride=case.stride, padding=case.padding, dilation=case.dilation)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_numpy_backend(rng, name, dtype, deterministic):
    dt = dtype_of(dtype)
    case = make_case(rng, **CASES[name])
    kw = _geometry_kwargs(case)
    grad_out = rng.standard_normal(case.out_shape())
    arrays = _arrays(case)
    if dt.itemsize == 2:
        # the NumPy side sees the same rounded inputs, computed in float64
        arrays = [None if a is None else a.astype(dt).astype(np.float64) for a in arrays]
        grad_out = grad_out.astype(dt).astype(np.float64)
        ref_dtype = np.float64
    else:
        ref_dtype = dt
    want_out, want_grads = _run(arrays, kw, grad_out, lambda a: None if a is None else a.astype(ref_dtype), True)
    out, grads = _run(arrays, kw, grad_out, lambda a: to_gpu(a, dt), deterministic)
    assert isinstance(out, cupy.ndarray) and out.dtype == dt
    assert_close(out, want_out, TOL[dtype], "output")
    for gname, g, wg in zip(GRAD_NAMES, grads, want_grads):
        if g is not None:
            assert isinstance(g, cupy.ndarray) and g.dtype == dt, gname
        assert_close(g, wg, TOL[dtype], f"grad {gname}")


def test_matches_torchvision(rng):
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    # random (non-integer) offsets: torchvision's gradient differs only at exactly -1
    case = make_case(
        rng,
        n=2,
        c_in=8,
        c_out=6,
        height=9,
        width=10,
        groups=2,
        offset_groups=2,
        stride=(1, 2),
        padding=(1, 2),
        dilation=(2, 1),
        offset_scale=3.0,
    )
    kw = _geometry_kwargs(case)
    grad_out = rng.standard_normal(case.out_shape())
    x, off, w, b, m = (to_gpu(a, np.float64) for a in _arrays(case))
    out = da.deform_conv2d(x, off, w, b, mask=m, **kw)
    grads = da.deform_conv2d_backward(to_gpu(grad_out, np.float64), x, off, w, b, mask=m, **kw)
    t = [torch.from_dlpack(a).clone().requires_grad_(True) for a in (x, off, w, b, m)]
    t_out = tv_ops.deform_conv2d(
        t[0], t[1], t[2], t[3], stride=case.stride, padding=case.padding, dilation=case.dilation, mask=t[4]
    )
    t_out.backward(torch.from_dlpack(to_gpu(grad_out, np.float64)))
    assert_close(out, t_out.detach().cpu().numpy(), 1e-10, "output")
    for gname, g, tt in zip(GRAD_NAMES, grads, t):
        assert_close(g, tt.grad.cpu().numpy(), 1e-10, f"grad {gname}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_deterministic_is_bitwise_repeatable(rng, dtype):
    # many samples land on the same few input pixels: atomics would reorder sums
    case = make_case(rng, n=4, c_in=32, c_out=32, height=8, width=8, offset_scale=0.5, dtype=np.float64)
    kw = _geometry_kwargs(case)
    grad_out = rng.standard_normal(case.out_shape())
    x, off, w, b, m = (to_gpu(a, dtype) for a in _arrays(case))
    go = to_gpu(grad_out, dtype)
    runs = [da.deform_conv2d_backward(go, x, off, w, b, mask=m, deterministic=True, **kw) for _ in range(5)]
    for other in runs[1:]:
        for a, b_ in zip(runs[0], other):
            if a is not None:
                assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(b_).tobytes()


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_chunked_equals_unchunked(rng, dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_chunking, "MIN_CHUNK_PIXELS", 1)  # chunks of a few pixels in a 9x8 image
    case = make_case(rng, n=3, c_in=4, c_out=6, height=9, width=8, groups=2, offset_groups=2)
    kw = _geometry_kwargs(case)
    grad_out = rng.standard_normal(case.out_shape())
    full = _run(_arrays(case), kw, grad_out, lambda a: to_gpu(a, dtype), deterministic)
    tol = 1e-12 if dtype == "float64" else 2e-3
    # a pixel or two per chunk, part of an image, about an image (the deterministic mode's
    # per-image row offsets and per-pixel entries need about 9 kB for one pixel here)
    for limit in (9000, 20000, 60000) if deterministic else (2000, 4096, 60000):
        with da.workspace_limit(limit):
            chunked = _run(_arrays(case), kw, grad_out, lambda a: to_gpu(a, dtype), deterministic)
        assert_close(chunked[0], to_host64(full[0]), tol, f"output, limit {limit}")
        for gname, g, f in zip(GRAD_NAMES, chunked[1], full[1]):
            assert_close(g, to_host64(f), tol, f"grad {gname}, limit {limit}")


def test_non_contiguous_inputs(rng):
    case = make_case(rng, n=2, c_in=4, c_out=4, offset_groups=2)
    kw = _geometry_kwargs(case)
    grad_out = rng.standard_normal(case.out_shape())
    want = _run(_arrays(case), kw, grad_out, lambda a: to_gpu(a, np.float32), True)

    def strided(a):  # same values, every axis reversed twice over a padded buffer
        if a is None:
            return None
        big = cupy.zeros(tuple(2 * s for s in a.shape), dtype=np.float32)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = cupy.asarray(a.astype(np.float32))
        assert not view.flags.c_contiguous
        return view

    got = _run(_arrays(case), kw, grad_out, strided, True)
    np.testing.assert_array_equal(cupy.asnumpy(got[0]), cupy.asnumpy(want[0]))
    for g, w in zip(got[1], want[1]):
        if g is not None:
            np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


def test_half_non_contiguous(rng):
    case = make_case(rng, n=2, c_in=4, c_out=4)
    kw = _geometry_kwargs(case)
    x, off, w, b, m = (to_gpu(a, np.float16) for a in _arrays(case))
    want = da.deform_conv2d(x, off, w, b, mask=m, **kw)
    xt = cupy.ascontiguousarray(x.transpose(0, 1, 3, 2).view(np.uint16)).view(np.float16).transpose(0, 1, 3, 2)
    assert not xt.flags.c_contiguous
    got = da.deform_conv2d(xt, off, w, b, mask=m, **kw)
    np.testing.assert_array_equal(cupy.asnumpy(got), cupy.asnumpy(want))


def test_runs_on_current_stream(rng):
    case = make_case(rng)
    kw = _geometry_kwargs(case)
    grad_out = rng.standard_normal(case.out_shape())
    want = _run(_arrays(case), kw, grad_out, lambda a: to_gpu(a, np.float64), True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got = _run(_arrays(case), kw, grad_out, lambda a: to_gpu(a, np.float64), True)
    stream.synchronize()
    np.testing.assert_array_equal(cupy.asnumpy(got[0]), cupy.asnumpy(want[0]))
    for g, w in zip(got[1], want[1]):
        if g is not None:
            np.testing.assert_array_equal(cupy.asnumpy(g), cupy.asnumpy(w))


def test_empty_batch(rng):
    case = make_case(rng, n=0)
    kw = _geometry_kwargs(case)
    x, off, w, b, m = (to_gpu(a, np.float32) for a in _arrays(case))
    out = da.deform_conv2d(x, off, w, b, mask=m, **kw)
    assert out.shape == case.out_shape()
    grads = da.deform_conv2d_backward(cupy.zeros(case.out_shape(), np.float32), x, off, w, b, mask=m, **kw)
    assert grads.input.shape == x.shape and grads.offset.shape == off.shape and grads.mask.shape == m.shape
    assert float(abs(grads.weight).max()) == 0.0 and float(abs(grads.bias).max()) == 0.0


@pytest.mark.slow
def test_input_past_2_31_elements():
    """64-bit indexing: the input has more than 2**31 elements and only its last channel is
    non-zero, with weight 1 on it, so the output is that channel shifted by the integer
    offset (dy, dx) = (1, -1)."""
    c, h, w = 2**15 + 1, 256, 256  # c*h*w = 2**31 + 2**16 elements (8.6 GB in float32)
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 24 * 2**30:
        pytest.skip("needs about 24 GiB of free GPU memory")
    x = cupy.zeros((1, c, h, w), dtype=cupy.float32)
    last = cupy.random.default_rng(0).standard_normal((h, w), dtype=cupy.float32)
    x[0, -1] = last
    weight = cupy.zeros((1, c, 1, 1), dtype=cupy.float32)
    weight[0, -1] = 1.0
    off = cupy.zeros((1, 2, h, w), dtype=cupy.float32)
    off[0, 0] = 1.0
    off[0, 1] = -1.0
    out = da.deform_conv2d(x, off, weight)
    want = cupy.zeros((h, w), dtype=cupy.float32)
    want[:-1, 1:] = last[1:, :-1]
    np.testing.assert_array_equal(cupy.asnumpy(out[0, 0]), cupy.asnumpy(want))
    grad_out = cupy.ones((1, 1, h, w), dtype=cupy.float32)
    grads = da.deform_conv2d_backward(grad_out, x, off, weight, deterministic=True)
    g_last = cupy.asnumpy(grads.input[0, -1])
    expect = np.zeros((h, w), dtype=np.float32)
    expect[1:, :-1] = 1.0  # every input pixel that some output pixel sampled
    np.testing.assert_array_equal(g_last, expect)
    assert float(abs(grads.input[0, :-1]).max()) == 0.0
    del grads, x


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_64_bit_index_path_is_bitwise_equal(rng, dtype, deterministic, monkeypatch):
    """The _i64 kernels give the bits of the _i32 ones (the forward and the non-atomic
    gradients; the atomic input gradient within rounding)."""
    from deformarray.cuda import deform_conv as cuda_deform_conv

    case = make_case(rng, **CASES["wider"], dtype=np.float64)
    kw = _geometry_kwargs(case)
    grad_out = to_gpu(rng.standard_normal(case.out_shape()), dtype)
    x, off, w, b, m = (to_gpu(a, dtype) for a in _arrays(case))

    def run():
        out = da.deform_conv2d(x, off, w, b, mask=m, **kw)
        return out, da.deform_conv2d_backward(grad_out, x, off, w, b, mask=m, deterministic=deterministic, **kw)

    out32, g32 = run()
    monkeypatch.setattr(cuda_deform_conv, "_INDEX32_MAX", 0)
    out64, g64 = run()
    assert cupy.asnumpy(out32).tobytes() == cupy.asnumpy(out64).tobytes()
    for name, a, c in zip(GRAD_NAMES, g32, g64):
        if a is None:
            continue
        if name == "input" and not deterministic:
            np.testing.assert_allclose(
                cupy.asnumpy(a).astype(np.float64), cupy.asnumpy(c).astype(np.float64), 1e-2, 1e-2
            )
        else:
            assert cupy.asnumpy(a).tobytes() == cupy.asnumpy(c).tobytes(), name


def test_tf32_switch_changes_only_float32_products(rng):
    """With TF32 allowed the float32 forward moves within TF32's rounding; float64 does not."""
    case = make_case(rng, **CASES["wider"], dtype=np.float64)
    kw = _geometry_kwargs(case)
    for dtype, moves in (("float32", None), ("float64", False)):
        x, off, w, b, m = (to_gpu(a, dtype) for a in _arrays(case))
        strict = cupy.asnumpy(da.deform_conv2d(x, off, w, b, mask=m, **kw))
        with da.allow_tf32(True):
            fast = cupy.asnumpy(da.deform_conv2d(x, off, w, b, mask=m, **kw))
        if moves is False:
            assert strict.tobytes() == fast.tobytes()
        else:
            np.testing.assert_allclose(fast, strict, 2e-3, 2e-3 * np.abs(strict).max())


def test_torch_sees_the_memory_and_refuses_capture():
    """Inside deformarray.torch, CuPy allocates from torch's caching allocator (the output
    is counted by torch.cuda.memory_allocated) and CUDA-graph capture raises."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import deformarray.torch as dat

    x = torch.randn(2, 8, 16, 16, device="cuda")
    off = torch.randn(2, 18, 16, 16, device="cuda")
    w = torch.randn(8, 8, 3, 3, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = dat.deform_conv2d(x, off, w, padding=1)
    assert torch.cuda.memory_allocated() - before >= out.numel() * out.element_size()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"):
        with torch.cuda.graph(g):
            dat.deform_conv2d(x, off, w, padding=1)
