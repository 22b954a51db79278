"""The labelled image sets of the demo world: reference, the OOD benchmarks and detection scenes.

- ``reference/<folder>/``: clean, class-balanced photos (plays ImageNet-train);
- ``benchmarks/val/<folder>/``: photos from the pool's distribution;
- ``benchmarks/sketch/<folder>/``: line drawings (ImageNet-Sketch);
- ``benchmarks/rendition/<folder>/``: flat cartoons of about 2/3 of the classes (ImageNet-R);
- ``benchmarks/v2/<class index>/*.jpeg``: photos with re-sampled size and placement (ImageNetV2);
- ``benchmarks/hard/``: clutter, occlusion and low contrast, listed in ``hard.parquet``;
- ``detection/``: multi-object scenes with a COCO ``annotations.json``;
- ``detection-train/``: more such scenes (their own random stream) to train the demo detector on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from core.atomic import write_bytes, write_json, write_parquet
from core.demo import draw
from core.demo.captions import make_caption
from core.demo.concepts import BACKGROUND_NAMES, BACKGROUNDS, Concept
from core.demo.spec import (
    DETECTION,
    DETECTION_TRAIN,
    HARD,
    IMAGE_SIZE,
    REFERENCE,
    RENDITION,
    SCENE_SIZE,
    SKETCH,
    V2,
    VAL,
    Part,
    World,
)

S = IMAGE_SIZE
HARD_KINDS = ("clutter", "occlusion", "low_contrast")
Render = Callable[[World, Concept, np.random.Generator], np.ndarray]


def _background(rng: np.random.Generator) -> tuple[str, tuple[int, int, int]]:
    name = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
    return name, BACKGROUNDS[name]


def photo(world: World, concept: Concept, rng: np.random.Generator) -> np.ndarray:
    """A photo from the pool's distribution."""
    _, bg = _background(rng)
    return draw.render_photo(draw.sample_photo(rng, concept.shape, concept.rgb, bg, S), rng, S)


def photo_v2(world: World, concept: Concept, rng: np.random.Generator) -> np.ndarray:
    """A photo with re-sampled size (very small or very large, partly outside the frame)."""
    _, bg = _background(rng)
    radius = (0.13, 0.2) if rng.random() < 0.5 else (0.42, 0.52)
    params = draw.sample_photo(rng, concept.shape, concept.rgb, bg, S, radius=radius, spill=0.25)
    return draw.render_photo(params, rng, S)


def sketch(world: World, concept: Concept, rng: np.random.Generator) -> np.ndarray:
    return draw.render_sketch(concept.shape, concept.rgb, draw.sample_pose(rng, S), rng, S)


def cartoon(world: World, concept: Concept, rng: np.random.Generator) -> np.ndarray:
    return draw.render_cartoon(concept.shape, concept.rgb, draw.sample_pose(rng, S), rng, S)


def write_class_folders(world: World, rel: str, stream: int, render: Render, classes: list[Concept],
                        per_class: int, *, ext: str = ".jpg", numeric_folders: bool = False) -> int:
    """Write ``<rel>/<folder>/<n:05d><ext>`` for every class; returns the number of images."""
    root = world.out / rel
    items = [(c, n) for c in classes for n in range(per_class)]
    for c, n in world.bar(items, rel):
        pixels = render(world, c, world.rng(stream, c.index, n))
        folder = str(c.index) if numeric_folders else c.folder
        write_bytes(root / folder / f"{n:05d}{ext}", draw.encode_jpeg(pixels))
    return len(items)


# ----------------------------------------------------------------------------------------------
# Hard: clutter, occlusion, low contrast


def _clutter(world: World, concept: Concept, rng: np.random.Generator, bg: tuple[int, int, int]) -> np.ndarray:
    """The object among 3-5 smaller objects of other classes."""
    img = draw.background(rng, S, bg)
    others = [c for c in world.concepts if c.index != concept.index] or [concept]
    for _ in range(int(rng.integers(3, 6))):
        other = others[int(rng.integers(len(others)))]
        pose = draw.sample_pose(rng, S, radius=(0.10, 0.17), spill=0.3)
        img, _ = draw.paint(img, other.shape, draw.jitter_colour(rng, other.rgb), pose, rng)
    p = draw.sample_photo(rng, concept.shape, concept.rgb, bg, S, radius=(0.2, 0.3))
    img, _ = draw.paint(img, p.shape, p.rgb, p.pose, rng)
    return draw.finish(img, rng, p.noise)


def _occlusion(world: World, concept: Concept, rng: np.random.Generator, bg: tuple[int, int, int]) -> np.ndarray:
    """The object with a textured patch over 25-55% of its box."""
    p = draw.sample_photo(rng, concept.shape, concept.rgb, bg, S, radius=(0.26, 0.38))
    img, mask = draw.paint(draw.background(rng, S, bg), p.shape, p.rgb, p.pose, rng)
    x, y, w, h = draw.mask_box(mask) or (0, 0, S, S)
    pw, ph = w * rng.uniform(0.45, 0.7), h * rng.uniform(0.55, 0.8)
    x0, y0 = x + rng.uniform(0, w - pw), y + rng.uniform(0, h - ph)
    rect = np.zeros((S, S), np.float32)
    rect[int(y0): int(round(y0 + ph)), int(x0): int(round(x0 + pw))] = 1.0
    patch = draw.background(rng, S, _background(rng)[1], texture=24)
    return draw.finish(draw.composite(img, patch, rect), rng, p.noise)


def _low_contrast(world: World, concept: Concept, rng: np.random.Generator,
                  bg: tuple[int, int, int]) -> np.ndarray:
    """The object's colour pulled 60-78% of the way towards the background's, with more noise."""
    p = draw.sample_photo(rng, concept.shape, concept.rgb, bg, S)
    base = np.asarray(bg, np.float64)
    r, g, b = (float(v) for v in base + rng.uniform(0.22, 0.4) * (np.asarray(p.rgb) - base))
    img, _ = draw.paint(draw.background(rng, S, bg, texture=8), p.shape, (r, g, b), p.pose, rng)
    return draw.finish(img, rng, rng.uniform(5.0, 10.0))


HardRender = Callable[[World, Concept, np.random.Generator, tuple[int, int, int]], np.ndarray]
HARD_RENDER: dict[str, HardRender] = {"clutter": _clutter, "occlusion": _occlusion, "low_contrast": _low_contrast}


def write_hard(world: World) -> dict[str, Any]:
    """``benchmarks/hard/images/<n:06d>.jpg`` + ``hard.parquet`` (path, caption, label, kind)."""
    root = world.out / "benchmarks" / "hard"
    items = [(c, n) for c in world.concepts for n in range(world.size.bench_per_class)]
    rows = []
    for number, (c, n) in enumerate(world.bar(items, "benchmarks/hard", total=len(items))):
        rng = world.rng(HARD, c.index, n)
        kind = HARD_KINDS[number % len(HARD_KINDS)]
        bg_name, bg = _background(rng)
        pixels = HARD_RENDER[kind](world, c, rng, bg)
        path = f"images/{number:06d}.jpg"
        write_bytes(root / path, draw.encode_jpeg(pixels))
        caption = make_caption(rng, "correct", c, bg_name, world.concepts)
        rows.append({"path": path, "caption": caption, "label": c.index, "kind": kind})
    write_parquet(root / "hard.parquet", pd.DataFrame(rows))
    return {"hard": len(rows)}


# ----------------------------------------------------------------------------------------------
# Detection scenes


def category_id(index: int) -> int:
    """COCO-style category id of a class: 1-based with a gap after every 5 (not contiguous)."""
    return index + 1 + index // 5


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection of two [x, y, w, h] boxes over the smaller one's area (1 = one inside the other)."""
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    return ix * iy / min(a[2] * a[3], b[2] * b[3])


def _scene_poses(rng: np.random.Generator, n: int) -> list[draw.Pose]:
    """Up to n poses whose rough boxes overlap little (< 25% of the smaller): some overlap, no pile-ups."""
    poses: list[draw.Pose] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _attempt in range(30):
            pose = draw.sample_pose(rng, SCENE_SIZE, radius=(0.07, 0.2))
            box = (pose.cx - pose.radius, pose.cy - pose.radius, 2 * pose.radius, 2 * pose.radius)
            if all(_overlap(box, b) < 0.25 for b in boxes):
                poses.append(pose)
                boxes.append(box)
                break
    return poses


def _scene(world: World, i: int, stream: int = DETECTION) -> tuple[np.ndarray, list[tuple[Concept, np.ndarray]]]:
    """A 128x128 scene of 2-5 objects; returns the pixels and each object's (concept, own mask)."""
    rng = world.rng(stream, i)
    _, bg = _background(rng)
    img = draw.background(rng, SCENE_SIZE, bg)
    objects = []
    for pose in _scene_poses(rng, int(rng.integers(2, 6))):
        c = world.concepts[int(rng.integers(len(world.concepts)))]
        img, mask = draw.paint(img, c.shape, draw.jitter_colour(rng, c.rgb), pose, rng)
        objects.append((c, mask))
    return draw.finish(img, rng, rng.uniform(2.0, 8.0)), objects


def _write_scenes(world: World, rel: str, stream: int, n: int, description: str) -> dict[str, int]:
    """``<rel>/images/<n:06d>.jpg`` + ``<rel>/annotations.json`` (COCO; boxes tight, amodal)."""
    root = world.out / rel
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in world.bar(range(n), rel):
        pixels, objects = _scene(world, i, stream)
        name = f"{i:06d}.jpg"
        write_bytes(root / "images" / name, draw.encode_jpeg(pixels))
        images.append({"id": i + 1, "file_name": name, "width": SCENE_SIZE, "height": SCENE_SIZE})
        for c, mask in objects:
            box = draw.mask_box(mask)
            if box is None:
                continue
            x, y, w, h = box
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": category_id(c.index),
                "bbox": [x, y, w, h], "area": round(float(mask.sum()), 2), "iscrowd": 0,
                "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    categories = [{"id": category_id(c.index), "name": c.name, "supercategory": c.shape} for c in world.concepts]
    write_json(root / "annotations.json", {
        "info": {"description": description, "version": "1"},
        "licenses": [], "images": images, "annotations": annotations, "categories": categories,
    })
    return {"images": len(images), "boxes": len(annotations)}


def write_detection(world: World) -> dict[str, Any]:
    """``detection/images/<n:06d>.jpg`` + ``detection/annotations.json`` (COCO; boxes tight, amodal)."""
    counts = _write_scenes(world, "detection", DETECTION, world.size.detection_scenes,
                           "prunescope demo world detection scenes")
    return {"detection_images": counts["images"], "detection_boxes": counts["boxes"]}


#: Folder of the demo detector's training scenes, relative to the world folder.
DETECTION_TRAIN_DIR = "detection-train"


def write_detection_train(world: World) -> dict[str, Any]:
    """``detection-train/images/<n:06d>.jpg`` + ``annotations.json``: the demo detector's training scenes.

    Drawn like the evaluation scenes from their own random stream (``DETECTION_TRAIN``), so no training
    scene is an evaluation scene and the evaluation scenes are unchanged. Idempotent: a folder whose
    ``annotations.json`` (written last) already lists ``detection_train_scenes`` images is kept as is,
    so it can be called on a world built before this split existed.
    """
    n = world.size.detection_train_scenes
    done = world.out / DETECTION_TRAIN_DIR / "annotations.json"
    if done.is_file():
        try:
            coco = json.loads(done.read_text(encoding="utf-8"))
            if len(coco["images"]) == n:
                return {"detection_train_images": n, "detection_train_boxes": len(coco["annotations"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # torn or foreign: rebuilt below
    counts = _write_scenes(world, DETECTION_TRAIN_DIR, DETECTION_TRAIN, n,
                           "prunescope demo world detection training scenes")
    return {"detection_train_images": counts["images"], "detection_train_boxes": counts["boxes"]}


# ----------------------------------------------------------------------------------------------


def benchmark_parts(world: World) -> list[Part]:
    """The labelled sets' parts, each a folder written completely then marked done."""
    size = world.size
    concepts = world.concepts
    rendition = [concepts[i] for i in world.rendition_classes]

    def folder_part(name: str, rel: str, stream: int, render: Render, classes: list[Concept], per_class: int,
                    **kw: Any) -> Part:
        return Part(name, (rel,), lambda w: {name: write_class_folders(w, rel, stream, render, classes,
                                                                       per_class, **kw)})

    return [
        folder_part("reference", "reference", REFERENCE, photo, concepts, size.reference_per_class),
        folder_part("val", "benchmarks/val", VAL, photo, concepts, size.bench_per_class),
        folder_part("sketch", "benchmarks/sketch", SKETCH, sketch, concepts, size.bench_per_class),
        folder_part("rendition", "benchmarks/rendition", RENDITION, cartoon, rendition, size.bench_per_class),
        folder_part("v2", "benchmarks/v2", V2, photo_v2, concepts, size.bench_per_class, ext=".jpeg",
                    numeric_folders=True),
        Part("hard", ("benchmarks/hard",), write_hard),
        Part("detection", ("detection",), write_detection),
        Part("detection-train", (DETECTION_TRAIN_DIR,), write_detection_train),
    ]
