"""``prunescope demo``: build the demo world into a workspace and run every stage on it.

The demo is a chain of named stages; each is idempotent (a second call skips what is done) and
resumable (a crashed stage redoes only its unfinished part). Later stages (embedding, clustering,
pruning, training, evaluation) append themselves to :data:`STAGES`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from core import atomic
from core.datasets import list_datasets, register_dataset
from core.errors import ConfigError, PrunescopeError
from core.reference import load_reference_results
from core.runs import recorded_run
from core.workspace import Workspace

log = logging.getLogger(__name__)

DEMO_FOLDER = "demo"
#: Stands for the world's classes.json in DemoDataset options (the world folder is known at run time).
CLASSES = "<world>/classes.json"


@dataclass(frozen=True)
class DemoDataset:
    """A dataset of the demo world and how to register it (path relative to the world folder)."""

    name: str
    kind: str
    path: str
    role: str
    options: dict[str, Any]
    description: str


DEMO_DATASETS: tuple[DemoDataset, ...] = (
    DemoDataset("pool", "webdataset", "pool", "pool", {}, "LAION-like pool: img2dataset shards with noisy alt-text"),
    DemoDataset("pool_latent", "laion", "laion", "pool", {},
                "the pool in LAION embedding layout (generator-latent vectors, not CLIP)"),
    DemoDataset("reference", "image_folder", "reference", "reference", {},
                "clean class-balanced set playing ImageNet-train"),
    DemoDataset("val", "image_folder", "benchmarks/val", "benchmark", {}, "same distribution as the pool"),
    DemoDataset("sketch", "image_folder", "benchmarks/sketch", "benchmark", {"classes_file": CLASSES},
                "line drawings"),
    DemoDataset("rendition", "image_folder", "benchmarks/rendition", "benchmark", {"classes_file": CLASSES},
                "flat cartoon renditions of a subset of classes"),
    DemoDataset("v2", "image_folder", "benchmarks/v2", "benchmark", {"label_from": "numeric"},
                "re-sampled pose and size, ImageNetV2-style numeric folders"),
    DemoDataset("hard", "parquet", "benchmarks/hard/hard.parquet", "benchmark", {"classes_file": CLASSES},
                "clutter, occlusion, low contrast"),
)


@dataclass(frozen=True)
class DemoContext:
    ws: Workspace
    world: Path
    size: str
    seed: int
    progress: bool


Stage = Callable[[DemoContext], str]


def stage_generate(ctx: DemoContext) -> str:
    from core.demo.world import generate_world

    info = generate_world(ctx.world, size=ctx.size, seed=ctx.seed, progress=ctx.progress)
    counts = ", ".join(f"{k} {v}" for k, v in info.get("counts", {}).items())
    return f"world {ctx.world} ({ctx.size}, seed {ctx.seed}): {counts}"


def stage_register(ctx: DemoContext) -> str:
    existing = list_datasets(ctx.ws).set_index("name")["uri"].to_dict()
    done = []
    for ds in DEMO_DATASETS:
        uri = (ctx.world / ds.path).resolve()
        if existing.get(ds.name) == str(uri):
            continue
        options = {k: str(ctx.world / "classes.json") if v == CLASSES else v for k, v in ds.options.items()}
        info = register_dataset(ctx.ws, ds.name, ds.kind, uri, role=ds.role, options=options, replace=True,
                                description=ds.description, progress=ctx.progress)
        done.append(f"{info.name} {info.n_samples}")
    return "registered " + (", ".join(done) if done else "nothing new (all demo datasets present)")


def stage_reference_results(ctx: DemoContext) -> str:
    return f"reference results: {load_reference_results(ctx.ws)} published rows"


#: CLIP training steps (batch 64) of the demo model per world size.
TRAIN_STEPS = {"tiny": 150, "small": 400, "full": 1500}
DEMO_MODEL = "demo-vit-tiny"
BENCHMARKS = ("val", "sketch", "rendition", "v2", "hard")


def _state_dir(ctx: DemoContext) -> Path:
    return ctx.ws.dir("cache", "demo_state")


def _state(ctx: DemoContext) -> dict[str, Any]:
    """What the stages recorded: one file per key (stages running side by side as jobs never overwrite each
    other's), over the single ``demo_state.json`` of workspaces built before."""
    legacy = ctx.ws.dir("cache") / "demo_state.json"
    state: dict[str, Any] = json.loads(legacy.read_text()) if legacy.exists() else {}
    folder = _state_dir(ctx)
    if folder.is_dir():
        for path in sorted(folder.glob("*.json")):
            state[path.stem] = json.loads(path.read_text())
    return state


def _save_state(ctx: DemoContext, **updates: Any) -> None:
    for key, value in updates.items():
        atomic.write_json(_state_dir(ctx) / f"{key}.json", value)


def stage_train_clip(ctx: DemoContext) -> str:
    """Train the demo CLIP on the pool (resuming an interrupted demo training run)."""
    from core.train.clip import TrainClipConfig, train_clip

    state = _state(ctx).get("train_clip", {})
    if state.get("done"):
        return f"demo CLIP already trained (run {state['run_id']})"
    steps = TRAIN_STEPS[ctx.size]
    cfg = TrainClipConfig(dataset="pool", model=DEMO_MODEL, steps=steps, batch_size=64, lr=1e-3,
                          warmup_steps=max(10, steps // 20), checkpoint_every=max(50, steps // 4), seed=ctx.seed,
                          cpu_threads=1)
    previous = _unfinished_demo_run(ctx, cfg)
    if previous:
        log.info("resuming the interrupted demo training run %s", previous)
        cfg = replace(cfg, run_id=previous)
    result = train_clip(ctx.ws, cfg, progress=ctx.progress)
    _save_state(ctx, train_clip={"run_id": result.run_id, "done": result.finished,
                                 "checkpoint": ctx.ws.rel(result.checkpoint) if result.checkpoint else None})
    return (f"trained {DEMO_MODEL} on pool: {result.steps} steps, final loss {result.final_loss:.3f}, "
            f"{result.img_per_s:.0f} img/s (run {result.run_id})")


def _unfinished_demo_run(ctx: DemoContext, cfg: Any) -> str | None:
    """The newest demo training run with this config that stopped before the end and can resume."""
    runs = ctx.ws.catalog.query(
        "SELECT id, status, config_json, run_dir FROM runs WHERE kind = 'train-clip' ORDER BY started_at DESC")
    keys = ("dataset", "model", "steps", "seed", "batch_size", "lr")
    for run in runs.itertuples():
        stored = json.loads(run.config_json or "{}")
        matches = all(stored.get(k) == getattr(cfg, k) for k in keys) and run.status != "done"
        if matches and (ctx.ws.abs(run.run_dir) / "checkpoints" / "last.pt").exists():
            return str(run.id)
    return None


def _checkpoint(ctx: DemoContext) -> str:
    state = _state(ctx).get("train_clip", {})
    if not state.get("checkpoint"):
        raise ConfigError("the demo CLIP has not been trained yet; run the train stage first")
    return str(ctx.ws.abs(state["checkpoint"]))


def stage_embed(ctx: DemoContext) -> str:
    """Embed the pool (images + captions) and the reference set with the demo CLIP (resumable)."""
    from core.embed import EmbedConfig, embed_dataset

    done = []
    for name, modality in (("pool", "both"), ("reference", "image")):
        cfg = EmbedConfig(dataset=name, model=DEMO_MODEL, checkpoint=_checkpoint(ctx), modality=modality,
                          set_id=f"{name}.demo-clip.{modality}", num_workers=0)
        info = embed_dataset(ctx.ws, cfg, progress=ctx.progress)
        done.append(f"{info.id} ({info.n} rows)")
    return "embedded " + ", ".join(done)


def stage_zeroshot(ctx: DemoContext) -> str:
    """Zero-shot top-1 of the demo CLIP on every benchmark (skipped when already measured)."""
    from core.evaluate.zeroshot import ZeroShotConfig, evaluate_zeroshot

    state = _state(ctx).get("zeroshot", {})
    checkpoint = _checkpoint(ctx)
    if state.get("checkpoint") == checkpoint:
        return "zero-shot already evaluated: " + state.get("summary", "")
    cfg = ZeroShotConfig(datasets=BENCHMARKS, model=DEMO_MODEL, checkpoint=checkpoint,
                         classnames=str(ctx.world / "classes.json"), templates=str(ctx.world / "templates.json"),
                         model_label="demo-clip")
    result = evaluate_zeroshot(ctx.ws, cfg, progress=ctx.progress)
    top1 = result[result.metric == "zeroshot_top1"]
    summary = ", ".join(f"{d} {v:.1%}" for d, v in zip(top1.dataset, top1.value, strict=True))
    _save_state(ctx, zeroshot={"checkpoint": checkpoint, "summary": summary})
    return f"zero-shot top-1 of demo-clip: {summary}"


#: Concept clusters of the demo pool per world size (the world has 12 / 24 / 40 concepts).
CLUSTERS = {"tiny": 24, "small": 48, "full": 100}


def stage_cluster(ctx: DemoContext) -> str:
    """Concept clusters of the pool's demo-CLIP image embeddings (reused when complete)."""
    from core.clustering import ClusterConfig, run_clustering

    cfg = ClusterConfig(embedding_set="pool.demo-clip.both", k=CLUSTERS[ctx.size], seed=ctx.seed,
                        clustering_id="pool.demo-clip", vocabulary=str(ctx.world / "classes.json"),
                        templates=str(ctx.world / "templates.json"))
    info = run_clustering(ctx.ws, cfg)
    named = int(info.stats["label"].notna().sum())
    return (f"clustering {info.id}: {info.n} rows in {info.k} clusters ({named} named from captions; "
            "all matched to the world's class names)")


def stage_maps(ctx: DemoContext) -> str:
    """UMAP maps of the demo clustering: the centroids and every cluster's members (cached)."""
    from core.project import compute_maps

    counts = compute_maps(ctx.ws, "pool.demo-clip", progress=ctx.progress)
    return f"maps of pool.demo-clip: {counts['computed']} computed, {counts['cached']} cached"


#: SemDeDup's eps for the demo encoder. The 7 M-parameter demo CLIP maps images of one concept to
#: nearly the same vector (median cosine to the nearest earlier cluster member 0.996), so the eps of
#: real CLIP embeddings (0.03-0.1) would remove most of the pool; 2e-4 separates the planted exact
#: duplicates (cosine 1) from distinct images (see the Pruning page's eps curve).
DEMO_SEMDEDUP_EPS = 2e-4
#: The demo's prunings: a random baseline, then SemDeDup followed by DBP (the DBP paper's chain).
DEMO_PRUNINGS: tuple[tuple[str, tuple[tuple[str, dict[str, Any]], ...]], ...] = (
    ("pool.random-50", (("random", {"keep_fraction": 0.5}),)),
    ("pool.semdedup-dbp-50", (("semdedup", {"eps": DEMO_SEMDEDUP_EPS}), ("dbp", {"keep_fraction": 0.5}))),
)


def stage_prune(ctx: DemoContext) -> str:
    """Manifests of the demo's prunings (reused when complete), judged against the pool's ground truth."""
    from core.prune.manifest import PruneConfig, run_pruning

    done = []
    for pruning_id, chain in DEMO_PRUNINGS:
        info = run_pruning(ctx.ws, PruneConfig(clustering_id="pool.demo-clip", chain=chain, seed=ctx.seed,
                                               pruning_id=pruning_id))
        done.append(f"{info.id} keeps {info.n_kept} of {info.n_in}")
    return "; ".join(done)


#: The demo's similarity analysis and the manifest of the paper's pruning on it.
DEMO_ANALYSIS = "pool.vs.reference"
DEMO_SIMILARITY_PRUNING = "pool.similarity-ref"


def stage_similarity(ctx: DemoContext) -> str:
    """Train-test similarity of the pool and the reference set against every benchmark (CLIP-OOD), and
    the manifest of the paper's pruning (every pool sample closer than reference to some test sample)."""
    from core.embed import embedding_set_row
    from core.prune.manifest import PruneConfig, run_pruning
    from core.similarity_stage import SimilarityConfig, run_similarity

    pool = embedding_set_row(ctx.ws, "pool.demo-clip.both")
    sets = []
    for name in BENCHMARKS:  # the benchmarks as the zero-shot stage embedded them, with the pool's model
        found = ctx.ws.catalog.query(
            "SELECT id FROM embedding_sets WHERE dataset = ? AND modality IN ('image', 'both') AND model = ? "
            "AND pretrained IS NOT DISTINCT FROM ? ORDER BY created_at DESC LIMIT 1",
            [name, pool["model"], pool["pretrained"]])
        if not found.empty:
            sets.append(str(found["id"].iloc[0]))
    cfg = SimilarityConfig(pool_set="pool.demo-clip.both", reference_set="reference.demo-clip.image",
                           benchmark_sets=tuple(sets), analysis_id=DEMO_ANALYSIS)
    summary = run_similarity(ctx.ws, cfg)
    info = run_pruning(ctx.ws, PruneConfig(clustering_id="pool.demo-clip", seed=ctx.seed,
                                           chain=(("similarity", {"analysis": DEMO_ANALYSIS}),),
                                           pruning_id=DEMO_SIMILARITY_PRUNING), replace=True)
    lines = [f"{r.benchmark}: {r.share_test_pool_closer:.0%} of test closer to the pool, {r.n_prune} pool samples "
             "closer than reference" for r in summary.itertuples()]
    return "; ".join(lines) + f"; {info.id} keeps {info.n_kept} of {info.n_in}"


#: The demo's classifiers: (name, noise) trained on the reference set (ImageNet-train's role).
DEMO_CLASSIFIERS = (("vanilla", "none"), ("gaussian", "gaussian"))
#: Classifier updates per world size (batch 32).
CLASSIFIER_STEPS = {"tiny": 240, "small": 600, "full": 1500}
#: The adaptation methods the demo compares under corruptions.
DEMO_ADAPTATIONS = ("none", "bn", "tent", "rpl")


def stage_robustness(ctx: DemoContext) -> str:
    """Train the small BN ResNet twice (vanilla and Gaussian noise, Rusak et al. 2020) on the reference
    set and evaluate both, and the demo CLIP zero-shot, on corrupted ``val`` (15 x 5) with none / bn /
    tent / rpl (the CLIP is not applicable to the BN methods)."""
    from core.evaluate.corruption import CorruptionEvalConfig, evaluate_corruptions, summaries
    from core.train.classifier import TrainClassifierConfig, train_classifier

    state = _state(ctx).get("robustness", {})
    runs = dict(state.get("classifiers", {}))
    for name, noise in DEMO_CLASSIFIERS:
        if name in runs:
            continue
        cfg = TrainClassifierConfig(dataset="reference", arch="resnet-demo", noise=noise, steps=CLASSIFIER_STEPS[ctx.size],
                                    batch_size=32, lr=0.05, val_dataset="val", seed=ctx.seed, cpu_threads=1,
                                    checkpoint_every=0)
        result = train_classifier(ctx.ws, cfg, progress=ctx.progress)
        runs[name] = result.run_id
        _save_state(ctx, robustness={**state, "classifiers": runs})
    if state.get("eval_run") and state.get("checkpoint") == _checkpoint(ctx):
        return f"robustness already evaluated (run {state['eval_run']})"
    models = tuple(f"resnet-demo {name}={run}" for name, run in runs.items()) + (
        f"demo-clip zero-shot=clip:{_checkpoint(ctx)}",)
    grid = CorruptionEvalConfig(dataset="val", models=models, adaptations=DEMO_ADAPTATIONS, batch_size=40,
                                seed=ctx.seed, cpu_threads=1)
    results = evaluate_corruptions(ctx.ws, grid, progress=ctx.progress)
    run_id = ctx.ws.catalog.query("SELECT id FROM runs WHERE kind = 'eval-corruptions' ORDER BY started_at DESC "
                                  "LIMIT 1")["id"].iloc[0]
    _save_state(ctx, robustness={"classifiers": runs, "eval_run": str(run_id), "checkpoint": _checkpoint(ctx)})
    table = summaries(results)
    mce = table[table["metric"] == "mCE"]
    return "mCE " + ", ".join(f"{r.model}/{r.adaptation} {r.value:.1f}" for r in mce.itertuples())


#: Scenes of the demo detector's evaluation per world size (all of them: 40 / 200 / 600).
DEMO_DETECTION_LABEL = "demo-frcnn"


def stage_detection(ctx: DemoContext) -> str:
    """Train the small Faster R-CNN (``demo-frcnn``) on the world's ``detection-train`` scenes, then evaluate
    it on the ``detection`` scenes clean and under the 15 corruptions x 5 severities: P, mPC, rPC
    (Michaelis et al. 2019; the scenes are COCO json, so the primary metric is AP@[.5:.95])."""
    from core.evaluate.detection import DetectionEvalConfig, evaluate_detection, summaries
    from core.train.detector import demo_config, train_detector

    state = _state(ctx).get("detection", {})
    train_dir, eval_dir = ctx.world / "detection-train", ctx.world / "detection"
    run_id = state.get("train_run")
    if not run_id:
        cfg = demo_config(ctx.size, str(train_dir), str(eval_dir), seed=ctx.seed, cpu_threads=1)
        result = train_detector(ctx.ws, cfg, progress=ctx.progress)
        run_id = result.run_id
        state = {"train_run": run_id, "train_seconds": round(result.seconds, 1), "clean_ap50": result.ap50}
        _save_state(ctx, detection=state)
    if state.get("eval_run"):
        return f"detection already evaluated (run {state['eval_run']}): {state.get('summary', '')}"
    grid = DetectionEvalConfig(data=str(eval_dir), models=(f"{DEMO_DETECTION_LABEL}={run_id}",), dataset="demo-detection",
                               seed=ctx.seed, cpu_threads=1, batch_size=20)
    results = evaluate_detection(ctx.ws, grid, progress=ctx.progress)
    table = summaries(results, results.attrs["metric"])
    summary = ", ".join(f"{r.metric} {r.value:.1f}" for r in table.itertuples())
    _save_state(ctx, detection={**state, "eval_run": results.attrs["run_id"], "summary": summary})
    return f"{DEMO_DETECTION_LABEL} (trained in {state.get('train_seconds', 0):.0f} s): {summary} (AP, %)"


STAGES: list[tuple[str, Stage]] = [
    ("generate", stage_generate),
    ("register", stage_register),
    ("reference_results", stage_reference_results),
    ("train_clip", stage_train_clip),
    ("embed", stage_embed),
    ("zeroshot", stage_zeroshot),
    ("cluster", stage_cluster),
    ("maps", stage_maps),
    ("prune", stage_prune),
    ("similarity", stage_similarity),
    ("robustness", stage_robustness),
    ("detection", stage_detection),
]
#: What each stage needs done first (jobs run side by side when their needs are met, see run_demo).
NEEDS: dict[str, tuple[str, ...]] = {
    "generate": (),
    "register": ("generate",),
    "reference_results": (),
    "train_clip": ("register",),
    "embed": ("train_clip",),
    "zeroshot": ("train_clip",),
    "cluster": ("embed",),
    "maps": ("cluster",),
    "prune": ("cluster",),
    "similarity": ("embed", "zeroshot", "cluster"),
    "robustness": ("register", "train_clip"),
    "detection": ("generate",),
}
#: Which ready stage starts first when slots are short: the long ones (robustness, detection) early, so
#: the short chain embed -> ... -> similarity fills the other slot instead of delaying them.
START_ORDER: tuple[str, ...] = ("generate", "reference_results", "register", "train_clip", "robustness", "detection",
                                "embed", "zeroshot", "cluster", "maps", "prune", "similarity")


STAGE_NAMES: tuple[str, ...] = tuple(name for name, _ in STAGES)


@dataclass(frozen=True)
class DemoStageConfig:
    """One stage of the demo, as a job (``prunescope demo`` submits one per stage).

    Attributes:
        stage: the demo stage: generate, register, reference_results, train_clip, embed, zeroshot, cluster,
            maps, prune, similarity, robustness, detection (:data:`NEEDS` says what each needs first).
        size: the demo world's size: tiny, small or full.
        seed: seed of the world and of every stage.
    """

    stage: str
    size: str = "small"
    seed: int = 0

    def __post_init__(self) -> None:
        from core.demo.world import SIZES

        if self.stage not in STAGE_NAMES:
            raise ConfigError(f"unknown demo stage {self.stage!r}; available: {', '.join(STAGE_NAMES)}")
        if self.size not in SIZES:
            raise ConfigError(f"unknown demo size {self.size!r}; available: {', '.join(SIZES)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer; got {self.seed!r}")


def run_stage(ws: Workspace, cfg: DemoStageConfig, *, progress: bool = False) -> str:
    """Run one demo stage (idempotent: a finished stage returns at once); its summary line."""
    ctx = DemoContext(ws, ws.dir("sources", DEMO_FOLDER), cfg.size, cfg.seed, progress)
    return dict(STAGES)[cfg.stage](ctx)


def run_demo(ws: Workspace, *, size: str = "small", seed: int = 0, progress: bool = False,
             jobs: bool = False, parallel: int = 2, echo: Callable[[str], None] | None = None) -> list[str]:
    """Run every demo stage; returns one summary line per stage (with its wall time), in finishing order.

    Args:
        jobs: run each stage as a job (its own process, a row and a run folder that the Runs page shows,
            log in ``runs/<id>/log.txt``), up to ``parallel`` at once as soon as what they need
            (:data:`NEEDS`) is done; otherwise one after the other in this process, in :data:`STAGES` order.
        echo: called with a line when a stage starts and ends (and, for jobs, while one is still running).

    Raises:
        ConfigError: an unknown size, or the workspace holds a demo world of another size or seed.
        PrunescopeError: a stage failed (for jobs: its message and log tail;
            the stages already running are finished first, the ones not started are not started).
    """
    from core.demo.world import check_world

    configs = [DemoStageConfig(name, size, seed) for name in STAGE_NAMES]  # validates size and seed
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"parallel must be an integer >= 1; got {parallel!r}")
    check_world(ws.dir("sources", DEMO_FOLDER), size=size, seed=seed)  # before any job: one clear error
    lines: list[str] = []

    def done(name: str, text: str, seconds: float) -> None:
        lines.append(f"[{name}] {text} ({seconds:.1f} s)")
        log.info(lines[-1])
        if echo:
            echo(lines[-1])

    with recorded_run(ws, "demo", {"size": size, "seed": seed, "jobs": jobs}, seed=seed):
        if jobs:
            _DemoJobs(ws, configs, parallel, echo).run(done)
        else:
            for cfg in configs:
                t0 = time.perf_counter()
                if echo:
                    echo(f"[{cfg.stage}] started")
                done(cfg.stage, run_stage(ws, cfg, progress=progress), time.perf_counter() - t0)
    return lines


#: Seconds between "still running" lines while ``prunescope demo`` waits for a stage's job.
HEARTBEAT_S = 60.0


def _inner_progress(ws: Workspace, job_id: str) -> str:
    """``": <kind> step/total"`` of the newest run the job's process is running besides the job itself (the
    stage's training or evaluation run), or "" when there is none or it reported nothing yet."""
    from core.runs import read_progress

    rows = ws.catalog.query("SELECT r.kind, r.run_dir FROM runs r JOIN runs j ON j.id = ? AND r.pid = j.pid "
                            "WHERE r.status = 'running' AND r.id <> j.id ORDER BY r.started_at DESC LIMIT 1", [job_id])
    if rows.empty or not rows["run_dir"].iloc[0]:
        return ""
    records = read_progress(ws.abs(rows["run_dir"].iloc[0]))
    latest = records[-1] if records else {}
    if "step" not in latest or "total" not in latest:
        return ""
    return f": {rows['kind'].iloc[0]} {latest['step']}/{latest['total']}"


class _DemoJobs:
    """The demo's stages as jobs: each starts (at once, not behind the queue's CPU limit: the user is
    waiting) when its needs are done and fewer than ``parallel`` run; Ctrl-C cancels the running ones."""

    def __init__(self, ws: Workspace, configs: list[DemoStageConfig], parallel: int,
                 echo: Callable[[str], None] | None, poll_s: float = 1.0, *, check_needs: bool = True) -> None:
        self.ws, self.parallel, self.echo, self.poll_s = ws, parallel, echo, poll_s
        self.check_needs = check_needs
        self.todo = sorted(configs, key=lambda c: START_ORDER.index(c.stage))
        self.running: dict[str, tuple[DemoStageConfig, float]] = {}  # run id -> (stage, start)
        self.finished: set[str] = set()
        self.failure: PrunescopeError | None = None

    def run(self, done: Callable[[str, str, float], None]) -> None:
        from core import jobs

        last, polls = time.monotonic(), 0
        try:
            while self.todo or self.running:
                if self.failure is None:
                    self._start_ready()
                if not self.running:
                    break
                time.sleep(self.poll_s)
                polls += 1
                if polls % 10 == 0:  # a vanished job process is rare: look for one every 10 polls
                    jobs.refresh(self.ws)
                ids = list(self.running)
                statuses = self.ws.catalog.query(
                    f"SELECT id, status FROM runs WHERE id IN ({', '.join('?' for _ in ids)})", ids)
                for run_id in statuses.loc[~statuses["status"].isin(jobs.ACTIVE), "id"]:
                    cfg, t0 = self.running[run_id]
                    row = jobs.job_status(self.ws, run_id)
                    del self.running[run_id]
                    if row["status"] == "done":
                        self.finished.add(cfg.stage)
                        done(cfg.stage, str(row["message"] or ""), time.monotonic() - t0)
                    elif self.failure is None:
                        self.failure = self._failed(cfg, run_id, row)
                if self.echo and time.monotonic() - last >= HEARTBEAT_S:
                    last = time.monotonic()
                    for run_id, (cfg, t0) in self.running.items():
                        self.echo(f"[{cfg.stage}] job {run_id} running for {last - t0:.0f} s"
                                  f"{_inner_progress(self.ws, run_id)}")
        except KeyboardInterrupt:
            for run_id in list(self.running):
                jobs.cancel(self.ws, run_id)
            raise
        if self.failure is not None:
            raise self.failure
        if self.todo:  # cannot happen with NEEDS naming only stages of STAGES; never return silently
            raise PrunescopeError("demo stages never started (their needs were not met): "
                                  + ", ".join(c.stage for c in self.todo))

    def _start_ready(self) -> None:
        from core import jobs

        for cfg in list(self.todo):
            if len(self.running) >= self.parallel:
                return
            if self.check_needs and not all(need in self.finished for need in NEEDS[cfg.stage]):
                continue
            run_id = jobs.submit(self.ws, "demo", {"stage": cfg.stage, "size": cfg.size, "seed": cfg.seed})
            jobs.start(self.ws, run_id)
            self.todo.remove(cfg)
            self.running[run_id] = (cfg, time.monotonic())
            if self.echo:
                self.echo(f"[{cfg.stage}] started (job {run_id})")

    def _failed(self, cfg: DemoStageConfig, run_id: str, row: dict[str, Any]) -> PrunescopeError:
        if self.echo and row["log_tail"]:
            self.echo(f"[{cfg.stage}] the end of its log:\n{row['log_tail']}")
        return PrunescopeError(f"demo stage {cfg.stage} {row['status']} (job {run_id}): {row['message'] or ''}",
                               hint=f"its log is runs/{run_id}/log.txt; running the demo again resumes it")


def _stage_as_job(ws: Workspace, cfg: DemoStageConfig, echo: Callable[[str], None] | None,
                  poll_s: float = 1.0) -> str:
    """Run one stage as a ``demo`` job and wait for it (its needs must be done); its summary line."""
    lines: list[str] = []
    _DemoJobs(ws, [cfg], 1, echo, poll_s, check_needs=False).run(lambda name, text, seconds: lines.append(text))
    return lines[0]
