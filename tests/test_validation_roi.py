"""Every bad argument of the RoI pooling operators gives a clear error.

ValueError for bad shapes and values (the message names the argument and, for shapes, the
expected shape), TypeError for bad types, mixed dtypes and mixed or unknown backends.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from checks import check_masked_array_raises

import deformarray as da

# ---------------------------------------------------------------------------------------
# deform_roi_pool
# ---------------------------------------------------------------------------------------


def roi_good(dtype=np.float64):
    """Valid arguments: 2 images 4x6x7, 3 RoIs, 2x3 bins, offset and mask."""
    rng = np.random.default_rng(0)
    return dict(
        input=rng.standard_normal((2, 4, 6, 7)).astype(dtype),
        rois=np.array([[0, 0, 0, 3, 4], [1, 1, 1, 5, 5], [1, 2, 0, 2, 3]], dtype=dtype),
        offset=rng.standard_normal((3, 2, 2, 3)).astype(dtype),
        output_size=(2, 3),
        spatial_scale=1.0,
        sampling_ratio=0,
        gamma=0.1,
        mask=rng.uniform(0, 1, (3, 1, 2, 3)).astype(dtype),
    )


def roi_forward(args):
    return da.deform_roi_pool(**args)


def roi_backward(args, grad_dtype=None):
    dtype = grad_dtype or getattr(args["input"], "dtype", np.float64)
    return da.deform_roi_pool_backward(np.ones((3, 4, 2, 3), dtype=dtype), **args)


ROI_BOTH = pytest.mark.parametrize("call", [roi_forward, roi_backward], ids=["forward", "backward"])


def _roi_with(**changes):
    args = roi_good()
    args.update(changes)
    return args


def test_roi_good_arguments_are_accepted():
    args = roi_good()
    assert roi_forward(args).shape == (3, 4, 2, 3)
    g = roi_backward(args)
    assert g.input.shape == (2, 4, 6, 7) and g.offset.shape == (3, 2, 2, 3)
    assert g.mask.shape == (3, 1, 2, 3)
    args = _roi_with(offset=None, mask=None, output_size=np.int64(2))
    assert roi_forward(args).shape == (3, 4, 2, 2)


ROI_SHAPES = [
    ("input_3d", dict(input=np.zeros((4, 6, 7))), "input", "(N, C, H, W)"),
    ("input_5d", dict(input=np.zeros((2, 4, 6, 7, 1))), "input", "(N, C, H, W)"),
    ("input_zero_height", dict(input=np.zeros((2, 4, 0, 7))), "input", "H, W >= 1"),
    ("rois_1d", dict(rois=np.zeros(5)), "rois", r"\(R, 5\)"),
    ("rois_4_columns", dict(rois=np.zeros((3, 4))), "rois", r"\(R, 5\)"),
    ("rois_3d", dict(rois=np.zeros((3, 5, 1))), "rois", r"\(R, 5\)"),
    ("offset_rois", dict(offset=np.zeros((2, 2, 2, 3))), "offset", r"\(R, 2, ph, pw\) = \(3, 2, 2, 3\)"),
    ("offset_channels", dict(offset=np.zeros((3, 1, 2, 3))), "offset", r"\(R, 2, ph, pw\)"),
    ("offset_bins", dict(offset=np.zeros((3, 2, 3, 2))), "offset", r"\(R, 2, ph, pw\)"),
    ("offset_3d", dict(offset=np.zeros((3, 2, 6))), "offset", r"\(R, 2, ph, pw\)"),
    ("mask_channels", dict(mask=np.zeros((3, 2, 2, 3))), "mask", r"\(R, 1, ph, pw\) = \(3, 1, 2, 3\)"),
    ("mask_rois", dict(mask=np.zeros((4, 1, 2, 3))), "mask", r"\(R, 1, ph, pw\)"),
    ("mask_3d", dict(mask=np.zeros((3, 2, 3))), "mask", r"\(R, 1, ph, pw\)"),
]


@ROI_BOTH
@pytest.mark.parametrize("change,named,expected", [c[1:] for c in ROI_SHAPES], ids=[c[0] for c in ROI_SHAPES])
def test_roi_bad_shapes(change, named, expected, call):
    with pytest.raises(ValueError, match=named) as info:
        call(_roi_with(**change))
    assert "shape" in str(info.value)
    assert re.search(expected, str(info.value)), str(info.value)


ROI_VALUES = [
    ("batch_index_negative", [[-1, 0, 0, 1, 1]], "batch"),
    ("batch_index_too_large", [[2, 0, 0, 1, 1]], r"\[0, 2\)"),
    ("batch_index_fractional", [[0.5, 0, 0, 1, 1]], "integer"),
    ("nan_coordinate", [[0, np.nan, 0, 1, 1]], "finite"),
    ("inf_coordinate", [[0, 0, 0, np.inf, 1]], "finite"),
    ("nan_batch_index", [[np.nan, 0, 0, 1, 1]], "finite"),
    ("inverted_x", [[0, 3, 0, 1, 1]], "x1 <= x2"),
    ("inverted_y", [[0, 0, 3, 1, 1]], "y1 <= y2"),
]


@ROI_BOTH
@pytest.mark.parametrize("bad_row,match", [c[1:] for c in ROI_VALUES], ids=[c[0] for c in ROI_VALUES])
def test_roi_bad_roi_values(bad_row, match, call):
    args = roi_good()
    args["rois"] = np.array([[0, 0, 0, 3, 4], [1, 1, 1, 5, 5]] + bad_row, dtype=np.float64)
    with pytest.raises(ValueError, match=match) as info:
        call(args)
    assert "rois" in str(info.value) and "row 2" in str(info.value)


def test_roi_box_of_zero_size_is_accepted():
    args = _roi_with(rois=np.array([[0, 1, 1, 1, 1], [1, 2, 2, 2, 5], [1, 0, 3, 4, 3]], float))
    y = roi_forward(args)
    assert np.isfinite(y).all()


def test_roi_too_large_for_adaptive_grid():
    """sampling_ratio 0 would take ceil(roi/ph) samples per side: capped, with a hint."""
    args = _roi_with(rois=np.array([[0, 0, 0, 1e9, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1]], float))
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_forward(args)
    args["sampling_ratio"] = 1
    assert np.isfinite(roi_forward(args)).all()


ROI_PARAMS = [
    ("output_size_zero", dict(output_size=0), ValueError, "output_size"),
    ("output_size_negative", dict(output_size=(2, -1)), ValueError, "output_size"),
    ("output_size_float", dict(output_size=2.0), TypeError, "output_size"),
    ("output_size_triple", dict(output_size=(2, 3, 1)), TypeError, "output_size"),
    ("output_size_none", dict(output_size=None), TypeError, "output_size"),
    ("sampling_ratio_negative", dict(sampling_ratio=-1), ValueError, "sampling_ratio"),
    ("sampling_ratio_float", dict(sampling_ratio=1.5), TypeError, "sampling_ratio"),
    ("sampling_ratio_bool", dict(sampling_ratio=True), TypeError, "sampling_ratio"),
    ("sampling_ratio_huge", dict(sampling_ratio=10**9), ValueError, "sampling_ratio"),
    ("spatial_scale_zero", dict(spatial_scale=0.0), ValueError, "spatial_scale"),
    ("spatial_scale_negative", dict(spatial_scale=-0.5), ValueError, "spatial_scale"),
    ("spatial_scale_nan", dict(spatial_scale=float("nan")), ValueError, "spatial_scale"),
    ("spatial_scale_str", dict(spatial_scale="1"), TypeError, "spatial_scale"),
    ("gamma_inf", dict(gamma=float("inf")), ValueError, "gamma"),
    ("gamma_none", dict(gamma=None), TypeError, "gamma"),
]


@ROI_BOTH
@pytest.mark.parametrize("change,exc,named", [c[1:] for c in ROI_PARAMS], ids=[c[0] for c in ROI_PARAMS])
def test_roi_bad_parameters(change, exc, named, call):
    args = _roi_with(**change)
    with pytest.raises(exc, match=named):
        if call is roi_backward:
            da.deform_roi_pool_backward(np.ones((3, 4, 2, 3)), **args)
        else:
            call(args)


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (3, 3, 2, 3), (2, 4, 2, 3), (3, 4, 2, 3, 1)])
def test_roi_grad_output_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"grad_output.*\(R, C, ph, pw\)"):
        da.deform_roi_pool_backward(np.ones(shape), **roi_good())


@ROI_BOTH
@pytest.mark.parametrize("name", ["input", "rois", "offset", "mask"])
def test_roi_mixed_dtypes(name, call):
    args = roi_good()
    args[name] = args[name].astype(np.float32)
    with pytest.raises(TypeError, match=name):
        call(args, np.float64) if call is roi_backward else call(args)


def test_roi_grad_output_dtype_mismatch():
    with pytest.raises(TypeError, match="grad_output"):
        roi_backward(roi_good(), np.float32)


@ROI_BOTH
@pytest.mark.parametrize("dtype", [np.float16, np.int64, np.complex128])
def test_roi_unsupported_dtype(dtype, call):
    args = roi_good()
    for name in ("input", "rois", "offset", "mask"):
        args[name] = args[name].astype(dtype)
    with pytest.raises(TypeError, match="supported"):
        call(args, dtype) if call is roi_backward else call(args)


@ROI_BOTH
@pytest.mark.parametrize("name", ["input", "rois"])
def test_roi_required_arrays(name, call):
    args = roi_good()
    args[name] = None
    with pytest.raises(TypeError, match=name):
        call(args)
    args[name] = roi_good()[name].tolist()
    with pytest.raises(TypeError, match=name):
        call(args)


# ---------------------------------------------------------------------------------------
# deform_psroi_pool
# ---------------------------------------------------------------------------------------


def ps_good(dtype=np.float64):
    """2 images of 4 * 3**2 channels, 3 RoIs, pooled 3, part 2, 2 offset classes."""
    rng = np.random.default_rng(1)
    return dict(
        input=rng.standard_normal((2, 36, 6, 7)).astype(dtype),
        rois=np.array([[0, 0, 0, 3, 4], [1, 1, 1, 5, 5], [1, 2, 0, 2, 3]], dtype=dtype),
        offset=rng.standard_normal((3, 4, 2, 2)).astype(dtype),
        output_dim=4,
        group_size=3,
        pooled_size=3,
        part_size=2,
        sample_per_part=2,
        trans_std=0.1,
        spatial_scale=0.5,
    )


def ps_forward(args):
    return da.deform_psroi_pool(**args)


def ps_backward(args, grad_dtype=None):
    dtype = grad_dtype or args["input"].dtype
    return da.deform_psroi_pool_backward(np.ones((3, 4, 3, 3), dtype=dtype), **args)


PS_BOTH = pytest.mark.parametrize("call", [ps_forward, ps_backward], ids=["forward", "backward"])


def _ps_with(**changes):
    args = ps_good()
    args.update(changes)
    return args


def test_ps_good_arguments_are_accepted():
    assert ps_forward(ps_good()).shape == (3, 4, 3, 3)
    g = ps_backward(ps_good())
    assert g.input.shape == (2, 36, 6, 7) and g.offset.shape == (3, 4, 2, 2)
    args = _ps_with(offset=None, part_size=None)
    assert ps_backward(args).offset is None


def test_ps_keywords_are_keyword_only():
    a = ps_good()
    with pytest.raises(TypeError):
        da.deform_psroi_pool(a["input"], a["rois"], a["offset"], 4, 3, 3)
    with pytest.raises(TypeError):
        da.deform_psroi_pool(a["input"], a["rois"])  # output_dim etc. are required


PS_SHAPES = [
    ("input_3d", dict(input=np.zeros((36, 6, 7))), "input", "shape"),
    ("input_channels", dict(input=np.zeros((2, 35, 6, 7))), "input", r"output_dim\*group_size\*\*2.*4\*3\*\*2 = 36"),
    ("input_zero_width", dict(input=np.zeros((2, 36, 6, 0))), "input", "H, W >= 1"),
    ("rois_4_columns", dict(rois=np.zeros((3, 4))), "rois", r"\(R, 5\)"),
    ("offset_rois", dict(offset=np.zeros((2, 4, 2, 2))), "offset", r"\(R, 2\*num_classes, part_size, part_size\)"),
    ("offset_odd_channels", dict(offset=np.zeros((3, 3, 2, 2))), "offset", "2\\*num_classes"),
    ("offset_no_channels", dict(offset=np.zeros((3, 0, 2, 2))), "offset", "2\\*num_classes"),
    ("offset_part_size", dict(offset=np.zeros((3, 4, 3, 3))), "offset", r"part_size.*= \(3, 2\*num_classes, 2, 2\)"),
    ("offset_3d", dict(offset=np.zeros((3, 4, 4))), "offset", "part_size"),
    ("offset_classes_not_dividing", dict(offset=np.zeros((3, 6, 2, 2))), "offset", "3 classes.*divide"),
]


@PS_BOTH
@pytest.mark.parametrize("change,named,expected", [c[1:] for c in PS_SHAPES], ids=[c[0] for c in PS_SHAPES])
def test_ps_bad_shapes(change, named, expected, call):
    with pytest.raises(ValueError, match=named) as info:
        call(_ps_with(**change))
    assert re.search(expected, str(info.value)), str(info.value)


PS_PARAMS = [
    ("output_dim_zero", dict(output_dim=0), ValueError, "output_dim"),
    ("output_dim_float", dict(output_dim=4.0), TypeError, "output_dim"),
    ("group_size_zero", dict(group_size=0), ValueError, "group_size"),
    ("group_size_negative", dict(group_size=-3), ValueError, "group_size"),
    ("pooled_size_zero", dict(pooled_size=0), ValueError, "pooled_size"),
    ("pooled_size_pair", dict(pooled_size=(3, 3)), TypeError, "pooled_size"),
    ("part_size_zero", dict(part_size=0), ValueError, "part_size"),
    ("sample_per_part_zero", dict(sample_per_part=0), ValueError, "sample_per_part"),
    ("sample_per_part_huge", dict(sample_per_part=10**6), ValueError, "sample_per_part"),
    ("sample_per_part_bool", dict(sample_per_part=True), TypeError, "sample_per_part"),
    ("trans_std_nan", dict(trans_std=float("nan")), ValueError, "trans_std"),
    ("trans_std_str", dict(trans_std="0.1"), TypeError, "trans_std"),
    ("spatial_scale_zero", dict(spatial_scale=0), ValueError, "spatial_scale"),
    ("spatial_scale_inf", dict(spatial_scale=float("inf")), ValueError, "spatial_scale"),
]


@PS_BOTH
@pytest.mark.parametrize("change,exc,named", [c[1:] for c in PS_PARAMS], ids=[c[0] for c in PS_PARAMS])
def test_ps_bad_parameters(change, exc, named, call):
    args = _ps_with(**change)
    with pytest.raises(exc, match=named):
        if call is ps_backward:
            da.deform_psroi_pool_backward(np.ones((3, 4, 3, 3)), **args)
        else:
            call(args)


@PS_BOTH
@pytest.mark.parametrize("bad_row,match", [c[1:] for c in ROI_VALUES], ids=[c[0] for c in ROI_VALUES])
def test_ps_bad_roi_values(bad_row, match, call):
    args = ps_good()
    args["rois"] = np.array([[0, 0, 0, 3, 4], [1, 1, 1, 5, 5]] + bad_row, dtype=np.float64)
    with pytest.raises(ValueError, match=match):
        call(args)


@pytest.mark.parametrize("shape", [(3, 4, 2, 2), (3, 3, 3, 3), (4, 4, 3, 3), (3, 4, 3)])
def test_ps_grad_output_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"grad_output.*\(R, output_dim, pooled_size, pooled_size\)"):
        da.deform_psroi_pool_backward(np.ones(shape), **ps_good())


@PS_BOTH
@pytest.mark.parametrize("name", ["input", "rois", "offset"])
def test_ps_mixed_dtypes(name, call):
    args = ps_good()
    args[name] = args[name].astype(np.float32)
    with pytest.raises(TypeError, match=name):
        call(args, np.float64) if call is ps_backward else call(args)


# ---------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rois", "offset", "mask"])
def test_roi_mixed_backends(fake_cupy, name):
    args = roi_good()
    args[name] = fake_cupy.ndarray(args[name])
    with pytest.raises(TypeError, match="backend"):
        roi_forward(args)
    with pytest.raises(TypeError, match="backend"):
        roi_backward(args)


@pytest.mark.parametrize("name", ["input", "rois", "offset"])
def test_ps_mixed_backends(fake_cupy, name):
    args = ps_good()
    args[name] = fake_cupy.ndarray(args[name])
    with pytest.raises(TypeError, match="backend"):
        ps_forward(args)


def test_torch_tensor_rois():
    torch = pytest.importorskip("torch")
    args = roi_good()
    args["rois"] = torch.from_numpy(args["rois"])
    with pytest.raises(TypeError, match="deformarray.torch"):
        roi_forward(args)


@pytest.mark.parametrize("bad_row,match", [c[1:] for c in ROI_VALUES], ids=[c[0] for c in ROI_VALUES])
def test_device_rois_are_read_on_the_host(fake_cupy, bad_row, match):
    """CuPy arrays: the RoI values are checked through one ``.get()`` copy, before any
    CUDA code is loaded (the bad value is reported, not an import error)."""
    args = {k: fake_cupy.ndarray(v) if isinstance(v, np.ndarray) else v for k, v in roi_good(np.float32).items()}
    args["rois"] = fake_cupy.ndarray(np.array([[0, 0, 0, 3, 4], [1, 1, 1, 5, 5]] + bad_row, dtype=np.float32))
    with pytest.raises(ValueError, match=match):
        roi_forward(args)
    ps = {k: fake_cupy.ndarray(v) if isinstance(v, np.ndarray) else v for k, v in ps_good(np.float32).items()}
    ps["rois"] = args["rois"]
    with pytest.raises(ValueError, match=match):
        ps_forward(ps)


# ---------------------------------------------------------------------------------------
# Arrays NumPy can hold that the kernels cannot: non-native byte order, masked arrays


def _swapped(a):
    """The same values in non-native byte order ('>f8' on a little-endian machine)."""
    out = a.astype(a.dtype.newbyteorder("S"))
    assert not out.dtype.isnative and np.array_equal(out, a)
    return out


def _assert_same(got, expected):
    if isinstance(expected, tuple):
        for field in expected._fields:
            _assert_same(getattr(got, field), getattr(expected, field))
    elif expected is not None:
        assert got.dtype.isnative
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("names", [["input"], ["rois"], ["offset"], ["mask"], ["grad_output"], ["all"]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_roi_byte_swapped_arrays_compute_as_native(names, dtype):
    """A byte-swapped array is read as a native-order copy: the native call's results, bit
    for bit, in native byte order."""
    args = roi_good(dtype)
    grad_output = np.random.default_rng(3).standard_normal((3, 4, 2, 3)).astype(dtype)
    expected = da.deform_roi_pool(**args), da.deform_roi_pool_backward(grad_output, **args)
    if "grad_output" in names or names == ["all"]:
        grad_output = _swapped(grad_output)
    for name in ["input", "rois", "offset", "mask"] if names == ["all"] else names:
        if name != "grad_output":
            args[name] = _swapped(args[name])
    _assert_same(da.deform_roi_pool(**args), expected[0])
    _assert_same(da.deform_roi_pool_backward(grad_output, **args), expected[1])


@pytest.mark.parametrize("names", [["input"], ["rois"], ["offset"], ["grad_output"], ["all"]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ps_byte_swapped_arrays_compute_as_native(names, dtype):
    args = ps_good(dtype)
    grad_output = np.random.default_rng(3).standard_normal((3, 4, 3, 3)).astype(dtype)
    expected = da.deform_psroi_pool(**args), da.deform_psroi_pool_backward(grad_output, **args)
    if "grad_output" in names or names == ["all"]:
        grad_output = _swapped(grad_output)
    for name in ["input", "rois", "offset"] if names == ["all"] else names:
        if name != "grad_output":
            args[name] = _swapped(args[name])
    _assert_same(da.deform_psroi_pool(**args), expected[0])
    _assert_same(da.deform_psroi_pool_backward(grad_output, **args), expected[1])


MASKED_CASES = [
    ("roi", name, roi_good, (3, 4, 2, 3), da.deform_roi_pool, da.deform_roi_pool_backward)
    for name in ("grad_output", "input", "rois", "offset", "mask")
] + [
    ("ps", name, ps_good, (3, 4, 3, 3), da.deform_psroi_pool, da.deform_psroi_pool_backward)
    for name in ("grad_output", "input", "rois", "offset")
]


@pytest.mark.parametrize(
    "op, name, good, out_shape, forward, backward", MASKED_CASES, ids=[f"{c[0]}-{c[1]}" for c in MASKED_CASES]
)
def test_masked_arrays_raise_type_error(op, name, good, out_shape, forward, backward):
    """numpy.ma.MaskedArray: TypeError naming the argument and the ways out (its mask would
    otherwise be ignored, silently)."""
    args = good()
    check_masked_array_raises(name, args, out_shape, forward, backward)


# ---------------------------------------------------------------------------------------
# Integer parameters beyond what the kernels or an array can hold

ROI_HUGE = [
    ("output_size_2**40", dict(output_size=2**40), r"^output_size must be <= 2\*\*31 - 1"),
    ("output_size_2**63", dict(output_size=(2, 2**63)), r"^output_size must be <= 2\*\*31 - 1"),
    ("output_size_2**31", dict(output_size=(2**31, 1)), r"^output_size must be <= 2\*\*31 - 1"),
    (
        "output_too_large",
        dict(output_size=(2**31 - 1, 2**31 - 1)),
        r"^output_size = \(2147483647, 2147483647\) gives an output \(R, C, ph, pw\).*too large",
    ),
    (
        "output_too_large_no_rois",
        dict(output_size=2**31 - 1, rois=np.zeros((0, 5))),
        r"^output_size = 2147483647 gives an output \(R, C, ph, pw\) = \(0, 4,.*too large",
    ),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in ROI_HUGE], ids=[c[0] for c in ROI_HUGE])
def test_roi_huge_output_size_raises_value_error(change, message):
    args = _roi_with(offset=None, mask=None, **change)
    with pytest.raises(ValueError, match=message):
        da.deform_roi_pool(**args)
    with pytest.raises(ValueError, match=message):
        da.deform_roi_pool_backward(np.ones((args["rois"].shape[0], 4, 1, 1)), **args)


PS_HUGE = [
    ("pooled_size_2**31", dict(pooled_size=2**31), r"^pooled_size must be <= 2\*\*31 - 1"),
    ("pooled_size_2**63", dict(pooled_size=2**63), r"^pooled_size must be <= 2\*\*31 - 1"),
    ("part_size_2**63", dict(part_size=2**63), r"^part_size must be <= 2\*\*31 - 1"),
    ("group_size_2**63", dict(group_size=2**63), r"^group_size must be <= 2\*\*31 - 1"),
    ("output_dim_2**64", dict(output_dim=2**64), r"^output_dim must be <= 2\*\*31 - 1"),
    (
        "output_too_large",
        dict(pooled_size=2**31 - 1),
        r"^pooled_size = 2147483647 gives an output \(R, output_dim, pooled_size, pooled_size\).*too large",
    ),
    ("output_too_large_no_rois", dict(pooled_size=2**31 - 1, rois=np.zeros((0, 5))), r"^pooled_size.*too large"),
]


@pytest.mark.parametrize("change,message", [c[1:] for c in PS_HUGE], ids=[c[0] for c in PS_HUGE])
def test_ps_huge_sizes_raise_value_error(change, message):
    args = _ps_with(offset=None, **change)
    with pytest.raises(ValueError, match=message):
        da.deform_psroi_pool(**args)
    with pytest.raises(ValueError, match=message):
        da.deform_psroi_pool_backward(np.ones((args["rois"].shape[0], 4, 1, 1)), **args)


def test_largest_output_size_that_fits_computes():
    """Large but allocatable pooled grids still work: (1, 2**16) bins."""
    args = _roi_with(offset=None, mask=None, output_size=(1, 2**16), sampling_ratio=1)
    y = da.deform_roi_pool(**args)
    assert y.shape == (3, 4, 1, 2**16) and np.isfinite(y).all()
