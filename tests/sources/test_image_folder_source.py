"""image_folder: label orders (ImageNetV2 integers, classes files), captions, flat folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import DataError, MissingFileError
from core.sources import IssueReport
from core.sources.image_folder import ImageFolderSource, label_map

from .conftest import image_bytes, make_image_folder, write


def scan(root: Path, **options: object) -> tuple[list[dict], IssueReport, ImageFolderSource]:
    source = ImageFolderSource(root, **options)
    report = IssueReport()
    return list(source.scan(report)), report, source


def test_imagenet_v2_numeric_folders_label_by_value(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "v2", classes=[str(i) for i in range(11)], per_class=1)
    rows, _, source = scan(root)
    by_folder = {r["class_name"]: r["label"] for r in rows}
    assert by_folder == {str(i): i for i in range(11)}  # "10" is 10, not 2 as text order would give
    assert source.classes() == [str(i) for i in range(11)]


def test_text_folders_sorted(tmp_path: Path) -> None:
    rows, _, source = scan(make_image_folder(tmp_path / "f", classes=["zebra", "ant"], per_class=1))
    assert source.classes() == ["ant", "zebra"]
    assert {r["class_name"]: r["label"] for r in rows} == {"ant": 0, "zebra": 1}


@pytest.mark.parametrize("suffix", [".txt", ".json"])
def test_classes_file_subset_keeps_full_label_space(tmp_path: Path, suffix: str) -> None:
    full = ["n001", "n002", "n003", "n004", "n005"]
    classes_file = tmp_path / f"classes{suffix}"
    classes_file.write_text(json.dumps(full) if suffix == ".json" else "\n".join(f"{w} name" for w in full))
    root = make_image_folder(tmp_path / "r", classes=["n004", "n002"], per_class=1)
    rows, _, source = scan(root, classes_file=str(classes_file))
    assert {r["class_name"]: r["label"] for r in rows} == {"n002": 1, "n004": 3}
    assert source.classes() == full


def test_folder_missing_from_classes_file_is_bad_label(tmp_path: Path) -> None:
    (tmp_path / "c.txt").write_text("a\n")
    rows, report, _ = scan(make_image_folder(tmp_path / "r", classes=["a", "b"], per_class=1),
                           label_from="classes_file", classes_file=str(tmp_path / "c.txt"))
    assert len(rows) == 1 and report.skipped["bad_label"] == 1


def test_captions_and_flat_folder(tmp_path: Path) -> None:
    write(tmp_path / "flat" / "a.png", image_bytes("PNG"))
    write(tmp_path / "flat" / "a.txt", b"  hello  \n")
    write(tmp_path / "flat" / "b.webp", image_bytes("WEBP"))
    rows, _, source = scan(tmp_path / "flat")
    assert [(r["id"], r["caption"], r["label"]) for r in rows] == [("a.png", "hello", None), ("b.webp", None, None)]
    assert source.classes() is None


def test_label_from_none_reads_every_subfolder(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "r", classes=["x", "y"], per_class=2)
    write(root / "top.jpg", image_bytes())
    rows, _, source = scan(root, label_from="none")
    assert len(rows) == 5 and all(r["label"] is None for r in rows)
    assert source.classes() is None


def test_label_map_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not an integer"):
        label_map(["1", "b"], "numeric")
    with pytest.raises(DataError, match="needs the classes_file"):
        label_map(["a"], "classes_file")
    with pytest.raises(MissingFileError):
        label_map(["a"], "classes_file", tmp_path / "nope.txt")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        label_map(["a"], "classes_file", bad)


def test_no_verify_skips_decoding(tmp_path: Path) -> None:
    write(tmp_path / "r" / "bad.jpg", b"not an image")
    source = ImageFolderSource(tmp_path / "r")
    rows = list(source.scan(IssueReport(), verify=False))
    assert len(rows) == 1 and rows[0]["width"] is None
