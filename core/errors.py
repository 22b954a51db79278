"""One exception hierarchy for prunescope.

Every error a user can cause (bad parameters, bad data, a missing file, a locked or too-new catalog)
is a :class:`PrunescopeError`. The CLI prints ``error: <message>`` (plus ``hint: ...`` when there is
one) and exits with :attr:`PrunescopeError.exit_code`; the dashboard shows the same text with
``st.error``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class PrunescopeError(Exception):
    """Base class: a one-line message for the user, and an optional hint saying what to do next."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def one_line(self) -> str:
        """The message and hint on one line (newlines folded), as the CLI prints it."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class ConfigError(PrunescopeError):
    """A parameter is out of range, of the wrong type, or unknown."""

    exit_code = 2


class UnknownName(ConfigError):
    """A name looked up in a registry or the catalog does not exist; the message lists what does."""


class DataError(PrunescopeError):
    """Input data cannot be used as a whole (missing columns, no readable samples, wrong width)."""

    exit_code = 3


class MissingFileError(DataError):
    """A file or folder the user named does not exist."""


class PathOutsideWorkspace(PrunescopeError):
    """A path resolves outside the workspace and every registered data root."""

    exit_code = 4


class CatalogError(PrunescopeError):
    """The catalog cannot be opened or migrated."""

    exit_code = 5


class CatalogLocked(CatalogError):
    """Another process held the catalog's lock for longer than the retry budget."""


class SchemaTooNew(CatalogError):
    """The catalog was written by a newer prunescope than this one."""


class AlreadyExists(PrunescopeError):
    """A name is already taken (use --replace to overwrite)."""

    exit_code = 6


class WeightsUnavailable(PrunescopeError):
    """Pretrained weights are not cached and cannot be downloaded (offline, hub unreachable)."""

    exit_code = 7


class DiskFull(PrunescopeError, OSError):
    """A write failed because the file system is full (ENOSPC), a quota is reached (EDQUOT) or the file
    would pass the process's file size limit (EFBIG, ``ulimit -f``).

    Also an :class:`OSError` (with the original ``errno``), so code that handled the raw error still does.
    The partial file is already gone; finished work is kept, so the same command resumes once there is room.
    """

    exit_code = 8

    def __init__(self, message: str, *, hint: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno
