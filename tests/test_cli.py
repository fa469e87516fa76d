"""Fast tests of the ``deformarray`` command line (``info`` and ``bench``) and its harness.

Benchmarks here use tiny shapes and one repeat: they check that the tool runs and reports,
not the figures. The GPU section is exercised with stand-ins for CuPy and CUDA torch so
that its wiring is tested on machines without a GPU as well.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from bench_checks import bench_with_a_failing_call, check_usage_error, stand_in_gpu

from deformarray import cli
from deformarray.bench import common as bench_common
from deformarray.bench import conv as bench_conv
from deformarray.bench import plot as bench_plot
from deformarray.bench import report as bench_report
from deformarray.bench import roi as bench_roi

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--shapes", "1,2,5,5,3;2,3,6,4,2", "--repeat", "1"]
TINY_ROI = ["--roi-shapes", "1,4,8,8,3", "--psroi-shapes", "2,1,6,5,2"]  # C = 1*49 score maps
TINY_MSDA = ["--msda-shapes", "1,5,2,4,2,2,32,48"]  # levels 4x6 and 2x3 (tests/test_bench_msda.py has more)
TINY_DCN = ["--dcn-shapes", "1,6,5,8,2"]  # a dcnv3 and a dcnv4 row (tests/test_bench_dcn.py has more)
RATIO = re.compile(r"\s\d+\.\d\dx(?=\s|$)")  # a ratio cell of a table row
ROI_ROWS = [
    ("deform_roi_pool", "offset"),
    ("deform_roi_pool", "offset+mask"),
    ("deform_psroi_pool", "class offsets"),
    ("deform_psroi_pool", "no offset"),
]


# bench sets Numba's and torch's thread counts (conftest.py's fixture puts them back)
pytestmark = pytest.mark.usefixtures("restore_threads")


def _hide(monkeypatch, *names):
    """Make ``import name`` fail as if the package were not installed."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def _stand_in(monkeypatch, name, module):
    """Make the bench's optional import of ``name`` return ``module`` (the others stay real)."""
    real_import = bench_common.optional_import
    monkeypatch.setattr(bench_common, "optional_import", lambda n: (module, "") if n == name else real_import(n))


# ---------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------


def test_info_prints_versions_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in (
        "deformarray",
        "python",
        "numpy",
        "numba",
        "numba threads",
        "threading layer",
        "workspace bound",
        "backends",
        "cupy",
        "torch",
        "torchvision",
        "jax",
    ):
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
    # the GPU line is there without cupy too, saying why there is none
    gpu = [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("GPU ")]
    assert gpu == ["none: cupy not installed"], out


def test_info_always_has_a_gpu_line(capsys):
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    cupy, reason = bench_common.gpu_status()
    if cupy is None:
        assert data["GPU"] == f"none: {reason}"
    else:
        assert "GPU 0" in data


def test_version(capsys):
    from importlib import metadata

    import deformarray

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"deformarray {metadata.version('deformarray')}\n"
    assert cli.version() == deformarray.__version__  # the checkout and its installed metadata agree


def test_version_without_installed_metadata(monkeypatch):
    from importlib import metadata

    import deformarray

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == deformarray.__version__


def test_python_dash_m_deformarray():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "deformarray", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("deformarray ")
    proc = subprocess.run(
        [sys.executable, "-m", "deformarray", "frobnicate"], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2 and "usage: deformarray" in proc.stderr and "{info,bench,warmup}" in proc.stderr


# ---------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------


def test_bench_prints_table(capsys):
    assert (
        cli.main(["bench", *TINY, *TINY_ROI, *TINY_MSDA, *TINY_DCN, "--backend", "numpy"]) == 0
    )  # --op all: the default
    captured = capsys.readouterr()
    out = captured.out
    for header in (
        "N,C,H,W,Co",
        "fwd ms",
        "dense fwd ms",
        "ratio",
        "fwd+bwd ms",
        "peak extra MiB",
        "in bound",
        "warm-up s",
    ):
        assert header in out
    assert "1,2,5,5,3" in out and "2,3,6,4,2" in out
    assert "error" not in out
    assert "[1/9]" in captured.err  # progress: step lines when stderr is not a terminal
    # the RoI table comes after the conv table, one row per operator and variant
    conv_at, roi_at = out.index("deform_conv2d (mask + bias"), out.index("RoI pooling (7x7 bins")
    assert conv_at < roi_at
    lines = out[roi_at:].splitlines()
    assert lines[1].split()[:3] == ["op", "case", "N,C,H,W,R"]
    for op, variant in ROI_ROWS:
        shape = "1,4,8,8,3" if op == "deform_roi_pool" else "2,1x49,6,5,2"
        row = next(line for line in lines if line.startswith(f"{op} ") and f" {variant} " in line)
        assert shape in row and row.split()[-2] == "yes", row
    assert captured.err.index("[6/9] numpy deform_psroi_pool (no offset)") > captured.err.index("[2/9] numpy 2,3,6,4,2")
    # then the multi-scale deformable attention table, and the DCNv3 / DCNv4 one last
    assert roi_at < out.index("Multi-scale deformable attention (ms_deform_attn") < out.index("DCNv3 / DCNv4 (dcnv3")
    assert "[7/9] numpy ms_deform_attn (decoder) 1,5,2,4,2,2,32x48 float32" in captured.err
    assert "[9/9] numpy dcnv4 (given) 1,6x5,8,2,3x3 float32" in captured.err


def test_bench_roi_without_torchvision_says_why(monkeypatch, capsys):
    _hide(monkeypatch, "torchvision")
    assert cli.main(["bench", "--op", "roi", *TINY_ROI, "--repeat", "1", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    # the reason names what is missing: torchvision here, or torch itself where torch is absent
    torch_installed = importlib.util.find_spec("torch") is not None
    reason = "torchvision not installed" if torch_installed else "torch not installed"
    assert f"note: {reason}: no torchvision roi_align / ps_roi_align floor for the CPU RoI rows" in out.splitlines(), (
        out
    )
    assert "tv fwd ms" not in out  # no empty baseline columns
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "op, conv, roi, msda, dcn",
    [
        ("conv", True, False, False, False),
        ("roi", False, True, False, False),
        ("msda", False, False, True, False),
        ("dcn", False, False, False, True),
        ("all", True, True, True, True),
    ],
)
def test_bench_op_selects_the_rows(op, conv, roi, msda, dcn, capsys):
    argv = ["bench", "--op", op, "--repeat", "1", "--backend", "numpy", "--json"]
    argv += (TINY[:2] if conv else []) + (TINY_ROI if roi else []) + (TINY_MSDA if msda else [])
    argv += TINY_DCN if dcn else []
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    ops = [row["op"] for row in report["results"]]
    expected = ["deform_conv2d"] * (2 * conv) + [name for name, _ in ROI_ROWS] * roi + ["ms_deform_attn"] * msda
    assert ops == expected + ["dcnv3", "dcnv4"] * dcn
    families = (("conv", conv), ("roi", roi), ("msda", msda), ("dcn", dcn))
    assert report["settings"]["ops"] == [name for name, on in families if on]


def test_bench_roi_json(capsys):
    assert (
        cli.main(
            ["bench", "--op", "roi", *TINY_ROI, "--repeat", "2", "--backend", "numpy", "--json", "--dtype", "float64"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["roi"]["pooled_size"] == 7
    assert report["settings"]["roi"]["deform_psroi_pool"]["sample_per_part"] == 4
    rows = report["results"]
    assert [(r["op"], r["variant"]) for r in rows] == ROI_ROWS
    assert rows[0]["shape"] == {"N": 1, "C": 4, "H": 8, "W": 8, "R": 3}
    assert rows[2]["shape"] == {"N": 2, "K": 1, "C": 49, "H": 6, "W": 5, "R": 2}
    for row in rows:
        assert row["backend"] == "numpy" and row["dtype"] == "float64"
        ours = row["ours"]
        assert ours["label"] == f"deformarray.{row['op']}"
        for key in (
            "warmup_fwd_s",
            "fwd_ms",
            "fwd_min_ms",
            "fwd_max_ms",
            "fwd_times_ms",
            "warmup_fwdbwd_s",
            "fwdbwd_ms",
            "peak_extra_mib",
            "within_workspace",
        ):
            assert key in ours, key
        assert ours["fwdbwd_ms"] > 0 and ours["within_workspace"] is True
        assert "torchvision" not in row and row["ratios"] == {}  # torchvision is not installed here


def test_bench_json(capsys):
    assert (
        cli.main(
            ["bench", *TINY, "--op", "conv", "--backend", "numpy", "--json", "--threads", "1", "--dtype", "float64"]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)  # stdout holds the JSON only
    assert set(report) >= {"environment", "settings", "results", "gpu_skipped", "notes"}
    assert report["environment"]["threads"]["numba"] == 1
    assert len(report["results"]) == 2
    row = report["results"][0]
    assert row["op"] == "deform_conv2d" and row["backend"] == "numpy" and row["dtype"] == "float64"
    assert row["shape"] == {"N": 1, "C_in": 2, "H": 5, "W": 5, "C_out": 3}
    ours = row["ours"]
    for key in ("warmup_fwd_s", "fwd_ms", "warmup_fwdbwd_s", "fwdbwd_ms", "peak_extra_mib", "within_workspace"):
        assert key in ours, key
    assert ours["within_workspace"] is True
    assert {"fwd_ms", "fwdbwd_ms", "label"} <= set(row["dense"])
    assert set(row["ratios"]["dense"]) == {"fwd", "fwdbwd", "fwd_range", "fwdbwd_range"}
    assert row["ratios"]["dense"]["fwd"] > 0


def test_bench_without_torch_uses_numpy_dense(monkeypatch, capsys):
    _hide(monkeypatch, "torch", "torchvision")
    assert cli.main(["bench", *TINY, *TINY_ROI, *TINY_MSDA, *TINY_DCN, "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "NumPy im2col+matmul" in out
    assert "note: torch not installed: no grid_sample composition for the CPU ms_deform_attn rows" in out
    assert "note: torch not installed: CPU dense" in out
    assert "note: torch not installed: no torchvision roi_align" in out
    assert "deform_psroi_pool  no offset" in out
    assert "Traceback" not in out


def test_bench_gpu_section_skips_without_gpu(capsys):
    cupy, reason = bench_common.gpu_status()
    if cupy is not None:
        pytest.skip("a GPU is present: the section runs instead (see the stand-in test below)")
    assert cli.main(["bench", *TINY, *TINY_ROI, *TINY_MSDA, *TINY_DCN, "--backend", "all"]) == 0
    out = capsys.readouterr().out
    assert f"GPU section skipped: {reason}" in out
    assert cli.main(["bench", *TINY, *TINY_ROI, *TINY_MSDA, *TINY_DCN, "--backend", "cupy"]) == 1  # nothing could run


def test_bench_reports_a_failing_call_without_traceback(monkeypatch, capsys):
    argv = ["bench", *TINY, "--op", "conv", "--backend", "numpy"]
    error = RuntimeError("kernel exploded\nsecond line")
    out = bench_with_a_failing_call(monkeypatch, capsys, "deform_conv2d", error, argv)
    assert "error" in out
    assert "RuntimeError: kernel exploded" in out


def test_bench_reports_a_failing_roi_call_and_runs_the_others(monkeypatch, capsys):
    argv = ["bench", "--op", "roi", *TINY_ROI, "--repeat", "1", "--backend", "numpy"]
    error = ValueError("no such RoI\nsecond line")
    out = bench_with_a_failing_call(monkeypatch, capsys, "deform_psroi_pool_backward", error, argv)
    assert "note: numpy deform_psroi_pool (class offsets) 2,1x49,6,5,2 float32 ours: ValueError: no such RoI" in out
    assert "Traceback" not in out
    row = next(line for line in out.splitlines() if line.startswith("deform_psroi_pool  no offset"))
    assert row.split()[5] == "error"  # forward timed, forward+backward failed
    row = next(line for line in out.splitlines() if line.startswith("deform_roi_pool    offset+mask"))
    assert "error" not in row


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
        (["bench", "--op", "pool"], "--op"),
        (["bench", "--op"], "--op"),
        (["bench", "--roi-shapes", "1,2,3,4"], "5 positive integers N,C,H,W,R"),
        (["bench", "--roi-shapes", "1,2,3,4,0"], "at least 1"),
        (["bench", "--psroi-shapes", "1,2,3,4,five"], "5 positive integers N,K,H,W,R"),
        (["bench", "--psroi-shapes", ";"], "no shape"),
        (["bench", "--op", "roi", "--shapes", "1,2,3,4,5"], "use --op conv or all"),
        (["bench", "--op", "conv", "--roi-shapes", "1,2,3,4,5"], "use --op roi or all"),
        (["bench", "--op", "conv", "--psroi-shapes", "1,2,3,4,5"], "use --op roi or all"),
        (["bench", "--plot"], "--plot"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_a_clean_error(argv, message, capsys):
    check_usage_error(argv, message, capsys)


def test_script_forwards_to_the_cli():
    script = ROOT / "benchmarks" / "bench_deform_conv.py"
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--shapes" in proc.stdout and "--threads" in proc.stdout


def test_roi_script_runs_the_roi_rows_only():
    script = ROOT / "benchmarks" / "bench_roi_pool.py"
    proc = subprocess.run(
        [sys.executable, str(script), *TINY_ROI, "--repeat", "1", "--backend", "numpy", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(r["op"], r["variant"]) for r in report["results"]] == ROI_ROWS


# ---------------------------------------------------------------------------------------
# harness pieces
# ---------------------------------------------------------------------------------------


def test_parse_shapes():
    assert bench_conv.parse_shapes("1,2,3,4,5; 6,7,8,9,10;") == [(1, 2, 3, 4, 5), (6, 7, 8, 9, 10)]
    with pytest.raises(ValueError, match="5 positive integers"):
        bench_conv.parse_shapes("1,2,3,4,-5")
    with pytest.raises(ValueError, match="no shape"):
        bench_conv.parse_shapes(" ; ")
    assert bench_roi.parse_roi_shapes("2,256,64,64,512") == [bench_roi.RoiShape(2, 256, 64, 64, 512)]
    assert bench_roi.parse_psroi_shapes("2,21,64,64,300;1,1,1,1,1")[1].r == 1
    with pytest.raises(ValueError, match="N,K,H,W,R"):
        bench_roi.parse_psroi_shapes("2,21,64,64")


@pytest.mark.parametrize("op, variant", ROI_ROWS)
def test_roi_inputs(op, variant):
    shape = bench_roi.RoiShape(2, 3, 6, 5, 4)
    case = bench_roi.RoiCase("numpy", op, variant, shape, "float32")
    a = bench_roi.make_inputs(case)
    ps = op == "deform_psroi_pool"
    assert a.input.shape == ((2, 3 * 49, 6, 5) if ps else (2, 3, 6, 5))
    assert a.grad_output.shape == (4, 3, 7, 7)
    assert all(arr is None or arr.dtype == np.float32 for arr in a)
    # RoIs: valid batch indices, boxes inside the image (the feature map / spatial_scale)
    b, x1, y1, x2, y2 = a.rois.T
    assert set(b) <= {0.0, 1.0} and np.all(x1 >= 0) and np.all(x2 <= 5 * 16) and np.all(y2 <= 6 * 16)
    assert np.all(x2 > x1) and np.all(y2 > y1)
    assert (a.offset is not None) == (variant != "no offset")
    assert (a.mask is not None) == (variant == "offset+mask")
    if a.offset is not None:
        assert a.offset.shape == ((4, 6, 7, 7) if ps else (4, 2, 7, 7))
    # the variants of one shape share the input and the RoIs (so they share one floor)
    other = bench_roi.make_inputs(bench_roi.RoiCase("numpy", op, bench_roi.VARIANTS[op][0], shape, "float32"))
    np.testing.assert_array_equal(a.input, other.input)
    np.testing.assert_array_equal(a.rois, other.rois)


def test_inputs_make_fractional_samples():
    a = bench_conv.make_inputs(bench_conv.Shape(2, 3, 6, 5, 4), "float32")
    assert a.offset.shape == (2, 18, 6, 5) and a.mask.shape == (2, 9, 6, 5)
    assert a.weight.shape == (4, 3, 3, 3) and a.grad_output.shape == (2, 4, 6, 5)
    assert np.all(a.offset != np.round(a.offset))
    assert a.mask.min() > 0 and a.mask.max() < 1
    assert all(arr.dtype == np.float32 for arr in a)


def test_numpy_dense_matches_torch():
    """The no-torch yardstick must be a real convolution (values and gradients)."""
    torch = pytest.importorskip("torch")
    a = bench_conv.make_inputs(bench_conv.Shape(2, 3, 6, 5, 4), "float64")
    y, (gx, gw, gb) = bench_conv.numpy_dense_impl(a).fwdbwd()
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

    extra = bench_common.tracemalloc_peak_extra(fn)
    assert (1 << 20) <= extra < (1 << 20) + (1 << 16)


def test_other_load_discounts_our_own_cpu_time():
    import os

    cores = os.cpu_count() or 1
    # 2 s of wall time; the machine used 1.0*cores CPU seconds, 0.5*cores of them ours
    before, after = (10.0, 100.0, 5.0), (12.0, 100.0 + cores, 5.0 + 0.5 * cores)
    assert bench_common.other_load(before, after) == pytest.approx(0.25)
    assert bench_common.other_load(None, after) is None
    snap = bench_common.cpu_counters()
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
    bar = bench_common.Progress(2, stream)
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

    def deform_conv2d(x, off, w, b, padding, mask):  # same signature; dense maths is enough here
        return torch.nn.functional.conv2d(x, w, b, padding=padding) * mask.mean() + off.mean()

    fake_tv = types.SimpleNamespace(__version__="0.0-standin", ops=types.SimpleNamespace(deform_conv2d=deform_conv2d))
    _stand_in(monkeypatch, "torchvision", fake_tv)
    stand_in_gpu(monkeypatch, bench_common.tracemalloc_peak_extra)

    assert (
        cli.main(
            [
                "bench",
                "--op",
                "conv",
                "--shapes",
                "1,2,5,5,3",
                "--repeat",
                "1",
                "--backend",
                "cupy",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "GPU (Stand-in GPU), cupy arrays" in out
    for header in ("tv fwd", "cuDNN fwd", "/tv f+b", "/cuDNN f+b", "tv peak MiB"):
        assert header in out
    row = next(line for line in out.splitlines() if line.startswith("1,2,5,5,3"))
    assert "error" not in row and row.count("x") == 2  # both ratios present


def _standin_torchvision(torch):
    """torchvision.ops stand-ins with the real signatures and output shapes (the maths is
    not RoI Align: enough to check the wiring, timing and ratios)."""
    pool = torch.nn.functional.adaptive_avg_pool2d

    def deform_conv2d(x, off, w, b, padding, mask):
        return torch.nn.functional.conv2d(x, w, b, padding=padding) * mask.mean() + off.mean()

    def roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
        assert aligned and sampling_ratio == 0 and spatial_scale == 1 / 16
        return pool(x[rois[:, 0].long()], output_size) + rois[:, 1:].mean() * 0

    def ps_roi_align(x, rois, output_size, spatial_scale=1.0, sampling_ratio=-1):
        assert sampling_ratio == 4
        r, k = rois.shape[0], x.shape[1] // output_size**2
        y = pool(x[rois[:, 0].long()], output_size)
        return y.view(r, k, output_size**2, output_size, output_size).mean(2)

    ops = types.SimpleNamespace(deform_conv2d=deform_conv2d, roi_align=roi_align, ps_roi_align=ps_roi_align)
    return types.SimpleNamespace(__version__="0.0-standin", ops=ops)


def test_roi_cpu_floor_with_stand_in_torchvision(monkeypatch, capsys):
    """With torchvision importable the CPU RoI table gains the floor and the ratios, and the
    floor is measured once per shape (shared by that shape's variant rows)."""
    torch = pytest.importorskip("torch")
    fake_tv = _standin_torchvision(torch)
    _stand_in(monkeypatch, "torchvision", fake_tv)
    argv = ["bench", "--op", "roi", *TINY_ROI, "--repeat", "1", "--backend", "numpy"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "floor = torchvision.ops.ps_roi_align (torchvision 0.0-standin), torchvision.ops.roi_align(aligned=True)" in out
    )
    for header in ("tv fwd ms", "tv fwd+bwd ms", "ratio"):
        assert header in out
    for op, variant in ROI_ROWS:
        row = next(line for line in out.splitlines() if line.startswith(f"{op} ") and f" {variant} " in line)
        assert "error" not in row and len(RATIO.findall(row)) == 2, row
    assert cli.main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert rows[0]["torchvision"] == rows[1]["torchvision"] and rows[2]["torchvision"] == rows[3]["torchvision"]
    assert rows[0]["torchvision"]["label"] != rows[2]["torchvision"]["label"]
    # the first variant of a shape is timed interleaved with the floor: its ratios have ranges
    assert all({"fwd", "fwdbwd"} <= set(r["ratios"]["torchvision"]) for r in rows)
    assert "fwd_range" in rows[0]["ratios"]["torchvision"] and "fwd_range" in rows[2]["ratios"]["torchvision"]


def test_roi_gpu_section_wiring_with_stand_ins(monkeypatch, capsys):
    """The RoI GPU rows, on NumPy arrays posing as CuPy ones and CPU torch posing as CUDA
    torch, after the conv GPU rows: both dtypes by default, floor and ratios present."""
    torch = pytest.importorskip("torch")
    fake_tv = _standin_torchvision(torch)
    _stand_in(monkeypatch, "torchvision", fake_tv)
    # NumPy has no float16 path
    stand_in_gpu(monkeypatch, bench_common.tracemalloc_peak_extra, ("float32", "float64"))

    argv = ["bench", "--shapes", "1,2,5,5,3", *TINY_ROI, *TINY_MSDA, *TINY_DCN, "--repeat", "1", "--backend", "cupy"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    out = captured.out
    conv_at = out.index("deform_conv2d (mask + bias, 3x3, padding 1), GPU (Stand-in GPU)")
    roi_at = out.index("RoI pooling (7x7 bins")
    msda_at = out.index("Multi-scale deformable attention (ms_deform_attn")
    assert conv_at < roi_at < out.index("GPU (Stand-in GPU), cupy arrays; tv = torchvision.ops.ps_roi_align") < msda_at
    assert "[16/16]" in captured.err  # 2 dtypes x (1 conv + 4 RoI + 1 msda + 2 dcn rows)
    roi = out[roi_at:msda_at].splitlines()
    for header in ("dtype", "tv fwd", "/tv fwd", "tv f+b", "/tv f+b", "peak MiB", "tv peak MiB"):
        assert header in roi[1]
    rows = [line for line in roi if line.startswith("deform_")]
    assert len(rows) == 8 and sum("float64" in r for r in rows) == 4
    for row in rows:
        assert "error" not in row and len(RATIO.findall(row)) == 2, row


# ---------------------------------------------------------------------------------------
# bench --plot
# ---------------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY_PLOT = [
    "bench",
    *TINY,
    *TINY_ROI,
    *TINY_MSDA,
    *TINY_DCN,
    "--backend",
    "numpy",
]  # 2 conv + 4 RoI + 1 msda + 2 dcn rows


def _no_benchmark(monkeypatch):
    """Make the benchmark itself fail the test: the checks below must come before it."""

    def run(opts):
        raise AssertionError("the benchmark ran although --plot could not work")

    monkeypatch.setattr(bench_report, "run", run)


def _tiny_report(monkeypatch, capsys) -> dict:
    """A real report of the tiny run, without torchvision (so its bars are known)."""
    _hide(monkeypatch, "torchvision")
    assert cli.main([*TINY_PLOT, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    png = tmp_path / "bench.png"
    assert cli.main([*TINY_PLOT, "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    assert "deform_conv2d (mask + bias" in captured.out and "RoI pooling" in captured.out  # the table as ever
    assert f"plot written to {png}" in captured.err.splitlines()
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(png)
    height, width = image.shape[:2]
    assert image.ndim == 3 and 400 <= height <= 800 and 1.5 * height < width < 5000  # 6 groups side by side
    assert image[..., :3].std() > 0.05  # something drawn, not a blank canvas


def test_bench_plot_with_json(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    assert cli.main(["bench", *TINY, "--op", "conv", "--backend", "numpy", "--json", "--plot", str(png)]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # stdout holds the JSON only
    assert len(report["results"]) == 2
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert f"plot written to {png}" in captured.err


def test_plot_report_draws_one_group_per_row(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    report = _tiny_report(monkeypatch, capsys)
    rows = report["results"]
    fig = bench_plot.plot_report(report, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == PNG_SIGNATURE
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [
        "conv\n1,2,5,5,3\nCPU f32",
        "conv\n2,3,6,4,2\nCPU f32",
        "roi offset\n1,4,8,8,3\nCPU f32",
        "roi off+mask\n1,4,8,8,3\nCPU f32",
        "psroi cls offs\n2,1x49,6,5,2\nCPU f32",
        "psroi no offset\n2,1x49,6,5,2\nCPU f32",
        "msda dec\n1,5,2,4,2,2,32x48\nCPU f32",
        "dcnv3\n1,6x5,8,2,3x3\nCPU f32",
        "dcnv4\n1,6x5,8,2,3x3\nCPU f32",
    ]
    assert ax.get_yscale() == "log"
    # ours fwd and fwd+bwd in all 9 rows, the dense conv in the 2 conv rows, the grid_sample
    # composition in the msda and dcn rows (with torch), nothing else
    comp = "composition" in rows[6]
    assert len(ax.patches) == 9 * 2 + 2 * 2 + 3 * 2 * comp
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    per_phase = 2 + comp
    assert legend[0] == "fwd: deformarray" and legend[per_phase] == "fwd+bwd: deformarray"
    assert legend[1].startswith("fwd: dense ") and legend[per_phase + 1].startswith("fwd+bwd: dense ")
    if comp:
        assert legend[2] == "fwd: torch grid_sample composition"
    # each bar inside its row's group, as tall as that row's time
    centre = [p.get_x() + p.get_width() / 2 for p in ax.patches]
    assert all(abs(c - round(c)) < 0.45 for c in centre)
    heights = sorted(p.get_height() for p in ax.patches)
    expected = [
        r[name][f"{ph}_ms"]
        for r in rows
        for name in ("ours", "dense", "composition")
        if name in r
        for ph in ("fwd", "fwdbwd")
    ]
    np.testing.assert_allclose(heights, sorted(expected))
    by_group = [sum(round(c) == i for c in centre) for i in range(9)]
    assert by_group == [4, 4, 2, 2, 2, 2] + [2 + 2 * comp] * 3
    threads = report["environment"]["threads"]["numba"]
    assert f"median of 1 interleaved runs\nCPU, {threads} threads" in ax.get_title()


def test_plot_report_skips_errors_and_missing_references(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    report = _tiny_report(monkeypatch, capsys)
    rows = report["results"]
    rows[0]["ours"] = {"label": "deformarray.deform_conv2d", "error": "RuntimeError: boom"}  # both phases failed
    rows[1]["dense"] = {"label": "dense", "fwd_ms": 1.0, "error": "RuntimeError: bwd"}  # fwd timed, fwd+bwd failed
    gpu = json.loads(json.dumps(rows[2]))  # a GPU RoI row with a torchvision floor
    gpu.update(backend="cupy", dtype="float16")
    gpu["torchvision"] = {"label": "torchvision.ops.roi_align(aligned=True) (torchvision 0)", "fwd_ms": 0.5}
    rows.append(gpu)
    report["environment"]["gpu"] = "Stand-in GPU, 1 GiB"
    path = tmp_path / "b.png"
    fig = bench_plot.plot_report(report, str(path))
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    ax = fig.axes[0]
    assert len(ax.get_xticklabels()) == 10 and ax.get_xticklabels()[9].get_text() == "roi offset\n1,4,8,8,3\nGPU f16"
    # row 0: dense 2; row 1: ours 2 + dense fwd; RoI rows: ours 2 each; msda and 2 dcn rows: ours 2
    # (+ composition 2 with torch); GPU row: ours 2 + tv fwd
    assert len(ax.patches) == 2 + 3 + 4 * 2 + 3 * (2 + 2 * ("composition" in rows[6])) + 3
    errors = [t for t in ax.texts if t.get_text() == "error"]
    assert sorted(round(t.get_position()[0]) for t in errors) == [0, 0, 1]  # ours twice in row 0, dense f+b in row 1
    assert "GPU: Stand-in GPU, 1 GiB" in ax.get_title()
    assert any("torchvision roi_align(aligned=True)" in t.get_text() for t in ax.get_legend().get_texts())
    # a report where nothing was timed still gives a (bar-less) chart, not a crash
    report["results"] = [rows[0] | {"dense": {"label": "dense", "error": "x"}}]
    fig = bench_plot.plot_report(report, str(path))
    assert len(fig.axes[0].patches) == 0 and len(fig.axes[0].texts) == 4


def test_bench_plot_without_matplotlib_fails_before_the_run(tmp_path, monkeypatch, capsys):
    _hide(monkeypatch, "matplotlib")
    _no_benchmark(monkeypatch)
    png = tmp_path / "b.png"
    for extra in ([], ["--json"]):
        with pytest.raises(SystemExit) as exc:
            cli.main([*TINY_PLOT, *extra, "--plot", str(png)])
        assert exc.value.code == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "Traceback" not in captured.err
        errors = [line for line in captured.err.splitlines() if "error" in line]
        assert errors == [
            "deformarray bench: error: --plot needs matplotlib, which is not installed: "
            'pip install "deformarray[plot]" (or pip install matplotlib)'
        ]
        assert not png.exists()


@pytest.mark.parametrize(
    "target, message",
    [
        ("missing/b.png", "directory {tmp}/missing does not exist"),
        (".", "{tmp}/.: is a directory"),
        ("b.xyz", "unknown image format '.xyz' (use .png, .svg or .pdf)"),
        (None, "--plot needs a file name"),
    ],
)
def test_bench_plot_unusable_target_fails_before_the_run(target, message, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    _no_benchmark(monkeypatch)
    path = "" if target is None else f"{tmp_path}/{target}"
    with pytest.raises(SystemExit) as exc:
        cli.main([*TINY_PLOT, "--plot", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("deformarray bench: error: --plot ")
    assert errors[0].endswith(message.format(tmp=tmp_path)), errors[0]


def test_plot_target_check_leaves_files_alone(tmp_path):
    pytest.importorskip("matplotlib")
    old = tmp_path / "old.png"
    old.write_bytes(b"previous chart")
    assert bench_plot.check_target(str(old)) is None
    assert old.read_bytes() == b"previous chart"  # checked for writing, not truncated
    new = tmp_path / "new.svg"
    assert bench_plot.check_target(str(new)) is None
    assert not new.exists()  # the probe leaves nothing behind
    assert [bench_plot.plot_format(p) for p in ("a.PNG", "a", "d.x/a.svg")] == ["png", "png", "svg"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_plot_target_in_a_read_only_directory(tmp_path):
    pytest.importorskip("matplotlib")
    tmp_path.chmod(0o500)
    try:
        assert (
            bench_plot.check_target(str(tmp_path / "b.png"))
            == f"--plot {tmp_path}/b.png: cannot write (Permission denied)"
        )
    finally:
        tmp_path.chmod(0o700)


def test_bench_plot_failing_after_the_run_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")

    def full_disk(report, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench_plot, "plot_report", full_disk)
    png = tmp_path / "b.png"
    assert cli.main(["bench", *TINY, "--op", "conv", "--backend", "numpy", "--plot", str(png)]) == 1
    captured = capsys.readouterr()
    assert "1,2,5,5,3" in captured.out  # the table is printed all the same
    assert f"deformarray bench: --plot {png} not written: OSError: [Errno 28] No space left on device" in (
        captured.err.splitlines()
    )
    assert "Traceback" not in captured.err and not png.exists()


def test_cli_imports_matplotlib_for_plot_only():
    code = (
        "import sys\n"
        "from deformarray import cli\n"
        "args = cli.build_parser().parse_args(['bench', '--json'])\n"
        "assert cli._check_bench_args(args) is None\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported without --plot'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
