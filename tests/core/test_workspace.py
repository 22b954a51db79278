import os

import pytest

from core.errors import ConfigError, PathOutsideWorkspace
from core.workspace import ENV_VAR, SUBDIRS, Workspace, resolve_workspace_root, safe_join, validate_name


def test_layout_created(tmp_path):
    ws = Workspace(tmp_path / "ws")
    for sub in SUBDIRS:
        assert (ws.root / sub).is_dir()
    assert ws.catalog.path == ws.root / "catalog.duckdb" and ws.exists


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_workspace_root() == (tmp_path / "env").resolve()
    assert resolve_workspace_root(tmp_path / "arg") == (tmp_path / "arg").resolve()
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.chdir(tmp_path)
    assert resolve_workspace_root() == (tmp_path / "data" / "workspace").resolve()


@pytest.mark.parametrize("name", ["pool", "val-2", "laion_400m.en", "A1"])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "../x", "a/b", "a b", "<script>", "x" * 65, "a..b"])
def test_invalid_names(name):
    with pytest.raises(ConfigError):
        validate_name(name)


def test_rel_and_abs_round_trip(tmp_path):
    ws = Workspace(tmp_path / "ws")
    p = ws.dir("manifests", "m.parquet")
    assert ws.rel(p) == "manifests/m.parquet"
    assert ws.abs("manifests/m.parquet") == p
    assert ws.rel("/etc/passwd") == "/etc/passwd"


def test_safe_join_refuses_escapes(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "img.jpg").write_bytes(b"x")
    (tmp_path / "secret.txt").write_text("s")
    os.symlink(tmp_path / "secret.txt", root / "link.txt")
    assert safe_join(root, "a/img.jpg") == (root / "a" / "img.jpg").resolve()
    for bad in ["../secret.txt", "/etc/passwd", "a/../../secret.txt", "link.txt", ""]:
        with pytest.raises(PathOutsideWorkspace):
            safe_join(root, bad)


def test_safe_path_allows_workspace_and_roots_only(tmp_path):
    ws = Workspace(tmp_path / "ws")
    data_root = tmp_path / "data"
    data_root.mkdir()
    assert ws.safe_path("runs") == ws.root / "runs"
    assert ws.safe_path(data_root / "x.jpg", roots=[data_root]) == data_root / "x.jpg"
    with pytest.raises(PathOutsideWorkspace):
        ws.safe_path(tmp_path / "elsewhere.jpg", roots=[data_root])
    with pytest.raises(PathOutsideWorkspace):
        ws.safe_path("../elsewhere")
