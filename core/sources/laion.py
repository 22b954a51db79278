"""LAION embedding releases and clip-retrieval output: ``img_emb/`` (+ ``text_emb/``) and ``metadata/``.

Layout (FORMATS.md)::

    root/img_emb/img_emb_<P>.npy         float16 (n, D), L2-normalised rows
    root/text_emb/text_emb_<P>.npy       optional, same rows
    root/metadata/metadata_<P>.parquet   image_path, caption, url, key, NSFW, similarity ...
                                         (LAION-5B ViT-L/14: laion2B-en-metadata/)

Partitions are matched by number (``img_emb_0002`` goes with ``metadata_2``) and read in numeric
order; row k of a partition's files is one sample. Registration validates the release as a whole
(DataError: a partition without metadata, npy rows != metadata rows, an embedding width that differs
between partitions) and skips rows whose image (or text) embedding is NaN, infinite or all zeros
(``bad_embedding``). Images are not decoded: the embeddings are the data.

Index rows: ``id`` from the metadata's key | image_path | uid | sample_id (else ``<P>:<row>``),
``locator`` = image_path when it names an existing local file (relative to the root or
``image_root``), else the url, else None; ``caption``; ``partition`` (P as an integer) and ``row``
(position in the partition); plus the other scalar metadata columns, lower-cased. ``has_images`` is
False unless some image path resolves locally.

:meth:`LaionSource.iter_embeddings` streams the vectors (memory-mapped) so they can be imported
without recomputing them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import DataError, MissingFileError, PathOutsideWorkspace
from core.registry import ParamSpec
from core.sources.base import (
    CHUNK_ROWS,
    IMAGE_EXTENSIONS,
    INDEX_COLUMNS,
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    is_url,
    read_local_file,
)
from core.sources.parquet import (
    CAPTION_NAMES,
    URL_NAMES,
    as_strings,
    caption_strings,
    extra_columns,
    find_column,
    id_strings,
    iter_batches,
    open_parquet,
    plain,
)
from core.workspace import safe_join

META_DIRS = ("metadata", "laion2B-en-metadata")
LAION_ID_NAMES = ("key", "image_path", "uid", "sample_id")
DEFAULT_BATCH_ROWS = 65_536
#: (RE2 syntax, for Arrow) an image file extension at the end, and a URL scheme at the start.
_IMAGE_SUFFIX_RE = r"(?i)(" + "|".join(e.replace(".", "\\.") for e in IMAGE_EXTENSIONS) + ")$"
_URL_PREFIX_RE = r"^[a-zA-Z][a-zA-Z0-9+.-]*://"
_FILE_RE = {
    "img": re.compile(r"^img_emb_(\d+)\.npy$"),
    "text": re.compile(r"^text_emb_(\d+)\.npy$"),
    "metadata": re.compile(r"^metadata_(\d+)\.parquet$"),
}


@dataclass(frozen=True)
class Partition:
    """The files of one partition ``number``; ``rows`` is their common row count."""

    number: int
    img: Path
    text: Path | None
    metadata: Path
    rows: int


def valid_rows(x: np.ndarray) -> np.ndarray:
    """(n,) bool: rows of ``x`` (n, D) that are finite and not all zeros."""
    return np.isfinite(x).all(axis=1) & (x != 0).any(axis=1)


def load_npy(path: Path) -> np.ndarray:
    """Memory-map a 2-D float ``.npy`` (nothing is read); DataError naming the file otherwise."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{path.name} is not a readable .npy file: {str(exc).splitlines()[0][:200]}") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path.name} must hold a 2-D float array (rows, width); it holds {arr.dtype} {arr.shape}")
    return arr


def numbered_files(folder: Path, kind: str) -> dict[int, Path]:
    """Partition number -> file of ``kind`` (img, text, metadata) in ``folder``; two files for one number is an error."""
    out: dict[int, Path] = {}
    for path in folder.iterdir():
        m = _FILE_RE[kind].match(path.name)
        if not m:
            continue
        number = int(m.group(1))
        if number in out:
            raise DataError(f"partition {number} has two files: {out[number].name} and {path.name}")
        out[number] = path
    return out


def check_widths(arrays: Mapping[Path, np.ndarray]) -> int:
    """The embedding width shared by every array; DataError naming the odd one out."""
    widths = Counter(int(a.shape[1]) for a in arrays.values())
    if not widths:
        return 0
    common = widths.most_common(1)[0][0]
    for path, arr in arrays.items():
        if arr.shape[1] != common:
            raise DataError(f"wrong embedding width: {path.name} has {arr.shape[1]} columns, the others {common}")
    return common


@dataclass
class MetadataPlan:
    """Which metadata column plays which part (actual names), and the extras: column -> index name."""

    id: str | None
    caption: str | None
    url: str | None
    path: str | None
    extras: dict[str, str] = field(default_factory=dict)


@SOURCES.register(
    "laion",
    summary="LAION / clip-retrieval embedding release: img_emb/*.npy (+ text_emb/) + metadata/*.parquet",
    params=(
        ParamSpec("id_col", "str", None, "metadata id column (default: key, image_path, uid, sample_id; else <P>:<row>)"),
        ParamSpec("caption_col", "str", None, "metadata caption column (default: caption, text, txt)"),
        ParamSpec("image_root", "path", None, "folder local image_path values are relative to (default: the root)"),
        ParamSpec("batch_rows", "int", DEFAULT_BATCH_ROWS, "rows read per batch", min=1),
    ),
)
class LaionSource(Source):
    kind = "laion"
    has_images = False

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        image_root = options.get("image_root")
        self.image_base = Path(image_root).expanduser().resolve() if image_root else self.root
        self._parts: list[Partition] | None = None
        self._dims: dict[str, int] = {}

    # -- layout and validation -----------------------------------------------------------------------
    def _folder(self, names: tuple[str, ...], required: bool) -> Path | None:
        for name in names:
            if (self.root / name).is_dir():
                return self.root / name
        if required:
            there = sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []
            raise DataError(f"{self.root} has no {' or '.join(n + '/' for n in names)} folder; "
                            f"it holds: {', '.join(there) or 'nothing'}")
        return None

    def partitions(self) -> list[Partition]:
        """Every partition, validated (row counts, widths), in numeric order."""
        if self._parts is None:
            if not self.root.is_dir():
                raise MissingFileError(f"laion release folder {self.root} does not exist or is not a folder")
            self._parts = self._validate(self._match())
        return self._parts

    def _match(self) -> list[tuple[int, Path, Path | None, Path]]:
        img_dir = self._folder(("img_emb",), required=True)
        meta_dir = self._folder(META_DIRS, required=True)
        text_dir = self._folder(("text_emb",), required=False)
        assert img_dir is not None and meta_dir is not None
        img, meta = numbered_files(img_dir, "img"), numbered_files(meta_dir, "metadata")
        text = numbered_files(text_dir, "text") if text_dir else {}
        if not img:
            raise DataError(f"no img_emb_<N>.npy files in {img_dir}")
        for number in sorted(set(img) ^ set(meta)):
            have = img.get(number) or meta.get(number)
            assert have is not None
            raise DataError(f"partition {number}: {have.name} has no matching "
                            f"{'metadata parquet' if number in img else 'img_emb npy'}")
        if text_dir and set(text) != set(img):
            number = min(set(text) ^ set(img))
            raise DataError(f"partition {number}: img_emb and text_emb partitions differ (text_emb/ must match img_emb/)")
        return [(n, img[n], text.get(n), meta[n]) for n in sorted(img)]

    def _validate(self, matched: list[tuple[int, Path, Path | None, Path]]) -> list[Partition]:
        img_arrays: dict[Path, np.ndarray] = {}
        text_arrays: dict[Path, np.ndarray] = {}
        parts = []
        for number, img, text, meta in matched:
            with closing(open_parquet(meta)) as pf:
                n_meta = pf.metadata.num_rows
            for path, store in ((img, img_arrays), (text, text_arrays)):
                if path is None:
                    continue
                store[path] = load_npy(path)
                if store[path].shape[0] != n_meta:
                    raise DataError(f"partition {number}: {path.name} has {store[path].shape[0]} rows, "
                                    f"{meta.name} has {n_meta}")
            parts.append(Partition(number, img, text, meta, n_meta))
        self._dims = {"img": check_widths(img_arrays)}
        if text_arrays:
            self._dims["text"] = check_widths(text_arrays)
        return parts

    @property
    def dim(self) -> int:
        """Width of the image embeddings (512 ViT-B/32, 768 ViT-L/14, 1024 ViT-H/14)."""
        return self.embedding_dim("img")

    def embedding_dim(self, which: str = "img") -> int:
        """Width of the ``img`` or ``text`` embeddings; DataError when the release has no such folder."""
        self.partitions()
        if which not in self._dims:
            raise DataError(f"{self.root} has no {which}_emb/ embeddings")
        return self._dims[which]

    def _id_col(self, names: list[str], file: str) -> str | None:
        return find_column(names, LAION_ID_NAMES, self.options.get("id_col"), what="id", file=file)

    # -- scan ----------------------------------------------------------------------------------------
    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Index rows of every partition; ``verify`` is unused (every embedding row is checked)."""
        for table in self.scan_tables(report, verify=verify):
            yield from table.to_pylist()

    def scan_tables(self, report: IssueReport, *, verify: bool = True,
                    chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """The index built column-wise, one metadata record batch at a time (no dict per row)."""
        self.has_images = False
        batch_rows = min(int(self.options.get("batch_rows") or DEFAULT_BATCH_ROWS), chunk_rows)
        for part in self.partitions():
            with closing(open_parquet(part.metadata)) as pf:
                plan = self._plan(pf.schema_arrow, part.metadata.name)
                for start, batch, good in self._batches(part, pf, batch_rows):
                    yield self._table(part, plan, start, batch, good, report)

    def _plan(self, schema: pa.Schema, file: str) -> MetadataPlan:
        names = schema.names
        plan = MetadataPlan(
            id=self._id_col(names, file),
            caption=find_column(names, CAPTION_NAMES, self.options.get("caption_col"), what="caption", file=file),
            url=find_column(names, URL_NAMES),
            path=find_column(names, ("image_path",)),
        )
        plan.extras.update(extra_columns(schema, [plan.id, plan.caption, plan.url],
                                         reserved=(*INDEX_COLUMNS, "partition", "row", "url")))
        return plan

    def _batches(self, part: Partition, pf: Any, batch_rows: int) -> Iterator[tuple[int, pa.RecordBatch, np.ndarray]]:
        """(first row, metadata batch, (n,) valid-embedding mask) aligned over the partition."""
        img = load_npy(part.img)
        text = load_npy(part.text) if part.text else None
        start = 0
        for batch in iter_batches(pf, pf.schema_arrow.names, part.metadata, batch_rows):
            stop = start + batch.num_rows
            good = valid_rows(np.asarray(img[start:stop], dtype=np.float32))
            if text is not None:
                good &= valid_rows(np.asarray(text[start:stop], dtype=np.float32))
            yield start, batch, good
            start = stop

    def _table(self, part: Partition, plan: MetadataPlan, start: int, batch: pa.RecordBatch, good: np.ndarray,
               report: IssueReport) -> pa.Table:
        """One batch's index rows (INDEX_COLUMNS, partition, row, extras, url), bad embeddings dropped."""
        n = batch.num_rows
        rows = np.arange(start, start + n, dtype=np.int64)
        ids = id_strings(batch.column(plan.id) if plan.id else None, str(part.number), rows)
        cols: dict[str, pa.Array] = {
            "id": ids,
            "locator": self._locators(batch, plan),
            "offset": pa.nulls(n, pa.int64()),
            "size": pa.nulls(n, pa.int64()),
            "caption": caption_strings(batch.column(plan.caption), ids, report) if plan.caption
            else pa.nulls(n, pa.string()),
            "label": pa.nulls(n, pa.int32()),
            "partition": pa.array(np.full(n, part.number, dtype=np.int64)),
            "row": pa.array(rows),
        }
        cols.update({name: plain(batch.column(col)) for col, name in plan.extras.items()})
        if plan.url:
            cols["url"] = plain(batch.column(plan.url))
        table = pa.table(cols)
        bad = np.flatnonzero(~good)
        for i in bad:
            report.skip("bad_embedding", f"partition {part.number} row {start + int(i)}")
        return table.filter(pa.array(good)) if len(bad) else table

    def _locators(self, batch: pa.RecordBatch, plan: MetadataPlan) -> pa.Array:
        """image_path where it names an existing local image file, else url, else null."""
        n = batch.num_rows
        urls = as_strings(batch.column(plan.url)) if plan.url else pa.nulls(n, pa.string())
        if plan.path is None:
            return urls
        paths = as_strings(batch.column(plan.path))
        # Only paths ending in an image extension can be local files (LAION's are webdataset keys).
        maybe = pc.and_(pc.match_substring_regex(paths, _IMAGE_SUFFIX_RE),
                        pc.invert(pc.match_substring_regex(paths, _URL_PREFIX_RE)))
        maybe = pc.fill_null(maybe, False)
        candidates = np.flatnonzero(maybe.to_numpy(zero_copy_only=False))
        if not len(candidates):
            return urls
        out = urls.to_pylist()
        for i in candidates:
            local = self._local_path(paths[int(i)].as_py())
            if local is not None:
                out[int(i)] = local
        return pa.array(out, pa.string())

    def _local_path(self, image_path: str) -> str | None:
        """``image_path`` relative to the image root when it is an existing file there, else None."""
        rel = image_path
        if PurePosixPath(image_path).is_absolute():
            try:
                rel = Path(image_path).resolve().relative_to(self.image_base).as_posix()
            except ValueError:
                return None
        try:
            if safe_join(self.image_base, rel).is_file():
                self.has_images = True
                return rel
        except PathOutsideWorkspace:
            pass
        return None

    # -- reading -------------------------------------------------------------------------------------
    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        locator = row.get("locator")
        if not locator:
            raise SampleError("missing_image", f"{row.get('id')}: the release has only embeddings for it")
        if is_url(locator):
            raise SampleError("remote_image", str(locator))
        return read_local_file(self.image_base, str(locator))

    def iter_embeddings(self, batch_rows: int = 65_536, which: str = "img", *,
                        valid_only: bool = True) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        """Stream embeddings from the memory-mapped npy files, partition by partition.

        Yields:
            ``(meta, vectors)``: ``meta`` a DataFrame with columns ``id`` (as in the index),
            ``partition`` and ``row``; ``vectors`` float32 (len(meta), D), rows as stored (already
            L2-normalised in releases). With ``valid_only`` rows that are NaN/inf/all-zero in *this*
            array are left out. Join on (partition, row) against the index to drop what
            registration skipped (bad embeddings of the other modality, duplicate ids).
        """
        if which not in ("img", "text"):
            raise ValueError(f"which must be 'img' or 'text'; got {which!r}")
        self.embedding_dim(which)
        for part in self.partitions():
            yield from self._embedding_batches(part, batch_rows, which, valid_only)

    def _embedding_batches(self, part: Partition, batch_rows: int, which: str,
                           valid_only: bool) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
        path = part.img if which == "img" else part.text
        assert path is not None  # embedding_dim(which) checked the folder exists
        arr = load_npy(path)
        for start, ids in self._id_chunks(part, batch_rows):
            rows = np.arange(start, start + len(ids), dtype=np.int64)
            vectors = np.asarray(arr[start:start + len(ids)], dtype=np.float32)
            meta = pd.DataFrame({"id": ids.to_pylist(), "partition": part.number, "row": rows})
            if valid_only:
                keep = valid_rows(vectors)
                meta, vectors = meta[keep].reset_index(drop=True), vectors[keep]
            yield meta, vectors

    def _id_chunks(self, part: Partition, batch_rows: int) -> Iterator[tuple[int, pa.Array]]:
        """(first row, ids exactly as the index has them); batch sizes follow the parquet's row groups."""
        with closing(open_parquet(part.metadata)) as pf:
            id_col = self._id_col(pf.schema_arrow.names, part.metadata.name)
            if id_col is None:
                for start in range(0, part.rows, batch_rows):
                    rows = np.arange(start, min(start + batch_rows, part.rows), dtype=np.int64)
                    yield start, id_strings(None, str(part.number), rows)
                return
            start = 0
            for batch in iter_batches(pf, [id_col], part.metadata, batch_rows):
                rows = np.arange(start, start + batch.num_rows, dtype=np.int64)
                yield start, id_strings(batch.column(0), str(part.number), rows)
                start += batch.num_rows
