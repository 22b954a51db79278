"""Run records: a folder with the resolved config and a row in the catalog's ``runs`` table.

Every stage that produces results records itself through :func:`recorded_run`, so the catalog says
what ran, with which parameters, code version and git revision, and how it ended.

A background job (:mod:`core.jobs`) inserts its ``queued`` row before its process starts and sets
``$PRUNESCOPE_RUN_ID`` for that process; the first :func:`recorded_run` of the job's kind in it adopts
that row and folder instead of creating new ones, so a job is exactly one run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from core import atomic
from core.store.catalog import utcnow
from core.workspace import Workspace

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "done", "failed", "cancelled")
#: Set by the job launcher: the id of the ``queued`` row the job process's run adopts.
RUN_ID_ENV = "PRUNESCOPE_RUN_ID"


def package_version() -> str:
    try:
        return version("prunescope")
    except PackageNotFoundError:
        return "unknown"


def git_revision() -> str | None:
    """The checkout's commit (with ``-dirty`` when it has changes), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "") if rev else None


def new_run_id(kind: str) -> str:
    return f"{utcnow():%Y%m%d-%H%M%S}-{kind}-{secrets.token_hex(3)}"


@dataclass
class RunHandle:
    id: str
    dir: Path
    message: str = ""


@contextlib.contextmanager
def recorded_run(ws: Workspace, kind: str, config: Mapping[str, Any], *,
                 seed: int | None = None) -> Iterator[RunHandle]:
    """Record a run: ``running`` on entry, ``done``/``failed``/``cancelled`` on exit.

    Writes ``runs/<id>/params.json`` (resolved config, seed, version, git revision) before starting.
    In a job process (``$PRUNESCOPE_RUN_ID`` names a queued or running row of this ``kind``) the job's
    row and folder are adopted instead of new ones (see :func:`adopt_job_run`).
    """
    rev, ver = git_revision(), package_version()
    params = {"kind": kind, "config": dict(config), "seed": seed, "version": ver, "git_rev": rev}
    handle = adopt_job_run(ws, kind, params)
    if handle is None:
        run_id = new_run_id(kind)
        run_dir = ws.dir("runs", run_id)
        atomic.write_json(run_dir / "params.json", params)
        ws.catalog.insert("runs", [{
            "id": run_id, "kind": kind, "status": "running",
            "config_json": json.dumps(dict(config), sort_keys=True), "seed": seed, "git_rev": rev,
            "version": ver, "started_at": utcnow(), "ended_at": None,
            "run_dir": ws.rel(run_dir), "pid": os.getpid(), "message": None,
        }])
        handle = RunHandle(run_id, run_dir)
    with _track_status(ws, handle) as handle:
        yield handle


def adopt_job_run(ws: Workspace, kind: str, params: Mapping[str, Any]) -> RunHandle | None:
    """Take over the job row named by ``$PRUNESCOPE_RUN_ID`` (None when there is none to adopt).

    The row must exist, be of ``kind`` and be ``queued`` or ``running``; otherwise the variable is left
    alone (a nested run of another kind records itself as usual). On adoption the variable is removed,
    so later runs in this process get rows of their own; ``params`` is merged into the job's
    ``params.json`` (its ``job`` section is kept) and the row becomes ``running`` under this pid.
    """
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        return None
    found = ws.catalog.query("SELECT kind, status, run_dir FROM runs WHERE id = ?", [run_id])
    if found.empty or found.iloc[0]["kind"] != kind or found.iloc[0]["status"] not in ("queued", "running"):
        log.warning("not adopting run %s for a %s run: no queued or running %s job of that id",
                    run_id, kind, kind)
        return None
    os.environ.pop(RUN_ID_ENV, None)
    run_dir = ws.abs(found.iloc[0]["run_dir"])
    path = run_dir / "params.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        stored = {}
    atomic.write_json(path, {**stored, **params})
    ws.catalog.execute(
        "UPDATE runs SET status = 'running', config_json = ?, seed = ?, git_rev = ?, version = ?, "
        "started_at = coalesce(started_at, ?), ended_at = NULL, pid = ?, message = NULL WHERE id = ?",
        [json.dumps(dict(params["config"]), sort_keys=True, default=str), params.get("seed"),
         params.get("git_rev"), params.get("version"), utcnow(), os.getpid(), run_id])
    log.info("run %s: adopted the job's row", run_id)
    return RunHandle(run_id, run_dir)


@contextlib.contextmanager
def resumed_run(ws: Workspace, run_id: str, kind: str) -> Iterator[RunHandle]:
    """:func:`recorded_run`'s bookkeeping for an existing run of ``kind`` that continues.

    Raises UnknownName when no such run exists.
    """
    from core.errors import UnknownName

    found = ws.catalog.query("SELECT kind, run_dir FROM runs WHERE id = ?", [run_id])
    if found.empty or found.iloc[0]["kind"] != kind:
        raise UnknownName(f"{kind} run '{run_id}' not found in the catalog")
    if os.environ.get(RUN_ID_ENV) == run_id:
        os.environ.pop(RUN_ID_ENV, None)  # a job resuming its own run: nothing nested may adopt it again
    ws.catalog.execute("UPDATE runs SET status = 'running', ended_at = NULL, message = NULL, pid = ? "
                       "WHERE id = ?", [os.getpid(), run_id])
    with _track_status(ws, RunHandle(run_id, ws.abs(found.iloc[0]["run_dir"]))) as handle:
        yield handle


@contextlib.contextmanager
def _track_status(ws: Workspace, handle: RunHandle) -> Iterator[RunHandle]:
    """Set the run's final status (done / failed with the error / cancelled on Ctrl-C) on exit."""
    status = "failed"
    try:
        yield handle
        status = "done"
    except KeyboardInterrupt:
        status = "cancelled"
        raise
    except BaseException as exc:
        handle.message = f"{type(exc).__name__}: {exc}"[:500]
        raise
    finally:
        ws.catalog.execute("UPDATE runs SET status = ?, ended_at = ?, message = ? WHERE id = ?",
                           [status, utcnow(), handle.message or None, handle.id])


class ProgressWriter:
    """Appends progress records to ``runs/<id>/progress.jsonl`` (one JSON object per line).

    The file is append-only and flushed per record; readers (the dashboard) ignore a last line that is
    not complete yet, so no temporary file is needed. Records carry ``t`` (unix time) plus whatever the
    stage reports, e.g. ``{"stage": "train", "step": 10, "total": 100, "loss": 2.3, "img_per_s": 51.0}``.

    After :func:`request_stop`, the next record written raises KeyboardInterrupt (once).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "progress.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        import time

        global _stop_requested
        line = json.dumps({"t": round(time.time(), 3), **record}, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
        if _stop_requested:
            _stop_requested = False
            raise KeyboardInterrupt("stop requested")


_stop_requested = False


def request_stop() -> None:
    """Ask the running stage to stop at its next progress record.

    The next :meth:`ProgressWriter.write` raises KeyboardInterrupt right after writing its record. Training
    loops write records between steps, where their state is complete, so the checkpoint their interrupt
    handler saves resumes exactly (an interrupt inside an optimiser step would save half an update).
    The job process calls this on SIGTERM (:mod:`core.jobs`).
    """
    global _stop_requested
    _stop_requested = True


def read_progress(run_dir: Path) -> list[dict[str, Any]]:
    """Every complete record of a run's progress file (a torn last line is ignored)."""
    path = Path(run_dir) / "progress.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
