"""The multi-scale deformable attention rows of ``deformarray bench`` (``--op msda``): sizes,
inputs, the grid_sample composition (it must compute our numbers, or the ratio means
nothing), the table, the JSON, the GPU wiring (stand-ins) and the errors. Tiny shapes and
one or two rounds: these check the tool, not the figures."""

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
from deformarray.bench import msda as bench_msda
from deformarray.bench import plot as bench_plot

ROOT = Path(__file__).resolve().parents[1]
# a decoder-like row (5 queries, levels 4x6 and 2x3) and an encoder row (Lq = S = 25+9+4)
TINY = ["--msda-shapes", "1,5,2,4,2,2,32,48;2,S,2,3,3,2,40,40"]
SHAPES = bench_msda.parse_msda_shapes(TINY[1])


# bench sets Numba's and torch's thread counts (conftest.py's fixture puts them back)
pytestmark = pytest.mark.usefixtures("restore_threads")


# ---------------------------------------------------------------------------------------
# sizes and inputs
# ---------------------------------------------------------------------------------------


def test_default_rows_are_deformable_detrs():
    dec, enc = bench_msda.DEFAULT_CPU_SHAPES
    pyramid = [(100, 152), (50, 76), (25, 38), (13, 19)]  # 800x1216 at strides 8, 16, 32, 64
    assert dec.level_shapes() == enc.level_shapes() == pyramid
    assert dec.pixels() == enc.pixels() == 20197
    assert (dec.n, dec.queries(), dec.m, dec.d, dec.levels, dec.points) == (2, 300, 8, 32, 4, 4)
    assert (enc.n, enc.queries(), enc.variant, dec.variant) == (1, 20197, "encoder", "decoder")
    spatial, starts = bench_msda.level_arrays(enc)
    assert spatial.tolist() == [list(hw) for hw in pyramid] and starts.tolist() == [0, 15200, 19000, 19950]


def test_parse_msda_shapes():
    dec, enc = SHAPES
    assert dec == bench_msda.MsdaShape(1, 5, 2, 4, 2, 2, 32, 48) and dec.level_shapes() == [(4, 6), (2, 3)]
    assert enc.lq is None and enc.level_shapes() == [(5, 5), (3, 3), (2, 2)] and enc.queries() == 38
    assert bench_msda.parse_msda_shapes(" 1,s,1,1,1,1,1,1 ;")[0].lq is None  # S in either case
    with pytest.raises(ValueError, match="8 positive integers N,Lq,M,D,L,P,H,W"):
        bench_msda.parse_msda_shapes("1,5,2,4,2,2,32")
    with pytest.raises(ValueError, match="8 positive integers"):
        bench_msda.parse_msda_shapes("S,5,2,4,2,2,32,48")  # only Lq may be S
    with pytest.raises(ValueError, match="at least 1"):
        bench_msda.parse_msda_shapes("1,0,2,4,2,2,32,48")
    with pytest.raises(ValueError, match="no shape"):
        bench_msda.parse_msda_shapes(";")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_inputs(dtype):
    shape = SHAPES[0]
    a = bench_msda.make_inputs(shape, dtype)
    assert a.value.shape == (1, 24 + 6, 2, 4)
    assert a.sampling_locations.shape == (1, 5, 2, 2, 2, 2)
    assert a.attention_weights.shape == (1, 5, 2, 2, 2) and a.grad_output.shape == (1, 5, 8)
    assert all(arr.dtype == np.dtype(dtype) for arr in a)
    assert a.sampling_locations.min() >= 0 and a.sampling_locations.max() < 1
    # a softmax over the L*P samples of each query and head
    sums = a.attention_weights.reshape(1, 5, 2, 4).sum(-1)
    np.testing.assert_allclose(sums, 1, rtol=1e-6)
    assert a.attention_weights.min() > 0


def _composition_and_ours(shape, dtype):
    torch = pytest.importorskip("torch")
    a = bench_msda.make_inputs(shape, dtype)
    ours = bench_msda.ours_impl(shape, a, bench_common.noop, None)
    comp = bench_msda.composition_impl(shape, torch, a.map(torch.from_numpy))
    return ours, comp


@pytest.mark.parametrize("shape", SHAPES + [bench_msda.MsdaShape(2, 7, 3, 5, 4, 3, 100, 70)], ids=str)
def test_composition_computes_our_numbers(shape):
    """The benchmark's two contenders on its own inputs: the same forward (float32, rtol
    1e-4) and the same gradients (float64, tight), or the ratio compares different maths."""
    ours, comp = _composition_and_ours(shape, "float32")
    np.testing.assert_allclose(ours.fwd(), comp.fwd().numpy(), rtol=1e-4, atol=1e-5)
    y, grads = ours.fwdbwd()
    ty, tgrads = comp.fwdbwd()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert len(grads) == len(tgrads) == 3
    ours, comp = _composition_and_ours(shape, "float64")
    y, grads = ours.fwdbwd()
    ty, tgrads = comp.fwdbwd()
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    for mine, ref in zip(grads, tgrads):  # value, sampling_locations, attention_weights
        assert mine.shape == tuple(ref.shape)
        np.testing.assert_allclose(mine, ref.numpy(), rtol=1e-9, atol=1e-11)


def test_torch_cpu_meter_counts_workspace_not_results():
    torch = pytest.importorskip("torch")

    def fn():
        scratch = torch.ones(1 << 20)  # 4 MiB, freed
        out = torch.empty(1 << 18)  # 1 MiB, returned
        out.copy_(scratch[: 1 << 18])
        return out

    extra = bench_common.torch_cpu_peak_extra(fn)
    assert (4 << 20) <= extra < (4 << 20) + (1 << 16)


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def test_bench_msda_table(capsys):
    pytest.importorskip("torch")
    assert cli.main(["bench", "--op", "msda", *TINY, "--repeat", "2", "--backend", "numpy"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    title = next(line for line in out.splitlines() if line.startswith("Multi-scale deformable attention"))
    assert "CPU, numpy arrays, float32; comp = grid_sample composition (torch " in title
    lines = out[out.index(title) :].splitlines()
    header = lines[1].split()
    assert header[:2] == ["case", "N,Lq,M,D,L,P,HxW"]
    for column in ("fwd ms", "comp fwd ms", "ratio", "fwd+bwd ms", "comp fwd+bwd ms", "peak extra MiB", "comp peak"):
        assert column in lines[1]
    rows = {line.split()[0]: line for line in lines[3:5]}
    assert rows["decoder"].split()[1] == "1,5,2,4,2,2,32x48"
    assert rows["encoder"].split()[1] == "2,S=38,2,3,3,2,40x40"
    for row in rows.values():
        assert "error" not in row and row.count("x (") == 2, row  # both ratios, with their range
    assert "ratio = ours / composition within each run, median (range): below 1 = ours faster" in out
    assert "[2/2] numpy ms_deform_attn (encoder) 2,S=38,2,3,3,2,40x40 float32" in captured.err
    assert "USDT" not in captured.err  # the profiler's lines are muted


def test_bench_msda_json(capsys):
    pytest.importorskip("torch")
    argv = ["bench", "--op", "msda", *TINY, "--repeat", "2", "--backend", "numpy", "--json", "--dtype", "float64"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["ops"] == ["msda"]
    assert report["settings"]["msda"]["sampling_locations"] == "uniform in [0, 1)"
    rows = report["results"]
    assert [(r["op"], r["variant"]) for r in rows] == [("ms_deform_attn", "decoder"), ("ms_deform_attn", "encoder")]
    assert rows[0]["shape"] == {
        "N": 1,
        "Lq": 5,
        "M": 2,
        "D": 4,
        "L": 2,
        "P": 2,
        "H": 32,
        "W": 48,
        "S": 30,
        "queries": "given",
        "levels": [[4, 6], [2, 3]],
    }
    assert rows[1]["shape"]["Lq"] == rows[1]["shape"]["S"] == 38 and rows[1]["shape"]["queries"].startswith("all")
    for row in rows:
        assert row["backend"] == "numpy" and row["dtype"] == "float64"
        assert row["ours"]["label"] == "deformarray.ms_deform_attn"
        check_cpu_composition_row(row)


def test_bench_msda_without_torch_says_why(monkeypatch, capsys):
    argv = ["bench", "--op", "msda", *TINY, "--repeat", "1", "--backend", "numpy"]
    out = bench_without_torch(monkeypatch, capsys, argv)
    assert "note: torch not installed: no grid_sample composition for the CPU ms_deform_attn rows" in out.splitlines()
    assert "decoder  1,5,2,4,2,2,32x48" in out


def test_bench_msda_reports_a_failing_call(monkeypatch, capsys):
    argv = ["bench", "--op", "msda", *TINY, "--repeat", "1", "--backend", "numpy"]
    error = RuntimeError("no attention\nsecond line")
    out = bench_with_a_failing_call(monkeypatch, capsys, "ms_deform_attn_backward", error, argv)
    assert "note: numpy ms_deform_attn (decoder) 1,5,2,4,2,2,32x48 float32 ours: RuntimeError: no attention" in out
    assert "Traceback" not in out
    row = next(line for line in out.splitlines() if line.startswith("decoder "))
    assert row.split()[2] != "error" and "error" in row  # forward timed, forward+backward failed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--msda-shapes", "1,2,3"], "8 positive integers N,Lq,M,D,L,P,H,W (Lq may be S)"),
        (["bench", "--msda-shapes", "1,2,3,4,5,6,7,0"], "at least 1"),
        (["bench", "--op", "conv", "--msda-shapes", "1,2,3,4,5,6,7,8"], "use --op msda or all"),
        (["bench", "--op", "msda", "--roi-shapes", "1,2,3,4,5"], "use --op roi or all"),
    ],
)
def test_bad_arguments_give_a_clean_error(argv, message, capsys):
    check_usage_error(argv, message, capsys)


def test_help_names_the_msda_rows(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "msda = ms_deform_attn" in out and "all = conv then roi then msda" in out
    assert "--msda-shapes" in out and "(or S: one per pyramid pixel, the encoder)" in out
    assert "grid_sample composition" in out


def test_gpu_rows_wiring_with_stand_ins(monkeypatch, capsys):
    """Without a GPU, run the GPU rows on NumPy arrays posing as CuPy ones and CPU torch
    posing as CUDA torch: both dtypes by default, the composition and its ratios present."""
    stand_in_gpu(monkeypatch, bench_common.torch_cpu_peak_extra, ("float32", "float64"))  # NumPy has no float16 path

    assert cli.main(["bench", "--op", "msda", *TINY, "--repeat", "1", "--backend", "cupy", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["results"]
    assert [(r["backend"], r["dtype"], r["variant"]) for r in rows] == [
        ("cupy", d, v) for d in ("float32", "float64") for v in ("decoder", "encoder")
    ]
    text = "\n".join(bench_msda.format_sections(rows, "Stand-in GPU"))
    check_gpu_composition_rows(rows, text)
    table = text.splitlines()[3:]
    assert sum(line.startswith(("decoder", "encoder")) for line in table) == 4


def test_gpu_rows_without_cuda_torch_are_ours_alone(monkeypatch):
    opts = bench_common.Options(ops=("msda",), dtype="float32", repeat=1, shapes={"msda_shapes": SHAPES[:1]})
    _, text = gpu_row_without_cuda_torch(monkeypatch, bench_msda, opts, 0)
    assert "decoder" in text


def test_plot_labels_the_msda_rows(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    pytest.importorskip("torch")
    assert cli.main(["bench", "--op", "msda", *TINY, "--repeat", "1", "--backend", "numpy", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fig = bench_plot.plot_report(report, str(tmp_path / "b.png"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "msda dec\n1,5,2,4,2,2,32x48\nCPU f32",
        "msda enc\n2,S=38,2,3,3,2,40x40\nCPU f32",
    ]
    assert len(ax.patches) == 2 * 4  # ours and the composition, fwd and fwd+bwd
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "fwd+bwd: torch grid_sample composition" in legend


def test_script_runs_the_msda_rows_only():
    script = ROOT / "benchmarks" / "bench_msda.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--msda-shapes", "1,3,1,2,1,1,8,8", "--repeat", "1", "--backend", "numpy"]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["op"] for r in report["results"]] == ["ms_deform_attn"]
