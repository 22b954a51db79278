"""core.embed: sharded, resumable image/text embedding, the catalog row, and LAION import."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import core.models  # noqa: F401  (torch + open_clip load at collection, not inside the first test)
import core.sources.laion  # noqa: F401  (registers the laion source)
import core.sources.parquet  # noqa: F401  (registers the parquet source)
from core.datasets import open_dataset, register_dataset
from core.embed import (
    EmbedConfig,
    InjectedFailure,
    default_set_id,
    embed_dataset,
    import_laion_embeddings,
    iter_embedding_shards,
    list_embedding_sets,
    load_embedding_rows,
    load_embeddings,
    normalize_rows,
    read_shard_info,
    shard_ranges,
)
from core.errors import AlreadyExists, ConfigError, DataError, UnknownName
from core.workspace import Workspace

N_IMAGES = 40
N_CAPTIONED = 30
CORRUPT = "img_007.png"
SKIP_REASON = "truncated_image"  # a PNG signature followed by garbage
DIM = 64  # demo-vit-tiny


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_pool(folder: Path) -> None:
    """40 random pictures of 16..64 px (a few grey-scale / palette), captions on the first 30."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(N_IMAGES):
        h, w = (int(v) for v in rng.integers(16, 65, size=2))
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        img = img.convert("L") if i % 11 == 5 else img.convert("P") if i % 13 == 6 else img
        img.save(folder / f"img_{i:03d}.png")
        if i < N_CAPTIONED:
            (folder / f"img_{i:03d}.txt").write_text(f"a photo of thing {i}", encoding="utf-8")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace with ``gen`` (40 images, 30 captions, one image corrupted after registration)."""
    root = tmp_path_factory.mktemp("embed")
    make_pool(root / "src" / "gen")
    ws = Workspace(root / "ws")
    register_dataset(ws, "gen", "image_folder", root / "src" / "gen")
    (root / "src" / "gen" / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # went bad since registration
    return ws


@pytest.fixture(scope="module")
def img16(ws):
    """The reference image set (shards of 16 rows, batches of 8, no workers); other tests compare to it."""
    return embed_dataset(ws, cfg(set_id="img16"))


def cfg(**kw):
    base = {"dataset": "gen", "shard_rows": 16, "batch_size": 8, "num_workers": 0, "device": "cpu"}
    return EmbedConfig(**{**base, **kw})


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def digests(folder: Path, sub: str) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files(folder / sub).items()}


# -- configuration ---------------------------------------------------------------------------------
def test_config_defaults_and_validation():
    c = EmbedConfig("gen")
    assert (c.model, c.modality, c.dtype, c.shard_rows, c.set_id) == (
        "demo-vit-tiny", "image", "float16", 65_536, "gen.demo-vit-tiny.image")
    assert 0 <= c.num_workers <= 2
    assert EmbedConfig("gen", model="ViT-B/32", pretrained="openai", modality="both").set_id == "gen.ViT-B-32.openai.both"
    ck = EmbedConfig("gen", checkpoint="runs/r1/checkpoints/last.pt")
    assert Path(ck.checkpoint).is_absolute() and ck.set_id.startswith("gen.demo-vit-tiny.last-")
    assert len(default_set_id("d" * 40, "hf-hub:org/" + "m" * 40, None, "image")) <= 64
    for bad, match in [({"modality": "audio"}, "modality must be one of image, text, both"),
                       ({"dtype": "int8"}, "dtype must be one of"), ({"batch_size": 0}, "batch_size must be"),
                       ({"num_workers": -1}, "num_workers"), ({"shard_rows": 1.5}, "shard_rows"),
                       ({"limit": 0}, "limit"), ({"precision": "fp8"}, "precision"),
                       ({"pretrained": "openai", "checkpoint": "x.pt"}, "not both"),
                       ({"set_id": "../escape"}, "invalid embedding set id"), ({"dataset": "a b"}, "dataset name")]:
        with pytest.raises(ConfigError, match=match):
            EmbedConfig(**{"dataset": "gen", **bad})


def test_shard_ranges_and_normalisation():
    assert shard_ranges(40, 16) == [(0, 16), (16, 32), (32, 40)] and shard_ranges(0, 16) == []
    X, good = normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0]]))
    assert good.tolist() == [True, False, False]
    assert np.allclose(X, [[0.6, 0.8], [0, 0], [0, 0]]) and np.isfinite(X).all()


# -- image and text embedding ----------------------------------------------------------------------
def test_image_embedding_shards_ids_norms_and_catalog(ws, img16):
    info = img16
    index = open_dataset(ws, "gen").index
    folder = ws.dir("embeddings", "img16")
    assert info.path == folder and info.n == N_IMAGES - 1 and info.dim == DIM
    assert info.stats["image"].skipped == {SKIP_REASON: 1} and info.n_skipped == 1
    assert sorted(p.name for p in (folder / "image").iterdir()) == [
        f"part-0000{k}.{ext}" for k in range(3) for ext in ("npy", "parquet")]
    sizes = [np.load(folder / "image" / f"part-0000{k}.npy").shape for k in range(3)]
    assert sizes == [(15, DIM), (16, DIM), (8, DIM)]  # the corrupt image is index row 7
    ids, X = load_embeddings(ws, "img16")
    assert X.dtype == np.float16 and X.shape == (N_IMAGES - 1, DIM)
    assert np.allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1, atol=2e-3)
    want = index["id"].tolist()
    assert list(ids) == [i for i in want if i != CORRUPT]
    rows = load_embedding_rows(ws, "img16")
    assert rows["row"].tolist() == [i for i in range(N_IMAGES) if want[i] != CORRUPT]
    assert read_shard_info(folder / "image", 0) == {"start": 0, "stop": 16, "rows": 15,
                                                    "skipped": {SKIP_REASON: 1}}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] and meta["modalities"]["image"]["n"] == N_IMAGES - 1 and meta["dim"] == DIM
    assert meta["modalities"]["image"]["rows_per_s"] > 0 and meta["config"]["shard_rows"] == 16
    row = ws.catalog.query("SELECT * FROM embedding_sets WHERE id = 'img16'").iloc[0]
    assert (row["dataset"], row["model"], row["dim"], row["n"], row["dtype"], row["modality"], row["path"]) == (
        "gen", "demo-vit-tiny", DIM, N_IMAGES - 1, "float16", "image", "embeddings/img16")
    assert row["pretrained"] is None or pd.isna(row["pretrained"])
    assert row["images_per_s"] > 0 and "img16" in list_embedding_sets(ws)["id"].tolist()
    runs = ws.catalog.query("SELECT status, message FROM runs WHERE id = ?", [info.run_id])
    assert runs["status"].tolist() == ["done"] and "39 rows (1 skipped)" in runs["message"].iloc[0]


def test_text_embedding_skips_rows_without_caption(ws):
    info = embed_dataset(ws, cfg(set_id="txt", modality="text", dtype="float32", limit=35))
    assert info.n == N_CAPTIONED and info.stats["text"].skipped == {"missing_value": 35 - N_CAPTIONED}
    ids, X = load_embeddings(ws, "txt")
    assert X.dtype == np.float32 and np.allclose(np.linalg.norm(X, axis=1), 1, atol=1e-5)
    assert list(ids) == open_dataset(ws, "gen").index["id"].tolist()[:N_CAPTIONED]
    assert not (ws.dir("embeddings", "txt") / "image").exists()


def test_both_modalities_with_workers_match_the_single_process_run(ws, img16):
    info = embed_dataset(ws, cfg(set_id="both-w2", modality="both", num_workers=2, batch_size=5))
    assert set(info.stats) == {"image", "text"} and info.n == N_IMAGES - 1
    single_img = load_embeddings(ws, "img16")[1]
    ids, X = load_embeddings(ws, "both-w2", "image")  # batches of 5 vs 8: equal up to float rounding
    assert np.allclose(X.astype(np.float32), single_img.astype(np.float32), atol=2e-3)
    assert load_embeddings(ws, "both-w2", "text")[1].shape == (N_CAPTIONED, DIM)
    with pytest.raises(ConfigError, match="holds image and text embeddings, not audio"):
        load_embeddings(ws, "both-w2", "audio")


# -- resuming --------------------------------------------------------------------------------------
def test_injected_failure_resumes_to_byte_identical_shards(ws):
    reference = embed_dataset(ws, cfg(set_id="ref-run"))
    with pytest.raises(InjectedFailure):
        embed_dataset(ws, cfg(set_id="crashy"), fail_after_shards=1)
    folder = ws.dir("embeddings", "crashy")
    assert sorted(files(folder / "image")) == ["part-00000.npy", "part-00000.parquet"]
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")]  # no temporary file visible
    assert not json.loads((folder / "meta.json").read_text())["complete"]
    assert ws.catalog.query("SELECT * FROM embedding_sets WHERE id = 'crashy'").empty
    assert ws.catalog.query("SELECT status FROM runs WHERE config_json LIKE '%crashy%'")["status"].tolist() == ["failed"]

    resumed = embed_dataset(ws, cfg(set_id="crashy"))
    assert resumed.stats["image"].shards_reused == 1 and resumed.stats["image"].shards_computed == 2
    assert digests(folder, "image") == digests(ws.dir("embeddings", "ref-run"), "image")
    assert resumed.n == reference.n and resumed.stats["image"].skipped == {SKIP_REASON: 1}

    again = embed_dataset(ws, cfg(set_id="crashy"))  # complete: nothing recomputed, no new run
    assert again.run_id is None and again.n == reference.n


def test_crash_between_npy_and_parquet_and_stale_temp_files(ws, img16, monkeypatch):
    import core.embed as embed_mod

    real = embed_mod.atomic.write_parquet
    calls = []

    def dies_on_second_shard(dest, table, **kw):
        calls.append(dest)
        if len(calls) == 2:
            raise OSError("disk went away")
        return real(dest, table, **kw)

    monkeypatch.setattr(embed_mod.atomic, "write_parquet", dies_on_second_shard)
    with pytest.raises(OSError, match="disk went away"):
        embed_dataset(ws, cfg(set_id="torn"))
    monkeypatch.setattr(embed_mod.atomic, "write_parquet", real)
    folder = ws.dir("embeddings", "torn", "image")
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.npy", "part-00000.parquet", "part-00001.npy"]
    stale = folder / ".part-00002.npy.tmp-999999999-abcd"  # a writer killed with SIGKILL (no such pid)
    stale.write_bytes(b"partial")
    live = folder / f".part-00002.npy.tmp-{os.getppid()}-abcd"  # a live process's file is left alone
    live.write_bytes(b"partial")
    embed_dataset(ws, cfg(set_id="torn"))
    assert not stale.exists() and live.exists()
    live.unlink()
    assert digests(ws.dir("embeddings", "torn"), "image") == digests(ws.dir("embeddings", "img16"), "image")


def test_existing_set_with_another_config_is_refused_unless_replaced(ws):
    embed_dataset(ws, cfg(set_id="cfgcheck", limit=4))
    with pytest.raises(ConfigError, match=r"exists with a different configuration \(.*n_rows 4 -> 6"):
        embed_dataset(ws, cfg(set_id="cfgcheck", limit=6))
    info = embed_dataset(ws, cfg(set_id="cfgcheck", limit=6), replace=True)
    assert info.n == 6 and load_embeddings(ws, "cfgcheck")[1].shape == (6, DIM)
    stray = ws.dir("embeddings", "stray", "image")
    stray.mkdir(parents=True)
    (stray / "part-00000.npy").write_bytes(b"")
    with pytest.raises(AlreadyExists, match="holds shards but no meta.json"):
        embed_dataset(ws, cfg(set_id="stray"))


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_fail_with_one_line(ws, tmp_path):
    with pytest.raises(UnknownName, match="dataset 'nope' not found"):
        embed_dataset(ws, cfg(dataset="nope"))
    with pytest.raises(UnknownName, match="model architecture 'demo-vit-tiyn' not found"):
        embed_dataset(ws, cfg(model="demo-vit-tiyn"))
    other = Workspace(tmp_path / "ws")
    make_pool(tmp_path / "nocap")
    for p in (tmp_path / "nocap").glob("*.txt"):
        p.unlink()
    register_dataset(other, "nocap", "image_folder", tmp_path / "nocap")
    with pytest.raises(DataError, match="has no captions to embed") as info:
        embed_dataset(other, cfg(dataset="nocap", modality="text"))
    assert info.value.one_line().endswith("(hint: use --modality image)")
    pd.DataFrame({"url": [f"https://example.com/{i}.jpg" for i in range(3)], "caption": ["a", "b", "c"]}).to_parquet(
        tmp_path / "urls.parquet")
    register_dataset(other, "urls", "parquet", tmp_path / "urls.parquet")
    with pytest.raises(DataError, match="has no local images to embed"):
        embed_dataset(other, cfg(dataset="urls"))
    with pytest.raises(UnknownName, match="embedding set 'missing' not found"):
        load_embeddings(other, "missing")


# -- LAION import ----------------------------------------------------------------------------------
def make_laion(root: Path, sizes=(12, 9), dim=DIM) -> dict[str, np.ndarray]:
    """A clip-retrieval style release: float16 unit rows; partition 1 has a NaN row and an off-norm row."""
    rng = np.random.default_rng(3)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True)
    vectors = {}
    for p, n in enumerate(sizes):
        for kind in ("img", "text"):
            X = rng.normal(size=(n, dim)).astype(np.float32)
            X /= np.linalg.norm(X, axis=1, keepdims=True)
            if p == 1 and kind == "img":
                X[2] = np.nan
                X[4] *= 1.5
            np.save(root / f"{kind}_emb" / f"{kind}_emb_{p}.npy", X.astype(np.float16))
            vectors[f"{kind}{p}"] = X
        pd.DataFrame({"key": [f"{p:04d}{i:05d}" for i in range(n)], "caption": [f"cap {p} {i}" for i in range(n)],
                      "url": [f"https://x/{p}/{i}.jpg" for i in range(n)]}).to_parquet(
            root / "metadata" / f"metadata_{p}.parquet")
    return vectors


def test_laion_import_writes_the_standard_layout(ws, tmp_path):
    vectors = make_laion(tmp_path / "laion")
    register_dataset(ws, "laion_small", "laion", tmp_path / "laion")
    index = open_dataset(ws, "laion_small").index
    assert len(index) == 20  # the NaN row was skipped at registration
    info = import_laion_embeddings(ws, "laion_small", model="demo-vit-tiny", modality="both", shard_rows=8)
    assert info.id == "laion_small.demo-vit-tiny.both" and info.n == 20 and info.dim == DIM
    assert info.stats["image"].repaired == {"renormalised": 1} and info.stats["image"].n_shards == 3
    ids, X = load_embeddings(ws, info.id, "image")
    assert list(ids) == index["id"].tolist() and X.dtype == np.float16
    assert np.allclose(np.linalg.norm(X.astype(np.float32), axis=1), 1, atol=2e-3)
    want = np.concatenate([vectors["img0"], np.delete(vectors["img1"], 2, axis=0)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(X.astype(np.float32), want, atol=2e-3)
    _, T = load_embeddings(ws, info.id, "text")
    assert np.allclose(T.astype(np.float32)[:12], vectors["text0"], atol=2e-3)
    row = ws.catalog.query("SELECT modality, n, images_per_s FROM embedding_sets WHERE id = ?", [info.id]).iloc[0]
    assert row["modality"] == "both" and row["n"] == 20 and row["images_per_s"] > 0
    shards = list(iter_embedding_shards(ws, info.id, "image"))
    assert [len(s[0]) for s in shards] == [8, 8, 4] and isinstance(shards[0][2], np.memmap)
    assert import_laion_embeddings(ws, "laion_small", model="demo-vit-tiny", modality="both",
                                   shard_rows=8).run_id is None  # already complete


def test_laion_import_checks_kind_and_width(ws, tmp_path):
    make_laion(tmp_path / "laion2", sizes=(5,))
    register_dataset(ws, "laion_w", "laion", tmp_path / "laion2")
    with pytest.raises(DataError, match="are 64-wide but ViT-B-32 embeds 512-wide"):
        import_laion_embeddings(ws, "laion_w", model="ViT-B-32", pretrained="openai")
    info = import_laion_embeddings(ws, "laion_w", model="generator-latents")  # names outside open_clip are labels
    assert info.n == 5 and info.id == "laion_w.generator-latents.image"
    with pytest.raises(ConfigError, match="is a image_folder dataset, not a LAION embedding release"):
        import_laion_embeddings(ws, "gen", model="demo-vit-tiny")


# -- the worker / device split of the image transform ----------------------------------------------
@pytest.mark.parametrize("resize_mode", ["shortest", "squash", "longest"])
def test_uint8_batches_normalised_on_device_equal_the_open_clip_transform(resize_mode):
    import open_clip
    import torch

    from core.embed import BatchNormalizer, split_transform

    transform = open_clip.image_transform(48, is_train=False, resize_mode=resize_mode)
    pil_steps, mean, std = split_transform(transform)
    rng = np.random.default_rng(1)
    pics = [Image.fromarray(rng.integers(0, 255, (int(h), int(w), 3), dtype=np.uint8))
            for h, w in rng.integers(8, 120, size=(6, 2))]
    pics += [pics[0].convert("L"), pics[1].convert("P"), pics[2].convert("RGBA")]
    want = torch.stack([transform(p) for p in pics])
    crops = torch.stack([torch.from_numpy(np.array(pil_steps(p).convert("RGB"), dtype=np.uint8)) for p in pics])
    assert crops.dtype == torch.uint8
    assert torch.equal(BatchNormalizer(mean, std, torch.device("cpu"))(crops), want)
    assert split_transform(lambda img: img) is None
