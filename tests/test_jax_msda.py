"""The JAX adapter's ms_deform_attn: values and gradients equal the array API's, check_grads
in float64, and it works under jit, grad and vmap; traced geometry is refused with the way
out. Skipped without JAX."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import deformarray as da  # noqa: E402
import deformarray.jax as dj  # noqa: E402

SHAPES = [[3, 4], [2, 2], [1, 1]]
STARTS = [0, 12, 16]


# float64 for the numerical checks (conftest.py restores the default afterwards)
pytestmark = pytest.mark.usefixtures("jax_x64")


def msda_case(rng, n=2, lq=3, m=2, d=3, p=2):
    """Locations whose pixel coordinates keep off the bilinear kinks (fractional parts in
    [0.2, 0.8]), so finite differences see one smooth piece."""
    s = sum(h * w for h, w in SHAPES)
    sizes = np.array([[w, h] for h, w in SHAPES], dtype=np.float64)  # (L, 2) as (x, y)
    pix = rng.integers(-1, 4, size=(n, lq, m, len(SHAPES), p, 2)) + rng.uniform(0.2, 0.8, (n, lq, m, len(SHAPES), p, 2))
    loc = (pix + 0.5) / sizes[None, None, None, :, None, :]
    return dict(
        value=rng.standard_normal((n, s, m, d)),
        sampling_locations=loc,
        attention_weights=rng.uniform(0.1, 1.0, (n, lq, m, len(SHAPES), p)),
    )


def _close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


def test_msda_equals_array_api_eager_and_jit(rng):
    c = msda_case(rng)
    expected = da.ms_deform_attn(c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"])
    jc = {k: jnp.asarray(v) for k, v in c.items()}
    got = dj.ms_deform_attn(
        jc["value"], np.array(SHAPES), jnp.asarray(STARTS), jc["sampling_locations"], jc["attention_weights"]
    )
    _close(got, expected)
    jitted = jax.jit(lambda v, loc, a: dj.ms_deform_attn(v, SHAPES, STARTS, loc, a))
    _close(jitted(jc["value"], jc["sampling_locations"], jc["attention_weights"]), expected)


def test_msda_grad_equals_array_api(rng):
    c = msda_case(rng)
    out = da.ms_deform_attn(c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"])
    g = rng.standard_normal(out.shape)
    expected = da.ms_deform_attn_backward(
        g, c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"]
    )

    def loss(v, loc, a):
        return jnp.sum(dj.ms_deform_attn(v, SHAPES, STARTS, loc, a) * g)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(jnp.asarray(c[k]) for k in c))
    for got, want in zip(grads, expected):
        _close(got, want)


def test_msda_check_grads(rng):
    c = msda_case(rng, n=1, lq=2, m=1, d=2, p=1)

    def f(v, loc, a):
        return dj.ms_deform_attn(v, SHAPES, STARTS, loc, a)

    check_grads(f, tuple(jnp.asarray(c[k]) for k in c), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_msda_vmap_folds_batches(rng):
    cases = [msda_case(rng, n=1) for _ in range(3)]
    stacked = {k: jnp.stack([jnp.asarray(c[k]) for c in cases]) for k in cases[0]}
    got = jax.vmap(lambda v, loc, a: dj.ms_deform_attn(v, SHAPES, STARTS, loc, a))(
        stacked["value"], stacked["sampling_locations"], stacked["attention_weights"]
    )
    for i, c in enumerate(cases):
        _close(got[i], da.ms_deform_attn(c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"]))


def test_msda_float32_default_dtype(rng):
    c = {k: v.astype(np.float32) for k, v in msda_case(rng).items()}
    got = dj.ms_deform_attn(c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"])
    assert got.dtype == jnp.float32
    _close(got, da.ms_deform_attn(c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"]), 1e-6)


def test_msda_traced_geometry_and_bad_shapes_refused(rng):
    c = {k: jnp.asarray(v) for k, v in msda_case(rng).items()}

    @jax.jit
    def traced(shapes):
        return dj.ms_deform_attn(c["value"], shapes, STARTS, c["sampling_locations"], c["attention_weights"])

    with pytest.raises(TypeError, match="spatial_shapes must be concrete"):
        traced(jnp.asarray(SHAPES))
    with pytest.raises(ValueError, match="level_start_index"):
        dj.ms_deform_attn(c["value"], SHAPES, [0, 11, 16], c["sampling_locations"], c["attention_weights"])
    with pytest.raises(ValueError, match="attention_weights"):
        dj.ms_deform_attn(c["value"], SHAPES, STARTS, c["sampling_locations"], c["attention_weights"][..., :1])
    with pytest.raises(TypeError, match="integers"):
        dj.ms_deform_attn(c["value"], np.array(SHAPES, float), STARTS, c["sampling_locations"], c["attention_weights"])
