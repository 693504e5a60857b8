"""Data flows one way: model/ <- schema/ <- jobs/ and viz/ <- pipeline.py (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROJECT = {"model", "schema", "jobs", "viz", "pipeline", "bench", "tests"}
# What each layer may import of the project (besides itself).
ALLOWED = {
    "model": set(),
    "schema": {"model"},
    "jobs": {"model", "schema"},
    "viz": {"model", "schema"},
}


def project_imports(path: Path) -> set[str]:
    """Top-level project packages a module imports, anywhere in it (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & PROJECT
    return found


def test_each_layer_imports_only_the_layers_below_it() -> None:
    wrong = {}
    for layer, allowed in ALLOWED.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            extra = project_imports(path) - allowed - {layer}
            if extra:
                wrong[str(path.relative_to(ROOT))] = sorted(extra)
    assert not wrong, f"imports against the one-way flow: {wrong}"


def test_the_walk_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from viz.main import run_viz\n    import jobs.search\n")
    assert project_imports(module) == {"viz", "jobs"}


def test_every_tag_is_spelled_in_the_schema_only() -> None:
    """No `fer.` tag literal outside schema/ (one home for every logged name), in the product
    and in the benchmarks that read its runs."""
    import re

    stray = {}
    for layer in ("model", "jobs", "viz", "bench"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            found = re.findall(r"""f?["']fer\.[a-z_]""", path.read_text())
            if found:
                stray[str(path.relative_to(ROOT))] = found
    found = re.findall(r"""f?["']fer\.[a-z_]""", (ROOT / "pipeline.py").read_text())
    if found:
        stray["pipeline.py"] = found
    assert not stray, f"tag literals outside schema/: {stray}"


def module_graph(root: Path, layers: tuple[str, ...]) -> dict[str, set[str]]:
    """Project module -> the project modules it imports, anywhere in it (lazy imports too).

    `from a.b import c` is an edge to the module `a.b.c` where it exists, else to `a.b`;
    `import a.b` to `a.b`. An edge goes to the module named, not to the packages above it.
    """
    modules: dict[str, Path] = {}
    for layer in layers:
        base = root / layer
        paths = sorted(base.rglob("*.py")) if base.is_dir() else [root / f"{layer}.py"]
        for path in paths:
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                for alias in node.names:
                    targets.add(resolve(f"{base}.{alias.name}") if base else None)
        graph[name] = {t for t in targets if t and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_package_has_an_import_cycle() -> None:
    graph = module_graph(ROOT, ("model", "schema", "jobs", "viz", "pipeline"))
    assert "jobs.tracking.trials" in graph and "jobs.plan" in graph["jobs.tracking.trials"]
    cycles = import_cycles(graph)
    assert not cycles, f"import cycles (lazy imports included): {cycles}"


def test_the_cycle_check_sees_a_cycle_through_a_lazy_import(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n")
    (package / "c.py").write_text("import pkg.a\n")
    graph = module_graph(tmp_path, ("pkg",))
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.c"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.b"]]


# Small readable files and functions: a search module holds one phase, a function one step.
MAX_JOBS_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _long_functions(path: Path, root: Path = ROOT) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]


def test_jobs_files_and_product_functions_stay_small() -> None:
    long_files = [
        f"{path.relative_to(ROOT)} ({len(path.read_text().splitlines())})"
        for path in sorted((ROOT / "jobs").rglob("*.py"))
        if len(path.read_text().splitlines()) > MAX_JOBS_FILE_LINES
    ]
    assert long_files == [], f"files in jobs/ over {MAX_JOBS_FILE_LINES} lines"
    long_functions = [
        found
        for package in ("jobs", "viz", "model")
        for path in sorted((ROOT / package).rglob("*.py"))
        for found in _long_functions(path)
    ]
    assert long_functions == [], f"functions over {MAX_FUNCTION_LINES} lines"


def test_the_size_check_sees_a_long_function(tmp_path: Path) -> None:
    source = tmp_path / "long.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source.write_text(f"def long():\n{body}")
    assert _long_functions(source, tmp_path) == [f"long.py:1 long ({MAX_FUNCTION_LINES + 1})"]
