"""Data sources: readers for the formats users bring, all registered in :data:`SOURCES`.

Importing this package registers every built-in source.
"""

from core.sources import image_folder  # noqa: F401  (registers)
from core.sources.base import (
    DEFAULT_MAX_PIXELS,
    INDEX_COLUMNS,
    SKIP_REASONS,
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    decode_caption,
    open_image_bytes,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "INDEX_COLUMNS",
    "SKIP_REASONS",
    "SOURCES",
    "IssueReport",
    "SampleError",
    "Source",
    "decode_caption",
    "open_image_bytes",
]
