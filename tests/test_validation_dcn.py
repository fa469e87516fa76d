"""Every bad argument of dcnv3 / dcnv4 and their backwards gives a clear error
(deformarray/_validate_dcn.py).

ValueError for bad shapes and values (the message names the argument and, for shapes, the
expected shape), TypeError for bad types, mixed dtypes, unsupported dtypes (float16 is
CUDA-only), masked arrays and missing arrays.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from checks import check_masked_array_raises

import deformarray as da

# N = 2, H = 5, W = 4, G = 2, D = 3, 3x3, padding 1: H_out = 5, W_out = 4, P = 9
OUT_SHAPE = (2, 5, 4, 6)


def good3(dtype=np.float64):
    rng = np.random.default_rng(0)
    return dict(
        input=rng.standard_normal((2, 5, 4, 6)).astype(dtype),
        offset=rng.standard_normal((2, 5, 4, 36)).astype(dtype),
        mask=rng.uniform(0, 1, (2, 5, 4, 18)).astype(dtype),
        kernel_size=3,
        padding=1,
        group=2,
    )


def good4(dtype=np.float64):
    rng = np.random.default_rng(0)
    return dict(
        input=rng.standard_normal((2, 5, 4, 6)).astype(dtype),
        offset_mask=rng.standard_normal((2, 5, 4, 56)).astype(dtype),
        kernel_size=3,
        padding=1,
        group=2,
    )


def f3(args):
    return da.dcnv3(**args)


def b3(args, grad_shape=OUT_SHAPE, grad_dtype=None):
    dtype = grad_dtype or getattr(args["input"], "dtype", np.float64)
    return da.dcnv3_backward(np.ones(grad_shape, dtype), **args)


def f4(args):
    return da.dcnv4(**args)


def b4(args, grad_shape=OUT_SHAPE, grad_dtype=None):
    dtype = grad_dtype or getattr(args["input"], "dtype", np.float64)
    return da.dcnv4_backward(np.ones(grad_shape, dtype), **args)


CALLS = [(f3, good3), (b3, good3), (f4, good4), (b4, good4)]
ALL = pytest.mark.parametrize("call,good", CALLS, ids=["dcnv3", "dcnv3_backward", "dcnv4", "dcnv4_backward"])


def test_good_arguments_are_accepted():
    assert f3(good3()).shape == OUT_SHAPE and f4(good4()).shape == OUT_SHAPE
    g = b3(good3())
    assert g.input.shape == (2, 5, 4, 6) and g.offset.shape == (2, 5, 4, 36) and g.mask.shape == (2, 5, 4, 18)
    g4 = b4(good4())
    assert g4.input.shape == (2, 5, 4, 6) and g4.offset_mask.shape == (2, 5, 4, 56)
    # group_channels given, pairs as lists or tuples
    args = dict(good3(), group_channels=3, kernel_size=[3, 3], padding=(1, 1), stride=[1, 1], dilation=(1, 1))
    np.testing.assert_array_equal(f3(args), f3(good3()))


# (name, geometry change, argument named, expected pattern): errors of the shared geometry
GEOMETRY_VALUE_CASES = [
    ("input_3d", dict(input=np.zeros((2, 5, 4))), "input must have shape", r"\(N, H, W, G\*D\)"),
    ("input_zero_height", dict(input=np.zeros((2, 0, 4, 6))), "input must have shape", "H, W, G\\*D >= 1"),
    ("input_no_channels", dict(input=np.zeros((2, 5, 4, 0))), "input must have shape", "G\\*D >= 1"),
    ("group_zero", dict(group=0), "group must be >= 1", ""),
    ("group_huge", dict(group=2**31), "group must be <= 2", ""),
    ("channels_not_multiple", dict(group=4), "input channels C = 6", "multiple of group = 4"),
    ("group_channels_zero", dict(group_channels=0), "group_channels must be >= 1", ""),
    ("group_channels_mismatch", dict(group_channels=2), "input must have shape", r"group\*group_channels"),
    ("kernel_zero", dict(kernel_size=0), "kernel_size must be >= 1", ""),
    ("stride_zero", dict(stride=(1, 0)), "stride must be >= 1", ""),
    ("padding_negative", dict(padding=-1), "padding must be >= 0", ""),
    ("dilation_zero", dict(dilation=0), "dilation must be >= 1", ""),
    ("offset_scale_nan", dict(offset_scale=float("nan")), "offset_scale must be a finite", ""),
    ("offset_scale_inf", dict(offset_scale=float("inf")), "offset_scale must be a finite", ""),
    ("remove_center_even", dict(kernel_size=(3, 2), remove_center=True), "remove_center needs an odd", r"\(3, 2\)"),
    ("remove_center_1x1", dict(kernel_size=1, padding=0, remove_center=True), "kernel_size \\(1, 1\\)", "no kernel"),
    ("output_empty", dict(kernel_size=7, padding=0), "output size would be", r"\(-1, -2\)"),
]


@ALL
@pytest.mark.parametrize(
    "change,message,extra", [c[1:] for c in GEOMETRY_VALUE_CASES], ids=[c[0] for c in GEOMETRY_VALUE_CASES]
)
def test_bad_geometry_values(change, message, extra, call, good):
    args = dict(good(), **change)
    with pytest.raises(ValueError, match=f"^{message}") as info:
        call(args)
    assert re.search(extra, str(info.value)), str(info.value)


GEOMETRY_TYPE_CASES = [
    ("group_float", dict(group=2.0), "group must be an int"),
    ("group_bool", dict(group=True), "group must be an int"),
    ("group_channels_float", dict(group_channels=3.0), "group_channels must be an int or None"),
    ("kernel_triple", dict(kernel_size=(3, 3, 3)), "kernel_size must be an int or a pair of ints"),
    ("kernel_float", dict(kernel_size=3.0), "kernel_size must be an int or a pair"),
    ("stride_bool", dict(stride=True), "stride must be an int or a pair"),
    ("padding_str", dict(padding="same"), "padding must be an int or a pair"),
    ("dilation_float_pair", dict(dilation=(1, 1.5)), "dilation must be an int or a pair"),
    ("offset_scale_str", dict(offset_scale="1"), "offset_scale must be a real number"),
    ("remove_center_str", dict(remove_center="yes"), "remove_center must be a bool"),
    ("remove_center_two", dict(remove_center=2), "remove_center must be a bool"),
]


@ALL
@pytest.mark.parametrize(
    "change,message", [c[1:] for c in GEOMETRY_TYPE_CASES], ids=[c[0] for c in GEOMETRY_TYPE_CASES]
)
def test_bad_geometry_types(change, message, call, good):
    with pytest.raises(TypeError, match=f"^{message}"):
        call(dict(good(), **change))


DCNV3_SHAPE_CASES = [
    ("offset_3d", dict(offset=np.zeros((2, 5, 36))), "offset", r"\(N, H_out, W_out, G\*P\*2\) = \(2, 5, 4, 36\)"),
    ("offset_channels", dict(offset=np.zeros((2, 5, 4, 18))), "offset", r"= \(2, 5, 4, 36\), got \(2, 5, 4, 18\)"),
    ("offset_batch", dict(offset=np.zeros((1, 5, 4, 36))), "offset", r"\(2, 5, 4, 36\)"),
    ("offset_size", dict(offset=np.zeros((2, 4, 5, 36))), "offset", r"\(2, 5, 4, 36\)"),
    ("mask_channels", dict(mask=np.zeros((2, 5, 4, 36))), "mask", r"\(N, H_out, W_out, G\*P\) = \(2, 5, 4, 18\)"),
    ("mask_remove_center", dict(remove_center=True), "offset", r"\(2, 5, 4, 32\)"),  # P = 8 now
]


@pytest.mark.parametrize("call", [f3, b3], ids=["forward", "backward"])
@pytest.mark.parametrize(
    "change,named,expected", [c[1:] for c in DCNV3_SHAPE_CASES], ids=[c[0] for c in DCNV3_SHAPE_CASES]
)
def test_dcnv3_bad_shapes(change, named, expected, call):
    with pytest.raises(ValueError, match=f"^{named} must have shape") as info:
        call(dict(good3(), **change))
    assert re.search(expected, str(info.value)), str(info.value)


DCNV4_SHAPE_CASES = [
    ("offset_mask_3d", np.zeros((2, 5, 56)), r"\(N, H_out, W_out, K\)"),
    ("offset_mask_short", np.zeros((2, 5, 4, 53)), r"K >= 3\*G\*P\) = \(2, 5, 4, K >= 54\), got \(2, 5, 4, 53\)"),
    ("offset_mask_batch", np.zeros((3, 5, 4, 56)), r"\(2, 5, 4, K >= 54\)"),
    ("offset_mask_size", np.zeros((2, 5, 5, 56)), r"\(2, 5, 4, K >= 54\)"),
]


@pytest.mark.parametrize("call", [f4, b4], ids=["forward", "backward"])
@pytest.mark.parametrize("value,expected", [c[1:] for c in DCNV4_SHAPE_CASES], ids=[c[0] for c in DCNV4_SHAPE_CASES])
def test_dcnv4_bad_shapes(value, expected, call):
    with pytest.raises(ValueError, match="^offset_mask must have shape") as info:
        call(dict(good4(), offset_mask=value))
    assert re.search(expected, str(info.value)), str(info.value)


def test_dcnv4_exact_k_is_accepted():
    args = dict(good4(), offset_mask=good4()["offset_mask"][..., :54].copy())
    assert f4(args).shape == OUT_SHAPE


@pytest.mark.parametrize("call,good", [(b3, good3), (b4, good4)], ids=["dcnv3", "dcnv4"])
@pytest.mark.parametrize("shape", [(2, 5, 4), (2, 5, 4, 5), (2, 4, 5, 6), (1, 5, 4, 6)])
def test_grad_output_wrong_shape(shape, call, good):
    with pytest.raises(ValueError, match=r"^grad_output must have shape \(N, H_out, W_out, G\*D\) = \(2, 5, 4, 6\)"):
        call(good(), grad_shape=shape)


def _arrays(good):
    return [k for k, v in good().items() if isinstance(v, np.ndarray)]


@ALL
@pytest.mark.parametrize("which", [0, 1, 2])
def test_mixed_dtypes(which, call, good):
    names = _arrays(good)
    if which >= len(names):
        pytest.skip("dcnv4 has two arrays")
    args = good()
    name = names[which]
    args[name] = args[name].astype(np.float32)
    with pytest.raises(TypeError, match=f"one dtype.*{name} is float32"):
        call(args) if call in (f3, f4) else call(args, grad_dtype=np.float64)


@pytest.mark.parametrize("call,good", [(b3, good3), (b4, good4)], ids=["dcnv3", "dcnv4"])
def test_grad_output_dtype_mismatch(call, good):
    with pytest.raises(TypeError, match="grad_output is float32"):
        call(good(), grad_dtype=np.float32)


@ALL
@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.complex128])
def test_unsupported_dtype(dtype, call, good):
    """float16 is CUDA-only on these operators too; integers and complex nowhere."""
    args = good()
    for name in _arrays(good):
        args[name] = args[name].astype(dtype)
    with pytest.raises(TypeError, match=f"dtype {np.dtype(dtype)} is not supported on the numpy backend"):
        call(args) if call in (f3, f4) else call(args, grad_dtype=dtype)


@ALL
@pytest.mark.parametrize("which", [0, 1, 2])
def test_required_arrays(which, call, good):
    names = _arrays(good)
    if which >= len(names):
        pytest.skip("dcnv4 has two arrays")
    name = names[which]
    args = dict(good(), **{name: None})
    with pytest.raises(TypeError, match=name):
        call(args)
    args[name] = good()[name].tolist()
    with pytest.raises(TypeError, match=name):
        call(args)


@pytest.mark.parametrize("name", ["grad_output", "input", "offset", "mask", "offset_mask"])
def test_masked_arrays_raise_type_error(name):
    good, forward, backward = (
        (good4, da.dcnv4, da.dcnv4_backward) if name == "offset_mask" else (good3, da.dcnv3, da.dcnv3_backward)
    )
    args = good()
    check_masked_array_raises(name, args, OUT_SHAPE, forward, backward)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_arrays_compute_as_native(dtype):
    args = good3(dtype)
    want = f3(args)
    swapped = dict(args, **{k: args[k].astype(args[k].dtype.newbyteorder("S")) for k in ("input", "offset", "mask")})
    y = f3(swapped)
    assert y.dtype.isnative and y.tobytes() == want.tobytes()


def test_output_too_large_raises_value_error():
    """An output (N, H_out, W_out, G*D) beyond 2**63 - 1 bytes (a huge padding of a
    broadcast input): a ValueError before anything is allocated, and before the offsets
    are looked at."""
    x = np.broadcast_to(np.zeros(1), (1, 2**20, 2**20, 2))
    small = np.zeros((1, 1, 1, 2))
    for call in (lambda: da.dcnv3(x, small, small, 1, padding=2**30), lambda: da.dcnv4(x, small, 1, padding=2**30)):
        with pytest.raises(ValueError, match=r"gives an output \(N, H_out, W_out, G\*D\).*too large"):
            call()


def test_torch_tensors_raise_type_error():
    torch = pytest.importorskip("torch")
    args = good3()
    args["input"] = torch.from_numpy(args["input"])
    with pytest.raises(TypeError, match="deformarray.torch"):
        f3(args)
