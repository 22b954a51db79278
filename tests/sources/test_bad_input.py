"""Bad input: every defect is a counted skip with a reason, or one DataError line; never a traceback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.datasets import dataset_issues, dataset_row, list_datasets, open_dataset, register_dataset
from core.errors import AlreadyExists, DataError, MissingFileError, PathOutsideWorkspace
from core.sources import SOURCES, IssueReport, SampleError
from core.workspace import Workspace, safe_join

from .conftest import (
    bomb_png,
    corrupt_jpeg,
    corrupt_png,
    image_bytes,
    make_image_folder,
    make_laion,
    make_webdataset,
    truncated_jpeg,
    wds_sample,
    write,
    write_parquet,
    write_tar,
)


def scan(kind: str, uri: Path, **options: Any) -> tuple[list[dict[str, Any]], IssueReport]:
    entry = SOURCES.entry(kind)
    source = entry.obj(uri, **entry.validate_params(options))
    report = IssueReport()
    return list(source.scan(report)), report


# -- one bad image beside a good one, in each container that holds image bytes ----------------------------
def folder_with(tmp: Path, bad: bytes) -> Path:
    write(tmp / "f" / "good.jpg", image_bytes())
    write(tmp / "f" / "bad.jpg", bad)
    return tmp / "f"


def tar_with(tmp: Path, bad: bytes) -> Path:
    write_tar(tmp / "w" / "00000.tar", wds_sample("good") + wds_sample("bad", image=bad))
    return tmp / "w"


def parquet_with(tmp: Path, bad: bytes) -> Path:
    write(tmp / "p" / "good.jpg", image_bytes())
    write(tmp / "p" / "bad.jpg", bad)
    return write_parquet(tmp / "p" / "m.parquet", {"id": ["good", "bad"], "path": ["good.jpg", "bad.jpg"]})


CONTAINERS: dict[str, Callable[[Path, bytes], Path]] = {
    "image_folder": folder_with, "webdataset": tar_with, "parquet": parquet_with,
}
IMAGE_DEFECTS = [
    pytest.param(corrupt_jpeg(), {}, "corrupt_image", id="corrupt-jpeg"),
    pytest.param(corrupt_png(), {}, "corrupt_image", id="corrupt-png"),
    pytest.param(truncated_jpeg(), {}, "truncated_image", id="truncated-jpeg"),
    pytest.param(b"", {}, "truncated_image", id="empty-file"),
    pytest.param(b"just some text", {}, "unsupported_image", id="not-an-image"),
    pytest.param(bomb_png(100_000, 100_000), {}, "decompression_bomb", id="bomb-header"),
    pytest.param(image_bytes(size=(40, 40)), {"max_pixels": 1000}, "decompression_bomb", id="bomb-max-pixels"),
    pytest.param(image_bytes(size=(40, 4)), {"min_side": 8}, "image_too_small", id="too-small"),
    pytest.param(image_bytes(size=(400, 400), color=(1, 2, 3)) + b"\0" * 5000, {"max_bytes": 4000},
                 "file_too_large", id="too-large"),
]


@pytest.mark.parametrize("kind", list(CONTAINERS))
@pytest.mark.parametrize(("bad", "options", "reason"), IMAGE_DEFECTS)
def test_bad_image_is_a_counted_skip(tmp_path: Path, kind: str, bad: bytes, options: dict[str, Any],
                                     reason: str) -> None:
    rows, report = scan(kind, CONTAINERS[kind](tmp_path, bad), **options)
    assert [r["id"].split("/")[-1].split(".")[0] for r in rows] == ["good"]
    assert dict(report.skipped) == {reason: 1}
    assert "bad" in report.examples[(reason, "skipped")]


# -- broken shards ---------------------------------------------------------------------------------------
TAR_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], int]] = {
    # damage to shard 0 (samples s0, s1, s2) -> how many of its samples stay indexed. A sample whose
    # image member is complete is kept even when its later members (txt, json) were cut off.
    "cut-inside-image-data": (lambda d: d[: d.index(b"s2.jpg") + 512 + 100], 2),
    "cut-inside-json": (lambda d: d[: d.index(b"s2.json") + 512 + 5], 3),
    "cut-between-members": (lambda d: d[: d.index(b"s1.json")], 2),
    "cut-inside-a-header": (lambda d: d[: d.index(b"s2.jpg") + 100], 2),
    "no-end-blocks": (lambda d: d[: d.index(b"s2.json") + 1024], 3),
    "garbage-header": (lambda d: d[: d.index(b"s1.jpg")] + b"\x07" * 512 + d[d.index(b"s1.jpg") + 512:], 1),
    "not-a-tar": (lambda d: b"this is not a tar archive at all" * 40, 0),
    "empty-file": (lambda d: b"", 0),
}


@pytest.mark.parametrize("damage", list(TAR_DAMAGE))
def test_broken_tar_keeps_what_was_read_and_goes_on(tmp_path: Path, damage: str) -> None:
    members = [m for i in range(3) for m in wds_sample(f"s{i}")]
    shard0 = write_tar(tmp_path / "00000.tar", members)
    write_tar(tmp_path / "00001.tar", wds_sample("t0"))
    damage_fn, kept = TAR_DAMAGE[damage]
    shard0.write_bytes(damage_fn(shard0.read_bytes()))
    rows, report = scan("webdataset", tmp_path)
    assert [r["id"] for r in rows] == [f"s{i}" for i in range(kept)] + ["t0"]
    assert report.skipped["broken_tar_member"] == 1


def test_broken_shard_rows_still_read_back(tmp_path: Path) -> None:
    make_webdataset(tmp_path, shards=(0,), per_shard=3)
    tar = tmp_path / "00000.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: data.index(b"000000002.json") + 600])  # cut inside the last sample's json
    source = SOURCES.get("webdataset")(tmp_path)
    report = IssueReport()
    rows = list(source.scan(report))
    assert report.skipped["broken_tar_member"] == 1 and rows
    assert all(source.load_image(r).size == (16, 12) for r in rows)


def test_webdataset_sample_without_image(tmp_path: Path) -> None:
    write_tar(tmp_path / "0.tar", wds_sample("a") + [("b.txt", b"only a caption"), ("b.json", b"{}")])
    rows, report = scan("webdataset", tmp_path)
    assert [r["id"] for r in rows] == ["a"] and report.skipped["missing_image"] == 1


def test_webdataset_bad_json_is_repaired(tmp_path: Path) -> None:
    write_tar(tmp_path / "0.tar", [("a.jpg", image_bytes()), ("a.json", b"{not json"), ("a.txt", b"cap")])
    rows, report = scan("webdataset", tmp_path)
    assert rows[0]["caption"] == "cap" and report.repaired["bad_metadata"] == 1 and report.n_skipped == 0


# -- missing files and values ----------------------------------------------------------------------------
def test_parquet_missing_file_and_null_values(tmp_path: Path) -> None:
    write(tmp_path / "a.jpg", image_bytes())
    write_parquet(tmp_path / "m.parquet", {"id": ["a", "b", "c", None], "path": ["a.jpg", "gone.jpg", None, "a.jpg"]})
    rows, report = scan("parquet", tmp_path)
    assert [r["id"] for r in rows] == ["a"]
    assert dict(report.skipped) == {"missing_file": 1, "missing_value": 2}


def test_parquet_null_url_is_missing_value(tmp_path: Path) -> None:
    write_parquet(tmp_path / "m.parquet", {"url": ["http://a", None]})
    rows, report = scan("parquet", tmp_path)
    assert len(rows) == 1 and dict(report.skipped) == {"missing_value": 1}


def test_image_deleted_after_registration(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    root = make_image_folder(tmp_path / "f", classes=["a"], per_class=3)
    register_dataset(ws, "f", "image_folder", root)
    (root / "a" / "1.jpg").unlink()
    report = IssueReport()
    assert len(list(open_dataset(ws, "f").iter_images(report))) == 2
    assert dict(report.skipped) == {"missing_file": 1}


# -- captions ---------------------------------------------------------------------------------------------
LATIN1 = "caf\xe9 cr\xe8me".encode("latin-1")


def _caption_folder(tmp: Path) -> Path:
    write(tmp / "a.jpg", image_bytes())
    write(tmp / "a.txt", LATIN1)
    return tmp


def _caption_tar(tmp: Path) -> Path:
    return write_tar(tmp / "0.tar", [("a.jpg", image_bytes()), ("a.txt", LATIN1)])


def _caption_parquet(tmp: Path) -> Path:
    return write_parquet(tmp / "m.parquet", {"url": ["http://a"], "caption": [LATIN1]})


@pytest.mark.parametrize(("kind", "builder"), [("image_folder", _caption_folder), ("webdataset", _caption_tar),
                                                ("parquet", _caption_parquet)])
def test_non_utf8_caption_is_repaired(tmp_path: Path, kind: str, builder: Callable[[Path], Path]) -> None:
    rows, report = scan(kind, builder(tmp_path))
    assert rows[0]["caption"] == "caf\ufffd cr\ufffdme"
    assert report.repaired["caption_not_utf8"] == 1 and report.n_skipped == 0


# -- whole-dataset errors: one DataError line ---------------------------------------------------------------
def test_parquet_without_image_or_url_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "m.parquet", {"TEXT": ["x"], "similarity": [0.3]})
    with pytest.raises(DataError, match=r"m.parquet has no image column .* or url column; its columns: TEXT, similarity"):
        scan("parquet", tmp_path)


@pytest.mark.parametrize("content", [b"", b"PAR1 but not really parquet", b"id,url\n1,http://a\n"])
def test_unreadable_parquet_file(tmp_path: Path, content: bytes) -> None:
    write(tmp_path / "broken.parquet", content)
    with pytest.raises(DataError, match="broken.parquet is not a readable parquet file"):
        scan("parquet", tmp_path / "broken.parquet")


def test_laion_corrupt_metadata_and_npy(tmp_path: Path) -> None:
    make_laion(tmp_path, {"0": 2})
    (tmp_path / "img_emb" / "img_emb_0.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="img_emb_0.npy is not a readable .npy file"):
        scan("laion", tmp_path)
    make_laion(tmp_path, {"0": 2})
    (tmp_path / "metadata" / "metadata_0.parquet").write_bytes(b"nope")
    with pytest.raises(DataError, match="metadata_0.parquet is not a readable parquet file"):
        scan("laion", tmp_path)


def test_wrong_embedding_width(tmp_path: Path) -> None:
    make_laion(tmp_path, {"0": 2, "1": 2, "3": 2}, dim=512, text=False)
    np.save(tmp_path / "img_emb" / "img_emb_3.npy", np.ones((2, 768), np.float16))
    with pytest.raises(DataError) as exc:
        scan("laion", tmp_path)
    assert exc.value.one_line() == "wrong embedding width: img_emb_3.npy has 768 columns, the others 512"


def test_npy_metadata_row_mismatch(tmp_path: Path) -> None:
    make_laion(tmp_path, {"0": 2, "7": 3})
    np.save(tmp_path / "img_emb" / "img_emb_7.npy", np.ones((4, 8), np.float16))
    with pytest.raises(DataError, match="partition 7: img_emb_7.npy has 4 rows, metadata_7.parquet has 3"):
        scan("laion", tmp_path)


@pytest.mark.parametrize("which", ["img", "text"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
def test_bad_embedding_rows_are_skipped(tmp_path: Path, which: str, bad: float) -> None:
    make_laion(tmp_path, {"0": 4})
    path = tmp_path / f"{which}_emb" / f"{which}_emb_0.npy"
    arr = np.load(path)
    arr[2] = 0.0
    arr[2, 0] = bad
    np.save(path, arr)
    rows, report = scan("laion", tmp_path)
    assert [r["row"] for r in rows] == [0, 1, 3]
    assert dict(report.skipped) == {"bad_embedding": 1}


def test_cifar_c_bad_labels_file(tmp_path: Path) -> None:
    np.save(tmp_path / "labels.npy", np.array([[1, 2]], np.float32))
    np.save(tmp_path / "fog.npy", np.zeros((5, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="labels.npy must be a 1-D array of integers"):
        scan("cifar_c", tmp_path)


# -- registration -------------------------------------------------------------------------------------------
def test_duplicate_ids_keep_the_first(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    write_tar(tmp_path / "w" / "0.tar", wds_sample("a", caption="first") + wds_sample("b"))
    write_tar(tmp_path / "w" / "1.tar", wds_sample("a", caption="second"))
    info = register_dataset(ws, "w", "webdataset", tmp_path / "w")
    assert info.n_samples == 2 and info.report.skipped["duplicate_id"] == 1
    index = open_dataset(ws, "w").index
    assert index.loc[index["id"] == "a", "caption"].tolist() == ["first"]
    issues = dataset_issues(ws, "w")
    assert issues[["reason", "action", "count", "example"]].values.tolist() == [["duplicate_id", "skipped", 1, "a"]]


@pytest.mark.parametrize("case", ["all-corrupt", "empty-folder", "zero-row-parquet"])
def test_empty_dataset_is_a_data_error(tmp_path: Path, case: str) -> None:
    ws = Workspace(tmp_path / "ws")
    if case == "all-corrupt":
        kind, uri = "image_folder", tmp_path / "d"
        write(uri / "x.jpg", corrupt_jpeg())
    elif case == "empty-folder":
        kind, uri = "image_folder", tmp_path / "d"
        uri.mkdir()
    else:
        kind, uri = "parquet", write_parquet(tmp_path / "m.parquet", {"url": []})
    with pytest.raises(DataError, match="has no readable samples") as exc:
        register_dataset(ws, "d", kind, uri)
    if case == "all-corrupt":
        assert "corrupt_image 1" in exc.value.one_line()
    assert list_datasets(ws).empty
    assert [p.name for p in (ws.root / "datasets").iterdir()] == []  # no staging folder left behind


def test_same_name_twice_without_replace(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    root = make_image_folder(tmp_path / "f", per_class=1)
    register_dataset(ws, "f", "image_folder", root)
    with pytest.raises(AlreadyExists, match="already registered"):
        register_dataset(ws, "f", "image_folder", root)


def test_nonexistent_path(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="does not exist"):
        register_dataset(Workspace(tmp_path / "ws"), "x", "parquet", tmp_path / "nope.parquet")


def test_failed_registration_leaves_earlier_one_intact(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    root = make_image_folder(tmp_path / "f", classes=["a", "b"], per_class=2)
    register_dataset(ws, "f", "image_folder", root)
    register_dataset(ws, "other", "image_folder", root)
    before_row, before_index = dataset_row(ws, "f"), open_dataset(ws, "f").index.copy()
    for p in root.rglob("*.jpg"):
        p.write_bytes(b"")  # every image broken now: the re-registration must fail
    with pytest.raises(DataError, match="no readable samples"):
        register_dataset(ws, "f", "image_folder", root, replace=True)
    assert dataset_row(ws, "f") == before_row
    assert open_dataset(ws, "f").index.equals(before_index)
    assert open_dataset(ws, "f").classes() == ["a", "b"]
    assert sorted(list_datasets(ws)["name"]) == ["f", "other"]
    assert sorted(p.name for p in (ws.root / "datasets").iterdir()) == ["f", "other"]


def test_failed_catalog_write_keeps_old_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import core.datasets as datasets

    ws = Workspace(tmp_path / "ws")
    root = make_image_folder(tmp_path / "f", classes=["a"], per_class=2)
    register_dataset(ws, "f", "image_folder", root)
    old_index = (ws.dataset_dir("f") / "index.parquet").read_bytes()
    make_image_folder(root, classes=["b"], per_class=1)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise DataError("simulated catalog failure")

    monkeypatch.setattr(datasets, "_write_catalog", boom)
    with pytest.raises(DataError, match="simulated"):
        register_dataset(ws, "f", "image_folder", root, replace=True)
    assert (ws.dataset_dir("f") / "index.parquet").read_bytes() == old_index
    assert dataset_row(ws, "f")["n_samples"] == 2


# -- paths that leave the root ----------------------------------------------------------------------------------
@pytest.mark.parametrize("locator", ["../outside.jpg", "a/../../outside.jpg", "/etc/passwd", "link.jpg"])
def test_read_bytes_refuses_escapes(tmp_path: Path, locator: str) -> None:
    root = make_image_folder(tmp_path / "root", classes=["a"], per_class=1)
    write(tmp_path / "outside.jpg", image_bytes())
    os.symlink(tmp_path / "outside.jpg", root / "link.jpg")
    with pytest.raises(PathOutsideWorkspace):
        safe_join(root, locator)
    source = SOURCES.get("image_folder")(root)
    with pytest.raises(PathOutsideWorkspace):
        source.read_bytes({"id": "x", "locator": locator})


def test_scan_skips_symlinks_and_paths_leaving_the_root(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "root", classes=["a"], per_class=1)
    write(tmp_path / "outside.jpg", image_bytes())
    os.symlink(tmp_path / "outside.jpg", root / "a" / "link.jpg")
    os.symlink(root / "a" / "0.jpg", root / "a" / "inside.jpg")  # a link within the root is fine
    rows, report = scan("image_folder", root)
    assert sorted(r["id"] for r in rows) == ["a/0.jpg", "a/inside.jpg"]
    assert dict(report.skipped) == {"path_outside_root": 1}
    write_parquet(root / "m.parquet", {"path": ["../outside.jpg", "a/0.jpg"]})
    rows, report = scan("parquet", root / "m.parquet")
    assert len(rows) == 1 and dict(report.skipped) == {"path_outside_root": 1}


def test_iter_images_counts_escapes_instead_of_raising(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    root = make_image_folder(tmp_path / "root", classes=["a"], per_class=2)
    register_dataset(ws, "r", "image_folder", root)
    write(tmp_path / "outside.jpg", image_bytes())
    (root / "a" / "1.jpg").unlink()
    os.symlink(tmp_path / "outside.jpg", root / "a" / "1.jpg")  # swapped for a link out after registration
    report = IssueReport()
    assert len(list(open_dataset(ws, "r").iter_images(report))) == 1
    assert dict(report.skipped) == {"path_outside_root": 1}


def test_sample_errors_carry_known_reasons() -> None:
    with pytest.raises(SampleError) as exc:
        SOURCES.get("parquet")(Path("/nonexistent")).read_bytes({"id": "x", "locator": "https://x/y.jpg"})
    assert exc.value.reason == "remote_image"
