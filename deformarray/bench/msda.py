"""Multi-scale deformable attention rows of ``deformarray bench`` (``--op msda``; also
behind ``benchmarks/bench_msda.py``).

``ms_deform_attn`` forward, and forward then ``ms_deform_attn_backward``, against what users
run without a compiled kernel: the ``grid_sample`` composition that Deformable DETR
(``ms_deform_attn_core_pytorch``), mmcv (``multi_scale_deformable_attn_pytorch``) and
transformers (``MultiScaleDeformableAttention``) ship as their pure-PyTorch path, on the same
arrays, forward under ``torch.no_grad`` and forward+backward through autograd (gradients of
value, sampling locations and attention weights: what our backward returns).

Sizes are Deformable DETR's: M=8 heads of D=32 channels, L=4 levels, P=4 points, on the
pyramid of an 800x1216 image at strides 8, 16, 32, 64 (100x152, 50x76, 25x38, 13x19;
S = 20,197 pixels). Two rows: the decoder (N=2 images, Lq=300 object queries) and the
encoder (N=1, one query per pyramid pixel: Lq = S). Inputs: value standard normal,
locations uniform in [0, 1), attention weights a softmax over L*P, grad_output standard
normal.

- CPU rows (numpy arrays): the composition on CPU torch (same thread count as Numba);
  without torch our times alone, with a note.
- GPU rows (cupy arrays): the composition on CUDA torch over the same buffers (zero-copy
  through DLPack); without CUDA torch our times alone.

Timing, meters, progress and table helpers are ``common``'s. This module is one operator
family: it provides the names of ``common.Family``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import common as C
from .common import Impl, Options, Progress, ShapeOption, Step

OP = "ms_deform_attn"
BASE_STRIDE = 8  # level l has stride 8 * 2**l: 8, 16, 32, 64 for Deformable DETR's 4 levels
FIELDS = ("N", "Lq", "M", "D", "L", "P", "H", "W")
ALL = "S"  # Lq = S: one query per pyramid pixel (the encoder's self-attention)


class MsdaShape(NamedTuple):
    n: int
    lq: int | None  # None: all pixels of the pyramid (Lq = S)
    m: int
    d: int
    levels: int
    points: int
    h: int  # image height and width: level l is ceil(H / stride_l) x ceil(W / stride_l)
    w: int

    def level_shapes(self) -> list[tuple[int, int]]:
        strides = [BASE_STRIDE << lvl for lvl in range(self.levels)]
        return [(math.ceil(self.h / s), math.ceil(self.w / s)) for s in strides]

    def pixels(self) -> int:
        return sum(h * w for h, w in self.level_shapes())

    def queries(self) -> int:
        return self.pixels() if self.lq is None else self.lq

    @property
    def variant(self) -> str:
        return "encoder" if self.lq is None else "decoder"


# Deformable DETR: 8 heads of 32 channels, 4 levels, 4 points, an 800x1216 image
DECODER = MsdaShape(2, 300, 8, 32, 4, 4, 800, 1216)
ENCODER = MsdaShape(1, None, 8, 32, 4, 4, 800, 1216)
DEFAULT_CPU_SHAPES = (DECODER, ENCODER)
DEFAULT_GPU_SHAPES = (DECODER, ENCODER, ENCODER._replace(n=4))


def parse_msda_shapes(text: str) -> list[MsdaShape]:
    """``"N,Lq,M,D,L,P,H,W;..."`` (Lq a positive integer or ``S``) -> shapes; ValueError with
    the offending item otherwise."""
    shapes = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = [p.strip() for p in item.split(",")]
        lq_all = len(parts) == len(FIELDS) and parts[1].upper() == ALL
        numbers = parts[:1] + parts[2:] if lq_all else parts
        if len(parts) != len(FIELDS) or not all(p.isdigit() for p in numbers):
            raise ValueError(
                f"expected {len(FIELDS)} positive integers {','.join(FIELDS)} (Lq may be {ALL}), got {item!r}"
            )
        values = [int(p) for p in numbers]
        if min(values) < 1:
            raise ValueError(f"every size must be at least 1, got {item!r}")
        if lq_all:
            values.insert(1, None)  # type: ignore[arg-type]
        shapes.append(MsdaShape(*values))
    if not shapes:
        raise ValueError("no shape given")
    return shapes


# ---------------------------------------------------------------------------------------
# The family's names (common.Family)
# ---------------------------------------------------------------------------------------


NAME = "msda"
OPERATORS = OP
SUMMARY = "multi-scale deformable attention"
DESCRIPTION = (
    f"{OP} (Deformable DETR's decoder and encoder sizes) against the torch grid_sample composition "
    "(Deformable DETR's ms_deform_attn_core_pytorch, when torch is importable)"
)
ROWS = "the ms_deform_attn rows"
ROW_OPS: tuple[str, ...] = (OP,)
CONTENDERS: tuple[str, ...] = ("ours", "composition")
SHAPE_OPTIONS: tuple[ShapeOption, ...] = (
    ShapeOption(
        "--msda-shapes",
        parse_msda_shapes,
        '"N,Lq,M,D,L,P,H,W;..."',
        f"{OP} sizes: N images, Lq queries (or {ALL}: one per pyramid pixel, the encoder), M heads of "
        "D channels, L levels, P points, on the pyramid of an HxW image at strides 8, 16, 32, ... "
        "(ceil(H/stride) x ceil(W/stride)) (default: 2,300,8,32,4,4,800,1216 (decoder) and "
        "1,S,8,32,4,4,800,1216 (encoder, S = 20197); on GPU also 4,S,8,32,4,4,800,1216)",
    ),
)


def settings() -> dict:
    """The fixed parameters of the rows, for the JSON report (under "msda")."""
    return {
        "msda": {
            "level_strides": f"{BASE_STRIDE} * 2**l (ceil division)",
            "sampling_locations": "uniform in [0, 1)",
            "attention_weights": "softmax over L*P of standard normal logits",
            "grad_output": "standard normal",
            "reference": "torch grid_sample composition (bilinear, zeros, align_corners=False)",
        }
    }


@dataclass
class MsdaCase:
    backend: str  # "numpy" | "cupy"
    shape: MsdaShape
    dtype: str

    def shape_dict(self) -> dict:
        s = self.shape
        return {
            "N": s.n,
            "Lq": s.queries(),
            "M": s.m,
            "D": s.d,
            "L": s.levels,
            "P": s.points,
            "H": s.h,
            "W": s.w,
            "S": s.pixels(),
            "queries": "all pixels (Lq = S)" if s.lq is None else "given",
            "levels": [list(hw) for hw in s.level_shapes()],
        }


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


class MsdaInputs(NamedTuple):
    value: Any
    sampling_locations: Any
    attention_weights: Any
    grad_output: Any

    def map(self, fn: Callable[[Any], Any]) -> MsdaInputs:
        return MsdaInputs(*(fn(a) for a in self))


def level_arrays(shape: MsdaShape) -> tuple[np.ndarray, np.ndarray]:
    """spatial_shapes ``(L, 2)`` and level_start_index ``(L,)``, int64."""
    levels = shape.level_shapes()
    spatial = np.array(levels, dtype=np.int64).reshape(len(levels), 2)
    starts = np.cumsum([0] + [h * w for h, w in levels[:-1]]).astype(np.int64)
    return spatial, starts


def make_inputs(shape: MsdaShape, dtype: str, seed: int = 0) -> MsdaInputs:
    """Random NumPy arguments of one call in ``dtype`` (drawn in float32, then cast: the same
    numbers for every dtype)."""
    rng = np.random.default_rng(seed)
    n, lq, m, d, lv, p = shape.n, shape.queries(), shape.m, shape.d, shape.levels, shape.points
    value = rng.standard_normal((n, shape.pixels(), m, d), dtype=np.float32)
    loc = rng.random((n, lq, m, lv, p, 2), dtype=np.float32)
    logits = rng.standard_normal((n, lq, m, lv * p), dtype=np.float32)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    grad_output = rng.standard_normal((n, lq, m * d), dtype=np.float32)
    arrays = (value, loc, weights.reshape(n, lq, m, lv, p), grad_output)
    return MsdaInputs(*(a.astype(dtype) for a in arrays))


# ---------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------


def ours_impl(shape: MsdaShape, a: MsdaInputs, sync: Callable[[], None], meter: Callable | None) -> Impl:
    """Our operator on whatever array type ``a`` holds; fwd+bwd = forward, then backward."""
    import deformarray as da

    spatial, starts = level_arrays(shape)

    def fwd():
        return da.ms_deform_attn(a.value, spatial, starts, a.sampling_locations, a.attention_weights)

    def fwdbwd():
        y = fwd()
        grads = da.ms_deform_attn_backward(
            a.grad_output, a.value, spatial, starts, a.sampling_locations, a.attention_weights
        )
        return y, tuple(grads)

    return Impl("ours", f"deformarray.{OP}", fwd, fwdbwd, sync, meter)


def grid_sample_composition(torch: Any, levels: list[tuple[int, int]]) -> Callable:
    """``(value, sampling_locations, attention_weights) -> (N, Lq, M*D)`` the way Deformable
    DETR's ``ms_deform_attn_core_pytorch`` (mmcv's ``multi_scale_deformable_attn_pytorch``,
    transformers' ``MultiScaleDeformableAttention``) computes it: one ``grid_sample`` per
    level on ``(N*M, D, H_l, W_l)`` at ``2*loc - 1``, stacked, weighted, summed."""
    grid_sample = torch.nn.functional.grid_sample

    def composition(value, sampling_locations, attention_weights):
        n, _, m, d = value.shape
        _, lq, _, lv, p, _ = sampling_locations.shape
        value_list = value.split([h * w for h, w in levels], dim=1)
        grids = 2 * sampling_locations - 1
        samples = []
        for lvl, (h, w) in enumerate(levels):
            # (N, H*W, M, D) -> (N*M, D, H, W)
            img = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
            # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
            grid = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
            # (N*M, D, Lq, P)
            samples.append(grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, lv * p)
        out = (torch.stack(samples, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
        return out.transpose(1, 2).contiguous()

    return composition


def composition_impl(
    shape: MsdaShape, torch: Any, t: MsdaInputs, sync: Callable[[], None] = C.noop, meter: Callable | None = None
) -> Impl:
    """The grid_sample composition on torch tensors (CPU or CUDA); autograd w.r.t. value,
    sampling locations and attention weights."""
    device = "CUDA" if t.value.is_cuda else "CPU"
    label = f"grid_sample composition (torch {torch.__version__}, {device})"
    op = grid_sample_composition(torch, shape.level_shapes())
    args = (t.value, t.sampling_locations, t.attention_weights)
    return C.torch_autograd_impl("composition", label, torch, op, args, t.grad_output, sync, meter)


def cpu_builder(torch: Any | None) -> Callable:
    """``build((shape,), inputs)``: ours and, with torch, the composition on CPU."""
    return C.composition_builder(ours_impl, composition_impl, torch)


def gpu_builder(cupy: Any, torch: Any | None) -> Callable:
    """``torch``: CUDA torch, or None (our rows alone)."""
    return C.composition_builder(ours_impl, composition_impl, torch, cupy)


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def run_case(case: MsdaCase, build: Callable, repeat: int, progress: Progress) -> dict:
    """Measure ours and the composition for one case, interleaved; ratios are ours / composition."""

    def impls() -> list[Impl]:
        return build((case.shape,), make_inputs(case.shape, case.dtype))

    return C.composition_row(OP, case, row_label, impls, repeat, progress)


def _shapes(opts: Options, defaults: tuple) -> list[MsdaShape]:
    return list(opts.shapes.get("msda_shapes") or defaults)


def cpu_steps(opts: Options, torch: Any | None, torch_reason: str, notes: list) -> list[Step]:
    if torch is None:
        notes.append(f"{torch_reason}: no grid_sample composition for the CPU {OP} rows")
    build = cpu_builder(torch)
    dtype = opts.dtype or "float32"
    cases = [MsdaCase("numpy", s, dtype) for s in _shapes(opts, DEFAULT_CPU_SHAPES)]
    return [Step("numpy", functools.partial(run_case, c, build)) for c in cases]


def gpu_steps(opts: Options, cupy: Any, torch: Any | None, tv: Any | None) -> list[Step]:
    """The composition needs CUDA torch only (not torchvision); without it, our rows alone
    (``common.gpu_references`` has said why)."""
    cuda_torch = torch if torch is not None and torch.cuda.is_available() else None
    build = gpu_builder(cupy, cuda_torch)
    dtypes = (opts.dtype,) if opts.dtype else C.DEFAULT_GPU_DTYPES
    cases = [MsdaCase("cupy", s, d) for d in dtypes for s in _shapes(opts, DEFAULT_GPU_SHAPES)]
    return [Step("cupy", functools.partial(run_case, c, build)) for c in cases]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def shape_text(row: dict) -> str:
    s = row["shape"]
    lq = f"S={s['Lq']}" if s.get("queries", "").startswith("all") else str(s["Lq"])
    return f"{s['N']},{lq},{s['M']},{s['D']},{s['L']},{s['P']},{s['H']}x{s['W']}"


def row_label(row: dict) -> str:
    return f"{row['backend']} {row['op']} ({row['variant']}) {shape_text(row)} {row['dtype']}"


def chart_label(row: dict) -> tuple[str, str]:
    return f"msda {row['variant'][:3]}", shape_text(row)


_LEAD = [("case", lambda r: r["variant"]), ("N,Lq,M,D,L,P,HxW", shape_text)]


TITLE = f"Multi-scale deformable attention ({OP}; levels at strides 8, 16, 32, ... of an HxW image)"


def format_sections(rows: list[dict], gpu_name: str | None) -> list[str]:
    """The CPU and GPU ms_deform_attn tables (lines), empty when no such row ran."""
    return C.composition_sections(rows, gpu_name, TITLE, _LEAD, "value, location and weight gradients")
