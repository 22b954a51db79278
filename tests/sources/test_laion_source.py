"""laion: partition matching and order, ids, local images, streaming embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.errors import DataError
from core.sources import IssueReport, SampleError
from core.sources.laion import LaionSource

from .conftest import image_bytes, make_laion, write, write_parquet


def scan(root: Path, **options: object) -> tuple[list[dict], IssueReport, LaionSource]:
    source = LaionSource(root, **options)
    report = IssueReport()
    return list(source.scan(report)), report, source


@pytest.mark.parametrize("names", [("0", "2", "10"), ("0000", "0002", "0010")])
def test_partitions_sorted_numerically(tmp_path: Path, names: tuple[str, ...]) -> None:
    make_laion(tmp_path, {n: 2 for n in names})
    rows, report, source = scan(tmp_path)
    assert [r["partition"] for r in rows] == [0, 0, 2, 2, 10, 10]
    assert [r["row"] for r in rows[:2]] == [0, 1]
    assert report.n_skipped == 0 and source.dim == 8 and source.embedding_dim("text") == 8
    assert rows[0]["caption"] == f"laion caption {names[0]}/0"
    assert rows[0]["id"] == "000000000"  # image_path (the webdataset key) when there is no key column
    assert rows[0]["nsfw"] == "UNLIKELY" and rows[0]["url"].startswith("https://")


def test_ids_from_key_or_partition_row(tmp_path: Path) -> None:
    (tmp_path / "img_emb").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_3.npy", np.ones((2, 4), np.float16))
    write_parquet(tmp_path / "laion2B-en-metadata" / "metadata_3.parquet", {"caption": ["a", "b"]})
    rows, _, source = scan(tmp_path)
    assert [r["id"] for r in rows] == ["3:0", "3:1"]
    assert rows[0]["locator"] is None and source.has_images is False
    with pytest.raises(SampleError, match="missing_image"):
        source.read_bytes(rows[0])


def test_local_image_paths_make_has_images(tmp_path: Path) -> None:
    (tmp_path / "img_emb").mkdir()
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", np.ones((2, 4), np.float16))
    write(tmp_path / "images" / "a.jpg", image_bytes())
    write_parquet(tmp_path / "metadata" / "metadata_0.parquet",
                  {"key": ["a", "b"], "image_path": ["images/a.jpg", "images/missing.jpg"],
                   "url": ["http://a", "http://b"]})
    rows, _, source = scan(tmp_path)
    assert [r["locator"] for r in rows] == ["images/a.jpg", "http://b"]
    assert source.has_images is True
    assert source.load_image(rows[0]).size == (16, 12)
    with pytest.raises(SampleError, match="remote_image"):
        source.read_bytes(rows[1])


def test_iter_embeddings_streams_float32_batches(tmp_path: Path) -> None:
    arrays = make_laion(tmp_path, {"0": 5, "1": 3})
    source = LaionSource(tmp_path)
    batches = list(source.iter_embeddings(batch_rows=2))
    assert all(v.dtype == np.float32 and v.shape[1] == 8 for _, v in batches)
    meta = np.concatenate([m["row"].to_numpy() for m, _ in batches])
    vectors = np.concatenate([v for _, v in batches])
    assert len(meta) == 8 and max(len(m) for m, _ in batches) == 2
    np.testing.assert_allclose(vectors[:5], arrays["0"].astype(np.float32))
    first_meta = batches[0][0]
    assert list(first_meta.columns) == ["id", "partition", "row"] and first_meta["id"][0] == "000000000"
    text = list(source.iter_embeddings(which="text"))
    assert sum(len(m) for m, _ in text) == 8


def test_iter_embeddings_drops_bad_rows(tmp_path: Path) -> None:
    make_laion(tmp_path, {"0": 4}, text=False)
    arr = np.load(tmp_path / "img_emb" / "img_emb_0.npy")
    arr[1] = np.nan
    np.save(tmp_path / "img_emb" / "img_emb_0.npy", arr)
    source = LaionSource(tmp_path)
    ((meta, vectors),) = list(source.iter_embeddings())
    assert meta["row"].tolist() == [0, 2, 3] and len(vectors) == 3
    ((meta, _),) = list(source.iter_embeddings(valid_only=False))
    assert len(meta) == 4
    with pytest.raises(DataError, match="no text_emb"):
        list(source.iter_embeddings(which="text"))


def test_missing_folders_and_partitions(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(DataError, match="no img_emb/ folder; it holds: other"):
        scan(tmp_path)
    make_laion(tmp_path, {"0": 2, "1": 2})
    (tmp_path / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(DataError, match="partition 1: img_emb_1.npy has no matching metadata"):
        scan(tmp_path)


def test_text_partitions_must_match(tmp_path: Path) -> None:
    make_laion(tmp_path, {"0": 2, "1": 2})
    (tmp_path / "text_emb" / "text_emb_1.npy").unlink()
    with pytest.raises(DataError, match="partition 1: img_emb and text_emb"):
        scan(tmp_path)


def test_two_files_for_one_partition(tmp_path: Path) -> None:
    make_laion(tmp_path, {"2": 2})
    np.save(tmp_path / "img_emb" / "img_emb_0002.npy", np.ones((2, 8), np.float16))
    with pytest.raises(DataError, match="partition 2 has two files"):
        scan(tmp_path)
