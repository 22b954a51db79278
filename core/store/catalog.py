"""DuckDB catalog with numbered SQL migrations and lock-tolerant, short-lived connections.

DuckDB lets one process hold the file while anyone writes (ENV.md): a second process's connect fails
with ``IOException: Could not set lock on file``. So every access here opens a connection, does its
work and closes it, and a lock error is retried with exponential backoff and jitter until
``lock_timeout`` seconds have passed (then :class:`CatalogLocked`).

Migrations are ``core/store/migrations/NNN_name.sql``; the ``schema_version`` table records each one
applied. A catalog whose version is newer than this code knows raises :class:`SchemaTooNew` and is
never touched.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from core.atomic import disk_full_error
from core.errors import CatalogError, CatalogLocked, DiskFull, SchemaTooNew

log = logging.getLogger(__name__)

_MIGRATION_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# "different configuration": in one process, DuckDB refuses a read-only connection while a read-write one
# to the same file is open (and the other way round); the writer closes its connection after each
# statement, so this clears like a lock does (Streamlit sessions are threads of one process).
_LOCK_MARKERS = ("could not set lock", "conflicting lock", "database is locked", "lock on file",
                 "different configuration")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    """The migrations shipped with the package, in version order (gaps are an error)."""
    folder = resources.files("core.store") / "migrations"
    found = []
    for item in folder.iterdir():
        m = _MIGRATION_RE.match(item.name)
        if m:
            found.append(Migration(int(m.group(1)), item.name, item.read_text(encoding="utf-8")))
    found.sort(key=lambda mig: mig.version)
    for expected, mig in enumerate(found, start=1):
        if mig.version != expected:
            raise RuntimeError(f"migration numbers must run 1..n without gaps; found {mig.name}")
    return found


SCHEMA_VERSION = len(load_migrations())


def is_lock_error(exc: BaseException) -> bool:
    return isinstance(exc, duckdb.Error) and any(s in str(exc).lower() for s in _LOCK_MARKERS)


def utcnow() -> datetime:
    """Naive UTC timestamp, the form stored in TIMESTAMP columns."""
    return datetime.now(UTC).replace(tzinfo=None)


class Catalog:
    """The workspace's ``catalog.duckdb``.

    Args:
        path: the database file.
        lock_timeout: seconds to keep retrying when another process holds the lock.
    """

    def __init__(self, path: str | Path, *, lock_timeout: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout

    # -- connections -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def connect(self, *, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection, retried with backoff while the file is locked.

        Read-write connections run inside one transaction, committed on success and rolled back on
        error, so a failed write leaves the catalog as it was; a DuckDB error that says the disk is full
        becomes :class:`~core.errors.DiskFull`.
        """
        if read_only and not self.path.exists():
            raise CatalogError(
                f"no catalog at {self.path}", hint="run `prunescope init` or `prunescope demo` first"
            )
        con = self._open(read_only)
        try:
            if read_only:
                yield con
            else:
                con.execute("BEGIN TRANSACTION")
                try:
                    yield con
                except BaseException:
                    with contextlib.suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        except duckdb.Error as exc:
            full = _disk_full(exc, self.path)
            if full is None:
                raise
            raise full from exc
        finally:
            con.close()

    def _open(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if not is_lock_error(exc):
                    full = _disk_full(exc, self.path)  # opening replays the WAL, which writes
                    raise full or CatalogError(f"cannot open catalog {self.path}: {_first_line(exc)}") from exc
                if time.monotonic() >= deadline:
                    raise CatalogLocked(
                        f"catalog {self.path} stayed locked for {self.lock_timeout:.0f} s",
                        hint="another prunescope process is writing; wait for it or stop it",
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    # -- schema ------------------------------------------------------------------------------------
    def version(self) -> int:
        """The applied schema version (0 for a new or empty file)."""
        if not self.path.exists():
            return 0
        with self.connect(read_only=True) as con:
            return _read_version(con)

    def migrate(self) -> int:
        """Apply every pending migration in one transaction; returns the resulting version."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        migrations = load_migrations()
        with self.connect() as con:
            con.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, name VARCHAR, applied_at TIMESTAMP)"
            )
            current = _read_version(con)
            if current > len(migrations):
                raise SchemaTooNew(
                    f"catalog {self.path} has schema version {current}, newer than this prunescope "
                    f"knows ({len(migrations)})",
                    hint="upgrade prunescope, or point --workspace at another folder",
                )
            for mig in migrations[current:]:
                log.info("applying catalog migration %s", mig.name)
                con.execute(mig.sql)
                con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [mig.version, mig.name, utcnow()])
            return len(migrations)

    def check_version(self) -> None:
        """Raise SchemaTooNew / CatalogError when this code cannot read the catalog."""
        current = self.version()
        if current > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"catalog {self.path} has schema version {current}, newer than this prunescope "
                f"knows ({SCHEMA_VERSION})",
                hint="upgrade prunescope, or point --workspace at another folder",
            )
        if current < SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} has schema version {current}; this prunescope needs {SCHEMA_VERSION}",
                hint="run any prunescope command that writes (e.g. `prunescope init`) to migrate it",
            )

    # -- convenience -------------------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read-only query and return a DataFrame."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def row(self, table: str, key: str, value: Any, *, what: str) -> dict[str, Any]:
        """The row of ``table`` whose ``key`` equals ``value``; UnknownName listing the existing keys.

        ``what`` names the thing in the message, e.g. ``dataset`` -> "dataset 'x' not found; registered: a, b".
        """
        from core.errors import UnknownName

        _check_identifier(table)
        _check_identifier(key)
        df = self.query(f"SELECT * FROM {table} WHERE {key} = ?", [value])
        if df.empty:
            names = self.query(f"SELECT {key} FROM {table} ORDER BY {key}")[key].tolist()
            raise UnknownName(f"{what} '{value}' not found; registered: {', '.join(map(str, names)) or 'none'}")
        return df.iloc[0].to_dict()

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one write statement in its own transaction."""
        with self.connect() as con:
            con.execute(sql, params or [])

    def insert(self, table: str, rows: Sequence[Mapping[str, Any]], *, replace_where: str | None = None,
               replace_params: Sequence[Any] | None = None) -> int:
        """Insert rows (dicts with the same keys) into ``table`` in one transaction.

        ``replace_where`` (SQL with ``?`` placeholders) deletes the rows it matches first, in the
        same transaction, so a re-registration replaces its old rows atomically.
        """
        _check_identifier(table)
        with self.connect() as con:
            if replace_where:
                con.execute(f"DELETE FROM {table} WHERE {replace_where}", list(replace_params or []))
            return insert_rows(con, table, rows)


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert rows (dicts with the same keys) on an open connection (inside the caller's transaction)."""
    _check_identifier(table)
    if not rows:
        return 0
    cols = list(rows[0])
    for col in cols:
        _check_identifier(col)
    if len(rows) >= _BULK_ROWS and _insert_arrow(con, table, cols, rows):
        return len(rows)
    placeholders = ", ".join("?" for _ in cols)
    con.executemany(f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({placeholders})",
                    [[row[c] for c in cols] for row in rows])
    return len(rows)


#: From this many rows on, :meth:`Catalog.insert` goes through one Arrow scan instead of executemany
#: (1000 cluster rows: ~1 s with executemany, ~10 ms through Arrow).
_BULK_ROWS = 200


def _insert_arrow(con: duckdb.DuckDBPyConnection, table: str, cols: list[str], rows: Sequence[Mapping[str, Any]]) -> bool:
    """Insert through an Arrow table (None stays NULL); False when the values do not convert."""
    import pyarrow as pa

    try:
        data = pa.table({c: pa.array([row[c] for row in rows]) for c in cols})
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
    con.register("_prunescope_rows", data)
    try:
        con.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(cols)} FROM _prunescope_rows")
    except BaseException:
        # The failed INSERT aborted the transaction, so unregister would fail too ("Current transaction is
        # aborted") and hide the real error (e.g. a full disk).
        with contextlib.suppress(duckdb.Error):
            con.unregister("_prunescope_rows")
        raise
    con.unregister("_prunescope_rows")
    return True


def _read_version(con: duckdb.DuckDBPyConnection) -> int:
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = con.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _check_identifier(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")


def _disk_full(exc: BaseException, path: Path) -> DiskFull | None:
    """:class:`~core.errors.DiskFull` when a DuckDB error says the disk or the file size limit is full; the
    transaction was rolled back, so the catalog keeps its previous rows."""
    return disk_full_error(exc, f"the catalog {path}")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
