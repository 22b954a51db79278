"""Reliability of jobs: kill -9 at random points of embedding, clustering and classifier training, then
resume, must give an uninterrupted run's outputs, and no partial file may ever be visible; the dashboard's
read-only catalog access must never see a lock error while jobs write.

Kill points are drawn from a seeded generator (``PRUNESCOPE_KILL_SEED``, default 0); each stage is
killed ``PRUNESCOPE_KILL_TRIALS`` times (default 1) before the final resume. The soak lasts
``PRUNESCOPE_SOAK_S`` seconds (default 120).

Tolerance for training: the resumed run's final weights equal the uninterrupted run's exactly (the
trainer restores model, optimiser, scheduler and RNG state, and every batch is a pure function of the
seed and the step); the final train-loss metric must agree within 1e-6 (relative).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import core.jobs as jobs
from core.errors import CatalogLocked
from core.runs import read_progress
from core.store.catalog import is_lock_error
from core.workspace import Workspace

from .test_jobs import (
    kill_group,
    laion_workspace,
    run_until_done,
    status,
    temp_files,
    visible_files,
    wait_for,
    wait_started,
    write_release,
)

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)

SEED = int(os.environ.get("PRUNESCOPE_KILL_SEED", "0"))
TRIALS = int(os.environ.get("PRUNESCOPE_KILL_TRIALS", "1"))
SOAK_S = float(os.environ.get("PRUNESCOPE_SOAK_S", "120"))
CLASSES = ("circle", "square", "triangle")


# -- helpers ---------------------------------------------------------------------------------------------
def digests(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in visible_files(folder)
    }


def progress_count(ws: Workspace, run_id: str) -> int:
    path = ws.dir("runs", run_id) / "progress.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def kill_after_progress(ws: Workspace, run_id: str, rng: np.random.Generator, low: int, high: int) -> int:
    """Wait for ``n`` in [low, high) new progress records plus a random share of the time one unit of work
    takes (so the kill lands anywhere in the next unit, its writes included), then kill -9 the job's
    process group; returns ``n``."""
    start = progress_count(ws, run_id)
    n = int(rng.integers(low, high))
    pid = wait_started(ws, run_id)

    def reached() -> bool:  # cheap checks only (files, /proc): a catalog query could lag behind the job
        return progress_count(ws, run_id) >= start + n or not jobs.process_alive(pid)

    wait_for(reached, 240, every=0.01, what=f"{n} progress records of {run_id}")
    times = [r["t"] for r in read_progress(ws.dir("runs", run_id))[start:]][-4:]  # this attempt's records
    unit = float(np.median(np.diff(times))) if len(times) > 1 else 0.05
    time.sleep(float(rng.uniform(0, unit)))
    log.info("kill point of %s: %d new progress records (%d in all)", run_id, n, progress_count(ws, run_id))
    assert jobs.process_alive(pid), "the job ended before the kill point; lower the kill range"
    kill_group(pid)
    return n


def after_kill(ws: Workspace, run_id: str, outputs: Path) -> None:
    """The job is marked failed with its log tail; dead writers' temporary files are gone."""
    log.info(
        "killed %s; visible then: %s",
        run_id,
        [p.relative_to(outputs).as_posix() for p in visible_files(outputs)],
    )
    assert jobs.refresh(ws) == [run_id]
    row = ws.catalog.query("SELECT status, message FROM runs WHERE id = ?", [run_id]).iloc[0]
    assert row["status"] == "failed" and "last lines of log.txt" in row["message"]
    assert not temp_files(outputs), temp_files(outputs)


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` random RGB pictures of 24..48 px."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(24, 49, size=2))
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"img_{i:03d}.png")


def make_shapes(folder: Path, per_class: int = 20) -> None:
    """A labelled image folder: class-coloured shapes on light random backgrounds (32 px)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(1)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            img = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(170, 256, 3)))
            s = int(rng.integers(16, 29))
            x, y = (int(v) for v in rng.integers(0, 33 - s, 2))
            fill = [(200, 40, 40), (40, 90, 210), (30, 160, 60)][c]
            draw = ImageDraw.Draw(img)
            if c == 0:
                draw.ellipse([x, y, x + s - 1, y + s - 1], fill=fill)
            elif c == 1:
                draw.rectangle([x, y, x + s - 1, y + s - 1], fill=fill)
            else:
                draw.polygon([(x + s // 2, y), (x + s - 1, y + s - 1), (x, y + s - 1)], fill=fill)
            (folder / name).mkdir(parents=True, exist_ok=True)
            img.save(folder / name / f"{name}_{i:02d}.png")


# -- (a) embedding -------------------------------------------------------------------------------------------
N_IMAGES = 192
SHARD_ROWS = 8


@pytest.fixture(autouse=True)
def _one_thread_per_job(monkeypatch):
    # Job processes inherit the environment: two jobs with two threads each crawl on two shared cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_embedding_killed_at_random_points_resumes_to_identical_shards(tmp_path):
    from core.datasets import register_dataset

    make_images(tmp_path / "imgs", N_IMAGES)
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "imgs", "image_folder", tmp_path / "imgs")
    base = {
        "dataset": "imgs",
        "model": "demo-vit-tiny",
        "shard_rows": SHARD_ROWS,
        "batch_size": SHARD_ROWS,
        "num_workers": 0,
        "device": "cpu",
    }
    reference = jobs.submit(ws, "embed", {**base, "set_id": "reference"})
    victim = jobs.submit(ws, "embed", {**base, "set_id": "victim"})
    rng = np.random.default_rng(SEED)
    folder = ws.dir("embeddings", "victim")
    n_shards = N_IMAGES // SHARD_ROWS
    for trial in range(TRIALS):
        if trial:
            jobs.resume(ws, victim)
        jobs.schedule(ws, max_cpu=2)
        remaining = n_shards - len(list((folder / "image").glob("part-*.parquet")))
        kill_after_progress(ws, victim, rng, 1, max(2, remaining // 2))
        after_kill(ws, victim, folder)
        _check_complete_shards(folder / "image")
        registered = not ws.catalog.query("SELECT id FROM embedding_sets WHERE id = 'victim'").empty
        assert not registered or json.loads((folder / "meta.json").read_text())["complete"]
    jobs.resume(ws, victim)
    run_until_done(ws, [reference, victim])

    assert digests(folder / "image") == digests(ws.dir("embeddings", "reference") / "image")
    assert len(digests(folder / "image")) == 2 * n_shards
    assert not temp_files(folder) and not temp_files(ws.dir("runs", victim))
    assert ws.catalog.query("SELECT count(*) AS n FROM runs WHERE id = ?", [victim])["n"].iloc[0] == 1
    assert ws.catalog.query("SELECT count(*) AS n FROM runs WHERE kind = 'embed'")["n"].iloc[0] == 2
    assert jobs.job_status(ws, victim)["fraction"] == 1.0


def _check_complete_shards(folder: Path) -> None:
    """Every visible shard file is whole: the .npy loads with its full shape, the .parquet reads."""
    for path in visible_files(folder):
        if path.suffix == ".npy":
            assert np.load(path).shape == (SHARD_ROWS, 64), path
        elif path.suffix == ".parquet":
            assert pq.read_table(path).num_rows == SHARD_ROWS, path
        else:
            pytest.fail(f"unexpected file {path}")


# -- (b) clustering ------------------------------------------------------------------------------------------
def test_clustering_killed_at_random_points_resumes_to_identical_files(tmp_path):
    write_release(tmp_path / "release")
    ws, set_id = laion_workspace(tmp_path / "ws", tmp_path / "release")
    base = {"embedding_set": set_id, "k": 32, "niter": 20}
    reference = jobs.submit(ws, "cluster", {**base, "clustering_id": "reference"})
    jobs.schedule(ws, max_cpu=1)
    wait_started(ws, reference)
    began = time.monotonic()
    run_until_done(ws, [reference])
    stage_s = time.monotonic() - began  # how long the stage itself ran (kill points are drawn inside it)

    victim = jobs.submit(ws, "cluster", {**base, "clustering_id": "victim"})
    rng = np.random.default_rng(SEED + 1)
    folder = ws.dir("clusters", "victim")
    kills = 0
    for _trial in range(TRIALS):
        if status(ws, victim) == "done":
            break
        if status(ws, victim) != "queued":
            jobs.resume(ws, victim)
        jobs.schedule(ws, max_cpu=1)
        pid = wait_started(ws, victim)
        # Early in the stage: the machine's load varies between the reference run and this one.
        delay = float(rng.uniform(0.0, 0.4 * stage_s))
        time.sleep(delay)
        log.info("kill point of %s: %.2f s into a stage of about %.2f s", victim, delay, stage_s)
        if status(ws, victim) != "running":  # it finished first (a faster moment): not a kill trial
            continue
        kill_group(pid)
        kills += 1
        after_kill(ws, victim, folder)
        _check_complete_clustering(folder)
    assert kills >= 1, "every trial's job ended before its kill point"
    if status(ws, victim) in ("failed", "cancelled"):
        jobs.resume(ws, victim)
    run_until_done(ws, [victim])

    ref = ws.dir("clusters", "reference")
    for name in ("centroids.npy", "assignments.parquet"):
        assert (folder / name).read_bytes() == (ref / name).read_bytes(), name
    meta, ref_meta = (json.loads((f / "meta.json").read_text()) for f in (folder, ref))
    assert {**meta["config"], "clustering_id": None} == {**ref_meta["config"], "clustering_id": None}
    assert not temp_files(folder)
    sizes = [
        ws.catalog.query("SELECT size FROM clusters WHERE clustering_id = ? ORDER BY cluster", [c])[
            "size"
        ].tolist()
        for c in ("victim", "reference")
    ]
    assert sizes[0] == sizes[1] and sum(sizes[0]) == 6000


def _check_complete_clustering(folder: Path) -> None:
    for path in visible_files(folder):
        if path.name == "centroids.npy":
            assert np.load(path).shape == (32, 64)
        elif path.name == "assignments.parquet":
            assert pq.read_table(path).num_rows == 6000
        elif path.name == "meta.json":
            assert json.loads(path.read_text())["complete"]
        else:
            pytest.fail(f"unexpected file {path}")


# -- (c) classifier training ---------------------------------------------------------------------------------
STEPS = 60


def test_training_killed_and_cancelled_resumes_to_the_uninterrupted_weights(tmp_path):
    import torch

    from core.datasets import register_dataset

    make_shapes(tmp_path / "shapes")
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "shapes", "image_folder", tmp_path / "shapes")
    params = {
        "dataset": "shapes",
        "arch": "resnet-demo",
        "steps": STEPS,
        "batch_size": 8,
        "lr": 0.05,
        "log_every": 1,
        "checkpoint_every": 5,
        "keep_checkpoints": 0,
        "device": "cpu",
        "cpu_threads": 1,
    }
    reference = jobs.submit(ws, "train-classifier", params)
    victim = jobs.submit(ws, "train-classifier", params)
    rng = np.random.default_rng(SEED + 2)
    ckpts = ws.dir("runs", victim, "checkpoints")
    jobs.schedule(ws, max_cpu=2)
    for trial in range(TRIALS):
        if trial:
            jobs.resume(ws, victim)
            jobs.schedule(ws, max_cpu=2)
        kill_after_progress(ws, victim, rng, 3, STEPS // (TRIALS + 2))
        after_kill(ws, victim, ws.dir("runs", victim))
        _check_complete_checkpoints(ckpts)
    # A polite stop too: on SIGTERM the job stops after the step in progress (at its progress record), the
    # trainer checkpoints that step and records `cancelled`.
    jobs.resume(ws, victim)
    jobs.schedule(ws, max_cpu=2)
    start = progress_count(ws, victim)
    wait_for(lambda: progress_count(ws, victim) >= start + 3, 240, every=0.01, what="steps after the resume")
    assert jobs.cancel(ws, victim, grace_s=30) == "cancelled"
    stopped_at = json.loads((ws.dir("runs", victim) / "progress.jsonl").read_text().splitlines()[-1])["step"]
    assert torch.load(ckpts / "last.pt", map_location="cpu", weights_only=True)["step"] == stopped_at
    assert "cancelled" in jobs.log_tail(ws, victim)
    _check_complete_checkpoints(ckpts)
    # Submitting the stage with run_id = the job's id is the same as resume(): the job is that run again.
    assert jobs.submit(ws, "train-classifier", {**params, "run_id": victim}) == victim
    run_until_done(ws, [reference, victim])

    final = [
        torch.load(ws.dir("runs", r, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
        for r in (reference, victim)
    ]
    assert final[0]["step"] == final[1]["step"] == STEPS
    for name, tensor in final[0]["state_dict"].items():
        assert torch.equal(tensor, final[1]["state_dict"][name]), name
    losses = ws.catalog.query("SELECT run_id, value FROM metrics WHERE metric = 'train_loss_final'")
    by_run = dict(zip(losses.run_id, losses.value, strict=True))
    assert by_run[victim] == pytest.approx(by_run[reference], rel=1e-6)
    assert not temp_files(ws.dir("runs", victim))
    assert (
        ws.catalog.query("SELECT count(*) AS n FROM runs WHERE kind = 'train-classifier'")["n"].iloc[0] == 2
    )


def _check_complete_checkpoints(folder: Path) -> None:
    """Every visible checkpoint loads whole."""
    import torch

    for path in visible_files(folder):
        assert path.suffix == ".pt", path
        assert 0 < torch.load(path, map_location="cpu", weights_only=True)["step"] <= STEPS, path


# -- the soak: the dashboard reads while three jobs write ----------------------------------------------------
def _feed_jobs(root: str, set_id: str, seconds: float) -> None:
    """The writer side of the soak, in its own process (as `prunescope jobs run-queue` would be): keep three
    clustering jobs running for ``seconds``, then let the queue drain."""
    ws = Workspace(root, create=False)
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        active = ws.catalog.query("SELECT count(*) AS n FROM runs WHERE status IN ('queued', 'running')")
        for _ in range(3 - int(active["n"].iloc[0])):
            jobs.submit(ws, "cluster", {"embedding_set": set_id, "k": 8, "niter": 5, "seed": n})
            n += 1
        jobs.schedule(ws, max_cpu=3)
        time.sleep(0.3)
    jobs.run_queue(ws, max_cpu=3, poll_s=0.3, timeout_s=300)


def test_dashboard_reads_never_see_a_lock_error_while_three_jobs_write(tmp_path):
    import multiprocessing

    write_release(tmp_path / "release", n=3000, dim=32)
    ws, set_id = laion_workspace(tmp_path / "ws", tmp_path / "release")
    # The scheduler runs in another process: within one process DuckDB refuses a read-only connection while
    # a read-write one is open (and the other way round), whatever the lock says.
    feeder = multiprocessing.get_context("spawn").Process(
        target=_feed_jobs, args=(str(ws.root), set_id, SOAK_S)
    )
    feeder.start()
    reader = Workspace(ws.root, create=False, lock_timeout=10.0)  # as dashboard/queries.py opens it
    errors: list[str] = []
    reads, slowest = 0, 0.0
    while feeder.is_alive():
        t0 = time.monotonic()
        try:
            reader.catalog.query(
                "SELECT id, kind, status, started_at, ended_at, message FROM runs "
                "ORDER BY started_at DESC LIMIT 50"
            )
            reader.catalog.query(
                "SELECT c.id, count(*) FROM clusterings c JOIN clusters k "
                "ON k.clustering_id = c.id GROUP BY c.id"
            )
            jobs.list_jobs(reader, limit=20)
            reads += 1
            slowest = max(slowest, time.monotonic() - t0)
        except CatalogLocked as exc:
            errors.append(exc.one_line())
        except Exception as exc:  # any other lock symptom counts too
            if not is_lock_error(exc) and "lock" not in str(exc).lower():
                raise
            errors.append(str(exc))
        time.sleep(0.2)
    feeder.join()
    runs = ws.catalog.query("SELECT id, status FROM runs WHERE kind = 'cluster'")
    log.info(
        "soak of %.0f s: %d reads (slowest %.2f s), %d jobs, %d lock errors",
        SOAK_S,
        reads,
        slowest,
        len(runs),
        len(errors),
    )
    assert feeder.exitcode == 0
    assert errors == []
    assert set(runs["status"]) == {"done"} and len(runs) >= 6, runs
    assert reads >= SOAK_S / 1.0, reads
