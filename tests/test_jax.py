"""The JAX adapter (deformarray.jax): values equal the array API's, gradients are checked
numerically (jax.test_util.check_grads, float64), and the functions work under jit, grad,
vmap and shard_map. Skipped without JAX."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.jax as dj  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# float64 for the numerical checks (conftest.py restores the default afterwards)
pytestmark = pytest.mark.usefixtures("jax_x64")


def _off_kink(rng, shape, spread=2):
    """Offsets whose fractional part lies in [0.2, 0.8]: integer offsets added to integer
    sampling positions keep every sample point away from the bilinear kinks."""
    whole = rng.integers(-spread, spread + 1, size=shape)
    return whole + rng.uniform(0.2, 0.8, size=shape) * rng.choice([-1, 1], size=shape)


def conv_case(rng, mask=True, bias=True, n=2, c_in=4, c_out=3, hw=(5, 6), groups=1, og=1):
    x = rng.standard_normal((n, c_in, *hw))
    w = rng.standard_normal((c_out, c_in // groups, 3, 3))
    off = _off_kink(rng, (n, 2 * og * 9, *hw))
    return dict(
        input=x,
        offset=off,
        weight=w,
        bias=rng.standard_normal(c_out) if bias else None,
        mask=rng.uniform(0.1, 1.0, (n, og * 9, *hw)) if mask else None,
    )


CONV_KW = dict(stride=1, padding=1, dilation=1)


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------- deform_conv2d


@pytest.mark.parametrize("mask", [False, True], ids=["v1", "v2"])
def test_conv_equals_array_api_eager_and_jit(rng, mask):
    c = conv_case(rng, mask=mask, groups=2, og=2, c_in=4, c_out=4)
    expected = da.deform_conv2d(**c, **CONV_KW)
    jc = {k: None if v is None else jnp.asarray(v) for k, v in c.items()}
    _close(dj.deform_conv2d(**jc, **CONV_KW), expected)
    jitted = jax.jit(lambda a: dj.deform_conv2d(**a, **CONV_KW))
    _close(jitted(jc), expected)


@pytest.mark.parametrize("mask", [False, True], ids=["v1", "v2"])
def test_conv_grad_equals_array_api(rng, mask):
    c = conv_case(rng, mask=mask)
    names = [k for k, v in c.items() if v is not None]
    g_out = rng.standard_normal(da.deform_conv2d(**c, **CONV_KW).shape)

    def loss(*arrays):
        kw = dict(c, **dict(zip(names, arrays)))
        return jnp.sum(dj.deform_conv2d(**kw, **CONV_KW) * g_out)

    expected = da.deform_conv2d_backward(g_out, **c, **CONV_KW)
    args = [c[k] for k in names]
    for grads in (
        jax.grad(loss, argnums=tuple(range(len(names))))(*args),
        jax.jit(jax.grad(loss, argnums=tuple(range(len(names)))))(*args),
    ):
        for name, g in zip(names, grads):
            _close(g, getattr(expected, name))


@pytest.mark.parametrize("mask", [False, True], ids=["v1", "v2"])
def test_conv_check_grads(rng, mask):
    c = conv_case(rng, mask=mask, n=1, c_in=2, c_out=2, hw=(4, 4))
    names = [k for k, v in c.items() if v is not None]

    def f(*arrays):
        return dj.deform_conv2d(**dict(c, **dict(zip(names, arrays))), stride=1, padding=1)

    check_grads(f, [c[k] for k in names], order=1, modes=["rev"])


def test_conv_float32_default_dtype(rng):
    c = conv_case(rng, mask=True)
    c32 = {k: v.astype(np.float32) for k, v in c.items()}
    y = dj.deform_conv2d(**{k: jnp.asarray(v) for k, v in c32.items()}, **CONV_KW)
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), da.deform_conv2d(**c32, **CONV_KW), rtol=1e-5, atol=1e-5)


def test_conv_vmap_folds_images_and_loops_weights(rng):
    c = conv_case(rng, mask=True, n=2)
    b = 3
    xs = rng.standard_normal((b, *c["input"].shape))
    offs = _off_kink(rng, (b, *c["offset"].shape))
    ws = rng.standard_normal((b, *c["weight"].shape))

    # only per-image arrays batched (folded into N on the host)
    y = jax.vmap(lambda x, o: dj.deform_conv2d(x, o, c["weight"], c["bias"], mask=c["mask"], padding=1))(xs, offs)
    for i in range(b):
        _close(y[i], da.deform_conv2d(xs[i], offs[i], c["weight"], c["bias"], padding=1, mask=c["mask"]))
    # batched weights, in_axes mixing batched and unbatched, nested vmap
    y = jax.jit(jax.vmap(lambda w: dj.deform_conv2d(c["input"], c["offset"], w, padding=1)))(ws)
    for i in range(b):
        _close(y[i], da.deform_conv2d(c["input"], c["offset"], ws[i], padding=1))
    y = jax.vmap(jax.vmap(lambda x, w: dj.deform_conv2d(x, c["offset"], w, padding=1), (0, None)), (None, 0))(xs, ws)
    assert y.shape == (b, b, *da.deform_conv2d(c["input"], c["offset"], c["weight"], padding=1).shape)
    _close(y[2, 1], da.deform_conv2d(xs[1], c["offset"], ws[2], padding=1))


def test_conv_per_example_gradients_vmap_of_grad(rng):
    c = conv_case(rng, mask=True, bias=True, n=3)

    def loss(x, o, m, w, b):
        return jnp.sum(dj.deform_conv2d(x[None], o[None], w, b, padding=1, mask=m[None]) ** 2)

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), in_axes=(0, 0, 0, None, None)))(
        c["input"], c["offset"], c["mask"], c["weight"], c["bias"]
    )
    for i in range(3):
        one = {k: (v[i : i + 1] if k in ("input", "offset", "mask") else v) for k, v in c.items()}
        y = da.deform_conv2d(**one, **CONV_KW)
        ref = da.deform_conv2d_backward(2 * y, **one, **CONV_KW)
        for g, name in zip(grads, ("input", "offset", "mask", "weight", "bias")):
            r = getattr(ref, name)
            _close(g[i], r[0] if name in ("input", "offset", "mask") else r, tol=1e-9)


def test_conv_errors_at_trace_time(rng):
    c = conv_case(rng, mask=False)
    bad = np.zeros((2, 17, 5, 6))
    with pytest.raises(ValueError, match="offset"):
        jax.jit(lambda x, o, w: dj.deform_conv2d(x, o, w, padding=1))(c["input"], bad, c["weight"])
    with pytest.raises(TypeError, match="dtype"):
        dj.deform_conv2d(c["input"], c["offset"].astype(np.float32), c["weight"], padding=1)


# ---------------------------------------------------------------- RoI pooling


def _have(name):
    """The RoI operators exist in the array API and their CPU backend runs."""
    fn = getattr(da, name, None)
    if fn is None:
        return False
    try:
        x = np.zeros((1, 4, 4, 4))
        rois = np.array([[0, 0.0, 0.0, 2.0, 2.0]])
        if name == "deform_roi_pool":
            fn(x, rois, output_size=2)
        else:
            fn(x, rois, output_dim=1, group_size=2, pooled_size=2)
    except (ImportError, AttributeError, NotImplementedError):
        return False
    return True


needs_roi = pytest.mark.skipif(not _have("deform_roi_pool"), reason="deform_roi_pool not in this build")
needs_psroi = pytest.mark.skipif(not _have("deform_psroi_pool"), reason="deform_psroi_pool not in this build")


def roi_case(rng, r=3, n=2, c=3, hw=(12, 13), ps=3):
    x = rng.standard_normal((n, c, *hw))
    # boxes well inside the image (no clamping kinks), fractional corners
    x1 = rng.uniform(2.1, 4.9, r)
    y1 = rng.uniform(2.1, 4.9, r)
    rois = np.stack(
        [rng.integers(0, n, r), x1, y1, x1 + rng.uniform(3.1, 5.9, r), y1 + rng.uniform(3.1, 5.9, r)], axis=1
    ).astype(np.float64)
    off = rng.uniform(-0.3, 0.3, (r, 2, ps, ps))
    mask = rng.uniform(0.1, 1.0, (r, 1, ps, ps))
    return x, rois, off, mask


ROI_KW = dict(output_size=(3, 3), spatial_scale=1.0, sampling_ratio=2, gamma=0.1)


@needs_roi
@pytest.mark.parametrize("mask", [False, True], ids=["plain", "modulated"])
def test_roi_pool_values_grads_check_grads(rng, mask):
    x, rois, off, m = roi_case(rng)
    m = m if mask else None
    expected = da.deform_roi_pool(x, rois, off, mask=m, **ROI_KW)
    _close(jax.jit(lambda *a: dj.deform_roi_pool(a[0], a[1], a[2], mask=a[3], **ROI_KW))(x, rois, off, m), expected)

    g_out = rng.standard_normal(expected.shape)
    ref = da.deform_roi_pool_backward(g_out, x, rois, off, mask=m, **ROI_KW)
    args = [x, off] + ([m] if mask else [])

    def f(x, off, m=None):
        return dj.deform_roi_pool(x, rois, off, mask=m, **ROI_KW)

    grads = jax.grad(lambda *a: jnp.sum(f(*a) * g_out), argnums=tuple(range(len(args))))(*args)
    for g, name in zip(grads, ("input", "offset", "mask")):
        _close(g, getattr(ref, name))
    # rois get a zero gradient
    g_rois = jax.grad(lambda r: jnp.sum(dj.deform_roi_pool(x, r, off, **ROI_KW)))(rois)
    assert not np.any(np.asarray(g_rois))
    check_grads(f, args, order=1, modes=["rev"])


PS_KW = dict(
    output_dim=2, group_size=2, pooled_size=2, part_size=2, sample_per_part=2, trans_std=0.1, spatial_scale=1.0
)


@needs_psroi
@pytest.mark.parametrize("offset", [False, True], ids=["plain", "deformable"])
def test_psroi_pool_values_grads_check_grads(rng, offset):
    x, rois, _, _ = roi_case(rng, c=8)
    off = rng.uniform(-0.3, 0.3, (len(rois), 2, 2, 2)) if offset else None
    expected = da.deform_psroi_pool(x, rois, off, **PS_KW)
    _close(jax.jit(lambda *a: dj.deform_psroi_pool(*a, **PS_KW))(x, rois, off), expected)

    g_out = rng.standard_normal(expected.shape)
    ref = da.deform_psroi_pool_backward(g_out, x, rois, off, **PS_KW)
    args = [x] + ([off] if offset else [])

    def f(x, off=None):
        return dj.deform_psroi_pool(x, rois, off, **PS_KW)

    grads = jax.grad(lambda *a: jnp.sum(f(*a) * g_out), argnums=tuple(range(len(args))))(*args)
    for g, name in zip(grads, ("input", "offset")):
        _close(g, getattr(ref, name))
    check_grads(f, args, order=1, modes=["rev"])


@needs_roi
def test_roi_pool_vmap(rng):
    x, rois, off, m = roi_case(rng)
    xs = np.stack([x, 2 * x])
    y = jax.vmap(lambda x: dj.deform_roi_pool(x, rois, off, mask=m, **ROI_KW))(xs)
    for i in range(2):
        _close(y[i], da.deform_roi_pool(xs[i], rois, off, mask=m, **ROI_KW))


# ---------------------------------------------------------------- shard_map

SHARD_MAP_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    import deformarray.jax as dj

    try:  # newer JAX: varying-axis types; the gradient of a replicated input is summed
        from jax import shard_map
        legacy, kw = False, {}
    except ImportError:  # older JAX: the per-device gradient, to be psum-ed by hand
        from jax.experimental.shard_map import shard_map
        legacy, kw = True, {"check_rep": False}

    assert len(jax.devices()) == 2, jax.devices()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 3, 6, 6)), jnp.float32)
    off = jnp.asarray(rng.uniform(-1.5, 1.5, (4, 18, 6, 6)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((2, 3, 3, 3)), jnp.float32)

    def loss(w, x, off):
        return jnp.sum(dj.deform_conv2d(x, off, w, padding=1) ** 2)

    def step(w, x, off):  # one data-parallel SGD step
        l, g = jax.value_and_grad(loss)(w, x, off)
        if legacy:
            g = jax.lax.psum(g, "data")
        return jax.lax.psum(l, "data"), w - 1e-3 * g

    dp = jax.jit(shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                           out_specs=(P(), P()), **kw))
    shard = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    l, w1 = dp(shard(w, P()), shard(x, P("data")), shard(off, P("data")))
    l0, g0 = jax.value_and_grad(loss)(w, x, off)
    np.testing.assert_allclose(float(l), float(l0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w1), np.asarray(w - 1e-3 * g0), rtol=1e-5, atol=1e-5)
    print("SHARD_MAP_OK")
    """
)


def test_shard_map_data_parallel_step_two_cpu_devices():
    # XLA_FLAGS must be set before JAX starts its backend: a fresh process, so that this
    # process's JAX (already started with one device) is left alone.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-c", SHARD_MAP_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SHARD_MAP_OK" in proc.stdout
