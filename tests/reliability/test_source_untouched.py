"""Source data is never modified: the whole curation loop run through the CLI (register, embed, cluster,
maps, prune, export, similarity, corrupted copy) leaves every file of every registered source byte-identical,
with the same modification time, and adds no file next to them; an output folder placed inside a source
is refused before anything is written."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import make_image
from tests.reliability.test_cli_bad_input import cli  # noqa: F401 - the in-process CLI fixture

pytestmark = pytest.mark.slow


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, size, mtime_ns) of every file under ``root`` (symlinks not followed)."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size,
                                             p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_sources(src: Path) -> None:
    """A labelled pool folder with captions, a reference and a benchmark folder, a parquet source and a
    webdataset shard."""
    for c, name in enumerate(("circle", "square", "star")):
        for i in range(8):
            make_image(src / "pool" / name / f"{name}{i}.png", 10 * c + i)
            (src / "pool" / name / f"{name}{i}.txt").write_text(f"a photo of a {name} number {i}")
        for i in range(3):
            make_image(src / "ref" / name / f"r{i}.png", 100 + 10 * c + i)
            make_image(src / "bench" / name / f"b{i}.png", 200 + 10 * c + i)
    (src / "pq" / "img").mkdir(parents=True)
    for i in range(4):
        make_image(src / "pq" / "img" / f"{i}.png", 300 + i)
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(4)], "path": [f"img/{i}.png" for i in range(4)],
                             "caption": ["x"] * 4}), src / "pq" / "meta.parquet")
    (src / "wds").mkdir()
    with tarfile.open(src / "wds" / "00000.tar", "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            make_image(src / "tmp.png", 400 + i)
            data = (src / "tmp.png").read_bytes()
            for name, payload in ((f"{i:09d}.png", data), (f"{i:09d}.txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                buf = io.BytesIO(payload)
                tar.addfile(info, buf)
    (src / "tmp.png").unlink()


def test_the_whole_loop_leaves_every_source_byte_identical(cli, tmp_path):  # noqa: F811
    src = tmp_path / "src"
    make_sources(src)
    before = snapshot(src)
    steps = [
        ("datasets", "add", "pool", "image_folder", src / "pool", "--role", "pool"),
        ("datasets", "add", "ref", "image_folder", src / "ref", "--role", "reference"),
        ("datasets", "add", "bench", "image_folder", src / "bench", "--role", "benchmark"),
        ("datasets", "add", "pqset", "parquet", src / "pq" / "meta.parquet"),
        ("datasets", "add", "wds", "webdataset", src / "wds"),
        ("embed", "pool", "--model", "demo-vit-tiny", "--modality", "both", "--num-workers", "0",
         "--set-id", "pool.e"),
        ("embed", "ref", "--model", "demo-vit-tiny", "--num-workers", "0", "--set-id", "ref.e"),
        ("embed", "bench", "--model", "demo-vit-tiny", "--num-workers", "0", "--set-id", "bench.e"),
        ("embed", "wds", "--model", "demo-vit-tiny", "--num-workers", "0", "--set-id", "wds.e"),
        ("cluster", "pool.e", "--k", "3", "--neighbors", "2", "--id", "c3"),
        ("maps", "c3"),
        ("prune", "c3", "--step", "semdedup:eps=0.01", "--step", "random:keep_fraction=0.5", "--id", "p1"),
        ("export", "p1", "--out", tmp_path / "kept.txt"),
        ("similarity", "pool.e", "ref.e", "bench.e", "--id", "s1"),
        ("corrupt", "images", "bench", tmp_path / "ws" / "corrupted", "--corruptions", "gaussian_noise",
         "--severities", "1"),
    ]
    for args in steps:
        res = cli(*args)
        assert res.code == 0, (args, res.stderr)
    assert snapshot(src) == before
    assert (tmp_path / "kept.txt").read_text().strip()


def test_an_output_folder_inside_a_source_is_refused(cli, tmp_path):  # noqa: F811
    src = tmp_path / "src"
    make_sources(src)
    assert cli("datasets", "add", "bench", "image_folder", src / "bench", "--role", "benchmark").code == 0
    before = snapshot(src)
    res = cli("corrupt", "images", "bench", src / "bench" / "corrupted", "--corruptions", "gaussian_noise",
              "--severities", "1")
    assert res.code != 0 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr, res.stderr
    assert snapshot(src) == before
