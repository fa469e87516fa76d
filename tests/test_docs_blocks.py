"""Every ```python block of README.md and docs/*.md runs as written.

What runs: each ```python block, in the order of its file, in one namespace per file, so a
block may continue the blocks above it (README's CuPy example uses the arrays of its NumPy
example). A block that sets ``--xla_force_host_platform_device_count`` (JAX with several
host devices, which must be set before JAX starts) runs on its own in a fresh interpreter
with a timeout, so that a hang fails the test instead of stalling CI.

Skipped, with the reason: blocks that import cupy when no GPU is usable, torch, jax or
onnxruntime when they are not installed, ONNX exports without onnx and onnxscript (and
blocks after them in the same file that use their names).

Not run: ```bash blocks (install commands, minutes-long benchmarks, the GPU session script),
and blocks of other languages or none (output samples, kernel excerpts, signatures, marked
```text). The README's test command, a ```bash block, is checked instead: it installs what
the whole suite needs and is the command .ci/run runs.

Blocks that call ``torch.compile`` are marked ``slow`` (inductor compiles C++: 20-30 s each).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import gpu_unavailable_reason

REPO = Path(__file__).resolve().parents[1]
FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)\s*$")
OWN_PROCESS = "xla_force_host_platform_device_count"
TIMEOUT_S = 120


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file (indented fences, inside list items, too)."""
    found, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(m['indent'])}```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code fence")
        found.append(Block(path, start + 1, m["lang"].lower(), textwrap.dedent("\n".join(body)) + "\n"))
        i += 1
    return found


PYTHON = [b for path in FILES for b in blocks(path) if b.lang in ("python", "py")]


def _imports(code: str) -> set[str]:
    """Top-level packages the code imports (deformarray.torch and deformarray.jax count as
    torch and jax)."""
    names = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", code, flags=re.M)
    adapters = {"deformarray.torch": "torch", "deformarray.jax": "jax"}
    return {adapters.get(n, n.split(".")[0]) for n in names}


def skip_reason(block: Block) -> str | None:
    needs = _imports(block.code)
    if "torch.onnx.export(" in block.code:  # the TorchDynamo exporter builds with these
        needs |= {"onnx", "onnxscript"}
    if "cupy" in needs:
        reason = gpu_unavailable_reason()
        if reason is not None:
            return f"needs a GPU: {reason}"
    for name in ("torch", "jax", "sklearn", "onnx", "onnxscript", "onnxruntime"):
        if name in needs and importlib.util.find_spec(name) is None:
            return f"needs {name}, which is not installed"
    return None


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


# one namespace per file, and how many of its Python blocks have run in it
_namespaces: dict[Path, tuple[dict, int]] = {}


def _run_in_file_namespace(block: Block) -> None:
    """Run the blocks of ``block``'s file up to and including it (those not run yet), in the
    file's namespace. Earlier blocks that are skipped or run in their own process are left
    out; a later block using their names fails with NameError, which is the docs' bug."""
    same_file = [b for b in PYTHON if b.path == block.path]
    ns, done = _namespaces.get(block.path, ({"__name__": "__docs__"}, 0))
    upto = same_file.index(block) + 1
    for b in same_file[done:upto]:
        _namespaces[block.path] = (ns, same_file.index(b) + 1)
        if b is not block and (skip_reason(b) is not None or OWN_PROCESS in b.code):
            continue
        exec(compile(b.code, b.name, "exec"), ns)


@pytest.mark.parametrize(
    "block",
    [pytest.param(b, marks=[pytest.mark.slow] if "torch.compile(" in b.code else []) for b in PYTHON],
    ids=[b.name for b in PYTHON],
)
def test_python_block_runs(block, monkeypatch, tmp_path):
    reason = skip_reason(block)
    if reason is not None:
        pytest.skip(reason)
    if OWN_PROCESS in block.code:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", block.code],
                cwd=tmp_path,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=TIMEOUT_S,
            )
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{block.name} did not finish in {TIMEOUT_S} s (a hang?)\n{exc.stdout}\n{exc.stderr}")
        assert proc.returncode == 0, f"{block.name}\n{proc.stdout}\n{proc.stderr}"
        return
    monkeypatch.chdir(tmp_path)  # anything a block writes goes to a temporary directory
    _run_in_file_namespace(block)


def test_blocks_are_found():
    """The extraction sees the blocks it should (a changed fence style would skip them)."""
    names = {b.name for b in PYTHON}
    assert sum(b.path.name == "README.md" for b in PYTHON) >= 4, names
    assert any(b.path.name == "jax.md" and OWN_PROCESS in b.code for b in PYTHON), names
    # every ```python block is code to run; signatures and output samples are ```text
    for b in PYTHON:
        compile(b.code, b.name, "exec")


# ---------------------------------------------------------------------------------------
# the README's test command: the whole suite, as CI runs it
# ---------------------------------------------------------------------------------------


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    after = text.split("Install and run the tests", 1)[1]
    (block,) = [b for b in blocks(REPO / "README.md") if b.lang == "bash" and b.code.strip() in after[:600]]
    return block.code.strip()


def _extras() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]


def _expand(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """Requirement names of an extra, self-references (deformarray[a,b]) followed."""
    names = set()
    for req in extras[extra]:
        m = re.match(r"deformarray\[([\w,-]+)\]", req)
        if m:
            for sub in m[1].split(","):
                names |= _expand(sub, extras)
        else:
            names.add(re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower())
    return names


def test_readme_test_command_installs_the_whole_suite():
    """A newcomer runs what CI runs: the torch, JAX and example tests are not skipped."""
    command = _readme_test_command()
    install, run = command.split(" && ")
    assert run == "python -m pytest -q", command
    m = re.fullmatch(r'python -m pip install -e "\.\[([\w,-]+)\]"(.*)', install)
    assert m, install
    names = set().union(*(_expand(extra, _extras()) for extra in m[1].split(",")))
    assert {"pytest", "hypothesis", "torch", "jax", "scikit-learn", "matplotlib"} <= names, names
    # torch pinned on the command line: a bare `torch` can be a multi-gigabyte CUDA build
    assert re.search(r"(^|\s)torch==\d+\.\d+\.\d+(\s|$)", m[2]), install


def test_ci_runs_the_readme_test_command():
    command = _readme_test_command()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert f"bash -c '{command}'" in ci, "the README test command step of .ci/run differs from README.md"
    # and no other page shows a different test command
    for path in FILES:
        for b in blocks(path):
            if b.lang == "bash" and "python -m pytest -q" in b.code and "pip install" in b.code:
                assert b.code.strip() == command, b.name
