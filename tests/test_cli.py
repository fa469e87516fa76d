"""Fast tests of the ``deformarray`` command line (``info`` and ``bench``) and its harness.

Benchmarks here use tiny shapes and one repeat: they check that the tool runs and reports,
not the figures. The GPU section is exercised with stand-ins for CuPy and CUDA torch so
that its wiring is tested on machines without a GPU as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from deformarray import _bench, cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--shapes", "1,2,5,5,3;2,3,6,4,2", "--repeat", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """bench sets Numba's (and torch's) thread count: give other tests theirs back."""
    import numba

    torch = sys.modules.get("torch")
    before = numba.get_num_threads(), torch.get_num_threads() if torch else None
    yield
    numba.set_num_threads(before[0])
    if torch is not None and before[1] is not None:
        torch.set_num_threads(before[1])


def _hide(monkeypatch, *names):
    """Make ``import name`` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------


def test_info_prints_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("deformarray", "python", "numpy", "numba", "numba threads", "threading layer",
                "workspace bound", "backends", "cupy", "torch", "torchvision", "jax"):
        assert any(line.startswith(key + " ") for line in out.splitlines()), key
    assert "numpy (always)" in out
    assert "256 MiB" in out or "workspace bound" in out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["numpy"] == np.__version__
    assert "backends" in data and "workspace bound" in data


def test_info_without_optional_packages(monkeypatch, capsys):
    _hide(monkeypatch, "cupy", "torch", "torchvision", "jax")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "Traceback" not in out
    for name in ("cupy", "torch", "torchvision", "jax"):
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert line.rstrip().endswith("not installed"), line


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------


def test_bench_prints_table(capsys):
    assert cli.main(["bench", *TINY, "--backend", "numpy"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for header in ("N,C,H,W,Co", "fwd ms", "dense fwd ms", "ratio", "fwd+bwd ms", "peak extra MiB", "in bound",
                   "warm-up s"):
        assert header in out
    assert "1,2,5,5,3" in out and "2,3,6,4,2" in out
    assert "error" not in out
    assert "[1/2]" in captured.err  # progress: step lines when stderr is not a terminal


def test_bench_json(capsys):
    assert cli.main(["bench", *TINY, "--backend", "numpy", "--json", "--threads", "1", "--dtype", "float64"]) == 0
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON only
    assert set(report) >= {"environment", "settings", "results", "gpu_skipped", "notes"}
    assert report["environment"]["threads"]["numba"] == 1
    assert len(report["results"]) == 2
    row = report["results"][0]
    assert row["backend"] == "numpy" and row["dtype"] == "float64"
    assert row["shape"] == {"N": 1, "C_in": 2, "H": 5, "W": 5, "C_out": 3}
    ours = row["ours"]
    for key in ("warmup_fwd_s", "fwd_ms", "warmup_fwdbwd_s", "fwdbwd_ms", "peak_extra_mib", "within_workspace"):
        assert key in ours, key
    assert ours["within_workspace"] is True
    assert {"fwd_ms", "fwdbwd_ms", "label"} <= set(row["dense"])
    assert set(row["ratios"]["dense"]) == {"fwd", "fwdbwd"}
    assert row["ratios"]["dense"]["fwd"] > 0


def test_bench_without_torch_uses_numpy_dense(monkeypatch, capsys):
    _hide(monkeypatch, "torch", "torchvision")
    assert cli.main(["bench", *TINY, "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "NumPy im2col+matmul" in out
    assert "note: torch not installed" in out
    assert "Traceback" not in out


def test_bench_gpu_section_skips_without_gpu(capsys):
    cupy, reason = _bench.gpu_status()
    if cupy is not None:
        pytest.skip("a GPU is present: the section runs instead (see the stand-in test below)")
    assert cli.main(["bench", *TINY, "--backend", "all"]) == 0
    out = capsys.readouterr().out
    assert f"GPU section skipped: {reason}" in out
    assert cli.main(["bench", *TINY, "--backend", "cupy"]) == 1  # nothing could run


def test_bench_reports_a_failing_call_without_traceback(monkeypatch, capsys):
    import deformarray

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(deformarray, "deform_conv2d", broken)
    assert cli.main(["bench", *TINY, "--backend", "numpy"]) == 1
    out = capsys.readouterr().out
    assert "error" in out
    assert "RuntimeError: kernel exploded" in out and "second line" not in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--shapes", "1,2,3"], "--shapes"),
        (["bench", "--shapes", "1,2,3,4,x"], "--shapes"),
        (["bench", "--shapes", "0,2,3,4,5"], "at least 1"),
        (["bench", "--repeat", "0"], "--repeat"),
        (["bench", "--repeat", "two"], "--repeat"),
        (["bench", "--dtype", "int8"], "--dtype"),
        (["bench", "--dtype", "float16"], "cupy backend only"),
        (["bench", "--backend", "tpu"], "--backend"),
        (["bench", "--threads", "100000"], "--threads"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_a_clean_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and message in err
    assert "Traceback" not in err


def test_script_forwards_to_the_cli():
    script = ROOT / "benchmarks" / "bench_deform_conv.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--shapes" in proc.stdout and "--threads" in proc.stdout


# ---------------------------------------------------------------------------------------
# harness pieces
# ---------------------------------------------------------------------------------------


def test_parse_shapes():
    assert _bench.parse_shapes("1,2,3,4,5; 6,7,8,9,10;") == [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)]
    with pytest.raises(ValueError, match="5 positive integers"):
        _bench.parse_shapes("1,2,3,4,-5")
    with pytest.raises(ValueError, match="no shape"):
        _bench.parse_shapes(" ; ")


def test_inputs_make_fractional_samples():
    a = _bench.make_inputs(_bench.Shape(2, 3, 6, 5, 4), "float32")
    assert a.offset.shape == (2, 18, 6, 5) and a.mask.shape == (2, 9, 6, 5)
    assert a.weight.shape == (4, 3, 3, 3) and a.grad_output.shape == (2, 4, 6, 5)
    assert np.all(a.offset != np.round(a.offset))
    assert a.mask.min() > 0 and a.mask.max() < 1
    assert all(arr.dtype == np.float32 for arr in a)


def test_numpy_dense_matches_torch():
    """The no-torch yardstick must be a real convolution (values and gradients)."""
    torch = pytest.importorskip("torch")
    a = _bench.make_inputs(_bench.Shape(2, 3, 6, 5, 4), "float64")
    y, (gx, gw, gb) = _bench.numpy_dense_impl(a).fwdbwd()
    t = a.map(torch.from_numpy)
    leaves = [v.clone().requires_grad_() for v in (t.input, t.weight, t.bias)]
    ty = torch.nn.functional.conv2d(*leaves, padding=1)
    tg = torch.autograd.grad(ty, leaves, t.grad_output)
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    for mine, ref in zip((gx, gw, gb), tg):
        np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-10, atol=1e-12)


def test_tracemalloc_meter_counts_workspace_not_results():
    def fn():
        out = np.zeros(1 << 18, dtype=np.uint8)  # returned: not workspace
        scratch = np.ones(1 << 20, dtype=np.uint8)  # 1 MiB workspace, freed
        out += scratch[: out.size]
        return out

    extra = _bench.tracemalloc_peak_extra(fn)
    assert (1 << 20) <= extra < (1 << 20) + (1 << 16)


def test_other_load_discounts_our_own_cpu_time():
    import os

    cores = os.cpu_count() or 1
    # 2 s of wall time; the machine used 1.0*cores CPU seconds, 0.5*cores of them ours
    before, after = (10.0, 100.0, 5.0), (12.0, 100.0 + cores, 5.0 + 0.5 * cores)
    assert _bench.other_load(before, after) == pytest.approx(0.25)
    assert _bench.other_load(None, after) is None
    snap = _bench.cpu_counters()
    assert snap is None or len(snap) == 3


def test_progress_bar_on_a_terminal():
    class Tty:
        def __init__(self):
            self.text = ""

        def isatty(self):
            return True

        def write(self, s):
            self.text += s

        def flush(self):
            pass

    stream = Tty()
    bar = _bench.Progress(2, stream)
    bar.start("case one")
    bar.detail("ours fwd")
    bar.finish_step()
    bar.close()
    assert "\r[" in stream.text and "0/2 case one ours fwd" in stream.text
    assert stream.text.endswith("\r\033[K")


def test_gpu_section_wiring_with_stand_ins(monkeypatch, capsys):
    """Without a GPU, run the GPU section on NumPy arrays posing as CuPy ones and CPU torch
    posing as CUDA torch, with a stand-in torchvision, to check its contenders and table."""
    torch = pytest.importorskip("torch")
    fake_cupy = types.SimpleNamespace(
        asarray=np.asarray,
        cuda=types.SimpleNamespace(Device=lambda: types.SimpleNamespace(synchronize=lambda: None)),
        get_default_memory_pool=lambda: types.SimpleNamespace(free_all_blocks=lambda: None),
    )

    def deform_conv2d(x, off, w, b, padding, mask):  # same signature; dense maths is enough here
        return torch.nn.functional.conv2d(x, w, b, padding=padding) * mask.mean() + off.mean()

    fake_tv = types.SimpleNamespace(__version__="0.0-standin", ops=types.SimpleNamespace(deform_conv2d=deform_conv2d))
    real_import = _bench.optional_import
    monkeypatch.setattr(_bench, "optional_import",
                        lambda name: (fake_tv, "") if name == "torchvision" else real_import(name))
    monkeypatch.setattr(_bench, "gpu_status", lambda: (fake_cupy, ""))
    monkeypatch.setattr(_bench, "describe_gpu", lambda cupy, index=0: "Stand-in GPU")
    monkeypatch.setattr(_bench, "cupy_peak_extra", _bench.tracemalloc_peak_extra)
    monkeypatch.setattr(_bench, "torch_cuda_peak_extra", _bench.tracemalloc_peak_extra)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)

    assert cli.main(["bench", "--shapes", "1,2,5,5,3", "--repeat", "1", "--backend", "cupy",
                     "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "GPU (Stand-in GPU), cupy arrays" in out
    for header in ("tv fwd", "cuDNN fwd", "/tv f+b", "/cuDNN f+b", "tv peak MiB"):
        assert header in out
    row = next(line for line in out.splitlines() if line.startswith("1,2,5,5,3"))
    assert "error" not in row and row.count("x") == 2  # both ratios present
