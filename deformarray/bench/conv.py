"""The deform_conv2d rows of ``deformarray bench`` (``--op conv``; also behind
``benchmarks/bench_deform_conv.py``).

deformarray's ``deform_conv2d`` (v2: mask and bias, 3x3 kernel, padding 1, offsets ~ N(0, 1)
so every sample point is fractional) against a dense convolution of the same shape
measured in the same process, so the ratio column means something on any machine:

- CPU section (numpy arrays): dense = ``torch.nn.functional.conv2d`` on the CPU with the same
  thread count as Numba, or, without torch, a NumPy im2col+matmul convolution.
- GPU section (cupy arrays, only when a CUDA device is present): ``torchvision.ops.deform_conv2d``
  (the operator we are a drop-in for) and ``torch.nn.functional.conv2d`` on cuDNN.

The two sections differ only in which ``Impl`` s they build (``common.py`` measures them).
This module is one operator family: it provides the names of ``common.Family``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from . import common as C
from .common import Impl, Options, Progress, ShapeOption, Step

# (N, C_in, H, W, C_out). CPU shapes: a ResNet stage, a deep narrow map, a wide shallow one.
DEFAULT_CPU_SHAPES = ((8, 64, 56, 56, 64), (2, 256, 32, 32, 256), (1, 16, 128, 128, 16))
# GPU shapes: the same ResNet stage, larger batches/channels, and a detection-size feature map.
DEFAULT_GPU_SHAPES = ((8, 64, 56, 56, 64), (8, 256, 64, 64, 256), (32, 128, 28, 28, 128), (2, 512, 100, 160, 512))

KERNEL, PADDING = 3, 1  # H_out = H, W_out = W: the dense convolution has the same output


# ---------------------------------------------------------------------------------------
# Shapes and inputs
# ---------------------------------------------------------------------------------------


class Shape(NamedTuple):
    n: int
    c_in: int
    h: int
    w: int
    c_out: int

    def __str__(self) -> str:
        return ",".join(map(str, self))

    def as_dict(self) -> dict:
        return {"N": self.n, "C_in": self.c_in, "H": self.h, "W": self.w, "C_out": self.c_out}


def parse_shapes(text: str) -> list[Shape]:
    """``"N,C,H,W,Co;N,C,H,W,Co"`` -> shapes; ValueError with the offending item otherwise."""
    return [Shape(*s) for s in C.parse_sizes(text, ("N", "C_in", "H", "W", "C_out"))]


class Inputs(NamedTuple):
    input: Any
    offset: Any
    weight: Any
    bias: Any
    mask: Any
    grad_output: Any

    def map(self, fn: Callable[[Any], Any]) -> Inputs:
        return Inputs(*(fn(a) for a in self))


def make_inputs(shape: Shape, dtype: str, seed: int = 0) -> Inputs:
    """Random NumPy arguments of one deform_conv2d call (and its grad_output) in ``dtype``."""
    rng = np.random.default_rng(seed)
    k2 = KERNEL * KERNEL
    n, c, h, w, co = shape

    def normal(*dims, scale=1.0):
        # generated in float32 then cast: the same numbers for every dtype, float16 included
        return (rng.standard_normal(dims, dtype=np.float32) * scale).astype(dtype)

    return Inputs(
        input=normal(n, c, h, w),
        offset=normal(n, 2 * k2, h, w),  # ~N(0,1) pixels: sample points land between pixels
        weight=normal(co, c, KERNEL, KERNEL, scale=(c * k2) ** -0.5),
        bias=normal(co),
        mask=rng.uniform(1e-3, 1.0, (n, k2, h, w)).astype(dtype),
        grad_output=normal(n, co, h, w),
    )


# ---------------------------------------------------------------------------------------
# The family's names (common.Family)
# ---------------------------------------------------------------------------------------


NAME = "conv"
OPERATORS = "deform_conv2d"
SUMMARY = "deform_conv2d"
DESCRIPTION = (
    f"deform_conv2d (mask + bias, {KERNEL}x{KERNEL}, padding {PADDING}) forward and forward+backward "
    "against a dense convolution of the same shape"
)
ROWS = "the deform_conv2d rows"
ROW_OPS: tuple[str, ...] = ("deform_conv2d",)
CONTENDERS: tuple[str, ...] = ("ours", "dense", "torchvision")
SHAPE_OPTIONS: tuple[ShapeOption, ...] = (
    ShapeOption(
        "--shapes",
        parse_shapes,
        '"N,C,H,W,Co;..."',
        "deform_conv2d shapes to run (default: a CPU set and a GPU set)",
    ),
)


def settings() -> dict:
    """The fixed parameters of the rows, for the JSON report."""
    return {"kernel": KERNEL, "padding": PADDING}


# ---------------------------------------------------------------------------------------
# Contenders
# ---------------------------------------------------------------------------------------


def ours_impl(a: Inputs, sync: Callable[[], None], meter: Callable) -> Impl:
    """deformarray on whatever array type ``a`` holds (numpy or cupy): the API dispatches."""
    import deformarray

    conv = dict(stride=1, padding=PADDING, dilation=1)

    def fwd():
        return deformarray.deform_conv2d(a.input, a.offset, a.weight, a.bias, mask=a.mask, **conv)

    def fwdbwd():
        y = fwd()
        grads = deformarray.deform_conv2d_backward(
            a.grad_output, a.input, a.offset, a.weight, a.bias, mask=a.mask, **conv
        )
        return y, tuple(grads)

    return Impl("ours", "deformarray.deform_conv2d", fwd, fwdbwd, sync, meter)


def torch_dense_impl(torch: Any, t: Inputs, sync: Callable[[], None] = C.noop, meter: Callable | None = None) -> Impl:
    device = "cuDNN" if t.input.is_cuda else "CPU"

    def op(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, padding=PADDING)

    label = f"torch.nn.functional.conv2d (torch {torch.__version__}, {device})"
    return C.torch_autograd_impl("dense", label, torch, op, (t.input, t.weight, t.bias), t.grad_output, sync, meter)


def torchvision_impl(torch: Any, tv: Any, t: Inputs, sync: Callable[[], None], meter: Callable) -> Impl:
    def op(x, off, w, b, m):
        return tv.ops.deform_conv2d(x, off, w, b, padding=PADDING, mask=m)

    label = f"torchvision.ops.deform_conv2d (torchvision {tv.__version__})"
    args = (t.input, t.offset, t.weight, t.bias, t.mask)
    return C.torch_autograd_impl("torchvision", label, torch, op, args, t.grad_output, sync, meter)


def numpy_dense_impl(a: Inputs) -> Impl:
    """Dense 3x3 / padding-1 convolution as im2col + one matmul, the yardstick when torch is
    missing. Written the straightforward way: it is a reference point, not a contender."""
    x, w, b, go = a.input, a.weight, a.bias, a.grad_output
    n, c, h, wd = x.shape
    co = w.shape[0]
    w2 = w.reshape(co, -1)
    go3 = go.reshape(n, co, h * wd)

    def im2col():
        xp = np.pad(x, ((0, 0), (0, 0), (PADDING, PADDING), (PADDING, PADDING)))
        win = np.lib.stride_tricks.sliding_window_view(xp, (KERNEL, KERNEL), axis=(2, 3))  # n,c,h,w,i,j
        return np.ascontiguousarray(win.transpose(0, 1, 4, 5, 2, 3)).reshape(n, -1, h * wd)

    def forward(cols):
        y = np.matmul(w2, cols)
        y += b[:, None]
        return y.reshape(n, co, h, wd)

    def fwd():
        return forward(im2col())

    def fwdbwd():
        cols = im2col()
        y = forward(cols)
        grad_w = np.matmul(go3, cols.transpose(0, 2, 1)).sum(axis=0).reshape(w.shape)
        grad_b = go3.sum(axis=(0, 2))
        gcols = np.matmul(w2.T, go3).reshape(n, c, KERNEL, KERNEL, h, wd)
        gxp = np.zeros((n, c, h + 2 * PADDING, wd + 2 * PADDING), dtype=x.dtype)
        for i in range(KERNEL):  # col2im: each kernel point adds a shifted plane
            for j in range(KERNEL):
                gxp[:, :, i : i + h, j : j + wd] += gcols[:, :, i, j]
        return y, (gxp[:, :, PADDING:-PADDING, PADDING:-PADDING], grad_w, grad_b)

    return Impl("dense", "NumPy im2col+matmul dense conv", fwd, fwdbwd)


# ---------------------------------------------------------------------------------------
# Rows: build the contenders of each case, measure, collect rows
# ---------------------------------------------------------------------------------------


@dataclass
class Case:
    backend: str  # "numpy" | "cupy"
    shape: Shape
    dtype: str


def run_case(case: Case, build: Callable[[Inputs], list], repeat: int, progress: Progress) -> dict:
    """Measure every contender ``build`` makes for one case; ratios are ours / reference."""
    import deformarray

    progress.start(f"{case.backend} {case.shape} {case.dtype}")
    impls = build(make_inputs(case.shape, case.dtype))
    row: dict = {"op": "deform_conv2d", "backend": case.backend, "shape": case.shape.as_dict(), "dtype": case.dtype}
    row.update(C.measure_all(impls, repeat, progress))
    del impls  # drop this case's arrays before the next one is built
    ours = row["ours"]
    row["ratios"] = {name: C.ratios_of(ours, row[name]) for name in ("dense", "torchvision") if name in row}
    if "peak_extra_mib" in ours:
        ours["within_workspace"] = ours["peak_extra_mib"] * C.MIB <= deformarray.get_workspace_limit()
    progress.finish_step()
    return row


def cpu_builder(torch: Any | None) -> Callable[[Inputs], list]:
    def build(a: Inputs) -> list:
        ours = ours_impl(a, C.noop, C.tracemalloc_peak_extra)
        if torch is None:
            return [ours, numpy_dense_impl(a)]
        return [ours, torch_dense_impl(torch, a.map(torch.from_numpy))]

    return build


def gpu_builder(cupy: Any, torch: Any | None, tv: Any | None) -> Callable[[Inputs], list]:
    def build(a_np: Inputs) -> list:
        a = a_np.map(cupy.asarray)
        impls = [ours_impl(a, cupy.cuda.Device().synchronize, C.cupy_peak_extra)]
        if torch is not None and torch.cuda.is_available():
            t = a.map(torch.from_dlpack)  # zero-copy views of the same cupy buffers
            if tv is not None:
                impls.append(torchvision_impl(torch, tv, t, torch.cuda.synchronize, C.torch_cuda_peak_extra))
            impls.append(torch_dense_impl(torch, t, torch.cuda.synchronize, C.torch_cuda_peak_extra))
        return impls

    return build


def cpu_steps(opts: Options, torch: Any | None, torch_reason: str, notes: list) -> list[Step]:
    if torch is None:
        notes.append(f"{torch_reason}: CPU dense reference is a NumPy im2col+matmul convolution")
    build = cpu_builder(torch)
    shapes = opts.shapes.get("shapes") or list(map(Shape._make, DEFAULT_CPU_SHAPES))
    return [
        Step("numpy", functools.partial(run_case, Case("numpy", s, opts.dtype or "float32"), build)) for s in shapes
    ]


def gpu_steps(opts: Options, cupy: Any, torch: Any | None, tv: Any | None) -> list[Step]:
    build = gpu_builder(cupy, torch, tv)
    shapes = opts.shapes.get("shapes") or list(map(Shape._make, DEFAULT_GPU_SHAPES))
    dtypes = (opts.dtype,) if opts.dtype else C.DEFAULT_GPU_DTYPES
    return [Step("cupy", functools.partial(run_case, Case("cupy", s, d), build)) for d in dtypes for s in shapes]


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def row_label(row: dict) -> str:
    return f"{row['backend']} {shape_text(row)} {row['dtype']}"


def shape_text(row: dict) -> str:
    return str(Shape(*row["shape"].values()))  # as_dict keeps the field order


def chart_label(row: dict) -> tuple[str, str]:
    return "conv", shape_text(row)


_SHAPE = ("N,C,H,W,Co", shape_text)
CPU_COLUMNS = [
    _SHAPE,
    ("fwd ms", C.ms_cell("ours", "fwd")),
    ("dense fwd ms", C.ms_cell("dense", "fwd")),
    ("ratio", C.ratio_cell("dense", "fwd")),
    ("fwd+bwd ms", C.ms_cell("ours", "fwdbwd")),
    ("dense fwd+bwd ms", C.ms_cell("dense", "fwdbwd")),
    ("ratio", C.ratio_cell("dense", "fwdbwd")),
    ("peak extra MiB", C.peak_cell("ours")),
    ("in bound", C.bound_cell),
    ("warm-up s", C.warmup_cell),
]
GPU_COLUMNS = [
    _SHAPE,
    ("dtype", lambda r: r["dtype"]),
    ("fwd ms", C.ms_cell("ours", "fwd")),
    ("tv fwd", C.ms_cell("torchvision", "fwd")),
    ("cuDNN fwd", C.ms_cell("dense", "fwd")),
    ("fwd+bwd ms", C.ms_cell("ours", "fwdbwd")),
    ("tv f+b", C.ms_cell("torchvision", "fwdbwd")),
    ("cuDNN f+b", C.ms_cell("dense", "fwdbwd")),
    ("/tv f+b", C.ratio_cell("torchvision", "fwdbwd")),
    ("/cuDNN f+b", C.ratio_cell("dense", "fwdbwd")),
    ("peak MiB", C.peak_cell("ours")),
    ("in bound", C.bound_cell),
    ("tv peak MiB", C.peak_cell("torchvision")),
]

TITLE = f"deform_conv2d (mask + bias, {KERNEL}x{KERNEL}, padding {PADDING})"


def format_sections(rows: list[dict], gpu_name: str | None) -> list[str]:
    """The CPU and GPU deform_conv2d tables (lines), empty when no row ran."""
    out: list[str] = []
    cpu = [r for r in rows if r["backend"] == "numpy"]
    gpu = [r for r in rows if r["backend"] == "cupy"]
    if cpu:
        out += [
            "",
            f"{TITLE}, CPU, numpy arrays, {cpu[0]['dtype']}; dense = {C.reference_label(cpu, 'dense')}",
            C.format_table(CPU_COLUMNS, cpu),
            "ms = median over the runs; ratio = ours / dense within each run, median (range); "
            "warm-up = first fwd + first fwd+bwd call (Numba compile)",
            "peak extra = largest NumPy workspace (tracemalloc) beyond outputs/gradients; "
            "in bound = within the workspace bound",
        ]
    if gpu:
        out += [
            "",
            f"{TITLE}, GPU ({gpu_name}), cupy arrays; tv = {C.reference_label(gpu, 'torchvision')}; "
            f"cuDNN = {C.reference_label(gpu, 'dense')}",
            C.format_table(GPU_COLUMNS, gpu),
            "/tv, /cuDNN = ours / reference; peak = CuPy pool (ours) or torch allocator (tv) beyond outputs/gradients",
        ]
    return out
