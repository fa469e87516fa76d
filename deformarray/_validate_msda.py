"""Argument checking for multi-scale deformable attention (``ms_deform_attn``).

Kept apart from ``_validate`` (the convolution and RoI poolings) so each file stays one
operator family; the shared helpers come from there. Returns ``MsdaParams`` or raises a
``ValueError`` naming the argument and the expected shape, or a ``TypeError``.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._dispatch import backend_of
from ._validate import MAX_INT_PARAM, _check_ndim, _itemsize, _shape_error, check_output_size, host_values


@dataclass(frozen=True)
class MsdaParams:
    """Normalised geometry of one ``ms_deform_attn`` call.

    ``shapes[l] = (H_l, W_l)`` and ``starts[l]`` (the first row of level l in value's S
    axis) are host integers, checked to agree with each other and with S.
    """

    n: int  # batch
    s: int  # value rows: sum of H_l * W_l
    m: int  # heads
    d: int  # channels per head
    lq: int  # queries
    l: int  # noqa: E741  (levels, the papers' letter)
    p: int  # points per level
    shapes: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]

    @property
    def out_shape(self) -> tuple[int, int, int]:
        return (self.n, self.lq, self.m * self.d)


def as_integers(host: np.ndarray, name: str, typed: bool = True, shown: str | None = None) -> np.ndarray:
    """``host`` as int64, or a TypeError when it holds anything but integers (``shown`` is
    what the message says it got: its dtype unless given). Unless ``typed``, ``host`` comes
    from a sequence, whose dtype means nothing when it is empty (``np.asarray([])`` is
    float64): an empty one passes unless bool."""
    lenient = not typed and host.size == 0
    if host.dtype == np.bool_ or not (lenient or np.issubdtype(host.dtype, np.integer)):
        raise TypeError(f"{name} must hold integers, got {f'dtype {host.dtype}' if shown is None else shown}")
    return host.astype(np.int64)


def _integer_values(arr: Any, name: str, layout: str, value_backend: str) -> np.ndarray:
    """The values of an integer array argument (NumPy, CuPy on the CuPy backend, or a
    sequence) as an int64 NumPy array."""
    if isinstance(arr, np.ma.MaskedArray):
        raise TypeError(f"{name} is a numpy masked array, whose mask deformarray would ignore: pass np.asarray({name})")
    if isinstance(arr, (list, tuple)):
        try:
            host = np.asarray(arr)
        except ValueError as exc:  # ragged nesting
            raise ValueError(f"{name} must have shape {layout}, got a ragged sequence: {arr!r}") from exc
        return as_integers(host, name, typed=False)
    if arr is None:
        raise TypeError(f"{name} is required: pass an integer array of shape {layout}")
    backend = backend_of({name: arr})
    if backend != "numpy" and backend != value_backend:
        raise TypeError(f"all arrays must live on one backend, got value on {value_backend}, {name} on {backend}")
    return as_integers(host_values(arr), name)


def msda_params(
    value: Any,
    spatial_shapes: Any,
    level_start_index: Any,
    sampling_locations: Any,
    attention_weights: Any,
    backend: str = "numpy",
) -> MsdaParams:
    """Check the arguments of ``ms_deform_attn`` (see its docstring for the layouts).

    ``backend`` is the float arrays' backend: spatial_shapes and level_start_index may be
    sequences, NumPy arrays, or arrays of that backend. The float arrays are only looked at
    for their shapes (adapters pass shape-and-dtype stand-ins while tracing)."""
    n, s, m, d = _check_ndim("value", value, "(N, S, M, D)")
    if m < 1 or d < 1:
        raise _shape_error("value", "(N, S, M, D) with M, D >= 1", value.shape)

    shapes = _integer_values(spatial_shapes, "spatial_shapes", "(L, 2)", backend)
    if shapes.ndim != 2 or shapes.shape[1] != 2 or shapes.shape[0] < 1:
        raise _shape_error("spatial_shapes", "(L, 2) with L >= 1, rows (H_l, W_l)", shapes.shape)
    if shapes.min() < 1 or shapes.max() > MAX_INT_PARAM:
        raise ValueError(f"spatial_shapes must hold sizes in [1, 2**31 - 1], got {shapes.tolist()}")
    n_levels = int(shapes.shape[0])
    sizes = [int(h) * int(w) for h, w in shapes.tolist()]
    if sum(sizes) != s:
        raise ValueError(
            f"value has S = {s} rows but spatial_shapes {shapes.tolist()} sum to {sum(sizes)} "
            f"(S must be sum of H_l * W_l)"
        )
    starts = _integer_values(level_start_index, "level_start_index", "(L,)", backend)
    if starts.shape != (n_levels,):
        raise _shape_error("level_start_index", f"(L,) = ({n_levels},)", starts.shape)
    expected = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    if not np.array_equal(starts, expected):
        raise ValueError(
            f"level_start_index must be the start of each level in value's S axis, "
            f"{expected.tolist()} for spatial_shapes {shapes.tolist()}, got {starts.tolist()}"
        )

    loc_shape = _check_ndim("sampling_locations", sampling_locations, "(N, Lq, M, L, P, 2)")
    lq, n_points = loc_shape[1], loc_shape[4]
    if (loc_shape[0], loc_shape[2], loc_shape[3], loc_shape[5]) != (n, m, n_levels, 2) or n_points < 1:
        raise _shape_error(
            "sampling_locations", f"(N, Lq, M, L, P, 2) = ({n}, Lq, {m}, {n_levels}, P >= 1, 2)", loc_shape
        )
    weight_shape = _check_ndim("attention_weights", attention_weights, "(N, Lq, M, L, P)")
    if weight_shape != (n, lq, m, n_levels, n_points):
        raise _shape_error("attention_weights", f"(N, Lq, M, L, P) = {(n, lq, m, n_levels, n_points)}", weight_shape)

    out_shape = (n, lq, m * d)
    check_output_size(out_shape, "(N, Lq, M*D)", _itemsize(value), "value and sampling_locations")
    return MsdaParams(
        n=n,
        s=s,
        m=m,
        d=d,
        lq=lq,
        l=n_levels,
        p=n_points,
        shapes=tuple((int(h), int(w)) for h, w in shapes.tolist()),
        starts=tuple(int(v) for v in starts.tolist()),
    )


def check_im2col_step(im2col_step: Any) -> int:
    """mmcv's and transformers' ``im2col_step``: a positive int, accepted for their
    interfaces (the backends chunk by the workspace bound instead)."""
    if isinstance(im2col_step, (bool, np.bool_)) or not isinstance(im2col_step, numbers.Integral):
        raise TypeError(f"im2col_step must be an int, got {im2col_step!r}")
    if int(im2col_step) < 1:
        raise ValueError(f"im2col_step must be >= 1, got {im2col_step!r}")
    return int(im2col_step)
