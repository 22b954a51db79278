"""The catalog: DuckDB schema (numbered SQL migrations) and short-lived, lock-tolerant connections."""

from core.store.catalog import SCHEMA_VERSION, Catalog

__all__ = ["SCHEMA_VERSION", "Catalog"]
