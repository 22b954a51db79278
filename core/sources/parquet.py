"""Parquet tables of image paths or URLs plus captions (DataComp ``metadata/*.parquet``, LAION URL+text).

``uri`` is one parquet file or a folder of them (read in natural order: ``part-2`` before ``part-10``).
Columns are found case-insensitively (LAION releases upper-case them), each overridable by an option:

========  ==============================================  ===========
part      candidates (first present wins)                 option
========  ==============================================  ===========
id        id, uid, key, sample_id (else ``<stem>:<row>``)  ``id_col``
image     path, image_path, filepath, file (local), url    ``path_col`` / ``url_col``
caption   caption, text, txt                              ``caption_col``
label     label, class, target                            ``label_col``
========  ==============================================  ===========

Local paths are relative to the parquet's folder, or to ``image_root``. Every other scalar column is
kept as an extra index column, its name lower-cased (``similarity``, ``nsfw``, ``original_width``,
``clip_b32_similarity_score``); a name that clashes with an index column gets a ``src_`` prefix.
Nested columns (DataComp ``face_bboxes``) are left out.

A URL-only table registers without touching the network: ``locator`` is the URL, ``has_images`` is
False, and reading an image raises SampleError ``remote_image`` (download first, e.g. img2dataset).
Files are read in record batches (never whole into pandas).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.errors import DataError, MissingFileError
from core.registry import ParamSpec
from core.sources.base import (
    CHUNK_ROWS,
    INDEX_COLUMNS,
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    common_params,
    decode_caption,
    index_row,
    is_url,
    natural_key,
    read_local_file,
    rows_to_table,
)
from core.sources.image_folder import read_class_list

log = logging.getLogger(__name__)

ID_NAMES = ("id", "uid", "key", "sample_id")
PATH_NAMES = ("path", "image_path", "filepath", "file")
URL_NAMES = ("url",)
CAPTION_NAMES = ("caption", "text", "txt")
LABEL_NAMES = ("label", "class", "target")
DEFAULT_BATCH_ROWS = 65_536


# -- helpers shared with the laion source -------------------------------------------------------------
def list_parquet_files(root: Path) -> list[Path]:
    """``root`` itself when a file, else the visible ``*.parquet`` files in it, in natural order."""
    if not root.exists():
        raise MissingFileError(f"{root} does not exist")
    if root.is_file():
        return [root]
    files = [p for p in root.iterdir()
             if p.suffix.lower() == ".parquet" and p.is_file() and not p.name.startswith(".")]
    if not files:
        raise DataError(f"no .parquet files in {root}")
    return sorted(files, key=lambda p: natural_key(p.name))


def open_parquet(path: Path) -> pq.ParquetFile:
    """Open a parquet file (footer only); DataError naming the file when it is not parquet or corrupt."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataError(f"{path.name} is not a readable parquet file: {_first_line(exc)}") from None


def iter_batches(pf: pq.ParquetFile, columns: Sequence[str], path: Path,
                 batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns``; a corrupt page raises DataError naming the file."""
    it = pf.iter_batches(batch_size=batch_rows, columns=list(columns), use_threads=False)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DataError(f"{path.name} is corrupt (parquet read failed): {_first_line(exc)}") from None
        yield batch


def batch_columns(batch: pa.RecordBatch) -> dict[str, list[Any]]:
    """A record batch as ``{column name: python values}``."""
    return {name: batch.column(i).to_pylist() for i, name in enumerate(batch.schema.names)}


def find_column(names: Sequence[str], candidates: Sequence[str], override: str | None = None, *,
                what: str = "", file: str = "") -> str | None:
    """The actual name of the first column matching ``candidates`` (case-insensitive), or None.

    An ``override`` must exist (case-insensitive); otherwise DataError listing the columns.
    """
    lower = {n.lower(): n for n in reversed(names)}  # first spelling wins on case clashes
    if override:
        if override.lower() in lower:
            return lower[override.lower()]
        raise DataError(f"{file}: no column {override!r} ({what}); its columns: {', '.join(names)}")
    return next((lower[c] for c in candidates if c in lower), None)


def is_scalar_type(t: pa.DataType) -> bool:
    """Types kept as extra index columns: numbers, booleans, text, dates (not lists, structs, binary)."""
    if pa.types.is_dictionary(t):
        return is_scalar_type(t.value_type)
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
                or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_timestamp(t)
                or pa.types.is_date(t) or pa.types.is_decimal(t))


def extra_columns(schema: pa.Schema, used: Sequence[str | None],
                  reserved: Sequence[str] = INDEX_COLUMNS) -> dict[str, str]:
    """Scalar columns not in ``used``: original name -> lower-cased index name (``src_`` on clashes)."""
    out: dict[str, str] = {}
    taken = {u.lower() for u in used if u}
    for fld in schema:
        name = fld.name.lower()
        if fld.name in used or name in taken or not is_scalar_type(fld.type):
            continue
        if name in reserved:
            name = f"src_{name}"
        taken.add(name)
        out[fld.name] = name
    return out


# -- column-wise helpers (Arrow arrays in, Arrow arrays out) ----------------------------------------------
def plain(col: pa.Array) -> pa.Array:
    """A dictionary-encoded column decoded to its value type; other columns unchanged."""
    return pc.cast(col, col.type.value_type) if pa.types.is_dictionary(col.type) else col


def as_strings(col: pa.Array) -> pa.Array:
    """A column as text (numbers formatted like ``str``; bytes decoded with replacement characters)."""
    col = plain(col)
    if pa.types.is_string(col.type):
        return col
    if pa.types.is_integer(col.type) or pa.types.is_large_string(col.type):
        return pc.cast(col, pa.string())
    return pa.array([None if v is None else decode_caption(v) if isinstance(v, bytes) else str(v)
                     for v in col.to_pylist()], pa.string())


def id_strings(col: pa.Array | None, prefix: str, rows: np.ndarray) -> pa.Array:
    """Sample ids as text; missing ones (no id column, or a null) become ``<prefix>:<row>``."""
    if col is not None:
        ids = as_strings(col)
        if not ids.null_count:
            return ids
    fallback = pa.array([f"{prefix}:{r}" for r in rows.tolist()], pa.string())
    return fallback if col is None else pc.if_else(pc.is_null(ids), fallback, ids)


def caption_strings(col: pa.Array, ids: pa.Array, report: IssueReport) -> pa.Array:
    """Captions as text; non-UTF-8 bytes are decoded with U+FFFD and counted as repaired."""
    col = plain(col)
    if not pa.types.is_binary(col.type) and not pa.types.is_large_binary(col.type):
        return as_strings(col)
    return pa.array([decode_caption(v, report, str(sid)) for v, sid in zip(col.to_pylist(), ids.to_pylist(),
                                                                            strict=True)], pa.string())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# -- the source ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnPlan:
    """Which column of one parquet file plays which part (actual names) and the extras to keep."""

    id: str | None
    path: str | None
    url: str | None
    caption: str | None
    label: str | None
    extras: dict[str, str] = field(default_factory=dict)
    label_is_text: bool = False

    def columns(self) -> list[str]:
        parts = [self.id, self.path, self.url, self.caption, self.label]
        return list(dict.fromkeys([c for c in parts if c] + list(self.extras)))


def plan_columns(schema: pa.Schema, options: Mapping[str, Any], file: str) -> ColumnPlan:
    """Find the id, image (path or url), caption and label columns of one file.

    Raises DataError when there is neither a path nor a url column (listing the columns there are).
    """
    names = schema.names
    found = {
        part: find_column(names, cands, options.get(f"{part}_col"), what=part, file=file)
        for part, cands in (("id", ID_NAMES), ("path", PATH_NAMES), ("url", URL_NAMES),
                            ("caption", CAPTION_NAMES), ("label", LABEL_NAMES))
    }
    if found["path"] is None and found["url"] is None:
        raise DataError(
            f"{file} has no image column ({', '.join(PATH_NAMES)}) or url column; its columns: {', '.join(names)}",
            hint="name the column with -o path_col=NAME or -o url_col=NAME",
        )
    label_type = schema.field(found["label"]).type if found["label"] else None
    text_label = label_type is not None and (pa.types.is_string(label_type) or pa.types.is_large_string(label_type)
                                             or pa.types.is_dictionary(label_type))
    extras = extra_columns(schema, list(found.values()), reserved=(*INDEX_COLUMNS, "url", "class_name"))
    return ColumnPlan(found["id"], found["path"], found["url"], found["caption"], found["label"], extras, text_label)


def url_table(batch: pa.RecordBatch, plan: ColumnPlan, label_ids: dict[str, int], report: IssueReport,
              stem: str, start: int) -> pa.Table:
    """Index rows of one batch of a URL-only file, built column-wise (same rows as the row-wise path).

    Rows with a null id or url are skipped (``missing_value``), then rows with a label that is not an
    integer >= 0 (``bad_label``); the rest become one table.
    """
    rows = np.arange(start, start + batch.num_rows, dtype=np.int64)
    keep = _valid_url_rows(batch, plan, report, lambda i: f"{stem}:{rows[i]}")
    if not keep.all():
        batch, rows = batch.filter(pa.array(keep)), rows[keep]
    n = batch.num_rows
    ids = id_strings(batch.column(plan.id) if plan.id else None, stem, rows)
    urls = as_strings(batch.column(plan.url)) if plan.url else pa.nulls(n, pa.string())
    labels, class_names = batch_labels(batch.column(plan.label) if plan.label else None, n, plan, label_ids)
    cols: dict[str, pa.Array] = {
        "id": ids, "locator": urls, "offset": pa.nulls(n, pa.int64()), "size": pa.nulls(n, pa.int64()),
        "caption": caption_strings(batch.column(plan.caption), ids, report) if plan.caption
        else pa.nulls(n, pa.string()),
        "label": labels,
    }
    cols.update({name: plain(batch.column(col)) for col, name in plan.extras.items()})
    cols["url"] = urls
    if class_names is not None:
        cols["class_name"] = class_names
    return pa.table(cols)


def _valid_url_rows(batch: pa.RecordBatch, plan: ColumnPlan, report: IssueReport,
                    where: Callable[[int], str]) -> np.ndarray:
    """(n,) rows to keep; each dropped row is counted with the first reason that applies."""
    keep = np.ones(batch.num_rows, dtype=bool)
    if plan.id:
        _skip(report, keep, _nulls(batch.column(plan.id)), "missing_value", where, f"{plan.id} is null")
    if plan.url:
        urls = as_strings(batch.column(plan.url))
        _skip(report, keep, _nulls(urls) | _empty(urls), "missing_value", where, f"{plan.url} is null")
    if plan.label and not plan.label_is_text:
        _skip(report, keep, _bad_labels(batch.column(plan.label)), "bad_label", where, "not an integer >= 0")
    return keep


def batch_labels(col: pa.Array | None, n: int, plan: ColumnPlan,
                 label_ids: dict[str, int]) -> tuple[pa.Array, pa.Array | None]:
    """(int32 labels, class names or None): text labels by sorted class index, numbers as they are.

    Numeric labels must already be valid (see :func:`_bad_labels`); nulls stay null.
    """
    if col is None:
        return pa.nulls(n, pa.int32()), None
    if plan.label_is_text:
        names = as_strings(col)
        classes = pa.array(sorted(label_ids, key=label_ids.__getitem__), pa.string())
        return pc.cast(pc.index_in(names, value_set=classes), pa.int32()), names
    return pc.cast(pc.cast(plain(col), pa.float64()), pa.int32()), None


def _bad_labels(col: pa.Array) -> np.ndarray:
    """(n,) True where a numeric label is present (not null) but NaN, negative or not integral."""
    col = plain(col)
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_decimal(col.type)):
        return ~_nulls(col)  # booleans, dates...: not labels
    values = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)
    ok = np.isfinite(values) & (values >= 0) & (np.mod(values, 1) == 0)
    return ~_nulls(col) & ~ok


def _nulls(col: pa.Array) -> np.ndarray:
    return np.asarray(pc.is_null(col).to_numpy(zero_copy_only=False), dtype=bool)


def _empty(col: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(pc.equal(col, ""), False).to_numpy(zero_copy_only=False), dtype=bool)


def _skip(report: IssueReport, keep: np.ndarray, bad: np.ndarray, reason: str, where: Callable[[int], str],
          what: str) -> None:
    """Count ``reason`` for rows still kept that are ``bad``, and drop them from ``keep``."""
    for i in np.flatnonzero(keep & bad):
        report.skip(reason, f"{where(int(i))}: {what}")
    keep &= ~bad


def chunked_tables(rows: Iterator[dict[str, Any]], chunk_rows: int) -> Iterator[pa.Table]:
    """Index rows gathered into Arrow tables of up to ``chunk_rows``."""
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= chunk_rows:
            yield rows_to_table(chunk)
            chunk = []
    if chunk:
        yield rows_to_table(chunk)


@SOURCES.register(
    "parquet",
    summary="parquet file(s) of image paths or URLs + captions (DataComp metadata, LAION URL+text)",
    params=(
        ParamSpec("id_col", "str", None, "id column (default: id, uid, key, sample_id; else <file>:<row>)"),
        ParamSpec("path_col", "str", None, "local image path column (default: path, image_path, filepath, file)"),
        ParamSpec("url_col", "str", None, "image URL column (default: url)"),
        ParamSpec("caption_col", "str", None, "caption column (default: caption, text, txt)"),
        ParamSpec("label_col", "str", None, "label column (default: label, class, target)"),
        ParamSpec("image_root", "path", None, "folder the image paths are relative to (default: the parquet's)"),
        ParamSpec("classes_file", "path", None, "class names in label order (.txt or .json) for integer labels, "
                  "or the order of text labels"),
        ParamSpec("batch_rows", "int", DEFAULT_BATCH_ROWS, "rows read per record batch", min=1),
        *common_params(),
    ),
)
class ParquetSource(Source):
    kind = "parquet"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        image_root = options.get("image_root")
        self.base = Path(image_root).expanduser().resolve() if image_root else (
            self.root if self.root.is_dir() else self.root.parent)
        self._classes: list[str] | None = None
        self._classes_known = False

    def _plans(self) -> list[tuple[Path, ColumnPlan]]:
        """Every file with its column plan, checked before any row is read (errors come early)."""
        out = []
        for path in list_parquet_files(self.root):
            with closing(open_parquet(path)) as pf:
                out.append((path, plan_columns(pf.schema_arrow, self.options, path.name)))
        return out

    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        for table in self.scan_tables(report, verify=verify):
            yield from table.to_pylist()

    def scan_tables(self, report: IssueReport, *, verify: bool = True,
                    chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """Files with local paths row by row (each file is checked); URL-only files column-wise."""
        plans = self._plans()
        self.has_images = any(plan.path is not None for _, plan in plans)
        label_ids = self._text_label_ids(plans)
        for path, plan in plans:
            if plan.path is None:
                yield from self._url_tables(path, plan, label_ids, report, chunk_rows)
            else:
                yield from chunked_tables(self._scan_file(path, plan, label_ids, report, verify), chunk_rows)

    def _url_tables(self, path: Path, plan: ColumnPlan, label_ids: dict[str, int], report: IssueReport,
                    chunk_rows: int) -> Iterator[pa.Table]:
        start = 0
        batch_rows = min(int(self.options.get("batch_rows") or DEFAULT_BATCH_ROWS), chunk_rows)
        with closing(open_parquet(path)) as pf:
            for batch in iter_batches(pf, plan.columns(), path, batch_rows):
                yield url_table(batch, plan, label_ids, report, path.stem, start)
                start += batch.num_rows

    def _scan_file(self, path: Path, plan: ColumnPlan, label_ids: dict[str, int], report: IssueReport,
                   verify: bool) -> Iterator[dict[str, Any]]:
        row_no = 0
        batch_rows = int(self.options.get("batch_rows") or DEFAULT_BATCH_ROWS)
        with closing(open_parquet(path)) as pf:
            for batch in iter_batches(pf, plan.columns(), path, batch_rows):
                cols = batch_columns(batch)
                for i in range(batch.num_rows):
                    values = {name: col[i] for name, col in cols.items()}
                    row = self._row(values, f"{path.stem}:{row_no}", plan, label_ids, report, verify)
                    row_no += 1
                    if row is not None:
                        yield row

    def _row(self, values: dict[str, Any], where: str, plan: ColumnPlan, label_ids: dict[str, int],
             report: IssueReport, verify: bool) -> dict[str, Any] | None:
        sid = values[plan.id] if plan.id else where
        if sid is None:
            report.skip("missing_value", f"{where}: {plan.id} is null")
            return None
        image = self._image(values, plan, where, report, verify)
        if image is None:
            return None
        locator, probe = image
        label = self._label(values, plan, label_ids, where, report)
        if label is False:
            return None
        caption = decode_caption(values[plan.caption], report, where) if plan.caption else None
        extras = {name: values[col] for col, name in plan.extras.items()}
        if plan.url:
            extras["url"] = values[plan.url]
        if plan.label_is_text:
            extras["class_name"] = values[plan.label] if plan.label else None
        for key, value in probe.items():
            extras.setdefault(key, value)
        return index_row(sid, locator, caption=caption, label=label, **extras)

    def _image(self, values: dict[str, Any], plan: ColumnPlan, where: str, report: IssueReport,
               verify: bool) -> tuple[str, dict[str, Any]] | None:
        """(locator, probed width/height) of a row, or None with the skip counted."""
        if plan.path is None:
            url = values[plan.url] if plan.url else None
            if not url:
                report.skip("missing_value", f"{where}: {plan.url} is null")
                return None
            return str(url), {}
        raw = values[plan.path]
        if not raw:
            report.skip("missing_value", f"{where}: {plan.path} is null")
            return None
        if is_url(raw):
            return str(raw), {}
        rel = self._relative(str(raw))
        if rel is None:
            report.skip("path_outside_root", f"{where}: {raw}")
            return None
        probe = self.probe_file(self.base, rel, report, verify=verify)
        return None if probe is None else (rel, probe)

    def _relative(self, raw: str) -> str | None:
        """A table path made relative to :attr:`base`; None when it points outside it."""
        p = PurePosixPath(raw)
        if p.is_absolute():
            try:
                p = PurePosixPath(Path(raw).resolve().relative_to(self.base).as_posix())
            except ValueError:
                return None
        if ".." in p.parts or not p.parts:
            return None
        return p.as_posix()

    @staticmethod
    def _label(values: dict[str, Any], plan: ColumnPlan, label_ids: dict[str, int], where: str,
               report: IssueReport) -> int | None | bool:
        """The integer label, None when unlabelled, False when invalid (skip counted)."""
        if plan.label is None or values[plan.label] is None:
            return None
        value = values[plan.label]
        if plan.label_is_text:
            return label_ids[str(value)]
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = -1.0
        if isinstance(value, bool) or not number.is_integer() or number < 0:
            report.skip("bad_label", f"{where}: {value!r}")
            return False
        return int(number)

    def _text_label_ids(self, plans: list[tuple[Path, ColumnPlan]]) -> dict[str, int]:
        """Text labels -> sorted class index, read in a first pass over the label column only."""
        names: set[str] = set()
        for path, plan in plans:
            if plan.label and plan.label_is_text:
                with closing(open_parquet(path)) as pf:
                    for batch in iter_batches(pf, [plan.label], path):
                        names.update(str(v) for v in batch.column(0).to_pylist() if v is not None)
        if self.options.get("classes_file"):
            order = read_class_list(Path(self.options["classes_file"]))
            unknown = sorted(names - set(order))
            if unknown:
                raise DataError(f"label {unknown[0]!r} is not in classes_file {self.options['classes_file']}")
            self._classes, self._classes_known = order, True
            return {name: i for i, name in enumerate(order)}
        self._classes = sorted(names) if names else None
        self._classes_known = True
        return {name: i for i, name in enumerate(self._classes or [])}

    def classes(self) -> list[str] | None:
        """Class names: the classes_file's when given, else sorted text labels; None for bare integers."""
        if self.options.get("classes_file") and not self._classes_known:
            self._classes, self._classes_known = read_class_list(Path(self.options["classes_file"])), True
        if not self._classes_known and self.root.exists():
            self._text_label_ids(self._plans())
        return self._classes

    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        locator = row.get("locator")
        if not locator:
            raise SampleError("missing_image", str(row.get("id")))
        if is_url(locator):
            raise SampleError("remote_image", str(locator))
        return read_local_file(self.base, str(locator), max_bytes=self.max_bytes)
