"""The DCNv3 / DCNv4 rows of ``deformarray bench`` (``--op dcn``): sizes, inputs, the
grid_sample composition (it must compute our numbers, or the ratio means nothing), the
table, the JSON, the GPU wiring (stand-ins) and the errors. Tiny shapes and one or two
rounds: these check the tool, not the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from bench_checks import (
    bench_with_a_failing_call,
    bench_without_torch,
    check_cpu_composition_row,
    check_gpu_composition_rows,
    check_usage_error,
    gpu_row_without_cuda_torch,
    stand_in_gpu,
)

from deformarray import cli
from deformarray.bench import common as bench_common
from deformarray.bench import dcn as bench_dcn
from deformarray.bench import plot as bench_plot

ROOT = Path(__file__).resolve().parents[1]
# a 3x3 row (odd sizes, 2 groups of 4) and a 5x5 one (3 groups of 2, padding 2)
TINY = ["--dcn-shapes", "1,6,5,8,2;2,4,7,6,3,5"]
SHAPES = bench_dcn.parse_dcn_shapes(TINY[1])


# bench sets Numba's and torch's thread counts (conftest.py's fixture puts them back)
pytestmark = pytest.mark.usefixtures("restore_threads")


# ---------------------------------------------------------------------------------------
# sizes and inputs
# ---------------------------------------------------------------------------------------


def test_default_rows_are_internimage_t_and_dcnv4s():
    stages = bench_dcn.DEFAULT_CPU_SHAPES[:4]
    # InternImage-T: channels 64 doubling per stage, groups [4, 8, 16, 32], a 224x224 image
    assert [(s.n, s.h, s.w, s.c, s.g, s.k) for s in stages] == [
        (1, 56, 56, 64, 4, 3),
        (1, 28, 28, 128, 8, 3),
        (1, 14, 14, 256, 16, 3),
        (1, 7, 7, 512, 32, 3),
    ]
    assert {s.d for s in stages} == {16} and [s.variant for s in stages] == [f"stage {i}" for i in (1, 2, 3, 4)]
    assert all(s.padding == 1 and s.out_hw() == (s.h, s.w) and s.p == 9 for s in stages)
    cpu_v4, gpu_v4 = bench_dcn.DEFAULT_CPU_SHAPES[4], bench_dcn.DEFAULT_GPU_SHAPES[4]
    # DCNv4's benchmark: 56x56, G=4, D=32; N=64 on the GPU, 4 on the CPU
    assert (cpu_v4.h, cpu_v4.w, cpu_v4.g, cpu_v4.d, cpu_v4.n, gpu_v4.n) == (56, 56, 4, 32, 4, 64)
    assert cpu_v4.packed() == 112  # 3*4*9 = 108 rounded up to a multiple of 8
    assert bench_dcn.DEFAULT_GPU_SHAPES[:4] == stages


def test_parse_dcn_shapes():
    small, big = SHAPES
    assert small == bench_dcn.DcnShape(1, 6, 5, 8, 2) and (small.k, small.d, small.variant) == (3, 4, "given")
    assert big == bench_dcn.DcnShape(2, 4, 7, 6, 3, 5) and (big.padding, big.out_hw(), big.p) == (2, (4, 7), 25)
    assert bench_dcn.parse_dcn_shapes(" 1,2,2,4,4,2 ;")[0].out_hw() == (3, 3)  # even kernel: padding 1
    with pytest.raises(ValueError, match="5 or 6 positive integers N,H,W,C,G"):
        bench_dcn.parse_dcn_shapes("1,6,5,8")
    with pytest.raises(ValueError, match="5 or 6 positive integers"):
        bench_dcn.parse_dcn_shapes("1,6,5,8,2,3,3")
    with pytest.raises(ValueError, match="at least 1"):
        bench_dcn.parse_dcn_shapes("1,0,5,8,2")
    with pytest.raises(ValueError, match="C must be a multiple of G"):
        bench_dcn.parse_dcn_shapes("1,6,5,8,3")
    with pytest.raises(ValueError, match="no shape"):
        bench_dcn.parse_dcn_shapes(";")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inputs(dtype):
    shape = SHAPES[0]
    a = bench_dcn.make_inputs(shape, dtype)
    assert a.input.shape == (1, 6, 5, 8) and a.grad_output.shape == (1, 6, 5, 8)
    assert a.offset.shape == (1, 6, 5, 2 * 9 * 2) and a.mask.shape == (1, 6, 5, 2 * 9)
    assert a.offset_mask.shape == (1, 6, 5, 56)  # 3*2*9 = 54, padded to 56
    assert all(arr.dtype == np.dtype(dtype) and arr.flags.c_contiguous for arr in a)
    # a softmax over the P points of each group
    np.testing.assert_allclose(a.mask.reshape(1, 6, 5, 2, 9).sum(-1), 1, rtol=1e-6)
    # DCNv4's packing: per group 2P offsets then P masks, zero padding
    groups = a.offset_mask[..., :54].reshape(1, 6, 5, 2, 27)
    assert np.array_equal(groups[..., :18].reshape(1, 6, 5, 36), a.offset)
    assert np.array_equal(groups[..., 18:].reshape(1, 6, 5, 18), a.mask)
    assert not a.offset_mask[..., 54:].any()


def _composition_and_ours(op, shape, dtype):
    torch = pytest.importorskip("torch")
    a = bench_dcn.make_inputs(shape, dtype)
    ours = bench_dcn.ours_impl(op, shape, a, bench_common.noop, None)
    comp = bench_dcn.composition_impl(op, shape, torch, a.map(torch.from_numpy))
    return ours, comp


@pytest.mark.parametrize("op", bench_dcn.OPS)
@pytest.mark.parametrize("shape", SHAPES + [bench_dcn.DcnShape(1, 9, 11, 12, 2, 2)], ids=str)
def test_composition_computes_our_numbers(op, shape):
    """The benchmark's two contenders on its own inputs: the same forward (float32, rtol
    1e-4) and the same gradients (float64, tight), or the ratio compares different maths.
    (They differ only at a point exactly at -1: measure zero with random offsets.)"""
    ours, comp = _composition_and_ours(op, shape, "float32")
    np.testing.assert_allclose(ours.fwd(), comp.fwd().numpy(), rtol=1e-4, atol=1e-5)
    y, grads = ours.fwdbwd()
    ty, tgrads = comp.fwdbwd()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert len(grads) == len(tgrads) == (3 if op == "dcnv3" else 2)
    ours, comp = _composition_and_ours(op, shape, "float64")
    y, grads = ours.fwdbwd()
    ty, tgrads = comp.fwdbwd()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    for mine, ref in zip(grads, tgrads):  # input, offset, mask (dcnv4: input, offset_mask)
        assert mine.shape == tuple(ref.shape)
        np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-9, atol=1e-11)


def test_composition_is_ours_at_a_default_stage():
    """The smallest default row (InternImage-T's stage 4, 32 groups) in float32: forward."""
    shape = bench_dcn.DEFAULT_CPU_SHAPES[3]
    for op in bench_dcn.OPS:
        ours, comp = _composition_and_ours(op, shape, "float32")
        np.testing.assert_allclose(ours.fwd(), comp.fwd().numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def test_bench_dcn_table(capsys):
    pytest.importorskip("torch")
    assert cli.main(["bench", "--op", "dcn", *TINY, "--repeat", "2", "--backend", "numpy"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    title = next(line for line in out.splitlines() if line.startswith("DCNv3 / DCNv4"))
    assert "CPU, numpy arrays, float32; comp = grid_sample composition (torch " in title
    lines = out[out.index(title) :].splitlines()
    header = lines[1].split()
    assert header[:3] == ["case", "op", "N,HxW,C,G,KxK"]
    for column in ("fwd ms", "comp fwd ms", "ratio", "fwd+bwd ms", "comp fwd+bwd ms", "peak extra MiB", "comp peak"):
        assert column in lines[1]
    rows = [line.split()[:3] for line in lines[3:7]]
    assert rows == [
        ["given", "dcnv3", "1,6x5,8,2,3x3"],
        ["given", "dcnv4", "1,6x5,8,2,3x3"],
        ["given", "dcnv3", "2,4x7,6,3,5x5"],
        ["given", "dcnv4", "2,4x7,6,3,5x5"],
    ]
    for row in lines[3:7]:
        assert "error" not in row and row.count("x (") == 2, row  # both ratios, with their range
    assert "ratio = ours / composition within each run, median (range): below 1 = ours faster" in out
    assert "[4/4] numpy dcnv4 (given) 2,4x7,6,3,5x5 float32" in captured.err
    assert "USDT" not in captured.err  # the profiler's lines are muted


def test_bench_dcn_json(capsys):
    pytest.importorskip("torch")
    argv = ["bench", "--op", "dcn", *TINY, "--repeat", "2", "--backend", "numpy", "--json", "--dtype", "float64"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["ops"] == ["dcn"]
    assert report["settings"]["dcn"]["offset"] == "standard normal (pixels)"
    rows = report["results"]
    assert [r["op"] for r in rows] == ["dcnv3", "dcnv4"] * 2
    assert rows[2]["shape"] == {
        "N": 2,
        "H": 4,
        "W": 7,
        "C": 6,
        "G": 3,
        "D": 2,
        "K": 5,
        "P": 25,
        "stride": 1,
        "padding": 2,
        "H_out": 4,
        "W_out": 7,
        "offset_mask_channels": 232,  # 3*3*25 = 225 padded to a multiple of 8
    }
    for row in rows:
        assert row["backend"] == "numpy" and row["dtype"] == "float64" and row["variant"] == "given"
        assert row["ours"]["label"] == f"deformarray.{row['op']}"
        check_cpu_composition_row(row)


def test_bench_dcn_without_torch_says_why(monkeypatch, capsys):
    argv = ["bench", "--op", "dcn", *TINY, "--repeat", "1", "--backend", "numpy"]
    out = bench_without_torch(monkeypatch, capsys, argv)
    assert "note: torch not installed: no grid_sample composition for the CPU dcnv3 / dcnv4 rows" in out.splitlines()
    assert "given  dcnv3  1,6x5,8,2,3x3" in out


def test_bench_dcn_reports_a_failing_call(monkeypatch, capsys):
    argv = ["bench", "--op", "dcn", *TINY, "--repeat", "1", "--backend", "numpy"]
    error = RuntimeError("no gradient\nsecond line")
    out = bench_with_a_failing_call(monkeypatch, capsys, "dcnv4_backward", error, argv)
    assert "note: numpy dcnv4 (given) 1,6x5,8,2,3x3 float32 ours: RuntimeError: no gradient" in out
    assert "Traceback" not in out
    rows = [line for line in out.splitlines() if line.startswith("given ")]
    assert "error" not in rows[0]  # dcnv3 untouched
    assert rows[1].split()[3] != "error" and "error" in rows[1]  # forward timed, forward+backward failed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--dcn-shapes", "1,2,3"], "5 or 6 positive integers N,H,W,C,G[,K]"),
        (["bench", "--dcn-shapes", "1,2,3,4,0"], "at least 1"),
        (["bench", "--dcn-shapes", "1,2,3,5,2"], "C must be a multiple of G"),
        (["bench", "--op", "msda", "--dcn-shapes", "1,2,3,4,2"], "use --op dcn or all"),
        (["bench", "--op", "dcn", "--msda-shapes", "1,2,3,4,5,6,7,8"], "use --op msda or all"),
    ],
)
def test_bad_arguments_give_a_clean_error(argv, message, capsys):
    check_usage_error(argv, message, capsys)


def test_help_names_the_dcn_rows(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "dcn = dcnv3 and dcnv4" in out and "all = conv then roi then msda then dcn" in out
    assert "--dcn-shapes" in out and "InternImage-T's stages" in out
    assert "dcnv3_core_pytorch" in out


def _stand_in_gpu(monkeypatch):
    """CuPy posing as NumPy, CPU torch posing as CUDA torch."""
    return stand_in_gpu(monkeypatch, bench_common.torch_cpu_peak_extra, ("float32", "float64"))  # NumPy: no float16


def test_gpu_rows_wiring_with_stand_ins(monkeypatch, capsys):
    """Without a GPU, run the GPU rows on NumPy arrays posing as CuPy ones and CPU torch
    posing as CUDA torch: both dtypes by default, the composition and its ratios present."""
    _stand_in_gpu(monkeypatch)
    argv = ["bench", "--op", "dcn", "--dcn-shapes", TINY[1].split(";")[0], "--repeat", "1", "--backend", "cupy"]
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["backend"], r["dtype"], r["op"]) for r in rows] == [
        ("cupy", d, op) for d in ("float32", "float64") for op in ("dcnv3", "dcnv4")
    ]
    text = "\n".join(bench_dcn.format_sections(rows, "Stand-in GPU"))
    check_gpu_composition_rows(rows, text)
    assert sum(line.startswith("given") for line in text.splitlines()) == 4


def test_gpu_default_rows_are_the_cpu_ones_with_dcnv4s_batch(monkeypatch):
    fake_cupy = _stand_in_gpu(monkeypatch)
    opts = bench_common.Options(ops=("dcn",), dtype="float32", repeat=1)
    steps = bench_dcn.gpu_steps(opts, fake_cupy, None, None)
    assert len(steps) == 2 * len(bench_dcn.DEFAULT_GPU_SHAPES)  # both operators per shape
    assert [s.run.args[0].op for s in steps[:2]] == ["dcnv3", "dcnv4"]
    assert steps[-1].run.args[0].shape.n == 64


def test_gpu_rows_without_cuda_torch_are_ours_alone(monkeypatch):
    opts = bench_common.Options(ops=("dcn",), dtype="float32", repeat=1, shapes={"dcn_shapes": SHAPES[:1]})
    row, text = gpu_row_without_cuda_torch(monkeypatch, bench_dcn, opts, 1)
    assert row["op"] == "dcnv4" and "dcnv4" in text


def test_plot_labels_the_dcn_rows(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    argv = ["bench", "--op", "dcn", "--dcn-shapes", TINY[1].split(";")[0], "--repeat", "1", "--backend", "numpy"]
    assert cli.main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fig = bench_plot.plot_report(report, str(tmp_path / "b.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "dcnv3\n1,6x5,8,2,3x3\nCPU f32",
        "dcnv4\n1,6x5,8,2,3x3\nCPU f32",
    ]
    assert len(ax.patches) == 2 * 4  # ours and the composition, fwd and fwd+bwd
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "fwd+bwd: torch grid_sample composition" in legend
    stage = {"op": "dcnv4", "variant": "DCNv4 bench", "shape": report["results"][0]["shape"]}
    assert bench_dcn.chart_label(stage)[0] == "dcnv4 v4 bench"
    assert bench_dcn.chart_label(stage | {"variant": "stage 2"})[0] == "dcnv4 stage 2"


def test_script_runs_the_dcn_rows_only():
    script = ROOT / "benchmarks" / "bench_dcn.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--dcn-shapes", "1,3,3,2,1", "--repeat", "1", "--backend", "numpy", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["op"] for r in report["results"]] == ["dcnv3", "dcnv4"]
