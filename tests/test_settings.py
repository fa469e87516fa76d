"""Process-wide settings: the workspace bound's validation, its context manager under
threads, and calls that read their settings once."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from reference import make_case

import deformarray as da
from deformarray.cpu import deform_conv as cpu_conv


@pytest.mark.parametrize("bad", [True, False, "64MB", 1.5, 64e6, None, [1]])
def test_set_workspace_limit_refuses_non_integers(bad):
    before = da.get_workspace_limit()
    with pytest.raises(TypeError, match="workspace limit must be a positive int"):
        da.set_workspace_limit(bad)
    with pytest.raises(TypeError, match="workspace limit"), da.workspace_limit(bad):
        pass
    assert da.get_workspace_limit() == before


@pytest.mark.parametrize("bad", [0, -1, -(2**40)])
def test_set_workspace_limit_refuses_non_positive(bad):
    before = da.get_workspace_limit()
    with pytest.raises(ValueError, match="positive"):
        da.set_workspace_limit(bad)
    assert da.get_workspace_limit() == before


def test_set_workspace_limit_takes_numpy_integers():
    before = da.get_workspace_limit()
    try:
        da.set_workspace_limit(np.int64(1 << 20))
        assert da.get_workspace_limit() == 1 << 20 and type(da.get_workspace_limit()) is int
    finally:
        da.set_workspace_limit(before)


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "0", "-3", "64MB", "1e-9"])
def test_bad_environment_value_names_the_variable(raw):
    env = dict(os.environ, DEFORMARRAY_WORKSPACE_MB=raw)
    run = subprocess.run([sys.executable, "-c", "import deformarray"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "DEFORMARRAY_WORKSPACE_MB" in run.stderr and repr(raw) in run.stderr, run.stderr[-500:]


def test_environment_value_sets_the_default():
    env = dict(os.environ, DEFORMARRAY_WORKSPACE_MB="1.5")
    code = "import deformarray; print(deformarray.get_workspace_limit())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == 3 << 19


def test_workspace_limit_blocks_in_two_threads_keep_their_own_values():
    """T1 enters with A, T2 with B, T1 leaves, T2 leaves: each sees its own value inside,
    and the process-wide value is the same afterwards (it lost T1's update and restored
    T2's saved A, a value nobody set for the process)."""
    before = da.get_workspace_limit()
    steps = [threading.Event() for _ in range(4)]
    seen: dict[str, int] = {}

    def t1():
        with da.workspace_limit(1111):
            steps[0].set()
            steps[1].wait(10)
            seen["t1 inside"] = da.get_workspace_limit()
        steps[2].set()

    def t2():
        steps[0].wait(10)
        with da.workspace_limit(2222):
            steps[1].set()
            steps[2].wait(10)
            seen["t2 inside"] = da.get_workspace_limit()
        seen["t2 after"] = da.get_workspace_limit()

    threads = [threading.Thread(target=t1), threading.Thread(target=t2)]
    [t.start() for t in threads]
    [t.join(20) for t in threads]
    assert seen == {"t1 inside": 1111, "t2 inside": 2222, "t2 after": before}
    assert da.get_workspace_limit() == before


def test_workspace_limit_blocks_nest_and_override_the_process_value():
    before = da.get_workspace_limit()
    with da.workspace_limit(5000):
        with da.workspace_limit(7000):
            assert da.get_workspace_limit() == 7000
        assert da.get_workspace_limit() == 5000
        seen: list[int] = []
        other = threading.Thread(target=lambda: seen.append(da.get_workspace_limit()))
        other.start()
        other.join(10)
        assert seen == [before]  # a block binds its own thread only
    assert da.get_workspace_limit() == before


def test_a_call_reads_the_bound_once(monkeypatch, rng):
    """Another thread setting the bound while a backward runs (here: at the first chunk)
    must not change that call's plan. Reading it again per chunk made the backward fail
    with "workspace arena too small"."""
    case = make_case(rng, n=4, c_in=4, height=12, width=12, c_out=4, dtype=np.float32)
    go = rng.standard_normal(case.out_shape()).astype(np.float32)
    before = da.get_workspace_limit()
    limit = 40_000  # several chunks of images

    with da.workspace_limit(limit):
        want = da.deform_conv2d_backward(go, case.input, case.offset, case.weight, **case.kwargs())
    original = cpu_conv.to_channels_last

    def meddling(*args):
        da.set_workspace_limit(1 << 30)  # what another thread could do at any moment
        return original(*args)

    monkeypatch.setattr(cpu_conv, "to_channels_last", meddling)
    try:
        da.set_workspace_limit(limit)
        got = da.deform_conv2d_backward(go, case.input, case.offset, case.weight, **case.kwargs())
    finally:
        da.set_workspace_limit(before)
    for name in ("input", "offset", "weight", "mask"):
        assert getattr(got, name).tobytes() == getattr(want, name).tobytes(), name


def test_bound_changed_by_another_thread_during_calls(rng):
    """A thread flips the process-wide bound while this one runs chunked backwards: no call
    fails, and each result is one of the two results the two bounds give."""
    case = make_case(rng, n=4, c_in=4, height=12, width=12, c_out=4, dtype=np.float32)
    go = rng.standard_normal(case.out_shape()).astype(np.float32)
    before = da.get_workspace_limit()
    limits = (40_000, 1 << 24)  # one image per chunk, or all at once
    wants = []
    for limit in limits:
        with da.workspace_limit(limit):
            wants.append(da.deform_conv2d_backward(go, case.input, case.offset, case.weight, **case.kwargs()))
    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            da.set_workspace_limit(limits[i % 2])
            i += 1

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        for _ in range(30):
            got = da.deform_conv2d_backward(go, case.input, case.offset, case.weight, **case.kwargs())
            assert any(got.input.tobytes() == w.input.tobytes() for w in wants)
    finally:
        stop.set()
        flipper.join(10)
        da.set_workspace_limit(before)
