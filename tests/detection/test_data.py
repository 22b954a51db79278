"""Detection data: COCO / VOC readers, the corrupted view and corrupted trees on disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.detection.data import (
    VOC_CLASSES,
    CorruptedDetection,
    is_corrupted_tree,
    open_corrupted_tree,
    open_detection,
    read_coco,
    read_voc,
    write_corrupted_detection,
)
from core.errors import ConfigError, DataError, MissingFileError


def _picture(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[10:30, 8:30] = (200, 40, 40)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def make_coco(root: Path, ext: str = ".png") -> Path:
    """3 images (48x40), categories with non-contiguous ids 1, 7, 90; good, crowd and bad boxes."""
    for i in range(3):
        _picture(root / "images" / f"im{i}{ext}", i)
    ann = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [8, 10, 22, 20], "area": 300.0, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 90, "bbox": [0, 0, 5, 6], "iscrowd": 1},
        {"id": 12, "image_id": 2, "category_id": 1, "bbox": [40, 30, 20, 20], "iscrowd": 0},   # clipped
        {"id": 13, "image_id": 2, "category_id": 1, "bbox": [5, 5, 0, 4], "iscrowd": 0},      # w = 0
        {"id": 14, "image_id": 2, "category_id": 1, "bbox": [60, 50, 4, 4], "iscrowd": 0},    # outside
        {"id": 15, "image_id": 99, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0},     # unknown image
        {"id": 16, "image_id": 3, "category_id": 5, "bbox": [1, 1, 4, 4], "iscrowd": 0},      # unknown cat
        {"id": 17, "image_id": 3, "category_id": 1, "bbox": [1, 1, -3, 4], "iscrowd": 0},     # h < 0
        {"id": 18, "image_id": 3, "category_id": 7},                                            # no bbox
    ]
    data = {
        "images": [{"id": i + 1, "file_name": f"im{i}{ext}", "width": 48, "height": 40} for i in range(3)],
        "annotations": ann,
        "categories": [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 7, "name": "train"}],
    }
    path = root / "annotations.json"
    path.write_text(json.dumps(data))
    return path


def test_read_coco_boxes_ids_crowd_and_skips(tmp_path: Path) -> None:
    ds = read_coco(make_coco(tmp_path / "set"))
    assert ds.name == "set" and ds.images_dir == tmp_path / "set" / "images" and len(ds) == 3
    assert [c["id"] for c in ds.categories] == [1, 7, 90]
    first, second, third = ds.images
    np.testing.assert_allclose(first.boxes, [[8, 10, 30, 30], [0, 0, 5, 6]])
    assert first.category_ids.tolist() == [7, 90] and first.iscrowd.tolist() == [False, True]
    assert first.areas.tolist() == [300.0, 30.0]  # the given area, else the box's
    np.testing.assert_allclose(second.boxes, [[40, 30, 48, 40]])  # clipped to the 48x40 image
    assert len(third) == 0  # images without objects are kept
    assert ds.skipped == {"box_empty": 2, "box_outside_image": 1, "unknown_image": 1, "unknown_category": 1,
                          "bad_annotation": 1}
    assert ds.repaired == {"box_clipped": 1}
    assert ds.load_image(0).size == (48, 40) and ds.load_image(0).mode == "RGB"


def test_coco_gt_round_trips_through_pycocotools(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    ds = read_coco(make_coco(tmp_path / "set"))
    gt = ds.coco_gt()
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    assert sorted(coco.getCatIds()) == [1, 7, 90] and len(coco.getAnnIds()) == ds.n_boxes == 3
    crowd = coco.loadAnns(coco.getAnnIds(iscrowd=True))
    assert [a["bbox"] for a in crowd] == [[0.0, 0.0, 5.0, 6.0]] and crowd[0]["category_id"] == 90
    # the written ground truth reads back to the same boxes
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    again = read_coco(path, images_dir=ds.images_dir)
    for a, b in zip(ds.images, again.images, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes)
        assert a.category_ids.tolist() == b.category_ids.tolist() and a.iscrowd.tolist() == b.iscrowd.tolist()


def test_read_coco_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError):
        read_coco(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a readable JSON"):
        read_coco(bad)
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DataError, match="categories"):
        read_coco(bad)


def test_subset_and_with_images_dir(tmp_path: Path) -> None:
    ds = read_coco(make_coco(tmp_path / "set"))
    sub = ds.subset(2)
    assert len(sub) == 2 and sub.images[1] is ds.images[1] and len(ds) == 3
    other = ds.with_images_dir(tmp_path / "elsewhere")
    assert other.images == ds.images and other.images_dir == tmp_path / "elsewhere"
    with pytest.raises(DataError, match="im0.png"):
        other.load_image(0)
    with pytest.raises(ConfigError):
        ds.subset(0)


def make_voc(root: Path) -> Path:
    """VOCdevkit/VOC2007 with 2 val images; one difficult object and one unknown class."""
    voc = root / "VOCdevkit" / "VOC2007"
    objects = {
        "000001": [("dog", 1, 2, 20, 30, 0), ("person", 5, 5, 10, 10, 1)],
        "000002": [("unicorn", 1, 1, 5, 5, 0), ("tvmonitor", 3, 4, 40, 40, 0)],
    }
    for stem, objs in objects.items():
        _picture(voc / "JPEGImages" / f"{stem}.jpg", int(stem))
        xml = "".join(
            f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>"
            for n, x0, y0, x1, y1, d in objs
        )
        (voc / "Annotations").mkdir(parents=True, exist_ok=True)
        (voc / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>48</width><height>40</height>"
            f"<depth>3</depth></size>{xml}</annotation>")
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "val.txt").write_text("000001\n000002\n")
    return root / "VOCdevkit"


def test_read_voc_converts_boxes_and_difficult(tmp_path: Path) -> None:
    devkit = make_voc(tmp_path)
    ds = read_voc(devkit, "val")
    assert ds.name == "voc2007_val" and len(ds) == 2 and len(ds.categories) == 20
    assert ds.categories[0] == {"id": 1, "name": "aeroplane"} and ds.categories[-1]["name"] == "tvmonitor"
    a, b = ds.images
    np.testing.assert_allclose(a.boxes, [[0, 1, 20, 30], [4, 4, 10, 10]])  # 1-based -> 0-based
    assert a.category_ids.tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert a.iscrowd.tolist() == [False, True]
    np.testing.assert_allclose(b.boxes, [[2, 3, 40, 40]])
    assert b.category_ids.tolist() == [20] and ds.skipped == {"unknown_category": 1}
    assert (a.image_id, a.file_name) == (1, "000001.jpg") and ds.load_image(1).size == (48, 40)
    # the year folder itself, and auto-detection, give the same set
    assert read_voc(devkit / "VOC2007").images[1].file_name == "000002.jpg"
    assert len(open_detection(devkit)) == 2 and len(open_detection(tmp_path)) == 2
    with pytest.raises(MissingFileError, match="available splits: val"):
        read_voc(devkit, "train")
    with pytest.raises(MissingFileError):
        read_voc(devkit, year="2012")
    gt = ds.coco_gt()
    assert [x["iscrowd"] for x in gt["annotations"]] == [0, 1, 0]


def test_open_detection_formats(tmp_path: Path) -> None:
    path = make_coco(tmp_path / "set")
    assert len(open_detection(path)) == 3 and len(open_detection(path.parent)) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="neither COCO"):
        open_detection(tmp_path / "empty")
    with pytest.raises(MissingFileError):
        open_detection(tmp_path / "missing")


def test_corrupted_view_keeps_boxes_changes_pixels_deterministic(tmp_path: Path) -> None:
    ds = read_coco(make_coco(tmp_path / "set"))
    view = CorruptedDetection(ds, "gaussian_noise", 3, seed=1)
    pixels, im = view[0]
    clean = np.asarray(ds.load_image(0))
    assert pixels.shape == clean.shape and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - clean).mean() > 5
    assert im is ds.images[0]
    np.testing.assert_array_equal(view[0][0], pixels)  # same seed, same bytes, order-independent
    assert not np.array_equal(CorruptedDetection(ds, "gaussian_noise", 3, seed=2)[0][0], pixels)
    assert not np.array_equal(view[1][0], np.asarray(ds.load_image(1)))
    with pytest.raises(ConfigError):
        CorruptedDetection(ds, "gausian_noise", 3)
    with pytest.raises(ConfigError):
        CorruptedDetection(ds, "fog", 6)


def test_write_corrupted_detection_resumes_and_matches_view(tmp_path: Path) -> None:
    ds = read_coco(make_coco(tmp_path / "set"))
    out = tmp_path / "tree"
    report = write_corrupted_detection(ds, out, corruptions=["gaussian_noise", "contrast"], severities=[1, 5],
                                       seed=3)
    assert (report.n_images, report.written, report.skipped, report.unreadable) == (3, 12, 0, 0)
    assert "12 files written" in report.summary() and is_corrupted_tree(out)
    tree = open_corrupted_tree(out, "contrast", 5)
    assert [im.file_name for im in tree.images] == [im.file_name for im in ds.images]
    for a, b in zip(tree.images, ds.images, strict=True):
        np.testing.assert_allclose(a.boxes, b.boxes)
        assert a.iscrowd.tolist() == b.iscrowd.tolist()
    # PNG sources are written losslessly: the files equal the on-the-fly view
    view = CorruptedDetection(ds, "gaussian_noise", 1, seed=3)
    np.testing.assert_array_equal(np.asarray(open_corrupted_tree(out, "gaussian_noise", 1).load_image(2)),
                                  view[2][0])
    # resume: a removed file and a torn file are rewritten, the rest kept untouched
    victim, torn = out / "contrast" / "1" / "im1.png", out / "gaussian_noise" / "5" / "im0.png"
    victim.unlink()
    torn.write_bytes(torn.read_bytes()[:50])
    kept = out / "contrast" / "5" / "im2.png"
    os.utime(kept, (1, 1))
    again = write_corrupted_detection(ds, out, corruptions=["gaussian_noise", "contrast"], severities=[1, 5],
                                      seed=3)
    assert (again.written, again.skipped) == (2, 10)
    assert kept.stat().st_mtime == 1 and victim.is_file()
    assert Image.open(torn).size == (48, 40)
    assert not list(out.rglob(".*tmp-*"))


def test_write_corrupted_detection_counts_unreadable_and_jpeg(tmp_path: Path) -> None:
    ds = read_coco(make_coco(tmp_path / "set", ext=".jpg"))
    (ds.images_dir / "im1.jpg").write_bytes(b"\xff\xd8 broken")
    report = write_corrupted_detection(ds, tmp_path / "tree", corruptions=["fog"], severities=[2])
    assert (report.written, report.unreadable, report.unreadable_files) == (2, 1, ["im1.jpg"])
    written = tmp_path / "tree" / "fog" / "2" / "im0.jpg"
    assert written.read_bytes()[:2] == b"\xff\xd8" and not (tmp_path / "tree" / "fog" / "2" / "im1.jpg").exists()
    with pytest.raises(MissingFileError, match="no fog severity 3"):
        open_corrupted_tree(tmp_path / "tree", "fog", 3)
    with pytest.raises(MissingFileError):
        open_corrupted_tree(tmp_path / "set" / "images", "fog", 2)
