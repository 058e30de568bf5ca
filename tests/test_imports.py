"""The package's imports go one way: no circle among okd_scale's modules (imports inside functions included), no
module takes another's private names, and an import inside a function names its reason in a comment."""
from __future__ import annotations

import ast
from pathlib import Path

from tiny import ROOT

PACKAGE = ROOT / "okd_scale"


def _imports(path: Path) -> list[tuple[str, list[str], ast.stmt]]:
    """(okd_scale module imported, the names taken from it, the statement) for every import of the package in
    `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level == 1 or (node.module or "").startswith("okd_scale")):
            module = (node.module or "").removeprefix("okd_scale").strip(".")
            names = [a.name for a in node.names]
            if module:
                found.append((module.split(".")[0], names, node))
            else:  # from . import a, b
                found += [(name, [], node) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], [], node) for a in node.names if a.name.startswith("okd_scale.")]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    return {p.stem: {m for m, _, _ in _imports(p) if m in modules and m != p.stem} for p in PACKAGE.glob("*.py")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while not part or part[-1] != v:
                part.append(stack.pop())
                on.discard(part[-1])
            if len(part) > 1:
                out.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_finds_a_circle():
    """The check itself: a circle through three modules is found, a chain is not a circle."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": set(), "b": {"a"}}) == []


def test_package_imports_have_no_circle():
    graph = _graph()
    assert {"config", "configure", "methods", "engines", "plan", "divergences", "sharded"} <= set(graph)
    assert _cycles(graph) == []
    assert "methods" not in graph["config"] and "sharded" not in graph["divergences"]


def test_no_private_names_across_modules():
    taken = [f"{p.name}:{node.lineno} {m}.{name}" for p in PACKAGE.glob("*.py") for m, names, node in _imports(p)
             for name in names if name.startswith("_")]
    assert taken == []


def test_imports_inside_functions_say_why():
    """An import of the package inside a function carries a comment (on its line, or on the line above its block
    of imports): only heavy or optional dependencies are imported late."""
    silent = []
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text().splitlines()
        for _, _, node in _imports(path):
            if node.col_offset == 0:
                continue
            first = node.lineno - 1
            while first > 0 and lines[first - 1].strip().startswith(("from ", "import ")):
                first -= 1
            if "#" not in lines[node.lineno - 1] and not lines[first - 1].strip().startswith("#"):
                silent.append(f"{path.name}:{node.lineno}")
    assert silent == []


MAX_TOOL_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_tools_files_and_functions_stay_small():
    """No file in tools/ over 400 lines; no function (methods and nested ones included) in tools/ or okd_scale/ over
    60 lines, decorators not counted."""
    long_files, long_functions = [], []
    for path in sorted((ROOT / "tools").rglob("*.py")) + sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if path.is_relative_to(ROOT / "tools") and len(text.splitlines()) > MAX_TOOL_FILE_LINES:
            long_files.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines")
    assert long_files == [] and long_functions == []


def test_tools_readme_names_every_script():
    """tools/README.md's table names every script of tools/ in its folder's rows."""
    readme = (ROOT / "tools" / "README.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tools").rglob("*.py"))
               if p.name != "__init__.py" and f"`{p.name}`" not in readme]
    assert missing == []
