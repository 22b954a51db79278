"""parquet: column detection, local paths vs URLs, extras, streaming in record batches."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import DataError
from core.sources import IssueReport, SampleError
from core.sources.parquet import ParquetSource

from .conftest import image_bytes, make_local_parquet, make_url_parquet, write, write_parquet


def scan(root: Path, **options: object) -> tuple[list[dict], IssueReport, ParquetSource]:
    source = ParquetSource(root, **options)
    report = IssueReport()
    return list(source.scan(report)), report, source


def test_local_paths_relative_to_the_parquet(tmp_path: Path) -> None:
    path = make_local_parquet(tmp_path / "d", n=3)
    rows, report, source = scan(path)  # a single file: paths relative to its folder
    assert [r["id"] for r in rows] == ["k0", "k1", "k2"]
    assert rows[1]["locator"] == "img/1.png" and rows[1]["caption"] == "caption 1"
    assert rows[0]["similarity"] == pytest.approx(0.3)
    assert source.has_images and report.n_skipped == 0
    assert source.load_image(rows[2]).getpixel((0, 0)) == (80, 0, 0)


def test_image_root_option(tmp_path: Path) -> None:
    write(tmp_path / "images" / "a.jpg", image_bytes())
    write_parquet(tmp_path / "meta" / "m.parquet", {"filepath": ["a.jpg"], "txt": ["hi"]})
    rows, _, source = scan(tmp_path / "meta", image_root=str(tmp_path / "images"))
    assert rows[0]["locator"] == "a.jpg" and rows[0]["caption"] == "hi"
    assert rows[0]["id"] == "m:0"  # no id column: <file stem>:<row>
    assert source.read_bytes(rows[0]) == (tmp_path / "images" / "a.jpg").read_bytes()


def test_absolute_paths_inside_the_root_are_made_relative(tmp_path: Path) -> None:
    img = write(tmp_path / "d" / "sub" / "a.jpg", image_bytes())
    write_parquet(tmp_path / "d" / "m.parquet", {"path": [str(img)]})
    rows, _, _ = scan(tmp_path / "d")
    assert rows[0]["locator"] == "sub/a.jpg"


def test_laion_url_parquet_upper_case_columns(tmp_path: Path) -> None:
    rows, report, source = scan(make_url_parquet(tmp_path / "laion.parquet", n=3))
    assert source.has_images is False and report.n_skipped == 0
    row = rows[0]
    assert row["id"] == "100" and row["caption"] == "text 0"
    assert row["locator"] == row["url"] == "https://example.com/0.jpg"
    assert {"height", "width", "license", "nsfw", "similarity"} <= set(row)
    assert "URL" not in row and "SAMPLE_ID" not in row
    with pytest.raises(SampleError) as exc:
        source.read_bytes(row)
    assert exc.value.reason == "remote_image"


def test_datacomp_metadata_keeps_scalars_and_drops_nested(tmp_path: Path) -> None:
    write_parquet(tmp_path / "metadata" / ("0" * 32 + ".parquet"), {
        "uid": ["a" * 32, "b" * 32], "url": ["http://a", "http://b"], "text": ["x", "y"],
        "original_width": [10, 20], "clip_b32_similarity_score": [0.2, 0.3],
        "face_bboxes": [[[0.1, 0.2, 0.3, 0.4]], []], "sha256": ["s1", "s2"],
    })
    rows, _, _ = scan(tmp_path / "metadata")
    assert rows[0]["id"] == "a" * 32
    assert rows[1]["clip_b32_similarity_score"] == pytest.approx(0.3)
    assert rows[1]["original_width"] == 20 and "face_bboxes" not in rows[0]


def test_column_overrides_and_clashing_extras(tmp_path: Path) -> None:
    write(tmp_path / "d" / "p.jpg", image_bytes())
    write_parquet(tmp_path / "d" / "m.parquet", {
        "MyId": ["x"], "where": ["p.jpg"], "words": ["w"], "cls": [3], "size": [99],
    })
    rows, _, _ = scan(tmp_path / "d", id_col="myid", path_col="WHERE", caption_col="words", label_col="cls")
    assert (rows[0]["id"], rows[0]["locator"], rows[0]["caption"], rows[0]["label"]) == ("x", "p.jpg", "w", 3)
    assert rows[0]["src_size"] == 99 and rows[0]["size"] is None


def test_text_labels_become_sorted_classes(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.jpg", image_bytes())
    write_parquet(tmp_path / "d" / "m.parquet", {"path": ["a.jpg"] * 3, "id": ["1", "2", "3"],
                                                  "class": ["dog", "cat", None]})
    rows, _, source = scan(tmp_path / "d")
    assert source.classes() == ["cat", "dog"]
    assert [r["label"] for r in rows] == [1, 0, None]
    assert ParquetSource(tmp_path / "d").classes() == ["cat", "dog"]  # without a scan


def test_folder_of_parquets_in_numeric_order_streamed_in_small_batches(tmp_path: Path) -> None:
    for part in (10, 2):
        write_parquet(tmp_path / "d" / f"part-{part}.parquet",
                      {"url": [f"http://x/{part}/{i}" for i in range(5)]}, row_group_size=2)
    rows, _, _ = scan(tmp_path / "d", batch_rows=2)
    assert [r["id"] for r in rows][:2] == ["part-2:0", "part-2:1"]
    assert len(rows) == 10 and rows[-1]["id"] == "part-10:4"


def test_url_in_path_column_is_remote(tmp_path: Path) -> None:
    write_parquet(tmp_path / "m.parquet", {"image_path": ["https://x/a.jpg"]})
    rows, report, _ = scan(tmp_path / "m.parquet")
    assert rows[0]["locator"] == "https://x/a.jpg" and report.n_skipped == 0


def test_bad_integer_labels_skipped(tmp_path: Path) -> None:
    write_parquet(tmp_path / "m.parquet", {"url": ["http://a", "http://b", "http://c"], "label": [1.0, -1.0, 2.5]})
    rows, report, _ = scan(tmp_path / "m.parquet")
    assert [r["label"] for r in rows] == [1] and report.skipped["bad_label"] == 2


def test_error_on_override_naming_a_missing_column(tmp_path: Path) -> None:
    write_parquet(tmp_path / "m.parquet", {"url": ["http://a"]})
    with pytest.raises(DataError, match="no column 'capt'.*its columns: url"):
        scan(tmp_path / "m.parquet", caption_col="capt")


def test_empty_folder_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .parquet files"):
        scan(tmp_path / "empty")


def test_dictionary_encoded_strings_are_kept(tmp_path: Path) -> None:
    table = pa.table({"url": ["http://a"], "lang": pa.array(["en"]).dictionary_encode()})
    pq.write_table(table, tmp_path / "m.parquet")
    rows, _, _ = scan(tmp_path / "m.parquet")
    assert rows[0]["lang"] == "en"


def test_url_only_fast_path_matches_the_row_path(tmp_path: Path) -> None:
    """URL-only files are built column-wise; the rows and counts must equal the row-wise reader's."""
    from core.sources.parquet import plan_columns, url_table

    columns = {
        "SAMPLE_ID": [1, None, 3, 4, 5, 6, 7, 8],
        "URL": ["http://a", "http://b", None, "", "http://e", "http://f", "http://g", "http://h"],
        "caption": [b"ok", b"caf\xe9", b"c", b"d", None, b"f", b"g", b"h"],
        "label": [0.0, 1.0, 2.0, 3.0, -1.0, 2.5, float("nan"), None],
        "NSFW": ["UNLIKELY"] * 8,
    }
    path = write_parquet(tmp_path / "m.parquet", columns)
    source = ParquetSource(path)
    plan = plan_columns(pq.read_schema(path), {}, path.name)
    slow_report, fast_report = IssueReport(), IssueReport()
    slow = list(source._scan_file(path, plan, {}, slow_report, verify=True))
    fast = url_table(pq.read_table(path).to_batches()[0], plan, {}, fast_report, path.stem, 0).to_pylist()
    assert fast == slow
    assert [r["id"] for r in fast] == ["1", "8"] and fast[1]["label"] is None
    assert (slow_report.skipped, slow_report.repaired) == (fast_report.skipped, fast_report.repaired)
    assert dict(fast_report.skipped) == {"missing_value": 3, "bad_label": 3}


def test_url_only_text_labels_fast_path(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "m.parquet", {"url": ["http://a", "http://b", "http://c"],
                                                  "target": ["dog", None, "cat"], "flag": [True, False, None]})
    rows, _, source = scan(path)
    assert [(r["label"], r["class_name"]) for r in rows] == [(1, "dog"), (None, None), (0, "cat")]
    assert source.classes() == ["cat", "dog"] and rows[2]["flag"] is None


def test_classes_file_names_integer_labels_and_orders_text_labels(tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / "img" / f"{i}.png", image_bytes("PNG"))
    (tmp_path / "classes.txt").write_text("zebra\napple\nmango\n")
    write_parquet(tmp_path / "ints.parquet", {"path": [f"img/{i}.png" for i in range(3)], "label": [2, 0, 1]})
    rows, _, source = scan(tmp_path / "ints.parquet", classes_file=str(tmp_path / "classes.txt"))
    assert [r["label"] for r in rows] == [2, 0, 1]
    assert source.classes() == ["zebra", "apple", "mango"]
    write_parquet(tmp_path / "text" / "t.parquet",
                  {"path": [f"img/{i}.png" for i in range(2)], "label": ["mango", "zebra"]})
    rows, _, source = scan(tmp_path / "text", classes_file=str(tmp_path / "classes.txt"), image_root=str(tmp_path))
    assert [r["label"] for r in rows] == [2, 0]  # the file's order, not sorted text
    write_parquet(tmp_path / "bad" / "b.parquet", {"path": ["img/0.png"], "label": ["kiwi"]})
    with pytest.raises(DataError, match="kiwi"):
        scan(tmp_path / "bad", classes_file=str(tmp_path / "classes.txt"), image_root=str(tmp_path))
