"""dcnv4 / dcnv4_backward on NumPy arrays: DCNv3's sampling with DCNv4's packed
offset_mask (per group 2P offsets then P masks, groups one after another, K >= 3*G*P with
the rest padding).

- forward and gradients against reference_dcn.py (which unpacks into DCNv3's layouts),
  float32 and float64, K padded to a multiple of 8 (NaN in the padding: ignored), K = 3GP
  exactly, K with a long padding; the padding's gradient is +0;
- DCNv4 == DCNv3 on the repacked tensors, bit for bit, forward and gradients, over random
  geometries (Hypothesis) and on edge offsets;
- N = 0, non-contiguous offset_mask, bitwise determinism.

Default shapes are tiny: CI also runs this file with NUMBA_DISABLE_JIT=1.
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import DTYPES, VIEWS, assert_close, check_bitwise_deterministic
from dcn_cases import SETTINGS, dcn_geometries, targeted
from edges import edge_targets
from hypothesis import given
from hypothesis import strategies as st
from reference_dcn import dcnv4_case, make_dcn_case, pack, ref_dcnv4, ref_dcnv4_backward, unpack

import deformarray as da


def run_forward(c):
    return da.dcnv4(**c)


def run_backward(go, c, **extra):
    return da.dcnv4_backward(go, **c, **extra)


def _points(c):
    kh, kw = (c["kernel_size"],) * 2 if np.isscalar(c["kernel_size"]) else c["kernel_size"]
    return kh * kw - int(bool(c["remove_center"]))


def check_against_reference(c, rng, dtype):
    y = run_forward(c)
    assert_close(y, ref_dcnv4(**c), dtype, "output")
    go = rng.standard_normal(y.shape).astype(dtype)
    grads = run_backward(go, c)
    assert isinstance(grads, da.Dcnv4Grads)
    ref = ref_dcnv4_backward(go, **c)
    assert_close(grads.input, ref.input, dtype, "grad input")
    assert grads.offset_mask.shape == c["offset_mask"].shape and grads.offset_mask.flags.c_contiguous
    assert_close(grads.offset_mask, ref.offset_mask, dtype, "grad offset_mask")
    used = 3 * c["group"] * _points(c)
    padding = grads.offset_mask[..., used:]
    assert padding.tobytes() == np.zeros_like(padding).tobytes()  # +0, not -0 or NaN
    return y, grads


CASES = {
    "3x3_g4": dict(group=4, group_channels=2, n=1),  # 3*4*9 = 108 -> K = 112
    "3x3_remove_center": dict(remove_center=True),  # 3*2*8 = 48: a multiple of 8 already
    "1x1": dict(kernel_size=1, padding=0, group=3, group_channels=1),  # 9 -> 16
    "5x3_stride2": dict(kernel_size=(5, 3), padding=(2, 1), stride=2, h=7, n=1, group=1),
    "2x2_dilation2_scale2": dict(kernel_size=2, dilation=2, padding=1, offset_scale=2.0, group=1, group_channels=5),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("k_extra", [None, 0, 13], ids=["K8", "K3GP", "Klong"])
@pytest.mark.parametrize("geom", list(CASES.values()), ids=list(CASES))
def test_matches_reference(geom, k_extra, dtype, rng):
    """K padded to a multiple of 8 (DCNv4's own layout), K = 3GP exactly, and K = 3GP + 13;
    the padding holds NaN, which must not leak anywhere."""
    c3 = make_dcn_case(rng, dtype=dtype, **geom)
    used = 3 * c3["group"] * _points(c3)
    c = dcnv4_case(c3, None if k_extra is None else used + k_extra, fill=np.nan)
    if k_extra is None:
        assert c["offset_mask"].shape[-1] % 8 == 0
    _, grads = check_against_reference(c, rng, dtype)
    assert np.abs(grads.input).max() > 0 and np.abs(grads.offset_mask).max() > 0


def _same_as_dcnv3(c3, rng, dtype, k_total=None):
    """dcnv4 on the packed tensors == dcnv3, bit for bit, forward and gradients."""
    c4 = dcnv4_case(c3, k_total, fill=np.nan)
    y3, y4 = da.dcnv3(**c3), run_forward(c4)
    assert y4.tobytes() == y3.tobytes()
    go = rng.standard_normal(y3.shape).astype(dtype)
    g3, g4 = da.dcnv3_backward(go, **c3), run_backward(go, c4)
    assert g4.input.tobytes() == g3.input.tobytes()
    p = _points(c3)
    offset, mask = unpack(g4.offset_mask, c3["group"], p)
    assert offset.tobytes() == g3.offset.tobytes() and mask.tobytes() == g3.mask.tobytes()
    want = pack(g3.offset, g3.mask, c3["group"], c4["offset_mask"].shape[-1], fill=0.0)
    assert g4.offset_mask.tobytes() == want.tobytes()


@SETTINGS
@given(geom=dcn_geometries(), dtype=st.sampled_from(DTYPES), k_extra=st.integers(0, 9), seed=st.integers(0, 2**32 - 1))
def test_same_bits_as_dcnv3_on_repacked_tensors(geom, dtype, k_extra, seed):
    rng = np.random.default_rng(seed)
    c3 = make_dcn_case(rng, dtype=dtype, spread=2.5, **geom)
    _same_as_dcnv3(c3, rng, dtype, 3 * geom["group"] * _points(c3) + k_extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_edge_locations_same_bits_as_dcnv3(dtype, rng):
    """Offsets on and one ulp either side of -1, 0, the integers, H-1 and H (see
    test_dcnv3.test_edge_locations): the same bits as dcnv3, and the reference."""
    c3 = make_dcn_case(rng, n=1, h=4, w=5, group=2, group_channels=2, dtype=dtype)
    targeted(c3, rng, edge_targets(4, dtype, (1, 2)), edge_targets(5, dtype, (1, 2, 3)), dtype)
    _same_as_dcnv3(c3, rng, dtype)
    check_against_reference(dcnv4_case(c3), rng, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_empty_batch(dtype, rng):
    c = dcnv4_case(make_dcn_case(rng, n=0, dtype=dtype))
    y = run_forward(c)
    assert y.shape == (0, 5, 4, 6) and y.dtype == dtype
    grads = run_backward(np.zeros(y.shape, dtype), c)
    assert grads.input.shape == c["input"].shape and grads.offset_mask.shape == c["offset_mask"].shape
    assert grads.offset_mask.dtype == dtype


@VIEWS
def test_non_contiguous_inputs(make_view, rng):
    c = dcnv4_case(make_dcn_case(rng, n=1, dtype=np.float32), fill=0.5)
    y = run_forward(c)
    go = rng.standard_normal(y.shape).astype(np.float32)
    grads = run_backward(go, c)
    view = dict(c, input=make_view(c["input"]), offset_mask=make_view(c["offset_mask"]))
    assert run_forward(view).tobytes() == y.tobytes()
    grads_v = run_backward(make_view(go), view)
    assert grads_v.input.tobytes() == grads.input.tobytes()
    assert grads_v.offset_mask.tobytes() == grads.offset_mask.tobytes()


def test_bitwise_deterministic(rng):
    """Same bits on every run and with one thread; deterministic=False too."""
    c = dcnv4_case(make_dcn_case(rng, n=2, h=4, w=3, spread=2.0))
    # the shared check also asks for a second run's bits and nonzero gradients
    check_bitwise_deterministic(run_forward, run_backward, c, rng)
