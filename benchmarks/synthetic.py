"""A synthetic LAION-style workspace: clustered unit vectors with captions, urls and planted duplicates.

For benchmarks that need a large, realistic embedding set without a model or a download (clustering,
pruning and page load at 1M rows). :func:`build_synthetic_workspace` writes a LAION embedding release
(FORMATS.md: ``img_emb/img_emb_<P>.npy`` L2-normalised rows, ``metadata/metadata_<P>.parquet`` with
``image_path, caption, url, key, NSFW, similarity, width, height``) to ``<workspace>/sources/<name>/``,
registers it as a ``laion`` dataset and imports its embeddings as an embedding set.

The data (everything seeded):

- concepts: ``n_concepts`` centres on the sphere, grouped into families of ~20 that share a direction
  (so some clusters sit close to others) and all tilted toward one common direction (the "cone" of
  CLIP embeddings); concept sizes follow a Zipf law with exponent ``zipf_a``;
- rows: ``normalize(mu_c + s_c * g / sqrt(D))`` with ``g`` standard normal, a von Mises-Fisher-like
  blob; the spread ``s_c`` is log-uniform in [0.6, 1.6] per concept, so the mean cosine of a member to
  its centre ranges from ~0.53 to ~0.86 and concept complexity differs;
- duplicates: ``dup_fraction`` of the rows copy another row of their partition, half exactly (same
  vector, same caption), half nearly (cosine ~0.999, a caption of their own);
- captions: a few templates ("a photo of a <modifier> <concept>") over made-up words (one per concept,
  one per family, three modifiers per concept) and a shared list of adjectives; 1 % are missing.

Ground truth lies beside the release: ``truth.parquet`` (key, concept, dup_of, dup_kind: 0 none,
1 exact, 2 near) and ``concepts.parquet`` (concept, name, family, weight, spread).
``synthetic.json`` there (written last) records the parameters; a build with the same parameters is
reused, so a second call costs only the catalog look-ups.

    python benchmarks/synthetic.py ROOT --n 1000000 --dim 512 --concepts 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Adjectives every concept draws from (c-TF-IDF should rank them below the concept's own words).
SHARED_MODIFIERS = (
    "red", "blue", "green", "yellow", "black", "white", "orange", "purple", "small", "large", "tiny",
    "giant", "old", "vintage", "modern", "antique", "wooden", "metal", "plastic", "bright", "dark",
    "shiny", "rusty", "happy", "cute", "sleeping", "running", "flying", "broken", "golden",
)
TEMPLATES = (
    "a photo of a {m} {c}",
    "{m} {c} in the {f}",
    "{f} {c}",
    "close up of a {c} with {m} details",
    "{c} {m} stock photo",
    "{c}",
)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
#: Rows per release partition (LAION's own hold ~1M; smaller ones exercise the multi-partition paths).
PARTITION_ROWS = 100_000
MISSING_CAPTIONS = 0.01
NEAR_DUP_NOISE = 0.05


@dataclass(frozen=True)
class SynthSpec:
    """Everything that determines the generated release (stored in ``synthetic.json``)."""

    n: int = 1_000_000
    dim: int = 512
    n_concepts: int = 1000
    seed: int = 0
    dtype: str = "float16"
    with_captions: bool = True
    with_urls: bool = True
    dup_fraction: float = 0.02
    zipf_a: float = 0.8
    partition_rows: int = PARTITION_ROWS

    def __post_init__(self) -> None:
        if self.n < 1 or self.dim < 2 or not 1 <= self.n_concepts <= self.n:
            raise ValueError(f"need n >= 1, dim >= 2, 1 <= n_concepts <= n; got {self}")
        if self.dtype not in ("float16", "float32") or not 0 <= self.dup_fraction < 0.5:
            raise ValueError(f"dtype must be float16|float32 and 0 <= dup_fraction < 0.5; got {self}")


@dataclass(frozen=True)
class Concepts:
    """The mixture: (K, D) unit centres, (K,) spread s_c, (K,) probabilities, (K,) family and the words."""

    centres: np.ndarray
    spread: np.ndarray
    probs: np.ndarray
    family: np.ndarray
    names: np.ndarray  # (K,) object: the concept's word
    family_names: np.ndarray  # (F,) object
    modifiers: np.ndarray  # (K, 3) object: the concept's own modifiers


# -- the mixture -------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` divided by their L2 norm (in place for float32 input)."""
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def made_up_words(count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct pronounceable 6-letter words (consonant-vowel x 3), none of them a stop word."""
    from core.label import STOP_WORDS

    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    n_syl = len(syllables)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        codes = rng.choice(n_syl**3, size=min(2 * count + 16, n_syl**3), replace=False)
        for code in codes.tolist():
            word = syllables[code // n_syl**2] + syllables[(code // n_syl) % n_syl] + syllables[code % n_syl]
            if word not in seen and word not in STOP_WORDS:
                seen.add(word)
                out.append(word)
                if len(out) == count:
                    break
    return out


def make_concepts(spec: SynthSpec) -> Concepts:
    """Concept centres (cone + family + own direction), Zipf weights, spreads and vocabulary."""
    rng = np.random.default_rng([spec.seed, 0])
    k, d = spec.n_concepts, spec.dim
    n_families = max(1, round(k / 20))
    cone = _unit(rng.standard_normal(d, dtype=np.float32))
    fam_dirs = _unit(rng.standard_normal((n_families, d), dtype=np.float32))
    family = rng.integers(n_families, size=k)
    own = _unit(rng.standard_normal((k, d), dtype=np.float32))
    centres = _unit(0.35 * cone + 0.55 * fam_dirs[family] + 0.75 * own).astype(np.float32)
    rank = rng.permutation(k) + 1.0  # which concept is the largest is random
    weights = rank ** -spec.zipf_a
    spread = np.exp(rng.uniform(np.log(0.6), np.log(1.6), size=k))
    words = made_up_words(k * 4 + n_families, rng)
    return Concepts(
        centres=centres, spread=spread.astype(np.float32), probs=weights / weights.sum(), family=family,
        names=np.array(words[:k], dtype=object),
        family_names=np.array(words[k:k + n_families], dtype=object),
        modifiers=np.array(words[k + n_families:], dtype=object).reshape(k, 3),
    )


def sample_rows(concepts: Concepts, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(m, D) float32 unit rows and their (m,) concepts: ``normalize(mu_c + s_c * g / sqrt(D))``."""
    d = concepts.centres.shape[1]
    concept = rng.choice(len(concepts.probs), size=m, p=concepts.probs)
    X = rng.standard_normal((m, d), dtype=np.float32)
    X *= (concepts.spread[concept] / np.sqrt(d))[:, None]
    X += concepts.centres[concept]
    return _unit(X), concept


def plant_duplicates(X: np.ndarray, concept: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Overwrite ``fraction`` of the rows (in place) with copies of other rows of the same block.

    Returns: ``(dup_of, kind)``, (m,) each: the local row copied (-1 for originals) and 0 original,
    1 exact copy, 2 near copy (the source plus noise of norm ~NEAR_DUP_NOISE, re-normalised).
    """
    m, d = X.shape
    dup_of, kind = np.full(m, -1, np.int64), np.zeros(m, np.int8)
    n_dup = int(round(fraction * m))
    if n_dup == 0 or m < 2:
        return dup_of, kind
    perm = rng.permutation(m)
    dups, src = perm[:n_dup], rng.choice(perm[n_dup:], size=n_dup)
    X[dups], concept[dups], dup_of[dups] = X[src], concept[src], src
    near = dups[n_dup // 2:]
    X[near] += rng.standard_normal((len(near), d), dtype=np.float32) * (NEAR_DUP_NOISE / np.sqrt(d))
    X[near] = _unit(X[near])
    kind[dups[:n_dup // 2]], kind[near] = 1, 2
    return dup_of, kind


# -- metadata ----------------------------------------------------------------------------------------
def make_captions(concepts: Concepts, concept: np.ndarray, dup_of: np.ndarray, kind: np.ndarray,
                  rng: np.random.Generator) -> list[str | None]:
    """One caption per row from :data:`TEMPLATES`; exact duplicates repeat their source's caption."""
    m = len(concept)
    own = rng.random(m) < 0.5
    mods = np.where(own, concepts.modifiers[concept, rng.integers(3, size=m)],
                    np.array(SHARED_MODIFIERS, dtype=object)[rng.integers(len(SHARED_MODIFIERS), size=m)])
    fams = concepts.family_names[concepts.family[concept]]
    tpl = rng.integers(len(TEMPLATES), size=m).tolist()
    captions: list[str | None] = [
        TEMPLATES[t].format(c=c, f=f, m=mm)
        for t, c, f, mm in zip(tpl, concepts.names[concept].tolist(), fams.tolist(), mods.tolist(), strict=True)
    ]
    for i in np.flatnonzero(rng.random(m) < MISSING_CAPTIONS).tolist():
        captions[i] = None
    for i in np.flatnonzero(kind == 1).tolist():
        captions[i] = captions[int(dup_of[i])]
    return captions


def metadata_table(spec: SynthSpec, concepts: Concepts, start: int, concept: np.ndarray,
                   captions: list[str | None] | None, rng: np.random.Generator) -> pa.Table:
    """One partition's metadata parquet, LAION/clip-retrieval style (key = 9-digit webdataset key)."""
    m = len(concept)
    keys = [f"{i:09d}" for i in range(start, start + m)]
    cols: dict[str, Any] = {"image_path": keys}
    if captions is not None:
        cols["caption"] = pa.array(captions, pa.string())
    if spec.with_urls:
        fams = concepts.family_names[concepts.family[concept]].tolist()
        cols["url"] = [f"https://img{int(k) % 8}.example.com/{f}/{k}.jpg" for k, f in zip(keys, fams, strict=True)]
    cols["key"] = keys
    cols["NSFW"] = np.array(["UNLIKELY", "UNSURE", "NSFW"])[rng.choice(3, size=m, p=[0.9, 0.08, 0.02])]
    cols["similarity"] = rng.uniform(0.28, 0.42, size=m).astype(np.float32)
    cols["width"] = rng.integers(64, 1024, size=m, dtype=np.int32)
    cols["height"] = rng.integers(64, 1024, size=m, dtype=np.int32)
    return pa.table(cols)


# -- the release -------------------------------------------------------------------------------------
def write_partition(spec: SynthSpec, concepts: Concepts, folder: Path, p: int) -> pa.Table:
    """Generate and write partition ``p`` (npy + metadata); returns its ground-truth table."""
    rng = np.random.default_rng([spec.seed, 1, p])
    start = p * spec.partition_rows
    m = min(spec.partition_rows, spec.n - start)
    X, concept = sample_rows(concepts, m, rng)
    dup_of, kind = plant_duplicates(X, concept, spec.dup_fraction, rng)
    captions = make_captions(concepts, concept, dup_of, kind, rng) if spec.with_captions else None
    np.save(folder / "img_emb" / f"img_emb_{p}.npy", X.astype(spec.dtype))
    del X
    pq.write_table(metadata_table(spec, concepts, start, concept, captions, rng),
                   folder / "metadata" / f"metadata_{p}.parquet")
    return pa.table({
        "key": [f"{i:09d}" for i in range(start, start + m)],
        "concept": concept.astype(np.int32),
        "dup_of": np.where(dup_of >= 0, dup_of + start, -1),
        "dup_kind": kind,
    })


def write_release(spec: SynthSpec, folder: Path) -> None:
    """The whole release in ``folder`` (replaced), one partition in memory at a time (~0.5 GB at D=512)."""
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    concepts = make_concepts(spec)
    truth = [write_partition(spec, concepts, folder, p) for p in range(-(-spec.n // spec.partition_rows))]
    pq.write_table(pa.concat_tables(truth), folder / "truth.parquet")
    pq.write_table(pa.table({
        "concept": np.arange(spec.n_concepts, dtype=np.int32), "name": concepts.names.tolist(),
        "family": concepts.family.astype(np.int32), "weight": concepts.probs, "spread": concepts.spread,
    }), folder / "concepts.parquet")
    (folder / "synthetic.json").write_text(json.dumps(asdict(spec), indent=1, sort_keys=True))


def _release_is(folder: Path, spec: SynthSpec) -> bool:
    """True when ``folder`` holds a finished release of exactly ``spec``."""
    manifest = folder / "synthetic.json"
    return manifest.is_file() and json.loads(manifest.read_text()) == asdict(spec)


# -- the workspace -----------------------------------------------------------------------------------
def _registered(ws: Any, name: str, folder: Path, n: int) -> bool:
    """True when dataset ``name`` is registered from ``folder`` with ``n`` samples."""
    from core.datasets import dataset_row
    from core.errors import UnknownName

    try:
        row = dataset_row(ws, name)
    except UnknownName:
        return False
    return Path(row["uri"]).resolve() == folder.resolve() and int(row["n_samples"]) == n


def _existing_set(ws: Any, set_id: str) -> dict[str, Any] | None:
    """The catalog row of embedding set ``set_id``, or None."""
    from core.embed import embedding_set_row
    from core.errors import UnknownName

    try:
        return embedding_set_row(ws, set_id)
    except UnknownName:
        return None


def build_synthetic_workspace(root: str | Path, *, n: int = 1_000_000, dim: int = 512, n_concepts: int = 1000,
                              seed: int = 0, dtype: str = "float16", with_captions: bool = True,
                              with_urls: bool = True, dup_fraction: float = 0.02, zipf_a: float = 0.8,
                              partition_rows: int = PARTITION_ROWS, name: str = "synth") -> dict[str, Any]:
    """Generate (or reuse) a synthetic release, register it as laion dataset ``name``, import its embeddings.

    Args:
        root: the workspace folder (created when missing); the release goes to ``root/sources/<name>``.
        n, dim, n_concepts: rows, embedding width, mixture components.
        seed: seed of everything generated. dtype: of the release's npy files and of the embedding set.
        with_captions / with_urls: write those metadata columns.
        dup_fraction: share of rows that are planted exact (half) or near (half) duplicates.
        zipf_a: exponent of the Zipf law of concept sizes (larger = more skewed).
        partition_rows: rows per release partition.
        name: the dataset name.

    Returns:
        ``workspace, dataset, embedding_set, release, n, dim, n_concepts, built`` (which steps ran:
        generate, register, import) and ``seconds`` per step.
    """
    from core.workspace import Workspace

    spec = SynthSpec(n, dim, n_concepts, seed, dtype, with_captions, with_urls, dup_fraction, zipf_a, partition_rows)
    ws = Workspace(root)
    folder = ws.dir("sources", name)
    seconds: dict[str, float] = {}
    built = {"generate": not _release_is(folder, spec)}
    if built["generate"]:
        seconds["generate"] = _timed(write_release, spec, folder)
    built["register"] = built["generate"] or not _registered(ws, name, folder, n)
    if built["register"]:
        seconds["register"] = _timed(_register, ws, name, folder, spec)
    set_id = _set_id(name)
    built["import"] = built["register"] or _existing_set(ws, set_id) is None
    if built["import"]:
        seconds["import"] = _timed(_import, ws, name, set_id, dtype, replace=built["register"])
    row = _existing_set(ws, set_id)
    assert row is not None
    return {"workspace": str(ws.root), "dataset": name, "embedding_set": set_id, "release": str(folder),
            "n": int(row["n"]), "dim": int(row["dim"]), "n_concepts": n_concepts, "built": built,
            "seconds": seconds}


def _set_id(name: str) -> str:
    return f"{name}.synthetic.image"


def _register(ws: Any, name: str, folder: Path, spec: SynthSpec) -> None:
    from core.datasets import register_dataset

    register_dataset(ws, name, "laion", folder, replace=True,
                     description=f"synthetic LAION-style release: {spec.n} x {spec.dim}, {spec.n_concepts} concepts")


def _import(ws: Any, name: str, set_id: str, dtype: str, *, replace: bool) -> None:
    from core.embed import import_laion_embeddings

    import_laion_embeddings(ws, name, model="synthetic", set_id=set_id, dtype=dtype, replace=replace)


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    """Seconds ``fn(*args, **kwargs)`` took."""
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", help="workspace folder (created; an existing build with the same parameters is reused)")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--concepts", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--dup-fraction", type=float, default=0.02)
    p.add_argument("--no-captions", action="store_true")
    p.add_argument("--no-urls", action="store_true")
    p.add_argument("--name", default="synth")
    args = p.parse_args(argv)
    started = time.perf_counter()
    info = build_synthetic_workspace(args.root, n=args.n, dim=args.dim, n_concepts=args.concepts, seed=args.seed,
                                     dtype=args.dtype, with_captions=not args.no_captions,
                                     with_urls=not args.no_urls, dup_fraction=args.dup_fraction, name=args.name)
    total = time.perf_counter() - started
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in info["seconds"].items()) or "everything reused"
    print(f"synthetic workspace {info['workspace']}: dataset {info['dataset']}, {info['n']} x {info['dim']}")
    print(f"embedding set: {info['embedding_set']}")
    print(f"build: {total:.1f} s ({steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
