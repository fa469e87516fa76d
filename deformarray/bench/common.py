"""Benchmark harness behind ``deformarray bench`` and ``benchmarks/bench_deform_conv.py``.

``--op conv`` (this module) times deformarray's ``deform_conv2d`` (v2: mask and bias, 3x3
kernel, padding 1, offsets ~ N(0, 1) so every sample point is fractional) against a dense
convolution of the same shape measured in the same process, so the ratio column means
something on any machine:

- CPU section (numpy arrays): dense = ``torch.nn.functional.conv2d`` on the CPU with the same
  thread count as Numba, or, without torch, a NumPy im2col+matmul convolution.
- GPU section (cupy arrays, only when a CUDA device is present): ``torchvision.ops.deform_conv2d``
  (the operator we are a drop-in for) and ``torch.nn.functional.conv2d`` on cuDNN.

Every contender goes through one path: an ``Impl`` is a pair of closures (forward,
forward+backward) plus how to wait for its device and how to read its peak memory, and
``measure`` times any ``Impl``. The two sections differ only in which Impls they build.

``--op roi`` (``deformarray._bench_roi``, also behind ``benchmarks/bench_roi_pool.py``) adds
RoI pooling rows built the same way, against torchvision's ``roi_align`` / ``ps_roi_align``.
Every row is a ``Step``; ``run`` measures the conv steps, then the RoI steps, with one
progress bar, and ``format_report`` prints one table per operator family and device.
"""

from __future__ import annotations

import functools
import importlib
import os
import shutil
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

MIB = 1 << 20

# (N, C_in, H, W, C_out). CPU shapes: a ResNet stage, a deep narrow map, a wide shallow one.
DEFAULT_CPU_SHAPES = ((8, 64, 56, 56, 64), (2, 256, 32, 32, 256), (1, 16, 128, 128, 16))
# GPU shapes: the same ResNet stage, larger batches/channels, and a detection-size feature map.
DEFAULT_GPU_SHAPES = ((8, 64, 56, 56, 64), (8, 256, 64, 64, 256), (32, 128, 28, 28, 128), (2, 512, 100, 160, 512))
DEFAULT_GPU_DTYPES = ("float32", "float16")
CPU_DTYPES = ("float32", "float64")  # the numpy backend's dtypes (SPEC)

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


def parse_sizes(text: str, fields: tuple) -> list[tuple]:
    """``"a,b,..;a,b,.."`` -> tuples of ``len(fields)`` positive integers; ValueError with
    the offending item otherwise."""
    sizes = []
    for item in filter(None, (s.strip() for s in text.split(";"))):
        parts = [p.strip() for p in item.split(",")]
        if len(parts) != len(fields) or not all(p.isdigit() for p in parts):
            raise ValueError(f"expected {len(fields)} positive integers {','.join(fields)}, got {item!r}")
        size = tuple(map(int, parts))
        if min(size) < 1:
            raise ValueError(f"every size must be at least 1, got {item!r}")
        sizes.append(size)
    if not sizes:
        raise ValueError("no shape given")
    return sizes


def parse_shapes(text: str) -> list[Shape]:
    """``"N,C,H,W,Co;N,C,H,W,Co"`` -> shapes; ValueError with the offending item otherwise."""
    return [Shape(*s) for s in parse_sizes(text, ("N", "C_in", "H", "W", "C_out"))]


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
# Optional dependencies and the GPU
# ---------------------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def optional_import(name: str) -> tuple[Any | None, str]:
    """(module, "") or (None, one-line reason). Any import failure is a reason, not a crash:
    a broken CUDA/torch install raises OSError or RuntimeError, not only ImportError."""
    try:
        return importlib.import_module(name), ""
    except ModuleNotFoundError as exc:
        if exc.name == name.split(".")[0]:
            return None, f"{name} not installed"
        return None, f"{name} not importable ({one_line(exc)})"
    except Exception as exc:
        return None, f"{name} not importable ({one_line(exc)})"


def gpu_status() -> tuple[Any | None, str]:
    """(cupy, "") when cupy imports and sees a CUDA device, else (None, one-line reason)."""
    cupy, reason = optional_import("cupy")
    if cupy is None:
        return None, reason
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return None, f"cupy {cupy.__version__} imports but sees no CUDA device ({one_line(exc)})"
    if count == 0:
        return None, f"cupy {cupy.__version__} imports but sees no CUDA device"
    return cupy, ""


def describe_gpu(cupy: Any, index: int = 0) -> str:
    """Name, compute capability and memory of CUDA device ``index``, on one line."""
    props = cupy.cuda.runtime.getDeviceProperties(index)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    cc = cupy.cuda.Device(index).compute_capability  # e.g. "90" for sm_90
    return f"{name}, compute capability {cc[:-1]}.{cc[-1]}, {props['totalGlobalMem'] / 2**30:.0f} GiB"


def configure_threads(n: int | None, torch: Any | None) -> dict:
    """Give every CPU contender the same thread count (Numba's by default): a comparison
    against torch running on more or fewer cores than we do would be meaningless."""
    import numba

    n = numba.get_num_threads() if n is None else n
    numba.set_num_threads(n)
    threads: dict = {"numba": n, "torch": None, "blas": None}
    if torch is not None:
        torch.set_num_threads(n)
        threads["torch"] = torch.get_num_threads()
    # NumPy's BLAS does our matrix products; only threadpoolctl (optional) can cap it after
    # import. Without it BLAS keeps its default, which is the core count, like Numba's.
    tpc, _ = optional_import("threadpoolctl")
    if tpc is not None:
        tpc.threadpool_limits(limits=n, user_api="blas")
        threads["blas"] = n
    return threads


# ---------------------------------------------------------------------------------------
# Load from other processes (CPU timings are only trustworthy on a quiet machine)
# ---------------------------------------------------------------------------------------


def cpu_counters() -> tuple[float, float, float] | None:
    """(wall s, CPU s used by the whole machine, CPU s used by this process), or None
    where /proc/stat does not exist (not Linux)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user .. steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # minus idle and iowait
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_load(before: tuple | None, after: tuple | None) -> float | None:
    """Fraction of the machine's CPUs that *other* processes used between two snapshots.

    On a shared machine with as many threads as cores, each parallel region waits for
    whichever of its threads got descheduled, so even a modest load from elsewhere
    inflates and scatters CPU timings: the report says so rather than hide it.
    """
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(0.0, others / (after[0] - before[0]) / (os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------
# Measurement: one path for every contender on every device
# ---------------------------------------------------------------------------------------


def _noop() -> None:
    pass


@dataclass
class Impl:
    """A contender: ``fwd()`` and ``fwdbwd()`` return the arrays they produce (so their
    bytes can be told apart from workspace); ``sync`` waits for the device; ``meter(fn)``
    returns the peak bytes ``fn`` allocated beyond what it returned (None: not measured)."""

    name: str
    label: str
    fwd: Callable[[], Any]
    fwdbwd: Callable[[], Any]
    sync: Callable[[], None] = _noop
    meter: Callable[[Callable[[], Any]], int] | None = None


def _nbytes(result: Any) -> int:
    if result is None:
        return 0
    if isinstance(result, (tuple, list)):
        return sum(_nbytes(r) for r in result)
    return int(result.nbytes)


def _timer(fn: Callable[[], Any], sync: Callable[[], None]) -> Callable[[], float]:
    """A function that runs ``fn`` once and returns its wall-clock seconds. Synchronising
    around each call makes wall-clock time valid for asynchronous GPU work too, and
    includes the launch overhead a user also pays."""

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return once


def measure_all(impls: list[Impl], repeat: int, progress: Progress) -> dict[str, dict]:
    """Warm-up, median time with its range, and peak extra memory of both phases of
    several contenders, timed interleaved.

    The first call of each pays Numba compilation / cuDNN autotuning / NVRTC and is
    reported apart as the warm-up. Then ``repeat`` rounds each time every contender once,
    the starting contender rotating from round to round: on a shared machine a slow spell
    then hits all contenders alike, and the ratio of two contenders is taken within each
    round (``ratios_of``). Reported: the median over the rounds (``{phase}_ms``) and the
    range (``{phase}_min_ms``, ``{phase}_max_ms``), never the best run alone.

    A failure becomes an ``error`` entry: one broken contender must not hide the others.
    """
    results: dict[str, dict] = {impl.name: {"label": impl.label} for impl in impls}
    for phase in ("fwd", "fwdbwd"):
        timers: dict[str, Callable[[], float]] = {}
        for impl in impls:
            res = results[impl.name]
            if "error" in res:
                continue
            progress.detail(f"{impl.name} {'fwd' if phase == 'fwd' else 'fwd+bwd'} warm-up")
            timer = _timer(impl.fwd if phase == "fwd" else impl.fwdbwd, impl.sync)
            try:
                res[f"warmup_{phase}_s"] = timer()
            except Exception as exc:
                res["error"] = one_line(exc)
                continue
            timers[impl.name] = timer
            res[f"{phase}_times_ms"] = []
        names = list(timers)
        for r in range(repeat):
            progress.detail(f"{'fwd' if phase == 'fwd' else 'fwd+bwd'} round {r + 1}/{repeat}")
            for name in names[r % max(len(names), 1) :] + names[: r % max(len(names), 1)]:
                if "error" in results[name]:
                    continue
                try:
                    results[name][f"{phase}_times_ms"].append(timers[name]() * 1e3)
                except Exception as exc:
                    results[name]["error"] = one_line(exc)
        for name in names:
            times = results[name][f"{phase}_times_ms"]
            if times and "error" not in results[name]:
                results[name][f"{phase}_ms"] = statistics.median(times)
                results[name][f"{phase}_min_ms"] = min(times)
                results[name][f"{phase}_max_ms"] = max(times)
    for impl in impls:
        res = results[impl.name]
        if impl.meter is None or "error" in res:
            continue
        try:
            for phase, fn in (("fwd", impl.fwd), ("fwdbwd", impl.fwdbwd)):
                # a separate call: tracing must not slow the timed ones
                res[f"peak_extra_{phase}_mib"] = max(0, impl.meter(fn)) / MIB
            res["peak_extra_mib"] = max(res["peak_extra_fwd_mib"], res["peak_extra_fwdbwd_mib"])
        except Exception as exc:
            res["error"] = one_line(exc)
    return results


def measure(impl: Impl, repeat: int, progress: Progress) -> dict:
    """``measure_all`` of one contender."""
    return measure_all([impl], repeat, progress)[impl.name]


def ratios_of(ours: dict, ref: dict) -> dict:
    """Per phase, ours / ref: the median of the per-round ratios and their range, when both
    were timed in the same rounds (``measure_all``); else the ratio of the medians."""
    out: dict = {}
    for ph in ("fwd", "fwdbwd"):
        a, b = ours.get(f"{ph}_times_ms"), ref.get(f"{ph}_times_ms")
        if a and b and len(a) == len(b) and "error" not in ours and "error" not in ref:
            per_round = [x / y for x, y in zip(a, b) if y > 0]
            out[ph] = statistics.median(per_round)
            out[f"{ph}_range"] = [min(per_round), max(per_round)]
        else:
            out[ph] = _ratio(ours.get(f"{ph}_ms"), ref.get(f"{ph}_ms"))
    return out


def tracemalloc_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes traced during ``fn`` minus the arrays it returns.

    NumPy reports its data buffers to tracemalloc, so every buffer our Python drivers
    allocate is seen; memory allocated inside Numba-compiled code or inside BLAS is not.
    The CPU backend keeps its workspace arena between calls: it is released first, so
    that the measured call allocates it again and the trace sees it.
    """
    import deformarray

    deformarray.release_workspace()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return peak - base - _nbytes(result)


def cupy_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes handed out by CuPy's memory pool during ``fn`` minus the arrays it returns
    (a MemoryHook counts pool mallocs and frees: the pool itself keeps no peak figure)."""
    import cupy
    from cupy.cuda import memory_hook

    class PeakHook(memory_hook.MemoryHook):
        name = "deformarray_bench_peak"

        def __init__(self) -> None:
            self.now = self.peak = 0

        def malloc_postprocess(self, **kw: Any) -> None:
            self.now += kw["mem_size"]
            self.peak = max(self.peak, self.now)

        def free_postprocess(self, **kw: Any) -> None:
            self.now -= kw["mem_size"]

    hook = PeakHook()
    cupy.cuda.Device().synchronize()
    with hook:
        result = fn()
        cupy.cuda.Device().synchronize()
    return hook.peak - _nbytes(result)


def torch_cuda_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes of torch's CUDA caching allocator during ``fn`` minus what it returns."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base - _nbytes(result)


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


def torch_autograd_impl(
    name: str,
    label: str,
    torch: Any,
    op: Callable,
    args: tuple,
    grad_output: Any,
    sync: Callable[[], None] = _noop,
    meter: Callable | None = None,
) -> Impl:
    """A torch op timed like ours: forward without autograd bookkeeping; forward+backward
    as ``autograd.grad`` w.r.t. every tensor argument (what our backward returns)."""
    leaves = tuple(t.detach().requires_grad_() for t in args)

    def fwd():
        with torch.no_grad():
            return op(*args)

    def fwdbwd():
        y = op(*leaves)
        return y, torch.autograd.grad(y, leaves, grad_output)

    return Impl(name, label, fwd, fwdbwd, sync, meter)


def torch_dense_impl(torch: Any, t: Inputs, sync: Callable[[], None] = _noop, meter: Callable | None = None) -> Impl:
    device = "cuDNN" if t.input.is_cuda else "CPU"

    def op(x, w, b):
        return torch.nn.functional.conv2d(x, w, b, padding=PADDING)

    label = f"torch.nn.functional.conv2d (torch {torch.__version__}, {device})"
    return torch_autograd_impl("dense", label, torch, op, (t.input, t.weight, t.bias), t.grad_output, sync, meter)


def torchvision_impl(torch: Any, tv: Any, t: Inputs, sync: Callable[[], None], meter: Callable) -> Impl:
    def op(x, off, w, b, m):
        return tv.ops.deform_conv2d(x, off, w, b, padding=PADDING, mask=m)

    label = f"torchvision.ops.deform_conv2d (torchvision {tv.__version__})"
    args = (t.input, t.offset, t.weight, t.bias, t.mask)
    return torch_autograd_impl("torchvision", label, torch, op, args, t.grad_output, sync, meter)


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
# Sections: build the contenders of each case, measure, collect rows
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
    row.update(measure_all(impls, repeat, progress))
    del impls  # drop this case's arrays before the next one is built
    ours = row["ours"]
    row["ratios"] = {name: ratios_of(ours, row[name]) for name in ("dense", "torchvision") if name in row}
    if "peak_extra_mib" in ours:
        ours["within_workspace"] = ours["peak_extra_mib"] * MIB <= deformarray.get_workspace_limit()
    progress.finish_step()
    return row


def _ratio(ours: float | None, ref: float | None) -> float | None:
    return ours / ref if ours is not None and ref else None


def cpu_builder(torch: Any | None) -> Callable[[Inputs], list]:
    def build(a: Inputs) -> list:
        ours = ours_impl(a, _noop, tracemalloc_peak_extra)
        if torch is None:
            return [ours, numpy_dense_impl(a)]
        return [ours, torch_dense_impl(torch, a.map(torch.from_numpy))]

    return build


def gpu_builder(cupy: Any, torch: Any | None, tv: Any | None) -> Callable[[Inputs], list]:
    def build(a_np: Inputs) -> list:
        a = a_np.map(cupy.asarray)
        impls = [ours_impl(a, cupy.cuda.Device().synchronize, cupy_peak_extra)]
        if torch is not None and torch.cuda.is_available():
            t = a.map(torch.from_dlpack)  # zero-copy views of the same cupy buffers
            if tv is not None:
                impls.append(torchvision_impl(torch, tv, t, torch.cuda.synchronize, torch_cuda_peak_extra))
            impls.append(torch_dense_impl(torch, t, torch.cuda.synchronize, torch_cuda_peak_extra))
        return impls

    return build


def release_gpu_memory(cupy: Any, torch: Any | None) -> None:
    """Return pooled blocks between cases so the big shapes are not starved by earlier ones."""
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# Progress on stderr
# ---------------------------------------------------------------------------------------


class Progress:
    """An in-place bar on a terminal; plain ``[i/n] case`` lines otherwise (logs, CI)."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total, self.done, self.label = total, 0, ""

    def start(self, label: str) -> None:
        self.label = label
        if self.tty:
            self._draw("")
        else:
            print(f"[{self.done + 1}/{self.total}] {label}", file=self.stream, flush=True)

    def detail(self, text: str) -> None:
        if self.tty:
            self._draw(text)

    def finish_step(self) -> None:
        self.done += 1

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def _draw(self, text: str) -> None:
        width = 20
        filled = width * self.done // max(self.total, 1)
        line = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {self.label} {text}"
        self.stream.write("\r" + line[: shutil.get_terminal_size().columns - 1] + "\033[K")
        self.stream.flush()


# ---------------------------------------------------------------------------------------
# The run and its report
# ---------------------------------------------------------------------------------------


OPS = ("conv", "roi")  # operator families: deform_conv2d; deform_roi_pool + deform_psroi_pool


@dataclass
class Options:
    shapes: list | None  # conv shapes; None: each section's defaults
    dtype: str | None  # None: float32 on CPU, float32 + float16 on GPU
    repeat: int = 5
    backend: str | None = None  # numpy | cupy | all; None: numpy, plus cupy with a GPU
    threads: int | None = None
    ops: tuple = OPS  # which operator families, run in this order
    roi_shapes: list | None = None  # deform_roi_pool (N, C, H, W, R); None: defaults
    psroi_shapes: list | None = None  # deform_psroi_pool (N, K, H, W, R); None: defaults


class Step(NamedTuple):
    """One row to measure: ``run(repeat, progress)`` returns the row."""

    backend: str
    run: Callable[[int, Progress], dict]


def _cpu_cases(opts: Options, torch: Any | None, torch_reason: str, notes: list) -> list[Step]:
    if torch is None:
        notes.append(f"{torch_reason}: CPU dense reference is a NumPy im2col+matmul convolution")
    build = cpu_builder(torch)
    shapes = opts.shapes or list(map(Shape._make, DEFAULT_CPU_SHAPES))
    return [
        Step("numpy", functools.partial(run_case, Case("numpy", s, opts.dtype or "float32"), build)) for s in shapes
    ]


def _gpu_references(torch: Any | None, torch_reason: str, notes: list) -> Any | None:
    """torchvision for the GPU rows (None without it or without CUDA torch, with a note)."""
    tv, tv_reason = optional_import("torchvision") if torch is not None else (None, torch_reason)
    if torch is None or not torch.cuda.is_available():
        notes.append(f"GPU: no CUDA torch ({torch_reason or 'torch is a CPU-only build'}): torch columns skipped")
        return None
    torch.backends.cudnn.benchmark = True  # the dense yardstick with its best algorithm
    if tv is None:
        notes.append(f"GPU: {tv_reason}: torchvision columns skipped")
    return tv


def _gpu_cases(opts: Options, cupy: Any, torch: Any | None, tv: Any | None) -> list[Step]:
    build = gpu_builder(cupy, torch, tv)
    shapes = opts.shapes or list(map(Shape._make, DEFAULT_GPU_SHAPES))
    dtypes = (opts.dtype,) if opts.dtype else DEFAULT_GPU_DTYPES
    return [Step("cupy", functools.partial(run_case, Case("cupy", s, d), build)) for d in dtypes for s in shapes]


def _run_cases(steps: list[Step], repeat: int, cupy: Any | None, torch: Any | None) -> list[dict]:
    progress = Progress(len(steps))
    rows = []
    try:
        for step in steps:
            rows.append(step.run(repeat, progress))
            if step.backend == "cupy":
                release_gpu_memory(cupy, torch)
    finally:
        progress.close()
    return rows


def row_label(row: dict) -> str:
    """``backend [op (variant)] shape dtype``: how notes name a row."""
    if row["op"] != "deform_conv2d":
        from . import roi as _bench_roi

        return _bench_roi.row_label(row)
    return f"{row['backend']} {_row_shape(row)} {row['dtype']}"


def _error_notes(rows: list[dict]) -> list[str]:
    return [
        f"{row_label(row)} {name}: {row[name]['error']}"
        for row in rows
        for name in ("ours", "dense", "torchvision")
        if "error" in row.get(name, {})
    ]


def _environment(torch: Any | None, threads: dict, cupy: Any | None) -> dict:
    import numba

    import deformarray

    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel Numba code ran (e.g. only the GPU section)
        layer = None
    return {
        "deformarray": deformarray.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "python": sys.version.split()[0],
        "torch": getattr(torch, "__version__", None),
        "threads": threads,
        "numba_threading_layer": layer,
        "workspace_limit_mib": deformarray.get_workspace_limit() / MIB,
        "gpu": describe_gpu(cupy) if cupy is not None else None,
    }


def run(opts: Options) -> dict:
    """Run the selected sections and return the report (rows, environment, notes).

    Order: conv CPU, conv GPU, then RoI CPU, RoI GPU (the order of the report's tables)."""
    from . import roi as _bench_roi

    notes: list[str] = []
    torch, torch_reason = optional_import("torch")
    threads = configure_threads(opts.threads, torch)

    want_cpu = opts.backend in (None, "numpy", "all")
    cupy, gpu_reason = None, "not requested (--backend numpy)"
    if opts.backend in (None, "cupy", "all"):
        cupy, gpu_reason = gpu_status()

    steps: list[Step] = []
    if "conv" in opts.ops and want_cpu:
        steps += _cpu_cases(opts, torch, torch_reason, notes)
    tv_gpu = _gpu_references(torch, torch_reason, notes) if cupy is not None else None
    if "conv" in opts.ops and cupy is not None:
        steps += _gpu_cases(opts, cupy, torch, tv_gpu)
    if "roi" in opts.ops:
        steps += _bench_roi.cpu_steps(opts, torch, torch_reason, notes) if want_cpu else []
        steps += _bench_roi.gpu_steps(opts, cupy, torch, tv_gpu) if cupy is not None else []

    before = cpu_counters()
    rows = _run_cases(steps, opts.repeat, cupy, torch)
    load = other_load(before, cpu_counters())
    if load is not None and load > 0.1:
        notes.append(
            f"other processes kept {load:.0%} of the CPUs busy during the run: CPU timings are inflated and noisy"
        )
    env = _environment(torch, threads, cupy)
    env["other_cpu_load"] = load
    return {
        "environment": env,
        "settings": {
            "repeat": opts.repeat,
            "ops": [op for op in OPS if op in opts.ops],
            "backends": sorted({s.backend for s in steps}),
            "kernel": KERNEL,
            "padding": PADDING,
            "roi": _bench_roi.settings(),
        },
        "results": rows,
        "gpu_skipped": None if cupy is not None else gpu_reason,
        "notes": notes + _error_notes(rows),
    }


def _row_shape(row: dict) -> Shape:
    return Shape(*row["shape"].values())  # as_dict keeps the field order


# Table columns: (header, function of a row -> cell text)
def _ms(name: str, phase: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        res = row.get(name)
        if res is None:
            return "-"
        value = res.get(f"{phase}_ms")
        if value is None:
            return "error" if "error" in res else "-"
        return _fmt_ms(value)

    return cell


def _fmt_ms(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _ratio_cell(name: str, phase: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        ratios = row["ratios"].get(name, {})
        r = ratios.get(phase)
        if r is None:
            return "-"
        lo_hi = ratios.get(f"{phase}_range")
        return f"{r:.2f}x" if lo_hi is None else f"{r:.2f}x ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})"

    return cell


def _peak_cell(name: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        res = row.get(name) or {}
        return f"{res['peak_extra_mib']:.1f}" if "peak_extra_mib" in res else "-"

    return cell


def _bound_cell(row: dict) -> str:
    within = row["ours"].get("within_workspace")
    return "-" if within is None else ("yes" if within else "NO")


def _warmup_cell(row: dict) -> str:
    ours = row["ours"]
    if "warmup_fwdbwd_s" not in ours:
        return "-"
    return f"{ours['warmup_fwd_s'] + ours['warmup_fwdbwd_s']:.2f}"


_SHAPE = ("N,C,H,W,Co", lambda r: str(_row_shape(r)))
CPU_COLUMNS = [
    _SHAPE,
    ("fwd ms", _ms("ours", "fwd")),
    ("dense fwd ms", _ms("dense", "fwd")),
    ("ratio", _ratio_cell("dense", "fwd")),
    ("fwd+bwd ms", _ms("ours", "fwdbwd")),
    ("dense fwd+bwd ms", _ms("dense", "fwdbwd")),
    ("ratio", _ratio_cell("dense", "fwdbwd")),
    ("peak extra MiB", _peak_cell("ours")),
    ("in bound", _bound_cell),
    ("warm-up s", _warmup_cell),
]
GPU_COLUMNS = [
    _SHAPE,
    ("dtype", lambda r: r["dtype"]),
    ("fwd ms", _ms("ours", "fwd")),
    ("tv fwd", _ms("torchvision", "fwd")),
    ("cuDNN fwd", _ms("dense", "fwd")),
    ("fwd+bwd ms", _ms("ours", "fwdbwd")),
    ("tv f+b", _ms("torchvision", "fwdbwd")),
    ("cuDNN f+b", _ms("dense", "fwdbwd")),
    ("/tv f+b", _ratio_cell("torchvision", "fwdbwd")),
    ("/cuDNN f+b", _ratio_cell("dense", "fwdbwd")),
    ("peak MiB", _peak_cell("ours")),
    ("in bound", _bound_cell),
    ("tv peak MiB", _peak_cell("torchvision")),
]


def format_table(columns: list, rows: list[dict], left: int = 1) -> str:
    """Columns ``(header, cell function)``; the first ``left`` are text (left-aligned)."""
    cells = [[header for header, _ in columns]] + [[fn(row) for _, fn in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _reference_label(rows: list[dict], name: str) -> str:
    labels = {row[name]["label"] for row in rows if name in row}
    return ", ".join(sorted(labels)) or "-"


def format_report(report: dict) -> str:
    from . import roi as _bench_roi

    env, out = report["environment"], []
    th = env["threads"]
    blas = f"BLAS {th['blas']}" if th["blas"] else "BLAS default (threadpoolctl not installed)"
    torch_threads = f"torch {th['torch']}, " if th["torch"] else ""
    out.append(
        f"deformarray {env['deformarray']} bench ({', '.join(report['settings']['ops'])}), "
        f"median of {report['settings']['repeat']} interleaved runs (range in brackets)"
    )
    layer = env["numba_threading_layer"] or "layer unknown"
    out.append(
        f"threads: numba {th['numba']} ({layer}), {torch_threads}{blas}; "
        f"workspace bound {env['workspace_limit_mib']:.0f} MiB"
    )
    conv = [r for r in report["results"] if r["op"] == "deform_conv2d"]
    cpu = [r for r in conv if r["backend"] == "numpy"]
    gpu = [r for r in conv if r["backend"] == "cupy"]
    title = f"deform_conv2d (mask + bias, {KERNEL}x{KERNEL}, padding {PADDING})"
    if cpu:
        out += [
            "",
            f"{title}, CPU, numpy arrays, {cpu[0]['dtype']}; dense = {_reference_label(cpu, 'dense')}",
            format_table(CPU_COLUMNS, cpu),
            "ms = median over the runs; ratio = ours / dense within each run, median (range); "
            "warm-up = first fwd + first fwd+bwd call (Numba compile)",
            "peak extra = largest NumPy workspace (tracemalloc) beyond outputs/gradients; "
            "in bound = within the workspace bound",
        ]
    if gpu:
        out += [
            "",
            f"{title}, GPU ({env['gpu']}), cupy arrays; tv = {_reference_label(gpu, 'torchvision')}; "
            f"cuDNN = {_reference_label(gpu, 'dense')}",
            format_table(GPU_COLUMNS, gpu),
            "/tv, /cuDNN = ours / reference; peak = CuPy pool (ours) or torch allocator (tv) beyond outputs/gradients",
        ]
    out += _bench_roi.format_sections([r for r in report["results"] if r["op"] != "deform_conv2d"], env["gpu"])
    if report["gpu_skipped"]:
        out += ["", f"GPU section skipped: {report['gpu_skipped']}"]
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)
