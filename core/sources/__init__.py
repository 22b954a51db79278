"""Data sources: readers for the formats users bring, all registered in :data:`SOURCES`.

Importing this package registers every built-in source: ``image_folder``, ``parquet``,
``webdataset``, ``laion``, ``imagenet_c`` and ``cifar_c``.
"""

from core.sources import image_folder, imagenet_c, laion, parquet, webdataset  # noqa: F401,E402  (register)
from core.sources.base import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    INDEX_COLUMNS,
    SKIP_REASONS,
    SOURCES,
    IssueReport,
    SampleError,
    Source,
    decode_caption,
    index_row,
    is_url,
    open_image_bytes,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "INDEX_COLUMNS",
    "SKIP_REASONS",
    "SOURCES",
    "IssueReport",
    "SampleError",
    "Source",
    "decode_caption",
    "index_row",
    "is_url",
    "open_image_bytes",
]
