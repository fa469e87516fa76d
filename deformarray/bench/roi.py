"""RoI pooling rows of ``deformarray bench`` (``--op roi``) and ``benchmarks/bench_roi_pool.py``.

Each row times one of our RoI operators, forward and forward+backward, in one variant:

- ``deform_roi_pool``: 7x7 bins, spatial_scale 1/16, sampling_ratio 0 (mmcv's default:
  ceil(roi_size / 7) samples per bin side), gamma 0.1; with offset, and with offset + mask.
  Default: 512 RoIs over 2 images of C=256, 64x64 (RoIs of 32-512 image pixels, so 2-32
  feature pixels).
- ``deform_psroi_pool``: output_dim K classes, group_size = pooled_size 7 (C = K*49 score
  maps), sample_per_part 4, trans_std 0.1, spatial_scale 1/16; with class-specific offsets
  (2*K channels) and without. Default: 300 RoIs, K = 21, 2 images of 64x64.

The non-deformable floor is torchvision's ``roi_align(aligned=True)`` (the sampling of
``deform_roi_pool`` with zero offsets) and ``ps_roi_align`` on the same arrays (zero-copy
through DLPack on the GPU), measured once per shape and shared by that shape's variant
rows. The timing, memory meters, progress and table helpers are ``common``'s: a row here is
built from ``Impl`` contenders and measured by ``common.measure_all`` like a convolution row.
This module is one operator family (both RoI poolings): it provides the names of
``common.Family``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import common as C
from .common import Impl, Options, Progress, ShapeOption, Step

ROI_POOL, PSROI_POOL = "deform_roi_pool", "deform_psroi_pool"
POOLED = 7  # bins per side (and group_size of the position-sensitive pooling)
SPATIAL_SCALE = 1.0 / 16
SAMPLING_RATIO = 0  # deform_roi_pool / roi_align: ceil(roi_size / 7) samples per bin side
GAMMA = 0.1
SAMPLE_PER_PART = 4  # deform_psroi_pool / ps_roi_align's sampling_ratio
TRANS_STD = 0.1
ROI_SIDE = (32.0, 512.0)  # RoI sides in image pixels (clipped to the image)

VARIANTS = {ROI_POOL: ("offset", "offset+mask"), PSROI_POOL: ("class offsets", "no offset")}

# (N, C, H, W, R) for deform_roi_pool; (N, K classes, H, W, R) for deform_psroi_pool
DEFAULT_CPU_SHAPES = {ROI_POOL: ((2, 256, 64, 64, 512),), PSROI_POOL: ((2, 21, 64, 64, 300),)}
# GPU: the CPU sizes (launch-bound), plus a detection batch (COCO's 80 classes + background)
DEFAULT_GPU_SHAPES = {
    ROI_POOL: ((2, 256, 64, 64, 512), (8, 256, 100, 152, 4096)),
    PSROI_POOL: ((2, 21, 64, 64, 300), (8, 81, 64, 64, 2400)),
}


class RoiShape(NamedTuple):
    n: int
    c: int  # channels (deform_roi_pool) or classes K (deform_psroi_pool: C = K * 49)
    h: int
    w: int
    r: int


def parse_roi_shapes(text: str) -> list[RoiShape]:
    return [RoiShape(*s) for s in C.parse_sizes(text, ("N", "C", "H", "W", "R"))]


def parse_psroi_shapes(text: str) -> list[RoiShape]:
    return [RoiShape(*s) for s in C.parse_sizes(text, ("N", "K", "H", "W", "R"))]


# ---------------------------------------------------------------------------------------
# The family's names (common.Family)
# ---------------------------------------------------------------------------------------


NAME = "roi"
OPERATORS = f"{ROI_POOL} and {PSROI_POOL}"
SUMMARY = "the RoI pooling operators"
DESCRIPTION = (
    f"{ROI_POOL} and {PSROI_POOL} ({POOLED}x{POOLED} bins, spatial_scale 1/{round(1 / SPATIAL_SCALE)}) "
    "against torchvision's roi_align / ps_roi_align of the same sizes (when torchvision is importable)"
)
ROWS = "the RoI rows"
ROW_OPS: tuple[str, ...] = (ROI_POOL, PSROI_POOL)
CONTENDERS: tuple[str, ...] = ("ours", "torchvision")
SHAPE_OPTIONS: tuple[ShapeOption, ...] = (
    ShapeOption(
        "--roi-shapes",
        parse_roi_shapes,
        '"N,C,H,W,R;..."',
        f"{ROI_POOL} sizes: N images of C channels, HxW, R RoIs "
        "(default: 2,256,64,64,512; on GPU also 8,256,100,152,4096)",
    ),
    ShapeOption(
        "--psroi-shapes",
        parse_psroi_shapes,
        '"N,K,H,W,R;..."',
        f"{PSROI_POOL} sizes: N images of K*{POOLED * POOLED} score maps (K classes), HxW, R RoIs "
        "(default: 2,21,64,64,300; on GPU also 8,81,64,64,2400)",
    ),
)


@dataclass
class RoiCase:
    backend: str  # "numpy" | "cupy"
    op: str  # ROI_POOL | PSROI_POOL
    variant: str
    shape: RoiShape
    dtype: str

    def shape_dict(self) -> dict:
        n, c, h, w, r = self.shape
        if self.op == PSROI_POOL:
            return {"N": n, "K": c, "C": c * POOLED * POOLED, "H": h, "W": w, "R": r}
        return {"N": n, "C": c, "H": h, "W": w, "R": r}


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


class RoiInputs(NamedTuple):
    input: Any
    rois: Any
    offset: Any  # None: the variant has no offset
    mask: Any  # None: the variant has no mask
    grad_output: Any

    def map(self, fn: Callable[[Any], Any]) -> RoiInputs:
        return RoiInputs(*(None if a is None else fn(a) for a in self))


def make_rois(rng: np.random.Generator, r: int, n: int, h: int, w: int) -> np.ndarray:
    """``r`` boxes ``[batch_index, x1, y1, x2, y2]`` in image coordinates, sides uniform in
    ROI_SIDE (clipped to the image, which is the feature map over SPATIAL_SCALE)."""
    img_h, img_w = h / SPATIAL_SCALE, w / SPATIAL_SCALE

    def sides(limit):
        hi = min(ROI_SIDE[1], limit)
        return rng.uniform(min(ROI_SIDE[0], hi / 2), hi, r)

    bw, bh = sides(img_w), sides(img_h)
    x1, y1 = rng.uniform(0, img_w - bw), rng.uniform(0, img_h - bh)
    return np.stack([rng.integers(0, n, r).astype(np.float64), x1, y1, x1 + bw, y1 + bh], axis=1)


def make_inputs(case: RoiCase, seed: int = 0) -> RoiInputs:
    """Random NumPy arguments of one call in ``case.dtype``: the same numbers for every
    variant of a shape (same seed), so the rows of one shape share one torchvision floor."""
    rng = np.random.default_rng(seed)
    n, c, h, w, r = case.shape
    p = POOLED

    def normal(*dims, scale=1.0):
        return (rng.standard_normal(dims, dtype=np.float32) * scale).astype(case.dtype)

    rois = make_rois(rng, r, n, h, w).astype(case.dtype)
    if case.op == ROI_POOL:
        x = normal(n, c, h, w)
        offset = normal(r, 2, p, p, scale=0.5)
        mask = rng.uniform(0.0, 1.0, (r, 1, p, p)).astype(case.dtype)
        go = normal(r, c, p, p)
        return RoiInputs(x, rois, offset, mask if case.variant == "offset+mask" else None, go)
    x = normal(n, c * p * p, h, w)
    offset = normal(r, 2 * c, p, p)
    go = normal(r, c, p, p)
    return RoiInputs(x, rois, offset if case.variant == "class offsets" else None, None, go)


def _roi_kwargs() -> dict:
    return dict(output_size=POOLED, spatial_scale=SPATIAL_SCALE, sampling_ratio=SAMPLING_RATIO, gamma=GAMMA)


def _psroi_kwargs(classes: int) -> dict:
    return dict(
        output_dim=classes,
        group_size=POOLED,
        pooled_size=POOLED,
        sample_per_part=SAMPLE_PER_PART,
        trans_std=TRANS_STD,
        spatial_scale=SPATIAL_SCALE,
    )


def settings() -> dict:
    """The fixed parameters of the RoI rows, for the JSON report (under "roi")."""
    return {
        "roi": {
            "pooled_size": POOLED,
            "spatial_scale": SPATIAL_SCALE,
            "roi_side_image_px": list(ROI_SIDE),
            ROI_POOL: {"sampling_ratio": SAMPLING_RATIO, "gamma": GAMMA},
            PSROI_POOL: {"group_size": POOLED, "sample_per_part": SAMPLE_PER_PART, "trans_std": TRANS_STD},
        }
    }


# ---------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------


def ours_impl(case: RoiCase, a: RoiInputs, sync: Callable[[], None], meter: Callable | None) -> Impl:
    """Our operator on whatever array type ``a`` holds; fwd+bwd = forward, then backward."""
    import deformarray as da

    if case.op == ROI_POOL:
        kw = _roi_kwargs()

        def fwd():
            return da.deform_roi_pool(a.input, a.rois, a.offset, mask=a.mask, **kw)

        def bwd():
            return da.deform_roi_pool_backward(a.grad_output, a.input, a.rois, a.offset, mask=a.mask, **kw)
    else:
        kw = _psroi_kwargs(case.shape.c)

        def fwd():
            return da.deform_psroi_pool(a.input, a.rois, a.offset, **kw)

        def bwd():
            return da.deform_psroi_pool_backward(a.grad_output, a.input, a.rois, a.offset, **kw)

    def fwdbwd():
        return fwd(), tuple(g for g in bwd() if g is not None)

    return Impl("ours", f"deformarray.{case.op}", fwd, fwdbwd, sync, meter)


def torchvision_impl(
    case: RoiCase, torch: Any, tv: Any, t: RoiInputs, sync: Callable[[], None] = C.noop, meter: Callable | None = None
) -> Impl:
    """The non-deformable floor of the same size; gradient w.r.t. the input only."""
    rois = t.rois
    if case.op == ROI_POOL:
        name = "roi_align(aligned=True)"

        def op(x):
            return tv.ops.roi_align(
                x, rois, POOLED, spatial_scale=SPATIAL_SCALE, sampling_ratio=SAMPLING_RATIO, aligned=True
            )
    else:
        name = "ps_roi_align"

        def op(x):
            return tv.ops.ps_roi_align(x, rois, POOLED, spatial_scale=SPATIAL_SCALE, sampling_ratio=SAMPLE_PER_PART)

    label = f"torchvision.ops.{name} (torchvision {tv.__version__})"
    return C.torch_autograd_impl("torchvision", label, torch, op, (t.input,), t.grad_output, sync, meter)


def cpu_builder(torch: Any, tv: Any | None) -> Callable:
    """``torch`` may be None only when ``tv`` is."""

    def build(case: RoiCase, a: RoiInputs) -> tuple:
        ours = ours_impl(case, a, C.noop, C.tracemalloc_peak_extra)
        floor = torchvision_impl(case, torch, tv, a.map(torch.from_numpy)) if tv is not None else None
        return ours, floor

    return build


def gpu_builder(cupy: Any, torch: Any, tv: Any | None) -> Callable:
    """``torch`` may be None only when ``tv`` is."""

    def build(case: RoiCase, a_np: RoiInputs) -> tuple:
        a = a_np.map(cupy.asarray)
        ours = ours_impl(case, a, cupy.cuda.Device().synchronize, C.cupy_peak_extra)
        floor = None
        if tv is not None:  # the caller passes tv only with CUDA torch
            t = a.map(torch.from_dlpack)  # zero-copy views of the same cupy buffers
            floor = torchvision_impl(case, torch, tv, t, torch.cuda.synchronize, C.torch_cuda_peak_extra)
        return ours, floor

    return build


# ---------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------


def run_case(case: RoiCase, build: Callable, floors: dict, repeat: int, progress: Progress) -> dict:
    """Measure our operator for one case, and the torchvision floor once per shape."""
    import deformarray

    row: dict = {
        "op": case.op,
        "variant": case.variant,
        "backend": case.backend,
        "shape": case.shape_dict(),
        "dtype": case.dtype,
    }
    progress.start(row_label(row))
    ours, floor = build(case, make_inputs(case))
    key = (case.backend, case.op, case.shape, case.dtype)
    if floor is not None and key not in floors:
        # the first variant of these sizes is timed interleaved with the floor
        both = C.measure_all([ours, floor], repeat, progress)
        row["ours"], floors[key] = both[ours.name], both[floor.name]
    else:
        row["ours"] = C.measure(ours, repeat, progress)
    if floor is not None:
        row["torchvision"] = floors[key]
    del ours, floor  # drop this case's arrays before the next one is built
    row["ratios"] = {"torchvision": C.ratios_of(row["ours"], row["torchvision"])} if "torchvision" in row else {}
    if "peak_extra_mib" in row["ours"]:
        row["ours"]["within_workspace"] = row["ours"]["peak_extra_mib"] * C.MIB <= deformarray.get_workspace_limit()
    progress.finish_step()
    return row


def _cases(backend: str, shapes: dict, dtypes: tuple) -> list[RoiCase]:
    return [
        RoiCase(backend, op, variant, RoiShape(*s), d)
        for d in dtypes
        for op in (ROI_POOL, PSROI_POOL)
        for s in shapes[op]
        for variant in VARIANTS[op]
    ]


def _shapes(opts: Options, defaults: dict) -> dict:
    given = {ROI_POOL: opts.shapes.get("roi_shapes"), PSROI_POOL: opts.shapes.get("psroi_shapes")}
    return {op: sizes or defaults[op] for op, sizes in given.items()}


def cpu_steps(opts: Options, torch: Any | None, torch_reason: str, notes: list) -> list[Step]:
    tv, reason = C.optional_import("torchvision") if torch is not None else (None, torch_reason)
    if tv is None:
        notes.append(f"{reason}: no torchvision roi_align / ps_roi_align floor for the CPU RoI rows")
    build = cpu_builder(torch, tv)
    floors: dict = {}
    cases = _cases("numpy", _shapes(opts, DEFAULT_CPU_SHAPES), (opts.dtype or "float32",))
    return [Step("numpy", functools.partial(run_case, c, build, floors)) for c in cases]


def gpu_steps(opts: Options, cupy: Any, torch: Any | None, tv: Any | None) -> list[Step]:
    """``tv``: torchvision when CUDA torch is usable, else None (``common.gpu_references``
    has said why)."""
    build = gpu_builder(cupy, torch, tv)
    floors: dict = {}
    dtypes = (opts.dtype,) if opts.dtype else C.DEFAULT_GPU_DTYPES
    cases = _cases("cupy", _shapes(opts, DEFAULT_GPU_SHAPES), dtypes)
    return [Step("cupy", functools.partial(run_case, c, build, floors)) for c in cases]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def row_label(row: dict) -> str:
    return f"{row['backend']} {row['op']} ({row['variant']}) {shape_text(row)} {row['dtype']}"


def shape_text(row: dict) -> str:
    s = row["shape"]
    if row["op"] == PSROI_POOL:
        return f"{s['N']},{s['K']}x{POOLED * POOLED},{s['H']},{s['W']},{s['R']}"
    return f"{s['N']},{s['C']},{s['H']},{s['W']},{s['R']}"


_SHORT = {ROI_POOL: "roi", PSROI_POOL: "psroi"}  # the chart's group labels
_SHORT_VARIANTS = {"offset+mask": "off+mask", "class offsets": "cls offs"}


def chart_label(row: dict) -> tuple[str, str]:
    return f"{_SHORT[row['op']]} {_SHORT_VARIANTS.get(row['variant'], row['variant'])}", shape_text(row)


_LEAD = [("op", lambda r: r["op"]), ("case", lambda r: r["variant"]), ("N,C,H,W,R", shape_text)]


def cpu_columns(with_floor: bool) -> list:
    tv = [("tv fwd ms", C.ms_cell("torchvision", "fwd")), ("ratio", C.ratio_cell("torchvision", "fwd"))]
    tv2 = [("tv fwd+bwd ms", C.ms_cell("torchvision", "fwdbwd")), ("ratio", C.ratio_cell("torchvision", "fwdbwd"))]
    return [
        *_LEAD,
        ("fwd ms", C.ms_cell("ours", "fwd")),
        *(tv if with_floor else []),
        ("fwd+bwd ms", C.ms_cell("ours", "fwdbwd")),
        *(tv2 if with_floor else []),
        ("peak extra MiB", C.peak_cell("ours")),
        ("in bound", C.bound_cell),
        ("warm-up s", C.warmup_cell),
    ]


GPU_COLUMNS = [
    *_LEAD,
    ("dtype", lambda r: r["dtype"]),
    ("fwd ms", C.ms_cell("ours", "fwd")),
    ("tv fwd", C.ms_cell("torchvision", "fwd")),
    ("/tv fwd", C.ratio_cell("torchvision", "fwd")),
    ("fwd+bwd ms", C.ms_cell("ours", "fwdbwd")),
    ("tv f+b", C.ms_cell("torchvision", "fwdbwd")),
    ("/tv f+b", C.ratio_cell("torchvision", "fwdbwd")),
    ("peak MiB", C.peak_cell("ours")),
    ("in bound", C.bound_cell),
    ("tv peak MiB", C.peak_cell("torchvision")),
]

TITLE = (
    f"RoI pooling ({POOLED}x{POOLED} bins, spatial_scale 1/{round(1 / SPATIAL_SCALE)}; "
    f"{ROI_POOL} sampling_ratio {SAMPLING_RATIO}; {PSROI_POOL} C = K*{POOLED * POOLED}, "
    f"sample_per_part {SAMPLE_PER_PART})"
)


def format_sections(rows: list[dict], gpu_name: str | None) -> list[str]:
    """The CPU and GPU RoI tables (lines), empty when no RoI row ran."""
    out: list[str] = []
    cpu = [r for r in rows if r["backend"] == "numpy"]
    gpu = [r for r in rows if r["backend"] == "cupy"]
    if cpu:
        with_floor = any("torchvision" in r for r in cpu)
        floor = f"; floor = {C.reference_label(cpu, 'torchvision')}" if with_floor else ""
        out += [
            "",
            f"{TITLE}, CPU, numpy arrays, {cpu[0]['dtype']}{floor}",
            C.format_table(cpu_columns(with_floor), cpu, left=len(_LEAD)),
            ("ratio = ours / torchvision (non-deformable floor, same sizes); " if with_floor else "")
            + "fwd+bwd = forward, then backward (input, offset, mask gradients)",
            "peak extra = largest NumPy workspace (tracemalloc) beyond outputs/gradients; in bound = within "
            "the workspace bound; warm-up = first fwd + first fwd+bwd call",
        ]
    if gpu:
        out += [
            "",
            f"{TITLE}, GPU ({gpu_name}), cupy arrays; tv = {C.reference_label(gpu, 'torchvision')}",
            C.format_table(GPU_COLUMNS, gpu, left=len(_LEAD)),
            "/tv = ours / torchvision (non-deformable floor, same sizes); peak = CuPy pool (ours) or "
            "torch allocator (tv) beyond outputs/gradients",
        ]
    return out
