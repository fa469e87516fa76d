"""The JAX adapter's dcnv3 / dcnv4: values and gradients equal the array API's, check_grads
in float64, jit and vmap. Skipped without JAX."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.jax as dj  # noqa: E402

GEO = dict(kernel_size=3, stride=1, padding=1, dilation=1, group=2, group_channels=2, offset_scale=0.5)


# float64 for the numerical checks (conftest.py restores the default afterwards)
pytestmark = pytest.mark.usefixtures("jax_x64")


def case(rng, n=2, h=4, w=3, g=2, d=2, p=9):
    """Offsets with fractional parts in [0.2, 0.8] times offset_scale 0.5 keep the sample
    points off the bilinear kinks (the kernel taps sit at integers times 0.5)."""
    off = rng.integers(-2, 3, (n, h, w, g * p * 2)) * 2 + rng.uniform(0.4, 1.6, (n, h, w, g * p * 2))
    return dict(
        input=rng.standard_normal((n, h, w, g * d)),
        offset=off,
        mask=rng.uniform(0.1, 1.0, (n, h, w, g * p)),
    )


def packed(c, g=2, p=9):
    n, h, w, _ = c["offset"].shape
    om = np.concatenate([c["offset"].reshape(n, h, w, g, 2 * p), c["mask"].reshape(n, h, w, g, p)], -1)
    return np.pad(om.reshape(n, h, w, 3 * g * p), [(0, 0)] * 3 + [(0, 2)])  # 54 -> 56


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_dcnv3_values_grads_jit(rng):
    c = case(rng)
    out = da.dcnv3(c["input"], c["offset"], c["mask"], **GEO)
    g = rng.standard_normal(out.shape)
    want = da.dcnv3_backward(g, c["input"], c["offset"], c["mask"], **GEO)

    def loss(x, off, m):
        return jnp.sum(dj.dcnv3(x, off, m, **GEO) * g)

    jc = [jnp.asarray(c[k]) for k in ("input", "offset", "mask")]
    _close(jax.jit(lambda x, off, m: dj.dcnv3(x, off, m, **GEO))(*jc), out)
    for got, exp in zip(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*jc), want):
        _close(got, exp)


def test_dcnv4_values_grads_and_vmap(rng):
    c = case(rng)
    om = packed(c)
    out = da.dcnv4(c["input"], om, **GEO)
    _close(out, da.dcnv3(c["input"], c["offset"], c["mask"], **GEO))
    g = rng.standard_normal(out.shape)
    want = da.dcnv4_backward(g, c["input"], om, **GEO)
    grads = jax.grad(lambda x, o: jnp.sum(dj.dcnv4(x, o, **GEO) * g), argnums=(0, 1))(
        jnp.asarray(c["input"]), jnp.asarray(om)
    )
    _close(grads[0], want.input)
    _close(grads[1], want.offset_mask)
    stacked = jax.vmap(lambda x, o: dj.dcnv4(x, o, **GEO))(jnp.asarray(c["input"])[:, None], jnp.asarray(om)[:, None])
    _close(stacked[:, 0], out)


def test_dcnv3_check_grads(rng):
    c = case(rng, n=1, h=3, w=3, g=1, d=1)
    geo = dict(GEO, group=1, group_channels=1)
    check_grads(
        lambda x, off, m: dj.dcnv3(x, off, m, **geo),
        tuple(jnp.asarray(c[k]) for k in ("input", "offset", "mask")),
        order=1,
        modes=["rev"],
        eps=1e-6,
        atol=1e-6,
        rtol=1e-6,
    )


def test_errors_at_trace_time(rng):
    c = {k: jnp.asarray(v) for k, v in case(rng).items()}
    with pytest.raises(ValueError, match="mask"):
        jax.jit(lambda x, off, m: dj.dcnv3(x, off, m, **GEO))(c["input"], c["offset"], c["mask"][..., :-1])
    with pytest.raises(ValueError, match="offset_mask"):
        dj.dcnv4(c["input"], c["offset"], **GEO)
