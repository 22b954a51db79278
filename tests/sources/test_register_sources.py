"""Each source kind registered end to end through ``core.datasets.register_dataset``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.datasets import dataset_issues, dataset_row, open_dataset, register_dataset
from core.sources import IssueReport
from core.workspace import Workspace

from .conftest import (
    corrupt_png,
    image_bytes,
    make_cifar_c,
    make_image_folder,
    make_imagenet_c,
    make_laion,
    make_url_parquet,
    make_webdataset,
    wds_sample,
    write,
    write_parquet,
    write_tar,
)


def issues(ws: Workspace, name: str) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in dataset_issues(ws, name)[["reason", "action", "count"]].values.tolist()]


def roundtrip(ws: Workspace, name: str) -> list[Image.Image]:
    """Every image of the dataset through the streaming reader (none may be skipped)."""
    report = IssueReport()
    images = [img for _, img in open_dataset(ws, name).iter_images(report)]
    assert report.n_skipped == 0, report.summary()
    return images


def test_register_image_folder_imagenet_v2(ws: Workspace, tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "v2", classes=[str(i) for i in range(11)], per_class=1, captions=True)
    write(root / "3" / "broken.jpg", corrupt_png())
    info = register_dataset(ws, "v2", "image_folder", root, role="benchmark")
    assert (info.n_samples, info.n_skipped) == (11, 1)
    ds = open_dataset(ws, "v2")
    assert dict(zip(ds.index["class_name"], ds.index["label"], strict=True)) == {str(i): i for i in range(11)}
    assert ds.classes() == [str(i) for i in range(11)]
    assert ds.index["caption"].iloc[0] == "a photo of a 0 number 0"
    row = dataset_row(ws, "v2")
    assert (row["n_classes"], row["has_captions"], row["role"]) == (11, True, "benchmark")
    assert issues(ws, "v2") == [("corrupt_image", "skipped", 1)]
    assert len(roundtrip(ws, "v2")) == 11


def test_register_image_folder_classes_file_subset(ws: Workspace, tmp_path: Path) -> None:
    wnids = [f"n{i:08d}" for i in range(10)]
    (tmp_path / "wnids.json").write_text(json.dumps(wnids))
    root = make_image_folder(tmp_path / "r", classes=[wnids[7], wnids[2]], per_class=2)
    register_dataset(ws, "r", "image_folder", root, options={"classes_file": str(tmp_path / "wnids.json")})
    ds = open_dataset(ws, "r")
    assert sorted(set(ds.index["label"].tolist())) == [2, 7]
    assert ds.classes() == wnids and dataset_row(ws, "r")["n_classes"] == 10


def test_register_parquet_local(ws: Workspace, tmp_path: Path) -> None:
    for i in range(3):
        write(tmp_path / "d" / "img" / f"{i}.jpg", image_bytes(color=(i * 80, 10, 10)))
    write_parquet(tmp_path / "d" / "meta.parquet", {
        "uid": ["u0", "u1", "u2", "u3"], "image_path": ["img/0.jpg", "img/1.jpg", "img/2.jpg", "img/gone.jpg"],
        "TEXT": ["zero", "one", "two", "three"], "label": [0, 1, 1, 0], "clip_b32_similarity_score": [0.1] * 4,
    })
    info = register_dataset(ws, "pq", "parquet", tmp_path / "d")
    ds = open_dataset(ws, "pq")
    assert info.n_samples == 3 and ds.has_images
    assert ds.index["caption"].tolist() == ["zero", "one", "two"] and ds.index["label"].tolist() == [0, 1, 1]
    assert "clip_b32_similarity_score" in ds.index.columns
    assert issues(ws, "pq") == [("missing_file", "skipped", 1)]
    assert [img.getpixel((0, 0))[0] // 40 for img in roundtrip(ws, "pq")] == [0, 2, 4]


def test_register_parquet_url_only(ws: Workspace, tmp_path: Path) -> None:
    info = register_dataset(ws, "urls", "parquet", make_url_parquet(tmp_path / "laion.parquet", n=4))
    ds = open_dataset(ws, "urls")
    assert info.n_samples == 4 and ds.has_images is False and ds.source.has_images is False
    report = IssueReport()
    assert list(ds.iter_images(report)) == [] and report.skipped["remote_image"] == 4
    assert issues(ws, "urls") == []


def test_register_webdataset(ws: Workspace, tmp_path: Path) -> None:
    images = make_webdataset(tmp_path / "wds", shards=(0, 1, 2), per_shard=2)
    write_tar(tmp_path / "wds" / "00003.tar", wds_sample("x", image=b"broken") + [("y.txt", b"no image")])
    info = register_dataset(ws, "wds", "webdataset", tmp_path / "wds")
    assert (info.n_samples, info.n_skipped) == (6, 2)
    ds = open_dataset(ws, "wds")
    assert ds.index["locator"].tolist() == ["00000.tar"] * 2 + ["00001.tar"] * 2 + ["00002.tar"] * 2
    assert ds.index["caption"].iloc[3] == "shard 1 sample 1"
    assert issues(ws, "wds") == [("missing_image", "skipped", 1), ("unsupported_image", "skipped", 1)]
    for row in ds.iter_rows():
        assert ds.source.read_bytes(row) == images[row["id"]]
    assert len(roundtrip(ws, "wds")) == 6


def test_register_laion(ws: Workspace, tmp_path: Path) -> None:
    make_laion(tmp_path / "rel", {"0": 3, "10": 2, "2": 2})
    arr = np.load(tmp_path / "rel" / "img_emb" / "img_emb_2.npy")
    arr[1] = 0
    np.save(tmp_path / "rel" / "img_emb" / "img_emb_2.npy", arr)
    info = register_dataset(ws, "laion", "laion", tmp_path / "rel")
    ds = open_dataset(ws, "laion")
    assert (info.n_samples, info.n_skipped) == (6, 1)
    assert ds.index["partition"].tolist() == [0, 0, 0, 2, 10, 10]
    assert ds.index["caption"].iloc[3] == "laion caption 2/0"
    assert ds.has_images is False and pd.isna(dataset_row(ws, "laion")["n_classes"])
    assert issues(ws, "laion") == [("bad_embedding", "skipped", 1)]
    assert ds.source.dim == 8  # type: ignore[attr-defined]


def test_register_imagenet_c(ws: Workspace, tmp_path: Path) -> None:
    root = make_imagenet_c(tmp_path / "inc", corruptions=("fog", "zoom_blur"), severities=(1, 2, 3),
                           classes=("n02", "n01"), per_class=1)
    write(root / "fog" / "2" / "n01" / "bad.JPEG", image_bytes()[:100])
    info = register_dataset(ws, "inc", "imagenet_c", root, role="benchmark", options={"severities": "2,3"})
    ds = open_dataset(ws, "inc")
    assert (info.n_samples, info.n_skipped) == (8, 1)
    assert sorted(set(ds.index["severity"].tolist())) == [2, 3]
    assert ds.classes() == ["n01", "n02"]
    assert set(zip(ds.index["class_name"], ds.index["label"], strict=True)) == {("n01", 0), ("n02", 1)}
    assert issues(ws, "inc") == [("truncated_image", "skipped", 1)]
    assert all(img.size == (16, 12) for img in roundtrip(ws, "inc"))


def test_register_cifar_c(ws: Workspace, tmp_path: Path) -> None:
    arrays = make_cifar_c(tmp_path / "cc", ("fog", "snow"), block=2)
    info = register_dataset(ws, "cc", "cifar_c", tmp_path / "cc", role="benchmark", options={"corruptions": "snow"})
    ds = open_dataset(ws, "cc")
    assert info.n_samples == 10 and ds.classes()[0] == "airplane"
    assert ds.index["severity"].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    images = roundtrip(ws, "cc")
    np.testing.assert_array_equal(np.asarray(images[9]), arrays["snow"][9])
    assert issues(ws, "cc") == []


@pytest.mark.parametrize("verify", [True, False])
def test_register_without_verify(ws: Workspace, tmp_path: Path, verify: bool) -> None:
    write(tmp_path / "f" / "a.jpg", image_bytes())
    write(tmp_path / "f" / "b.jpg", b"garbage")
    info = register_dataset(ws, "f", "image_folder", tmp_path / "f", verify=verify)
    assert info.n_samples == (1 if verify else 2)
