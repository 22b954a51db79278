"""The demo pool: a LAION-like train pool as img2dataset shards, its ground truth and LAION layout.

The whole pool is first *planned* (cheap, vectorised, one seeded stream): which downloads failed,
which samples are junk, exact or near duplicates of an earlier sample, their concept (Zipf
frequencies), background and caption. Each shard then renders its images from per-sample seeds, so
shards are independent parts: an exact duplicate re-renders its original's bytes instead of reading
an earlier shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from core.atomic import atomic_path, save_npy, write_json, write_parquet
from core.demo import draw
from core.demo.captions import CAPTION_KIND_P, CAPTION_KINDS, make_caption
from core.demo.concepts import BACKGROUND_NAMES, BACKGROUNDS, COLOURS, SHAPES
from core.demo.spec import (
    CAPTION,
    IMAGE_SIZE,
    LATENT,
    LATENT_BASIS,
    NEAR,
    ORDER,
    PLAN,
    POOL,
    Part,
    World,
)

log = logging.getLogger(__name__)

NORMAL, EXACT_DUP, NEAR_DUP, JUNK = 0, 1, 2, 3
JUNK_KINDS = ("noise", "text")
FAILURE_RATE = 0.02
KIND_RATES = {JUNK: 0.03, EXACT_DUP: 0.05, NEAR_DUP: 0.07}
ZIPF_EXPONENT = 1.1
DOWNLOAD_ERRORS = ("HTTP Error 404: Not Found", "HTTP Error 403: Forbidden", "The read operation timed out",
                   "<urlopen error [Errno -2] Name or service not known>", "image file is truncated")
ORIGINAL_SIZES = ((640, 480), (800, 600), (1024, 768), (500, 500), (1200, 800), (300, 300), (768, 1024))
#: Dimension of the generator-latent embeddings of the LAION layout.
LATENT_DIM = 64
#: Real crawls hold a few files that arrive broken; one in BROKEN_EVERY samples is planted as such
#: (by index residue, so every size has some): a truncated JPEG, garbage bytes, or a caption that is
#: not UTF-8. Registration must count them (skipped / repaired) rather than fail.
BROKEN_EVERY = 613
BROKEN_RESIDUES = {101: "truncated_image", 307: "corrupt_image", 509: "caption_not_utf8"}


@dataclass(frozen=True)
class PoolPlan:
    """Everything about the pool except pixels; arrays are indexed by global sample number."""

    shard_size: int
    ok: np.ndarray  # (N,) bool: the download succeeded (the sample is in its tar)
    kind: np.ndarray  # (N,) int: NORMAL, EXACT_DUP, NEAR_DUP or JUNK
    concept: np.ndarray  # (N,) int: class index, -1 for junk
    dup_of: np.ndarray  # (N,) int: global number of the original, -1 if not a duplicate
    junk_kind: np.ndarray  # (N,) int: index into JUNK_KINDS, -1 if not junk
    background: np.ndarray  # (N,) int: index into BACKGROUND_NAMES
    quality: np.ndarray  # (N,) int: JPEG quality
    original_wh: np.ndarray  # (N, 2) int: the "original" image size before img2dataset's resize
    caption_kind: list[str]
    caption: list[str]
    error: list[str | None]

    @property
    def n(self) -> int:
        return len(self.ok)

    def key(self, i: int) -> str:
        """The img2dataset key of sample i: shard * 10^4 + index within the shard, 9 digits."""
        shard, j = divmod(int(i), self.shard_size)
        return f"{shard * 10_000 + j:09d}"

    def url(self, i: int, seed: int) -> str:
        digest = hashlib.sha1(f"{seed}-{i}".encode()).hexdigest()[:16]
        return f"https://demo.invalid/img/{digest}.jpg"


def zipf_probabilities(world: World) -> np.ndarray:
    """(K,) concept frequencies: 1 / rank^1.1 with ranks shuffled by the seed."""
    k = world.size.n_classes
    ranks = world.rng(PLAN, 1).permutation(k) + 1
    p = 1.0 / ranks.astype(np.float64) ** ZIPF_EXPONENT
    return p / p.sum()


def _pick_originals(rng: np.random.Generator, kind: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """dup_of for every sample: a uniformly drawn earlier NORMAL, downloaded sample (or -1).

    Duplicates with no earlier candidate become NORMAL (``kind`` is edited in place).
    """
    dup_of = np.full(len(kind), -1, dtype=np.int64)
    originals = np.flatnonzero((kind == NORMAL) & ok)
    dups = np.flatnonzero((kind == EXACT_DUP) | (kind == NEAR_DUP))
    n_before = np.searchsorted(originals, dups)
    pick = (rng.random(len(dups)) * n_before).astype(np.int64)
    has = n_before > 0
    dup_of[dups[has]] = originals[pick[has]]
    kind[dups[~has]] = NORMAL
    return dup_of


def make_plan(world: World) -> PoolPlan:
    """Plan the whole pool from the seed (no pixels)."""
    n = world.size.pool
    rng = world.rng(PLAN)
    ok = rng.random(n) >= FAILURE_RATE
    u = rng.random(n)
    edges = np.cumsum([KIND_RATES[JUNK], KIND_RATES[EXACT_DUP], KIND_RATES[NEAR_DUP]])
    kind = np.select([u < edges[0], u < edges[1], u < edges[2]], [JUNK, EXACT_DUP, NEAR_DUP], NORMAL)
    concept = rng.choice(world.size.n_classes, size=n, p=zipf_probabilities(world))
    dup_of = _pick_originals(rng, kind, ok)
    is_dup = dup_of >= 0
    concept[is_dup] = concept[dup_of[is_dup]]
    concept[kind == JUNK] = -1
    junk_kind = np.where(kind == JUNK, rng.integers(len(JUNK_KINDS), size=n), -1)
    background = rng.integers(len(BACKGROUND_NAMES), size=n)
    background[is_dup] = background[dup_of[is_dup]]
    quality = np.where(kind == NEAR_DUP, rng.integers(60, 86, size=n), 90)
    original_wh = np.asarray(ORIGINAL_SIZES)[rng.integers(len(ORIGINAL_SIZES), size=n)]
    kinds = np.where(kind == JUNK, rng.integers(2, 4, size=n), rng.choice(4, size=n, p=CAPTION_KIND_P))
    errors = rng.integers(len(DOWNLOAD_ERRORS), size=n)
    caption_kind = [CAPTION_KINDS[k] for k in kinds]
    captions = _captions(world, concept, background, caption_kind)
    error = [None if ok[i] else DOWNLOAD_ERRORS[errors[i]] for i in range(n)]
    return PoolPlan(world.size.shard_size, ok, kind, concept, dup_of, junk_kind, background, quality,
                    original_wh, caption_kind, captions, error)


def _captions(world: World, concept: np.ndarray, background: np.ndarray, kinds: list[str]) -> list[str]:
    rng = world.rng(CAPTION)
    concepts = world.concepts
    return [make_caption(rng, kinds[i], concepts[c] if c >= 0 else None, BACKGROUND_NAMES[background[i]], concepts)
            for i, c in enumerate(concept.tolist())]


# ----------------------------------------------------------------------------------------------
# Pixels


def photo_params(world: World, i: int) -> tuple[draw.PhotoParams, np.random.Generator]:
    """The photo parameters of NORMAL sample i and the generator to render its noise with."""
    plan = world.plan
    concept = world.concepts[int(plan.concept[i])]
    rng = world.rng(POOL, i)
    bg = BACKGROUNDS[BACKGROUND_NAMES[int(plan.background[i])]]
    return draw.sample_photo(rng, concept.shape, concept.rgb, bg, IMAGE_SIZE), rng


def sample_bytes(world: World, i: int) -> bytes:
    """The JPEG bytes of pool sample i (rendering its original for duplicates)."""
    plan = world.plan
    kind = int(plan.kind[i])
    if kind == EXACT_DUP:
        return sample_bytes(world, int(plan.dup_of[i]))
    if kind == NEAR_DUP:
        original = draw.decode_jpeg(sample_bytes(world, int(plan.dup_of[i])))
        return draw.encode_jpeg(draw.near_copy(original, world.rng(NEAR, i)), int(plan.quality[i]))
    if kind == JUNK:
        rng = world.rng(POOL, i)
        render = draw.render_text_junk if JUNK_KINDS[int(plan.junk_kind[i])] == "text" else draw.render_noise_junk
        return draw.encode_jpeg(render(rng, IMAGE_SIZE), int(plan.quality[i]))
    params, rng = photo_params(world, i)
    return draw.encode_jpeg(draw.render_photo(params, rng, IMAGE_SIZE), int(plan.quality[i]))


# ----------------------------------------------------------------------------------------------
# Shards


def truth_row(world: World, i: int) -> dict[str, Any]:
    """Ground-truth fields of sample i (also stored in its webdataset json)."""
    plan = world.plan
    c = int(plan.concept[i])
    kind = int(plan.kind[i])
    return {
        "concept": c,
        "concept_name": world.concepts[c].name if c >= 0 else None,
        "caption_kind": plan.caption_kind[i],
        "is_exact_dup": kind == EXACT_DUP,
        "is_near_dup": kind == NEAR_DUP,
        "dup_of": plan.key(int(plan.dup_of[i])) if plan.dup_of[i] >= 0 else None,
        "is_junk": kind == JUNK,
        "junk_kind": JUNK_KINDS[int(plan.junk_kind[i])] if kind == JUNK else None,
        "background": BACKGROUND_NAMES[int(plan.background[i])] if kind != JUNK else None,
        "broken": broken_kind(i),
    }


def broken_kind(i: int) -> str | None:
    """How sample i arrives broken in its tar (a key of BROKEN_RESIDUES' values), or None."""
    return BROKEN_RESIDUES.get(i % BROKEN_EVERY)


def _tar_payload(world: World, i: int) -> tuple[bytes, bytes]:
    """The image and caption bytes stored in the tar for sample i (broken ones planted here)."""
    data = sample_bytes(world, i)
    caption = world.plan.caption[i].encode("utf-8")
    kind = broken_kind(i)
    if kind == "truncated_image":
        data = data[: len(data) // 2]
    elif kind == "corrupt_image":
        data = data[:4] + world.rng(POOL, i, 1).integers(0, 256, 400, dtype=np.uint8).tobytes()
    elif kind == "caption_not_utf8":
        caption = (world.plan.caption[i] + " – café").encode("cp1252", errors="replace")
    return data, caption


def _completion_order(world: World, shard: int, indices: np.ndarray) -> np.ndarray:
    """Indices in a download-completion-like order: roughly ascending, locally shuffled."""
    jitter = world.rng(ORDER, shard).normal(0, 12, size=len(indices))
    return indices[np.argsort(indices + jitter, kind="stable")]


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def _parquet_row(world: World, i: int, sha: str | None) -> dict[str, Any]:
    plan = world.plan
    ok = bool(plan.ok[i])
    return {
        "key": plan.key(i), "status": "success" if ok else "failed_to_download", "error_message": plan.error[i],
        "url": plan.url(i, world.seed), "caption": plan.caption[i],
        "width": IMAGE_SIZE if ok else None, "height": IMAGE_SIZE if ok else None,
        "original_width": int(plan.original_wh[i, 0]) if ok else None,
        "original_height": int(plan.original_wh[i, 1]) if ok else None,
        "exif": None, "sha256": sha,
    }


def write_shard(world: World, shard: int) -> dict[str, Any]:
    """Write ``pool/<shard>.tar`` (+ ``.parquet``, ``_stats.json``) as img2dataset would."""
    plan = world.plan
    lo, hi = shard * plan.shard_size, min(plan.n, (shard + 1) * plan.shard_size)
    order = _completion_order(world, shard, np.arange(lo, hi))
    rows = []
    folder = world.out / "pool"
    with atomic_path(folder / f"{shard:05d}.tar") as tmp, tarfile.open(tmp, "w") as tar:
        for i in world.bar(order.tolist(), f"pool shard {shard}"):
            if not plan.ok[i]:
                rows.append(_parquet_row(world, i, None))
                continue
            data, caption = _tar_payload(world, i)
            row = _parquet_row(world, i, hashlib.sha256(data).hexdigest())
            rows.append(row)
            sample = {k: v for k, v in row.items() if k != "exif"} | truth_row(world, i)
            key = row["key"]
            _add_member(tar, f"{key}.jpg", data)
            _add_member(tar, f"{key}.json", json.dumps(sample, indent=4).encode("utf-8"))
            _add_member(tar, f"{key}.txt", caption)
    table = pd.DataFrame(rows).astype({"width": "Int64", "height": "Int64", "original_width": "Int64",
                                       "original_height": "Int64", "exif": "string", "error_message": "string"})
    write_parquet(folder / f"{shard:05d}.parquet", table)
    n_ok = int(plan.ok[lo:hi].sum())
    status = pd.Series([r["error_message"] or "success" for r in rows]).value_counts().sort_index()
    write_json(folder / f"{shard:05d}_stats.json", {
        "count": hi - lo, "successes": n_ok, "failed_to_download": hi - lo - n_ok, "failed_to_resize": 0,
        "status_dict": {str(k): int(v) for k, v in status.items()}, "partial": False,
    })
    return {"pool": n_ok, "pool_failed": hi - lo - n_ok}


def write_truth(world: World) -> dict[str, Any]:
    """``pool_truth.parquet``: one row per downloaded pool sample, in key order."""
    plan = world.plan
    rows = []
    for i in np.flatnonzero(plan.ok).tolist():
        rows.append({"key": plan.key(i), "shard": i // plan.shard_size, "url": plan.url(i, world.seed),
                     "caption": plan.caption[i]} | truth_row(world, i))
    table = pd.DataFrame(rows).astype({"concept_name": "string", "dup_of": "string", "junk_kind": "string",
                                       "background": "string", "broken": "string"})
    write_parquet(world.out / "pool_truth.parquet", table)
    counts = table[["is_exact_dup", "is_near_dup", "is_junk"]].sum()
    return {"pool_exact_dups": int(counts["is_exact_dup"]), "pool_near_dups": int(counts["is_near_dup"]),
            "pool_junk": int(counts["is_junk"]), "pool_broken": int(table["broken"].notna().sum())}


# ----------------------------------------------------------------------------------------------
# LAION layout


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def latent_vectors(world: World) -> np.ndarray:
    """(N, 64) float32 unit vectors: the generator's latent description of every pool sample.

    These are *generator-latent embeddings, not CLIP*: the class prototype (a shape direction plus
    a colour direction plus a class-specific one) + the background direction + a linear image of the
    pose + isotropic noise. Exact duplicates get their original's vector, near duplicates a very
    close one (cosine about 0.999), junk a broad cloud around one direction per junk kind. Rows of
    failed downloads are computed but unused.
    """
    plan = world.plan
    basis = world.rng(LATENT_BASIS)
    shape_dir = _unit(basis.normal(size=(len(SHAPES), LATENT_DIM)))
    colour_dir = _unit(basis.normal(size=(len(COLOURS), LATENT_DIM)))
    own_dir = _unit(basis.normal(size=(world.size.n_classes, LATENT_DIM)))
    bg_dir = _unit(basis.normal(size=(len(BACKGROUND_NAMES), LATENT_DIM)))
    pose_map = _unit(basis.normal(size=(4, LATENT_DIM)))
    junk_dir = _unit(basis.normal(size=(len(JUNK_KINDS), LATENT_DIM)))
    shapes, colours = list(SHAPES), list(COLOURS)
    proto = np.stack([_unit(shape_dir[shapes.index(c.shape)] + colour_dir[colours.index(c.colour)]
                            + 0.7 * own_dir[c.index]) for c in world.concepts])
    rng = world.rng(LATENT)
    noise = rng.normal(0, 1, size=(plan.n, LATENT_DIM))
    vec = np.zeros((plan.n, LATENT_DIM))
    for i in range(plan.n):
        kind = int(plan.kind[i])
        if kind == JUNK:
            vec[i] = junk_dir[plan.junk_kind[i]] + 0.12 * noise[i]
        elif kind == EXACT_DUP:
            vec[i] = vec[plan.dup_of[i]]
        elif kind == NEAR_DUP:
            vec[i] = vec[plan.dup_of[i]] + 0.005 * noise[i]
        else:
            p, _ = photo_params(world, i)
            pose = np.array([p.pose.radius / IMAGE_SIZE - 0.32, p.pose.cx / IMAGE_SIZE - 0.5,
                             p.pose.cy / IMAGE_SIZE - 0.5, p.noise / 20 - 0.27]) * 2.5
            vec[i] = proto[plan.concept[i]] + 0.2 * bg_dir[plan.background[i]] + pose @ pose_map + 0.03 * noise[i]
        vec[i] /= np.linalg.norm(vec[i])
    return vec.astype(np.float32)


SIMILARITY = {"correct": (0.31, 0.025), "wrong": (0.17, 0.025), "generic": (0.14, 0.03), "spam": (0.10, 0.03)}


def write_laion(world: World) -> dict[str, Any]:
    """``laion/img_emb/img_emb_<P>.npy`` + ``laion/metadata/metadata_<P>.parquet``, rows dealt round-robin.

    ``similarity`` imitates LAION's CLIP image-text score: high for correct captions, low for the rest.
    """
    plan = world.plan
    vec = latent_vectors(world)
    rows = np.flatnonzero(plan.ok)
    sim_rng = world.rng(LATENT, 1)
    sims = [round(float(sim_rng.normal(*SIMILARITY[plan.caption_kind[i]])), 4) for i in rows.tolist()]
    meta = pd.DataFrame({
        "image_path": [plan.key(i) for i in rows.tolist()],
        "caption": [plan.caption[i] for i in rows.tolist()],
        "url": [plan.url(i, world.seed) for i in rows.tolist()],
        "key": [plan.key(i) for i in rows.tolist()],
        "similarity": sims,
    })
    parts = world.size.laion_partitions
    for p in range(parts):
        save_npy(world.out / "laion" / "img_emb" / f"img_emb_{p}.npy", vec[rows[p::parts]].astype(np.float16))
        write_parquet(world.out / "laion" / "metadata" / f"metadata_{p}.parquet",
                      meta.iloc[p::parts].reset_index(drop=True))
    return {"laion_rows": len(rows), "laion_partitions": parts}


def pool_parts(world: World) -> list[Part]:
    """The pool's parts: one per shard, then the ground truth and the LAION layout."""
    parts = [Part(f"pool-{s:05d}", (f"pool/{s:05d}.tar", f"pool/{s:05d}.parquet", f"pool/{s:05d}_stats.json"),
                  partial(write_shard, shard=s)) for s in range(world.size.n_shards)]
    parts.append(Part("pool_truth", ("pool_truth.parquet",), write_truth))
    parts.append(Part("laion", ("laion",), write_laion))
    return parts
