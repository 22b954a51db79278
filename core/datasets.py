"""Register, list, show and open datasets.

Registering scans a source once (``core.sources``), writes the readable samples to
``datasets/<name>/index.parquet`` in the workspace, and records the dataset and its per-reason
issue summary in the catalog (``datasets``, ``dataset_issues``). Nothing in the source is modified.

Registration is all-or-nothing: the index is written in chunks into a hidden staging folder
(``datasets/.<name>.tmp-*``), the catalog rows are replaced in one transaction, and only then does the
staging folder take the dataset folder's place. A scan that fails (DataError, no readable samples,
an interrupt) leaves the catalog and any earlier registration of the name exactly as they were.

Files in ``datasets/<name>/``:
    index.parquet   id, locator, offset, size, caption, label, then the source's extra columns
    classes.json    class names by label index (labelled sources only)
    meta.json       what the scan learned about the source: ``has_images``, ``columns``
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from core import atomic
from core.errors import (
    AlreadyExists,
    ConfigError,
    DataError,
    MissingFileError,
    PathOutsideWorkspace,
)
from core.files import read_json, read_table
from core.sources import SOURCES, IssueReport, SampleError, Source
from core.sources.base import INDEX_TYPES
from core.store.catalog import utcnow
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

ROLES = ("pool", "benchmark", "reference")
INDEX_FILE = "index.parquet"
CLASSES_FILE = "classes.json"
META_FILE = "meta.json"
#: Rows per chunk a scan hands over (the memory registration holds at once).
CHUNK_ROWS = 65_536


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


# -- registration --------------------------------------------------------------------------------------
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
    staging = ws.dir("datasets", f".{name}{atomic.TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    try:
        n_rows, has_captions = _scan_to_index(source, report, staging / INDEX_FILE, verify=verify,
                                              progress=progress, name=name)
        if n_rows == 0:
            raise DataError(f"dataset '{name}' has no readable samples in {root} ({report.summary()})")
        classes = _write_sidecars(source, staging)
        row = {
            "name": name, "kind": kind, "role": role, "uri": str(root), "n_samples": n_rows,
            "n_skipped": report.n_skipped, "created_at": utcnow(),
            "index_path": ws.rel(ws.dataset_dir(name) / INDEX_FILE),
            "options_json": json.dumps(resolved, sort_keys=True, default=str),
            "n_classes": len(classes) if classes else None, "has_captions": has_captions,
            "description": description,
        }
        _write_catalog(ws, row, report.rows(name), replace=replace)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_in(staging, ws.dataset_dir(name))
    log.info("registered %s: %d samples, %s", name, n_rows, report.summary())
    return DatasetInfo(name, kind, role, str(root), n_rows, report.n_skipped, report,
                       ws.dataset_dir(name) / INDEX_FILE)


def _scan_to_index(source: Source, report: IssueReport, dest: Path, *, verify: bool, progress: bool,
                   name: str) -> tuple[int, bool]:
    """Stream the scan's tables, dropping duplicate ids (counted), into ``dest``; returns (rows, any caption)."""
    seen: set[str] = set()
    writer = IndexWriter(dest)
    bar = tqdm(desc=f"scanning {name}", unit="sample", disable=not progress)
    try:
        for table in source.scan_tables(report, verify=verify, chunk_rows=CHUNK_ROWS):
            writer.add(drop_duplicate_ids(table, seen, report))
            bar.update(table.num_rows)
    except OSError as exc:  # e.g. a folder that cannot be listed: the dataset as a whole is unreadable
        raise DataError(f"cannot read {source.kind} source {source.root}: {exc.strerror or exc}") from None
    finally:
        bar.close()
    return writer.close(), writer.has_captions


def drop_duplicate_ids(table: pa.Table, seen: set[str], report: IssueReport) -> pa.Table:
    """``table`` without rows whose id is in ``seen`` (or earlier in the table), each counted; updates ``seen``."""
    keep = []
    for sid in table.column("id").to_pylist():
        if sid in seen:
            report.skip("duplicate_id", sid)
            keep.append(False)
        else:
            seen.add(sid)
            keep.append(True)
    return table if all(keep) else table.filter(pa.array(keep))


def _write_sidecars(source: Source, folder: Path) -> list[str] | None:
    """classes.json (labelled sources) and meta.json beside the index; returns the classes."""
    classes = source.classes()
    if classes is not None:
        atomic.write_json(folder / CLASSES_FILE, classes)
    columns = pq.read_schema(folder / INDEX_FILE).names
    atomic.write_json(folder / META_FILE, {"kind": source.kind, "has_images": bool(source.has_images),
                                           "columns": columns})
    return classes


def _write_catalog(ws: Workspace, row: dict[str, Any], issues: list[dict[str, Any]], *, replace: bool) -> None:
    """Replace the dataset's catalog rows in one transaction (nothing changes when it fails)."""
    with ws.catalog.connect() as con:
        taken = con.execute("SELECT count(*) FROM datasets WHERE name = ?", [row["name"]]).fetchone()
        if taken and taken[0] and not replace:
            raise AlreadyExists(f"dataset '{row['name']}' is already registered",
                                hint="pass --replace to re-register it")
        con.execute("DELETE FROM datasets WHERE name = ?", [row["name"]])
        con.execute("DELETE FROM dataset_issues WHERE dataset = ?", [row["name"]])
        cols = list(row)
        con.execute(f"INSERT INTO datasets ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
                    [row[c] for c in cols])
        if issues:
            con.executemany("INSERT INTO dataset_issues (dataset, reason, action, count, example) VALUES (?, ?, ?, ?, ?)",
                            [[r["dataset"], r["reason"], r["action"], r["count"], r["example"]] for r in issues])


def _swap_in(staging: Path, final: Path) -> None:
    """Put the staging folder in the dataset folder's place (two renames), then drop the old one."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}{atomic.TMP_MARK}old-{secrets.token_hex(4)}")
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _exists(ws: Workspace, name: str) -> bool:
    with ws.catalog.connect(read_only=True) as con:
        row = con.execute("SELECT count(*) FROM datasets WHERE name = ?", [name]).fetchone()
    return bool(row and row[0])


# -- the index writer ----------------------------------------------------------------------------------
class IndexWriter:
    """Writes index tables to parquet as they come, whatever extra columns appear.

    Each table becomes a part file with its own types; :meth:`close` settles one type per column
    (mixed numbers -> float64, anything else mixed -> text) and streams the parts into ``dest`` one at
    a time. Memory holds one table, never the whole index.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.parts_dir = dest.parent / ".parts"
        self._parts: list[tuple[Path, pa.Schema]] = []
        self.n_rows = 0
        self.has_captions = False

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        path = self.parts_dir / f"part-{len(self._parts):06d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        self._parts.append((path, table.schema))
        self.n_rows += table.num_rows
        if "caption" in table.column_names:
            self.has_captions = self.has_captions or table.column("caption").null_count < table.num_rows

    def close(self) -> int:
        """Write ``dest`` from the parts; returns the row count (0 writes nothing)."""
        if self._parts:
            schema = unify_schemas([s for _, s in self._parts])
            with atomic.atomic_path(self.dest) as tmp, pq.ParquetWriter(tmp, schema) as writer:
                for path, _ in self._parts:
                    writer.write_table(conform(pq.read_table(path), schema))
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.n_rows


def unify_schemas(schemas: list[pa.Schema]) -> pa.Schema:
    """One type per column over all chunks: equal types stay, numbers widen to float64, else text."""
    types: dict[str, list[pa.DataType]] = {name: [] for name in INDEX_TYPES}
    for schema in schemas:
        for fld in schema:
            types.setdefault(fld.name, []).append(fld.type)
    fields = []
    for name, seen in types.items():
        kinds = {t for t in seen if not pa.types.is_null(t)}
        if name in INDEX_TYPES:
            out = INDEX_TYPES[name]
        elif not kinds:
            out = pa.string()
        elif len(kinds) == 1:
            out = kinds.pop()
        elif all(pa.types.is_integer(t) for t in kinds):
            out = pa.int64()
        elif all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in kinds):
            out = pa.float64()
        else:
            out = pa.string()
        fields.append(pa.field(name, out))
    return pa.schema(fields)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with exactly ``schema``'s columns: missing ones null, others cast."""
    arrays = []
    for fld in schema:
        if fld.name not in table.column_names:
            arrays.append(pa.nulls(table.num_rows, fld.type))
        else:
            col = table.column(fld.name)
            arrays.append(col if col.type == fld.type else pc.cast(col, fld.type))
    return pa.table(arrays, schema=schema)


# -- catalog queries ------------------------------------------------------------------------------------
def list_datasets(ws: Workspace) -> pd.DataFrame:
    """Every registered dataset (catalog columns), by role then name."""
    return ws.catalog.query(
        "SELECT name, kind, role, n_samples, n_skipped, n_classes, has_captions, uri, created_at "
        "FROM datasets ORDER BY role, name"
    )


def dataset_row(ws: Workspace, name: str) -> dict[str, Any]:
    """The catalog row of one dataset; UnknownName lists the registered ones."""
    return ws.catalog.row("datasets", "name", name, what="dataset")


def dataset_issues(ws: Workspace, name: str) -> pd.DataFrame:
    """What registration skipped or repaired: reason, action (skipped|repaired), count, example."""
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


# -- reading a registered dataset -----------------------------------------------------------------------
class Dataset:
    """A registered dataset: its catalog row, its index, and its source for reading images."""

    def __init__(self, ws: Workspace, name: str) -> None:
        self.ws = ws
        self.row = dataset_row(ws, name)
        self.name = name
        options = json.loads(self.row["options_json"] or "{}")
        self.source: Source = SOURCES.get(self.row["kind"])(Path(self.row["uri"]), **options)
        self.meta: dict[str, Any] = self._read_json(META_FILE) or {}
        self.source.has_images = bool(self.meta.get("has_images", type(self.source).has_images))
        self._index: pd.DataFrame | None = None

    def _read_json(self, file: str) -> Any:
        path = self.ws.dataset_dir(self.name) / file
        hint = f"re-register it: prunescope datasets add {self.name} ... --replace"
        return read_json(path, f"the {file} of dataset '{self.name}'", hint=hint) if path.exists() else None

    @property
    def has_images(self) -> bool:
        """Whether rows have local images (False for URL-only tables and bare embedding releases)."""
        return bool(self.source.has_images)

    @property
    def index_path(self) -> Path:
        path = self.ws.abs(self.row["index_path"])
        if not path.exists():
            raise DataError(f"the index of dataset '{self.name}' is missing ({path})",
                            hint=f"re-register it: prunescope datasets add {self.name} ... --replace")
        return path

    @property
    def index(self) -> pd.DataFrame:
        """The whole index as a DataFrame (integer columns nullable), loaded once; prefer
        :meth:`iter_rows` to stream a large one."""
        if self._index is None:
            mapper = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}.get
            table = read_table(self.index_path, f"the index of dataset '{self.name}'",
                               hint=f"re-register it: prunescope datasets add {self.name} ... --replace")
            self._index = table.to_pandas(types_mapper=mapper)
        return self._index

    def classes(self) -> list[str] | None:
        """Class names by label index, as stored at registration; None when unlabelled."""
        value = self._read_json(CLASSES_FILE)
        return list(value) if value is not None else None

    def iter_rows(self, start: int = 0, stop: int | None = None, *, batch_rows: int = 4096,
                  columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Stream index rows [start, stop) as dicts (None for nulls), reading only the row groups needed."""
        with contextlib.closing(pq.ParquetFile(self.index_path)) as pf:
            pos = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                if pos + n <= start:
                    pos += n
                    continue
                if stop is not None and pos >= stop:
                    return
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[rg], columns=columns):
                    for row in batch.to_pylist():
                        if stop is not None and pos >= stop:
                            return
                        if pos >= start:
                            yield row
                        pos += 1

    def load_image(self, row: Mapping[str, Any]) -> Image.Image:
        """RGB image of one index row; SampleError when it went bad since registration."""
        return self.source.load_image(row)

    def iter_images(self, report: IssueReport | None = None, *, start: int = 0,
                    stop: int | None = None) -> Iterator[tuple[dict[str, Any], Image.Image]]:
        """Stream (row, image) over index rows [start, stop); unreadable ones are counted and skipped."""
        report = report if report is not None else IssueReport()
        for row in self.iter_rows(start, stop):
            try:
                yield row, self.source.load_image(row)
            except SampleError as exc:
                report.skip(exc.reason, str(row["id"]))
            except PathOutsideWorkspace:
                report.skip("path_outside_root", str(row["id"]))


def open_dataset(ws: Workspace, name: str) -> Dataset:
    return Dataset(ws, name)
