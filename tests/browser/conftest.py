"""Browser-test fixtures: a real `streamlit run` server on a free local port and Debian's Chromium."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEALTH_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as resp:
                if resp.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"streamlit not healthy after {HEALTH_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def serve(workspace: Path, log_dir: Path) -> Iterator[str]:
    """Serve dashboard/app.py on ``workspace``; yields the base URL, kills the server after."""
    log = log_dir / "streamlit.log"
    port = free_port()
    env = dict(os.environ, PRUNESCOPE_WORKSPACE=str(workspace))
    cmd = [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.headless", "true",
           "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false"]
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def streamlit_server(small_workspace, tmp_path_factory) -> Iterator[str]:
    """The dashboard on the small workspace (datasets, no clusterings)."""
    with serve(small_workspace.root, tmp_path_factory.mktemp("server")) as base:
        yield base


@pytest.fixture(scope="module")
def clusters_server(clustered_workspace, tmp_path_factory) -> Iterator[str]:
    """The dashboard on the clustered workspace (web_pool embedded, k=3, maps cached)."""
    with serve(clustered_workspace.root, tmp_path_factory.mktemp("server")) as base:
        yield base
