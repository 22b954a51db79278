"""WebDataset tar shards (img2dataset layout: ``00000.tar`` with ``{key}.jpg``, ``{key}.txt``, ``{key}.json``).

``uri`` is a folder of ``*.tar`` shards (read in numeric order: ``9.tar`` before ``10.tar``) or one
tar. Each shard is streamed once, front to back (``tarfile`` stream mode), and members are grouped by
key (the member path up to the first dot of its base name; members of one sample are adjacent, as
webdataset requires). Per sample:

- image: the first of ``.jpg .jpeg .png .webp`` (none -> skip ``missing_image``);
- caption: ``.txt`` (non-UTF-8 repaired and counted), else a ``caption`` field of the json;
- label: ``.cls`` (an integer as text; anything else -> skip ``bad_label``);
- ``.json``: scalar fields become extra columns (lower-cased; ``src_`` prefix on a clash with an
  index column). A json that does not parse keeps the sample without those fields and is counted as
  *repaired* ``bad_metadata``: the image and caption are still good.

Index rows: ``id`` = key, ``locator`` = the tar path relative to the root folder, ``offset`` = byte
offset of the image member's data in the tar, ``size`` = its length in bytes, so
:meth:`WebDatasetSource.read_bytes` is one seek + read. Extras: ``width``, ``height`` (with verify).

A truncated or corrupt shard keeps every sample read before the break (the sample in progress too
when its image member is complete), counts one ``broken_tar_member`` and goes on with the next shard.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import DataError, MissingFileError
from core.sources.base import (
    INDEX_COLUMNS,
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    common_params,
    decode_caption,
    index_row,
    natural_key,
)
from core.workspace import safe_join

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTS = ("txt", "json", "cls")
#: Bytes of metadata members (txt/json/cls) read at most; longer ones are truncated.
MAX_TEXT_BYTES = 1 << 20
_TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class Member:
    """One tar member of a sample: where its data lies and (for small or verified ones) the data."""

    offset: int
    size: int
    data: bytes | None = None


def sample_key(name: str) -> tuple[str, str]:
    """``("dir/000001", "jpg")`` for ``dir/000001.jpg``: key up to the first dot of the base name."""
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def list_shards(root: Path) -> list[Path]:
    """``root`` when it is a file, else the visible ``*.tar`` files in it, in natural (numeric) order."""
    if not root.exists():
        raise MissingFileError(f"webdataset {root} does not exist")
    if root.is_file():
        return [root]
    shards = [p for p in root.iterdir() if p.suffix.lower() == ".tar" and p.is_file() and not p.name.startswith(".")]
    if not shards:
        raise DataError(f"no .tar shards in {root}")
    return sorted(shards, key=lambda p: natural_key(p.name))


def scalar_fields(meta: Mapping[str, Any], reserved: tuple[str, ...] = INDEX_COLUMNS) -> dict[str, Any]:
    """The scalar (str, number, bool, null) fields of a json object, names lower-cased, clashes prefixed."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if value is not None and not isinstance(value, str | int | float | bool):
            continue
        name = str(key).lower()
        out[f"src_{name}" if name in reserved else name] = value
    return out


@SOURCES.register(
    "webdataset",
    summary="webdataset .tar shards ({key}.jpg/.txt/.json, img2dataset layout), streamed once",
    params=common_params(),
)
class WebDatasetSource(Source):
    kind = "webdataset"

    def __init__(self, root: Path, **options: Any) -> None:
        super().__init__(root, **options)
        self.base = self.root if self.root.is_dir() or not self.root.exists() else self.root.parent

    def scan(self, report: IssueReport, *, verify: bool = True) -> Iterator[dict[str, Any]]:
        for shard in list_shards(self.root):
            rel = shard.relative_to(self.base).as_posix()
            for key, members in self._iter_samples(shard, rel, report, verify):
                row = self._row(key, members, rel, report, verify)
                if row is not None:
                    yield row

    # -- reading one shard ---------------------------------------------------------------------------
    def _iter_samples(self, shard: Path, rel: str, report: IssueReport,
                      verify: bool) -> Iterator[tuple[str, dict[str, Member]]]:
        """(key, {ext: member}) per sample, in tar order; a break is counted and ends the shard."""
        key: str | None = None
        members: dict[str, Member] = {}
        try:
            with open(shard, "rb") as fh, tarfile.open(fileobj=fh, mode="r|") as tf:
                while (info := tf.next()) is not None:
                    tf.members.clear()  # type: ignore[attr-defined]  # stream mode keeps every header otherwise
                    if not info.isfile():
                        continue
                    name_key, ext = sample_key(info.name)
                    if name_key != key and members:
                        yield key or "", members
                        members = {}
                    key = name_key
                    members[ext] = self._read_member(tf, info, ext, verify)
                end = tf.offset
        except _TAR_ERRORS as exc:
            report.skip("broken_tar_member", f"{rel}: {str(exc)[:200] or type(exc).__name__}")
            if members and self._image_complete(members, shard):
                yield key or "", members
            return
        if members:
            yield key or "", members
        self._check_end(shard, rel, end, report)

    def _read_member(self, tf: tarfile.TarFile, info: tarfile.TarInfo, ext: str, verify: bool) -> Member:
        """Record a member's position; read its data when it is metadata, or an image to verify."""
        member = Member(info.offset_data, info.size)
        wanted = ext in TEXT_EXTS or (verify and ext in IMAGE_EXTS and info.size <= self.max_bytes)
        if wanted:
            fobj = tf.extractfile(info)
            if fobj is not None:
                limit = info.size if ext in IMAGE_EXTS else min(info.size, MAX_TEXT_BYTES)
                member.data = fobj.read(limit)
                if len(member.data) < limit:
                    raise tarfile.ReadError(f"member {info.name} ends early")
        return member

    @staticmethod
    def _image_complete(members: dict[str, Member], shard: Path) -> bool:
        """Whether the pending sample's image data lies entirely inside the (broken) file."""
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        return image is not None and image.offset + image.size <= shard.stat().st_size

    @staticmethod
    def _check_end(shard: Path, rel: str, end: int, report: IssueReport) -> None:
        """A tar ends with a zero block; a file cut short or garbage where a header belongs is counted.

        (tarfile's stream mode stops silently at a truncated or invalid header after the first.)
        """
        with open(shard, "rb") as fh:
            fh.seek(end)
            block = fh.read(512)
        if len(block) < 512 or block.count(0) != 512:
            report.skip("broken_tar_member", f"{rel}: archive ends early or is corrupt at byte {end}")

    # -- one sample -> one index row -----------------------------------------------------------------
    def _row(self, key: str, members: dict[str, Member], rel: str, report: IssueReport,
             verify: bool) -> dict[str, Any] | None:
        where = f"{rel}:{key}"
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None:
            report.skip("missing_image", where)
            return None
        dims = self._check(image, where, report, verify)
        if dims is None:
            return None
        meta = self._metadata(members.get("json"), where, report)
        caption = self._caption(members.get("txt"), meta, where, report)
        label = self._label(members.get("cls"), where, report)
        if label is False:
            return None
        for k, v in dims.items():
            meta.setdefault(k, v)
        return index_row(key, rel, offset=image.offset, size=image.size, caption=caption, label=label, **meta)

    def _check(self, image: Member, where: str, report: IssueReport, verify: bool) -> dict[str, Any] | None:
        """Width/height of the image member (None values without verify); None when skipped."""
        try:
            if image.size > self.max_bytes:
                raise SampleError("file_too_large", f"{image.size} bytes > {self.max_bytes}")
            if not verify:
                return {"width": None, "height": None}
            width, height = self.check_image(image.data or b"")
        except SampleError as exc:
            report.skip(exc.reason, f"{where}: {exc.detail}")
            return None
        return {"width": width, "height": height}

    @staticmethod
    def _metadata(member: Member | None, where: str, report: IssueReport) -> dict[str, Any]:
        if member is None or member.data is None:
            return {}
        try:
            meta = json.loads(member.data)
            if not isinstance(meta, dict):
                raise ValueError("not a json object")
        except (ValueError, RecursionError):
            report.repair("bad_metadata", where)
            return {}
        # "caption" stays under its name: _caption uses it when there is no .txt member.
        return scalar_fields(meta, reserved=tuple(c for c in INDEX_COLUMNS if c != "caption"))

    @staticmethod
    def _caption(member: Member | None, meta: dict[str, Any], where: str, report: IssueReport) -> str | None:
        json_caption = meta.pop("caption", None)
        if member is not None and member.data is not None:
            text = decode_caption(member.data, report, where)
            return text.strip() if text is not None else None
        return str(json_caption) if json_caption is not None else None

    @staticmethod
    def _label(member: Member | None, where: str, report: IssueReport) -> int | None | bool:
        """The ``.cls`` label; None when absent; False (skip counted) when it is not an integer >= 0."""
        if member is None or member.data is None:
            return None
        text = member.data.decode("utf-8", errors="replace").strip()
        if not text.isdigit():
            report.skip("bad_label", f"{where}: {text[:40]!r}")
            return False
        return int(text)

    # -- reading back --------------------------------------------------------------------------------
    def read_bytes(self, row: Mapping[str, Any]) -> bytes:
        """The image member's bytes: one seek + read at (offset, size) in the shard."""
        locator = str(row["locator"])
        path = safe_join(self.base, locator)
        try:
            offset, size = int(row["offset"]), int(row["size"])
        except (TypeError, ValueError):
            raise SampleError("missing_value", f"{row.get('id')}: offset/size missing") from None
        if size > self.max_bytes:
            raise SampleError("file_too_large", f"{locator}: {size} bytes > {self.max_bytes}")
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except FileNotFoundError:
            raise SampleError("missing_file", locator) from None
        except OSError as exc:
            raise SampleError("unreadable_file", f"{locator}: {exc.strerror or exc}") from None
        if len(data) != size:
            raise SampleError("broken_tar_member", f"{locator}: member at {offset} ends early")
        return data
