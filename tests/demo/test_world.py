"""The demo world generator: determinism, resume, idempotence, layout and ground truth.

Most tests share one *micro* world (6 classes, 300 pool samples in 3 shards; about a second to build);
the real ``tiny`` size is built once by a slow test.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from core.demo.spec import World
from core.demo.world import SIZES, WORLD_VERSION, WorldSize, generate_world
from core.errors import ConfigError

MICRO = WorldSize("micro", n_classes=6, pool=300, shard_size=120, reference_per_class=3, bench_per_class=3,
                  detection_scenes=6, laion_partitions=2)


def build(out: Path, seed: int = 0) -> dict:
    return generate_world(out, seed=seed, _size=MICRO)


def file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_tar(path: Path) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    with tarfile.open(path) as tar:
        members = tar.getmembers()
        data = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    return members, data


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A micro world shared read-only by the tests of this module."""
    out = tmp_path_factory.mktemp("world") / "demo"
    return out, build(out)


@pytest.fixture(scope="module")
def pool_images(world) -> dict[str, bytes]:
    """key -> jpg bytes of every pool sample."""
    out, _ = world
    images = {}
    for tar in sorted((out / "pool").glob("*.tar")):
        _, data = read_tar(tar)
        images.update({name[:-4]: b for name, b in data.items() if name.endswith(".jpg")})
    return images


@pytest.fixture(scope="module")
def truth(world) -> pd.DataFrame:
    return pd.read_parquet(world[0] / "pool_truth.parquet").set_index("key")


# ------------------------------------------------------------------------------------------------
# API, determinism, resume, idempotence


def test_unknown_size_is_a_config_error_listing_sizes(tmp_path):
    with pytest.raises(ConfigError) as exc:
        generate_world(tmp_path / "w", size="huge")
    assert all(name in str(exc.value) for name in ("tiny", "small", "full"))
    with pytest.raises(ConfigError, match="seed"):
        generate_world(tmp_path / "w", size="tiny", seed=-1)
    assert not (tmp_path / "w").exists()


def test_sizes_give_multi_shard_pools():
    assert set(SIZES) == {"tiny", "small", "full"}
    assert all(s.n_shards >= 2 and s.laion_partitions >= 2 for s in SIZES.values())
    assert [s.n_classes for s in SIZES.values()] == [12, 24, 40]


def test_same_seed_gives_identical_files(world, tmp_path):
    out, info = world
    again = build(tmp_path / "again")
    assert again == info
    assert file_hashes(tmp_path / "again") == file_hashes(out)


def test_other_seed_gives_other_files(world, tmp_path):
    out, _ = world
    build(tmp_path / "other", seed=1)
    other, base = file_hashes(tmp_path / "other"), file_hashes(out)
    for name in ("pool/00000.tar", "pool/00001.parquet", "laion/img_emb/img_emb_0.npy", "classes.json"):
        assert other[name] != base[name], name


def test_world_json_is_written_last_and_returned(world):
    out, info = world
    assert json.loads((out / "world.json").read_text()) == info
    assert info["version"] == WORLD_VERSION and info["size"] == "micro" and info["seed"] == 0
    assert info["n_classes"] == MICRO.n_classes and info["generator"] == "prunescope demo world"
    marker_times = [p.stat().st_mtime_ns for p in (out / ".done").glob("*.json")]
    assert (out / "world.json").stat().st_mtime_ns >= max(marker_times)


def test_second_call_returns_at_once_without_writing(world):
    out, info = world
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert build(out) == info
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_resume_rebuilds_only_the_missing_part_with_the_same_bytes(world, tmp_path):
    out, info = world
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # An interrupted build: world.json not yet written, shard 1 and val not finished, a stray temp file.
    (copy / "world.json").unlink()
    for rel in (".done/pool-00001.json", "pool/00001.tar", ".done/val.json"):
        (copy / rel).unlink()
    shutil.rmtree(copy / "benchmarks" / "val" / sorted(p.name for p in (copy / "benchmarks/val").iterdir())[0])
    (copy / "pool" / ".00001.tar.tmp-1-deadbeef").write_bytes(b"partial")
    untouched = (copy / "pool" / "00000.tar").stat().st_mtime_ns
    assert build(copy) == info
    assert file_hashes(copy) == file_hashes(out)
    assert (copy / "pool" / "00000.tar").stat().st_mtime_ns == untouched


def test_other_world_in_the_same_folder_is_refused(world, tmp_path):
    out, _ = world
    with pytest.raises(ConfigError, match="another folder"):
        build(out, seed=1)
    with pytest.raises(ConfigError, match="another folder"):
        generate_world(out, size="tiny")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        build(foreign)


def test_partial_world_of_another_seed_is_refused(world, tmp_path):
    out = tmp_path / "w"
    shutil.copytree(world[0], out)
    (out / "world.json").unlink()  # interrupted before the end: only the config stamp tells
    with pytest.raises(ConfigError, match="another folder"):
        build(out, seed=4)


# ------------------------------------------------------------------------------------------------
# Layout and counts


def test_counts_in_world_json_match_the_files(world, truth):
    out, info = world
    c = info["counts"]
    n_tar_jpg = 0
    for tar in sorted((out / "pool").glob("*.tar")):
        n_tar_jpg += sum(m.name.endswith(".jpg") for m in read_tar(tar)[0])
    assert n_tar_jpg == c["pool"] == len(truth)
    parquet = pd.concat([pd.read_parquet(p) for p in sorted((out / "pool").glob("*.parquet"))])
    assert len(parquet) == MICRO.pool == c["pool"] + c["pool_failed"]
    assert (parquet["status"] == "success").sum() == c["pool"]
    assert c["pool_shards"] == len(list((out / "pool").glob("*.tar"))) == 3
    stats = [json.loads(p.read_text()) for p in sorted((out / "pool").glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == c["pool"] and sum(s["count"] for s in stats) == MICRO.pool
    for name, rel in (("reference", "reference"), ("val", "benchmarks/val"), ("sketch", "benchmarks/sketch"),
                      ("rendition", "benchmarks/rendition")):
        assert len(list((out / rel).glob("*/*.jpg"))) == c[name], name
    assert len(list((out / "benchmarks/v2").glob("*/*.jpeg"))) == c["v2"]
    assert len(pd.read_parquet(out / "benchmarks/hard/hard.parquet")) == c["hard"]
    assert len(list((out / "detection/images").glob("*.jpg"))) == c["detection_images"] == MICRO.detection_scenes
    assert c["reference"] == MICRO.n_classes * MICRO.reference_per_class
    assert c["pool_exact_dups"] == truth["is_exact_dup"].sum() and c["pool_junk"] == truth["is_junk"].sum()


def test_classes_are_in_sorted_folder_order(world):
    out, _ = world
    classes = json.loads((out / "classes.json").read_text())
    folders = [c["folder"] for c in classes]
    assert [c["index"] for c in classes] == list(range(MICRO.n_classes))
    assert folders == sorted(folders) and len(set(folders)) == len(folders)
    assert all(c["folder"] == c["name"].replace(" ", "_") == f"{c['colour']}_{c['shape']}" for c in classes)
    assert sorted(p.name for p in (out / "reference").iterdir()) == folders
    assert sorted(p.name for p in (out / "benchmarks/val").iterdir()) == folders
    templates = json.loads((out / "templates.json").read_text())
    assert len(templates) >= 8 and all("{}" in t for t in templates)


def test_v2_folders_are_class_indices(world):
    out, _ = world
    names = {p.name for p in (out / "benchmarks/v2").iterdir()}
    assert names == {str(i) for i in range(MICRO.n_classes)}


def test_rendition_covers_a_subset_of_classes(world):
    out, info = world
    rendition = {p.name for p in (out / "benchmarks/rendition").iterdir()}
    val = {p.name for p in (out / "benchmarks/val").iterdir()}
    assert rendition < val and len(rendition) == info["counts"]["rendition_classes"] == round(MICRO.n_classes * 2 / 3)


def test_images_are_64px_rgb_jpegs(world):
    out, _ = world
    for path in [*sorted((out / "benchmarks").rglob("*.jp*g"))[::7], *sorted((out / "reference").rglob("*.jpg"))]:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (64, 64)), path


def test_hard_parquet_paths_and_labels(world):
    out, _ = world
    hard = pd.read_parquet(out / "benchmarks/hard/hard.parquet")
    assert list(hard.columns[:3]) == ["path", "caption", "label"]
    assert set(hard["kind"]) == {"clutter", "occlusion", "low_contrast"}
    assert hard["label"].between(0, MICRO.n_classes - 1).all()
    assert all((out / "benchmarks/hard" / p).is_file() for p in hard["path"])


# ------------------------------------------------------------------------------------------------
# The pool: webdataset shards and ground truth


def test_tar_members_are_img2dataset_like(world, truth):
    out, _ = world
    all_failed = set()
    for shard, tar in enumerate(sorted((out / "pool").glob("*.tar"))):
        members, data = read_tar(tar)
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile() for m in members)
        keys = [m.name[:-4] for m in members if m.name.endswith(".jpg")]
        assert keys != sorted(keys), "samples must be in completion order, not sorted"
        assert all(len(k) == 9 and int(k) // 10_000 == shard for k in keys)
        parquet = pd.read_parquet(tar.with_suffix(".parquet"))
        failed = set(parquet.loc[parquet["status"] == "failed_to_download", "key"])
        assert not failed & set(keys)
        all_failed |= failed
        n_rows = min(MICRO.shard_size, MICRO.pool - shard * MICRO.shard_size)  # the last shard is short
        assert set(keys) | failed == {f"{shard * 10_000 + j:09d}" for j in range(n_rows)} == set(parquet["key"])
        for key in [k for k in keys if pd.isna(truth.loc[k, "broken"])][:20]:
            sample = json.loads(data[f"{key}.json"])
            assert data[f"{key}.txt"].decode("utf-8") == sample["caption"] == truth.loc[key, "caption"]
            assert sample["sha256"] == hashlib.sha256(data[f"{key}.jpg"]).hexdigest()
            assert sample["status"] == "success" and sample["url"].startswith("https://demo.invalid/")
            dup_of = truth.loc[key, "dup_of"]
            assert sample["concept"] == truth.loc[key, "concept"]
            assert sample["dup_of"] == (None if pd.isna(dup_of) else dup_of)
    assert all_failed, "some downloads fail, as in img2dataset"


def _intact(truth: pd.DataFrame, dups: pd.DataFrame) -> pd.DataFrame:
    """Duplicates where neither copy was planted broken (broken ones differ on purpose)."""
    broken = set(truth.index[truth["broken"].notna()])
    return dups[~dups.index.isin(broken) & ~dups["dup_of"].isin(broken)]


def test_broken_samples_are_planted(truth, pool_images):
    broken = truth[truth["broken"].notna()]
    assert set(broken["broken"]) <= {"truncated_image", "corrupt_image", "caption_not_utf8"}
    assert len(broken) >= 1
    for key, row in broken.iterrows():
        if row["broken"] == "truncated_image":
            assert pool_images[key][:2] == b"\xff\xd8" and pool_images[key][-2:] != b"\xff\xd9"


def test_exact_duplicates_have_identical_bytes(truth, pool_images):
    dups = _intact(truth, truth[truth["is_exact_dup"]])
    assert len(dups) > 0
    for key, row in dups.iterrows():
        assert pool_images[key] == pool_images[row["dup_of"]]
        assert row["concept"] == truth.loc[row["dup_of"], "concept"]
        assert not truth.loc[row["dup_of"], ["is_exact_dup", "is_near_dup", "is_junk"]].any()


def test_near_duplicates_are_visually_close(truth, pool_images):
    dups = _intact(truth, truth[truth["is_near_dup"]])
    assert len(dups) > 0

    def coarse(key: str) -> np.ndarray:  # 8x8 blocks: robust to the 1-3 px shift, sensitive to content
        return pixels(pool_images[key]).reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

    near = [np.abs(coarse(k) - coarse(r["dup_of"])).mean() for k, r in dups.iterrows()]
    keys = truth.index[~truth["is_junk"] & truth["broken"].isna()].tolist()
    rand = [np.abs(coarse(a) - coarse(b)).mean() for a, b in zip(keys[:40], keys[40:80], strict=True)]
    assert all(pool_images[k] != pool_images[r["dup_of"]] for k, r in dups.iterrows())
    assert max(near) < 15 and np.median(near) < np.median(rand) / 3


def test_junk_has_no_concept(truth):
    junk = truth[truth["is_junk"]]
    assert len(junk) > 0
    assert (junk["concept"] == -1).all() and junk["concept_name"].isna().all()
    assert set(junk["junk_kind"]) <= {"noise", "text"}
    assert (truth.loc[~truth["is_junk"], "concept"] >= 0).all()


def test_wrong_captions_name_another_concept(truth):
    wrong = truth[truth["caption_kind"] == "wrong"]
    correct = truth[truth["caption_kind"] == "correct"]
    assert len(wrong) > 0
    assert not any(r["concept_name"] in r["caption"].lower() for _, r in wrong.iterrows())
    hits = sum(r["concept_name"].split()[0] in r["caption"].lower() for _, r in correct.iterrows())
    assert hits / len(correct) > 0.9  # the colour survives templates and typos almost always


def test_zipf_frequencies_and_noise_rates_of_the_tiny_plan(tmp_path):
    plan = World(tmp_path, SIZES["tiny"], seed=0).plan  # planning only, no pixels
    counts = np.bincount(plan.concept[plan.concept >= 0], minlength=12)
    assert counts.max() >= 5 * counts.min() > 0
    kinds = pd.Series(plan.caption_kind).value_counts(normalize=True)
    assert 0.78 < kinds["correct"] < 0.88 and kinds["wrong"] > 0.05 and kinds["spam"] > 0.015
    assert 0.03 < (plan.kind == 1).mean() < 0.07 and 0.05 < (plan.kind == 2).mean() < 0.09


# ------------------------------------------------------------------------------------------------
# LAION layout and detection


def test_laion_layout_rows_unit_norm_and_aligned(world, truth):
    out, info = world
    vecs, metas = [], []
    for p in range(MICRO.laion_partitions):
        arr = np.load(out / f"laion/img_emb/img_emb_{p}.npy")
        meta = pd.read_parquet(out / f"laion/metadata/metadata_{p}.parquet")
        assert arr.dtype == np.float16 and arr.shape == (len(meta), 64)
        assert list(meta.columns) == ["image_path", "caption", "url", "key", "similarity"]
        vecs.append(arr.astype(np.float32))
        metas.append(meta)
    vec = np.concatenate(vecs)
    meta = pd.concat(metas, ignore_index=True)
    assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=2e-3)
    assert len(meta) == info["counts"]["laion_rows"] == len(truth)
    assert sorted(meta["key"]) == sorted(truth.index) and (meta["image_path"] == meta["key"]).all()
    assert list(metas[0]["key"][:2]) == sorted(truth.index)[0:3:2]  # dealt round-robin
    row = {k: i for i, k in enumerate(meta["key"])}
    for key, r in truth[truth["is_exact_dup"]].iterrows():
        assert np.array_equal(vec[row[key]], vec[row[r["dup_of"]]])
    for key, r in truth[truth["is_near_dup"]].iterrows():
        assert vec[row[key]] @ vec[row[r["dup_of"]]] > 0.99


def test_latent_vectors_separate_the_concepts(world, truth):
    out, _ = world
    vec = np.concatenate([np.load(out / f"laion/img_emb/img_emb_{p}.npy").astype(np.float32) for p in range(2)])
    keys = pd.concat([pd.read_parquet(out / f"laion/metadata/metadata_{p}.parquet") for p in range(2)])["key"]
    concept = truth.loc[keys, "concept"].to_numpy()
    ok = concept >= 0
    means = np.stack([vec[concept == k].mean(axis=0) for k in range(MICRO.n_classes)])
    assert ((vec[ok] @ means.T).argmax(axis=1) == concept[ok]).mean() > 0.95


def test_coco_annotations(world):
    out, _ = world
    coco = json.loads((out / "detection/annotations.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    cat_ids = sorted(c["id"] for c in coco["categories"])
    assert len(cat_ids) == MICRO.n_classes and cat_ids != list(range(1, MICRO.n_classes + 1)) and min(cat_ids) >= 1
    per_image = pd.Series([a["image_id"] for a in coco["annotations"]]).value_counts()
    assert per_image.min() >= 2 and per_image.max() <= 5 and set(per_image.index) == set(images)
    for a in coco["annotations"]:
        im = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= im["width"] and y + h <= im["height"]
        assert a["category_id"] in cat_ids and a["iscrowd"] == 0 and 0 < a["area"] <= w * h
    for im in images.values():
        with Image.open(out / "detection/images" / im["file_name"]) as img:
            assert img.size == (im["width"], im["height"]) == (128, 128)


def test_coco_boxes_are_tight_around_the_drawn_shape(world):
    out, _ = world
    coco = json.loads((out / "detection/annotations.json").read_text())
    first = coco["images"][0]
    img = pixels((out / "detection/images" / first["file_name"]).read_bytes())
    bg = np.median(img.reshape(-1, 3), axis=0)
    for a in coco["annotations"]:
        if a["image_id"] != first["id"]:
            continue
        x, y, w, h = a["bbox"]
        inside = img[y: y + h, x: x + w]
        assert np.abs(inside - bg).sum(axis=2).max() > 60  # the object is in the box


# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_world_builds_with_expected_counts(tmp_path):
    info = generate_world(tmp_path / "tiny", size="tiny", seed=0)
    c = info["counts"]
    assert c["pool"] + c["pool_failed"] == 2000 and c["pool_shards"] == 2 and c["classes"] == 12
    assert c["reference"] == 240 and c["val"] == 120 and c["v2"] == 120 and c["detection_images"] == 40
    assert c["rendition"] == 10 * c["rendition_classes"] < c["val"]
    assert 0.03 < c["pool_exact_dups"] / c["pool"] < 0.07 and 0.015 < c["pool_junk"] / c["pool"] < 0.045


def test_run_demo_refuses_another_world_before_starting_any_job(tmp_path):
    """The size/seed conflict is found in the calling process (one ConfigError, exit 2 at the CLI), not
    inside the first stage's job."""
    from core.demo.pipeline import DEMO_FOLDER, run_demo
    from core.demo.world import WORLD_VERSION, check_world
    from core.errors import ConfigError
    from core.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    world = ws.dir("sources", DEMO_FOLDER)
    world.mkdir(parents=True, exist_ok=True)
    (world / "world.json").write_text(json.dumps({"version": WORLD_VERSION, "size": "tiny", "seed": 0}))
    check_world(world, size="tiny", seed=0)  # the same world: fine
    with pytest.raises(ConfigError, match="already holds a demo world"):
        run_demo(ws, size="small", jobs=True)
    with pytest.raises(ConfigError, match="already holds a demo world"):
        run_demo(ws, size="tiny", seed=1, jobs=True)
    assert ws.catalog.query("SELECT count(*) AS n FROM runs").iloc[0]["n"] == 0
