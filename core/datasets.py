"""Register, list, show and open datasets.

Registering scans a source once (``core.sources``), writes the readable samples to
``datasets/<name>/index.parquet`` in the workspace, and records the dataset and its per-reason
issue summary in the catalog (``datasets``, ``dataset_issues``). Nothing in the source is modified.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from core import atomic
from core.errors import AlreadyExists, ConfigError, DataError, MissingFileError, UnknownName
from core.sources import SOURCES, IssueReport, SampleError, Source
from core.store.catalog import utcnow
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

ROLES = ("pool", "benchmark", "reference")
INDEX_FILE = "index.parquet"


@dataclass(frozen=True)
class DatasetInfo:
    """What registration found."""

    name: str
    kind: str
    role: str
    uri: str
    n_samples: int
    n_skipped: int
    report: IssueReport
    index_path: Path


def register_dataset(ws: Workspace, name: str, kind: str, uri: str | Path, *, role: str = "pool",
                     options: Mapping[str, Any] | None = None, replace: bool = False, verify: bool = True,
                     description: str = "", progress: bool = False) -> DatasetInfo:
    """Scan ``uri`` with the ``kind`` source and register it as ``name``.

    Raises:
        UnknownName: ``kind`` is not a registered source.
        ConfigError: bad name, role or option.
        AlreadyExists: ``name`` is taken and ``replace`` is False.
        MissingFileError / DataError: the source is missing, malformed, or has no readable sample.
    """
    validate_name(name, "dataset name")
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    entry = SOURCES.entry(kind)
    resolved = entry.validate_params(dict(options or {}))
    root = Path(uri).expanduser().resolve()
    if not root.exists():
        raise MissingFileError(f"{kind} source {root} does not exist")
    if not replace and _exists(ws, name):
        raise AlreadyExists(f"dataset '{name}' is already registered", hint="pass --replace to re-register it")

    source = entry.obj(root, **resolved)
    report = IssueReport()
    index = _scan_to_table(source, report, verify=verify, progress=progress, name=name)
    if index.num_rows == 0:
        raise DataError(f"dataset '{name}' has no readable samples in {root} ({report.summary()})")

    index_path = ws.dataset_dir(name) / INDEX_FILE
    atomic.write_parquet(index_path, index)
    classes = source.classes()
    if classes is not None:
        atomic.write_json(ws.dataset_dir(name) / "classes.json", classes)
    row = {
        "name": name, "kind": kind, "role": role, "uri": str(root), "n_samples": index.num_rows,
        "n_skipped": report.n_skipped, "created_at": utcnow(), "index_path": ws.rel(index_path),
        "options_json": json.dumps(resolved, sort_keys=True), "n_classes": len(classes) if classes else None,
        "has_captions": bool(index.column("caption").null_count < index.num_rows), "description": description,
    }
    with ws.catalog.connect() as con:
        con.execute("DELETE FROM datasets WHERE name = ?", [name])
        con.execute("DELETE FROM dataset_issues WHERE dataset = ?", [name])
        cols = list(row)
        con.execute(f"INSERT INTO datasets ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                    [row[c] for c in cols])
        issues = report.rows(name)
        if issues:
            con.executemany("INSERT INTO dataset_issues VALUES (?, ?, ?, ?, ?)",
                            [[r["dataset"], r["reason"], r["action"], r["count"], r["example"]] for r in issues])
    log.info("registered %s: %d samples, %s", name, index.num_rows, report.summary())
    return DatasetInfo(name, kind, role, str(root), index.num_rows, report.n_skipped, report, index_path)


def _scan_to_table(source: Source, report: IssueReport, *, verify: bool, progress: bool, name: str) -> pa.Table:
    """Collect scan rows, dropping duplicate ids (counted), into an Arrow table."""
    seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    it: Iterator[dict[str, Any]] = source.scan(report, verify=verify)
    for row in tqdm(it, desc=f"scanning {name}", unit="sample", disable=not progress):
        sid = str(row["id"])
        if sid in seen:
            report.skip("duplicate_id", sid)
            continue
        seen.add(sid)
        row["id"] = sid
        rows.append(row)
    if not rows:
        return pa.table({"id": pa.array([], pa.string())})
    df = pd.DataFrame(rows)
    for col in ("offset", "size", "label"):
        if col not in df:
            df[col] = pd.NA
    if "caption" not in df:
        df["caption"] = None
    df["offset"] = df["offset"].astype("Int64")
    df["size"] = df["size"].astype("Int64")
    df["label"] = df["label"].astype("Int32")
    first = ["id", "locator", "offset", "size", "caption", "label"]
    df = df[first + [c for c in df.columns if c not in first]]
    return pa.Table.from_pandas(df, preserve_index=False)


def _exists(ws: Workspace, name: str) -> bool:
    with ws.catalog.connect(read_only=True) as con:
        row = con.execute("SELECT count(*) FROM datasets WHERE name = ?", [name]).fetchone()
    return bool(row and row[0])


def list_datasets(ws: Workspace) -> pd.DataFrame:
    """Every registered dataset (catalog columns), by role then name."""
    return ws.catalog.query(
        "SELECT name, kind, role, n_samples, n_skipped, n_classes, has_captions, uri, created_at "
        "FROM datasets ORDER BY role, name"
    )


def dataset_row(ws: Workspace, name: str) -> dict[str, Any]:
    """The catalog row of one dataset; UnknownName lists the registered ones."""
    df = ws.catalog.query("SELECT * FROM datasets WHERE name = ?", [name])
    if df.empty:
        names = ws.catalog.query("SELECT name FROM datasets ORDER BY name")["name"].tolist()
        raise UnknownName(f"dataset '{name}' not found; registered: {', '.join(names) or 'none'}")
    return df.iloc[0].to_dict()


def dataset_issues(ws: Workspace, name: str) -> pd.DataFrame:
    return ws.catalog.query(
        "SELECT reason, action, count, example FROM dataset_issues WHERE dataset = ? ORDER BY action, reason", [name]
    )


def remove_dataset(ws: Workspace, name: str) -> None:
    """Forget a dataset (its index and catalog rows); the source files are never touched."""
    dataset_row(ws, name)
    with ws.catalog.connect() as con:
        con.execute("DELETE FROM datasets WHERE name = ?", [name])
        con.execute("DELETE FROM dataset_issues WHERE dataset = ?", [name])
    shutil.rmtree(ws.dataset_dir(name), ignore_errors=True)


class Dataset:
    """A registered dataset: its catalog row, its index, and its source for reading images."""

    def __init__(self, ws: Workspace, name: str) -> None:
        self.ws = ws
        self.row = dataset_row(ws, name)
        self.name = name
        options = json.loads(self.row["options_json"] or "{}")
        self.source: Source = SOURCES.get(self.row["kind"])(Path(self.row["uri"]), **options)
        self._index: pd.DataFrame | None = None

    @property
    def index(self) -> pd.DataFrame:
        """The index DataFrame (id, locator, offset, size, caption, label, extras), loaded once."""
        if self._index is None:
            self._index = pd.read_parquet(self.ws.abs(self.row["index_path"]))
        return self._index

    def classes(self) -> list[str] | None:
        path = self.ws.dataset_dir(self.name) / "classes.json"
        return json.loads(path.read_text()) if path.exists() else None

    def load_image(self, row: Mapping[str, Any]) -> Image.Image:
        """RGB image of one index row; SampleError when it went bad since registration."""
        return self.source.load_image(row)

    def iter_images(self, report: IssueReport | None = None, *, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[dict[str, Any], Image.Image]]:
        """Stream (row, image) over index rows [start, stop); unreadable ones are counted and skipped."""
        report = report if report is not None else IssueReport()
        for row in self.index.iloc[start:stop].to_dict("records"):
            try:
                yield row, self.source.load_image(row)
            except SampleError as exc:
                report.skip(exc.reason, str(row["id"]))


def open_dataset(ws: Workspace, name: str) -> Dataset:
    return Dataset(ws, name)
