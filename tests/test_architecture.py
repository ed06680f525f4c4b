"""The shape of the raykd package, read from its source with `ast` (nothing imported, no Ray):

* no import cycle between raykd modules, counting imports inside functions too (a deferred import
  hides a cycle from Python, not from the reader);
* no function or method longer than 60 lines (`def` line to the end of its body);
* no file longer than 400 lines;
* Ray is imported only where runs are launched and data is streamed: raykd.data (package),
  raykd.runtime, raykd.train, raykd.sweep, raykd.cli — the rest (losses, models, evaluation, the
  report, ...) must work, and be tested, without Ray.

Imports under `if TYPE_CHECKING:` are not counted: they never run.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raykd"
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
RAY_ALLOWED = ("raykd.data", "raykd.runtime", "raykd.train", "raykd.sweep", "raykd.cli")  # and their submodules


@dataclass
class Module:
    name: str  # raykd.x or raykd.x.y; a package is named by its __init__.py
    path: Path
    tree: ast.Module
    lines: int
    imports: list[tuple[str, int]] = field(default_factory=list)  # (imported name, line), raykd and ray only


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom, at module level and inside functions and classes, except
    those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
            else:
                stack.append(child)


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    """The absolute name a (possibly relative) `from X import ...` refers to."""
    if not node.level:
        return node.module or ""
    package = module.name.split(".")
    if module.path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@lru_cache(maxsize=1)
def modules() -> dict[str, Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        mod = Module(_module_name(path), path, ast.parse(text, filename=str(path)), len(text.splitlines()))
        out[mod.name] = mod
    for mod in out.values():
        for node in _import_nodes(mod.tree):
            if isinstance(node, ast.Import):
                mod.imports += [(alias.name, node.lineno) for alias in node.names]
            else:
                base = _absolute(mod, node)
                # `from raykd.x import y`: the submodule raykd.x.y when there is one, else raykd.x itself
                mod.imports += [(f"{base}.{alias.name}" if f"{base}.{alias.name}" in out else base, node.lineno)
                                for alias in node.names]
    return out


def _resolve(name: str, known: dict[str, Module]) -> str | None:
    """The raykd module an imported name loads: itself, or its longest known prefix."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported raykd module: first line importing it}}."""
    known = modules()
    graph = {name: {} for name in known}
    for mod in known.values():
        for name, line in mod.imports:
            if name == "raykd" or name.startswith("raykd."):
                target = _resolve(name, known)
                if target is not None:
                    graph[mod.name][target] = min(line, graph[mod.name].get(target, line))
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with a cycle (more than one module, or a self-import)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def shortest_cycle(graph: dict[str, dict[str, int]], start: str, members: set[str]) -> list[str]:
    """start -> ... -> start, fewest imports, within one component."""
    paths, seen = [[start]], {start}
    while paths:
        nxt = []
        for path in paths:
            for w in sorted(graph[path[-1]]):
                if w == start:
                    return [*path, start]
                if w in members and w not in seen:
                    seen.add(w)
                    nxt.append([*path, w])
        paths = nxt
    return [start]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def describe_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    known = modules()
    out = []
    for comp in strongly_connected(graph):
        cycle = shortest_cycle(graph, comp[0], set(comp))
        steps = [f"{a} -> {b} ({_rel(known[a].path)}:{graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        edges = [f"{a} -> {b} ({_rel(known[a].path)}:{graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in comp]
        out.append(f"cycle {' -> '.join(cycle)}\n    " + "\n    ".join(steps)
                   + (f"\n  all imports inside {{{', '.join(comp)}}}:\n    " + "\n    ".join(edges) if len(edges) > len(steps) else ""))
    return out


def long_functions() -> list[str]:
    out = []
    for mod in modules().values():
        for node in ast.walk(mod.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append((-n, f"{_rel(mod.path)}:{node.lineno} {node.name}: {n} lines"))
    return [text for _, text in sorted(out)]


def long_files() -> list[str]:
    return [f"{_rel(m.path)}: {m.lines} lines" for m in sorted(modules().values(), key=lambda m: -m.lines) if m.lines > MAX_FILE_LINES]


def ray_imports() -> list[str]:
    out = []
    for mod in modules().values():
        if any(mod.name == a or mod.name.startswith(a + ".") for a in RAY_ALLOWED):
            continue
        lines = sorted({line for name, line in mod.imports if name == "ray" or name.startswith("ray.")})
        if lines:
            out.append(f"{_rel(mod.path)} imports ray (line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))})")
    return out


# --- the checks on raykd -------------------------------------------------------------------------


def test_no_import_cycles():
    cycles = describe_cycles(import_graph())
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s) between raykd modules (imports inside functions count):\n" + "\n".join(cycles), pytrace=False)


def test_no_function_longer_than_60_lines():
    found = long_functions()
    if found:
        pytest.fail(f"{len(found)} function(s) longer than {MAX_FUNCTION_LINES} lines (def to end of body):\n" + "\n".join(found), pytrace=False)


def test_no_file_longer_than_400_lines():
    found = long_files()
    if found:
        pytest.fail(f"{len(found)} file(s) longer than {MAX_FILE_LINES} lines:\n" + "\n".join(found), pytrace=False)


def test_ray_is_imported_only_where_runs_are_launched():
    found = ray_imports()
    if found:
        pytest.fail(f"only {', '.join(RAY_ALLOWED)} may import ray; {len(found)} other module(s) do:\n" + "\n".join(found), pytrace=False)


# --- the checks themselves, on a small made-up package ---------------------------------------------


def test_the_checks_find_what_they_look_for(tmp_path, monkeypatch):
    pkg = tmp_path / "raykd"
    (pkg / "losses").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from raykd import b\n",
        "b.py": "def f():\n    from raykd.losses import kl\n",  # inside a function: still an edge
        "losses/__init__.py": "from .kl import kl\n",  # the function kl, not a submodule: raykd.losses.kl is
        "losses/kl.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import raykd.c\n"
                        "def kl():\n    import raykd.a\n    import ray.data\n",
        "c.py": "import raykd.c\n" + "\n" * 400,  # a self-import; 402 lines
        "train.py": "import ray\nfrom . import c\n",  # ray allowed here
        "data/__init__.py": "from ray import data\n",
        "long.py": "class K:\n    def m(self):\n" + "        x = 1\n" * 60 + "def ok():\n" + "    y = 2\n" * 59,  # 61 and 60 lines
    }
    (pkg / "data").mkdir()
    for name, text in files.items():
        (pkg / name).write_text(text)
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", tmp_path)
    monkeypatch.setattr(this, "PACKAGE", pkg)
    modules.cache_clear()
    try:
        graph = import_graph()
        assert graph["raykd.a"] == {"raykd.b": 1} and graph["raykd.b"] == {"raykd.losses.kl": 2}
        assert graph["raykd.losses"] == {"raykd.losses.kl": 1} and graph["raykd.losses.kl"] == {"raykd.a": 5}
        assert graph["raykd.train"] == {"raykd.c": 2}
        assert strongly_connected(graph) == [["raykd.a", "raykd.b", "raykd.losses.kl"], ["raykd.c"]]
        cycles = describe_cycles(graph)
        assert cycles[0].startswith("cycle raykd.a -> raykd.b -> raykd.losses.kl -> raykd.a\n")
        assert "raykd.losses.kl -> raykd.a (raykd/losses/kl.py:5)" in cycles[0]
        assert cycles[1].startswith("cycle raykd.c -> raykd.c")
        assert long_functions() == ["raykd/long.py:2 m: 61 lines"]  # ok(), 60 lines, is allowed
        assert long_files() == ["raykd/c.py: 401 lines"]
        assert ray_imports() == ["raykd/losses/kl.py imports ray (line 6)"]
    finally:
        modules.cache_clear()


def test_ruff_is_clean():
    """`ruff check` (the config in pyproject.toml) passes on the package, the tests and the benchmarks."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "raykd", "tests", "bench"], cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
