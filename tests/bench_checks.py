"""Helpers shared by the tests of ``deformarray bench`` (test_cli.py, test_bench_*.py):
stand-ins for a GPU, the usage-error and failing-call checks, the row checks of the
composition tables. Apart from checks.py so that the operator tests need not import the CLI."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from deformarray import cli
from deformarray.bench import common as bench_common

COMPOSITION_RATIOS = {"fwd", "fwdbwd", "fwd_range", "fwdbwd_range"}
TIMED = ("warmup_fwd_s", "fwd_ms", "fwd_min_ms", "fwd_max_ms", "fwd_times_ms", "warmup_fwdbwd_s", "fwdbwd_ms")


def stand_in_cupy(memory_pool=True):
    """NumPy posing as CuPy (with or without a default memory pool)."""
    fake = types.SimpleNamespace(
        asarray=np.asarray,
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(synchronize=lambda: None)),
    )
    if memory_pool:
        fake.get_default_memory_pool = lambda: types.SimpleNamespace(free_all_blocks=lambda: None)
    return fake


def stand_in_gpu(monkeypatch, torch_peak_extra, gpu_dtypes=None):
    """CuPy posing as NumPy, CPU torch posing as CUDA torch (its peak metered by
    ``torch_peak_extra``); ``gpu_dtypes`` replaces the default GPU dtypes. Returns the CuPy."""
    torch = pytest.importorskip("torch")
    fake_cupy = stand_in_cupy()
    monkeypatch.setattr(bench_common, "gpu_status", lambda: (fake_cupy, ""))
    monkeypatch.setattr(bench_common, "describe_gpu", lambda cupy, index=0: "Stand-in GPU")
    monkeypatch.setattr(bench_common, "cupy_peak_extra", bench_common.tracemalloc_peak_extra)
    monkeypatch.setattr(bench_common, "torch_cuda_peak_extra", torch_peak_extra)
    if gpu_dtypes is not None:
        monkeypatch.setattr(bench_common, "DEFAULT_GPU_DTYPES", gpu_dtypes)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    return fake_cupy


def gpu_row_without_cuda_torch(monkeypatch, bench_module, opts, index):
    """Run GPU step ``index`` of ``bench_module`` with a stand-in CuPy and no CUDA torch: ours
    alone, no composition. Returns the row and its formatted table."""
    steps = bench_module.gpu_steps(opts, stand_in_cupy(memory_pool=False), None, None)
    monkeypatch.setattr(bench_common, "cupy_peak_extra", bench_common.tracemalloc_peak_extra)
    row = steps[index].run(1, bench_common.Progress(1, types.SimpleNamespace(write=lambda s: None, flush=lambda: None)))
    assert row["backend"] == "cupy" and "composition" not in row and row["ratios"] == {}
    text = "\n".join(bench_module.format_sections([row], "Stand-in GPU"))
    assert "comp =" not in text
    return row, text


def check_usage_error(argv, message, capsys):
    """``argv`` exits with status 2, a usage line and ``message``, no traceback."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err and "Traceback" not in err


def bench_with_a_failing_call(monkeypatch, capsys, function, error, argv):
    """Run ``argv`` with ``deformarray.<function>`` raising ``error`` (a two-line message):
    exit status 1, the second line not shown. Returns the output."""
    import deformarray

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(deformarray, function, broken)
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    assert "second line" not in out
    return out


def bench_without_torch(monkeypatch, capsys, argv):
    """Run ``argv`` with torch and torchvision hidden: it succeeds, without empty reference
    columns or a traceback. Returns the output."""
    for name in ("torch", "torchvision"):
        monkeypatch.setitem(sys.modules, name, None)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "comp fwd ms" not in out and "comp peak" not in out  # no empty reference columns
    assert "Traceback" not in out
    return out


def check_cpu_composition_row(row):
    """A float64 NumPy row of the JSON report, timed twice, with the grid_sample composition."""
    assert row["backend"] == "numpy" and row["dtype"] == "float64"
    assert row["composition"]["label"].startswith("grid_sample composition (torch ")
    for name in ("ours", "composition"):
        for key in (*TIMED, "peak_extra_fwd_mib", "peak_extra_fwdbwd_mib", "peak_extra_mib"):
            assert key in row[name], (name, key)
        assert len(row[name]["fwd_times_ms"]) == 2
    assert row["ours"]["within_workspace"] is True
    ratios = row["ratios"]["composition"]
    assert set(ratios) == COMPOSITION_RATIOS and ratios["fwdbwd"] > 0


def check_gpu_composition_rows(rows, text):
    """GPU rows on stand-ins and their table ``text``: composition and ratios in each, the
    composition's columns in the header, no float16 row."""
    for row in rows:
        assert "error" not in row["ours"] and "error" not in row["composition"]
        assert COMPOSITION_RATIOS <= set(row["ratios"]["composition"])
        assert "peak_extra_mib" in row["composition"]
    assert "GPU (Stand-in GPU), cupy arrays; comp = grid_sample composition (torch " in text
    for header in ("dtype", "comp fwd", "/comp fwd", "comp f+b", "/comp f+b", "peak MiB", "comp peak MiB"):
        assert header in text.splitlines()[2]
    assert not any("float16" in r["dtype"] for r in rows)
