"""Bad input at the CLI: every case ends with a clear one-line error (``error: ...`` and the documented exit
code) or a counted skip (the per-reason summary in ``dataset_issues``), never a traceback.

The CLI runs in this process through :func:`core.cli.main` (what the console script calls), so a case costs
milliseconds instead of an interpreter start; ``test_the_console_entry_point_prints_one_line`` checks the real
subprocess path once. An exception other than PrunescopeError escapes ``main`` and fails the case with its
traceback.
"""

from __future__ import annotations

import io
import struct
import sys
import tarfile
import traceback
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from core.store import Catalog

REPO = Path(__file__).resolve().parents[2]


# -- the in-process CLI --------------------------------------------------------------------------------------
@dataclass
class Result:
    code: int
    stdout: str
    stderr: str


def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, ws: Path, *args: object) -> Result:
    """``prunescope ARGS`` on workspace ``ws`` through :func:`core.cli.main`; a bug's traceback fails the test."""
    from core.cli import main

    monkeypatch.setenv("PRUNESCOPE_WORKSPACE", str(ws))
    monkeypatch.setattr(sys, "argv", ["prunescope", *map(str, args)])
    capsys.readouterr()
    code: int = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Exception:  # noqa: BLE001 - a traceback is exactly what these tests look for
        out = capsys.readouterr()
        pytest.fail(f"prunescope {' '.join(map(str, args))} raised instead of a one-line error:\n"
                    f"{traceback.format_exc()}\nstderr: {out.err}")
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def assert_one_line_error(res: Result, code: int, fragment: str) -> str:
    assert res.code == code, (res.code, res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    return lines[0]


@pytest.fixture()
def cli(capsys, monkeypatch, tmp_path):
    """``cli(*args, ws=None) -> Result`` on ``tmp_path/ws`` by default."""
    def call(*args: object, ws: Path | None = None) -> Result:
        return run_cli(capsys, monkeypatch, ws or tmp_path / "ws", *args)
    return call


def issues(ws: Path, dataset: str) -> dict[str, tuple[str, int]]:
    df = Catalog(ws / "catalog.duckdb").query(
        "SELECT reason, action, count FROM dataset_issues WHERE dataset = ?", [dataset])
    return {r.reason: (r.action, int(r.count)) for r in df.itertuples()}


def n_samples(ws: Path, dataset: str) -> int:
    return int(Catalog(ws / "catalog.duckdb").query("SELECT n_samples FROM datasets WHERE name = ?",
                                                    [dataset])["n_samples"].iloc[0])


# -- bad files -------------------------------------------------------------------------------------------------
def png_bytes(seed: int = 0, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, 90, 150)).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed * 40 % 256, 90, 150)).save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A small valid PNG whose header claims ``width x height`` pixels (10 G by default)."""
    data = bytearray(png_bytes())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def write_bad_image_folder(root: Path) -> None:
    """4 good images (one with a latin-1 caption) + one of each broken kind."""
    root.mkdir(parents=True)
    for i in range(4):
        (root / f"good_{i}.png").write_bytes(png_bytes(i))
    (root / "good_0.txt").write_bytes(b"caf\xe9 au lait \xff\xfe")  # not UTF-8
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20)
    (root / "truncated.png").write_bytes(png_bytes(9, size=64)[:80])
    (root / "truncated.jpg").write_bytes(jpeg_bytes(9, size=64)[:300])
    (root / "bomb.png").write_bytes(bomb_png())
    (root / "notes.png").write_bytes(b"just some text, not an image")


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_release(root: Path, X: np.ndarray, ids: list[str] | None = None) -> None:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    np.save(root / "img_emb" / "img_emb_0.npy", X)
    ids = ids or [f"{i:032x}" for i in range(len(X))]
    pq.write_table(pa.table({"uid": ids, "caption": [f"c {i}" for i in range(len(X))]}),
                   root / "metadata" / "metadata_0.parquet")


# -- registration: counted skips ------------------------------------------------------------------------------
def test_broken_images_bombs_and_non_utf8_captions_are_counted_skips(cli, tmp_path):
    write_bad_image_folder(tmp_path / "imgs")
    before = {p: p.read_bytes() for p in (tmp_path / "imgs").iterdir()}
    res = cli("datasets", "add", "imgs", "image_folder", tmp_path / "imgs")
    assert res.code == 0, res.stderr
    assert "4 samples" in res.stdout and "Traceback" not in res.stderr
    found = issues(tmp_path / "ws", "imgs")
    assert found["decompression_bomb"] == ("skipped", 1)
    assert found["caption_not_utf8"][0] == "repaired"
    skipped = sum(n for action, n in found.values() if action == "skipped")
    assert skipped == 5, found  # corrupt jpeg, 2 truncated, bomb, not-an-image
    assert {"corrupt_image", "truncated_image"} & set(found), found
    show = cli("datasets", "show", "imgs")
    assert "caf\ufffd au lait" in show.stdout  # repaired with U+FFFD, shown as text
    # The source is never modified.
    assert {p: p.read_bytes() for p in (tmp_path / "imgs").iterdir()} == before


def test_truncated_and_garbage_tars_are_counted_skips(cli, tmp_path):
    shards = tmp_path / "wds"
    write_shard(shards / "00000.tar", [(f"{k:04d}.{ext}", data) for k in range(4)
                                       for ext, data in (("png", png_bytes(k)), ("txt", f"cap {k}".encode()))])
    write_shard(shards / "00001.tar", [(f"{k:04d}.{ext}", data) for k in range(4, 8)
                                       for ext, data in (("png", png_bytes(k, 48)), ("txt", b"x"))])
    whole = (shards / "00001.tar").read_bytes()
    (shards / "00001.tar").write_bytes(whole[: len(whole) // 2])  # a download cut off mid-way
    (shards / "00002.tar").write_bytes(b"\x00not a tar archive" * 50)
    res = cli("datasets", "add", "wds", "webdataset", shards)
    assert res.code == 0, res.stderr
    found = issues(tmp_path / "ws", "wds")
    assert found.get("broken_tar_member", ("", 0))[1] >= 2, found
    assert 4 <= n_samples(tmp_path / "ws", "wds") < 8


def test_missing_files_duplicate_ids_and_paths_out_of_the_root_are_counted_skips(cli, tmp_path):
    root = tmp_path / "pq"
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "secret.png").write_bytes(png_bytes(7))
    (root / "img" / "link.png").symlink_to(tmp_path / "secret.png")
    pq.write_table(pa.table({
        "id": ["a", "b", "c", "a", "m", "up", "abs", "link"],
        "path": ["img/0.png", "img/1.png", "img/2.png", "img/1.png", "img/missing.png", "../secret.png",
                 str(tmp_path / "secret.png"), "img/link.png"],
        "caption": ["x"] * 8,
    }), root / "meta.parquet")
    res = cli("datasets", "add", "p", "parquet", root / "meta.parquet")
    assert res.code == 0, res.stderr
    found = issues(tmp_path / "ws", "p")
    assert found["duplicate_id"] == ("skipped", 1)
    assert found["missing_file"] == ("skipped", 1)
    assert found["path_outside_root"] == ("skipped", 3), found  # .., absolute, symlink pointing out
    assert n_samples(tmp_path / "ws", "p") == 3


def test_bad_embedding_rows_are_counted_and_left_out(cli, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(12, 16)).astype(np.float32)
    X[3] = np.nan
    X[5, 2] = np.inf
    X[7] = 0.0
    write_release(tmp_path / "rel", X)
    res = cli("datasets", "add", "rel", "laion", tmp_path / "rel")
    assert res.code == 0 and "9 samples" in res.stdout, res.stderr
    assert issues(tmp_path / "ws", "rel") == {"bad_embedding": ("skipped", 3)}  # NaN, inf, zero: at registration
    res = cli("embeddings", "import-laion", "rel", "--model", "synthetic")
    assert res.code == 0, res.stderr
    assert "9 rows x 16" in res.stdout, res.stdout
    stored = np.concatenate([np.load(p) for p in sorted((tmp_path / "ws" / "embeddings").rglob("part-*.npy"))])
    assert np.isfinite(stored.astype(np.float32)).all()
    assert np.allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1, atol=1e-2)


# -- whole-dataset problems: one-line errors -------------------------------------------------------------------
def test_empty_sources_are_one_line_errors(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("datasets", "add", "e1", "image_folder", tmp_path / "empty"), 3, "no readable samples")
    pq.write_table(pa.table({"path": pa.array([], pa.string()), "caption": pa.array([], pa.string())}),
                   tmp_path / "empty.parquet")
    assert_one_line_error(cli("datasets", "add", "e2", "parquet", tmp_path / "empty.parquet"), 3, "")
    write_shard(tmp_path / "wds" / "00000.tar", [])
    assert_one_line_error(cli("datasets", "add", "e3", "webdataset", tmp_path / "wds"), 3, "")
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "a.jpg").write_bytes(b"\xff\xd8 nope")
    line = assert_one_line_error(cli("datasets", "add", "e4", "image_folder", only_broken), 3, "no readable samples")
    assert "skipped 1" in line or "corrupt" in line or "1" in line
    write_release(tmp_path / "rel0", np.zeros((0, 8), np.float32), ids=[])
    assert_one_line_error(cli("datasets", "add", "e5", "laion", tmp_path / "rel0"), 3, "")
    # Nothing was registered, and no staging folder was left behind.
    assert Catalog(tmp_path / "ws" / "catalog.duckdb").query("SELECT * FROM datasets").empty
    assert not [p for p in (tmp_path / "ws" / "datasets").iterdir()]


def test_missing_paths_are_one_line_errors(cli, tmp_path):
    assert_one_line_error(cli("datasets", "add", "m", "parquet", tmp_path / "nope.parquet"), 3, "does not exist")
    assert_one_line_error(cli("datasets", "add", "m", "webdataset", tmp_path / "nope"), 3, "does not exist")
    assert_one_line_error(cli("datasets", "add", "m", "laion", tmp_path / "nope"), 3, "")
    cli("init")
    assert_one_line_error(cli("embed", "nope"), 2, "dataset 'nope' not found")
    assert_one_line_error(cli("cluster", "nope.image"), 2, "not found")
    assert_one_line_error(cli("prune", "nope", "--step", "random:keep_fraction=0.5"), 2, "not found")
    assert_one_line_error(cli("export", "nope", "--out", tmp_path / "x.txt"), 2, "not found")
    assert_one_line_error(cli("jobs", "status", "nope"), 2, "not found")
    assert_one_line_error(cli("train", "detector", tmp_path / "nope.json", "--steps", "2", "-o", "warmup_steps=0"), 3, "not found")
    assert_one_line_error(cli("eval", "detection", tmp_path / "nope", "--model", "x.pt"), 3, "not found")


def test_parquet_without_the_needed_columns(cli, tmp_path):
    pq.write_table(pa.table({"foo": [1, 2], "bar": ["a", "b"]}), tmp_path / "cols.parquet")
    assert_one_line_error(cli("datasets", "add", "c", "parquet", tmp_path / "cols.parquet"), 3, "column")
    pq.write_table(pa.table({"path": ["a.png"], "caption": ["x"]}), tmp_path / "named.parquet")
    assert_one_line_error(cli("datasets", "add", "c", "parquet", tmp_path / "named.parquet", "-o", "caption_col=nope"),
                          3, "nope")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    assert_one_line_error(cli("datasets", "add", "c", "parquet", tmp_path / "junk.parquet"), 3, "")
    rel = tmp_path / "rel"
    write_release(rel, np.ones((4, 8), np.float32))
    pq.write_table(pa.table({"foo": [1, 2, 3, 4]}), rel / "metadata" / "metadata_0.parquet")
    res = cli("datasets", "add", "r", "laion", rel)  # no id column: ids are <part>:<row>, documented
    assert res.code == 0 or res.code == 3, res.stderr
    assert "Traceback" not in res.stderr


def test_wrong_embedding_width_and_mismatched_release(cli, tmp_path):
    write_release(tmp_path / "rel", np.ones((6, 16), np.float32))
    assert cli("datasets", "add", "rel", "laion", tmp_path / "rel").code == 0
    assert_one_line_error(cli("embeddings", "import-laion", "rel", "--model", "ViT-B-32"), 3, "16")
    # metadata with more rows than the embedding file: not row-aligned
    bad = tmp_path / "bad"
    write_release(bad, np.ones((6, 16), np.float32))
    pq.write_table(pa.table({"uid": [f"{i:032x}" for i in range(9)], "caption": ["c"] * 9}),
                   bad / "metadata" / "metadata_0.parquet")
    res = cli("datasets", "add", "bad", "laion", bad)
    if res.code == 0:
        res = cli("embeddings", "import-laion", "bad", "--model", "synthetic")
    assert_one_line_error(res, 3, "")
    # a 1-D / 3-D embedding file
    flat = tmp_path / "flat"
    write_release(flat, np.ones((6, 16), np.float32))
    np.save(flat / "img_emb" / "img_emb_0.npy", np.ones(6, np.float32))
    res = cli("datasets", "add", "flat", "laion", flat)
    if res.code == 0:
        res = cli("embeddings", "import-laion", "flat", "--model", "synthetic")
    assert_one_line_error(res, 3, "")


@pytest.fixture()
def two_sets(cli, tmp_path):
    """Three imported embedding sets, 6 rows each: a and c 16-wide, b 8-wide."""
    rng = np.random.default_rng(1)
    for name, dim in (("a", 16), ("b", 8), ("c", 16)):
        write_release(tmp_path / name, rng.normal(size=(6, dim)).astype(np.float32))
        assert cli("datasets", "add", name, "laion", tmp_path / name).code == 0
        assert cli("embeddings", "import-laion", name, "--model", "synthetic", "--set-id", f"{name}.e").code == 0
    return tmp_path / "ws"


def test_k_larger_than_n_and_mixed_widths(cli, two_sets):
    assert_one_line_error(cli("cluster", "a.e", "--k", "100"), 2, "k = 100 is more than the 6 rows")
    assert_one_line_error(cli("cluster", "a.e", "--k", "1"), 2, "k")
    assert_one_line_error(cli("cluster", "a.e", "--k", "3", "--fit-sample", "2"), 2, "fit_sample")
    assert_one_line_error(cli("similarity", "a.e", "b.e", "c.e"), 3, "")
    assert Catalog(two_sets / "catalog.duckdb").query("SELECT * FROM clusterings").empty


def test_bad_pruning_and_export_parameters(cli, two_sets, tmp_path):
    assert cli("cluster", "a.e", "--k", "2", "--id", "c2", "--neighbors", "1").code == 0
    assert_one_line_error(cli("prune", "c2", "--step", "semdup"), 2, "available:")
    assert_one_line_error(cli("prune", "c2", "--step", "random:keep_fraction=2"), 2, "keep_fraction")
    assert_one_line_error(cli("prune", "c2", "--step", "random:keep_fraction=nan"), 2, "keep_fraction")
    assert_one_line_error(cli("prune", "c2", "--step", "semdedup:eps=-1"), 2, "eps")
    assert_one_line_error(cli("prune", "c2", "--step", "random:0.5"), 2, "key=value")
    assert cli("prune", "c2", "--step", "random:keep_fraction=0.5", "--id", "p").code == 0
    assert_one_line_error(cli("export", "p", "--out", tmp_path / "o.x", "--format", "csv"), 2, "format")


def test_a_workspace_from_a_newer_schema_is_refused_everywhere_and_left_alone(cli, tmp_path):
    ws = tmp_path / "ws"
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes())
    assert cli("init").code == 0
    Catalog(ws / "catalog.duckdb").execute("INSERT INTO schema_version VALUES (999, 'future', now())")
    before = (ws / "catalog.duckdb").read_bytes()
    for args in (("init",), ("datasets", "list"), ("datasets", "add", "x", "image_folder", tmp_path / "imgs"),
                 ("embed", "x"), ("cluster", "x.image"), ("jobs", "list"), ("jobs", "submit", "cluster", "-o",
                 "embedding_set=x"), ("sql", "SELECT 1"), ("prunings",)):
        assert_one_line_error(cli(*args), 5, "newer than this prunescope")
    assert (ws / "catalog.duckdb").read_bytes() == before


def test_a_corrupt_catalog_file_is_a_one_line_error(cli, tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "catalog.duckdb").write_bytes(b"this is not a duckdb database" * 100)
    before = (ws / "catalog.duckdb").read_bytes()
    assert_one_line_error(cli("datasets", "list"), 5, "")
    assert (ws / "catalog.duckdb").read_bytes() == before


def test_bad_parameters_are_one_line_errors(cli, tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png_bytes(i))
    assert cli("datasets", "add", "imgs", "image_folder", tmp_path / "imgs").code == 0
    assert_one_line_error(cli("datasets", "add", "y", "image_folder", tmp_path / "imgs", "--role", "train"), 2, "role")
    assert_one_line_error(cli("datasets", "add", "y", "image_folder", tmp_path / "imgs", "-o", "max_pixels=-5"), 2,
                          "max_pixels")
    assert_one_line_error(cli("datasets", "add", "y", "image_folder", tmp_path / "imgs", "-o", "bogus=1"), 2, "bogus")
    assert_one_line_error(cli("datasets", "add", "../y", "image_folder", tmp_path / "imgs"), 2, "invalid dataset name")
    assert_one_line_error(cli("embed", "imgs", "--modality", "audio"), 2, "modality")
    assert_one_line_error(cli("embed", "imgs", "--batch-size", "0"), 2, "batch_size")
    assert_one_line_error(cli("embed", "imgs", "--model", "no-such-model"), 2, "no-such-model")
    assert_one_line_error(cli("embed", "imgs", "--set-id", "../../escape"), 2, "invalid embedding set id")
    assert_one_line_error(cli("train", "classifier", "imgs", "--lr", "-1", "--steps", "1"), 2, "lr")
    assert_one_line_error(cli("train", "classifier", "imgs", "--noise", "pink", "--steps", "1"), 2, "noise")
    assert_one_line_error(cli("eval", "corruptions", "imgs", "--model", "x.pt", "--severities", "0,9"), 2,
                          "severit")
    assert_one_line_error(cli("eval", "corruptions", "imgs", "--model", "x.pt", "--corruptions", "rain"), 2, "rain")
    assert_one_line_error(cli("jobs", "submit", "embed", "-o", "dataset=imgs", "-o", "set_id=../x"), 2,
                          "invalid embedding set id")
    assert not list((tmp_path / "ws").glob("x")) and not (tmp_path / "x").exists()
    assert not list((tmp_path / "ws" / "runs").iterdir())  # nothing queued


def test_hostile_captions_are_printed_as_inert_text(cli, tmp_path):
    """A caption carrying terminal control sequences (clear screen, retitle, OSC 8 hyperlinks) must not reach
    the user's terminal raw through ``datasets show``."""
    root = tmp_path / "imgs"
    root.mkdir()
    hostile = ["\x1b[2J\x1b[31mRED", "\x1b]0;pwned\x07title", "bell\x07\x08\x08back", "<script>alert(1)</script>"]
    for i, cap in enumerate(hostile):
        (root / f"{i}.png").write_bytes(png_bytes(i))
        (root / f"{i}.txt").write_text(cap, encoding="utf-8")
    assert cli("datasets", "add", "h", "image_folder", root).code == 0
    show = cli("datasets", "show", "h")
    assert show.code == 0
    assert not any(c in show.stdout for c in ("\x1b", "\x07", "\x08")), repr(show.stdout)
    assert "<script>alert(1)</script>" in show.stdout  # plain text stays as it is
    assert "\\x1b]0;pwned\\x07title" in show.stdout  # shown, escaped
    # A file name is user data too: an error that names it prints it escaped.
    res = cli("datasets", "add", "h2", "image_folder", tmp_path / "\x1b[2Jgone")
    line = assert_one_line_error(res, 3, "does not exist")
    assert "\x1b" not in line and "\\x1b[2Jgone" in line


def test_the_console_entry_point_prints_one_line(tmp_path):
    """The real thing once: ``python -m core.cli`` in a subprocess, a bad-data error and a usage error."""
    import os
    import subprocess

    (tmp_path / "empty").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PRUNESCOPE_WORKSPACE=str(tmp_path / "ws"))
    proc = subprocess.run([sys.executable, "-m", "core.cli", "datasets", "add", "e", "image_folder",
                           str(tmp_path / "empty")], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")] != []
