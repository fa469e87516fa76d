"""What every operator family of ``deformarray bench`` shares: the measurement rule, the
memory meters, optional imports and the GPU, machine load, progress, options and tables.

Every contender goes through one path: an ``Impl`` is a pair of closures (forward,
forward+backward) plus how to wait for its device and how to read its peak memory, and
``measure_all`` times several of them interleaved (``ratios_of`` takes their ratios within
each round). A family (``conv.py``, ``roi.py``) builds Impls, measures them into rows and
formats its tables with the cell helpers here; ``report.py`` runs the families.

Nothing here imports another module of this package.
"""

from __future__ import annotations

import importlib
import os
import shutil
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

MIB = 1 << 20

DEFAULT_GPU_DTYPES = ("float32", "float16")
CPU_DTYPES = ("float32", "float64")  # the numpy backend's dtypes (SPEC)


# ---------------------------------------------------------------------------------------
# Options, steps and the family interface
# ---------------------------------------------------------------------------------------


@dataclass
class Options:
    """What ``deformarray bench`` was asked to run."""

    ops: tuple[str, ...]  # operator families (registry names); they run in the registry's order
    dtype: str | None = None  # None: float32 on CPU, float32 + float16 on GPU
    repeat: int = 5
    backend: str | None = None  # numpy | cupy | all; None: numpy, plus cupy with a GPU
    threads: int | None = None
    # the sizes given to the families' shape options, by ShapeOption.dest ("shapes",
    # "roi_shapes", ...); absent or None: that family's defaults
    shapes: dict[str, list | None] = field(default_factory=dict)


class Step(NamedTuple):
    """One row to measure: ``run(repeat, progress)`` returns the row."""

    backend: str
    run: Callable[[int, Progress], dict]


class ShapeOption(NamedTuple):
    """A ``--...shapes`` option of ``deformarray bench``, owned by one family."""

    flag: str  # "--roi-shapes"
    parse: Callable[[str], list]  # text -> sizes; ValueError otherwise (its message is the CLI's error)
    metavar: str
    help: str

    @property
    def dest(self) -> str:
        """argparse's name of the option ("roi_shapes"), the key of its sizes in ``Options.shapes``."""
        return self.flag.lstrip("-").replace("-", "_")


class Family(Protocol):
    """What the module of an operator family provides (``conv.py`` and ``roi.py`` are two).
    ``registry.FAMILIES`` lists them; the run, the report, the chart and the command line
    reach a family only through these names."""

    NAME: str  # the --op value: "conv"
    OPERATORS: str  # what --op NAME runs, for --op's help: "deform_conv2d"
    SUMMARY: str  # the same in a few words, for bench's one-line help
    DESCRIPTION: str  # what is timed against what, for bench's description
    ROWS: str  # its rows, as the command line's errors name them: "the deform_conv2d rows"
    ROW_OPS: tuple[str, ...]  # the "op" of its result rows
    CONTENDERS: tuple[str, ...]  # the contender keys of its rows, "ours" first (the notes' order)
    SHAPE_OPTIONS: tuple[ShapeOption, ...]  # its command-line sizes, in --help order

    def settings(self) -> dict:
        """Its fixed parameters, merged into the report's "settings"."""
        ...

    def cpu_steps(self, opts: Options, torch: Any | None, torch_reason: str, notes: list[str]) -> list[Step]:
        """Its CPU (numpy) rows to measure; a missing reference adds a line to ``notes``."""
        ...

    def gpu_steps(self, opts: Options, cupy: Any, torch: Any | None, tv: Any | None) -> list[Step]:
        """Its GPU (cupy) rows; ``tv``: torchvision with CUDA torch, else None (``gpu_references``)."""
        ...

    def row_label(self, row: dict) -> str:
        """``backend [op (variant)] shape dtype``: how the notes name one of its rows."""
        ...

    def chart_label(self, row: dict) -> tuple[str, str]:
        """The operator line (short) and the shape line of a row's group in the chart."""
        ...

    def format_sections(self, rows: list[dict], gpu_name: str | None) -> list[str]:
        """Its tables, as lines (each section opens with an empty line); [] without rows."""
        ...


# ---------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------


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


def gpu_references(torch: Any | None, torch_reason: str, notes: list) -> Any | None:
    """torchvision for the GPU rows of every family (None without it or without CUDA torch,
    with a note); cuDNN autotuning on, so that the dense yardstick has its best algorithm."""
    tv, tv_reason = optional_import("torchvision") if torch is not None else (None, torch_reason)
    if torch is None or not torch.cuda.is_available():
        notes.append(f"GPU: no CUDA torch ({torch_reason or 'torch is a CPU-only build'}): torch columns skipped")
        return None
    torch.backends.cudnn.benchmark = True  # the dense yardstick with its best algorithm
    if tv is None:
        notes.append(f"GPU: {tv_reason}: torchvision columns skipped")
    return tv


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


def noop() -> None:
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
    sync: Callable[[], None] = noop
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


def _ratio(ours: float | None, ref: float | None) -> float | None:
    return ours / ref if ours is not None and ref else None


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


def torch_cpu_peak_extra(fn: Callable[[], Any]) -> int:
    """Peak bytes of torch's CPU allocations during ``fn`` minus what it returns.

    torch keeps no peak figure for the CPU; its profiler (``profile_memory=True``) records
    every allocation and free with its time, and the running sum of those gives the peak.
    Kineto's start/stop lines on the process's stderr are muted meanwhile.
    """
    from torch.profiler import ProfilerActivity, profile

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return peak - _nbytes(result)


def torch_autograd_impl(
    name: str,
    label: str,
    torch: Any,
    op: Callable,
    args: tuple,
    grad_output: Any,
    sync: Callable[[], None] = noop,
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
# Tables: columns are (header, function of a row -> cell text)
# ---------------------------------------------------------------------------------------


def ms_cell(name: str, phase: str) -> Callable[[dict], str]:
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


def ratio_cell(name: str, phase: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        ratios = row["ratios"].get(name, {})
        r = ratios.get(phase)
        if r is None:
            return "-"
        lo_hi = ratios.get(f"{phase}_range")
        return f"{r:.2f}x" if lo_hi is None else f"{r:.2f}x ({lo_hi[0]:.2f}-{lo_hi[1]:.2f})"

    return cell


def peak_cell(name: str) -> Callable[[dict], str]:
    def cell(row: dict) -> str:
        res = row.get(name) or {}
        return f"{res['peak_extra_mib']:.1f}" if "peak_extra_mib" in res else "-"

    return cell


def bound_cell(row: dict) -> str:
    within = row["ours"].get("within_workspace")
    return "-" if within is None else ("yes" if within else "NO")


def warmup_cell(row: dict) -> str:
    ours = row["ours"]
    if "warmup_fwdbwd_s" not in ours:
        return "-"
    return f"{ours['warmup_fwd_s'] + ours['warmup_fwdbwd_s']:.2f}"


def format_table(columns: list, rows: list[dict], left: int = 1) -> str:
    """Columns ``(header, cell function)``; the first ``left`` are text (left-aligned)."""
    cells = [[header for header, _ in columns]] + [[fn(row) for _, fn in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def reference_label(rows: list[dict], name: str) -> str:
    labels = {row[name]["label"] for row in rows if name in row}
    return ", ".join(sorted(labels)) or "-"


# ---------------------------------------------------------------------------------------
# Families timed against a torch grid_sample composition (dcn.py, msda.py)
# ---------------------------------------------------------------------------------------


def composition_builder(ours: Callable, reference: Callable, torch: Any | None, cupy: Any | None = None) -> Callable:
    """``build(key, inputs) -> [Impl]``: ``ours(*key, a, sync, meter)`` and, when ``torch`` is
    given, ``reference(*key, torch, t, sync, meter)`` (the composition). ``inputs`` are NumPy
    arrays with a ``map`` method. ``cupy`` None: the CPU rows (numpy ``a``, CPU torch tensors
    over the same buffers, tracemalloc and profiler meters); otherwise the GPU rows (``a``
    copied to cupy, ``torch`` CUDA torch over the same buffers, zero-copy through DLPack)."""

    def build(key: tuple, a_np: Any) -> list[Impl]:
        if cupy is None:
            impls = [ours(*key, a_np, noop, tracemalloc_peak_extra)]
            if torch is not None:
                impls.append(reference(*key, torch, a_np.map(torch.from_numpy), noop, torch_cpu_peak_extra))
            return impls
        a = a_np.map(cupy.asarray)
        impls = [ours(*key, a, cupy.cuda.Device().synchronize, cupy_peak_extra)]
        if torch is not None:
            t = a.map(torch.from_dlpack)  # zero-copy views of the same cupy buffers
            impls.append(reference(*key, torch, t, torch.cuda.synchronize, torch_cuda_peak_extra))
        return impls

    return build


def composition_row(
    op: str, case: Any, label: Callable[[dict], str], impls: Callable[[], list[Impl]], repeat: int, progress: Progress
) -> dict:
    """Measure ours and the composition for one case, interleaved; ratios are ours /
    composition. ``case`` has ``backend``, ``shape`` (with ``variant``), ``dtype`` and
    ``shape_dict()``; ``impls()`` makes the inputs and the contenders (after the progress
    line names the row)."""
    import deformarray

    row: dict = {
        "op": op,
        "variant": case.shape.variant,
        "backend": case.backend,
        "shape": case.shape_dict(),
        "dtype": case.dtype,
    }
    progress.start(label(row))
    contenders = impls()
    row.update(measure_all(contenders, repeat, progress))
    del contenders  # drop this case's arrays before the next one is built
    row["ratios"] = {"composition": ratios_of(row["ours"], row["composition"])} if "composition" in row else {}
    if "peak_extra_mib" in row["ours"]:
        row["ours"]["within_workspace"] = row["ours"]["peak_extra_mib"] * MIB <= deformarray.get_workspace_limit()
    progress.finish_step()
    return row


def composition_cpu_columns(lead: list, with_ref: bool) -> list:
    ref_fwd = [("comp fwd ms", ms_cell("composition", "fwd")), ("ratio", ratio_cell("composition", "fwd"))]
    ref_fb = [
        ("comp fwd+bwd ms", ms_cell("composition", "fwdbwd")),
        ("ratio", ratio_cell("composition", "fwdbwd")),
    ]
    return [
        *lead,
        ("fwd ms", ms_cell("ours", "fwd")),
        *(ref_fwd if with_ref else []),
        ("fwd+bwd ms", ms_cell("ours", "fwdbwd")),
        *(ref_fb if with_ref else []),
        ("peak extra MiB", peak_cell("ours")),
        *([("comp peak MiB", peak_cell("composition"))] if with_ref else []),
        ("in bound", bound_cell),
        ("warm-up s", warmup_cell),
    ]


def composition_gpu_columns(lead: list, with_ref: bool) -> list:
    ref_fwd = [("comp fwd", ms_cell("composition", "fwd")), ("/comp fwd", ratio_cell("composition", "fwd"))]
    ref_fb = [("comp f+b", ms_cell("composition", "fwdbwd")), ("/comp f+b", ratio_cell("composition", "fwdbwd"))]
    return [
        *lead,
        ("dtype", lambda r: r["dtype"]),
        ("fwd ms", ms_cell("ours", "fwd")),
        *(ref_fwd if with_ref else []),
        ("fwd+bwd ms", ms_cell("ours", "fwdbwd")),
        *(ref_fb if with_ref else []),
        ("peak MiB", peak_cell("ours")),
        ("in bound", bound_cell),
        *([("comp peak MiB", peak_cell("composition"))] if with_ref else []),
    ]


def composition_sections(rows: list[dict], gpu_name: str | None, title: str, lead: list, gradients: str) -> list[str]:
    """The CPU and GPU tables (lines) of a family timed against a composition, empty when no
    such row ran; ``lead``: its first (text) columns; ``gradients``: what its backward
    returns, for the note under the CPU table."""
    out: list[str] = []
    cpu = [r for r in rows if r["backend"] == "numpy"]
    gpu = [r for r in rows if r["backend"] == "cupy"]
    if cpu:
        with_ref = any("composition" in r for r in cpu)
        ref = f"; comp = {reference_label(cpu, 'composition')}" if with_ref else ""
        out += [
            "",
            f"{title}, CPU, numpy arrays, {cpu[0]['dtype']}{ref}",
            format_table(composition_cpu_columns(lead, with_ref), cpu, left=len(lead)),
            ("ratio = ours / composition within each run, median (range): below 1 = ours faster; " if with_ref else "")
            + f"fwd+bwd = forward, then backward ({gradients})",
            "peak extra = largest NumPy workspace (tracemalloc) beyond outputs/gradients"
            + ("; comp peak = torch's CPU allocations (profiler) beyond outputs/gradients" if with_ref else "")
            + "; warm-up = first fwd + first fwd+bwd call",
        ]
    if gpu:
        with_ref = any("composition" in r for r in gpu)
        ref = f"; comp = {reference_label(gpu, 'composition')}" if with_ref else ""
        out += [
            "",
            f"{title}, GPU ({gpu_name}), cupy arrays{ref}",
            format_table(composition_gpu_columns(lead, with_ref), gpu, left=len(lead)),
            ("/comp = ours / composition (below 1 = ours faster); " if with_ref else "")
            + "peak = CuPy pool (ours)"
            + (" or torch allocator (comp)" if with_ref else "")
            + " beyond outputs/gradients",
        ]
    return out
