"""The JAX adapter's call path under jit on the CPU: ``jax.experimental.buffer_callback``
(XLA's own buffers handed to the NumPy backend) where JAX has it, ``jax.pure_callback``
otherwise. Asserts which path runs (by counting calls), that jit, grad, vmap, check_grads
(float64) and shard_map over two forced host devices go through the new one (including at
1 MiB per device, where pure_callback hangs), that the fallback still works, and float16 /
bfloat16 computed in float32. Skipped without JAX."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from reference import off_kink_conv_case

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.jax as dj  # noqa: E402
from deformarray.jax import _machinery  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
needs_buffer_callback = pytest.mark.skipif(
    _machinery._buffer_callback is None, reason="this JAX has no jax.experimental.buffer_callback (< 0.6.1)"
)


# float64 for the numerical checks (conftest.py restores the default afterwards)
pytestmark = pytest.mark.usefixtures("jax_x64")


@pytest.fixture
def calls(monkeypatch):
    """Counts the callbacks bound at trace time, by kind; pure_callback still works (the
    fallback test uses it) but is counted."""
    counts = {"buffer_callback": 0, "pure_callback": 0}
    real_buffer, real_pure = _machinery._buffer_callback, jax.pure_callback

    def buffer_callback(*a, **k):
        counts["buffer_callback"] += 1
        return real_buffer(*a, **k)

    def pure_callback(*a, **k):
        counts["pure_callback"] += 1
        return real_pure(*a, **k)

    if real_buffer is not None:
        monkeypatch.setattr(_machinery, "_buffer_callback", buffer_callback)
    monkeypatch.setattr(jax, "pure_callback", pure_callback)
    return counts


def conv_case(rng, n=2, c_in=4, c_out=3, hw=(5, 6)):
    return off_kink_conv_case(rng, n, c_in, c_out, hw)


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=tol, atol=tol)


# ---------------------------------------------------------------- the path taken


@needs_buffer_callback
def test_path_is_buffer_callback_here():
    assert _machinery.callback_path() == "buffer_callback"


@needs_buffer_callback
def test_jit_grad_vmap_go_through_buffer_callback(rng, calls):
    c = conv_case(rng)
    names = list(c)
    jc = {k: jnp.asarray(v) for k, v in c.items()}

    _close(jax.jit(lambda a: dj.deform_conv2d(**a, padding=1))(jc), da.deform_conv2d(**c, padding=1))
    assert calls == {"buffer_callback": 1, "pure_callback": 0}

    g_out = rng.standard_normal(da.deform_conv2d(**c, padding=1).shape)
    ref = da.deform_conv2d_backward(g_out, **c, padding=1)

    def loss(*arrays):
        return jnp.sum(dj.deform_conv2d(**dict(zip(names, arrays)), padding=1) * g_out)

    grads = jax.jit(jax.grad(loss, argnums=tuple(range(5))))(*(jc[k] for k in names))
    for name, g in zip(names, grads):
        _close(g, getattr(ref, name))
    assert calls == {"buffer_callback": 3, "pure_callback": 0}  # forward + backward

    # vmap: folded into N (per-image arrays batched) and looped (batched weights)
    xs = rng.standard_normal((3, *c["input"].shape))
    ws = rng.standard_normal((2, *c["weight"].shape))
    y = jax.jit(jax.vmap(lambda x: dj.deform_conv2d(x, c["offset"], c["weight"], padding=1)))(xs)
    for i in range(3):
        _close(y[i], da.deform_conv2d(xs[i], c["offset"], c["weight"], padding=1))
    y = jax.vmap(lambda w: dj.deform_conv2d(c["input"], c["offset"], w, padding=1, mask=c["mask"]))(ws)
    for i in range(2):
        _close(y[i], da.deform_conv2d(c["input"], c["offset"], ws[i], padding=1, mask=c["mask"]))

    # vmap of grad: every backward loops over the vmapped elements
    def loss_one(x):
        return jnp.sum(dj.deform_conv2d(x[None], c["offset"][:1], c["weight"], padding=1))

    g = jax.jit(jax.vmap(jax.grad(loss_one)))(c["input"])
    for i in range(2):
        one = (c["input"][i : i + 1], c["offset"][:1], c["weight"])
        ones = np.ones(da.deform_conv2d(*one, padding=1).shape)
        _close(g[i], da.deform_conv2d_backward(ones, *one, padding=1).input[0])
    assert calls["pure_callback"] == 0 and calls["buffer_callback"] == 7


@needs_buffer_callback
def test_eager_cpu_and_check_grads_float64_go_through_buffer_callback(rng, calls):
    c = conv_case(rng, n=1, c_in=2, c_out=2, hw=(4, 4))
    names = list(c)
    _close(dj.deform_conv2d(**{k: jnp.asarray(v) for k, v in c.items()}, padding=1), da.deform_conv2d(**c, padding=1))
    assert calls == {"buffer_callback": 1, "pure_callback": 0}

    def f(*arrays):
        return dj.deform_conv2d(**dict(zip(names, arrays)), padding=1)

    check_grads(f, [c[k] for k in names], order=1, modes=["rev"])
    assert calls["pure_callback"] == 0 and calls["buffer_callback"] > 1


@needs_buffer_callback
def test_roi_and_msda_go_through_buffer_callback(rng, calls):
    x = rng.standard_normal((2, 3, 12, 13))
    rois = np.array([[0, 2.3, 2.6, 7.1, 8.4], [1, 3.2, 2.2, 8.8, 6.9]])
    off = rng.uniform(-0.3, 0.3, (2, 2, 3, 3))
    kw = dict(output_size=(3, 3), spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
    got = jax.jit(lambda x, off: dj.deform_roi_pool(x, rois, off, **kw))(x, off)
    _close(got, da.deform_roi_pool(x, rois, off, **kw))
    g = jax.grad(lambda x: jnp.sum(dj.deform_roi_pool(x, rois, off, **kw)))(x)
    _close(g, da.deform_roi_pool_backward(np.ones(got.shape), x, rois, off, **kw).input)

    shapes, starts = [[3, 4], [2, 2]], [0, 12]
    value = rng.standard_normal((2, 16, 2, 3))
    loc = rng.uniform(0.05, 0.95, (2, 3, 2, 2, 2, 2))
    attn = rng.uniform(0.1, 1.0, (2, 3, 2, 2, 2))
    got = jax.jit(lambda v, loc, a: dj.ms_deform_attn(v, shapes, starts, loc, a))(value, loc, attn)
    _close(got, da.ms_deform_attn(value, shapes, starts, loc, attn))
    assert calls["pure_callback"] == 0 and calls["buffer_callback"] == 4


@needs_buffer_callback
def test_value_errors_inside_the_buffer_callback_carry_the_message(rng):
    x = rng.standard_normal((1, 2, 6, 6))
    bad = np.array([[3.0, 0.0, 0.0, 2.0, 2.0]])  # batch index 3 of a batch of 1
    with pytest.raises(jax.errors.JaxRuntimeError, match="rois"):
        jax.jit(lambda r: dj.deform_roi_pool(x, r, output_size=2))(bad).block_until_ready()


def test_fallback_pure_callback_without_buffer_callback(rng, calls, monkeypatch):
    """JAX < 0.6.1 (no buffer_callback): the pure_callback path, same values and grads."""
    monkeypatch.setattr(_machinery, "_buffer_callback", None)
    assert _machinery.callback_path() == "pure_callback"
    c = conv_case(rng)
    jc = {k: jnp.asarray(v) for k, v in c.items()}
    _close(jax.jit(lambda a: dj.deform_conv2d(**a, padding=1))(jc), da.deform_conv2d(**c, padding=1))
    g = jax.jit(jax.grad(lambda x: jnp.sum(dj.deform_conv2d(x, c["offset"], c["weight"], padding=1))))(jc["input"])
    ones = np.ones(da.deform_conv2d(c["input"], c["offset"], c["weight"], padding=1).shape)
    _close(g, da.deform_conv2d_backward(ones, c["input"], c["offset"], c["weight"], padding=1).input)
    y = jax.vmap(lambda x: dj.deform_conv2d(x, c["offset"], c["weight"], padding=1))(np.stack([c["input"]] * 2))
    _close(y[1], da.deform_conv2d(c["input"], c["offset"], c["weight"], padding=1))
    assert calls == {"buffer_callback": 0, "pure_callback": 4}


def test_gpu_without_cupy_falls_back_to_pure_callback(monkeypatch):
    if _machinery._buffer_callback is None:
        pytest.skip("no buffer_callback: pure_callback everywhere")
    monkeypatch.setattr(_machinery, "_gpu_platforms", lambda: {"cuda"})
    monkeypatch.setattr(_machinery, "_cupy_importable", lambda: False)
    assert _machinery.callback_path() == "pure_callback"
    monkeypatch.setattr(_machinery, "_cupy_importable", lambda: True)
    assert _machinery.callback_path() == "buffer_callback"


# ---------------------------------------------------------------- the GPU helpers, on host buffers


@needs_buffer_callback
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_buffer_pointer_from_dlpack_matches_the_host_view(dtype):
    """On a CPU buffer ``__cuda_array_interface__`` raises, so ``_buffer_pointer`` takes its
    DLPack route (the one bfloat16 GPU buffers may need): the address must be the data's."""
    seen = []

    def target(ctx, out, x):
        seen.append((_machinery._buffer_pointer(x), np.asarray(x).ctypes.data))
        seen.append((_machinery._buffer_pointer(out), np.asarray(out).ctypes.data))
        np.asarray(out)[...] = np.asarray(x)

    x = jnp.arange(12, dtype=dtype).reshape(3, 4)
    y = jax.jit(_machinery._buffer_callback(target, jax.ShapeDtypeStruct(x.shape, x.dtype)))(x)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(x, np.float32))
    assert seen and all(a == b != 0 for a, b in seen), seen


# ---------------------------------------------------------------- half types on the CPU


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_on_the_cpu_computed_in_float32(rng, dtype):
    c = conv_case(rng)
    half = {k: jnp.asarray(v, dtype) for k, v in c.items()}
    # the reference: the same (rounded) values in float32, result rounded to the half type
    f32 = {k: np.asarray(v, np.float32) for k, v in half.items()}
    ref = da.deform_conv2d(**f32, padding=1)
    tol = 1e-2 if dtype == "float16" else 6e-2  # relative to the output's scale
    scale = np.abs(ref).max()
    for y in (dj.deform_conv2d(**half, padding=1), jax.jit(lambda a: dj.deform_conv2d(**a, padding=1))(half)):
        assert y.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=0, atol=tol * scale)

    names = list(half)
    grads = jax.jit(
        jax.grad(lambda *a: jnp.sum(dj.deform_conv2d(**dict(zip(names, a)), padding=1)), argnums=(0, 1, 2, 3, 4))
    )(*(half[k] for k in names))
    ref_g = da.deform_conv2d_backward(np.ones(ref.shape, np.float32), **f32, padding=1)
    for name, g in zip(names, grads):
        assert g.dtype == jnp.dtype(dtype), name
        r = getattr(ref_g, name)
        np.testing.assert_allclose(np.asarray(g, np.float32), r, rtol=0, atol=tol * np.abs(r).max(), err_msg=name)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_types_msda_and_vmap(rng, dtype):
    shapes, starts = [[3, 4], [2, 2]], [0, 12]
    value = jnp.asarray(rng.standard_normal((2, 16, 2, 3)), dtype)
    loc = jnp.asarray(rng.uniform(0.05, 0.95, (2, 3, 2, 2, 2, 2)), dtype)
    attn = jnp.asarray(rng.uniform(0.1, 1.0, (2, 3, 2, 2, 2)), dtype)
    ref = da.ms_deform_attn(*(np.asarray(a, np.float32) for a in (value,)), shapes, starts,
                            np.asarray(loc, np.float32), np.asarray(attn, np.float32))  # fmt: skip
    got = jax.vmap(lambda v, lo, a: dj.ms_deform_attn(v[None], shapes, starts, lo[None], a[None])[0])(value, loc, attn)
    assert got.dtype == jnp.dtype(dtype)
    tol = 1e-2 if dtype == "float16" else 6e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=0, atol=tol * np.abs(ref).max())


def test_mixed_half_and_float32_still_refused(rng):
    c = conv_case(rng)
    with pytest.raises(TypeError, match="one dtype"):
        dj.deform_conv2d(jnp.asarray(c["input"], "float16"), jnp.asarray(c["offset"], "float32"), c["weight"])
    with pytest.raises(TypeError, match="int32"):
        dj.deform_conv2d(*(jnp.asarray(c[k], "int32") for k in ("input", "offset", "weight")))


# ---------------------------------------------------------------- shard_map, 2 forced host devices

SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import deformarray.jax as dj
    from deformarray.jax import _machinery

    path = sys.argv[1]
    counts = {"buffer_callback": 0, "pure_callback": 0}
    real_buffer, real_pure = _machinery._buffer_callback, jax.pure_callback
    def buffer_callback(*a, **k):
        counts["buffer_callback"] += 1
        return real_buffer(*a, **k)
    def pure_callback(*a, **k):
        counts["pure_callback"] += 1
        return real_pure(*a, **k)
    _machinery._buffer_callback = buffer_callback if path == "buffer_callback" else None
    jax.pure_callback = pure_callback

    assert len(jax.devices()) == 2, jax.devices()
    mesh = jax.make_mesh((2,), ("data",))
    rng = np.random.default_rng(0)
    # 1 MiB of input per device (float32): pure_callback hangs at this size (docs/jax.md)
    x = jnp.asarray(rng.standard_normal((8, 64, 32, 32)), jnp.float32)
    off = jnp.asarray(rng.uniform(-1.5, 1.5, (8, 18, 32, 32)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((4, 64, 3, 3)), jnp.float32)

    def loss(w, x, off):
        return jnp.sum(dj.deform_conv2d(x, off, w, padding=1) ** 2)

    def step(w, x, off):
        l, g = jax.value_and_grad(loss)(w, x, off)
        return jax.lax.psum(l, "data"), w - 1e-3 * g

    dp = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P(), P())))
    shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    xs, offs = shard(x, P("data")), shard(off, P("data"))
    l0, g0 = jax.value_and_grad(loss)(w, x, off)
    for i in range(3):  # a hang shows up within a few calls
        l, w1 = dp(shard(w, P()), xs, offs)
        np.testing.assert_allclose(float(l), float(l0), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(w1), np.asarray(w - 1e-3 * g0), rtol=1e-4, atol=1e-4)
    assert counts[path] > 0 and sum(counts.values()) == counts[path], counts
    print("SHARD_MAP_OK", counts)
    """
)


@needs_buffer_callback
def test_shard_map_two_host_devices_1mib_per_device_no_hang():
    """The data-parallel step over two forced host devices at 1 MiB of input per device,
    through buffer_callback, three times, in a fresh process with a timeout: with
    pure_callback this hangs in most runs (docs/jax.md, known limitation); with
    buffer_callback it must finish."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT, "buffer_callback"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARD_MAP_OK" in proc.stdout


# ---------------------------------------------------------------- the GPU plumbing, on a stand-in CuPy


class _FakeDevice:
    def __init__(self, id=0):
        self.id = id

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _FakeMemoryPointer:
    def __init__(self, arr):
        self.arr = arr

    def copy_from_device_async(self, src, size, stream):
        _FakeCupy.copies.append((size, stream))
        dst = np.asarray(self.arr).view(np.uint8).reshape(-1)
        dst[:size] = np.frombuffer(src, np.uint8)[:size]


class _FakeArray(np.ndarray):
    """A NumPy array posing as a CuPy one: ``device`` and ``data`` as CuPy has them."""

    @property
    def device(self):
        return _FakeDevice(0)

    @property
    def data(self):  # type: ignore[override]
        return _FakeMemoryPointer(self)


class _FakeStream:
    def __init__(self, ptr, device_id=-1):
        self.ptr, self.device_id = ptr, device_id

    def __enter__(self):
        _FakeCupy.entered.append(self.ptr)
        return self

    def __exit__(self, *exc):
        return False


class _FakeCupy:
    """The few CuPy names ``_gpu_buffer_call`` uses, over host memory: ``UnownedMemory`` and
    ``ndarray(shape, dtype, memptr)`` make an array at the buffer's address, as CuPy would."""

    copies: list = []
    entered: list = []
    broadcast_to = staticmethod(np.broadcast_to)
    empty = staticmethod(np.empty)
    ascontiguousarray = staticmethod(np.ascontiguousarray)

    class cuda:
        Device = _FakeDevice
        ExternalStream = _FakeStream

        class UnownedMemory:
            def __init__(self, ptr, size, owner, device_id=-1):
                self.ptr, self.size, self.owner = ptr, size, owner

        class MemoryPointer:
            def __init__(self, mem, offset):
                self.mem, self.offset = mem, offset

    @staticmethod
    def ndarray(shape, dtype, memptr):
        import ctypes

        raw = (ctypes.c_char * memptr.mem.size).from_address(memptr.mem.ptr + memptr.offset)
        return np.frombuffer(raw, dtype=dtype).reshape(shape).view(_FakeArray)


@needs_buffer_callback
def test_gpu_buffer_call_plumbing_on_a_stand_in_cupy(rng, monkeypatch):
    """``_gpu_buffer_call`` (the GPU path, which cannot run here) driven on host buffers: the
    buffers are wrapped in place at their addresses, XLA's stream is entered as CuPy's
    current stream, and every result is copied into XLA's output buffer on that stream.
    The stand-in CuPy arrays are NumPy arrays, so the CPU backend computes."""
    monkeypatch.setitem(sys.modules, "cupy", _FakeCupy)
    monkeypatch.setattr(_FakeCupy, "copies", [])
    monkeypatch.setattr(_FakeCupy, "entered", [])
    monkeypatch.setattr(_machinery, "_DL_CPU", -1)  # host buffers take the GPU branch
    monkeypatch.setattr(_machinery, "_DL_CUDA", 1)
    monkeypatch.setattr(_machinery, "_xla_stream", lambda ctx: 0xC0FFEE)
    host = []
    monkeypatch.setattr(_machinery, "_host_compute", lambda *a: host.append(a))  # must not run

    c = conv_case(rng)
    names = list(c)
    jc = {k: jnp.asarray(v) for k, v in c.items()}
    _close(jax.jit(lambda a: dj.deform_conv2d(**a, padding=1))(jc), da.deform_conv2d(**c, padding=1))
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(dj.deform_conv2d(**dict(zip(names, a)), padding=1)), argnums=(0, 2)))(
        *(jc[k] for k in names)
    )
    ref = da.deform_conv2d_backward(np.ones(da.deform_conv2d(**c, padding=1).shape), **c, padding=1)
    _close(grads[0], ref.input)
    _close(grads[1], ref.weight)
    ws = rng.standard_normal((2, *c["weight"].shape))  # vmap, general case: a loop on the "device"
    y = jax.jit(jax.vmap(lambda w: dj.deform_conv2d(c["input"], c["offset"], w, padding=1)))(ws)
    _close(y[1], da.deform_conv2d(c["input"], c["offset"], ws[1], padding=1))

    assert not host
    assert _FakeCupy.entered == [0xC0FFEE] * 3  # forward, backward, vmapped forward
    assert len(_FakeCupy.copies) == 1 + 5 + 1  # one per output buffer
    assert all(stream.ptr == 0xC0FFEE for _, stream in _FakeCupy.copies)
