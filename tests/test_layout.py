"""The package's shape: no import cycle, stages import only lower stages, notebooks only orchestrate.

The import graph is read from the source (``ast``), so lazy imports inside functions count
as edges too: a cycle hidden in a function body still breaks a reader's mental model and
can still deadlock at import time. Imports under ``if TYPE_CHECKING:`` never run and are
ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "featmatch"
NOTEBOOKS = ROOT / "notebooks"

#: Pipeline stages, lowest first. A module may import its own stage or a lower one.
RANKS = {
    "featmatch._io": 0,
    "featmatch._hooks": 0,
    "featmatch._progress": 0,
    "featmatch._threads": 0,
    "featmatch._dask": 0,
    "featmatch.lm": 1,
    "featmatch.judging": 1,
    "featmatch.saes": 2,
    "featmatch.synthetic": 3,
    "featmatch.matching": 3,
    "featmatch.evaluation": 4,
    "featmatch.semantic": 4,
    "featmatch.circuits": 5,
    "featmatch.chapters": 6,
    "featmatch.cli": 7,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """featmatch modules imported anywhere in ``path`` (outside ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("featmatch"):
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("featmatch"):
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    out.add(sub if sub in known else mod)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(name)
    return {m for m in out if m in known}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(path, name, known) for name, path in mods.items()}


def _stage(module: str) -> str | None:
    for stage in sorted(RANKS, key=len, reverse=True):
        if module == stage or module.startswith(stage + "."):
            return stage
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_walker_sees_lazy_imports_and_skips_type_checking(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from featmatch.saes import fold\n"
        "def f():\n    from featmatch.matching import match\n    import featmatch.lm.models\n"
    )
    known = {"featmatch.saes", "featmatch.matching", "featmatch.lm.models"}
    assert _imports(src, "x", known) == {"featmatch.matching", "featmatch.lm.models"}


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_featmatch_modules():
    graph = _graph()
    assert len(graph) > 20  # the walker found the package
    assert _cycles(graph) == []


def test_every_module_belongs_to_a_stage():
    orphans = [m for m in _graph() if m != "featmatch" and _stage(m) is None]
    assert orphans == [], f"modules outside the stages of RANKS: {orphans}"


def test_stages_import_only_lower_stages():
    bad = []
    for mod, deps in _graph().items():
        if mod == "featmatch":  # the facade re-exports the public names lazily
            continue
        rank = RANKS[_stage(mod)]
        for dep in deps:
            if dep == "featmatch":
                continue
            if _stage(dep) != _stage(mod) and RANKS[_stage(dep)] >= rank:
                bad.append(f"{mod} -> {dep}")
    assert bad == []


def test_only_chapters_import_the_chapters_layer():
    bad = [
        f"{mod} -> {dep}"
        for mod, deps in _graph().items()
        for dep in deps
        if dep.startswith("featmatch.chapters") and not mod.startswith(("featmatch.chapters", "featmatch.cli"))
    ]
    assert bad == []


# --------------------------------------------------------------------------- notebooks
def _notebook_sources() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _orchestration_faults(source: str) -> list[str]:
    """Function or class definitions, lambdas and ``global`` statements in a notebook."""
    faults: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            faults.append((node.lineno, f"defines function {node.name}"))
        elif isinstance(node, ast.ClassDef):
            faults.append((node.lineno, f"defines class {node.name}"))
        elif isinstance(node, ast.Lambda):
            faults.append((node.lineno, "defines a lambda"))
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            faults.append((node.lineno, f"uses {type(node).__name__.lower()}"))
    return [f"line {line}: {what}" for line, what in sorted(faults)]


def test_the_notebook_check_catches_definitions():
    planted = "x = 1\ndef f():\n    global x\n    return x\nclass C: pass\ny = sorted([1], key=lambda v: v)\n"
    faults = _orchestration_faults(planted)
    assert [f.split(": ", 1)[1] for f in faults] == [
        "defines function f",
        "uses global",
        "defines class C",
        "defines a lambda",
    ]


@pytest.mark.parametrize("path", _notebook_sources(), ids=lambda p: p.stem)
def test_notebooks_only_orchestrate(path):
    assert _orchestration_faults(path.read_text(encoding="utf-8")) == []


def test_there_are_five_notebooks():
    assert [p.stem[:2] for p in _notebook_sources()] == ["01", "02", "03", "04", "05"]


# --------------------------------------------------------------------------- dependencies
def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere in featmatch -> the files that import them."""
    import sys

    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "featmatch" and top not in sys.stdlib_module_names:
                    out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def _declared_distributions() -> set[str]:
    import re

    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def _undeclared(imports: dict[str, set[str]], declared: set[str]) -> dict[str, list[str]]:
    from importlib.metadata import packages_distributions

    dists = packages_distributions()
    out = {}
    for module, files in imports.items():
        names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        if not names & declared:
            out[module] = sorted(files)
    return out


def test_every_import_is_declared_in_pyproject():
    pytest.importorskip("tomllib")  # Python >= 3.11
    imports, declared = _third_party_imports(), _declared_distributions()
    assert {"torch", "sae_lens", "ot", "psutil"} <= set(imports)
    # the check can fail: drop one declared distribution and it is reported
    assert set(_undeclared(imports, declared - {"psutil"})) == {"psutil"}
    assert _undeclared(imports, declared) == {}, "imported but not declared in pyproject.toml"
