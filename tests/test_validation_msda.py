"""Every bad argument of ms_deform_attn / ms_deform_attn_backward gives a clear error
(deformarray/_validate_msda.py).

ValueError for bad shapes and values (the message names the argument and, for shapes, the
expected shape), TypeError for bad types, mixed dtypes, unsupported dtypes, masked arrays
and mixed backends.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from checks import check_masked_array_raises, masked

import deformarray as da

SHAPES = [[4, 5], [2, 3], [1, 1]]  # S = 20 + 6 + 1 = 27
STARTS = [0, 20, 26]


def good(dtype=np.float64):
    """Valid arguments: N = 2, S = 27, M = 2, D = 3, Lq = 4, L = 3, P = 2."""
    rng = np.random.default_rng(0)
    return dict(
        value=rng.standard_normal((2, 27, 2, 3)).astype(dtype),
        spatial_shapes=np.array(SHAPES, dtype=np.int64),
        level_start_index=np.array(STARTS, dtype=np.int64),
        sampling_locations=rng.uniform(0, 1, (2, 4, 2, 3, 2, 2)).astype(dtype),
        attention_weights=rng.uniform(0, 1, (2, 4, 2, 3, 2)).astype(dtype),
    )


OUT_SHAPE = (2, 4, 6)


def forward(args):
    return da.ms_deform_attn(**args)


def backward(args, grad_dtype=None, grad_shape=OUT_SHAPE):
    dtype = grad_dtype or getattr(args["value"], "dtype", np.float64)
    return da.ms_deform_attn_backward(np.ones(grad_shape, dtype=dtype), **args)


BOTH = pytest.mark.parametrize("call", [forward, backward], ids=["forward", "backward"])


def _with(**changes):
    args = good()
    args.update(changes)
    return args


def test_good_arguments_are_accepted():
    assert forward(good()).shape == OUT_SHAPE
    g = backward(good())
    assert g.value.shape == (2, 27, 2, 3) and g.sampling_locations.shape == (2, 4, 2, 3, 2, 2)
    assert g.attention_weights.shape == (2, 4, 2, 3, 2)
    # sequences and other integer dtypes for the integer arguments
    args = _with(spatial_shapes=[tuple(s) for s in SHAPES], level_start_index=tuple(STARTS))
    np.testing.assert_array_equal(forward(args), forward(good()))
    args = _with(spatial_shapes=np.array(SHAPES, np.int32), level_start_index=np.array(STARTS, np.uint16))
    np.testing.assert_array_equal(forward(args), forward(good()))


SHAPE_CASES = [
    ("value_3d", dict(value=np.zeros((2, 27, 6))), "value", r"\(N, S, M, D\)"),
    ("value_5d", dict(value=np.zeros((2, 27, 2, 3, 1))), "value", r"\(N, S, M, D\)"),
    ("value_no_heads", dict(value=np.zeros((2, 27, 0, 3))), "value", "M, D >= 1"),
    ("value_no_channels", dict(value=np.zeros((2, 27, 2, 0))), "value", "M, D >= 1"),
    ("spatial_shapes_1d", dict(spatial_shapes=np.array([4, 5])), "spatial_shapes", r"\(L, 2\)"),
    ("spatial_shapes_3_columns", dict(spatial_shapes=np.array([[4, 5, 1]] * 3)), "spatial_shapes", r"\(L, 2\)"),
    ("spatial_shapes_no_levels", dict(spatial_shapes=np.zeros((0, 2), np.int64)), "spatial_shapes", "L >= 1"),
    ("level_start_index_too_long", dict(level_start_index=np.array([0, 20, 26, 27])), "level_start_index", r"\(3,\)"),
    ("level_start_index_2d", dict(level_start_index=np.array([STARTS])), "level_start_index", r"\(L,\)"),
    (
        "locations_5d",
        dict(sampling_locations=np.zeros((2, 4, 2, 3, 2))),
        "sampling_locations",
        r"\(N, Lq, M, L, P, 2\)",
    ),
    (
        "locations_batch",
        dict(sampling_locations=np.zeros((3, 4, 2, 3, 2, 2))),
        "sampling_locations",
        r"\(2, Lq, 2, 3, P >= 1, 2\)",
    ),
    ("locations_heads", dict(sampling_locations=np.zeros((2, 4, 1, 3, 2, 2))), "sampling_locations", r"\(2, Lq, 2,"),
    ("locations_levels", dict(sampling_locations=np.zeros((2, 4, 2, 2, 2, 2))), "sampling_locations", r", 3, P"),
    ("locations_xyz", dict(sampling_locations=np.zeros((2, 4, 2, 3, 2, 3))), "sampling_locations", r"P >= 1, 2\)"),
    ("locations_no_points", dict(sampling_locations=np.zeros((2, 4, 2, 3, 0, 2))), "sampling_locations", "P >= 1"),
    ("weights_4d", dict(attention_weights=np.zeros((2, 4, 2, 3))), "attention_weights", r"\(N, Lq, M, L, P\)"),
    ("weights_points", dict(attention_weights=np.zeros((2, 4, 2, 3, 1))), "attention_weights", r"\(2, 4, 2, 3, 2\)"),
    ("weights_queries", dict(attention_weights=np.zeros((2, 5, 2, 3, 2))), "attention_weights", r"\(2, 4, 2, 3, 2\)"),
    ("weights_batch", dict(attention_weights=np.zeros((1, 4, 2, 3, 2))), "attention_weights", r"\(2, 4, 2, 3, 2\)"),
    ("weights_heads", dict(attention_weights=np.zeros((2, 4, 3, 3, 2))), "attention_weights", r"\(2, 4, 2, 3, 2\)"),
    ("weights_levels", dict(attention_weights=np.zeros((2, 4, 2, 1, 2))), "attention_weights", r"\(2, 4, 2, 3, 2\)"),
]


@BOTH
@pytest.mark.parametrize("change,named,expected", [c[1:] for c in SHAPE_CASES], ids=[c[0] for c in SHAPE_CASES])
def test_bad_shapes(change, named, expected, call):
    args = _with(**change)
    with pytest.raises(ValueError, match=f"^{named} must have shape") as info:
        call(args) if call is forward else backward(args, np.float64)
    assert re.search(expected, str(info.value)), str(info.value)


VALUE_CASES = [
    ("zero_height", dict(spatial_shapes=[[0, 5], [2, 3], [1, 1]]), "spatial_shapes", r"\[1, 2\*\*31 - 1\]"),
    ("negative_width", dict(spatial_shapes=[[4, -5], [2, 3], [1, 1]]), "spatial_shapes", r"\[1, 2\*\*31 - 1\]"),
    ("huge_size", dict(spatial_shapes=[[2**31, 1], [2, 3], [1, 1]]), "spatial_shapes", r"\[1, 2\*\*31 - 1\]"),
    ("S_mismatch", dict(spatial_shapes=[[4, 5], [2, 3], [1, 2]]), "value has S = 27", r"spatial_shapes.*sum to 28"),
    ("S_mismatch_order", dict(spatial_shapes=[[4, 5], [1, 1]]), "value has S = 27", "sum to 21"),
    ("starts_wrong", dict(level_start_index=[0, 20, 25]), "level_start_index", r"\[0, 20, 26\].*got \[0, 20, 25\]"),
    ("starts_not_from_zero", dict(level_start_index=[1, 21, 27]), "level_start_index", r"\[0, 20, 26\]"),
    ("starts_permuted", dict(level_start_index=[20, 0, 26]), "level_start_index", "start of each level"),
    ("ragged_shapes", dict(spatial_shapes=[[4, 5], [2, 3], [1]]), "spatial_shapes", "ragged"),
]


@BOTH
@pytest.mark.parametrize("change,named,expected", [c[1:] for c in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_bad_level_values(change, named, expected, call):
    args = _with(**change)
    with pytest.raises(ValueError, match=f"^{named}") as info:
        call(args)
    assert re.search(expected, str(info.value)), str(info.value)


TYPE_CASES = [
    ("float_shapes", dict(spatial_shapes=np.array(SHAPES, np.float64)), "spatial_shapes must hold integers"),
    ("float_list_shapes", dict(spatial_shapes=[[4.0, 5.0], [2.0, 3.0], [1.0, 1.0]]), "spatial_shapes must hold integ"),
    ("bool_shapes", dict(spatial_shapes=np.ones((3, 2), bool)), "spatial_shapes must hold integers"),
    ("float_starts", dict(level_start_index=np.array(STARTS, np.float32)), "level_start_index must hold integers"),
    ("none_shapes", dict(spatial_shapes=None), "spatial_shapes is required"),
    ("none_starts", dict(level_start_index=None), "level_start_index is required"),
    ("str_shapes", dict(spatial_shapes="4x5"), "spatial_shapes"),
]


@BOTH
@pytest.mark.parametrize("change,message", [c[1:] for c in TYPE_CASES], ids=[c[0] for c in TYPE_CASES])
def test_bad_level_types(change, message, call):
    with pytest.raises(TypeError, match=message):
        call(_with(**change))


@pytest.mark.parametrize("shape", [(2, 4, 5), (2, 4, 2, 3), (2, 3, 6), (1, 4, 6), (2, 4, 6, 1)])
def test_grad_output_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"^grad_output must have shape \(N, Lq, M\*D\) = \(2, 4, 6\)"):
        backward(good(), grad_shape=shape)


@BOTH
@pytest.mark.parametrize("name", ["value", "sampling_locations", "attention_weights"])
def test_mixed_dtypes(name, call):
    args = good()
    args[name] = args[name].astype(np.float32)
    with pytest.raises(TypeError, match=f"one dtype.*{name} is float32"):
        call(args, np.float64) if call is backward else call(args)


def test_grad_output_dtype_mismatch():
    with pytest.raises(TypeError, match="grad_output is float32"):
        backward(good(), np.float32)


@BOTH
@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.complex128])
def test_unsupported_dtype(dtype, call):
    """float16 is CUDA-only; integers and complex nowhere."""
    args = good()
    for name in ("value", "sampling_locations", "attention_weights"):
        args[name] = args[name].astype(dtype)
    with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype)} is not supported on the numpy backend"):
        call(args, dtype) if call is backward else call(args)


@BOTH
@pytest.mark.parametrize("name", ["value", "sampling_locations", "attention_weights"])
def test_required_arrays(name, call):
    args = good()
    args[name] = None
    with pytest.raises(TypeError, match=name):
        call(args)
    args[name] = good()[name].tolist()
    with pytest.raises(TypeError, match=name):
        call(args)


@pytest.mark.parametrize("name", ["grad_output", "value", "sampling_locations", "attention_weights"])
def test_masked_arrays_raise_type_error(name):
    args = good()
    check_masked_array_raises(name, args, OUT_SHAPE, lambda **a: forward(a), da.ms_deform_attn_backward)


@pytest.mark.parametrize("names", [["value"], ["sampling_locations"], ["attention_weights"], ["grad_output"], ["all"]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_arrays_compute_as_native(names, dtype):
    args = good(dtype)
    grad_output = np.random.default_rng(3).standard_normal(OUT_SHAPE).astype(dtype)
    want_y, want_g = forward(args), da.ms_deform_attn_backward(grad_output, **args)
    floats = ["value", "sampling_locations", "attention_weights"]
    for name in floats + ["grad_output"] if names == ["all"] else names:
        if name == "grad_output":
            grad_output = grad_output.astype(grad_output.dtype.newbyteorder("S"))
        else:
            args[name] = args[name].astype(args[name].dtype.newbyteorder("S"))
    y, g = forward(args), da.ms_deform_attn_backward(grad_output, **args)
    assert y.dtype.isnative and y.tobytes() == want_y.tobytes()
    for name in floats:
        assert getattr(g, name).dtype.isnative and getattr(g, name).tobytes() == getattr(want_g, name).tobytes()


def test_output_too_large_raises_value_error():
    """An output (N, Lq, M*D) beyond 2**63 - 1 bytes, from inputs that are not (broadcast
    views): a ValueError naming the arguments, before anything is allocated."""
    value = np.broadcast_to(np.zeros(1), (1, 1, 1, 2**30))
    loc = np.broadcast_to(np.zeros(1), (1, 2**31, 1, 1, 1, 2))
    weights = np.broadcast_to(np.zeros(1), (1, 2**31, 1, 1, 1))
    with pytest.raises(ValueError, match=r"^value and sampling_locations gives an output \(N, Lq, M\*D\).*too large"):
        da.ms_deform_attn(value, [[1, 1]], [0], loc, weights)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------


@BOTH
@pytest.mark.parametrize("name", ["value", "sampling_locations", "attention_weights"])
def test_mixed_backends(fake_cupy, name, call):
    args = good()
    args[name] = fake_cupy.ndarray(args[name])
    with pytest.raises(TypeError, match="backend"):
        call(args)


@pytest.mark.parametrize("name", ["spatial_shapes", "level_start_index"])
def test_device_integer_arguments_with_host_arrays(fake_cupy, name):
    """The integer arguments may be NumPy arrays or sequences next to CuPy arrays, but a
    CuPy one next to NumPy arrays is a mixed call."""
    args = good()
    args[name] = fake_cupy.ndarray(args[name])
    with pytest.raises(TypeError, match=f"one backend.*{name} on cupy"):
        forward(args)


def test_torch_tensors_raise_type_error():
    torch = pytest.importorskip("torch")
    args = good()
    args["value"] = torch.from_numpy(args["value"])
    with pytest.raises(TypeError, match="deformarray.torch"):
        forward(args)


@pytest.mark.parametrize("name", ["spatial_shapes", "level_start_index"])
def test_masked_geometry_raises_type_error(name):
    """The integer arguments too: a mask on them would be ignored just the same."""
    args = good()
    args[name] = masked(np.asarray(args[name]))
    with pytest.raises(TypeError, match=rf"^{name} is a numpy masked array.*np\.asarray"):
        forward(args)
