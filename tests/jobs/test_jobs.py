"""Jobs: validation before anything is written, one process and one run row per job, the queue and its
limits, cancel, a vanished process, resume, and the launcher's argument list (never a shell)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import core.jobs as jobs
from core.errors import ConfigError, UnknownName
from core.runs import RUN_ID_ENV, recorded_run
from core.workspace import Workspace

#: Rows of the synthetic LAION-style release: enough that k-means takes a second or two, not more.
N_ROWS = 6000
DIM = 64


# -- helpers (test_kill_resume imports these) ----------------------------------------------------------------
def write_release(root: Path, *, n: int = N_ROWS, dim: int = DIM, seed: int = 0) -> None:
    """A LAION-style release (image embeddings, metadata with 32-hex uids): ``n`` rows around 12 centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))
    X = centres[rng.integers(0, 12, n)] + 0.8 * rng.normal(size=(n, dim))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", X.astype(np.float16))
    uids = [f"{i:032x}" for i in range(n)]
    pq.write_table(
        pa.table({"uid": uids, "caption": [f"caption {i}" for i in range(n)]}),
        root / "metadata" / "metadata_0.parquet",
    )


def laion_workspace(root: Path, release: Path) -> tuple[Workspace, str]:
    """A workspace with ``release`` registered as ``pool`` and imported; returns (ws, embedding set id)."""
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings

    ws = Workspace(root)
    register_dataset(ws, "pool", "laion", release)
    return ws, import_laion_embeddings(ws, "pool", model="synthetic").id


def wait_for(
    predicate: Callable[[], object], timeout: float = 120.0, every: float = 0.05, what: str = ""
) -> object:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(every)


def status(ws: Workspace, run_id: str) -> str:
    return str(ws.catalog.query("SELECT status FROM runs WHERE id = ?", [run_id])["status"].iloc[0])


def run_until_done(ws: Workspace, run_ids: list[str], *, max_cpu: int = 2, timeout: float = 180.0) -> None:
    """Schedule until every job has ended; fail with the log tails when one did not end ``done``."""

    def ended() -> bool:
        jobs.schedule(ws, max_cpu=max_cpu)
        return all(status(ws, r) not in jobs.ACTIVE for r in run_ids)

    wait_for(ended, timeout, every=0.1, what=f"jobs {run_ids} to end")
    for r in run_ids:
        assert status(ws, r) == "done", (r, status(ws, r), jobs.log_tail(ws, r))


def wait_started(ws: Workspace, run_id: str, timeout: float = 120.0) -> int:
    """Wait until the job's current process runs its stage (its log says so); returns its pid."""
    launch = ws.dir("runs", run_id) / jobs.JOB_FILE
    wait_for(launch.exists, timeout, what=f"job {run_id} to be launched")
    pid = int(json.loads(launch.read_text())["pid"])
    wait_for(
        lambda: f"started in process {pid}" in jobs.log_tail(ws, run_id, 200),
        timeout,
        what=f"job {run_id} to start its stage",
    )
    return pid


def kill_group(pid: int) -> None:
    """kill -9 of the job's whole process group (its session)."""
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not jobs.process_alive(pid), 30, what=f"process {pid} to die")


def visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def temp_files(folder: Path) -> list[Path]:
    """Files with temporary names: core.atomic's hidden ``.*.tmp-*`` or anything ``*.tmp``."""
    from core.atomic import is_temp_path

    return [p for p in visible_files(folder) if is_temp_path(p) or p.suffix == ".tmp"]


# -- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release") / "laion"
    write_release(root)
    return root


@pytest.fixture(scope="module")
def laion_readonly(tmp_path_factory: pytest.TempPathFactory, release: Path) -> tuple[Workspace, str]:
    """One workspace for the tests that must not write to it (refused submissions)."""
    return laion_workspace(tmp_path_factory.mktemp("readonly") / "ws", release)


@pytest.fixture()
def laion(tmp_path: Path, release: Path) -> tuple[Workspace, str]:
    """A fresh workspace per test (the queue is the workspace's runs table: tests must not share one)."""
    ws, set_id = laion_workspace(tmp_path / "ws", release)
    yield ws, set_id
    for row in jobs.list_jobs(ws, statuses=jobs.ACTIVE).itertuples():  # never leave a process behind
        jobs.cancel(ws, row.id, grace_s=1)


# -- the registry --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", jobs.STAGES.names())
def test_every_stage_describes_its_config_and_its_example_validates(name):
    entry = jobs.STAGES.entry(name)
    stage = entry.obj
    cls = stage.config_class()
    real = {f.name: f for f in dataclasses.fields(cls)}
    specs = {p.name: p for p in entry.params}
    assert list(specs) == [*real, *(o.name for o in stage.call_options)]
    for f in real.values():
        spec = specs[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        assert spec.required == required, f.name
        if f.default is not dataclasses.MISSING and spec.default is not None:
            expected = list(f.default) if isinstance(f.default, tuple) else f.default
            assert spec.default == expected, f.name
    assert entry.extra["kind"] == stage.kind and entry.extra["resume"] in ("run_id", "idempotent")
    assert (stage.resume == "run_id") == ("run_id" in real)
    cfg = jobs.build_config(name, stage.example)
    assert isinstance(cfg, cls)
    assert (
        jobs.build_config(name, jobs.plain_config(cfg)) == cfg
    )  # what a job stores rebuilds the same config
    for spec in entry.params:  # every choice a form offers is one the config accepts
        for choice in spec.choices if spec.kind == "choice" else ():
            jobs.build_config(name, {**stage.example, spec.name: choice})


def test_form_values_are_coerced_like_the_cli_and_out_of_range_ones_refused():
    cfg = jobs.build_config("cluster", {"embedding_set": "s", "k": "12", "fit_sample": "", "gpu": "false"})
    assert (cfg.k, cfg.fit_sample, cfg.gpu, cfg.niter) == (12, None, False, 20)
    ev = jobs.build_config(
        "eval-corruptions",
        {"dataset": "d", "models": "a.pt, b.pt", "severities": "1,3", "adapt_params": "{}"},
    )
    assert ev.models == ("a.pt", "b.pt") and ev.severities == (1, 3)
    with pytest.raises(ConfigError, match=r"parameter 'severities' must be a int; got 'x'"):
        jobs.build_config("eval-corruptions", {"dataset": "d", "models": "a.pt", "severities": "1,x"})
    with pytest.raises(ConfigError, match="must be JSON"):
        jobs.build_config("prune", {"clustering_id": "c", "chain": "[semdedup"})


# -- submitting: refused before anything is written ----------------------------------------------------------
BAD = [
    (
        "clustr",
        {},
        UnknownName,
        r"job stage 'clustr' not found \(did you mean 'cluster'\?\); available: cluster, demo, "
        r"embed, eval-corruptions, eval-detection, eval-zeroshot, prune, similarity, train-classifier, "
        r"train-clip, train-detector",
    ),
    ("cluster", {"k": 1}, ConfigError, r"parameter 'k' must be >= 2; got 1"),
    ("cluster", {"k": "ten"}, ConfigError, r"parameter 'k' must be a int; got 'ten'"),
    (
        "cluster",
        {"kk": 3},
        ConfigError,
        r"unknown parameter\(s\) for job stage 'cluster': kk; known: embedding_set, k,",
    ),
    ("cluster", {"niter": 3, "embedding_set": None}, ConfigError, r"parameter 'embedding_set' is required"),
    ("cluster", {"fit_sample": 5}, ConfigError, r"fit_sample must be an integer >= k \(100\); got 5"),
    ("cluster", {"embedding_set": "nope"}, UnknownName, r"embedding set 'nope' not found; registered: "),
    (
        "embed",
        {"dataset": "pool", "modality": "audio"},
        ConfigError,
        r"parameter 'modality' must be one of image, ",
    ),
    (
        "embed",
        {"dataset": "pool", "batch_size": 2.5},
        ConfigError,
        r"parameter 'batch_size' must be a int; got 2.5",
    ),
    ("train-classifier", {"dataset": "pool", "lr": -1}, ConfigError, r"lr must be > 0"),
    (
        "train-classifier",
        {"dataset": "pool", "noise": "pink"},
        ConfigError,
        r"parameter 'noise' must be one of none,",
    ),
    (
        "train-clip",
        {"dataset": "nope", "steps": 3, "warmup_steps": 0},
        UnknownName,
        r"dataset 'nope' not found; registered: pool",
    ),
    ("prune", {"clustering_id": "c", "chain": [["semdup", {}]]}, UnknownName, r"'semdup' not found"),
    (
        "train-classifier",
        {"dataset": "pool", "run_id": "nope"},
        UnknownName,
        r"train-classifier run 'nope' not found in the catalog",
    ),
]


@pytest.mark.parametrize(
    ("stage", "params", "error", "match"), BAD, ids=[f"{s}-{i}" for i, (s, *_) in enumerate(BAD)]
)
def test_bad_submissions_are_refused_with_one_line_and_nothing_written(
    laion_readonly, stage, params, error, match
):
    ws, set_id = laion_readonly
    params = (
        {"embedding_set": set_id, **params}
        if stage == "cluster" and "embedding_set" not in params
        else params
    )
    before = ws.catalog.query("SELECT * FROM runs")
    files_before = visible_files(ws.root)
    with pytest.raises(error, match=match) as caught:
        jobs.submit(ws, stage, params)
    assert "\n" not in caught.value.one_line()
    assert ws.catalog.query("SELECT * FROM runs").equals(before)
    assert visible_files(ws.root) == files_before
    assert jobs.list_jobs(ws).empty


# -- recorded_run adopts the job's row -----------------------------------------------------------------------
def test_recorded_run_adopts_only_a_queued_row_of_its_kind(laion, monkeypatch):
    ws, set_id = laion
    run_id = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 4})
    monkeypatch.setenv(RUN_ID_ENV, run_id)
    with recorded_run(ws, "embed", {"x": 1}) as other:  # another kind: a row of its own, the variable stays
        assert other.id != run_id
    assert os.environ[RUN_ID_ENV] == run_id
    with recorded_run(ws, "cluster", {"k": 4}, seed=7) as run:
        assert (run.id, run.dir) == (run_id, ws.dir("runs", run_id))
        assert status(ws, run_id) == "running"
        assert RUN_ID_ENV not in os.environ  # consumed: a nested run records itself
    row = ws.catalog.query("SELECT status, seed, pid FROM runs WHERE id = ?", [run_id]).iloc[0]
    assert (row["status"], row["seed"], row["pid"]) == ("done", 7, os.getpid())
    params = json.loads((run.dir / "params.json").read_text())
    assert params["config"] == {"k": 4} and params["job"]["stage"] == "cluster"  # the job section is kept
    assert ws.catalog.query("SELECT count(*) AS n FROM runs WHERE kind = 'cluster'")["n"].iloc[0] == 1
    monkeypatch.setenv(RUN_ID_ENV, run_id)  # a finished row is never adopted again
    with recorded_run(ws, "cluster", {}) as fresh:
        assert fresh.id != run_id


def test_progress_fraction():
    assert jobs.progress_fraction({"step": 5, "total": 20}) == 0.25
    assert jobs.progress_fraction({"done": 30, "total": 20}) == 1.0
    assert jobs.progress_fraction({"stage": "x"}) is None and jobs.progress_fraction(None) is None


# -- running ------------------------------------------------------------------------------------------------
def test_a_job_runs_as_its_own_process_with_one_run_row_and_no_shell(laion, monkeypatch):
    ws, set_id = laion
    calls = []
    real_popen = subprocess.Popen

    def recording_popen(args, *a, **kw):
        calls.append((args, kw))
        return real_popen(args, *a, **kw)

    monkeypatch.setattr(jobs.subprocess, "Popen", recording_popen)
    before = ws.catalog.query("SELECT count(*) AS n FROM runs")["n"].iloc[0]
    run_id = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": "8", "niter": 5})
    assert status(ws, run_id) == "queued" and jobs.job_status(ws, run_id)["fraction"] is None
    run_until_done(ws, [run_id])

    ((argv, kw),) = [(args, kw) for args, kw in calls if "core.jobs" in args]  # (git runs through Popen too)
    assert isinstance(argv, list) and not kw.get("shell")
    assert argv == [sys.executable, "-m", "core.jobs", "run", run_id, "--workspace", str(ws.root)]
    assert kw["start_new_session"] and kw["env"][RUN_ID_ENV] == run_id
    rows = ws.catalog.query("SELECT * FROM runs WHERE kind = 'cluster'")
    assert rows["id"].tolist() == [run_id]  # exactly one run: the job's own
    assert ws.catalog.query("SELECT count(*) AS n FROM runs")["n"].iloc[0] == before + 1
    row = rows.iloc[0]
    assert row["pid"] != os.getpid() and row["started_at"] <= row["ended_at"]
    assert row["message"].startswith(f"clustering {set_id}.k8.s1234: {N_ROWS} rows in 8 clusters")
    run_dir = ws.dir("runs", run_id)
    params = json.loads((run_dir / "params.json").read_text())
    assert params["kind"] == "cluster" and params["config"]["k"] == 8 and params["job"]["resource"] == "cpu"
    assert json.loads(row["config_json"])["k"] == 8
    assert json.loads((run_dir / jobs.JOB_FILE).read_text())["pid"] == row["pid"]
    assert f"started in process {row['pid']}" in (run_dir / "log.txt").read_text()
    assert not temp_files(run_dir) and not temp_files(ws.dir("clusters"))
    assert ws.catalog.query("SELECT k FROM clusterings")["k"].tolist() == [8]
    listed = jobs.list_jobs(ws)
    assert listed[["id", "stage", "status", "fraction"]].values.tolist() == [[run_id, "cluster", "done", 1.0]]
    with pytest.raises(ConfigError, match="is done; only failed or cancelled runs resume"):
        jobs.resume(ws, run_id)


@pytest.mark.slow
def test_the_concurrency_limit_holds_and_the_queue_runs_oldest_first(laion):
    ws, set_id = laion
    ids = [
        jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 6, "niter": 5, "seed": s}) for s in range(3)
    ]
    most = 0

    def ended() -> bool:
        nonlocal most
        jobs.schedule(ws, max_cpu=1)
        running = ws.catalog.query("SELECT id, pid FROM runs WHERE status = 'running'")
        alive = [p for p in running["pid"].dropna() if jobs.process_alive(int(p))]
        most = max(most, len(running), len(alive))
        return all(status(ws, r) not in jobs.ACTIVE for r in ids)

    wait_for(ended, 240, every=0.1, what="three jobs")
    assert most == 1
    started = ws.catalog.query("SELECT id FROM runs WHERE kind = 'cluster' ORDER BY started_at")[
        "id"
    ].tolist()
    assert started == ids
    assert [status(ws, r) for r in ids] == ["done"] * 3


def test_a_gpu_job_waits_for_the_gpu_slot_not_the_cpu_ones(laion, monkeypatch):
    ws, set_id = laion
    monkeypatch.setattr(jobs, "cuda_visible", lambda: True)
    gpu_job = jobs.submit(
        ws, "train-clip", {"dataset": "pool", "steps": 2, "warmup_steps": 0}, check_refs=False
    )
    assert jobs.job_status(ws, gpu_job)["resource"] == "gpu"
    launched = []
    monkeypatch.setattr(jobs, "start", lambda ws_, run_id: launched.append(run_id) or 0)
    assert jobs.schedule(ws, max_cpu=2, max_gpu=0) == [] and launched == []
    assert jobs.schedule(ws, max_cpu=0, max_gpu=1) == [gpu_job]


@pytest.mark.slow
def test_cancel_a_queued_and_a_running_job_then_resume_the_queued_one(laion):
    ws, set_id = laion
    slow = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 64, "niter": 300})
    queued = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 5, "niter": 5})
    assert jobs.schedule(ws, max_cpu=1) == [slow]
    assert jobs.cancel(ws, queued) == "cancelled"
    assert not (ws.dir("runs", queued) / jobs.JOB_FILE).exists()  # it never started
    pid = wait_started(ws, slow)
    t0 = time.monotonic()
    # SIGTERM reaches Python only between bytecodes; a long faiss call may keep it waiting: then SIGKILL.
    assert jobs.cancel(ws, slow, grace_s=3) == "cancelled"
    assert time.monotonic() - t0 < 10
    assert not jobs.process_alive(pid)
    row = ws.catalog.query("SELECT status, ended_at FROM runs WHERE id = ?", [slow]).iloc[0]
    assert row["status"] == "cancelled" and row["ended_at"] is not None
    assert jobs.cancel(ws, slow) == "cancelled"  # cancelling again changes nothing
    assert not temp_files(ws.dir("clusters"))

    assert jobs.resume(ws, queued) == queued
    run_until_done(ws, [queued])
    assert ws.catalog.query("SELECT count(*) AS n FROM runs WHERE id = ?", [queued])["n"].iloc[0] == 1


def test_an_error_caused_by_the_sigterm_itself_counts_as_cancelled(laion, monkeypatch):
    ws, set_id = laion
    run_id = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 4})
    monkeypatch.setattr(jobs, "_terminating", False)

    def interrupted_query(ws_, stage, cfg, call):  # DuckDB turns the KeyboardInterrupt into a RuntimeError
        # The stage's own bookkeeping (_track_status) records the error first.
        ws.catalog.execute("UPDATE runs SET status = 'failed' WHERE id = ?", [run_id])
        monkeypatch.setattr(jobs, "_terminating", True)
        raise RuntimeError("Query interrupted")

    monkeypatch.setattr(jobs, "_call_stage", interrupted_query)
    assert jobs.run_job(ws, run_id) == 130
    assert status(ws, run_id) == "cancelled"
    other = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 4})
    monkeypatch.setattr(jobs, "_terminating", False)
    monkeypatch.setattr(jobs, "_call_stage", lambda *a: (_ for _ in ()).throw(RuntimeError("a real bug")))
    assert jobs.run_job(ws, other) == 1
    row = ws.catalog.query("SELECT status, message FROM runs WHERE id = ?", [other]).iloc[0]
    assert (row["status"], row["message"]) == ("failed", "RuntimeError: a real bug")


@pytest.mark.slow
def test_a_job_killed_from_outside_is_marked_failed_with_its_log_tail(laion):
    ws, set_id = laion
    run_id = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 64, "niter": 300})
    jobs.schedule(ws)
    pid = wait_started(ws, run_id)
    kill_group(pid)
    assert status(ws, run_id) == "running"  # nobody told the catalog
    assert jobs.refresh(ws) == [run_id]
    row = ws.catalog.query("SELECT status, message FROM runs WHERE id = ?", [run_id]).iloc[0]
    assert row["status"] == "failed"
    assert f"job process {pid} ended without recording a result (exit code -9)" in row["message"]
    assert f"started in process {pid}" in row["message"]  # the tail of log.txt
    assert jobs.refresh(ws) == []


def test_a_reused_pid_is_not_mistaken_for_the_job(laion):
    ws, set_id = laion
    run_id = jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 4})
    ws.catalog.execute("UPDATE runs SET status = 'running', pid = ? WHERE id = ?", [os.getpid(), run_id])
    own = jobs._proc_stat(os.getpid())
    assert own is not None
    info = {"pid": os.getpid(), "start_ticks": own[1], "host": socket.gethostname()}
    (ws.dir("runs", run_id) / jobs.JOB_FILE).write_text(json.dumps(info))
    assert jobs.refresh(ws) == []  # the pid and its start time match: alive
    (ws.dir("runs", run_id) / jobs.JOB_FILE).write_text(json.dumps({**info, "start_ticks": own[1] - 1}))
    assert jobs.refresh(ws) == [run_id]  # same pid, another process: the job is gone


def test_dead_writers_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / "a" / ".part-00001.npy.tmp-999999999-abcd"
    live = tmp_path / "a" / f".part-00002.npy.tmp-{os.getpid()}-abcd"
    kept = tmp_path / "a" / "part-00000.npy"
    for path in (dead, live, kept):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"x")
    assert jobs.clean_dead_temp_files(tmp_path) == 1
    assert not dead.exists() and live.exists() and kept.exists()


@pytest.mark.slow
def test_the_queue_and_its_jobs_outlive_the_process_that_scheduled_them(laion):
    ws, set_id = laion
    first, second = (
        jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 5, "niter": 5, "seed": s}) for s in range(2)
    )
    code = (
        "import sys, core.jobs as j; from core.workspace import Workspace; "
        "print(j.schedule(Workspace(sys.argv[1], create=False), max_cpu=1))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(ws.root)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and first in out.stdout, out.stderr[-2000:]
    assert (
        status(ws, first) in ("running", "done") and status(ws, second) == "queued"
    )  # the "dashboard" is gone
    run_until_done(ws, [first, second], max_cpu=1)  # a new scheduler finds the queue in the catalog
    assert jobs.refresh(ws) == []
