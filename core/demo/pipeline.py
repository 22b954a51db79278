"""``prunescope demo``: build the demo world into a workspace and run every stage on it.

The demo is a chain of named stages; each is idempotent (a second call skips what is done) and
resumable (a crashed stage redoes only its unfinished part). Later stages (embedding, clustering,
pruning, training, evaluation) append themselves to :data:`STAGES`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.datasets import list_datasets, register_dataset
from core.errors import ConfigError
from core.reference import load_reference_results
from core.runs import recorded_run
from core.workspace import Workspace

log = logging.getLogger(__name__)

DEMO_FOLDER = "demo"


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
    DemoDataset("sketch", "image_folder", "benchmarks/sketch", "benchmark", {"label_from": "classes_file"},
                "line drawings"),
    DemoDataset("rendition", "image_folder", "benchmarks/rendition", "benchmark", {"label_from": "classes_file"},
                "flat cartoon renditions of a subset of classes"),
    DemoDataset("v2", "image_folder", "benchmarks/v2", "benchmark", {"label_from": "numeric"},
                "re-sampled pose and size, ImageNetV2-style numeric folders"),
    DemoDataset("hard", "parquet", "benchmarks/hard/hard.parquet", "benchmark", {}, "clutter, occlusion, low contrast"),
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
        options = dict(ds.options)
        if options.get("label_from") == "classes_file":
            options["classes_file"] = str(ctx.world / "classes.json")
        info = register_dataset(ctx.ws, ds.name, ds.kind, uri, role=ds.role, options=options, replace=True,
                                description=ds.description, progress=ctx.progress)
        done.append(f"{info.name} {info.n_samples}")
    return "registered " + (", ".join(done) if done else "nothing new (all demo datasets present)")


def stage_reference_results(ctx: DemoContext) -> str:
    return f"reference results: {load_reference_results(ctx.ws)} published rows"


STAGES: list[tuple[str, Stage]] = [
    ("generate", stage_generate),
    ("register", stage_register),
    ("reference_results", stage_reference_results),
]


def run_demo(ws: Workspace, *, size: str = "small", seed: int = 0, progress: bool = False) -> list[str]:
    """Run every demo stage in order; returns one summary line per stage (with its wall time)."""
    from core.demo.world import SIZES

    if size not in SIZES:
        raise ConfigError(f"unknown demo size {size!r}; available: {', '.join(SIZES)}")
    ctx = DemoContext(ws, ws.dir("sources", DEMO_FOLDER), size, seed, progress)
    lines = []
    with recorded_run(ws, "demo", {"size": size, "seed": seed}, seed=seed):
        for name, stage in STAGES:
            t0 = time.perf_counter()
            text = stage(ctx)
            lines.append(f"[{name}] {text} ({time.perf_counter() - t0:.1f} s)")
            log.info(lines[-1])
    return lines
