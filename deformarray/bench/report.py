"""``deformarray bench``'s run and report: ``run(opts)`` measures the selected operator
families (``registry.FAMILIES``, in that order; per family its CPU rows, then its GPU rows)
with one progress bar and returns the report (rows, environment, settings, notes), which
``--json`` prints as it is; ``format_report(report)`` makes the text tables, one section
per family and device.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from . import common as C
from . import registry
from .common import Options, Progress, Step


def _run_cases(steps: list[Step], repeat: int, cupy: Any | None, torch: Any | None) -> list[dict]:
    progress = Progress(len(steps))
    rows = []
    try:
        for step in steps:
            rows.append(step.run(repeat, progress))
            if step.backend == "cupy":
                C.release_gpu_memory(cupy, torch)
    finally:
        progress.close()
    return rows


def _error_notes(rows: list[dict]) -> list[str]:
    notes = []
    for row in rows:
        family = registry.family_of(row)
        notes += [
            f"{family.row_label(row)} {name}: {row[name]['error']}"
            for name in family.CONTENDERS
            if "error" in row.get(name, {})
        ]
    return notes


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
        "workspace_limit_mib": deformarray.get_workspace_limit() / C.MIB,
        "gpu": C.describe_gpu(cupy) if cupy is not None else None,
    }


def run(opts: Options) -> dict:
    """Run the selected sections and return the report (rows, environment, notes).

    Order: per family of the registry, its CPU rows, then its GPU rows (conv CPU, conv GPU,
    RoI CPU, RoI GPU: the order of the report's tables)."""
    notes: list[str] = []
    torch, torch_reason = C.optional_import("torch")
    threads = C.configure_threads(opts.threads, torch)

    want_cpu = opts.backend in (None, "numpy", "all")
    cupy, gpu_reason = None, "not requested (--backend numpy)"
    if opts.backend in (None, "cupy", "all"):
        cupy, gpu_reason = C.gpu_status()

    steps: list[Step] = []
    tv_gpu, gpu_ready = None, cupy is None
    for family in registry.FAMILIES:
        selected = family.NAME in opts.ops
        if selected and want_cpu:
            steps += family.cpu_steps(opts, torch, torch_reason, notes)
        if not gpu_ready:  # once, after the first family's CPU rows (whose notes come first)
            tv_gpu, gpu_ready = C.gpu_references(torch, torch_reason, notes), True
        if selected and cupy is not None:
            steps += family.gpu_steps(opts, cupy, torch, tv_gpu)

    before = C.cpu_counters()
    rows = _run_cases(steps, opts.repeat, cupy, torch)
    load = C.other_load(before, C.cpu_counters())
    if load is not None and load > 0.1:
        notes.append(
            f"other processes kept {load:.0%} of the CPUs busy during the run: CPU timings are inflated and noisy"
        )
    env = _environment(torch, threads, cupy)
    env["other_cpu_load"] = load
    settings: dict = {
        "repeat": opts.repeat,
        "ops": [name for name in registry.NAMES if name in opts.ops],
        "backends": sorted({s.backend for s in steps}),
    }
    for family in registry.FAMILIES:
        settings.update(family.settings())
    return {
        "environment": env,
        "settings": settings,
        "results": rows,
        "gpu_skipped": None if cupy is not None else gpu_reason,
        "notes": notes + _error_notes(rows),
    }


def format_report(report: dict) -> str:
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
    for family in registry.FAMILIES:
        out += family.format_sections([r for r in report["results"] if r["op"] in family.ROW_OPS], env["gpu"])
    if report["gpu_skipped"]:
        out += ["", f"GPU section skipped: {report['gpu_skipped']}"]
    out += [f"note: {n}" for n in report["notes"]]
    return "\n".join(out)
