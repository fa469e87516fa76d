"""examples/scaled_digits.py runs (quick mode) and prints its table and writes its PNG.
Skipped without torch or scikit-learn."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]


def test_scaled_digits_quick(tmp_path):
    png = tmp_path / "sampling.png"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "scaled_digits.py"), "--quick", "--png", str(png)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "| test accuracy" in out and "| regular digits" in out and "| scaled digits" in out
    assert "same outputs before fine-tuning: True" in out
    # a smoke run says so before its table and after it: its accuracies (a few epochs on 128
    # images, below chance at times) must not read as the example's result
    lines = out.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("| test accuracy"))
    assert any(line.startswith("SMOKE RUN (--quick)") and "mean nothing" in line for line in lines[:table]), out
    assert "(smoke run: these accuracies mean nothing, see above)" in lines[table:], out
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IEND" in data[-12:]
