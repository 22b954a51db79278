"""Layering: the dashboard never pulls in the heavy ML stack, and only queries.py opens the catalog."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboard"
HEAVY = ("torch", "torchvision", "faiss", "open_clip", "umap", "timm")
MODULES = ("dashboard.app_pages.overview", "dashboard.queries", "dashboard.widgets", "dashboard.charts")
#: Ways into the catalog; only dashboard/queries.py may use them.
CATALOG_ACCESS = ("duckdb", "core.store")


def dashboard_files() -> list[Path]:
    files = sorted(DASHBOARD.rglob("*.py"))
    assert files, "no dashboard sources found"
    return files


def imported_modules(path: Path) -> set[str]:
    """Every module named by an import statement in ``path`` (absolute names; relative ones as-is)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_importing_the_dashboard_loads_no_heavy_library():
    code = (f"import {', '.join(MODULES)}; import sys, json; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {list(HEAVY)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [], f"dashboard imports pulled in {loaded}"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_dashboard_sources_import_no_heavy_library(path):
    bad = sorted(n for n in imported_modules(path) if any(_is_under(n, h) for h in HEAVY))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_only_queries_opens_the_catalog(path):
    if path == DASHBOARD / "queries.py":
        return
    bad = sorted(n for n in imported_modules(path) if any(_is_under(n, c) for c in CATALOG_ACCESS))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; go through dashboard/queries.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    touches = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "catalog"]
    assert not touches, f"{path.relative_to(ROOT)} uses .catalog on lines {touches}; go through dashboard/queries.py"


@pytest.mark.parametrize("path", dashboard_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_raw_html_rendering(path):
    """User text (captions, names) must never reach the browser as HTML."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    raw = [n.lineno for n in ast.walk(tree)
           if (isinstance(n, ast.keyword) and n.arg == "unsafe_allow_html")
           or (isinstance(n, ast.Attribute) and n.attr == "html" and isinstance(n.value, ast.Name) and n.value.id == "st")]
    assert not raw, f"{path.relative_to(ROOT)} renders raw HTML on lines {raw}"
