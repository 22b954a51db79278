"""Reliability of the job stages that ``tests/jobs/test_kill_resume.py`` leaves out: kill -9 at random points of
similarity, prune, eval-corruptions, train-detector, eval-detection, train-clip and eval-zeroshot, then resume,
must give an uninterrupted run's outputs, and no partial file may ever be visible. (embed, cluster and
train-classifier are covered there; ``demo`` runs the other stages' code.)

Each stage runs once uninterrupted (the reference), then as a job that is killed (SIGKILL to its process group)
``PRUNESCOPE_KILL_TRIALS`` times (default 1) at points drawn from a generator seeded by ``PRUNESCOPE_KILL_SEED``
(default 0) and logged; after each kill the job must be marked ``failed`` with its log tail, no temporary file may
remain and every visible output must read whole; then the job is resumed (``jobs.resume``: a re-run for
similarity, which recomputes everything, and prune, which keeps a finished manifest; ``run_id`` for the others,
which continue from their finished domains or their last checkpoint) until done.

- similarity and prune write no progress records: the kill lands at a random time inside the stage (between 5 %
  and 60 % of the reference job's duration; a job that ends first is run again with half that window).
  Their outputs must equal the reference's: the same parquet rows, meta.json but for the ids, catalog rows.
- eval-corruptions and eval-detection: killed after a random number of domains (plus a random part of the next);
  the resumed run's per-domain results and its ``metrics`` rows equal the reference's exactly.
- train-detector and train-clip (AnInfoNCE): killed after a random number of steps; tolerance: the final weights
  (and for CLIP the loss's lam and logit scale) equal the uninterrupted run's exactly (the checkpoint restores
  model, optimiser, schedule and torch RNG, and batch k is a function of the seed and k; one CPU thread in both),
  the final train-loss metric within 1e-6 (relative).
- eval-zeroshot (embeds its dataset, then scores it): killed at a random time like similarity; re-run, its
  metric rows equal a reference job's exactly, and the killed attempts left no rows behind.

The torch stages' references run in this process (the same library call a job makes, with the same single CPU
thread) to save an interpreter start; similarity's and prune's run as jobs, whose duration sets the kill window.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import core.jobs as jobs
from core.runs import read_progress
from core.workspace import Workspace
from tests.jobs.test_jobs import (
    kill_group,
    run_until_done,
    status,
    temp_files,
    visible_files,
    wait_for,
    wait_started,
    write_release,
)
from tests.jobs.test_kill_resume import SEED, TRIALS, after_kill, kill_after_progress

pytestmark = pytest.mark.slow
log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _one_thread_per_job(monkeypatch: pytest.MonkeyPatch) -> None:
    # Job processes inherit the environment: two jobs with two threads each crawl on two shared cores.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


# -- helpers -------------------------------------------------------------------------------------------------
def assert_whole(folder: Path) -> None:
    """No temporary file below ``folder``, and every visible parquet / npy / json / pt file reads whole."""
    assert not temp_files(folder), temp_files(folder)
    for path in visible_files(folder):
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            import torch

            torch.load(path, map_location="cpu", weights_only=True)


def colour_folder(root: Path, colours: dict[str, tuple[int, int, int]], *, per_class: int, px: int, noise: float,
                  name: str = "{cls}_{i}.png", captions: bool = False) -> None:
    """A labelled image folder under ``root``: ``per_class`` noisy ``px``-pixel squares of each class's colour
    (seeded), optionally with a ``.txt`` caption naming the class beside each image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls, rgb in colours.items():
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, noise, size=(px, px, 3)), 0, 255).astype(np.uint8)
            path = root / cls / name.format(cls=cls, i=i)
            Image.fromarray(arr).save(path)
            if captions:
                path.with_suffix(".txt").write_text(f"a {cls.replace('_', ' ')} number {i}")


def timed_reference(ws: Workspace, run_id: str) -> float:
    """Run a queued job alone to the end; the seconds its stage took (from its start, imports included)."""
    jobs.schedule(ws, max_cpu=1)
    wait_started(ws, run_id)
    began = time.monotonic()
    run_until_done(ws, [run_id], max_cpu=1)
    return time.monotonic() - began


def kill_at_random_time(ws: Workspace, run_id: str, rng: np.random.Generator, stage_s: float,
                        window: float) -> bool:
    """Start the queued job, kill -9 it between 5 % and ``window`` of ``stage_s`` into its stage; False when it
    ended before the kill point (the machine was faster than for the reference): not a kill trial."""
    jobs.schedule(ws, max_cpu=1)
    pid = wait_started(ws, run_id)
    delay = float(rng.uniform(0.05, window)) * stage_s
    time.sleep(delay)
    if status(ws, run_id) != "running" or not jobs.process_alive(pid):
        log.info("%s ended before its kill point (%.2f s)", run_id, delay)
        return False
    log.info("kill point of %s: %.2f s into a stage of about %.2f s", run_id, delay, stage_s)
    try:
        kill_group(pid)
    except ProcessLookupError:  # it ended between the check and the kill
        return False
    return status(ws, run_id) == "running"


def settled(ws: Workspace, run_id: str) -> str:
    """The job's status once it is not ``running`` (a job whose process vanished is marked failed)."""

    def state() -> str | None:
        jobs.refresh(ws)
        now = status(ws, run_id)
        return None if now == "running" else now

    return str(wait_for(state, 60, what=f"job {run_id} to end"))


def kill_trials_by_time(ws: Workspace, submit: Callable[[bool], str], outputs: Path, stage_s: float,
                        seed: int) -> str:
    """TRIALS kills at random times (each followed by the checks of a killed job), then resume to the end;
    returns the job's id. ``submit(again)`` queues the victim (``again``: recomputing its finished outputs); a
    job that ends before its kill point is submitted again with a kill window half as long."""
    rng = np.random.default_rng(seed)
    run_id = submit(False)
    kills, window = 0, 0.6
    for _attempt in range(TRIALS + 3):
        if kills == TRIALS:
            break
        state = settled(ws, run_id)
        if state == "done":
            run_id, window = submit(True), window / 2
        elif state != "queued":
            jobs.resume(ws, run_id)
        if kill_at_random_time(ws, run_id, rng, stage_s, window):
            kills += 1
            after_kill(ws, run_id, outputs)
            assert_whole(outputs)
    assert kills == TRIALS, f"{kills} of {TRIALS} kills landed inside the stage"
    jobs.resume(ws, run_id)
    run_until_done(ws, [run_id], max_cpu=1)
    return run_id


def last_step(ws: Workspace, run_id: str) -> int:
    """The highest ``step`` in a run's progress records (domains or training steps finished; 0 if none)."""
    return max((int(r["step"]) for r in read_progress(ws.dir("runs", run_id)) if "step" in r), default=0)


def kill_trials_by_progress(ws: Workspace, run_id: str, total: int, seed: int,
                            restart: Callable[[], int] = lambda: 0) -> None:
    """TRIALS kills, each inside a random unit of work not done yet (of ``total``; the run's progress records
    count them) and followed by the checks of a killed job; then resume to the end. ``restart()``: the unit
    after which a resumed attempt starts recording (the grids record every domain again, training resumes
    from its checkpoint's step)."""
    rng = np.random.default_rng(seed)
    outputs = ws.dir("runs", run_id)
    for trial in range(TRIALS):
        finished = last_step(ws, run_id)
        if finished >= total - 2:  # no unit left to kill in but the last
            break
        share = max(1, (total - 2 - finished) // (TRIALS - trial))  # leave room for the trials to come
        first = restart() if trial else 0
        if trial:
            jobs.resume(ws, run_id)
        jobs.schedule(ws, max_cpu=1)
        kill_after_progress(ws, run_id, rng, finished + 1 - first, finished + 1 + share - first)
        after_kill(ws, run_id, outputs)
        assert_whole(outputs)
    jobs.resume(ws, run_id)
    run_until_done(ws, [run_id], max_cpu=1)


def metric_rows(ws: Workspace, run_id: str) -> pd.DataFrame:
    """A run's ``metrics`` rows without the run id, in a fixed order."""
    rows = ws.catalog.query(
        "SELECT model, dataset, corruption, severity, adaptation, metric, value FROM metrics WHERE run_id = ? "
        "ORDER BY model, dataset, corruption NULLS FIRST, severity, adaptation, metric", [run_id])
    return rows.reset_index(drop=True)


def same_rows(a: Path, b: Path, key: list[str] | None = None) -> None:
    """Two parquet files hold the same rows (in the same order, or sorted by ``key``)."""
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if key:
        x, y = (d.sort_values(key).reset_index(drop=True) for d in (x, y))
    pd.testing.assert_frame_equal(x, y, check_exact=True)


# -- (a) similarity and (b) prune: embedding sets, a clustering ------------------------------------------------
POOL_ROWS = 100_000
POOL_SET = "pool.synthetic.image"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace (to copy) with a 100k-row pool, a 5k-row reference set and two 2.5k-row benchmarks (all
    ``synthetic`` 64-d image embeddings of LAION-style releases) and an 8-cluster clustering ``c8`` of the pool."""
    from core.clustering import ClusterConfig, run_clustering
    from core.datasets import register_dataset
    from core.embed import import_laion_embeddings

    root = tmp_path_factory.mktemp("embedded")
    ws = Workspace(root / "ws")
    for name, rows, seed in (("pool", POOL_ROWS, 0), ("ref", 5000, 1), ("bench_a", 2500, 2), ("bench_b", 2500, 3)):
        write_release(root / name, n=rows, seed=seed)
        register_dataset(ws, name, "laion", root / name)
        import_laion_embeddings(ws, name, model="synthetic")
    run_clustering(ws, ClusterConfig(embedding_set=POOL_SET, k=8, niter=10, clustering_id="c8"))
    return ws.root


def copy_workspace(src: Path, dest: Path) -> Workspace:
    shutil.copytree(src, dest)
    return Workspace(dest, create=False)


def test_similarity_killed_at_random_points_resumes_to_identical_tables(embedded, tmp_path):
    ws = copy_workspace(embedded, tmp_path / "ws")
    base = {"pool_set": POOL_SET, "reference_set": "ref.synthetic.image",
            "benchmark_sets": ["bench_a.synthetic.image", "bench_b.synthetic.image"]}
    reference = jobs.submit(ws, "similarity", {**base, "analysis_id": "reference"})
    stage_s = timed_reference(ws, reference)
    folder = ws.dir("similarity", "victim")
    # The stage recomputes everything on every run (its resume is a re-run), so `again` changes nothing.
    kill_trials_by_time(ws, lambda again: jobs.submit(ws, "similarity", {**base, "analysis_id": "victim"}),
                        folder, stage_s, SEED + 10)

    ref = ws.dir("similarity", "reference")
    names = sorted(p.name for p in visible_files(ref) if p.suffix == ".parquet")
    assert names == sorted(p.name for p in visible_files(folder) if p.suffix == ".parquet") and len(names) == 4
    for name in names:
        same_rows(folder / name, ref / name)
    meta, ref_meta = (json.loads((f / "meta.json").read_text()) for f in (folder, ref))
    assert meta["summary"] == ref_meta["summary"]
    assert {**meta["config"], "analysis_id": None} == {**ref_meta["config"], "analysis_id": None}
    pd.testing.assert_frame_equal(metric_rows(ws, "victim"), metric_rows(ws, "reference"), check_exact=True)
    assert len(metric_rows(ws, "victim")) == 2 * 5
    assert not temp_files(folder)


def test_pruning_killed_at_random_points_resumes_to_an_identical_manifest(embedded, tmp_path):
    ws = copy_workspace(embedded, tmp_path / "ws")
    chain = [["semdedup", {"eps": 0.3}], ["dbp", {"keep_fraction": 0.5}], ["ssp", {"keep_fraction": 0.5}]]
    base = {"clustering_id": "c8", "chain": chain, "seed": 1}
    reference = jobs.submit(ws, "prune", {**base, "pruning_id": "reference"})
    stage_s = timed_reference(ws, reference)
    folder = ws.dir("manifests")
    kill_trials_by_time(ws, lambda again: jobs.submit(ws, "prune", {**base, "pruning_id": "victim",
                                                                    "replace": again}),
                        folder, stage_s, SEED + 11)

    same_rows(folder / "victim.parquet", folder / "reference.parquet")
    meta, ref_meta = (json.loads((folder / f"{i}.json").read_text()) for i in ("victim", "reference"))
    for key in ("id", "manifest_path"):
        meta.pop(key), ref_meta.pop(key)
    assert meta == ref_meta
    rows = ws.catalog.query("SELECT id, methods, config_json, n_in, n_kept FROM prunings ORDER BY id")
    assert rows["id"].tolist() == ["reference", "victim"]
    assert rows.drop(columns="id").iloc[0].equals(rows.drop(columns="id").iloc[1])
    assert 0 < rows["n_kept"].iloc[0] < POOL_ROWS
    assert not temp_files(folder)


# -- (c) eval-corruptions: a labelled image folder and a classifier checkpoint ----------------------------------
CORRUPTIONS = ("gaussian_noise", "fog", "contrast")
SEVERITIES = (1, 5)
N_DOMAINS = 1 + len(CORRUPTIONS) * len(SEVERITIES)


def test_corruption_grid_killed_at_random_points_resumes_to_identical_results(tmp_path):
    import torch

    from core.classifiers import build_classifier, save_classifier
    from core.datasets import register_dataset
    from core.evaluate.corruption import CorruptionEvalConfig, evaluate_corruptions

    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    colour_folder(tmp_path / "src", colours, per_class=20, px=40, noise=25)
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "shapes", "image_folder", tmp_path / "src", role="benchmark")
    torch.manual_seed(0)
    save_classifier(build_classifier("resnet-demo", 3, classes=list(colours), image_size=32),
                    ws.root / "models" / "demo.pt")
    params = {"dataset": "shapes", "models": ["demo=models/demo.pt"], "corruptions": list(CORRUPTIONS),
              "severities": list(SEVERITIES), "adaptations": ["none", "bn"], "batch_size": 8, "seed": 3,
              "device": "cpu", "cpu_threads": 1}
    expected = evaluate_corruptions(ws, CorruptionEvalConfig(**params))  # the reference, in this process
    reference = ws.catalog.query("SELECT id FROM runs WHERE kind = 'eval-corruptions'")["id"].item()

    victim = jobs.submit(ws, "eval-corruptions", params)
    results = ws.dir("runs", victim) / "results.parquet"
    kill_trials_by_progress(ws, victim, N_DOMAINS, SEED + 12)

    key = ["model", "adaptation", "corruption", "severity"]
    same_rows(results, ws.dir("runs", reference) / "results.parquet", key)
    assert len(expected) == 2 * N_DOMAINS
    pd.testing.assert_frame_equal(metric_rows(ws, victim), metric_rows(ws, reference), check_exact=True)
    assert not temp_files(ws.dir("runs", victim))


# -- (d) train-detector and (e) eval-detection: demo detection scenes ------------------------------------------
DET_STEPS = 16


@pytest.fixture(scope="module")
def detection(tmp_path_factory: pytest.TempPathFactory):
    """Demo scenes (16 training, 8 evaluation) and a workspace whose reference detector training run (16 steps,
    in this process) is done; returns (ws, scenes folder, training params, reference run id)."""
    from core.demo.benchmarks import DETECTION_TRAIN_DIR, write_detection, write_detection_train
    from core.demo.spec import World, WorldSize
    from core.train.detector import TrainDetectorConfig, train_detector

    root = tmp_path_factory.mktemp("detection")
    size = WorldSize("scenes", n_classes=4, pool=10, shard_size=10, reference_per_class=1, bench_per_class=1,
                     detection_scenes=8, laion_partitions=1, detection_train_scenes=16)
    world = World(root / "demo", size, seed=3)
    write_detection(world)
    write_detection_train(world)
    ws = Workspace(root / "ws")
    params = {"data": str(world.out / DETECTION_TRAIN_DIR), "steps": DET_STEPS, "batch_size": 3, "warmup_steps": 2,
              "checkpoint_every": 3, "log_every": 1, "device": "cpu", "cpu_threads": 1}
    result = train_detector(ws, TrainDetectorConfig(**params))
    assert result.finished
    return ws, world.out, params, result.run_id


def test_detector_training_killed_at_random_points_resumes_to_the_uninterrupted_weights(detection):
    import torch

    ws, _, params, reference = detection
    victim = jobs.submit(ws, "train-detector", params)
    ckpts = ws.dir("runs", victim, "checkpoints")

    def checkpoint_step() -> int:
        last = ckpts / "last.pt"
        return int(torch.load(last, map_location="cpu", weights_only=True)["step"]) if last.exists() else 0

    kill_trials_by_progress(ws, victim, DET_STEPS, SEED + 13, restart=checkpoint_step)

    final = [torch.load(ws.dir("runs", r, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
             for r in (reference, victim)]
    assert final[0]["step"] == final[1]["step"] == DET_STEPS
    assert final[0]["state_dict"].keys() == final[1]["state_dict"].keys()
    for name, tensor in final[0]["state_dict"].items():
        assert torch.equal(tensor, final[1]["state_dict"][name]), name
    losses = ws.catalog.query("SELECT run_id, value FROM metrics WHERE metric = 'train_loss_final'")
    by_run = dict(zip(losses.run_id, losses.value, strict=True))
    assert by_run[victim] == pytest.approx(by_run[reference], rel=1e-6)
    assert [p.name for p in visible_files(ckpts)] == ["last.pt"] and not temp_files(ws.dir("runs", victim))


DET_CORRUPTIONS = ("gaussian_noise", "fog", "contrast")


def test_detection_grid_killed_at_random_points_resumes_to_identical_results(detection):
    from core.evaluate.detection import DetectionEvalConfig, evaluate_detection

    ws, scenes, _, detector = detection
    params = {"data": str(scenes / "detection"), "models": [detector], "corruptions": list(DET_CORRUPTIONS),
              "severities": [1, 5], "batch_size": 4, "device": "cpu", "cpu_threads": 1}
    expected = evaluate_detection(ws, DetectionEvalConfig(**params))  # the reference, in this process
    reference = expected.attrs["run_id"]
    n_domains = 1 + 2 * len(DET_CORRUPTIONS)
    assert len(expected) == n_domains and expected["ap50"].gt(0).any(), expected

    victim = jobs.submit(ws, "eval-detection", params)
    results = ws.dir("runs", victim) / "results.parquet"
    kill_trials_by_progress(ws, victim, n_domains, SEED + 14)

    same_rows(results, ws.dir("runs", reference) / "results.parquet", ["model", "corruption", "severity"])
    pd.testing.assert_frame_equal(metric_rows(ws, victim), metric_rows(ws, reference), check_exact=True)
    assert not temp_files(ws.dir("runs", victim))


# -- (f) train-clip: a captioned image folder ------------------------------------------------------------------
CLIP_STEPS = 12


def test_clip_training_killed_at_random_points_resumes_to_the_uninterrupted_weights(tmp_path):
    import torch

    from core.train.clip import TrainClipConfig, train_clip
    from tests.train.conftest import build_captioned_workspace

    captioned = build_captioned_workspace(tmp_path)
    ws = captioned.ws
    params = {"dataset": captioned.dataset, "loss": "aninfonce", "steps": CLIP_STEPS, "batch_size": 4,
              "warmup_steps": 2, "checkpoint_every": 2, "log_every": 1, "seed": 5, "device": "cpu",
              "cpu_threads": 1}
    reference = train_clip(ws, TrainClipConfig(**params))  # in this process, one thread like the job
    assert reference.finished

    victim = jobs.submit(ws, "train-clip", params)
    ckpts = ws.dir("runs", victim, "checkpoints")

    def checkpoint_step() -> int:
        last = ckpts / "last.pt"
        return int(torch.load(last, map_location="cpu", weights_only=True)["step"]) if last.exists() else 0

    kill_trials_by_progress(ws, victim, CLIP_STEPS, SEED + 15, restart=checkpoint_step)

    final = [torch.load(ws.dir("runs", r, "checkpoints", "last.pt"), map_location="cpu", weights_only=True)
             for r in (reference.run_id, victim)]
    assert final[0]["step"] == final[1]["step"] == CLIP_STEPS
    assert final[0]["state_dict"].keys() == final[1]["state_dict"].keys()
    for name, tensor in final[0]["state_dict"].items():
        assert torch.equal(tensor, final[1]["state_dict"][name]), name
    for name, tensor in final[0]["loss"].items():  # AnInfoNCE's lam and the logit scale
        assert torch.equal(tensor, final[1]["loss"][name]), name
    losses = ws.catalog.query("SELECT run_id, value FROM metrics WHERE metric = 'train_loss_final'")
    by_run = dict(zip(losses.run_id, losses.value, strict=True))
    assert by_run[victim] == pytest.approx(by_run[reference.run_id], rel=1e-6)
    assert not temp_files(ws.dir("runs", victim))
    assert "last.pt" in [p.name for p in visible_files(ckpts)]


# -- (g) eval-zeroshot: a labelled, captioned image folder ------------------------------------------------------
def test_zeroshot_evaluation_killed_at_random_points_resumes_to_identical_metrics(tmp_path):
    from core.datasets import register_dataset

    colours = {"red_square": (220, 30, 30), "blue_square": (30, 30, 220), "green_square": (30, 200, 30)}
    colour_folder(tmp_path / "src", colours, per_class=150, px=48, noise=30, name="{i}.png", captions=True)
    empty = Workspace(tmp_path / "empty")
    register_dataset(empty, "colours", "image_folder", tmp_path / "src", role="benchmark")
    params = {"datasets": ["colours"], "batch_size": 32, "device": "cpu", "model_label": "tiny"}

    ws_ref = copy_workspace(empty.root, tmp_path / "ref")  # the reference as a job too: same threads
    reference = jobs.submit(ws_ref, "eval-zeroshot", params)
    stage_s = timed_reference(ws_ref, reference)
    expected = ws_ref.catalog.query("SELECT dataset, metric, value FROM metrics WHERE run_id = ? "
                                    "ORDER BY dataset, metric", [reference])
    assert len(expected) > 5 and "i2t_recall@1" in set(expected.metric)

    ws = copy_workspace(empty.root, tmp_path / "victim")
    run_id = kill_trials_by_time(ws, lambda _again: jobs.submit(ws, "eval-zeroshot", params), ws.root, stage_s,
                                 SEED + 16)
    got = ws.catalog.query("SELECT dataset, metric, value FROM metrics WHERE run_id = ? ORDER BY dataset, metric",
                           [run_id])
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    rows = ws.catalog.query("SELECT count(*) AS n FROM metrics WHERE model = 'tiny'")["n"].item()
    assert rows == len(expected)  # every killed attempt's rows replaced, none duplicated
    assert_whole(ws.dir("embeddings"))
