"""Every bad argument of deform_conv2d / deform_conv2d_backward gives a clear error.

ValueError for bad shapes and values (the message names the argument), TypeError for bad
types, mixed dtypes and mixed or unknown array backends.
"""

from __future__ import annotations

import numpy as np
import pytest
from checks import check_masked_array_raises

import deformarray as da


def good(n=2, c_in=4, h=6, w=7, c_out=6, k=(3, 3), g=2, groups=2, dtype=np.float64, stride=1, padding=1, dilation=1):
    """A valid set of arguments (dict), v2 with bias; 6x7 output with the defaults."""
    kh, kw = k
    rng = np.random.default_rng(0)
    sh = stride if isinstance(stride, int) else stride[0]
    sw = stride if isinstance(stride, int) else stride[1]
    ph = padding if isinstance(padding, int) else padding[0]
    pw = padding if isinstance(padding, int) else padding[1]
    dh = dilation if isinstance(dilation, int) else dilation[0]
    dw = dilation if isinstance(dilation, int) else dilation[1]
    ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return dict(
        input=rng.standard_normal((n, c_in, h, w)).astype(dtype),
        offset=rng.standard_normal((n, 2 * g * kh * kw, ho, wo)).astype(dtype),
        weight=rng.standard_normal((c_out, c_in // groups, kh, kw)).astype(dtype),
        bias=rng.standard_normal(c_out).astype(dtype),
        stride=stride,
        padding=padding,
        dilation=dilation,
        mask=rng.uniform(0, 1, (n, g * kh * kw, ho, wo)).astype(dtype),
    )


def call_forward(args):
    return da.deform_conv2d(**args)


def call_backward(args, grad_dtype=np.float64):
    """Backward with a grad_output of the default geometry's output shape (2, 6, 6, 7)."""
    return da.deform_conv2d_backward(np.ones((2, 6, 6, 7), dtype=grad_dtype), **args)


BOTH = pytest.mark.parametrize("call", [call_forward, call_backward], ids=["forward", "backward"])


def test_good_arguments_are_accepted():
    args = good()
    y = call_forward(args)
    assert y.shape == (2, 6, 6, 7)
    grads = call_backward(args)
    assert grads.input.shape == args["input"].shape


def _with(**changes):
    args = good()
    args.update(changes)
    return args


def _shape(args, name, shape):
    args[name] = np.zeros(shape, dtype=args["input"].dtype)
    return args


# (id, arguments, argument named in the message)
SHAPE_ERRORS = [
    ("input_3d", lambda: _shape(good(), "input", (4, 6, 7)), "input"),
    ("input_5d", lambda: _shape(good(), "input", (2, 4, 6, 7, 1)), "input"),
    ("weight_3d", lambda: _shape(good(), "weight", (6, 2, 3)), "weight"),
    ("offset_3d", lambda: _shape(good(), "offset", (2, 36, 42)), "offset"),
    ("offset_channels_not_multiple", lambda: _shape(good(), "offset", (2, 35, 6, 7)), "offset"),
    ("offset_channels_odd_multiple_of_k", lambda: _shape(good(), "offset", (2, 27, 6, 7)), "offset"),
    ("offset_channels_too_few", lambda: _shape(good(), "offset", (2, 0, 6, 7)), "offset"),
    ("offset_height", lambda: _shape(good(), "offset", (2, 36, 5, 7)), "offset"),
    ("offset_width", lambda: _shape(good(), "offset", (2, 36, 6, 8)), "offset"),
    ("offset_batch", lambda: _shape(good(), "offset", (3, 36, 6, 7)), "offset"),
    ("mask_channels", lambda: _shape(good(), "mask", (2, 9, 6, 7)), "mask"),
    ("mask_spatial", lambda: _shape(good(), "mask", (2, 18, 7, 6)), "mask"),
    ("mask_batch", lambda: _shape(good(), "mask", (1, 18, 6, 7)), "mask"),
    ("mask_3d", lambda: _shape(good(), "mask", (18, 6, 7)), "mask"),
    ("bias_length", lambda: _shape(good(), "bias", (5,)), "bias"),
    ("bias_2d", lambda: _shape(good(), "bias", (6, 1)), "bias"),
    ("weight_cin_not_dividing", lambda: _shape(good(), "weight", (6, 3, 3, 3)), "weight"),
    ("weight_cin_too_large", lambda: _shape(good(), "weight", (6, 8, 3, 3)), "weight"),
    ("cout_not_divisible_by_groups", lambda: _shape(good(), "weight", (5, 2, 3, 3)), "weight"),
    (
        "offset_groups_not_dividing",
        lambda: _with(
            input=np.zeros((2, 4, 6, 7)), offset=np.zeros((2, 2 * 3 * 9, 6, 7)), mask=np.zeros((2, 3 * 9, 6, 7))
        ),
        "offset",
    ),
    ("output_size_zero", lambda: good(h=2, w=7, padding=0), "output size"),
    ("output_size_negative_dilation", lambda: _with(dilation=4, padding=0), "output size"),
]


@BOTH
@pytest.mark.parametrize("make_args,named", [c[1:] for c in SHAPE_ERRORS], ids=[c[0] for c in SHAPE_ERRORS])
def test_bad_shapes_raise_value_error(make_args, named, call):
    args = make_args()
    if call is call_backward and named == "output size":
        grad_output = np.ones((2, 6, 1, 1))
        with pytest.raises(ValueError, match=named):
            da.deform_conv2d_backward(grad_output, **args)
        return
    if call is call_backward:
        grad_output = np.ones((2, 6, 6, 7), dtype=args["input"].dtype)
        with pytest.raises(ValueError, match=named) as info:
            da.deform_conv2d_backward(grad_output, **args)
    else:
        with pytest.raises(ValueError, match=named) as info:
            call(args)
    assert "shape" in str(info.value) or named == "output size"


BAD_VALUES = [
    ("padding_negative", dict(padding=-1), ValueError, "padding"),
    ("padding_pair_negative", dict(padding=(1, -2)), ValueError, "padding"),
    ("stride_zero", dict(stride=0), ValueError, "stride"),
    ("stride_negative", dict(stride=(1, -1)), ValueError, "stride"),
    ("dilation_zero", dict(dilation=0), ValueError, "dilation"),
    ("dilation_negative", dict(dilation=(-1, 1)), ValueError, "dilation"),
    ("stride_float", dict(stride=1.5), TypeError, "stride"),
    ("stride_float_integral", dict(stride=1.0), TypeError, "stride"),
    ("stride_str", dict(stride="1"), TypeError, "stride"),
    ("stride_triple", dict(stride=(1, 1, 1)), TypeError, "stride"),
    ("stride_bool", dict(stride=True), TypeError, "stride"),
    ("padding_float_pair", dict(padding=(1.0, 1)), TypeError, "padding"),
    ("dilation_none", dict(dilation=None), TypeError, "dilation"),
]


@BOTH
@pytest.mark.parametrize("change,exc,named", [c[1:] for c in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_stride_padding_dilation(change, exc, named, call):
    args = good()
    args.update(change)
    with pytest.raises(exc, match=named):
        call(args) if call is call_forward else da.deform_conv2d_backward(np.ones((2, 6, 6, 7)), **args)


def test_numpy_integer_stride_is_accepted():
    args = good()
    args.update(stride=np.int64(1), padding=(np.int32(1), 1))
    assert call_forward(args).shape == (2, 6, 6, 7)


@pytest.mark.parametrize("shape", [(2, 6, 6, 6), (2, 5, 6, 7), (1, 6, 6, 7), (2, 6, 6, 7, 1), (6, 6, 7)])
def test_grad_output_wrong_shape(shape):
    args = good()
    with pytest.raises(ValueError, match="grad_output"):
        da.deform_conv2d_backward(np.ones(shape), **args)


@BOTH
@pytest.mark.parametrize("name", ["input", "offset", "weight", "bias", "mask"])
def test_mixed_dtypes_raise_type_error(name, call):
    args = good()
    args[name] = args[name].astype(np.float32)
    with pytest.raises(TypeError, match=name):
        call(args)


def test_grad_output_dtype_mismatch_raises_type_error():
    args = good()
    with pytest.raises(TypeError, match="grad_output"):
        da.deform_conv2d_backward(np.ones((2, 6, 6, 7), dtype=np.float32), **args)


@BOTH
@pytest.mark.parametrize(
    "dtype",
    [np.float16, np.int32, np.int64, np.complex128, np.bool_],
    ids=["float16", "int32", "int64", "complex128", "bool"],
)
def test_unsupported_dtype_raises_type_error(dtype, call):
    args = good()
    for name in ("input", "offset", "weight", "bias", "mask"):
        args[name] = args[name].astype(dtype)
    with pytest.raises(TypeError, match=np.dtype(dtype).name) as info:
        call(args) if call is call_forward else call_backward(args, grad_dtype=dtype)
    assert "supported" in str(info.value)


@BOTH
@pytest.mark.parametrize("name", ["input", "offset", "weight", "bias", "mask"])
def test_list_argument_raises_type_error(name, call):
    args = good()
    args[name] = args[name].tolist()
    with pytest.raises(TypeError, match=name):
        call(args)


@BOTH
@pytest.mark.parametrize("name", ["input", "offset", "weight"])
def test_torch_tensor_raises_type_error(name, call):
    torch = pytest.importorskip("torch")
    args = good()
    args[name] = torch.from_numpy(args[name])
    with pytest.raises(TypeError, match=name) as info:
        call(args)
    assert "torch" in str(info.value)


def test_torch_tensors_everywhere_raise_type_error():
    torch = pytest.importorskip("torch")
    args = good()
    for name in ("input", "offset", "weight", "bias", "mask"):
        args[name] = torch.from_numpy(args[name])
    with pytest.raises(TypeError, match="deformarray.torch"):
        call_forward(args)


def test_scalar_input_raises_type_error():
    args = good()
    args["input"] = 3.0
    with pytest.raises(TypeError, match="input"):
        call_forward(args)


@BOTH
@pytest.mark.parametrize("name", ["input", "offset", "weight"])
def test_none_for_a_required_array_raises_type_error(name, call):
    """input, offset and weight cannot be None (bias and mask can): a TypeError naming it."""
    args = good()
    args[name] = None
    with pytest.raises(TypeError, match=name):
        call(args)


@BOTH
@pytest.mark.parametrize("name", ["offset", "weight", "bias", "mask"])
def test_mixed_backends_raise_type_error(fake_cupy, name, call):
    args = good()
    args[name] = fake_cupy.ndarray(args[name])
    with pytest.raises(TypeError, match="backend"):
        call(args)


def test_errors_leave_settings_untouched():
    """A failed call does not change the workspace bound (the context manager restores it)."""
    before = da.get_workspace_limit()
    with pytest.raises(ValueError):
        with da.workspace_limit(1024):
            call_forward(_with(padding=-1))
    assert da.get_workspace_limit() == before
    with pytest.raises(ValueError, match="workspace"):
        da.set_workspace_limit(0)
    assert da.get_workspace_limit() == before


# ---------------------------------------------------------------------------------------
# Arrays NumPy can hold that the kernels cannot: non-native byte order, masked arrays


def _swapped(a):
    """The same values in non-native byte order ('>f8' on a little-endian machine)."""
    out = a.astype(a.dtype.newbyteorder("S"))
    assert not out.dtype.isnative and np.array_equal(out, a)
    return out


@pytest.mark.parametrize("names", [["input"], ["offset"], ["weight"], ["bias"], ["mask"], ["all"]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_byte_swapped_arrays_compute_as_native(names, dtype):
    """A byte-swapped array is read as a native-order copy: the results are the native
    call's, bit for bit, in native byte order (mixing byte orders is no dtype mismatch)."""
    args = good(dtype=dtype)
    grad_output = np.random.default_rng(3).standard_normal((2, 6, 6, 7)).astype(dtype)
    expected = da.deform_conv2d(**args)
    expected_grads = da.deform_conv2d_backward(grad_output, **args)
    swap = ["input", "offset", "weight", "bias", "mask"] if names == ["all"] else names
    for name in swap:
        args[name] = _swapped(args[name])
    y = da.deform_conv2d(**args)
    assert y.dtype == np.dtype(dtype) and y.dtype.isnative
    np.testing.assert_array_equal(y, expected)
    grads = da.deform_conv2d_backward(_swapped(grad_output) if names == ["all"] else grad_output, **args)
    for field in grads._fields:
        assert getattr(grads, field).dtype.isnative
        np.testing.assert_array_equal(getattr(grads, field), getattr(expected_grads, field), err_msg=field)


def test_byte_swapped_grad_output_computes_as_native():
    args = good()
    grad_output = np.random.default_rng(3).standard_normal((2, 6, 6, 7))
    expected = da.deform_conv2d_backward(grad_output, **args)
    grads = da.deform_conv2d_backward(_swapped(grad_output), **args)
    for field in grads._fields:
        np.testing.assert_array_equal(getattr(grads, field), getattr(expected, field), err_msg=field)


@pytest.mark.parametrize("name", ["grad_output", "input", "offset", "weight", "bias", "mask"])
def test_masked_arrays_raise_type_error(name):
    """A numpy.ma.MaskedArray: TypeError naming the argument and the ways out (its mask
    would otherwise be ignored, silently)."""
    check_masked_array_raises(name, good(), (2, 6, 6, 7), da.deform_conv2d, da.deform_conv2d_backward)


# ---------------------------------------------------------------------------------------
# Integer parameters beyond what the kernels (int64 coordinates) or an array can hold

HUGE = [
    # (id, arguments of good() (the offset and mask then have the shape the call needs),
    #  arguments changed afterwards, message)
    ("stride_2**63", dict(stride=2**63), {}, r"^stride must be <= 2\*\*31 - 1"),
    ("stride_2**64", dict(stride=(1, 2**64)), {}, r"^stride must be <= 2\*\*31 - 1"),
    ("stride_2**31", dict(stride=2**31), {}, r"^stride must be <= 2\*\*31 - 1"),
    ("dilation_2**63", dict(k=(1, 1)), dict(dilation=2**63), r"^dilation must be <= 2\*\*31 - 1"),
    ("dilation_uint64", dict(k=(1, 1)), dict(dilation=(np.uint64(2**63), 1)), r"^dilation must be <= 2\*\*31 - 1"),
    ("padding_2**63", {}, dict(padding=2**63), r"^padding must be <= 2\*\*31 - 1"),
    # within range, but the output (N, C_out, H_out, W_out) could not be allocated (nor
    # could an offset of its shape): refused before the offset's shape is looked at
    ("padding_output_too_large", {}, dict(padding=2**31 - 1), r"padding \(2147483647, 2147483647\).*too large"),
    ("empty_batch_output_too_large", dict(n=0), dict(padding=2**31 - 1), r"padding.*too large"),
]


@BOTH
@pytest.mark.parametrize("shape_kwargs,change,message", [c[1:] for c in HUGE], ids=[c[0] for c in HUGE])
def test_huge_stride_padding_dilation_raise_value_error(shape_kwargs, change, message, call):
    args = good(**shape_kwargs)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        if call is call_forward:
            da.deform_conv2d(**args)
        else:
            da.deform_conv2d_backward(np.ones(args["offset"].shape[:1] + (6, 1, 1)), **args)


def test_largest_stride_computes():
    """stride 2**31 - 1 on a 6x7 input: one output pixel, that of any stride >= 7."""
    args = good(stride=2**31 - 1)
    expected = da.deform_conv2d(**dict(args, stride=7))
    np.testing.assert_array_equal(da.deform_conv2d(**args), expected)
    grad_output = np.ones(expected.shape)
    got = da.deform_conv2d_backward(grad_output, **args)
    ref = da.deform_conv2d_backward(grad_output, **dict(args, stride=7))
    for field in got._fields:
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
