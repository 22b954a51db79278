"""imagenet_c (folder tree) and cifar_c (npy arrays): corruption/severity columns, selection, labels."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.errors import ConfigError, DataError
from core.sources import IssueReport, SampleError
from core.sources.imagenet_c import CifarCSource, ImageNetCSource

from .conftest import image_bytes, make_cifar_c, make_imagenet_c, write


def scan(source: ImageNetCSource | CifarCSource) -> tuple[list[dict], IssueReport]:
    report = IssueReport()
    return list(source.scan(report)), report


def test_imagenet_c_tree(tmp_path: Path) -> None:
    make_imagenet_c(tmp_path, corruptions=("fog", "snow"), severities=(1, 5), classes=("n02", "n01"), per_class=2)
    rows, report = scan(ImageNetCSource(tmp_path))
    assert len(rows) == 2 * 2 * 2 * 2 and report.n_skipped == 0
    first = rows[0]
    assert (first["corruption"], first["severity"], first["class_name"], first["label"]) == ("fog", 1, "n01", 0)
    assert first["id"] == first["locator"] and first["locator"].startswith("fog/1/n01/")
    assert {(r["corruption"], r["severity"]) for r in rows} == {("fog", 1), ("fog", 5), ("snow", 1), ("snow", 5)}


def test_imagenet_c_selection_options(tmp_path: Path) -> None:
    make_imagenet_c(tmp_path, corruptions=("fog", "snow", "frost"), severities=(1, 2, 3))
    rows, _ = scan(ImageNetCSource(tmp_path, corruptions="snow, fog", severities="3,1"))
    assert {(r["corruption"], r["severity"]) for r in rows} == {("fog", 1), ("fog", 3), ("snow", 1), ("snow", 3)}
    with pytest.raises(DataError, match="corruption.*blur not in"):
        scan(ImageNetCSource(tmp_path, corruptions="blur"))
    with pytest.raises(ConfigError, match="severities must be integers 1-5"):
        scan(ImageNetCSource(tmp_path, severities="0,6"))


def test_unknown_corruption_names_are_kept_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_imagenet_c(tmp_path, corruptions=("my_blur",), severities=(1,))
    write(tmp_path / "my_blur" / "extra" / "x.jpg", image_bytes())  # not a severity folder: ignored
    with caplog.at_level(logging.INFO, logger="core.sources.imagenet_c"):
        rows, _ = scan(ImageNetCSource(tmp_path))
    assert len(rows) == 2 and "my_blur" in caplog.text and "ignoring" in caplog.text


def test_imagenet_c_classes_file(tmp_path: Path) -> None:
    make_imagenet_c(tmp_path / "c", classes=("n03",), severities=(1,), corruptions=("fog",))
    (tmp_path / "wnids.txt").write_text("n01\nn02\nn03\n")
    source = ImageNetCSource(tmp_path / "c", classes_file=str(tmp_path / "wnids.txt"))
    rows, _ = scan(source)
    assert rows[0]["label"] == 2 and source.classes() == ["n01", "n02", "n03"]


def test_cifar_c_rows_severities_and_pixels(tmp_path: Path) -> None:
    arrays = make_cifar_c(tmp_path, ("fog", "snow"), block=3)
    source = CifarCSource(tmp_path)
    rows, report = scan(source)
    assert len(rows) == 30 and report.n_skipped == 0
    assert [r["severity"] for r in rows[:15]] == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3 + [5] * 3
    row = rows[7]
    assert (row["id"], row["locator"], row["row"], row["label"]) == ("fog:7", "fog.npy", 7, 1)
    np.testing.assert_array_equal(np.asarray(source.load_image(row)), arrays["fog"][7])
    png = Image.open(io.BytesIO(source.read_bytes(row)))
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), arrays["fog"][7])
    assert source.classes()[:2] == ["airplane", "automobile"]


def test_cifar_c_selection_and_errors(tmp_path: Path) -> None:
    make_cifar_c(tmp_path, ("fog", "snow"), block=2)
    rows, _ = scan(CifarCSource(tmp_path, corruptions="snow", severities="5"))
    assert [r["id"] for r in rows] == ["snow:8", "snow:9"]
    source = CifarCSource(tmp_path)
    with pytest.raises(SampleError, match="missing_value"):
        source.load_image({"id": "x", "locator": "fog.npy", "row": 99})
    with pytest.raises(SampleError, match="missing_file"):
        source.load_image({"id": "x", "locator": "rain.npy", "row": 0})


def test_cifar_c_shape_mismatch(tmp_path: Path) -> None:
    make_cifar_c(tmp_path, ("fog",), block=2)
    np.save(tmp_path / "snow.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="snow.npy has 7 images, labels.npy 10"):
        scan(CifarCSource(tmp_path))


def test_cifar_100_c_classes_are_numbers(tmp_path: Path) -> None:
    make_cifar_c(tmp_path, ("fog",), block=20, n_classes=20)
    assert CifarCSource(tmp_path).classes() == [str(i) for i in range(20)]
