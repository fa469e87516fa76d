"""The cold-cache notice (one line on stderr when a CPU call is about to compile its
kernels) and ``deformarray warmup`` (compile them all ahead).

The end-to-end checks run in subprocesses with ``NUMBA_CACHE_DIR`` pointing at a temporary
directory, so that "cold" and "warm" are this test's own doing whatever the state of the
checkout's ``__pycache__``; they compile one small kernel (deform_roi_pool's forward,
float32), which takes a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import deformarray as da
from deformarray import _warmup, cli

REPO = Path(__file__).resolve().parents[1]
NOTICE = "deformarray: compiling the CPU kernels of"
JIT = os.environ.get("NUMBA_DISABLE_JIT", "0") in ("", "0")

ROI_TWICE = """
import numpy as np, deformarray as da
x = np.random.default_rng(0).random((1, 2, 6, 6)).astype(np.float32)
rois = np.array([[0, 0.5, 0.5, 4.0, 4.0]], np.float32)
da.deform_roi_pool(x, rois, None, output_size=2)
da.deform_roi_pool(x, rois, None, output_size=2)
print("RAN")
"""


def _python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose Numba cache is ``cache`` (not quiet unless
    ``env`` says so)."""
    full = {k: v for k, v in os.environ.items() if k != "DEFORMARRAY_QUIET"}
    full.update(NUMBA_CACHE_DIR=str(cache), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    full.update(env)
    proc = subprocess.run([sys.executable, "-c", code], env=full, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _notices(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("deformarray: ")]


@pytest.fixture
def fresh_state(monkeypatch):
    """This process's notice state, as if nothing had been said or checked yet."""
    monkeypatch.setattr(_warmup, "_said", False)
    monkeypatch.setattr(_warmup, "_checked", set())
    monkeypatch.delenv("DEFORMARRAY_QUIET", raising=False)


# ---------------------------------------------------------------------------------------
# detection and the notice, end to end (subprocesses, a cache directory of their own)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def roi_cache(tmp_path_factory):
    """A Numba cache directory, empty until a first process ran deform_roi_pool (float32
    forward) twice in it: (the directory, that process)."""
    if not JIT:
        pytest.skip("NUMBA_DISABLE_JIT: nothing is compiled")
    cache = tmp_path_factory.mktemp("numba-cache")
    return cache, _python(ROI_TWICE, cache)


def test_notice_on_a_cold_cache_only(roi_cache):
    cache, cold = roi_cache  # the first process compiled deform_roi_pool's forward for float32
    assert "RAN" in cold.stdout
    (line,) = _notices(cold.stderr)  # once, though the call was made twice
    assert line.startswith(f"{NOTICE} deform_roi_pool for float32 "), line
    assert "`deformarray warmup`" in line and "DEFORMARRAY_QUIET=1" in line
    assert any(cache.rglob("roi_pool._forward_kernel-*.nbi"))

    warm = _python(ROI_TWICE, cache)  # the kernel comes from the cache now: nothing said
    assert "RAN" in warm.stdout and _notices(warm.stderr) == [], warm.stderr

    # the same cache is still cold for float64 and for the backward; quiet silences it all
    probe = (
        "from deformarray import _warmup\n"
        "_warmup.notice_if_cold('numpy', 'deform_roi_pool', 'float32')\n"
        "_warmup.notice_if_cold('numpy', 'deform_roi_pool', 'float64')\n"
        "_warmup.notice_if_cold('numpy', 'deform_roi_pool_backward', 'float32')\n"
    )
    (line,) = _notices(_python(probe, cache).stderr)  # float64 is cold; only one line per process
    assert line.startswith(f"{NOTICE} deform_roi_pool for float64 "), line
    assert _notices(_python(probe, cache, DEFORMARRAY_QUIET="1").stderr) == []


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch not installed")
def test_torch_notice_on_first_use_only(roi_cache, tmp_path):
    """What the PyTorch adapter says at import, before its first call imports torch._dynamo:
    something on an empty cache, nothing once any operator was compiled."""
    code = "import torch\nfrom deformarray import _warmup\n_warmup.notice_torch_import()\n"
    (line,) = _notices(_python(code, tmp_path).stderr)
    assert "the first operator call imports torch._dynamo" in line and "`deformarray warmup`" in line
    assert _notices(_python(code, roi_cache[0]).stderr) == []


# ---------------------------------------------------------------------------------------
# the notice's rules, in this process
# ---------------------------------------------------------------------------------------


def test_listed_kernels_exist():
    """The names in KERNELS are the CPU modules' Numba kernels (a rename must update them,
    or the notice would go silent)."""
    import importlib

    for function, (module_name, names) in _warmup.KERNELS.items():
        assert hasattr(da, function), function
        module = importlib.import_module(f"deformarray.cpu.{module_name}")
        for name in names:
            kernel = getattr(module, name)
            assert callable(kernel), (function, name)
            if JIT:
                assert hasattr(kernel, "py_func") and kernel._cache is not None, (function, name)


def test_notice_once_per_process(fresh_state, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(_warmup, "is_cold", lambda f, d: asked.append((f, np.dtype(d).name)) or f == "deform_conv2d")
    _warmup.notice_if_cold("numpy", "deform_roi_pool", np.float32)  # warm: nothing
    _warmup.notice_if_cold("numpy", "deform_roi_pool", np.float32)  # seen already: not asked again
    _warmup.notice_if_cold("cupy", "deform_conv2d", np.float32)  # not the CPU backend
    assert capsys.readouterr().err == "" and asked == [("deform_roi_pool", "float32")]
    _warmup.notice_if_cold("numpy", "deform_conv2d", np.dtype("float64"))
    err = capsys.readouterr().err
    assert err.startswith(f"{NOTICE} deform_conv2d for float64 ") and err.count("\n") == 1
    _warmup.notice_if_cold("numpy", "deform_conv2d", np.float32)  # said once: no more checks
    assert capsys.readouterr().err == "" and len(asked) == 2


def test_torch_notice_rules(fresh_state, monkeypatch, capsys):
    monkeypatch.setattr(_warmup, "is_cold", lambda f, d: True)
    monkeypatch.setitem(sys.modules, "torch._dynamo", object())  # loaded already: nothing to announce
    _warmup.notice_torch_import()
    assert capsys.readouterr().err == ""
    monkeypatch.delitem(sys.modules, "torch._dynamo")
    _warmup.notice_torch_import()
    assert "the first operator call imports torch._dynamo" in capsys.readouterr().err
    _warmup.notice_if_cold("numpy", "deform_conv2d", np.float32)  # the same first use: said already
    assert capsys.readouterr().err == ""


def test_notice_quiet(fresh_state, monkeypatch, capsys):
    monkeypatch.setattr(_warmup, "is_cold", lambda f, d: True)
    monkeypatch.setenv("DEFORMARRAY_QUIET", "1")
    _warmup.notice_if_cold("numpy", "deform_conv2d", np.float32)
    _warmup.notice_torch_import()
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("DEFORMARRAY_QUIET", "0")  # "0" is not quiet
    assert not _warmup.quiet()


def test_notice_never_breaks_a_call(fresh_state, monkeypatch, capsys):
    def broken(f, d):
        raise RuntimeError("numba internals changed")

    monkeypatch.setattr(_warmup, "is_cold", broken)
    _warmup.notice_if_cold("numpy", "deform_conv2d", np.float32)
    _warmup.notice_if_cold("numpy", "deform_conv2d", "not a dtype")
    assert capsys.readouterr().err == ""


def _conv(x, rois):
    return da.deform_conv2d(x, np.zeros((1, 18, 4, 4)), np.ones((1, 2, 3, 3)), padding=1)


def _roi_backward(x, rois):
    return da.deform_roi_pool_backward(np.ones((1, 2, 2, 2)), x, rois, output_size=2)


def _psroi(x, rois):
    return da.deform_psroi_pool(x, rois, output_dim=2, group_size=1, pooled_size=2)


def _msda_backward(x, rois):
    value = x.reshape(x.shape[:-2] + (-1,))[..., None].swapaxes(1, 2)  # (N, H*W, C, 1): C heads of one channel
    loc, attn = np.full((1, 3, 2, 1, 1, 2), 0.5), np.ones((1, 3, 2, 1, 1))
    return da.ms_deform_attn_backward(np.ones((1, 3, 2)), value, [[4, 4]], [0], loc, attn)


@pytest.mark.parametrize(
    "function, call",
    [
        ("deform_conv2d", _conv),
        ("deform_roi_pool_backward", _roi_backward),
        ("deform_psroi_pool", _psroi),
        ("ms_deform_attn_backward", _msda_backward),
    ],
)
def test_public_functions_ask_before_running(function, call, monkeypatch):
    """The hook in deformarray/_api.py: each public function asks once it has validated
    its arguments (a bad call raises first and says nothing), with the backend and dtype,
    before the backend runs (a stand-in backend here: nothing is compiled)."""
    from deformarray import _api

    events = []

    class Backend:
        def forward(self, *args):
            events.append("backend")

        def backward(self, *args, **kwargs):
            events.append("backend")
            return (None, None, None)

    monkeypatch.setattr(_api, "operator_module", lambda backend, name: Backend())
    monkeypatch.setattr(_warmup, "notice_if_cold", lambda backend, f, dtype: events.append((backend, f, dtype)))
    x = np.ones((1, 2, 4, 4))
    rois = np.array([[0.0, 0, 0, 3, 3]])
    call(x, rois)
    assert events == [("numpy", function, np.dtype(np.float64)), "backend"]
    with pytest.raises(ValueError):
        call(x[0], rois)
    assert len(events) == 2


# ---------------------------------------------------------------------------------------
# deformarray warmup
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(not JIT, reason="NUMBA_DISABLE_JIT: nothing to compile")
def test_warmup_leaves_nothing_cold(capsys):
    """``deformarray warmup`` runs every operator for both dtypes; afterwards no public
    function is cold for either (in CI most kernels are cached by earlier tests already)."""
    assert cli.main(["warmup"]) == 0
    out = capsys.readouterr().out
    for op in ("deform_conv2d", "deform_roi_pool", "deform_psroi_pool"):
        for dtype in _warmup.DTYPES:
            assert any(line.split()[:2] == [op, dtype] for line in out.splitlines()), (op, dtype, out)
    assert out.splitlines()[-1].startswith("done: later processes load them from Numba's cache")
    cold = [(f, d) for f in _warmup.KERNELS for d in _warmup.DTYPES if _warmup.is_cold(f, d)]
    assert cold == []


def test_warmup_dtype_option(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(
        _warmup, "warmup", lambda dtypes, report: calls.append(tuple(dtypes)) or report("op", "x", True, 1.0)
    )
    assert cli.main(["warmup", "--dtype", "float64"]) == 0
    assert calls == [("float64",)]
    assert "  op                 x        compiled           1.0 s" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):
        cli.main(["warmup", "--dtype", "float16"])


def test_warmup_failure_is_one_line(monkeypatch, capsys):
    def broken(dtypes, report):
        raise RuntimeError("no space left\nsecond line")

    monkeypatch.setattr(_warmup, "warmup", broken)
    assert cli.main(["warmup"]) == 1
    err = capsys.readouterr().err
    assert "deformarray warmup: failed: RuntimeError: no space left" in err and "second line" not in err
