"""Processes: a child forked after the parent called deformarray works (TBB threading
layer), through os.fork, multiprocessing.Pool(fork) and a PyTorch DataLoader with workers.

Each scenario runs in a fresh interpreter with a timeout, so that a hang fails the test
instead of stalling the run. With GNU OpenMP (Numba's default on Linux) the child was
killed ("fork() called from a process already using GNU OpenMP, this is unsafe"), the
Pool hung and the DataLoader died at its second epoch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() on this platform")

COMMON = """
import os, sys
import numpy as np
import deformarray as da

def case(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 9, 9))
    w = rng.standard_normal((4, 4, 3, 3))
    off = rng.standard_normal((2, 18, 9, 9))
    return x, off, w

def value(seed):
    x, off, w = case(seed)
    y = da.deform_conv2d(x, off, w, padding=1)
    g = da.deform_conv2d_backward(np.ones_like(y), x, off, w, padding=1)
    return float(y.sum() + g.offset.sum())

parent = [value(s) for s in range(4)]  # the parent uses the kernels (and their threads) first
"""


def _run(body: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    code = COMMON + textwrap.dedent(body)
    try:
        return subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ, DEFORMARRAY_QUIET="1", **(env or {})),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung for {timeout} s: {exc.stdout!r} {exc.stderr!r}")


def _tbb_or_skip():
    import deformarray.cpu._threading as threading_layer

    if threading_layer.configure() != "tbb":
        pytest.skip("TBB is not installed here: forked children get a clear error instead (tested below)")


def test_forked_child_after_a_parent_call_gets_the_right_result():
    _tbb_or_skip()
    run = _run("""
        import numba
        assert numba.threading_layer() == "tbb", numba.threading_layer()
        pid = os.fork()
        if pid == 0:
            ok = [value(s) for s in range(4)] == parent
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    assert run.returncode == 0 and "child 0" in run.stdout, run.stderr[-2000:]


def test_forked_child_runs_ms_deform_attn():
    """The parent calls ms_deform_attn (forward and backward); a forked child calls it and
    gets the same bits."""
    _tbb_or_skip()
    run = _run("""
        def msda(seed):
            rng = np.random.default_rng(seed)
            shapes, starts = np.array([[6, 5], [3, 2], [1, 1]]), np.array([0, 30, 36])
            value = rng.standard_normal((2, 37, 2, 4))
            loc = rng.uniform(-0.2, 1.2, (2, 7, 2, 3, 4, 2))
            attn = rng.uniform(0, 1, (2, 7, 2, 3, 4))
            y = da.ms_deform_attn(value, shapes, starts, loc, attn)
            g = da.ms_deform_attn_backward(np.ones_like(y), value, shapes, starts, loc, attn)
            return y.tobytes() + b"".join(a.tobytes() for a in g)

        in_parent = [msda(s) for s in range(3)]
        pid = os.fork()
        if pid == 0:
            ok = [msda(s) for s in range(3)] == in_parent
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    assert run.returncode == 0 and "child 0" in run.stdout, run.stderr[-2000:]


def test_forked_child_runs_dcnv3_and_dcnv4():
    """The parent calls dcnv3 and dcnv4 (forward and backward); a forked child calls them
    and gets the same bits."""
    _tbb_or_skip()
    run = _run("""
        def dcn(seed):
            rng = np.random.default_rng(seed)
            x = rng.standard_normal((2, 6, 5, 8))
            off = rng.uniform(-2, 2, (2, 6, 5, 2 * 9 * 2))
            m = rng.uniform(0, 1, (2, 6, 5, 2 * 9))
            om = rng.uniform(-2, 2, (2, 6, 5, 56))
            y = da.dcnv3(x, off, m, 3, padding=1, group=2)
            g = da.dcnv3_backward(np.ones_like(y), x, off, m, 3, padding=1, group=2)
            y4 = da.dcnv4(x, om, 3, padding=1, group=2)
            g4 = da.dcnv4_backward(np.ones_like(y4), x, om, 3, padding=1, group=2)
            return y.tobytes() + y4.tobytes() + b"".join(a.tobytes() for a in (*g, *g4))

        in_parent = [dcn(s) for s in range(3)]
        pid = os.fork()
        if pid == 0:
            ok = [dcn(s) for s in range(3)] == in_parent
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
    """)
    assert run.returncode == 0 and "child 0" in run.stdout, run.stderr[-2000:]


def test_pool_with_fork_maps():
    _tbb_or_skip()
    run = _run("""
        import multiprocessing as mp
        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map(value, range(4), chunksize=1)
        print("same", got == parent)
    """)
    assert run.returncode == 0 and "same True" in run.stdout, run.stderr[-2000:]


def test_dataloader_with_workers_over_two_epochs():
    pytest.importorskip("torch")
    _tbb_or_skip()
    run = _run("""
        import torch
        from torch.utils.data import DataLoader, Dataset

        class Deformed(Dataset):
            def __len__(self):
                return 4
            def __getitem__(self, i):
                return torch.tensor(value(i), dtype=torch.float64)

        loader = DataLoader(Deformed(), batch_size=2, num_workers=2, multiprocessing_context="fork")
        for epoch in range(2):
            got = torch.cat(list(loader)).tolist()
            assert got == parent, (epoch, got, parent)
        print("epochs ok")
    """)
    assert run.returncode == 0 and "epochs ok" in run.stdout, run.stderr[-2000:]


def test_without_tbb_a_forked_child_gets_a_clear_error():
    """GNU OpenMP chosen by the user: the child raises a RuntimeError that names the fix,
    instead of being killed by Numba."""
    run = _run(
        """
        import numba
        assert numba.threading_layer() == "omp", numba.threading_layer()
        pid = os.fork()
        if pid == 0:
            try:
                value(0)
            except RuntimeError as exc:
                ok = "forked" in str(exc) and "tbb" in str(exc) and "spawn" in str(exc)
                os._exit(7 if ok else 3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """,
        env={"NUMBA_THREADING_LAYER": "omp"},
    )
    if run.returncode != 0 and "No threading layer could be loaded" in run.stderr:
        pytest.skip("no OpenMP layer in this Numba")
    from numba.np.ufunc import omppool

    if getattr(omppool, "openmp_vendor", "GNU") != "GNU":
        assert "child 0" in run.stdout, run.stderr[-2000:]  # Intel's OpenMP is fork-safe
    else:
        assert "child 7" in run.stdout, (run.stdout, run.stderr[-2000:])


def test_user_choice_of_layer_is_kept():
    run = _run(
        """
        import numba
        print("layer", numba.threading_layer())
        """,
        env={"NUMBA_THREADING_LAYER": "workqueue"},
    )
    assert run.returncode == 0 and "layer workqueue" in run.stdout, run.stderr[-2000:]
