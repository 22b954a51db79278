"""webdataset: grouping by key, offsets for seek+read, json extras, shard order, broken shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import DataError, PathOutsideWorkspace
from core.sources import IssueReport, SampleError
from core.sources.webdataset import WebDatasetSource, sample_key

from .conftest import image_bytes, make_webdataset, wds_sample, write_tar


def scan(root: Path, verify: bool = True) -> tuple[list[dict], IssueReport, WebDatasetSource]:
    source = WebDatasetSource(root)
    report = IssueReport()
    return list(source.scan(report, verify=verify)), report, source


def test_sample_key() -> None:
    assert sample_key("000001.jpg") == ("000001", "jpg")
    assert sample_key("dir/000001.seg.PNG") == ("dir/000001", "seg.png")


def test_img2dataset_shards(tmp_path: Path) -> None:
    images = make_webdataset(tmp_path / "wds", shards=(0, 1), per_shard=3)
    rows, report, source = scan(tmp_path / "wds")
    assert report.n_skipped == 0 and len(rows) == 6
    row = rows[4]
    assert row["id"] == "000010001" and row["locator"] == "00001.tar"
    assert row["caption"] == "shard 1 sample 1"
    assert row["url"] == "https://x/000010001.jpg" and row["width"] == 16
    assert "nested" not in row  # only scalar json fields
    assert source.read_bytes(row) == images["000010001"]
    assert row["size"] == len(images["000010001"])
    assert source.load_image(row).size == (16, 12)


def test_shards_sorted_numerically(tmp_path: Path) -> None:
    for shard in (10, 9):
        write_tar(tmp_path / f"{shard}.tar", wds_sample(f"s{shard}"))
    rows, _, _ = scan(tmp_path)
    assert [r["locator"] for r in rows] == ["9.tar", "10.tar"]


def test_single_tar_uri_and_unsorted_keys(tmp_path: Path) -> None:
    members = wds_sample("b") + wds_sample("a", ext="png", image=image_bytes("PNG")) + wds_sample("c", ext="webp",
                                                                                                   image=image_bytes("WEBP"))
    tar = write_tar(tmp_path / "one.tar", members)
    rows, _, source = scan(tar)
    assert [r["id"] for r in rows] == ["b", "a", "c"]  # completion order is kept
    assert all(r["locator"] == "one.tar" for r in rows)
    assert source.load_image(rows[2]).mode == "RGB"


def test_json_caption_and_cls_label(tmp_path: Path) -> None:
    members = [("k.jpg", image_bytes()), ("k.json", b'{"caption": "from json", "id": 5, "Score": 0.5}'), ("k.cls", b"7\n")]
    rows, _, _ = scan(write_tar(tmp_path / "t.tar", members))
    assert rows[0]["caption"] == "from json" and rows[0]["label"] == 7
    assert rows[0]["src_id"] == 5 and rows[0]["score"] == 0.5


def test_bad_cls_is_bad_label(tmp_path: Path) -> None:
    rows, report, _ = scan(write_tar(tmp_path / "t.tar", [("k.jpg", image_bytes()), ("k.cls", b"dog")]))
    assert rows == [] and report.skipped["bad_label"] == 1


def test_without_verify_images_are_not_read(tmp_path: Path) -> None:
    write_tar(tmp_path / "t.tar", [("k.jpg", b"not decoded"), ("k.txt", b"c")])
    rows, report, _ = scan(tmp_path, verify=False)
    assert len(rows) == 1 and report.n_skipped == 0 and rows[0]["width"] is None


def test_read_bytes_errors(tmp_path: Path) -> None:
    make_webdataset(tmp_path / "wds", shards=(0,), per_shard=1)
    rows, _, source = scan(tmp_path / "wds")
    row = dict(rows[0])
    with pytest.raises(SampleError, match="broken_tar_member"):
        source.read_bytes({**row, "offset": 10**6})
    with pytest.raises(SampleError, match="missing_file"):
        source.read_bytes({**row, "locator": "gone.tar"})
    with pytest.raises(PathOutsideWorkspace):
        source.read_bytes({**row, "locator": "../outside.tar"})


def test_folder_without_tars(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no .tar shards"):
        scan(tmp_path / "d")
