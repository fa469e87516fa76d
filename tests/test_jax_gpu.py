"""The JAX adapter on a GPU (marked ``gpu``: skipped without CuPy and a CUDA device, and
here also without a CUDA-enabled JAX). Under ``jax.jit`` the operators must run through
``jax.experimental.buffer_callback`` on XLA's device buffers and stream (CuPy views, the
CUDA backend), never through the host: values and gradients against the NumPy backend in
float64, stream ordering with XLA's own work around the call, vmap, float16 / bfloat16,
every operator family, and the eager DLPack path.

Run with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (benchmarks/gpu_session.sh does): JAX
otherwise takes 75 % of the GPU's memory up front, and CuPy allocates the kernels' results
and workspaces from what is left.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import off_kink_conv_case

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.jax as dj  # noqa: E402
from deformarray.jax import _machinery  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    try:
        devices = jax.devices("gpu")
    except RuntimeError as exc:
        pytest.skip(f"JAX sees no GPU (a CPU-only jaxlib? pip install 'jax[cuda12]'): {exc}")
    if _machinery._buffer_callback is None:
        pytest.skip("this JAX has no jax.experimental.buffer_callback (< 0.6.1): pure_callback only")
    return devices[0]


@pytest.fixture
def x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


@pytest.fixture
def device_path(monkeypatch):
    """Counts the GPU buffer calls; the host paths (the CPU backend on host copies, and
    pure_callback's round trip) raise if reached."""
    counts = {"gpu": 0}
    real = _machinery._gpu_buffer_call

    def gpu_call(*a, **k):
        counts["gpu"] += 1
        return real(*a, **k)

    def host(*a, **k):
        raise AssertionError("the host path ran on a GPU")

    monkeypatch.setattr(_machinery, "_gpu_buffer_call", gpu_call)
    monkeypatch.setattr(_machinery, "_host_compute", host)
    monkeypatch.setattr(jax, "pure_callback", host)
    return counts


def conv_case(rng, n=2, c_in=8, c_out=6, hw=(9, 10)):
    return off_kink_conv_case(rng, n, c_in, c_out, hw)


def _put(gpu, arrays, dtype=None):
    return {k: jax.device_put(jnp.asarray(v, dtype), gpu) for k, v in arrays.items()}


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def test_jit_forward_and_grad_on_device_buffers_float64(gpu, x64, rng, device_path):
    c = conv_case(rng)
    names = list(c)
    g = _put(gpu, c)
    y = jax.jit(lambda a: dj.deform_conv2d(**a, padding=1))(g)
    assert {d.platform for d in y.devices()} <= {"gpu", "cuda"}
    _close(y, da.deform_conv2d(**c, padding=1), 1e-9)
    g_out = rng.standard_normal(y.shape)
    ref = da.deform_conv2d_backward(g_out, **c, padding=1)

    def loss(*arrays):
        return jnp.sum(dj.deform_conv2d(**dict(zip(names, arrays)), padding=1) * g_out)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*(g[k] for k in names))
    for name, got in zip(names, grads):
        _close(got, getattr(ref, name), 1e-8)
    assert device_path["gpu"] == 3  # forward, forward + backward


def test_stream_ordering_with_xla_work_around_the_call(gpu, rng, device_path):
    """XLA writes the operands just before the call and reads the result just after, on its
    stream; a kernel on another stream, or a result copied too early, shows as wrong
    numbers in some of the steps (large arrays, many steps, one jitted loop)."""
    c = conv_case(rng, n=8, c_in=32, c_out=32, hw=(64, 64))
    g = _put(gpu, c, jnp.float32)

    @jax.jit
    def steps(x):
        def body(i, acc):
            y = dj.deform_conv2d(x * (1.0 + i), g["offset"], g["weight"], padding=1)  # x * (1 + i): XLA, just before
            return acc + jnp.mean(y)  # read by XLA just after

        return jax.lax.fori_loop(0, 10, body, jnp.float32(0))

    got = float(steps(g["input"]))
    c32 = {k: v.astype(np.float32) for k, v in c.items()}
    want = sum(
        float(np.mean(da.deform_conv2d(c32["input"] * np.float32(1 + i), c32["offset"], c32["weight"], padding=1)))
        for i in range(10)
    )
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert device_path["gpu"] >= 1


def test_vmap_under_jit_on_device(gpu, x64, rng, device_path):
    c = conv_case(rng)
    xs = rng.standard_normal((3, *c["input"].shape))
    ws = rng.standard_normal((2, *c["weight"].shape))
    g = _put(gpu, c)
    y = jax.jit(jax.vmap(lambda x: dj.deform_conv2d(x, g["offset"], g["weight"], padding=1)))(jax.device_put(xs, gpu))
    for i in range(3):
        _close(y[i], da.deform_conv2d(xs[i], c["offset"], c["weight"], padding=1), 1e-9)
    y = jax.jit(jax.vmap(lambda w: dj.deform_conv2d(g["input"], g["offset"], w, padding=1)))(jax.device_put(ws, gpu))
    for i in range(2):
        _close(y[i], da.deform_conv2d(c["input"], c["offset"], ws[i], padding=1), 1e-9)
    assert device_path["gpu"] == 2


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_native_on_device(gpu, rng, device_path, dtype):
    c = conv_case(rng)
    g = _put(gpu, c, dtype)
    y = jax.jit(lambda a: dj.deform_conv2d(**a, padding=1))(g)
    assert y.dtype == jnp.dtype(dtype)
    ref = da.deform_conv2d(**{k: np.asarray(v, np.float32) for k, v in g.items()}, padding=1)
    tol = (2e-2 if dtype == "float16" else 8e-2) * np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0, atol=tol)
    gi = jax.jit(jax.grad(lambda x: jnp.sum(dj.deform_conv2d(x, g["offset"], g["weight"], padding=1))))(g["input"])
    assert gi.dtype == jnp.dtype(dtype)
    assert device_path["gpu"] == 3


def test_every_family_under_jit_on_device(gpu, x64, rng, device_path):
    # deform_roi_pool
    x = rng.standard_normal((2, 3, 12, 13))
    rois = np.array([[0, 2.3, 2.6, 7.1, 8.4], [1, 3.2, 2.2, 8.8, 6.9]])
    off = rng.uniform(-0.3, 0.3, (2, 2, 3, 3))
    kw = dict(output_size=(3, 3), spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
    d = [jax.device_put(a, gpu) for a in (x, rois, off)]
    _close(jax.jit(lambda *a: dj.deform_roi_pool(*a, **kw))(*d), da.deform_roi_pool(x, rois, off, **kw), 1e-9)
    # ms_deform_attn
    shapes, starts = [[3, 4], [2, 2]], [0, 12]
    value = rng.standard_normal((2, 16, 2, 3))
    loc = rng.uniform(0.05, 0.95, (2, 3, 2, 2, 2, 2))
    attn = rng.uniform(0.1, 1.0, (2, 3, 2, 2, 2))
    d = [jax.device_put(a, gpu) for a in (value, loc, attn)]
    got = jax.jit(lambda v, lo, a: dj.ms_deform_attn(v, shapes, starts, lo, a))(*d)
    _close(got, da.ms_deform_attn(value, shapes, starts, loc, attn), 1e-9)
    # dcnv3
    geo = dict(kernel_size=3, stride=1, padding=1, dilation=1, group=2, group_channels=2, offset_scale=0.5)
    inp = rng.standard_normal((2, 4, 3, 4))
    offset = rng.uniform(-1.5, 1.5, (2, 4, 3, 36))
    mask = rng.uniform(0.1, 1.0, (2, 4, 3, 18))
    d = [jax.device_put(a, gpu) for a in (inp, offset, mask)]
    _close(jax.jit(lambda *a: dj.dcnv3(*a, **geo))(*d), da.dcnv3(inp, offset, mask, **geo), 1e-9)
    assert device_path["gpu"] == 3


def test_value_errors_under_jit_on_device(gpu, x64, rng):
    x = jax.device_put(rng.standard_normal((1, 2, 6, 6)), gpu)
    bad = jax.device_put(np.array([[3.0, 0.0, 0.0, 2.0, 2.0]]), gpu)  # batch index 3 of 1
    with pytest.raises(jax.errors.JaxRuntimeError, match="rois"):
        jax.jit(lambda x, r: dj.deform_roi_pool(x, r, output_size=2))(x, bad).block_until_ready()


def test_eager_dlpack_path_still_taken(gpu, x64, rng, monkeypatch):
    calls = []
    real = _machinery._dlpack_call
    monkeypatch.setattr(_machinery, "_dlpack_call", lambda *a: calls.append(1) or real(*a))
    c = conv_case(rng)
    y = dj.deform_conv2d(**_put(gpu, c), padding=1)
    _close(y, da.deform_conv2d(**c, padding=1), 1e-9)
    assert calls == [1]
