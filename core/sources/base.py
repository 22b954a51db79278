"""The contract every data source follows.

A source turns files users bring (an image folder, a parquet of paths/urls + captions, webdataset
tars, LAION embedding releases, an ImageNet-C tree) into rows of a *dataset index*: one row per
readable sample, with the columns of :data:`INDEX_COLUMNS` plus any extra columns the source has
(ground truth, urls, corruption/severity ...). Registration (``core.datasets``) scans a source once,
writes the index parquet into the workspace and records counts and an :class:`IssueReport` in the
catalog; later stages stream samples back through :meth:`Source.load_image`.

Bad input never raises out of a scan: a broken entry becomes a counted skip with a reason
(:data:`SKIP_REASONS`); a repairable defect (a caption that is not UTF-8) is counted as repaired.
Only whole-dataset problems (missing root, missing columns, nothing readable) raise DataError.

A source implements :meth:`Source.scan` (rows as dicts) and :meth:`Source.read_bytes`; registration
consumes :meth:`Source.scan_tables`, which chunks the rows into Arrow tables unless a columnar source
builds them directly. Locators are relative to the source's root and are resolved with
:func:`core.workspace.safe_join`, so ``..`` parts and symlinks leading out raise PathOutsideWorkspace.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, overload

import pyarrow as pa
from PIL import Image

from core.errors import PathOutsideWorkspace
from core.registry import ParamSpec, Registry
from core.workspace import safe_join

#: Columns every index has (``offset``/``size`` locate a member inside a tar; null otherwise).
INDEX_COLUMNS = ("id", "locator", "offset", "size", "caption", "label")
#: Their Arrow types in the index parquet.
INDEX_TYPES: dict[str, pa.DataType] = {
    "id": pa.string(), "locator": pa.string(), "offset": pa.int64(), "size": pa.int64(),
    "caption": pa.string(), "label": pa.int32(),
}
#: Index rows per Arrow table handed to registration (bounds the memory a scan holds).
CHUNK_ROWS = 65_536

#: Why an entry was skipped (action "skipped") or repaired (action "repaired").
SKIP_REASONS = {
    "corrupt_image": "the image bytes do not decode",
    "truncated_image": "the image file ends early",
    "decompression_bomb": "the image header claims more pixels than max_pixels",
    "image_too_small": "an image side is below min_side",
    "unsupported_image": "not an image format PIL reads",
    "missing_file": "a listed file does not exist",
    "broken_tar_member": "a tar member cannot be read (truncated or corrupt archive)",
    "missing_image": "the sample has no image (no image member in its webdataset group, no path, no url)",
    "duplicate_id": "the id was already seen; the later entry is skipped",
    "missing_value": "a required column is null in this row",
    "caption_not_utf8": "caption bytes were not UTF-8; decoded with replacement characters",
    "bad_embedding": "an embedding row is NaN, infinite or all zeros",
    "unreadable_file": "a file could not be read (permissions or I/O error)",
    "bad_label": "the label is not a known class (or not an integer >= 0)",
    "bad_metadata": "sample metadata (json) does not parse",
    "remote_image": "the image is only a URL; download it first, e.g. with img2dataset",
    "path_outside_root": "the path leaves the dataset root (a '..' part, an absolute path, or a symlink out)",
    "file_too_large": "a file or tar member is larger than max_bytes",
}

#: Default decompression-bomb limit (pixels); PIL's own default is 89,478,485.
DEFAULT_MAX_PIXELS = 64_000_000
#: Default limit on the bytes of one image file or tar member (read whole into memory).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
#: Leading bytes of the formats PIL reads that users bring (JPEG, PNG, GIF, BMP, TIFF); WebP is RIFF....WEBP.
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

SOURCES: Registry[type[Source]] = Registry("data source")


class SampleError(Exception):
    """One sample cannot be used; ``reason`` is a key of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class IssueReport:
    """Counts of skipped and repaired entries by reason, with one example each (capped text)."""

    skipped: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)

    def skip(self, reason: str, example: str = "") -> None:
        self._count("skipped", reason, example)

    def repair(self, reason: str, example: str = "") -> None:
        self._count("repaired", reason, example)

    def _count(self, action: str, reason: str, example: str) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        getattr(self, action)[reason] += 1
        self.examples.setdefault((reason, action), str(example)[:300])

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def rows(self, dataset: str) -> list[dict[str, Any]]:
        """Rows for the catalog's ``dataset_issues`` table."""
        out = []
        for action, counter in (("skipped", self.skipped), ("repaired", self.repaired)):
            for reason, count in sorted(counter.items()):
                out.append({"dataset": dataset, "reason": reason, "action": action, "count": count,
                            "example": self.examples.get((reason, action), "")})
        return out

    def summary(self) -> str:
        """One line, e.g. ``skipped 3 (corrupt_image 2, missing_file 1); repaired 1 (caption_not_utf8 1)``."""
        parts = []
        for action, counter in (("skipped", self.skipped), ("repaired", self.repaired)):
            if counter:
                detail = ", ".join(f"{r} {n}" for r, n in sorted(counter.items()))
                parts.append(f"{action} {sum(counter.values())} ({detail})")
        return "; ".join(parts) or "no problems found"


def decode_caption(raw: bytes | str | Any, report: IssueReport | None = None, where: str = "") -> str | None:
    """Caption text; non-UTF-8 bytes are decoded with U+FFFD and counted as repaired."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    if not isinstance(raw, bytes | bytearray | memoryview):
        return str(raw)  # a number or date in a caption column
    raw = bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if report is not None:
            report.repair("caption_not_utf8", where)
        return raw.decode("utf-8", errors="replace")


@overload
def open_image_bytes(data: bytes, *, max_pixels: int = ..., min_side: int = ...,
                     verify_only: Literal[False] = ...) -> Image.Image: ...
@overload
def open_image_bytes(data: bytes, *, max_pixels: int = ..., min_side: int = ...,
                     verify_only: Literal[True]) -> tuple[int, int]: ...
def open_image_bytes(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
                     verify_only: bool = False) -> Image.Image | tuple[int, int]:
    """Decode image bytes to RGB, or check them when ``verify_only`` (returns (width, height)).

    The pixel count is checked from the header before any decoding, so a decompression bomb costs
    nothing. Raises SampleError with reason corrupt_image, truncated_image, decompression_bomb,
    image_too_small or unsupported_image.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
            if min(width, height) < min_side:
                raise SampleError("image_too_small", f"{width}x{height}")
            if verify_only:
                img.verify()
                # verify() misses truncation for some formats; loading a thumbnail-sized draft is cheap.
                img = Image.open(io.BytesIO(data))
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                img.load()
                return width, height
            img.load()
            return img.convert("RGB")
    except SampleError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise SampleError("decompression_bomb", str(exc)[:200]) from None
    except Image.UnidentifiedImageError:
        if not data:
            raise SampleError("truncated_image", "0 bytes") from None
        if data.startswith(IMAGE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise SampleError("corrupt_image", "an image format's signature, but the header does not parse") from None
        raise SampleError("unsupported_image", f"unknown signature {data[:8]!r}") from None
    except OSError as exc:
        msg = str(exc)
        reason = "truncated_image" if "truncat" in msg.lower() else "corrupt_image"
        raise SampleError(reason, msg[:200]) from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise SampleError("corrupt_image", str(exc)[:200]) from None


class Source(ABC):
    """One kind of on-disk data. Subclasses register with ``@SOURCES.register(kind, params=...)``.

    Args:
        root: the folder or file the user named (made absolute by the caller).
        options: reader options, already validated against the registry entry's ParamSpecs.
    """

    kind: ClassVar[str]
    #: Whether samples carry images that :meth:`load_image` can open. A class states what its kind
    #: can hold; a scan may set it False on the instance (a URL-only parquet, LAION embeddings
    #: without local images), and registration stores the scanned value for :class:`Dataset`.
    has_images: bool = True

    def __init__(self, root: Path, **options: Any) -> None:
        self.root = Path(root)
        self.options = options

    @abstractmethod
    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Yield one index row per readable sample (INDEX_COLUMNS + extras), counting skips in report.

        ``verify`` decodes (cheaply) every image to find corrupt ones; without it only existence
        (and size) is checked. Rows are yielded as they are read: a source never holds a whole
        dataset's images. Raises DataError for problems of the whole dataset.
        """

    def scan_tables(self, report: IssueReport, *, verify: bool = True,
                    chunk_rows: int = CHUNK_ROWS) -> Iterator[pa.Table]:
        """The scan as Arrow tables of up to ``chunk_rows`` rows (what registration consumes).

        The default chunks :meth:`scan`'s rows; a columnar source (LAION metadata) overrides it to
        build whole batches without a Python dict per row. Columns: INDEX_COLUMNS typed as
        :data:`INDEX_TYPES`, then the extras.
        """
        rows: list[dict[str, Any]] = []
        for row in self.scan(report, verify=verify):
            rows.append(row)
            if len(rows) >= chunk_rows:
                yield rows_to_table(rows)
                rows = []
        if rows:
            yield rows_to_table(rows)

    @abstractmethod
    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        """The raw image bytes of one index row; raises SampleError (PathOutsideWorkspace for escapes)."""

    def load_image(self, row: Mapping[str, Any]) -> Image.Image:
        """The RGB image of one index row; raises SampleError (reason says why)."""
        return open_image_bytes(self.read_bytes(row), max_pixels=self.options.get("max_pixels") or DEFAULT_MAX_PIXELS)

    def classes(self) -> list[str] | None:
        """Class names by label index, for labelled sources; None otherwise."""
        return None

    # -- helpers for sources that read local image files -------------------------------------------
    def probe_file(self, base: Path, rel: str, report: IssueReport, *, verify: bool) -> dict[str, Any] | None:
        """Check the image file ``base/rel`` as a scan does; None (skip counted) when unusable.

        Returns: ``{"width": w, "height": h}`` in pixels (None values without ``verify``).
        """
        try:
            data = read_local_file(base, rel, max_bytes=self.max_bytes, header_only=not verify)
        except SampleError as exc:
            report.skip(exc.reason, exc.detail or rel)
            return None
        except PathOutsideWorkspace:
            report.skip("path_outside_root", rel)
            return None
        if not verify:
            return {"width": None, "height": None}
        try:
            width, height = self.check_image(data)
        except SampleError as exc:
            report.skip(exc.reason, f"{rel}: {exc.detail}")
            return None
        return {"width": width, "height": height}

    def check_image(self, data: bytes) -> tuple[int, int]:
        """(width, height) of image bytes after a cheap decode; raises SampleError."""
        return open_image_bytes(data, max_pixels=self.options.get("max_pixels") or DEFAULT_MAX_PIXELS,
                                min_side=self.options.get("min_side") or 1, verify_only=True)

    @property
    def max_bytes(self) -> int:
        return int(self.options.get("max_bytes") or DEFAULT_MAX_BYTES)


def index_row(sid: Any, locator: str | None, *, offset: int | None = None, size: int | None = None,
              caption: str | None = None, label: int | None = None, **extras: Any) -> dict[str, Any]:
    """One index row: :data:`INDEX_COLUMNS` (id as text) followed by the source's extra columns."""
    return {"id": str(sid), "locator": locator, "offset": offset, "size": size, "caption": caption,
            "label": label, **extras}


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Index rows as an Arrow table: INDEX_COLUMNS (typed) first, then extras in first-seen order."""
    names = dict.fromkeys(INDEX_TYPES)
    for keys in dict.fromkeys(tuple(row) for row in rows):  # distinct key layouts, in order
        names.update(dict.fromkeys(keys))
    arrays = [column_array([row.get(n) for row in rows], INDEX_TYPES.get(n)) for n in names]
    return pa.table(arrays, names=list(names))


def column_array(values: list[Any], type_: pa.DataType | None = None) -> pa.Array:
    """One column; values Arrow cannot hold in one type (1 and "a", True and 2, 2**70) become text."""
    try:
        return pa.array(values, type=type_, from_pandas=True)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):
        if type_ is not None and type_ != pa.string():
            raise
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


def read_local_file(base: Path, rel: str, *, max_bytes: int = DEFAULT_MAX_BYTES, header_only: bool = False) -> bytes:
    """The bytes of ``base/rel``; ``header_only`` checks existence and size and returns b"".

    Raises: PathOutsideWorkspace for ``..``/absolute paths and symlinks leaving ``base``;
    SampleError missing_file, file_too_large or unreadable_file.
    """
    path = safe_join(base, rel)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SampleError("file_too_large", f"{rel}: {size} bytes > {max_bytes}")
        if not path.is_file():
            raise SampleError("unreadable_file", f"{rel}: not a regular file")
        return b"" if header_only else path.read_bytes()
    except FileNotFoundError:
        raise SampleError("missing_file", rel) from None
    except OSError as exc:
        raise SampleError("unreadable_file", f"{rel}: {os.strerror(exc.errno) if exc.errno else exc}") from None


_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(locator: Any) -> bool:
    """Whether a locator is a URL (``scheme://...``) rather than a local relative path."""
    return isinstance(locator, str) and bool(_URL_RE.match(locator))


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key ordering embedded numbers by value: ``img_emb_2`` < ``img_emb_10``, ``9.tar`` < ``10.tar``."""
    return tuple(int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name))


def parse_list_option(value: Any) -> list[str] | None:
    """A comma-separated option (``"fog,snow"``) as a list of stripped items; None when unset/empty."""
    if value is None:
        return None
    items = [item.strip() for item in str(value).split(",") if item.strip()]
    return items or None


def common_params() -> tuple[ParamSpec, ...]:
    """Options every image source accepts."""
    return (
        ParamSpec("max_pixels", "int", DEFAULT_MAX_PIXELS, "decompression-bomb limit (pixels)", min=1),
        ParamSpec("min_side", "int", 1, "skip images with a side shorter than this", min=1),
        ParamSpec("max_bytes", "int", DEFAULT_MAX_BYTES, "skip image files / tar members larger than this", min=1),
    )
