"""The repository itself: build by-products are neither tracked nor left unignored; the
subpackages' modules import each other without a cycle."""

from __future__ import annotations

import ast
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


# ---------------------------------------------------------------------------------------
# Imports inside a subpackage go one way (no cycle, not even through a function's import)
# ---------------------------------------------------------------------------------------

PACKAGES = ["deformarray/bench", "deformarray/jax", "deformarray/torch"]


def _intra_package_imports(package: pathlib.Path) -> dict[str, set[str]]:
    """Module name (``__init__`` for the package itself) -> the modules of the same package
    it imports, read with ``ast`` from every import statement, those inside functions
    included. ``from . import name`` imports the module ``name`` when there is one, else
    (a name the package's ``__init__`` defines) ``__init__``."""
    modules = {p.stem for p in package.glob("*.py")}
    dotted = ".".join(package.relative_to(ROOT).parts)  # "deformarray.bench"

    def relative(absolute: str) -> str | None:  # "deformarray.bench.conv.x" -> "conv.x"
        if absolute == dotted:
            return ""
        return absolute[len(dotted) + 1 :] if absolute.startswith(dotted + ".") else None

    graph: dict[str, set[str]] = {}
    for name in sorted(modules):
        targets: list[str] = []  # relative to the package; "" is the package itself
        for node in ast.walk(ast.parse((package / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                targets += [t for t in (relative(alias.name) for alias in node.names) if t is not None]
            elif isinstance(node, ast.ImportFrom) and node.level <= 1:
                base = (node.module or "") if node.level == 1 else relative(node.module or "")
                if base is None:
                    continue  # another package
                targets += [base] if base else [alias.name for alias in node.names]
        heads = {t.split(".")[0] for t in targets}
        graph[name] = {h if h in modules else "__init__" for h in heads} - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_the_package(package):
    graph = _intra_package_imports(ROOT / package)
    assert len(graph) > 2, graph  # the package and its modules were found
    # __init__ only re-exports: a module that imports from it closes a cycle through it
    assert _cycle(graph) is None, f"{package}: import cycle {' -> '.join(_cycle(graph) or [])}"
