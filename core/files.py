"""Reading the files prunescope wrote, with one clear error when one of them is missing or damaged.

Every file under the workspace is written atomically (:mod:`core.atomic`), so a damaged one was changed
by something else: a disk error, a copy cut short, a hand edit. Readers here turn the many ways a read
can fail (``FileNotFoundError``, a truncated ``.npy``, Parquet without its footer, JSON that is not JSON or
not UTF-8) into :class:`~core.errors.MissingFileError` / :class:`~core.errors.DataError` naming the file
and what to do, which the CLI prints as one line and the dashboard shows with ``st.error``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import DataError, MissingFileError

PathLike = str | os.PathLike[str]
#: What a damaged file raises while being read (JSONDecodeError, UnicodeDecodeError, numpy's and
#: Arrow's "not fully written" are ValueErrors; ArrowInvalid is both).
_DAMAGE = (OSError, ValueError, EOFError, pa.ArrowException)


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


@contextlib.contextmanager
def reading(path: PathLike, what: str, *, hint: str | None = None) -> Iterator[None]:
    """Run a read of ``path`` (``what`` names it for the user: "the assignments of clustering 'x'")
    turning missing and damaged files into MissingFileError / DataError; other errors pass through."""
    rebuild = hint or "it was changed after prunescope wrote it; re-run the stage that makes it"
    try:
        yield
    except FileNotFoundError:
        raise MissingFileError(f"{what} is missing: {path}", hint=rebuild) from None
    except IsADirectoryError:
        raise DataError(f"{what} is a folder, not a file: {path}", hint=rebuild) from None
    except _DAMAGE as exc:
        raise DataError(f"{what} cannot be read ({_short(exc)}): {path}", hint=rebuild) from None


def read_json(path: PathLike, what: str, *, hint: str | None = None) -> Any:
    """The parsed JSON document at ``path`` (UTF-8)."""
    with reading(path, what, hint=hint):
        return json.loads(Path(path).read_text(encoding="utf-8"))


def read_table(path: PathLike, what: str, *, columns: Sequence[str] | None = None,
               hint: str | None = None) -> pa.Table:
    """The Parquet file at ``path`` (only ``columns`` when given)."""
    with reading(path, what, hint=hint):
        return pq.read_table(path, columns=list(columns) if columns is not None else None)


def read_frame(path: PathLike, what: str, *, columns: Sequence[str] | None = None,
               hint: str | None = None) -> pd.DataFrame:
    """The Parquet file at ``path`` as a DataFrame."""
    with reading(path, what, hint=hint):
        return pd.read_parquet(path, columns=list(columns) if columns is not None else None)


def load_npy(path: PathLike, what: str, *, mmap_mode: str | None = None, hint: str | None = None) -> np.ndarray:
    """The ``.npy`` array at ``path`` (never pickles); ``mmap_mode="r"`` maps it instead of reading it."""
    with reading(path, what, hint=hint):
        array: np.ndarray = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)  # type: ignore[arg-type]
        return array
