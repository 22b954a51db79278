"""Bad input at the dashboard: a workspace whose files were damaged after they were written (deleted,
truncated, replaced by garbage, a catalog that is not a database) must give each page a one-line message
where the damage shows (the file, and what to do), never an exception or a traceback. The app's last guard
(``This page could not be drawn``) must not be needed either: each damaged file is read through
:mod:`core.files` and reported as a one-line DataError.

One complete workspace (datasets, embeddings, a clustering with maps, a manifest, a similarity analysis,
metrics, runs) is built once; each case copies it, damages one thing and opens every page on the copy.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from dashboard.app_pages import PAGES
from tests.reliability.hostile import CLUSTERING, POOL, PRUNING, build_hostile_workspace

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    ws = build_hostile_workspace(tmp_path_factory.mktemp("bad_input"))
    return ws.root


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not what this file should hold\xff" * 8)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _each(root: Path, pattern: str, damage: Callable[[Path], None]) -> int:
    paths = sorted(p for p in root.glob(pattern) if p.is_file())
    for p in paths:
        damage(p)
    return len(paths)


#: name -> (damage(ws_root) -> number of files damaged)
CASES: dict[str, Callable[[Path], int]] = {
    "catalog is garbage": lambda r: _each(r, "catalog.duckdb", _garbage),
    "pool index deleted": lambda r: _each(r, f"datasets/{POOL}/index.parquet", Path.unlink),
    "pool source images deleted": lambda r: _each(r.parent / "src" / "pool", "*/*.png", Path.unlink),
    "dataset meta and classes garbage": lambda r: _each(r, "datasets/*/*.json", _garbage),
    "embedding parts truncated": lambda r: _each(r, "embeddings/*/*/part-*.npy", _truncate),
    "embedding ids garbage": lambda r: _each(r, "embeddings/*/*/part-*.parquet", _garbage),
    "embedding meta garbage": lambda r: _each(r, "embeddings/*/meta.json", _garbage),
    "assignments deleted": lambda r: _each(r, f"clusters/{CLUSTERING}/assignments.parquet", Path.unlink),
    "centroids truncated": lambda r: _each(r, f"clusters/{CLUSTERING}/centroids.npy", _truncate),
    "cluster meta garbage": lambda r: _each(r, f"clusters/{CLUSTERING}/meta.json", _garbage),
    "map caches garbage": lambda r: _each(r, f"clusters/{CLUSTERING}/maps/**/*", _garbage),
    "manifest garbage": lambda r: _each(r, f"manifests/{PRUNING}.*", _garbage),
    "similarity tables truncated": lambda r: _each(r, "similarity/**/*.parquet", _truncate),
    "similarity meta garbage": lambda r: _each(r, "similarity/*/meta.json", _garbage),
    "progress and params garbage": lambda r: (_each(r, "runs/*/progress.jsonl", _garbage)
                                              + _each(r, "runs/*/params.json", _garbage)),
}


def _texts(at: AppTest) -> list[str]:
    return [e.value for kind in ("error", "warning", "info") for e in getattr(at, kind)]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_every_page_survives_damaged_files(case, pristine, tmp_path, monkeypatch):
    from core import jobs

    monkeypatch.setattr(jobs, "schedule", lambda ws, **kw: [])  # nothing may start from the Runs page here
    copy = tmp_path / "copy"
    shutil.copytree(pristine.parent, copy, symlinks=True)
    root = copy / pristine.name
    assert CASES[case](root) > 0, "the case damaged nothing: the fixture's layout changed"
    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(root))
    messages: list[str] = []
    for spec in PAGES:
        at = AppTest.from_file(str(APP), default_timeout=120)
        at.run()
        at.switch_page(spec.path)
        at.run()
        assert not at.exception, (spec.url_path, [e.value for e in at.exception])
        for text in _texts(at):
            assert "Traceback" not in text and "File \"" not in text, (spec.url_path, text)
        messages += [f"{spec.url_path}: {t}" for t in _texts(at) if t]
    assert not [m for m in messages if "could not be drawn" in m], messages
    if case == "catalog is garbage":
        assert any("catalog" in m.lower() for m in messages), messages
