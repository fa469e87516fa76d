"""The repository itself: build by-products are neither tracked nor left unignored."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("path", [".coverage", ".coverage.host.1234", "deformarray/cpu/__pycache__/x.nbi"])
def test_by_products_are_ignored(path):
    assert _git("check-ignore", "--no-index", path).strip() == path


def test_no_by_product_is_tracked():
    tracked = _git("ls-files").splitlines()
    bad = [f for f in tracked if pathlib.PurePath(f).name.startswith(".coverage") or f.endswith((".nbi", ".nbc"))]
    assert bad == []
