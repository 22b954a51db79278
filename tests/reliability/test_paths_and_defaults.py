"""Paths and defaults: what the dashboard may read and launch, and where the server listens.

- Image serving reads only inside a dataset's registered root: an index row whose locator climbs out
  (``..``), is absolute, or is a symlink made to point out after registration costs one grey tile with a
  reason, never the file's bytes.
- Jobs launched from the dashboard only use files inside the workspace or a registered dataset root (written
  paths: inside the workspace), symlinks followed; a refused job writes nothing. The CLI keeps the user's
  freedom to point at any file.
- Every job stage refuses unknown parameters and out-of-range values with a one-line message, writing nothing.
- The server binds to 127.0.0.1 unless told otherwise (config file, ``prunescope serve`` default, and the
  socket a real ``prunescope serve`` opens).
(Registration's counted skips for paths out of the root are in ``test_cli_bad_input.py``.)
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from core import jobs
from core.errors import ConfigError, PathOutsideWorkspace, PrunescopeError
from tests.conftest import make_image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ws_with_folder(tmp_path):
    """A workspace with one registered image folder (2 classes x 2 images) and a secret image next to it."""
    from core.datasets import register_dataset
    from core.workspace import Workspace

    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(2):
            make_image(src / c / f"{c}{i}.png", i)
    make_image(tmp_path / "secret" / "secret.png", 9)
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "folder", "image_folder", src, role="pool")
    return ws


# -- image serving -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("escape", ["dotdot", "absolute", "symlink"])
def test_image_serving_refuses_locators_leading_out_of_the_root(ws_with_folder, tmp_path, escape):
    from dashboard import queries, widgets

    handle = queries.dataset_handle(str(ws_with_folder.root), "folder")
    row = handle.index.iloc[0].to_dict()
    secret = tmp_path / "secret" / "secret.png"
    if escape == "dotdot":
        row["locator"] = "../secret/secret.png"
    elif escape == "absolute":
        row["locator"] = str(secret)
    else:  # a file inside the root replaced by a symlink pointing out, after registration
        inside = tmp_path / "src" / row["locator"]
        inside.unlink()
        inside.symlink_to(secret)
    with pytest.raises(PathOutsideWorkspace):
        handle.source.read_bytes(row)
    widgets.thumbnail.clear()
    data, why = widgets.thumbnail(str(ws_with_folder.root), "folder", f"probe-{escape}", row)
    assert data is None and ("outside" in why or "leaves" in why or "refusing" in why), why


def test_image_serving_reads_a_row_inside_the_root(ws_with_folder):
    from dashboard import queries, widgets

    handle = queries.dataset_handle(str(ws_with_folder.root), "folder")
    row = handle.index.iloc[0].to_dict()
    widgets.thumbnail.clear()
    data, why = widgets.thumbnail(str(ws_with_folder.root), "folder", "probe-ok", row)
    assert data is not None and data[:2] == b"\xff\xd8" and why == ""


# -- jobs launched from the dashboard ------------------------------------------------------------------------
def _nothing_written(ws) -> bool:
    runs_dir = ws.root / "runs"
    return ws.catalog.query("SELECT count(*) AS n FROM runs").iloc[0]["n"] == 0 and (
        not runs_dir.exists() or not any(runs_dir.iterdir()))


@pytest.mark.parametrize(("stage", "params"), [
    ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "checkpoint": "/etc/passwd"}),
    ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "checkpoint": "../outside.pt"}),
    ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "checkpoint": "link-out.pt"}),
    ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "pretrained": "/tmp/evil/weights.pt"}),
    ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "cache_dir": "SRC"}),  # a source root: read-only
    ("eval-corruptions", {"dataset": "folder", "models": "ok=torchvision:resnet18,evil=/tmp/evil/model.pt"}),
    ("train-detector", {"data": "/etc"}),
])
def test_dashboard_jobs_refuse_paths_outside_the_workspace_and_roots(ws_with_folder, tmp_path, stage, params):
    from dashboard import queries

    ws = ws_with_folder
    (ws.root / "link-out.pt").symlink_to(tmp_path / "secret" / "secret.png")
    params = {k: (str(tmp_path / "src") if v == "SRC" else v) for k, v in params.items()}
    with pytest.raises(PathOutsideWorkspace, match="only use files inside"):
        queries.submit_job(str(ws.root), stage, params)
    assert _nothing_written(ws)


def test_dashboard_jobs_accept_paths_inside_the_workspace_and_roots(ws_with_folder, tmp_path):
    ws = ws_with_folder
    (ws.root / "weights").mkdir()
    ok = [
        ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "checkpoint": "weights/model.pt"}),
        ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "checkpoint": str(tmp_path / "src" / "w.pt")}),
        ("embed", {"dataset": "folder", "model": "demo-vit-tiny", "cache_dir": "cache/hub"}),
        ("eval-corruptions", {"dataset": "folder", "models": "a=torchvision:resnet18,b=weights/b.pt"}),
    ]
    ids = [jobs.submit(ws, stage, params, confine_paths=True) for stage, params in ok]
    assert len(set(ids)) == len(ok)
    # The CLI user keeps the freedom to point anywhere readable.
    jobs.submit(ws, "embed", {"dataset": "folder", "model": "demo-vit-tiny", "checkpoint": "/etc/passwd"})


# -- job parameters against their schema ---------------------------------------------------------------------
@pytest.mark.parametrize("stage", jobs.STAGES.names())
def test_every_stage_refuses_unknown_and_out_of_range_parameters(ws_with_folder, stage):
    ws = ws_with_folder
    with pytest.raises(ConfigError, match="unknown parameter.*no_such_knob"):
        jobs.submit(ws, stage, {"no_such_knob": 1}, check_refs=False)
    params = jobs.STAGES.entry(stage).params
    bad = [(p.name, p.max + 1) for p in params if p.kind in ("int", "float") and p.max is not None]
    bad += [(p.name, p.min - 1) for p in params if p.kind in ("int", "float") and p.min is not None]
    bad += [(p.name, "not-a-number") for p in params if p.kind in ("int", "float")]
    bad += [(p.name, "no-such-choice") for p in params if p.kind == "choice"]
    for name, value in bad:
        with pytest.raises(PrunescopeError) as info:
            jobs.submit(ws, stage, {name: value}, check_refs=False)
        assert "\n" not in info.value.one_line() and name in info.value.one_line(), (name, value)
    assert _nothing_written(ws)


# -- where the server listens --------------------------------------------------------------------------------
def test_the_config_file_and_the_serve_command_default_to_localhost():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    out = subprocess.run([sys.executable, "-m", "core.cli", "serve", "--help"], capture_output=True, text=True,
                         cwd=REPO, env=dict(os.environ, COLUMNS="200", NO_COLOR="1"), timeout=120)
    assert out.returncode == 0 and "127.0.0.1" in out.stdout, out.stdout


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, state = fields[1], fields[3]
            if state == "0A" and int(address.rsplit(":", 1)[1], 16) == port:
                found.append(address.rsplit(":", 1)[0])
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_prunescope_serve_listens_on_loopback_only(ws_with_folder):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PRUNESCOPE_WORKSPACE=str(ws_with_folder.root))
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "serve", "--port", str(port)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _listening(port) and time.monotonic() < deadline:
            assert proc.poll() is None, "prunescope serve exited"
            time.sleep(0.3)
        addresses = _listening(port)
        assert addresses, "nothing listens on the port after 90 s"
        assert set(addresses) == {"0100007F"}, addresses  # 127.0.0.1 only (no 0.0.0.0, no ::)
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
