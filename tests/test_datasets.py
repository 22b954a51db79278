"""core.datasets: registration bookkeeping, the chunked index writer, and streaming reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import core.datasets as datasets
from core.datasets import (
    IndexWriter,
    dataset_issues,
    dataset_row,
    list_datasets,
    open_dataset,
    register_dataset,
    remove_dataset,
)
from core.errors import ConfigError, DataError, UnknownName
from core.sources import INDEX_COLUMNS, IssueReport
from core.sources.base import rows_to_table
from core.workspace import Workspace


def make_folder(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/<i>.png`` with ``n`` images per class."""
    for name, n in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(buf, format="PNG")
            (root / name / f"{i}.png").write_bytes(buf.getvalue())
    return root


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "ws")


def test_register_list_show_remove(ws: Workspace, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"a": 2, "b": 3})
    info = register_dataset(ws, "pets", "image_folder", root, description="two classes")
    assert (info.n_samples, info.n_skipped, info.kind) == (5, 0, "image_folder")
    assert list_datasets(ws)["name"].tolist() == ["pets"]
    row = dataset_row(ws, "pets")
    assert row["uri"] == str(root.resolve()) and row["index_path"] == "datasets/pets/index.parquet"
    assert json.loads(row["options_json"])["label_from"] == "auto"
    meta = json.loads((ws.dataset_dir("pets") / "meta.json").read_text())
    assert meta["has_images"] is True and meta["columns"][:6] == list(INDEX_COLUMNS)
    assert dataset_issues(ws, "pets").empty
    remove_dataset(ws, "pets")
    assert list_datasets(ws).empty and not ws.dataset_dir("pets").exists()
    with pytest.raises(UnknownName, match="registered: none"):
        dataset_row(ws, "pets")


def test_replace_updates_index_and_issues(ws: Workspace, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "imgs", {"a": 2})
    (root / "a" / "bad.png").write_bytes(b"\x89PNG broken")
    register_dataset(ws, "d", "image_folder", root)
    assert dataset_issues(ws, "d")["reason"].tolist() == ["corrupt_image"]
    (root / "a" / "bad.png").unlink()
    make_folder(root, {"b": 1})
    info = register_dataset(ws, "d", "image_folder", root, replace=True)
    assert info.n_samples == 3 and dataset_issues(ws, "d").empty
    assert open_dataset(ws, "d").classes() == ["a", "b"]
    assert [p.name for p in (ws.root / "datasets").iterdir()] == ["d"]  # old folder and staging are gone


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"name": "../x"}, ConfigError, "invalid dataset name"),
    ({"role": "train"}, ConfigError, "role must be one of"),
    ({"kind": "folder"}, UnknownName, "did you mean 'image_folder'"),
    ({"options": {"max_pixel": 5}}, ConfigError, "unknown parameter"),
    ({"options": {"max_pixels": 0}}, ConfigError, "must be >= 1"),
])
def test_bad_arguments(ws: Workspace, tmp_path: Path, kwargs: dict, error: type, match: str) -> None:
    args = {"name": "d", "kind": "image_folder", "uri": make_folder(tmp_path / "i", {"a": 1}), **kwargs}
    with pytest.raises(error, match=match):
        register_dataset(ws, **args)


def test_index_streams_in_chunks_with_varying_columns(ws: Workspace, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "CHUNK_ROWS", 2)
    root = make_folder(tmp_path / "imgs", {"a": 3, "b": 4})
    register_dataset(ws, "d", "image_folder", root)
    pf = pq.ParquetFile(ws.dataset_dir("d") / "index.parquet")
    assert pf.metadata.num_rows == 7 and pf.num_row_groups == 4
    ds = open_dataset(ws, "d")
    assert [r["id"] for r in ds.iter_rows(3, 6, batch_rows=1)] == ["b/0.png", "b/1.png", "b/2.png"]
    assert len(list(ds.iter_rows(5))) == 2 and list(ds.iter_rows(7)) == []
    assert [r["id"] for r, _ in ds.iter_images(start=1, stop=3)] == ["a/1.png", "a/2.png"]


def test_index_writer_settles_one_type_per_column(tmp_path: Path) -> None:
    writer = IndexWriter(tmp_path / "index.parquet")
    rows = [
        {"id": "1", "locator": "a", "score": 1, "tag": 5, "flag": True},
        {"id": "2", "locator": "b", "score": 2, "tag": "x"},          # int + str in one chunk -> text
        {"id": "3", "locator": "c", "score": 2.5, "late": "only here", "flag": None},
        {"id": "4", "locator": "d", "score": None, "tag": 7, "big": 2**70},  # too big for int64 -> text
    ]
    for chunk in (rows[:2], rows[2:]):
        writer.add(rows_to_table(chunk))
    assert writer.close() == 4 and not (tmp_path / ".parts").exists()
    table = pq.read_table(tmp_path / "index.parquet")
    types = {f.name: f.type for f in table.schema}
    assert table.column_names[:6] == list(INDEX_COLUMNS)
    assert types["label"] == pa.int32() and types["offset"] == pa.int64()
    assert types["score"] == pa.float64() and types["tag"] == pa.string() and types["flag"] == pa.bool_()
    assert table.column("tag").to_pylist() == ["5", "x", None, "7"]
    assert table.column("late").to_pylist() == [None, None, "only here", None]
    assert table.column("big").to_pylist()[3] == str(2**70)


def test_empty_writer_writes_nothing(tmp_path: Path) -> None:
    assert IndexWriter(tmp_path / "index.parquet").close() == 0
    assert not (tmp_path / "index.parquet").exists()


def test_missing_index_is_a_data_error(ws: Workspace, tmp_path: Path) -> None:
    register_dataset(ws, "d", "image_folder", make_folder(tmp_path / "i", {"a": 1}))
    (ws.dataset_dir("d") / "index.parquet").unlink()
    with pytest.raises(DataError, match="index of dataset 'd' is missing"):
        _ = open_dataset(ws, "d").index


def test_iter_images_reports_into_given_report(ws: Workspace, tmp_path: Path) -> None:
    root = make_folder(tmp_path / "i", {"a": 2})
    register_dataset(ws, "d", "image_folder", root)
    (root / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = IssueReport()
    got = list(open_dataset(ws, "d").iter_images(report))
    assert [r["id"] for r, _ in got] == ["a/1.png"] and report.skipped["corrupt_image"] == 1


def test_index_dataframe_has_nullable_integers(ws: Workspace, tmp_path: Path) -> None:
    register_dataset(ws, "d", "image_folder", make_folder(tmp_path / "i", {"a": 1}))
    index = open_dataset(ws, "d").index
    assert str(index["label"].dtype) == "Int32" and str(index["offset"].dtype) == "Int64"
    assert index["offset"].isna().all()
