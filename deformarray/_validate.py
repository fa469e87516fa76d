"""All argument checking lives here: shapes, pairs, groups and dtypes.

Each public function calls one checker, which returns normalised parameters or raises
``ValueError`` (bad shape or value, naming the argument and the expected shape) or
``TypeError`` (bad type or mixed dtypes). Backends trust what comes out of here.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

# Element types each backend computes in. Half types exist only on CUDA, where they
# accumulate in float32.
CPU_DTYPES = ("float32", "float64")
CUDA_DTYPES = ("float16", "bfloat16", "float32", "float64")

# Integer parameters (stride, padding, dilation, output_size, pooled_size, group_size, ...)
# are at most this. The kernels compute coordinates and indices from them in int64 and
# float64, exact only well below 2**53; no real geometry comes near the bound.
MAX_INT_PARAM = 2**31 - 1
# The largest array NumPy (and CuPy) can describe, in bytes: an output beyond it is refused
# before anything is allocated, naming the argument that makes it so large.
MAX_ARRAY_BYTES = int(np.iinfo(np.intp).max)


def native_arrays(**arrays: Any) -> tuple[Any, ...]:
    """The given arguments, in order, ready for the backends.

    A NumPy array in non-native byte order (``'>f4'`` on a little-endian machine) becomes a
    native-order copy, so it computes what the same values in native order do (and the
    results are native). A ``numpy.ma.MaskedArray`` is refused with a ``TypeError``: the
    operators have no notion of masked elements, and ignoring the mask would be silently
    wrong. Anything else (``None``, CuPy arrays, wrong types) passes through unchanged,
    for the checks that follow.
    """
    out = []
    for name, arr in arrays.items():
        if isinstance(arr, np.ma.MaskedArray):
            raise TypeError(
                f"{name} is a numpy masked array (numpy.ma.MaskedArray), whose mask deformarray "
                f"would ignore: pass {name}.filled(0) (masked elements as 0) or np.asarray({name}) "
                f"(the data under the mask)"
            )
        if isinstance(arr, np.ndarray) and not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        out.append(arr)
    return tuple(out)


def check_int_range(value: int, name: str, shown: Any = None, maximum: int = MAX_INT_PARAM) -> None:
    """An integer parameter must be at most ``maximum`` (``MAX_INT_PARAM`` unless given);
    ``shown`` is the argument as the caller passed it, for the message."""
    if value > maximum:
        bound = f"2**31 - 1 = {maximum}" if maximum == MAX_INT_PARAM else str(maximum)
        raise ValueError(f"{name} must be <= {bound}, got {value if shown is None else shown!r}")


def _itemsize(arr: Any) -> int:
    """Bytes per element of a NumPy/CuPy array (or a torch tensor while tracing)."""
    return int(getattr(arr.dtype, "itemsize", 8))


def check_output_size(shape: tuple[int, ...], layout: str, itemsize: int, cause: str) -> None:
    """The output must fit in one array (``MAX_ARRAY_BYTES``), counting at least one image or
    RoI, so that an empty batch is refused too (the backends size buffers from the other
    dimensions). ``cause`` names the arguments that make it so large."""
    elements = 1
    for d in shape:
        elements *= max(int(d), 1)
    if elements * itemsize > MAX_ARRAY_BYTES:
        raise ValueError(
            f"{cause} gives an output {layout} = {tuple(shape)} too large for an array: "
            f"{elements} elements of {itemsize} bytes{' (sizes of 0 counted as 1)' if 0 in shape else ''}, "
            f"more than 2**63 - 1 bytes"
        )


def _pair(value: Any, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a pair, each at least ``minimum``."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, numbers.Integral):
        pair = (int(value), int(value))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_)) for v in value)
    ):
        pair = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    check_int_range(max(pair), name, value)
    return pair


def _shape_error(name: str, expected: str, got: tuple[int, ...]) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(got)}")


def check_shape(name: str, arr: Any, expected: tuple[int, ...], layout: str) -> None:
    """``arr`` must have exactly the shape ``expected`` (``layout`` names its axes)."""
    if tuple(int(s) for s in arr.shape) != tuple(expected):
        raise _shape_error(name, f"{layout} = {tuple(expected)}", arr.shape)


def _check_ndim(name: str, arr: Any, layout: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in arr.shape)
    if len(shape) != layout.count(",") + 1:
        raise _shape_error(name, layout, shape)
    return shape


def check_dtypes(backend: str, **arrays: Any) -> np.dtype:
    """All given arrays (``None`` skipped) share one floating dtype the backend supports."""
    present = {k: v for k, v in arrays.items() if v is not None}
    dtypes = {k: np.dtype(v.dtype) for k, v in present.items()}
    first_name, first = next(iter(dtypes.items()))
    for name, dt in dtypes.items():
        if dt != first:
            raise TypeError(f"all arrays must share one dtype: {first_name} is {first}, {name} is {dt}")
    allowed = CPU_DTYPES if backend == "numpy" else CUDA_DTYPES
    if first.name not in allowed:
        raise TypeError(f"dtype {first} is not supported on the {backend} backend (supported: {', '.join(allowed)})")
    return first


def sliding_output_size(size: Any, kernel: Any, stride: Any, padding: Any, dilation: Any) -> Any:
    """Output length of a sliding window along one axis (the convolution formula); plain
    arithmetic, so that the adapters' fake kernels can apply it to symbolic sizes."""
    return (size + 2 * padding - (dilation * (kernel - 1) + 1)) // stride + 1


def _window(h: int, w: int, kh: int, kw: int, stride: Any, padding: Any, dilation: Any) -> dict:
    """The checked sliding-window geometry of deform_conv2d, dcnv3 and dcnv4, as the
    ``ConvParams`` / ``DcnParams`` fields it fills: ``stride`` etc. are normalised pairs."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    h_out = sliding_output_size(h, kh, sh, ph, dh)
    w_out = sliding_output_size(w, kw, sw, pw, dw)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"output size would be ({h_out}, {w_out}) for input ({h}, {w}), kernel ({kh}, {kw}), "
            f"stride ({sh}, {sw}), padding ({ph}, {pw}), dilation ({dh}, {dw}); it must be positive"
        )
    return dict(kh=kh, kw=kw, stride=stride, padding=padding, dilation=dilation, h_out=h_out, w_out=w_out)


def _window_text(h: int, w: int, window: dict) -> str:
    """The window's sizes for a message: input, kernel, stride and padding."""
    (sh, sw), (ph, pw) = window["stride"], window["padding"]
    return f"input ({h}, {w}) with kernel ({window['kh']}, {window['kw']}), stride ({sh}, {sw}), padding ({ph}, {pw})"


def _window_pairs(stride: Any, padding: Any, dilation: Any) -> tuple[tuple[int, int], ...]:
    return _pair(stride, "stride", 1), _pair(padding, "padding", 0), _pair(dilation, "dilation", 1)


@dataclass(frozen=True)
class ConvParams:
    """Normalised geometry of one deformable convolution call."""

    n: int
    c_in: int
    h: int
    w: int
    c_out: int
    kh: int
    kw: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    offset_groups: int
    h_out: int
    w_out: int
    has_bias: bool
    has_mask: bool

    @property
    def k(self) -> int:
        """Kernel points per offset group (kh * kw)."""
        return self.kh * self.kw

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c_out, self.h_out, self.w_out)


def conv_params(
    input: Any,
    offset: Any,
    weight: Any,
    bias: Any,
    stride: Any,
    padding: Any,
    dilation: Any,
    mask: Any,
) -> ConvParams:
    """Check the arguments of ``deform_conv2d`` and return its normalised geometry."""
    n, c_in, h, w = _check_ndim("input", input, "(N, C_in, H, W)")
    c_out, c_per_group, kh, kw = _check_ndim("weight", weight, "(C_out, C_in // groups, kh, kw)")
    stride, padding, dilation = _window_pairs(stride, padding, dilation)
    if kh < 1 or kw < 1:
        raise _shape_error("weight", "(C_out, C_in // groups, kh, kw) with kh, kw >= 1", weight.shape)
    if c_per_group < 1 or c_in % c_per_group:
        raise ValueError(
            f"weight.shape[1] = {c_per_group} must divide input channels C_in = {c_in} "
            f"(weight must have shape (C_out, C_in // groups, kh, kw))"
        )
    groups = c_in // c_per_group
    if c_out < 1 or c_out % groups:
        raise ValueError(f"weight.shape[0] = C_out = {c_out} must be a positive multiple of groups = {groups}")
    window = _window(h, w, kh, kw, stride, padding, dilation)
    h_out, w_out = window["h_out"], window["w_out"]
    check_output_size(
        (n, c_out, h_out, w_out),
        "(N, C_out, H_out, W_out)",
        _itemsize(input),
        f"{_window_text(h, w, window)}, dilation ({dilation[0]}, {dilation[1]}) and C_out = {c_out}",
    )
    k = kh * kw
    on, oc, oh, ow = _check_ndim("offset", offset, "(N, 2*G*kh*kw, H_out, W_out)")
    expected_offset = f"(N, 2*G*kh*kw, H_out, W_out) = ({n}, 2*G*{k}, {h_out}, {w_out})"
    if on != n or oh != h_out or ow != w_out or oc < 2 * k or oc % (2 * k):
        raise _shape_error("offset", expected_offset, offset.shape)
    offset_groups = oc // (2 * k)
    if c_in % offset_groups:
        raise ValueError(
            f"offset groups G = offset.shape[1] // (2*kh*kw) = {offset_groups} must divide input channels C_in = {c_in}"
        )
    if bias is not None:
        check_shape("bias", bias, (c_out,), "(C_out,)")
    if mask is not None:
        check_shape("mask", mask, (n, offset_groups * k, h_out, w_out), "(N, G*kh*kw, H_out, W_out)")
    return ConvParams(
        **window,
        n=n,
        c_in=c_in,
        h=h,
        w=w,
        c_out=c_out,
        groups=groups,
        offset_groups=offset_groups,
        has_bias=bias is not None,
        has_mask=mask is not None,
    )


def check_grad_output(grad_output: Any, expected: tuple[int, ...], layout: str) -> None:
    """``grad_output`` must have the forward output's shape."""
    check_shape("grad_output", grad_output, expected, layout)


def check_plane_size(p: ConvParams) -> None:
    """The CPU backend indexes one image plane with int32 (half the plan's memory traffic)."""
    if p.h * p.w >= 2**31:
        raise ValueError(f"input plane H*W = {p.h}*{p.w} must be below 2**31 elements on the CPU backend")


@dataclass(frozen=True)
class RoiPoolParams:
    """Normalised geometry of one ``deform_roi_pool`` call (mmcv DeformRoIPool numbers)."""

    n: int
    c: int
    h: int
    w: int
    r: int  # number of RoIs
    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int  # > 0: samples per bin side; 0: ceil(roi_size / pooled_size)
    gamma: float
    has_offset: bool
    has_mask: bool

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.r, self.c, self.pooled_h, self.pooled_w)


@dataclass(frozen=True)
class PSRoiPoolParams:
    """Normalised geometry of one ``deform_psroi_pool`` call (MXNet DeformablePSROIPooling)."""

    n: int
    c: int  # = output_dim * group_size**2
    h: int
    w: int
    r: int  # number of RoIs
    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    trans_std: float
    spatial_scale: float
    num_classes: int  # offset.shape[1] // 2 (1 when there is no offset)
    has_offset: bool

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.r, self.output_dim, self.pooled_size, self.pooled_size)


# ---------------------------------------------------------------------------------------
# RoI pooling: deform_roi_pool (mmcv DeformRoIPool) and deform_psroi_pool (MXNet)
# ---------------------------------------------------------------------------------------

# Samples along one side of a bin, at most: keeps gy*gx (and sample_per_part**2) below
# 2**30, so no backend's int32 sample counter overflows and no call loops for hours.
MAX_SAMPLES_PER_SIDE = 1 << 15


def _positive_int(value: Any, name: str, minimum: int = 1, maximum: int = MAX_INT_PARAM) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    check_int_range(int(value), name, value, maximum)
    return int(value)


def _finite_real(value: Any, name: str, positive: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not np.isfinite(out) or (positive and out <= 0.0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value!r}")
    return out


def host_values(arr: Any) -> np.ndarray:
    """The values of a NumPy or CuPy array as a NumPy array (CuPy: one device->host copy
    through ``arr.get()``, so CuPy is never imported here)."""
    if isinstance(arr, np.ndarray):
        return arr
    get = getattr(arr, "get", None)
    if get is None:
        raise TypeError(f"cannot read the values of a {type(arr).__module__}.{type(arr).__qualname__}")
    return np.asarray(get())


def _check_feature_map(input: Any) -> tuple[int, int, int, int]:
    n, c, h, w = _check_ndim("input", input, "(N, C, H, W)")
    if h < 1 or w < 1:
        raise _shape_error("input", "(N, C, H, W) with H, W >= 1", input.shape)
    return n, c, h, w


def _check_rois(rois: Any, n: int) -> tuple[int, np.ndarray]:
    """rois must be (R, 5) rows [batch_index, x1, y1, x2, y2]: finite, batch index an
    integer in [0, N), x1 <= x2 and y1 <= y2. Returns R and the values as float64."""
    shape = tuple(int(s) for s in rois.shape)
    if len(shape) != 2 or shape[1] != 5:
        raise _shape_error("rois", "(R, 5) with rows [batch_index, x1, y1, x2, y2]", shape)
    r = shape[0]
    vals = host_values(rois).astype(np.float64, copy=False)
    if r == 0:
        return 0, vals
    bad = ~np.isfinite(vals).all(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"rois must be finite: row {i} is {vals[i].tolist()}")
    b = vals[:, 0]
    bad = (b != np.floor(b)) | (b < 0) | (b >= n)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"rois[:, 0] must hold integer batch indices in [0, N) = [0, {n}): row {i} has {b[i]!r}")
    bad = (vals[:, 3] < vals[:, 1]) | (vals[:, 4] < vals[:, 2])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"rois rows must have x1 <= x2 and y1 <= y2 ([batch_index, x1, y1, x2, y2]): row {i} is {vals[i].tolist()}"
        )
    return r, vals


def roi_pool_params(
    input: Any,
    rois: Any,
    offset: Any,
    mask: Any,
    output_size: Any,
    spatial_scale: Any,
    sampling_ratio: Any,
    gamma: Any,
) -> RoiPoolParams:
    """Check the arguments of ``deform_roi_pool`` and return its normalised geometry."""
    n, c, h, w = _check_feature_map(input)
    ph, pw = _pair(output_size, "output_size", 1)
    scale = _finite_real(spatial_scale, "spatial_scale", positive=True)
    ratio = _positive_int(sampling_ratio, "sampling_ratio", minimum=0, maximum=MAX_SAMPLES_PER_SIDE)
    gamma_f = _finite_real(gamma, "gamma")
    r, vals = _check_rois(rois, n)
    check_output_size((r, c, ph, pw), "(R, C, ph, pw)", _itemsize(input), f"output_size = {output_size!r}")
    if ratio == 0 and r > 0:
        # adaptive grid: ceil(roi_size / pooled_size) samples per bin side
        roi_w = (vals[:, 3] * scale - 0.5) - (vals[:, 1] * scale - 0.5)
        roi_h = (vals[:, 4] * scale - 0.5) - (vals[:, 2] * scale - 0.5)
        side = np.maximum(np.ceil(roi_h / ph), np.ceil(roi_w / pw))
        if side.max() > MAX_SAMPLES_PER_SIDE:
            i = int(np.argmax(side))
            raise ValueError(
                f"rois row {i} ({vals[i].tolist()}) is too large for sampling_ratio=0: it would "
                f"take {int(side[i])} samples per bin side (at most {MAX_SAMPLES_PER_SIDE}); "
                f"pass a sampling_ratio > 0"
            )
    if offset is not None:
        check_shape("offset", offset, (r, 2, ph, pw), "(R, 2, ph, pw)")
    if mask is not None:
        check_shape("mask", mask, (r, 1, ph, pw), "(R, 1, ph, pw)")
    return RoiPoolParams(
        n=n,
        c=c,
        h=h,
        w=w,
        r=r,
        pooled_h=ph,
        pooled_w=pw,
        spatial_scale=scale,
        sampling_ratio=ratio,
        gamma=gamma_f,
        has_offset=offset is not None,
        has_mask=mask is not None,
    )


# psroi_pool_params's arguments after the arrays, as the array API names them: the
# adapters pass their values on by these names
PSROI_POOL_ARGS = (
    "output_dim",
    "group_size",
    "pooled_size",
    "part_size",
    "sample_per_part",
    "trans_std",
    "spatial_scale",
)


def psroi_pool_params(
    input: Any,
    rois: Any,
    offset: Any,
    output_dim: Any,
    group_size: Any,
    pooled_size: Any,
    part_size: Any,
    sample_per_part: Any,
    trans_std: Any,
    spatial_scale: Any,
) -> PSRoiPoolParams:
    """Check the arguments of ``deform_psroi_pool`` and return its normalised geometry."""
    n, c, h, w = _check_feature_map(input)
    out_dim = _positive_int(output_dim, "output_dim")
    gs = _positive_int(group_size, "group_size")
    ps = _positive_int(pooled_size, "pooled_size")
    part = ps if part_size is None else _positive_int(part_size, "part_size")
    spp = _positive_int(sample_per_part, "sample_per_part", maximum=MAX_SAMPLES_PER_SIDE)
    std = _finite_real(trans_std, "trans_std")
    scale = _finite_real(spatial_scale, "spatial_scale", positive=True)
    if c != out_dim * gs * gs:
        raise ValueError(
            f"input must have shape (N, output_dim*group_size**2, H, W) = "
            f"({n}, {out_dim}*{gs}**2 = {out_dim * gs * gs}, {h}, {w}), got {tuple(input.shape)}"
        )
    r, _ = _check_rois(rois, n)
    check_output_size(
        (r, out_dim, ps, ps), "(R, output_dim, pooled_size, pooled_size)", _itemsize(input), f"pooled_size = {ps}"
    )
    num_classes = 1
    if offset is not None:
        shape = tuple(int(s) for s in offset.shape)
        layout = f"(R, 2*num_classes, part_size, part_size) = ({r}, 2*num_classes, {part}, {part})"
        if len(shape) != 4 or shape[0] != r or shape[1] < 2 or shape[1] % 2 or shape[2] != part or shape[3] != part:
            raise _shape_error("offset", layout, shape)
        num_classes = shape[1] // 2
        if out_dim % num_classes:
            raise ValueError(
                f"offset has {num_classes} classes (offset.shape[1] // 2), which must divide "
                f"output_dim = {out_dim}; offset must have shape {layout}"
            )
    return PSRoiPoolParams(
        n=n,
        c=c,
        h=h,
        w=w,
        r=r,
        output_dim=out_dim,
        group_size=gs,
        pooled_size=ps,
        part_size=part,
        sample_per_part=spp,
        trans_std=std,
        spatial_scale=scale,
        num_classes=num_classes,
        has_offset=offset is not None,
    )
