"""Image and caption embeddings of a registered dataset: batched, sharded, resumable, catalogued.

Layout of an embedding set (``embeddings/<set_id>/`` in the workspace)::

    meta.json                       config, identity, width, counts, skips, rows/s (written first with
                                    "complete": false, rewritten at the end)
    image/part-00000.npy            (rows, D) float16 (default) or float32, rows L2-normalised
    image/part-00000.parquet        id (as in the dataset index), row (position in the dataset index)
    text/part-00000.npy ...         caption embeddings, same layout

Shard ``k`` covers index positions ``[k * shard_rows, (k + 1) * shard_rows)``, so shard boundaries
depend only on the index and ``shard_rows``; batches never straddle a shard, so a shard's values do
not depend on what ran before it. Rows that cannot be embedded (unreadable image, no caption, a
non-finite output) are left out of their shard and counted by reason in the shard parquet's metadata.
Each file is written atomically (``core.atomic``), the npy before the parquet, and a shard counts as
finished only when both exist: a crashed run resumes with the first unfinished shard and produces the
same files as an uninterrupted one.

LAION-style releases (``img_emb/*.npy`` + metadata, the ``laion`` source) are imported into the same
layout by :func:`import_laion_embeddings` without running a model, so downstream stages read one format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from core import atomic
from core.datasets import Dataset, open_dataset
from core.errors import (
    AlreadyExists,
    ConfigError,
    DataError,
    MissingFileError,
    PathOutsideWorkspace,
)
from core.files import load_npy, read_json, read_table
from core.runs import ProgressWriter, RunHandle, recorded_run
from core.sources.base import SampleError, is_url
from core.store.catalog import utcnow
from core.workspace import Workspace, validate_name

if TYPE_CHECKING:
    from core.distributed import RayBackend

log = logging.getLogger(__name__)
#: What to do when an embedding set's shards are damaged.
EMBED_HINT = "recompute the set: prunescope embed DATASET ... --replace"

MODALITIES = ("image", "text", "both")
DTYPES = ("float16", "float32")
META_FILE = "meta.json"
SHARD_META_KEY = b"prunescope"
#: Rows whose norm differs from 1 by more than this are re-normalised on import (float16 storage
#: itself gives deviations of ~1e-3).
NORM_TOLERANCE = 1e-2


def default_workers() -> int:
    """DataLoader workers by default: two, or one on a single-core machine."""
    return min(2, os.cpu_count() or 1)


def _default_model() -> str:
    from core.models import DEMO_MODEL

    return DEMO_MODEL


# -- configuration ---------------------------------------------------------------------------------
class _SetTarget:
    """What both ways of making an embedding set share: its modalities and its resolved id."""

    modality: str
    set_id: str | None

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("image", "text") if self.modality == "both" else (self.modality,)

    @property
    def resolved_set_id(self) -> str:
        """``set_id`` after defaulting (never None once constructed)."""
        assert self.set_id is not None
        return self.set_id


@dataclass(frozen=True)
class EmbedConfig(_SetTarget):
    """What to embed and how (resolved and stored with the set).

    Attributes:
        dataset: a registered dataset name.
        model: an open_clip architecture or project config (``demo-vit-tiny``).
        pretrained / checkpoint: weights (a pretrained tag, or a local file); neither = random init.
        modality: ``image``, ``text`` (captions) or ``both``.
        batch_size: rows per forward pass.
        num_workers: DataLoader worker processes decoding images (0 = in the main process).
        shard_rows: dataset index positions per output shard.
        dtype: ``float16`` (default, the LAION convention) or ``float32`` on disk.
        device: ``auto``/None, ``cpu``, ``cuda``, ``cuda:N``. precision: ``auto``, fp32, bf16, fp16.
        cache_dir: download cache for pretrained weights.
        set_id: the embedding set's name; default ``<dataset>.<model>[.<weights>].<modality>``.
        limit: embed only the first ``limit`` index rows.
    """

    dataset: str
    model: str = field(default_factory=_default_model)
    pretrained: str | None = None
    checkpoint: str | None = None
    modality: str = "image"
    batch_size: int = 128
    num_workers: int = field(default_factory=default_workers)
    shard_rows: int = 65_536
    dtype: str = "float16"
    device: str | None = None
    precision: str = "auto"
    cache_dir: str | None = None
    set_id: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        from core.models import PRECISIONS

        validate_name(self.dataset, "dataset name")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model must be an architecture name, e.g. demo-vit-tiny or ViT-B-32")
        _choice("modality", self.modality, MODALITIES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("precision", self.precision, PRECISIONS)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("num_workers", self.num_workers, 0)
        _at_least("shard_rows", self.shard_rows, 1)
        if self.limit is not None:
            _at_least("limit", self.limit, 1)
        if self.pretrained and self.checkpoint:
            raise ConfigError("pass either a pretrained tag or --checkpoint, not both")
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(Path(self.checkpoint).expanduser().resolve()))
        set_id = self.set_id or default_set_id(self.dataset, self.model, self.weights_label(), self.modality)
        object.__setattr__(self, "set_id", validate_name(set_id, "embedding set id"))

    def weights_label(self) -> str | None:
        """Short name of the weights: the tag, or ``<checkpoint stem>-<6 hex of its path>``."""
        if self.pretrained:
            return self.pretrained
        if self.checkpoint:
            digest = hashlib.sha1(str(self.checkpoint).encode()).hexdigest()[:6]
            return f"{Path(self.checkpoint).stem}-{digest}"
        return None


def _choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")


def default_set_id(dataset: str, model: str, weights: str | None, modality: str) -> str:
    """``<dataset>.<model>[.<weights>].<modality>`` made a valid name (<= 64 characters)."""
    raw = ".".join(p for p in (dataset, model, weights, modality) if p)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", raw)
    name = re.sub(r"\.{2,}", ".", name).strip(".-_") or "embeddings"
    if len(name) > 64:
        digest = hashlib.sha1(raw.encode()).hexdigest()[:8]
        name = f"{name[:55].rstrip('.-_')}-{digest}"
    return name


# -- results ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModalityStats:
    """What one modality of a set holds: rows, skips by reason, and the measured throughput."""

    n: int
    n_shards: int
    skipped: dict[str, int]
    rows_per_s: float | None
    shards_computed: int
    shards_reused: int
    repaired: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class EmbeddingSetInfo:
    """An embedding set as registered in the catalog (``embedding_sets``) plus per-modality counts."""

    id: str
    dataset: str
    model: str
    pretrained: str | None
    dim: int
    n: int
    dtype: str
    path: Path
    modality: str
    images_per_s: float | None
    stats: dict[str, ModalityStats]
    run_id: str | None = None

    @property
    def n_skipped(self) -> int:
        return sum(sum(s.skipped.values()) for s in self.stats.values())


class InjectedFailure(RuntimeError):
    """Raised by the ``fail_after_shards`` test hook to simulate a crash mid-embedding."""


# -- shard files -----------------------------------------------------------------------------------
def shard_ranges(n: int, shard_rows: int) -> list[tuple[int, int]]:
    """[start, stop) index positions of each shard."""
    return [(s, min(s + shard_rows, n)) for s in range(0, n, shard_rows)]


def shard_paths(folder: Path, k: int) -> tuple[Path, Path]:
    return folder / f"part-{k:05d}.npy", folder / f"part-{k:05d}.parquet"


def shard_done(folder: Path, k: int) -> bool:
    npy, pq_path = shard_paths(folder, k)
    return npy.is_file() and pq_path.is_file()


def write_shard(folder: Path, k: int, ids: Sequence[str], rows: np.ndarray, X: np.ndarray, *, dtype: str,
                info: dict[str, Any]) -> None:
    """Write shard ``k``: rows of ``X`` (n, D) cast to ``dtype`` and (id, row) with ``info`` as metadata.

    The npy goes first and the parquet last, so a shard is visible (both files) only when complete.
    """
    atomic.save_npy(shard_paths(folder, k)[0], np.ascontiguousarray(X, dtype=np.dtype(dtype)))
    table = pa.table({"id": pa.array([str(i) for i in ids], pa.string()),
                      "row": pa.array(np.asarray(rows, dtype=np.int64), pa.int64())})
    table = table.replace_schema_metadata({SHARD_META_KEY: json.dumps(info, sort_keys=True).encode()})
    atomic.write_parquet(shard_paths(folder, k)[1], table)


def read_shard_info(folder: Path, k: int) -> dict[str, Any]:
    """The metadata stored with shard ``k`` (its range, row count and skips by reason)."""
    meta = pq.read_schema(shard_paths(folder, k)[1]).metadata or {}
    return json.loads(meta.get(SHARD_META_KEY, b"{}"))


def normalize_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``X`` in float32 divided by their L2 norm, and the (n,) bool mask of usable rows
    (finite, norm > 0): unusable rows are returned as zeros for the caller to drop."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1) if X.size else np.zeros(len(X), np.float32)
    good = np.isfinite(norms) & (norms > 1e-12)
    out = np.zeros_like(X)
    out[good] = X[good] / norms[good, None]
    return out, good


# -- the torch side: rows -> tensors ---------------------------------------------------------------
def split_transform(transform: Any) -> tuple[Any, tuple[float, ...], tuple[float, ...]] | None:
    """Split an open_clip eval transform ``Compose([...PIL steps, ToTensor, Normalize])`` into its PIL
    steps and the normalisation (mean, std), or None when it has another shape.

    Workers then ship uint8 (H, W, 3) crops (a quarter of the bytes through the worker queue and to
    the GPU) and :class:`BatchNormalizer` converts whole batches on the device: the same elementwise
    float32 ops as ``ToTensor`` + ``Normalize``, so the result is identical.
    """
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    if any(isinstance(t, (T.ToTensor, T.Normalize)) for t in steps[:-2]):
        return None
    return T.Compose(steps[:-2]), tuple(map(float, steps[-1].mean)), tuple(map(float, steps[-1].std))


class BatchNormalizer:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 normalised on ``device``; float batches pass through."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: Any) -> None:
        import torch

        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, batch: Any) -> Any:
        import torch

        if batch.dtype != torch.uint8:
            return batch
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).div(255)
        return x.sub_(self.mean).div_(self.std)


class ImageRows:
    """torch-style dataset over index positions: ``(position, image tensor | None, skip reason | None)``.

    The tensor is a uint8 (H, W, 3) crop when the transform splits (:func:`split_transform`), else
    the transform's output. Index rows are turned into dicts (nulls as None, like
    ``Dataset.iter_rows``) a chunk at a time: a pandas row costs ~100 us, as much as decoding a small
    image. Each worker keeps its current chunk.
    """

    CHUNK = 4096

    def __init__(self, ds: Dataset, transform: Any) -> None:
        self.index = ds.index
        self.source = ds.source
        split = split_transform(transform)
        self.transform = split[0] if split else transform
        self.uint8 = split is not None
        self._chunk_id = -1
        self._chunk: list[dict[str, Any]] = []

    def __len__(self) -> int:
        return len(self.index)

    def row(self, pos: int) -> dict[str, Any]:
        chunk = pos // self.CHUNK
        if chunk != self._chunk_id:
            part = self.index.iloc[chunk * self.CHUNK:(chunk + 1) * self.CHUNK]
            self._chunk = pa.Table.from_pandas(part, preserve_index=False).to_pylist()  # nulls as None
            self._chunk_id = chunk
        return self._chunk[pos - chunk * self.CHUNK]

    def __getitem__(self, pos: int) -> tuple[int, Any, str | None]:
        import torch

        row = self.row(pos)
        try:
            image = self.source.load_image(row)
        except SampleError as exc:
            return pos, None, exc.reason
        except PathOutsideWorkspace:
            return pos, None, "path_outside_root"
        out = self.transform(image)
        if self.uint8:
            out = torch.from_numpy(np.array(out.convert("RGB"), dtype=np.uint8))
        return pos, out, None


class CaptionRows:
    """torch-style dataset over index positions: ``(position, tokens | None, skip reason | None)``."""

    def __init__(self, captions: Sequence[Any], tokenizer: Any) -> None:
        self.captions = list(captions)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, pos: int) -> tuple[int, Any, str | None]:
        caption = self.captions[pos]
        if not isinstance(caption, str) or not caption.strip():
            return pos, None, "missing_value"
        return pos, self.tokenizer([caption])[0], None


def collate_rows(items: list[tuple[int, Any, str | None]]) -> tuple[list[int], Any, list[tuple[int, str | None]]]:
    """(every position of the batch, stacked tensors of the usable ones, [(position, reason)] skipped)."""
    import torch

    positions = [p for p, _, _ in items]
    tensors = [t for _, t, _ in items if t is not None]
    skipped = [(p, r) for p, t, r in items if t is None]
    stacked = torch.stack(tensors) if tensors else None
    return positions, stacked, skipped


class ShardBatches:
    """Batch sampler: positions of the given shards in order, in batches that never straddle a shard."""

    def __init__(self, ranges: Sequence[tuple[int, int]], batch_size: int) -> None:
        self.ranges = list(ranges)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start, stop in self.ranges:
            for b in range(start, stop, self.batch_size):
                yield list(range(b, min(b + self.batch_size, stop)))

    def __len__(self) -> int:
        return sum(-(-(stop - start) // self.batch_size) for start, stop in self.ranges)


# -- embedding a dataset ---------------------------------------------------------------------------
def embed_dataset(ws: Workspace, cfg: EmbedConfig, *, progress: bool = False, fail_after_shards: int | None = None,
                  replace: bool = False, run: RunHandle | None = None,
                  backend: RayBackend | None = None) -> EmbeddingSetInfo:
    """Embed ``cfg.dataset`` with ``cfg.model`` into the set ``set_id`` (resuming finished shards).

    Args:
        progress: show a tqdm bar (rows/s) per modality.
        fail_after_shards: testing hook: raise InjectedFailure after writing that many shards.
        replace: delete an existing set of that id first (otherwise an existing set made with another
            config is an error, and one made with this config is resumed or reused).
        run: record progress into this run (a job launcher's) instead of recording a new ``embed`` run.
        backend: compute the shards on a Ray cluster (:mod:`core.distributed`, model-holding actors);
            None = in this process. An execution setting: the files are the same either way.

    Returns: the registered set. Raises: UnknownName (dataset, model), DataError (no local images,
    no captions), ConfigError (bad option, an existing set with another config), MissingFileError
    (checkpoint), WeightsUnavailable (pretrained tag offline).
    """
    from core.models import check_arch

    ds = open_dataset(ws, cfg.dataset)
    check_arch(cfg.model)
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise MissingFileError(f"checkpoint {cfg.checkpoint} does not exist")
    n = len(ds.index) if cfg.limit is None else min(cfg.limit, len(ds.index))
    _check_inputs(ds, cfg, n)
    set_id = cfg.resolved_set_id
    set_dir = ws.dir("embeddings", set_id)
    identity = _identity(cfg, ds, n)
    meta = _open_set(ws, set_dir, set_id, identity, replace)
    ranges = shard_ranges(n, cfg.shard_rows)
    pending = {m: [k for k in range(len(ranges)) if not shard_done(set_dir / m, k)] for m in cfg.modalities}
    if not any(pending.values()) and meta.get("complete"):
        return _register(ws, set_id, meta)  # nothing to do: the set is complete
    clean_stale_temp_files(set_dir)
    meta = {**meta, "config": asdict(cfg), "identity": identity, "kind": "embed", "complete": False}
    atomic.write_json(set_dir / META_FILE, meta)
    with _maybe_run(ws, cfg, run) as handle:
        if backend is None:
            clip = _load_model(cfg)
            budget = _ShardBudget(fail_after_shards)
            stats = {}
            for modality in cfg.modalities:
                stats[modality] = _embed_modality(ds, clip, cfg, modality, set_dir / modality, ranges,
                                                  pending[modality], budget=budget, progress=progress, handle=handle)
        else:
            from core.distributed import embed_pending

            clip, rates = embed_pending(backend, ds, cfg, set_dir, ranges, pending, progress=progress, handle=handle)
            stats = {m: _modality_stats(set_dir / m, len(ranges), len(pending[m]), rates[m]) for m in cfg.modalities}
        meta = _final_meta(meta, cfg, stats, clip)
        atomic.write_json(set_dir / META_FILE, meta)
        info = _register(ws, set_id, meta, run_id=handle.id if handle else None)
        if handle is not None:
            handle.message = _summary(info)
    log.info("%s", _summary(info))
    return info


def _check_inputs(ds: Dataset, cfg: EmbedConfig, n: int) -> None:
    """One-line errors for inputs that cannot give a single embedding."""
    index = ds.index.iloc[:n]
    if "image" in cfg.modalities:
        local = index["locator"].map(lambda loc: isinstance(loc, str) and bool(loc) and not is_url(loc))
        if not getattr(ds, "has_images", True) or not bool(local.any()):
            raise DataError(
                f"dataset '{cfg.dataset}' has no local images to embed (only URLs or embeddings)",
                hint="download the images first (e.g. img2dataset); for a LAION release, import its "
                     "precomputed embeddings instead",
            )
    if "text" in cfg.modalities:
        captions = index["caption"].map(lambda c: isinstance(c, str) and bool(c.strip()))
        if not bool(captions.any()):
            raise DataError(f"dataset '{cfg.dataset}' has no captions to embed", hint="use --modality image")


def _identity(cfg: EmbedConfig, ds: Dataset, n: int) -> dict[str, Any]:
    """What fixes the contents of every shard: resuming with a different identity would mix sets."""
    return {
        "kind": "embed", "dataset": cfg.dataset, "model": cfg.model, "pretrained": cfg.pretrained,
        "checkpoint": cfg.checkpoint, "checkpoint_sha256": _file_digest(cfg.checkpoint) if cfg.checkpoint else None,
        "modality": cfg.modality, "shard_rows": cfg.shard_rows, "dtype": cfg.dtype, "n_rows": n,
        "index_fingerprint": index_fingerprint(ds.index["id"].iloc[:n]),
    }


def index_fingerprint(ids: pd.Series) -> str:
    """sha1 of the ids in index order (changes when the dataset is re-registered differently)."""
    h = hashlib.sha1()
    for chunk in range(0, len(ids), 100_000):
        h.update("\n".join(map(str, ids.iloc[chunk:chunk + 100_000].tolist())).encode("utf-8", "replace"))
        h.update(b"\n")
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _open_set(ws: Workspace, set_dir: Path, set_id: str, identity: dict[str, Any], replace: bool) -> dict[str, Any]:
    """The set's existing meta (to resume) or {}; ConfigError when it was made with another identity."""
    meta_path = set_dir / META_FILE
    if replace and set_dir.exists():
        _remove_set_files(ws, set_dir, set_id)
    if not meta_path.exists():
        if set_dir.exists() and any(set_dir.rglob("part-*")):
            raise AlreadyExists(f"embeddings/{set_id} holds shards but no {META_FILE}",
                                hint="pass --replace to recompute it, or choose another --set-id")
        return {}
    meta = read_json(meta_path, f"the {META_FILE} of embedding set '{set_id}'", hint="pass --replace to recompute it")
    old = meta.get("identity", {})
    diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
    if diff:
        shown = ", ".join(f"{k} {old.get(k)!r} -> {identity.get(k)!r}" for k in diff[:3] if k != "index_fingerprint")
        shown = shown or "the dataset index changed"
        raise ConfigError(f"embedding set '{set_id}' exists with a different configuration ({shown})",
                          hint="pass --replace to recompute it, or choose another --set-id")
    return meta


def clean_stale_temp_files(folder: Path) -> int:
    """Delete temporary files (``core.atomic``) below ``folder`` left by writers that died; a live
    process's files (the pid is in the name) are kept. Returns how many were deleted."""
    n = 0
    for path in folder.rglob(f".*{atomic.TMP_MARK}*") if folder.is_dir() else ():
        m = re.search(re.escape(atomic.TMP_MARK) + r"(\d+)-", path.name)
        if path.is_file() and atomic.is_temp_path(path) and not (m and _pid_alive(int(m.group(1)))):
            path.unlink(missing_ok=True)
            n += 1
    return n


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers (an earlier call in this process that raised)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_set_files(ws: Workspace, set_dir: Path, set_id: str) -> None:
    import shutil

    shutil.rmtree(set_dir, ignore_errors=True)
    ws.catalog.execute("DELETE FROM embedding_sets WHERE id = ?", [set_id])


class _ShardBudget:
    """Counts shards written across modalities; raises InjectedFailure when the test budget is spent."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.written = 0

    def wrote(self) -> None:
        self.written += 1
        if self.limit is not None and self.written >= self.limit:
            raise InjectedFailure(f"injected failure after {self.written} shard(s)")


@contextlib.contextmanager
def _maybe_run(ws: Workspace, cfg: EmbedConfig, run: RunHandle | None) -> Iterator[RunHandle]:
    """``recorded_run(ws, "embed", ...)`` unless the caller passed its own run handle."""
    if run is not None:
        yield run
        return
    with recorded_run(ws, "embed", asdict(cfg)) as handle:
        yield handle


def _load_model(cfg: EmbedConfig) -> Any:
    from core.models import load_clip

    return load_clip(cfg.model, cfg.pretrained, checkpoint=cfg.checkpoint, device=cfg.device,
                     cache_dir=cfg.cache_dir, precision=cfg.precision)


class _ShardWriter:
    """Collects rows shard by shard (shards must arrive in increasing order) and writes each one when
    the next begins or at :meth:`close`; shards in ``skip`` (already finished) are not rewritten."""

    def __init__(self, folder: Path, ranges: list[tuple[int, int]], ids: pd.Series, dim: int, dtype: str, *,
                 skip: set[int] | None = None, on_written: Any = None) -> None:
        self.folder, self.ranges, self.ids, self.dim, self.dtype = folder, ranges, ids, dim, dtype
        self.skip = skip or set()
        self.on_written = on_written
        self.current: int | None = None
        self._reset()
        folder.mkdir(parents=True, exist_ok=True)

    def _reset(self) -> None:
        self.positions: list[np.ndarray] = []
        self.vectors: list[np.ndarray] = []
        self.skipped: Counter[str] = Counter()
        self.repaired: Counter[str] = Counter()

    def add(self, k: int, positions: np.ndarray, X: np.ndarray, skipped: Counter[str] | None = None,
            repaired: Counter[str] | None = None) -> None:
        """Add rows of shard ``k``: (n,) index positions and their (n, D) float32 unit rows."""
        if self.current is not None and k < self.current:
            raise DataError(f"rows arrived out of index order (shard {k} after {self.current})")
        if self.current is not None and k != self.current:
            self._flush()
        self.current = int(k)
        self.positions.append(np.asarray(positions, dtype=np.int64))
        self.vectors.append(np.asarray(X, dtype=np.float32).reshape(-1, self.dim))
        self.skipped.update(skipped or {})
        self.repaired.update(repaired or {})

    def close(self, *, fill_missing: bool = False) -> None:
        """Write the last shard; with ``fill_missing`` also every unfinished shard that got no rows."""
        if self.current is not None:
            self._flush()
        if fill_missing:
            for k in range(len(self.ranges)):
                if k not in self.skip and not shard_done(self.folder, k):
                    self.current = k
                    self._flush()

    def _flush(self) -> None:
        k = self.current
        assert k is not None
        if k not in self.skip:
            positions = np.concatenate(self.positions) if self.positions else np.zeros(0, np.int64)
            X = np.concatenate(self.vectors) if self.vectors else np.zeros((0, self.dim), np.float32)
            start, stop = self.ranges[k]
            unaccounted = (stop - start) - len(positions) - sum(self.skipped.values())
            if unaccounted > 0:  # index rows the input never delivered (import of a changed release)
                self.skipped["bad_embedding"] += unaccounted
            info = {"start": start, "stop": stop, "rows": len(positions), "skipped": dict(sorted(self.skipped.items()))}
            if self.repaired:
                info["repaired"] = dict(sorted(self.repaired.items()))
            ids = [str(i) for i in self.ids.iloc[positions].tolist()]
            write_shard(self.folder, k, ids, positions, X, dtype=self.dtype, info=info)
            if self.on_written is not None:
                self.on_written(k, stop - start)
        self.current = None
        self._reset()


def _embed_modality(ds: Dataset, clip: Any, cfg: EmbedConfig, modality: str, folder: Path,
                    ranges: list[tuple[int, int]], pending: list[int], *, budget: _ShardBudget, progress: bool,
                    handle: RunHandle | None) -> ModalityStats:
    """Compute the pending shards of one modality; returns counts over all its shards."""
    rate: float | None = None
    if pending:
        total = sum(ranges[k][1] - ranges[k][0] for k in pending)
        progress_file = ProgressWriter(handle.dir) if handle is not None else None
        started, done = time.perf_counter(), 0

        def on_written(k: int, n_rows: int) -> None:
            nonlocal done
            done += n_rows
            if progress_file is not None:
                elapsed = max(time.perf_counter() - started, 1e-9)
                progress_file.write(stage="embed", modality=modality, shard=k, done=done, total=total,
                                    rows_per_s=round(done / elapsed, 2))
            budget.wrote()

        unit = "img" if modality == "image" else "text"
        with tqdm(total=total, unit=unit, desc=f"embed {cfg.dataset} ({modality})", disable=not progress) as bar:
            embed_shards(ds, clip, cfg, modality, folder, ranges, pending, on_written=on_written, on_batch=bar.update)
        rate = total / max(time.perf_counter() - started, 1e-9)
    return _modality_stats(folder, len(ranges), len(pending), rate)


def embed_shards(ds: Any, clip: Any, cfg: EmbedConfig, modality: str, folder: Path, ranges: list[tuple[int, int]],
                 shards: Sequence[int], *, on_written: Any = None, on_batch: Any = None) -> None:
    """Compute and write the given shards (increasing) of one modality: the unit of work of both backends.

    Args:
        ds: the dataset (or any object with its ``index`` and ``source``). clip: a loaded model.
        on_written: called as ``on_written(k, index rows of shard k)`` after each shard's files exist.
        on_batch: called with the number of index positions of each finished batch (progress).
    """
    rows = ImageRows(ds, clip.preprocess) if modality == "image" else CaptionRows(ds.index["caption"], clip.tokenizer)
    loader = _loader(rows, [ranges[k] for k in shards], cfg, clip.device)
    encode = _image_encoder(clip) if modality == "image" else clip.encode_texts
    writer = _ShardWriter(folder, ranges, ds.index["id"], clip.embed_dim, cfg.dtype, on_written=on_written)
    for positions, batch, skipped in loader:
        _add_batch(writer, positions, batch, skipped, encode, cfg.shard_rows)
        if on_batch is not None:
            on_batch(len(positions))
    writer.close()


def _image_encoder(clip: Any) -> Any:
    """``clip.encode_images`` taking the loader's batches (uint8 crops normalised on the device)."""
    split = split_transform(clip.preprocess)
    if split is None:
        return clip.encode_images
    normalize = BatchNormalizer(split[1], split[2], clip.device)
    return lambda batch: clip.encode_images(normalize(batch))


def _add_batch(writer: _ShardWriter, positions: list[int], batch: Any, skipped: list[tuple[int, str | None]],
               encode: Any, shard_rows: int) -> None:
    """Encode one loader batch (all rows of one shard) and hand its usable rows to the writer."""
    reasons: Counter[str] = Counter(str(reason) for _, reason in skipped)
    gone = {p for p, _ in skipped}
    kept = np.asarray([p for p in positions if p not in gone], dtype=np.int64)
    X = np.zeros((0, writer.dim), np.float32)
    if batch is not None:
        X, good = normalize_rows(encode(batch).cpu().numpy())
        if not good.all():  # a non-finite or all-zero output row: left out, counted
            reasons["bad_embedding"] += int((~good).sum())
        kept, X = kept[good], X[good]
    writer.add(positions[0] // shard_rows, kept, X, reasons)


def _loader(rows: Any, ranges: list[tuple[int, int]], cfg: EmbedConfig, device: Any) -> Any:
    from torch.utils.data import DataLoader

    workers = cfg.num_workers
    return DataLoader(rows, batch_sampler=ShardBatches(ranges, cfg.batch_size), num_workers=workers,
                      collate_fn=collate_rows, pin_memory=device.type == "cuda",
                      prefetch_factor=4 if workers > 0 else None, persistent_workers=False)


def _modality_stats(folder: Path, n_shards: int, computed: int, rows_per_s: float | None) -> ModalityStats:
    """Counts over every shard of a modality, read back from the shard metadata."""
    n = 0
    skipped: Counter[str] = Counter()
    repaired: Counter[str] = Counter()
    for k in range(n_shards):
        info = read_shard_info(folder, k)
        n += int(info.get("rows", 0))
        skipped.update(info.get("skipped", {}))
        repaired.update(info.get("repaired", {}))
    return ModalityStats(n=n, n_shards=n_shards, skipped=dict(sorted(skipped.items())), rows_per_s=rows_per_s,
                         shards_computed=computed, shards_reused=n_shards - computed,
                         repaired=dict(sorted(repaired.items())))


def _final_meta(meta: dict[str, Any], cfg: EmbedConfig, stats: dict[str, ModalityStats], clip: Any) -> dict[str, Any]:
    return {**meta, "complete": True, "set_id": cfg.set_id, "dataset": cfg.dataset, "model": cfg.model,
            "pretrained": cfg.pretrained or cfg.checkpoint, "weights": clip.weights, "dim": clip.embed_dim,
            "dtype": cfg.dtype, "modality": cfg.modality, "device": str(clip.device), "precision": clip.precision,
            "modalities": _modalities_meta(stats, meta), "updated_at": utcnow().isoformat(timespec="seconds")}


def _modalities_meta(stats: dict[str, ModalityStats], old_meta: dict[str, Any]) -> dict[str, Any]:
    """Per-modality counts for meta.json; a modality with nothing computed keeps its earlier rate."""
    old = old_meta.get("modalities", {})
    out = {}
    for m, s in stats.items():
        rate = s.rows_per_s if s.rows_per_s is not None else old.get(m, {}).get("rows_per_s")
        out[m] = {"n": s.n, "n_shards": s.n_shards, "skipped": s.skipped, "repaired": s.repaired,
                  "rows_per_s": round(rate, 3) if rate else None, "shards_computed": s.shards_computed,
                  "shards_reused": s.shards_reused}
    return out


def _summary(info: EmbeddingSetInfo) -> str:
    parts = [f"{m} {s.n} rows" + (f" ({sum(s.skipped.values())} skipped)" if s.skipped else "")
             for m, s in info.stats.items()]
    rate = f", {info.images_per_s:.1f} rows/s" if info.images_per_s else ""
    return f"embedding set {info.id}: {', '.join(parts)}, dim {info.dim}{rate}"


# -- catalog ---------------------------------------------------------------------------------------
def _register(ws: Workspace, set_id: str, meta: dict[str, Any], *, run_id: str | None = None) -> EmbeddingSetInfo:
    """Replace the set's row in ``embedding_sets`` from its meta; returns the info."""
    stats = {m: ModalityStats(n=v["n"], n_shards=v["n_shards"], skipped=v.get("skipped", {}),
                              rows_per_s=v.get("rows_per_s"), shards_computed=v.get("shards_computed", 0),
                              shards_reused=v.get("shards_reused", 0), repaired=v.get("repaired", {}))
             for m, v in meta["modalities"].items()}
    primary = "image" if "image" in stats else next(iter(stats))
    set_dir = ws.dir("embeddings", set_id)
    info = EmbeddingSetInfo(id=set_id, dataset=meta["dataset"], model=meta["model"], pretrained=meta.get("pretrained"),
                            dim=int(meta["dim"]), n=stats[primary].n, dtype=meta["dtype"], path=set_dir,
                            modality=meta["modality"], images_per_s=stats[primary].rows_per_s, stats=stats,
                            run_id=run_id)
    ws.catalog.insert("embedding_sets", [{
        "id": info.id, "dataset": info.dataset, "model": info.model, "pretrained": info.pretrained, "dim": info.dim,
        "n": info.n, "dtype": info.dtype, "path": ws.rel(set_dir), "created_at": utcnow(), "modality": info.modality,
        "images_per_s": info.images_per_s,
    }], replace_where="id = ?", replace_params=[info.id])
    return info


def list_embedding_sets(ws: Workspace) -> pd.DataFrame:
    """Every registered embedding set (catalog columns), newest first."""
    return ws.catalog.query(
        "SELECT id, dataset, model, pretrained, modality, dim, n, dtype, images_per_s, path, created_at "
        "FROM embedding_sets ORDER BY created_at DESC, id"
    )


def embedding_set_row(ws: Workspace, set_id: str) -> dict[str, Any]:
    """The catalog row of one set; UnknownName lists the registered ones."""
    return ws.catalog.row("embedding_sets", "id", set_id, what="embedding set")


def _modality_dir(ws: Workspace, set_id: str, modality: str | None) -> Path:
    row = embedding_set_row(ws, set_id)
    have = ("image", "text") if row["modality"] == "both" else (row["modality"],)
    modality = modality or have[0]
    if modality not in have:
        raise ConfigError(f"embedding set '{set_id}' holds {' and '.join(have)} embeddings, not {modality}")
    return ws.abs(row["path"]) / modality


def iter_embedding_shards(ws: Workspace, set_id: str, modality: str | None = None, *,
                          mmap: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream a set shard by shard: (ids (n,) str objects, rows (n,) int64 index positions, X (n, D)).

    ``X`` is memory-mapped (read-only) when ``mmap``; nothing else is read until it is touched.
    """
    folder = _modality_dir(ws, set_id, modality)
    k = 0
    while shard_done(folder, k):
        npy, pq_path = shard_paths(folder, k)
        what = f"shard {k} of embedding set '{set_id}' ({modality})"
        table = read_table(pq_path, f"the ids of {what}", hint=EMBED_HINT)
        X = load_npy(npy, f"the vectors of {what}", mmap_mode="r" if mmap else None, hint=EMBED_HINT)
        if X.shape[0] != table.num_rows:
            raise DataError(f"{npy} has {X.shape[0]} rows but {pq_path.name} lists {table.num_rows}")
        yield (np.asarray(table.column("id").to_pylist(), dtype=object),
               table.column("row").to_numpy(), X)
        k += 1


def load_embeddings(ws: Workspace, set_id: str, modality: str | None = None, *,
                    mmap: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All rows of a set: (ids (n,) str objects, X (n, D) in the stored dtype, rows L2-normalised).

    ``modality`` defaults to the set's own (``image`` for sets holding both). A one-shard set is
    returned memory-mapped when ``mmap``; several shards are concatenated into memory (stream large
    sets with :func:`iter_embedding_shards`).
    """
    parts = list(iter_embedding_shards(ws, set_id, modality, mmap=mmap))
    if not parts:
        row = embedding_set_row(ws, set_id)
        return np.asarray([], dtype=object), np.zeros((0, int(row["dim"])), np.float32)
    if len(parts) == 1:
        return parts[0][0], parts[0][2]
    return np.concatenate([p[0] for p in parts]), np.concatenate([np.asarray(p[2]) for p in parts])


def load_embedding_rows(ws: Workspace, set_id: str, modality: str | None = None) -> pd.DataFrame:
    """The set's (id, row) pairs in storage order (``row`` = position in the dataset index)."""
    frames = [pd.DataFrame({"id": ids, "row": rows}) for ids, rows, _ in iter_embedding_shards(ws, set_id, modality)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"id": [], "row": []})


# -- importing LAION-style releases ----------------------------------------------------------------
def import_laion_embeddings(ws: Workspace, dataset: str, *, model: str, pretrained: str | None = None,
                            set_id: str | None = None, modality: str = "image", shard_rows: int = 65_536,
                            dtype: str = "float16", replace: bool = False,
                            progress: bool = False) -> EmbeddingSetInfo:
    """Register the precomputed embeddings of a ``laion``-kind dataset as an embedding set.

    Streams the release's memory-mapped ``img_emb``/``text_emb`` partitions into the standard shard
    layout, aligned with the dataset index (rows registration skipped are left out), rows
    re-normalised in float32 (those off by more than NORM_TOLERANCE are counted as ``renormalised``).
    No model runs; ``model``/``pretrained`` only label the set (the width is checked against the
    model's config when open_clip knows the name).

    Raises: UnknownName (dataset), ConfigError (not a laion dataset, bad option), DataError (width
    mismatch, no text embeddings for modality text).
    """
    cfg = _ImportConfig(dataset, model, pretrained, modality, shard_rows, dtype, set_id)
    ds = open_dataset(ws, dataset)
    dims = _release_dims(ds, cfg)
    n = len(ds.index)
    set_id = cfg.resolved_set_id
    set_dir = ws.dir("embeddings", set_id)
    identity = {**asdict(cfg), "kind": "laion-import", "n_rows": n, "index_fingerprint": index_fingerprint(ds.index["id"])}
    meta = _open_set(ws, set_dir, set_id, identity, replace)
    ranges = shard_ranges(n, shard_rows)
    if meta.get("complete") and all(shard_done(set_dir / m, k) for m in cfg.modalities for k in range(len(ranges))):
        return _register(ws, set_id, meta)
    clean_stale_temp_files(set_dir)
    meta = {**meta, "config": asdict(cfg), "identity": identity, "kind": "laion-import", "complete": False}
    atomic.write_json(set_dir / META_FILE, meta)
    with recorded_run(ws, "embed-import", asdict(cfg)) as handle:
        stats = {m: _import_modality(ds, cfg, m, set_dir / m, ranges, dims[m], progress) for m in cfg.modalities}
        dim = next(iter(dims.values()))
        meta = {**meta, "complete": True, "set_id": set_id, "dataset": dataset, "model": model,
                "pretrained": pretrained, "weights": pretrained or "precomputed", "dim": dim, "dtype": dtype,
                "modality": modality, "source": str(ds.source.root),
                "modalities": _modalities_meta(stats, meta),
                "updated_at": utcnow().isoformat(timespec="seconds")}
        atomic.write_json(set_dir / META_FILE, meta)
        info = _register(ws, set_id, meta, run_id=handle.id)
        handle.message = _summary(info)
    return info


def _release_dims(ds: Dataset, cfg: _ImportConfig) -> dict[str, int]:
    """Embedding width per modality of a LAION release, checked against the named model's width."""
    from core.models import model_embed_dim

    source: Any = ds.source  # a LaionSource: iter_embeddings(), embedding_dim()
    if not hasattr(source, "iter_embeddings"):
        raise ConfigError(f"dataset '{cfg.dataset}' is a {ds.row['kind']} dataset, not a LAION embedding release",
                          hint="compute its embeddings with `prunescope embed` instead")
    dims = {m: int(source.embedding_dim("img" if m == "image" else "text")) for m in cfg.modalities}
    expected = model_embed_dim(cfg.model)
    for m, d in dims.items():
        if expected is not None and d != expected:
            raise DataError(f"the {m} embeddings of '{cfg.dataset}' are {d}-wide but {cfg.model} embeds "
                            f"{expected}-wide", hint="pass the --model the release was computed with")
    if len(set(dims.values())) > 1:
        raise DataError(f"image and text embeddings of '{cfg.dataset}' differ in width: {dims}")
    return dims


@dataclass(frozen=True)
class _ImportConfig(_SetTarget):
    dataset: str
    model: str
    pretrained: str | None
    modality: str
    shard_rows: int
    dtype: str
    set_id: str | None

    def __post_init__(self) -> None:
        validate_name(self.dataset, "dataset name")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model must name the model the embeddings were computed with, e.g. ViT-B-32")
        _choice("modality", self.modality, MODALITIES)
        _choice("dtype", self.dtype, DTYPES)
        _at_least("shard_rows", self.shard_rows, 1)
        set_id = self.set_id or default_set_id(self.dataset, self.model, self.pretrained, self.modality)
        object.__setattr__(self, "set_id", validate_name(set_id, "embedding set id"))


def _import_modality(ds: Dataset, cfg: _ImportConfig, modality: str, folder: Path,
                     ranges: list[tuple[int, int]], dim: int, progress: bool) -> ModalityStats:
    """Stream one modality of the release into shards; finished shards are skipped (resume)."""
    done = {k for k in range(len(ranges)) if folder.is_dir() and shard_done(folder, k)}
    lookup = _partition_lookup(ds.index)
    writer = _ShardWriter(folder, ranges, ds.index["id"], dim, cfg.dtype, skip=done)
    which = "img" if modality == "image" else "text"
    started = time.perf_counter()
    with tqdm(total=len(ds.index), unit="row", desc=f"import {cfg.dataset} ({modality})", disable=not progress) as bar:
        source: Any = ds.source
        for meta, vectors in source.iter_embeddings(batch_rows=min(cfg.shard_rows, 65_536), which=which):
            positions = _positions(lookup, meta)
            keep = positions >= 0  # rows registration skipped (duplicate ids, the other modality bad)
            positions, vectors = positions[keep], vectors[keep]
            X, good = normalize_rows(vectors)
            off = np.zeros(len(X), bool)
            off[good] = np.abs(np.linalg.norm(vectors[good], axis=1) - 1) > NORM_TOLERANCE
            shard_of = positions // cfg.shard_rows
            for k in np.unique(shard_of):
                sel = shard_of == k
                writer.add(int(k), positions[sel & good], X[sel & good],
                           _counts(bad_embedding=int((sel & ~good).sum())), _counts(renormalised=int((sel & off).sum())))
            bar.update(len(meta))
        writer.close(fill_missing=True)
    seconds = time.perf_counter() - started
    rows = sum(stop - start for k, (start, stop) in enumerate(ranges) if k not in done)
    return _modality_stats(folder, len(ranges), len(ranges) - len(done), rows / seconds if rows and seconds > 0 else None)


def _counts(**counts: int) -> Counter[str]:
    """A Counter of the non-zero ``counts``."""
    return Counter({k: v for k, v in counts.items() if v})


def _partition_lookup(index: pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """partition -> (sorted rows within the partition, their index positions)."""
    if "partition" not in index or "row" not in index:
        raise DataError("the dataset index has no partition/row columns; re-register the LAION release")
    out = {}
    part = index["partition"].to_numpy(dtype=np.int64)
    rows = index["row"].to_numpy(dtype=np.int64)
    positions = np.arange(len(index), dtype=np.int64)
    for p in np.unique(part):
        mask = part == p
        order = np.argsort(rows[mask], kind="stable")
        out[int(p)] = (rows[mask][order], positions[mask][order])
    return out


def _positions(lookup: dict[int, tuple[np.ndarray, np.ndarray]], meta: pd.DataFrame) -> np.ndarray:
    """(n,) index position of each (partition, row) of ``meta``; -1 where the index lacks it."""
    out = np.full(len(meta), -1, dtype=np.int64)
    part = meta["partition"].to_numpy(dtype=np.int64)
    rows = meta["row"].to_numpy(dtype=np.int64)
    for p in np.unique(part):
        if int(p) not in lookup:
            continue
        sorted_rows, pos = lookup[int(p)]
        mask = part == p
        at = np.searchsorted(sorted_rows, rows[mask])
        at_c = np.minimum(at, len(sorted_rows) - 1)
        hit = (at < len(sorted_rows)) & (sorted_rows[at_c] == rows[mask])
        out[np.flatnonzero(mask)[hit]] = pos[at_c[hit]]
    return out
