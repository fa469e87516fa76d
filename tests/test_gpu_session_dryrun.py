"""benchmarks/gpu_session.sh --dry-run: the GPU verdict's plumbing without a GPU (CI).

The dry run keeps the runner, the global deadline, the per-step caps, summary.txt and the
$OUT layout, with CPU stand-ins for the GPU commands; its timings stand-in sleeps past any
cap, so a short budget shows a step killed at its cap and the next skipped for lack of time.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ("env", "smoke", "torch", "memcheck", "timings", "pytest_gpu")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(out: Path, *args: str, budget: float = 8) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    env.pop("DFA_VERDICT_DRY_RUN", None)
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--budget", str(budget), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc, time.monotonic() - t0


def _summary(out: Path) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in (out / "summary.txt").read_text().splitlines():
        m = re.match(r"^(\d)_(\w+)\s+(PASS|FAIL|TIMEOUT|SKIP|PENDING)\b(.*)$", line)
        if m:
            rows[m.group(2)] = (m.group(3), m.group(4))
    return rows


def test_deadline_caps_summary_and_out_layout(tmp_path):
    out = tmp_path / "out"
    proc, elapsed = _run(out, budget=8)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step timed out: not a pass
    assert elapsed < 8 + 6, elapsed  # the sleeper was killed at the deadline, not after 600 s
    rows = _summary(out)
    assert list(rows) == list(STEPS)
    assert [rows[s][0] for s in STEPS[:4]] == ["PASS"] * 4
    assert rows["timings"][0] == "TIMEOUT" and "killed after" in rows["timings"][1]
    assert rows["pytest_gpu"][0] == "SKIP" and "no time left" in rows["pytest_gpu"][1]
    text = (out / "summary.txt").read_text()
    assert "DRY RUN" in text and text.rstrip().endswith("verdict: INCOMPLETE")
    assert "84 checks listed, 7 cases" in (out / "2_smoke.log").read_text()  # refs.npz loads, every case
    # what the device tool brings back: at most 8 files, top level, plain names
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files), files
    assert {f"{i}_{s}.log" for i, s in enumerate(STEPS, 1)} | {"summary.txt", "5_timings.json"} == set(files)


def test_only_and_old_modes(tmp_path):
    proc, _ = _run(tmp_path / "a", "--only", "env,smoke", budget=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(_summary(tmp_path / "a")) == ["env", "smoke"]
    assert "verdict: PASS" in (tmp_path / "a" / "summary.txt").read_text()
    env = dict(os.environ, OUT=str(tmp_path / "b"), PYTHON=sys.executable, DFA_VERDICT_DRY_RUN="1")
    proc = subprocess.run(["bash", str(SCRIPT), "tests"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(_summary(tmp_path / "b")) == ["pytest_gpu"]
    assert (tmp_path / "b" / "6_pytest_gpu.log").exists()  # numbered as in the full list
