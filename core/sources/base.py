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
"""

from __future__ import annotations

import io
import warnings
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from core.registry import ParamSpec, Registry

#: Columns every index has (``offset``/``size`` locate a member inside a tar; null otherwise).
INDEX_COLUMNS = ("id", "locator", "offset", "size", "caption", "label")

#: Why an entry was skipped (action "skipped") or repaired (action "repaired").
SKIP_REASONS = {
    "corrupt_image": "the image bytes do not decode",
    "truncated_image": "the image file ends early",
    "decompression_bomb": "the image header claims more pixels than max_pixels",
    "image_too_small": "an image side is below min_side",
    "unsupported_image": "not an image format PIL reads",
    "missing_file": "a listed file does not exist",
    "broken_tar_member": "a tar member cannot be read (truncated or corrupt archive)",
    "missing_image": "a webdataset sample has no image member",
    "duplicate_id": "the id was already seen; the later entry is skipped",
    "missing_value": "a required column is null in this row",
    "caption_not_utf8": "caption bytes were not UTF-8; decoded with replacement characters",
    "bad_embedding": "an embedding row is NaN, infinite or all zeros",
    "unreadable_file": "a file could not be read (permissions or I/O error)",
    "bad_label": "the label is not a known class",
    "bad_metadata": "sample metadata (json) does not parse",
}

#: Default decompression-bomb limit (pixels); PIL's own default is 89,478,485.
DEFAULT_MAX_PIXELS = 64_000_000
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


def decode_caption(raw: bytes | str | None, report: IssueReport | None = None, where: str = "") -> str | None:
    """Caption text; non-UTF-8 bytes are decoded with U+FFFD and counted as repaired."""
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        if report is not None:
            report.repair("caption_not_utf8", where)
        return raw.decode("utf-8", errors="replace")


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
    except Image.UnidentifiedImageError as exc:
        raise SampleError("unsupported_image", str(exc)[:200]) from None
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
    #: Whether samples carry images that :meth:`load_image` can open (False for LAION embeddings).
    has_images: ClassVar[bool] = True

    def __init__(self, root: Path, **options: Any) -> None:
        self.root = Path(root)
        self.options = options

    @abstractmethod
    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        """Yield one index row per readable sample (INDEX_COLUMNS + extras), counting skips in report.

        ``verify`` decodes (cheaply) every image to find corrupt ones; without it only existence
        and headers are checked. Raises DataError for problems of the whole dataset.
        """

    @abstractmethod
    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        """The raw image bytes of one index row; raises SampleError."""

    def load_image(self, row: Mapping[str, Any]) -> Image.Image:
        """The RGB image of one index row; raises SampleError (reason says why)."""
        return open_image_bytes(self.read_bytes(row), max_pixels=self.options.get("max_pixels", DEFAULT_MAX_PIXELS))

    def classes(self) -> list[str] | None:
        """Class names by label index, for labelled sources; None otherwise."""
        return None


def common_params() -> tuple[ParamSpec, ...]:
    """Options every image source accepts."""
    return (
        ParamSpec("max_pixels", "int", DEFAULT_MAX_PIXELS, "decompression-bomb limit (pixels)", min=1),
        ParamSpec("min_side", "int", 1, "skip images with a side shorter than this", min=1),
    )
