"""The deterministic demo world: a small LAION-like pool, benchmarks and detection scenes, offline.

``generate_world(out, size=..., seed=...)`` writes (64x64 RGB JPEG q90 unless said otherwise)::

    world.json                  written last: version, size, seed, counts, parts, layout
    classes.json, templates.json   classes in index order (= sorted folder names); CLIP prompts
    pool/00000.tar ...          img2dataset webdataset shards ({key}.jpg/.json/.txt, completion order,
                                failed downloads missing) + 00000.parquet + 00000_stats.json
    pool_truth.parquet          ground truth per downloaded pool sample (concept, caption_kind, dups, junk)
    laion/img_emb/img_emb_<P>.npy + laion/metadata/metadata_<P>.parquet
                                the pool in clip-retrieval layout; generator-latent vectors, not CLIP
    reference/<folder>/         clean class-balanced photos (plays ImageNet-train)
    benchmarks/val|sketch|rendition/<folder>/, benchmarks/v2/<class index>/*.jpeg,
    benchmarks/hard/images/ + hard.parquet
    detection/images/ + detection/annotations.json   (128x128 scenes, COCO)
    detection-train/images/ + detection-train/annotations.json   (training scenes of the demo detector)

The build is a list of parts (each pool shard, the truth, the LAION layout, each benchmark ...);
each is written completely, then marked done in ``.done/<part>.json``, so an interrupted build
resumes with the unfinished parts, and every random number comes from a seed per part and image, so
the same (size, seed, WORLD_VERSION) gives byte-identical files.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from core.atomic import clean_temp_files, write_json
from core.demo.benchmarks import benchmark_parts
from core.demo.concepts import TEMPLATES
from core.demo.pool import pool_parts
from core.demo.spec import IMAGE_SIZE, SCENE_SIZE, SIZES, Part, World, WorldSize
from core.errors import ConfigError

__all__ = ["SIZES", "WORLD_VERSION", "WorldSize", "generate_world"]

log = logging.getLogger(__name__)

#: Bump when the generator's output changes: a world folder of another version is not reused.
WORLD_VERSION = 2
GENERATOR = "prunescope demo world"
DONE = ".done"
CONFIG_STAMP = "_config.json"

#: Where each dataset lives, relative to the world folder (copied into world.json).
LAYOUT = {
    "classes": "classes.json", "templates": "templates.json", "pool": "pool", "pool_truth": "pool_truth.parquet",
    "laion": "laion", "reference": "reference", "val": "benchmarks/val", "sketch": "benchmarks/sketch",
    "rendition": "benchmarks/rendition", "v2": "benchmarks/v2", "hard": "benchmarks/hard/hard.parquet",
    "detection_images": "detection/images", "detection_annotations": "detection/annotations.json",
    "detection_train_images": "detection-train/images",
    "detection_train_annotations": "detection-train/annotations.json",
}


def generate_world(out: Path, *, size: str = "small", seed: int = 0, progress: bool = False,
                   _size: WorldSize | None = None) -> dict[str, Any]:
    """Build the demo world into ``out``; returns the content of ``out/world.json``.

    Idempotent (a finished world returns at once) and resumable (only unfinished parts are built).

    Args:
        out: the world folder; created if missing. It must be empty, or hold this same world.
        size: one of :data:`SIZES` ("tiny" for tests, "small" for ``make run``, "full").
        seed: the world's seed; same (size, seed, WORLD_VERSION) -> byte-identical files.
        progress: show tqdm bars per part.
        _size: a custom :class:`WorldSize` instead of a named one (tests build smaller worlds).

    Raises:
        ConfigError: unknown size, or ``out`` holds another world (other size/seed/version) or
            unrelated files.
    """
    spec = _size if _size is not None else _named_size(size)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"the demo world seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    world = World(out, spec, seed, progress)
    parts = build_parts(world)
    config = {"version": WORLD_VERSION, "size": spec.name, "seed": seed}
    existing = _read_json(out / "world.json")
    if existing is not None:
        _check_same(existing, config, out)
        if all(_marker(out, p).exists() for p in parts):
            log.info("demo world %s (%s, seed %d) is complete", out, spec.name, seed)
            return existing
    _claim(out, config, adopt=existing is not None)
    start = time.perf_counter()
    for part in parts:
        _run_part(world, part)
    info = _world_info(world, parts)
    write_json(out / "world.json", info)
    log.info("demo world %s (%s, seed %d) built in %.1f s", out, spec.name, seed, time.perf_counter() - start)
    return info


def build_parts(world: World) -> list[Part]:
    """Every part of the world in build order."""
    meta = Part("meta", ("classes.json", "templates.json"), write_meta)
    return [meta, *pool_parts(world), *benchmark_parts(world)]


def write_meta(world: World) -> dict[str, Any]:
    """``classes.json`` (index order = sorted folder names) and ``templates.json``."""
    write_json(world.out / "classes.json", [c.as_json() for c in world.concepts])
    write_json(world.out / "templates.json", list(TEMPLATES))
    return {"classes": len(world.concepts)}


def _named_size(size: str) -> WorldSize:
    if size not in SIZES:
        raise ConfigError(f"unknown demo world size {size!r}; available: {', '.join(SIZES)}")
    return SIZES[size]


def check_world(out: Path, *, size: str, seed: int) -> None:
    """Raise ConfigError when ``out`` already holds another demo world (other size, seed or version); a
    cheap check of the stamp, for callers that fan the build out to other processes."""
    spec = _named_size(size)
    config = {"version": WORLD_VERSION, "size": spec.name, "seed": seed}
    existing = _read_json(Path(out) / "world.json") or _read_json(Path(out) / DONE / CONFIG_STAMP)
    if existing is not None:
        _check_same(existing, config, Path(out))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc})", hint="delete the folder or pick another one") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a demo world description")
    return data


def _check_same(existing: dict[str, Any], config: dict[str, Any], out: Path) -> None:
    found = {k: existing.get(k) for k in config}
    if found != config:
        have = ", ".join(f"{k} {v}" for k, v in found.items())
        want = ", ".join(f"{k} {v}" for k, v in config.items())
        raise ConfigError(f"{out} already holds a demo world ({have}), not the one asked for ({want}); "
                          "pick another folder", hint="use another folder for this world, or delete the old one")


def _claim(out: Path, config: dict[str, Any], *, adopt: bool) -> None:
    """Make sure ``out`` is ours: a new or empty folder, or a world with the same config stamp."""
    stamp = out / DONE / CONFIG_STAMP
    existing = _read_json(stamp)
    if existing is not None:
        _check_same(existing, config, out)
    elif out.exists() and not adopt and any(not p.name.startswith(".") for p in out.iterdir()):
        raise ConfigError(f"{out} is not empty and is not a demo world",
                          hint="pick an empty or new folder for the demo world")
    if existing is None:
        write_json(stamp, config)
    clean_temp_files(out)


def _marker(out: Path, part: Part) -> Path:
    return out / DONE / f"{part.name}.json"


def _run_part(world: World, part: Part) -> dict[str, Any]:
    """Build a part unless it is marked done; returns its counts."""
    marker = _marker(world.out, part)
    done = _read_json(marker)
    if done is not None:
        return done
    for rel in part.outputs:  # leftovers of an interrupted build of this part
        path = world.out / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    start = time.perf_counter()
    counts = part.build(world)
    write_json(marker, counts)
    log.info("demo world: %s done in %.1f s (%s)", part.name, time.perf_counter() - start, counts)
    return counts


def _world_info(world: World, parts: list[Part]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for part in parts:
        for key, value in (_read_json(_marker(world.out, part)) or {}).items():
            counts[key] = counts.get(key, 0) + int(value)
    counts["pool_shards"] = world.size.n_shards
    counts["rendition_classes"] = len(world.rendition_classes)
    return {
        "version": WORLD_VERSION, "size": world.size.name, "seed": world.seed,
        "n_classes": world.size.n_classes, "image_size": IMAGE_SIZE, "scene_size": SCENE_SIZE,
        "counts": counts, "parts": [p.name for p in parts], "layout": LAYOUT,
        "rendition_class_indices": world.rendition_classes, "generator": GENERATOR,
    }
