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
