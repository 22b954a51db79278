"""Atomic file writes: every writer in prunescope goes through here.

A file is written under a hidden temporary name in its destination folder, flushed and fsynced, then
renamed over the destination with :func:`os.replace` (atomic on POSIX). A reader therefore sees the
old file or the new one, never a partial one; a crash leaves at most a ``.*.tmp-*`` file, which
:func:`clean_temp_files` removes and which every reader ignores.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
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
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(dest.parent)


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
