"""The demo world's detection training scenes (``detection-train/``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from core.demo.benchmarks import DETECTION_TRAIN_DIR, write_detection, write_detection_train
from core.demo.spec import SIZES, World, WorldSize
from core.demo.world import generate_world

MICRO = WorldSize("micro-det", n_classes=5, pool=40, shard_size=20, reference_per_class=1, bench_per_class=1,
                  detection_scenes=5, laion_partitions=1, detection_train_scenes=9)


def hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    w = World(tmp_path_factory.mktemp("w") / "demo", MICRO, seed=1)
    write_detection(w)
    write_detection_train(w)
    return w


def test_sizes_have_more_training_than_evaluation_scenes() -> None:
    for size in SIZES.values():
        assert size.detection_train_scenes >= 5 * size.detection_scenes


def test_training_scenes_are_valid_coco(world: World) -> None:
    root = world.out / DETECTION_TRAIN_DIR
    coco = json.loads((root / "annotations.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == len(coco["images"]) == MICRO.detection_train_scenes  # ids unique
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    assert len({im["file_name"] for im in images.values()}) == len(images)
    eval_cats = json.loads((world.out / "detection" / "annotations.json").read_text())["categories"]
    assert coco["categories"] == eval_cats
    cat_ids = {c["id"] for c in coco["categories"]}
    per_image: dict[int, int] = {}
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["category_id"] in cat_ids and a["iscrowd"] == 0
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert min(per_image.values()) >= 1 and max(per_image.values()) <= 5
    for im in images.values():
        with Image.open(root / "images" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"]) == (128, 128)


def test_training_scenes_are_not_evaluation_scenes(world: World) -> None:
    train = set(hashes(world.out / DETECTION_TRAIN_DIR / "images").values())
    evaluation = set(hashes(world.out / "detection" / "images").values())
    assert train and evaluation and not train & evaluation


def test_deterministic_and_idempotent(world: World, tmp_path: Path) -> None:
    again = World(tmp_path / "again", MICRO, seed=1)
    counts = write_detection_train(again)
    assert hashes(again.out / DETECTION_TRAIN_DIR) == hashes(world.out / DETECTION_TRAIN_DIR)
    assert counts["detection_train_images"] == MICRO.detection_train_scenes
    before = {p: p.stat().st_mtime_ns for p in (again.out / DETECTION_TRAIN_DIR).rglob("*")}
    assert write_detection_train(again) == counts
    assert {p: p.stat().st_mtime_ns for p in (again.out / DETECTION_TRAIN_DIR).rglob("*")} == before
    other = World(tmp_path / "other", MICRO, seed=2)
    write_detection_train(other)
    assert hashes(other.out / DETECTION_TRAIN_DIR) != hashes(world.out / DETECTION_TRAIN_DIR)


def test_generate_world_builds_the_split_and_adds_it_to_an_older_world(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    info = generate_world(out, seed=1, _size=MICRO)
    assert "detection-train" in info["parts"]
    assert info["counts"]["detection_train_images"] == MICRO.detection_train_scenes
    assert info["layout"]["detection_train_annotations"] == "detection-train/annotations.json"
    built = hashes(out / DETECTION_TRAIN_DIR)
    # a world built before the split existed: the folder and its marker missing; the rest is untouched
    shutil.rmtree(out / DETECTION_TRAIN_DIR)
    (out / ".done" / "detection-train.json").unlink()
    evaluation = hashes(out / "detection")
    assert generate_world(out, seed=1, _size=MICRO)["counts"] == info["counts"]
    assert hashes(out / DETECTION_TRAIN_DIR) == built and hashes(out / "detection") == evaluation
