"""Pruning manifests: run a chain on a clustering, write what it kept and why, register it, export it.

Outputs (each written atomically), for a pruning ``<id>``::

    manifests/<id>.parquet   one row per clustered row, in assignments order: id, kept (bool),
                             step (1-based step of the chain that removed it; null if kept),
                             reason (dictionary-encoded "<method>:<code>"; null if kept),
                             detail (readable text; null if kept), cluster, score (the deciding
                             value, e.g. the duplicate's cosine), ref_id (the row it duplicates)
    manifests/<id>.json      resolved config, the chain as run, counts, version, git revision

and a row in the catalog's ``prunings`` table (id, methods, config_json, n_in, n_kept,
manifest_path, created_at). Rows that clustering skipped (invalid embeddings) are not in the
clustering and so not in the manifest: ``n_in`` counts the clustered rows.

Exports of the kept ids (:func:`export_manifest`):

- ``datacomp``: DataComp's subset file, ``np.save`` of a sorted structured array of dtype
  ``np.dtype("u8,u8")`` = ``(int(uid[:16], 16), int(uid[16:], 16))`` per uid (DataComp's resharder checks
  the dtype and binary-searches it); every id must be a 32-hex-character DataComp uid.
- ``ids``: one id per line.
- ``wds_keys``: one webdataset ``__key__`` per line. Assumption: the pool's ids ARE its webdataset keys,
  as for img2dataset-style shards registered with the ``webdataset`` source (whose index id is the
  sample key, e.g. ``000010042``); for other sources the ids are written as they are.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from core import atomic
from core.errors import AlreadyExists, ConfigError, DataError, MissingFileError
from core.files import read_json, read_table
from core.prune.base import DEFAULT_CHUNK_BYTES, METHODS, PruneContext, Selection
from core.prune.chain import FRACTION_OF, normalize_steps, run_chain

#: What to do when a manifest is missing or damaged.
PRUNE_HINT = "run the pruning again: prunescope prune CLUSTERING --id ID ... --replace"

if TYPE_CHECKING:
    from core.distributed import RayBackend
    from core.workspace import Workspace

EXPORT_FORMATS = ("datacomp", "ids", "wds_keys")
DATACOMP_UID_DTYPE = np.dtype("u8,u8")
_UID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


@dataclass(frozen=True)
class PruneConfig:
    """A pruning of one clustering (resolved and stored with its manifest).

    Attributes:
        clustering_id: a registered clustering.
        chain: ``(method, params)`` steps (a bare name = defaults), e.g.
            ``[("semdedup", {"eps": 0.05}), ("dbp", {"keep_fraction": 0.5})]``; parameters are
            validated and resolved on creation (defaults filled in).
        seed: seed of every random choice.
        fraction_of: ``input`` (a step's keep_fraction is of its own input) or ``pool`` (of the clustering).
        pruning_id: default ``<clustering>.<methods>.<8 hex of the config>``.
    """

    clustering_id: str
    chain: Any
    seed: int = 0
    fraction_of: str = "input"
    pruning_id: str | None = None

    def __post_init__(self) -> None:
        from core.workspace import validate_name

        validate_name(self.clustering_id, "clustering id")
        steps = [(name, METHODS.entry(name).validate_params(params)) for name, params in normalize_steps(self.chain)]
        object.__setattr__(self, "chain", tuple(steps))
        if self.fraction_of not in FRACTION_OF:
            raise ConfigError(f"fraction_of must be one of {', '.join(FRACTION_OF)}; got {self.fraction_of!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer; got {self.seed!r}")
        pid = self.pruning_id or self._default_id()
        object.__setattr__(self, "pruning_id", validate_name(pid, "pruning id"))

    @property
    def id(self) -> str:
        assert self.pruning_id is not None
        return self.pruning_id

    @property
    def methods(self) -> str:
        return ">".join(name for name, _ in self.chain)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON types (without the id)."""
        out: dict[str, Any] = json.loads(json.dumps({
            "clustering_id": self.clustering_id, "chain": [[n, p] for n, p in self.chain],
            "seed": self.seed, "fraction_of": self.fraction_of}))
        return out

    def _default_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
        methods = "-".join(name for name, _ in self.chain)[:20]
        return f"{self.clustering_id[:33]}.{methods}.{digest}"


@dataclass(frozen=True)
class PruningInfo:
    """A registered pruning. ``selection`` is set when this call computed it (None when reused)."""

    id: str
    clustering_id: str
    methods: str
    n_in: int
    n_kept: int
    manifest_path: Path
    meta: dict[str, Any]
    selection: Selection | None = field(default=None, repr=False)


def run_pruning(ws: Workspace, cfg: PruneConfig, *, replace: bool = False, workers: int | None = None,
                max_chunk_bytes: int | None = None, backend: RayBackend | None = None,
                device: str | None = None) -> PruningInfo:
    """Run ``cfg.chain`` on the clustering, write the manifest and register it (reused when complete).

    ``workers``, ``max_chunk_bytes`` and ``device`` are execution settings of :class:`PruneContext` (threads,
    the float32 embedding rows read at once, and where SemDeDup's products run: a CUDA GPU by default when
    torch sees one); they do not change the result beyond float rounding, so they are not in the config.
    Neither does ``backend``: it runs the per-cluster work that reads embeddings (SemDeDup) on a Ray
    cluster, grouped by cluster, with the same per-cluster functions (:mod:`core.distributed`).

    Raises:
        UnknownName: the clustering is not registered. AlreadyExists: ``cfg.pruning_id`` names a
        pruning made with another config (pass ``replace=True``). ConfigError / DataError from the methods.
    """
    from core.prune.semdedup import pairwise_device
    from core.store.catalog import utcnow

    if device is not None:
        pairwise_device(device)  # a bad device name fails here, before any work
    parquet_path, meta_path = _paths(ws, cfg.id)
    config = cfg.to_dict()
    if meta_path.exists() and not replace:
        meta = read_json(meta_path, f"the meta.json of pruning '{cfg.id}'", hint="pass replace=True")
        if meta.get("config") != config:
            raise AlreadyExists(f"pruning '{cfg.id}' exists with another config",
                                hint="pass replace=True, or choose another pruning id")
        if parquet_path.exists() and _registered(ws, cfg.id):
            return _info(ws, cfg.id, meta)
    ws.catalog.row("clusterings", "id", cfg.clustering_id, what="clustering")
    ctx = PruneContext.from_clustering(ws, cfg.clustering_id, seed=cfg.seed, workers=workers,
                                       max_chunk_bytes=max_chunk_bytes or DEFAULT_CHUNK_BYTES, device=device)
    if backend is None:
        sel = run_chain(ctx, cfg.chain, fraction_of=cfg.fraction_of)
    else:
        from core.distributed import run_chain_on_ray

        sel = run_chain_on_ray(backend, ws, cfg.clustering_id, ctx, cfg.chain, fraction_of=cfg.fraction_of)
    atomic.write_parquet(parquet_path, manifest_table(ctx, sel))
    meta = _meta(cfg, config, sel, ws, parquet_path)
    atomic.write_json(meta_path, meta)
    ws.catalog.insert("prunings", [{
        "id": cfg.id, "methods": cfg.methods, "config_json": json.dumps(config, sort_keys=True),
        "n_in": sel.n_in, "n_kept": len(sel.kept), "manifest_path": ws.rel(parquet_path), "created_at": utcnow(),
    }], replace_where="id = ?", replace_params=[cfg.id])
    return PruningInfo(cfg.id, cfg.clustering_id, cfg.methods, sel.n_in, len(sel.kept), parquet_path, meta, sel)


def _paths(ws: Workspace, pruning_id: str) -> tuple[Path, Path]:
    folder = ws.dir("manifests")
    return folder / f"{pruning_id}.parquet", folder / f"{pruning_id}.json"


def _registered(ws: Workspace, pruning_id: str) -> bool:
    return not ws.catalog.query("SELECT id FROM prunings WHERE id = ?", [pruning_id]).empty


def _meta(cfg: PruneConfig, config: dict[str, Any], sel: Selection, ws: Workspace, path: Path) -> dict[str, Any]:
    from core.runs import git_revision, package_version

    steps = np.bincount(sel.step.astype(np.int64), minlength=len(sel.chain))
    return {
        "id": cfg.id, "config": config, "methods": cfg.methods, "chain_run": [[m, p] for m, p in sel.chain],
        "n_in": sel.n_in, "n_kept": len(sel.kept), "removed_by_reason": sel.reason_counts(),
        "removed_by_step": [int(c) for c in steps], "manifest_path": ws.rel(path),
        "version": package_version(), "git_rev": git_revision(),
    }


def _info(ws: Workspace, pruning_id: str, meta: dict[str, Any]) -> PruningInfo:
    return PruningInfo(pruning_id, meta["config"]["clustering_id"], meta["methods"], int(meta["n_in"]),
                       int(meta["n_kept"]), ws.abs(meta["manifest_path"]), meta)


def manifest_table(ctx: PruneContext, sel: Selection, *, detail: bool = True) -> pa.Table:
    """The manifest of ``sel`` over ``ctx``'s active rows, in position order (columns: module docstring).

    ``detail=False`` leaves the readable detail column null (it is the only per-row string work).
    """
    n_kept = len(sel.kept)
    pos = np.concatenate([sel.kept, sel.removed])
    order = np.argsort(pos, kind="stable")
    gone = order >= n_kept
    at = np.where(gone, order - n_kept, 0)  # index into the removed rows' arrays

    def removed_only(values: np.ndarray, typ: pa.DataType) -> pa.Array:
        padded = values if len(values) else np.zeros(1, dtype=values.dtype)
        return pa.array(padded[at], type=typ, mask=~gone)

    texts = np.asarray(sel.details(ctx.ids, ctx.labels) if detail else [None] * len(sel.removed), dtype=object)
    ref = np.full(len(pos), -1, np.int64)
    ref[gone] = sel.ref[at[gone]]
    ref_ids = np.full(len(pos), None, dtype=object)
    ref_ids[ref >= 0] = ctx.ids[ref[ref >= 0]]
    return pa.table({
        "id": pa.array(ctx.ids[pos[order]], type=pa.string()),
        "kept": pa.array(~gone),
        "step": removed_only(sel.step.astype(np.int16) + 1, pa.int16()),
        "reason": pa.DictionaryArray.from_arrays(removed_only(sel.reason.astype(np.int16), pa.int16()),
                                                 pa.array(list(sel.reason_names), pa.string())),
        "detail": removed_only(texts, pa.string()),
        "cluster": pa.array(ctx.labels[pos[order]].astype(np.int32)),
        "score": removed_only(sel.score.astype(np.float32), pa.float32()),
        "ref_id": pa.array(ref_ids, type=pa.string()),
    })


def list_prunings(ws: Workspace) -> pd.DataFrame:
    """Every registered pruning (catalog columns), newest first."""
    return ws.catalog.query("SELECT id, methods, n_in, n_kept, manifest_path, config_json, created_at "
                            "FROM prunings ORDER BY created_at DESC, id")


def manifest_path(ws: Workspace, pruning_id: str) -> Path:
    """The manifest parquet of a registered pruning; UnknownName lists the registered ones."""
    row = ws.catalog.row("prunings", "id", pruning_id, what="pruning")
    path = ws.abs(row["manifest_path"])
    if not path.exists():
        raise MissingFileError(f"manifest of pruning '{pruning_id}' is missing: {path}",
                               hint="run the pruning again with replace=True")
    return path


def load_manifest(ws: Workspace, pruning_id: str, *, columns: list[str] | None = None) -> pd.DataFrame:
    """The manifest as a DataFrame (all rows, kept and removed)."""
    return read_table(manifest_path(ws, pruning_id), f"the manifest of pruning '{pruning_id}'", columns=columns,
                      hint=PRUNE_HINT).to_pandas()


def kept_ids(ws: Workspace, pruning_id: str) -> list[str]:
    """The kept ids of a pruning, in manifest order."""
    table = read_table(manifest_path(ws, pruning_id), f"the manifest of pruning '{pruning_id}'", columns=["id", "kept"],
                       hint=PRUNE_HINT)
    ids: list[str] = table.filter(table.column("kept")).column("id").to_pylist()
    return ids


def datacomp_uids(ids: list[str]) -> np.ndarray:
    """(n,) sorted DataComp subset array (dtype ``u8,u8``) from 32-hex-char uids; DataError otherwise."""
    bad = next((u for u in ids if not isinstance(u, str) or not _UID_RE.match(u)), None)
    if bad is not None:
        raise DataError(f"id {bad!r} is not a DataComp uid (32 hexadecimal characters)",
                        hint="export as 'ids' or 'wds_keys' for pools that are not DataComp's")
    raw = np.frombuffer(bytes.fromhex("".join(ids)), dtype=">u8").reshape(-1, 2)
    out = np.empty(len(ids), dtype=DATACOMP_UID_DTYPE)
    out["f0"], out["f1"] = raw[:, 0], raw[:, 1]
    return out[np.lexsort((out["f1"], out["f0"]))]


def export_manifest(ws: Workspace, pruning_id: str, fmt: str, out_path: str | Path) -> Path:
    """Write the kept ids of a pruning as ``fmt`` (``datacomp``, ``ids``, ``wds_keys``) to ``out_path``."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}; got {fmt!r}")
    ids = kept_ids(ws, pruning_id)
    out = Path(out_path).expanduser()
    if fmt == "datacomp":
        atomic.save_npy(out, datacomp_uids(ids))
    else:  # wds keys: the ids are the webdataset keys (module docstring)
        atomic.write_text(out, "".join(f"{i}\n" for i in ids))
    return out
