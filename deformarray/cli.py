"""``deformarray`` command line (also ``python -m deformarray``): ``info`` (versions,
backends, settings), ``bench`` and ``warmup`` (compile the CPU kernels ahead), and
``--version``.

All must work on any machine: a missing cupy, torch or GPU is a one-line reason in the
output, never a traceback. The benchmark itself lives in the package ``deformarray.bench``
(its operator families in ``deformarray.bench.registry``: ``--op`` and the shape options come
from there), the warm-up in ``deformarray._warmup``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Sequence

from . import _warmup
from .bench import common as bench_common
from .bench import plot as bench_plot
from .bench import registry as bench_registry
from .bench import report as bench_report

# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------


def _numba_threading_layer() -> str:
    """Numba only picks its threading layer on the first parallel call: make a tiny one
    (well under a second) so the answer is the layer our kernels will really use."""
    import numba
    import numpy as np

    @numba.njit(parallel=True, cache=False)
    def touch(a):
        for i in numba.prange(a.shape[0]):
            a[i] = i

    try:
        touch(np.empty(2))
        return numba.threading_layer()
    except Exception as exc:
        return f"unavailable ({bench_common.one_line(exc)})"


def _blas_info() -> str:
    import numpy as np

    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        text = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:
        return "unknown"
    tpc, _ = bench_common.optional_import("threadpoolctl")
    if tpc is not None:
        pools = [p for p in tpc.threadpool_info() if p.get("user_api") == "blas"]
        if pools:
            text += f", {pools[0].get('num_threads')} threads"
    return text


def _cupy_lines() -> list[tuple[str, str]]:
    """cupy: importable? GPU present? device name and compute capability; NVRTC version.
    NVRTC is asked separately because it works without a GPU (kernels still compile)."""
    cupy, reason = bench_common.optional_import("cupy")
    if cupy is None:
        return [("cupy", reason.removeprefix("cupy ")), ("GPU", f"none: {reason}")]
    lines = [("cupy", cupy.__version__)]
    try:
        major, minor = cupy.cuda.nvrtc.getVersion()
        lines.append(("NVRTC", f"{major}.{minor}"))
    except Exception as exc:
        lines.append(("NVRTC", f"unavailable ({bench_common.one_line(exc)})"))
    gpu, reason = bench_common.gpu_status()
    if gpu is None:
        lines.append(("GPU", f"none: {reason}"))
        return lines
    for i in range(gpu.cuda.runtime.getDeviceCount()):
        lines.append((f"GPU {i}", bench_common.describe_gpu(gpu, i)))
    rt = gpu.cuda.runtime.runtimeGetVersion()
    drv = gpu.cuda.runtime.driverGetVersion()
    lines.append(("CUDA", f"runtime {rt // 1000}.{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}"))
    return lines


def _framework_lines() -> list[tuple[str, str]]:
    lines = []
    for name in ("torch", "torchvision", "jax"):
        mod, reason = bench_common.optional_import(name)
        if mod is None:
            lines.append((name, reason.removeprefix(f"{name} ")))
            continue
        extra = ""
        if name == "torch":
            cuda = f"CUDA {mod.version.cuda}" if mod.version.cuda else "CPU-only build"
            extra = f" ({cuda}, {mod.get_num_threads()} threads)"
        lines.append((name, f"{mod.__version__}{extra}"))
    return lines


def version() -> str:
    """The installed distribution's version, else the package's own ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("deformarray")
    except metadata.PackageNotFoundError:
        import deformarray

        return str(getattr(deformarray, "__version__", "unknown"))


def info_lines() -> list[tuple[str, str]]:
    import numba
    import numpy as np

    import deformarray

    return [
        ("deformarray", f"{deformarray.__version__} ({os.path.dirname(deformarray.__file__)})"),
        ("python", f"{platform.python_version()} ({platform.platform()})"),
        ("numpy", np.__version__),
        ("BLAS", _blas_info()),
        ("numba", numba.__version__),
        (
            "numba threads",
            f"{numba.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS} (CPU cores: {os.cpu_count()})",
        ),
        ("threading layer", _numba_threading_layer()),
        ("workspace bound", f"{deformarray.get_workspace_limit() / bench_common.MIB:g} MiB"),
        ("deterministic", f"{deformarray.get_deterministic()} (CUDA backward default; CPU always is)"),
        ("backends", "numpy (always)" + (", cupy" if bench_common.gpu_status()[0] is not None else "")),
        *_cupy_lines(),
        *_framework_lines(),
    ]


def cmd_info(args: argparse.Namespace) -> int:
    lines = info_lines()
    if args.json:
        print(json.dumps(dict(lines), indent=2))
    else:
        width = max(len(k) for k, _ in lines)
        for key, value in lines:
            print(f"{key.ljust(width)}  {value}")
    return 0


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------


def _parser_arg(parse):
    """An argparse ``type`` from a parser raising ValueError (its message is the error)."""

    def convert(text: str) -> list:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


# --op value -> operator families, run in the registry's order
OP_CHOICES = {**{name: (name,) for name in bench_registry.NAMES}, "all": bench_registry.NAMES}


def _and(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _check_bench_args(args: argparse.Namespace) -> str | None:
    """Errors argparse cannot see by itself; returned as text for ``parser.error``."""
    import numba

    if args.threads is not None and args.threads > numba.config.NUMBA_NUM_THREADS:
        return (
            f"--threads {args.threads} exceeds Numba's maximum {numba.config.NUMBA_NUM_THREADS} "
            "(set NUMBA_NUM_THREADS before starting to raise it)"
        )
    if args.dtype not in (None, *bench_common.CPU_DTYPES) and args.backend in (None, "numpy", "all"):
        return f"--dtype {args.dtype} runs on the cupy backend only: add --backend cupy"
    ops = OP_CHOICES[args.op]
    for family in bench_registry.FAMILIES:
        for option in family.SHAPE_OPTIONS:
            if getattr(args, option.dest) is not None and family.NAME not in ops:
                return (
                    f"{option.flag} sets {family.ROWS}, which --op {args.op} does not run: "
                    f"use --op {family.NAME} or all"
                )
    if args.plot is not None:  # before the benchmark: minutes of timing, then no chart, is worse
        return bench_plot.check_target(args.plot)
    return None


def _save_plot(report: dict, path: str) -> bool:
    """Write the chart; a failure now (disk full, directory removed during the run) is one
    line on stderr, after the table or JSON, which are printed first either way."""
    try:
        bench_plot.plot_report(report, path)
    except Exception as exc:
        print(f"deformarray bench: --plot {path} not written: {bench_common.one_line(exc)}", file=sys.stderr)
        return False
    print(f"plot written to {path}", file=sys.stderr)
    return True


def cmd_bench(args: argparse.Namespace) -> int:
    opts = bench_common.Options(
        ops=OP_CHOICES[args.op],
        dtype=args.dtype,
        repeat=args.repeat,
        backend=args.backend,
        threads=args.threads,
        shapes={o.dest: getattr(args, o.dest) for f in bench_registry.FAMILIES for o in f.SHAPE_OPTIONS},
    )
    report = bench_report.run(opts)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(bench_report.format_report(report))
    if not report["results"]:
        print("nothing was run" + (": no plot written" if args.plot else ""), file=sys.stderr)
        return 1
    # a requested chart that could not be written fails the command, as a missing output should
    plotted = args.plot is None or _save_plot(report, args.plot)
    # a failing deformarray call is a bug worth a non-zero status; a failing reference is not
    return 1 if not plotted or any("error" in row["ours"] for row in report["results"]) else 0


# ---------------------------------------------------------------------------------------
# warmup
# ---------------------------------------------------------------------------------------


def cmd_warmup(args: argparse.Namespace) -> int:
    dtypes = _warmup.DTYPES if args.dtype == "all" else (args.dtype,)
    print(f"compiling the CPU kernels of every operator for {', '.join(dtypes)} (forward and backward)")

    def report(op: str, dtype: str, was_cold: bool, seconds: float) -> None:
        state = "compiled" if was_cold else "already cached"
        print(f"  {op:<18} {dtype:<8} {state:<15} {seconds:6.1f} s", flush=True)

    try:
        _warmup.warmup(dtypes, report)
    except Exception as exc:
        print(f"deformarray warmup: failed: {bench_common.one_line(exc)}", file=sys.stderr)
        return 1
    where = _warmup.cache_dir()
    print("done: later processes load them from Numba's cache" + (f" ({where})" if where else ""))
    return 0


# ---------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformarray", description="deformarray command line tools")
    parser.add_argument("--version", action="version", version=f"deformarray {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,bench,warmup}")

    info = sub.add_parser("info", help="versions, backends, GPU, settings")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=cmd_info)

    families = bench_registry.FAMILIES
    summaries = [f.SUMMARY for f in families]
    bench = sub.add_parser(
        "bench",
        help=f"time {_and(summaries)} against their baselines (dense floors, the grid_sample composition)",
        description=f"Time {', then '.join(f.DESCRIPTION for f in families)}, from one run.",
    )
    bench.add_argument(
        "--op",
        choices=tuple(OP_CHOICES),
        default="all",
        help=f"operators: {', '.join(f'{f.NAME} = {f.OPERATORS}' for f in families)}, "
        f"all = {' then '.join(bench_registry.NAMES)} (default)",
    )
    for family in families:
        for option in family.SHAPE_OPTIONS:
            bench.add_argument(option.flag, type=_parser_arg(option.parse), metavar=option.metavar, help=option.help)
    bench.add_argument(
        "--dtype",
        choices=(*bench_common.CPU_DTYPES, "float16"),
        help="default: float32 on CPU; float32 and float16 on GPU (float16: cupy only)",
    )
    bench.add_argument(
        "--repeat",
        type=_positive_int,
        default=5,
        help="timed rounds, each running every contender once (interleaved); median and range reported (default 5)",
    )
    bench.add_argument(
        "--backend", choices=("numpy", "cupy", "all"), help="default: numpy, plus cupy when a GPU is present"
    )
    bench.add_argument("--threads", type=_positive_int, help="Numba (and torch, BLAS) thread count")
    bench.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    bench.add_argument(
        "--plot",
        metavar="FILE",
        help="also save a bar chart of the times to FILE (PNG; .svg/.pdf by extension); needs matplotlib, "
        "checked with FILE before the run",
    )
    bench.set_defaults(func=cmd_bench, subparser=bench)

    warmup = sub.add_parser(
        "warmup",
        help="compile the CPU kernels ahead (the first call otherwise takes 5-16 s per operator and dtype)",
        description="Run every operator forward and backward on tiny inputs, which compiles its CPU "
        "(Numba) kernels and stores them in Numba's on-disk cache: later processes start in well "
        "under a second. Run it once after installing or upgrading deformarray.",
    )
    warmup.add_argument(
        "--dtype", choices=(*_warmup.DTYPES, "all"), default="all", help="dtypes to compile (default: all)"
    )
    warmup.set_defaults(func=cmd_warmup)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        error = _check_bench_args(args)
        if error:
            args.subparser.error(error)  # status 2 and the bench usage line, like argparse's own
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - `python -m deformarray.cli` (or `python -m deformarray`)
    sys.exit(main())
