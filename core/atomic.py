"""Atomic file writes: every writer in prunescope goes through here.

A file is written under a hidden temporary name in its destination folder, flushed and fsynced, then
renamed over the destination with :func:`os.replace` (atomic on POSIX). A reader therefore sees the
old file or the new one, never a partial one; a crash leaves at most a ``.*.tmp-*`` file, which
:func:`clean_temp_files` removes and which every reader ignores.

A write that fails because the disk is full, a quota is reached or the file passes the process's file size
limit (``ulimit -f``) deletes its temporary file and raises :class:`~core.errors.DiskFull` (one line at the
CLI, an :class:`OSError` too); the destination keeps its old content.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from core.errors import DiskFull

TMP_MARK = ".tmp-"
#: errno values of a full disk: no space left, file too large (the file size limit), quota exceeded.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
#: The same failures in the text of libraries that do not raise OSError with an errno (DuckDB, Arrow).
_ERRNO_ALTS = "|".join(str(e) for e in sorted(DISK_FULL_ERRNOS))
_DISK_FULL_TEXT = re.compile(rf"no space left on device|file too large|disk quota exceeded|\[errno (?:{_ERRNO_ALTS})\]",
                             re.IGNORECASE)


def temp_path_for(dest: Path) -> Path:
    """A unique hidden temporary name beside ``dest`` (same file system, so rename is atomic)."""
    return dest.with_name(f".{dest.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_path(path: Path) -> bool:
    return path.name.startswith(".") and TMP_MARK in path.name


@contextlib.contextmanager
def atomic_write(dest: str | os.PathLike[str], mode: str = "wb", **open_kw: Any) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on success rename it to ``dest``, on error delete it.

    Usage: ``with atomic_write(path, "w") as f: f.write(text)``.
    """
    if "w" not in mode:
        raise ValueError("atomic_write only writes (mode must contain 'w')")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        _discard(tmp, dest, exc)
        raise
    _fsync_dir(dest.parent)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path for libraries that write by path (pyarrow, np.save, tarfile, PIL).

    The caller writes the whole file to the yielded path; on success it is renamed to ``dest``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(dest)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to the temporary file for {dest}")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        _discard(tmp, dest, exc)
        raise
    _fsync_dir(dest.parent)


def _discard(tmp: Path, dest: Path, exc: BaseException) -> None:
    """Delete the temporary file of a failed write; raise DiskFull (from ``exc``) when the disk was full.

    The check runs before the delete: a library that reports a short write without an errno (torch.save's
    ``unexpected pos``) is recognised by the temporary file having reached the limit.
    """
    full = disk_full_error(exc, dest, written=tmp)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if full is not None and full is not exc:
        raise full from exc


def disk_full_error(exc: BaseException, dest: str | os.PathLike[str] | None = None, *,
                    written: Path | None = None) -> DiskFull | None:
    """A :class:`~core.errors.DiskFull` describing ``exc`` when it means the disk (or the file size limit)
    is full while writing ``dest``; None for any other error.

    Recognised: an OSError whose errno is in :data:`DISK_FULL_ERRNOS`, a library error whose text says so
    (DuckDB, Arrow), or an I/O error without either (OSError, RuntimeError) when ``written`` (the partial
    file) has reached the process's file size limit or its file system has no free block left.
    """
    if isinstance(exc, DiskFull):
        return exc
    if not isinstance(exc, Exception):
        return None  # KeyboardInterrupt, SystemExit
    code = None
    for cause in _chain(exc):  # a follow-up error may hide the first one ("transaction is aborted")
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            code = cause.errno
        elif _DISK_FULL_TEXT.search(str(cause)):
            code = _errno_in_text(str(cause))
        if code is not None:
            break
    if code is None and written is not None and isinstance(exc, OSError | RuntimeError):
        code = _limit_reached(written)  # an I/O failure without errno (torch: "unexpected pos")
    if code is None:
        return None
    where = f"could not write {dest}" if dest is not None else "a write failed"
    reason = _REASONS.get(code, os.strerror(code))
    return DiskFull(f"disk full: {where} ({reason})", errno=code,
                    hint="free some disk space or raise the file size limit (`ulimit -f`), then run the same "
                         "command again; finished work is kept")


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file too large: it would pass the file size limit",
    errno.EDQUOT: "disk quota exceeded",
}


def _chain(exc: BaseException, limit: int = 8) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling (``__cause__`` / ``__context__``)."""
    seen: set[int] = set()
    item: BaseException | None = exc
    while item is not None and id(item) not in seen and len(seen) < limit:
        seen.add(id(item))
        yield item
        item = item.__cause__ or item.__context__


def _errno_in_text(text: str) -> int:
    low = text.lower()
    if "file too large" in low or f"[errno {errno.EFBIG}]" in low:
        return errno.EFBIG
    if "quota" in low or f"[errno {errno.EDQUOT}]" in low:
        return errno.EDQUOT
    return errno.ENOSPC


def _limit_reached(path: Path) -> int | None:
    """EFBIG when ``path`` has reached the process's file size limit, ENOSPC when its file system has no
    free block; None otherwise (or when it cannot be told)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY and path.stat().st_size >= soft:
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    try:
        st = os.statvfs(path.parent)
    except (OSError, AttributeError):
        return None
    return errno.ENOSPC if st.f_blocks and st.f_bavail == 0 else None


def write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(dest, "wb") as f:
        f.write(data)


def write_text(dest: str | os.PathLike[str], text: str) -> None:
    with atomic_write(dest, "w", encoding="utf-8") as f:
        f.write(text)


def write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_npy(dest: str | os.PathLike[str], array: Any) -> None:
    """``np.save`` through a temporary file (the ``.npy`` name is kept exactly)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(dest, buf.getvalue())


def write_parquet(dest: str | os.PathLike[str], table: Any, **kw: Any) -> None:
    """Write a pandas DataFrame or pyarrow Table as parquet, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, **kw)


def clean_temp_files(folder: str | os.PathLike[str]) -> int:
    """Delete leftover temporary files of crashed writers below ``folder``; returns how many."""
    n = 0
    for path in Path(folder).rglob(f".*{TMP_MARK}*"):
        if path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                n += 1
    return n


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable; not every file system allows opening a directory.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
