"""Cached, read-only access to the workspace's catalog: the only dashboard module that opens it.

Every function takes the workspace root as a string (so caches are keyed per workspace), opens a
short-lived read-only connection through :class:`core.store.Catalog` (which retries while a writer
holds DuckDB's lock) and returns a DataFrame or a small value. Results are cached for
:data:`TTL_S` seconds, so a page rerun costs nothing while a running job's new rows still appear
within seconds. Errors are :class:`core.errors.PrunescopeError`; pages catch them and show
``st.error(exc.one_line())``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from core.datasets import Dataset, list_datasets, open_dataset
from core.sources import SKIP_REASONS
from core.store.catalog import SCHEMA_VERSION
from core.workspace import Workspace, resolve_workspace_root

#: Seconds a cached query result stays fresh.
TTL_S = 10
#: Seconds a reader waits for a writer's lock before giving up with CatalogLocked.
LOCK_TIMEOUT_S = 10.0

DATASET_COLUMNS = ["name", "kind", "role", "n_samples", "n_skipped", "n_classes", "has_captions", "created_at"]
ISSUE_COLUMNS = ["dataset", "reason", "action", "count", "example", "meaning"]
RUN_COLUMNS = ["id", "kind", "status", "started_at", "ended_at", "message"]
#: Display order of roles: the pool being curated first, then what it is measured against.
ROLE_ORDER = {"pool": 0, "benchmark": 1, "reference": 2}


def workspace_root() -> str:
    """The workspace in use: ``$PRUNESCOPE_WORKSPACE`` else ``data/workspace``, made absolute."""
    return str(resolve_workspace_root())


def _ws(root: str) -> Workspace:
    return Workspace(root, create=False, lock_timeout=LOCK_TIMEOUT_S)


def catalog_exists(root: str) -> bool:
    """Whether the workspace has a catalog file (not cached: it appears when a build finishes)."""
    return _ws(root).exists


@st.cache_data(ttl=TTL_S, show_spinner=False)
def schema_version(root: str) -> int:
    """The catalog's schema version; raises SchemaTooNew (newer code wrote it) or CatalogError."""
    _ws(root).catalog.check_version()
    return SCHEMA_VERSION


@st.cache_data(ttl=TTL_S, show_spinner=False)
def summary(root: str) -> dict[str, int]:
    """Headline counts: datasets, samples, skipped, runs."""
    df = _ws(root).catalog.query(
        "SELECT (SELECT count(*) FROM datasets) AS datasets, "
        "(SELECT coalesce(sum(n_samples), 0) FROM datasets) AS samples, "
        "(SELECT coalesce(sum(n_skipped), 0) FROM datasets) AS skipped, "
        "(SELECT count(*) FROM runs) AS runs"
    )
    return {key: int(value) for key, value in df.iloc[0].items()}


@st.cache_data(ttl=TTL_S, show_spinner=False)
def datasets(root: str) -> pd.DataFrame:
    """Registered datasets, pools first (:data:`ROLE_ORDER`) then by name: :data:`DATASET_COLUMNS`."""
    df = list_datasets(_ws(root))
    order = df["role"].map(lambda r: ROLE_ORDER.get(r, len(ROLE_ORDER)))
    df = df.assign(_order=order).sort_values(["_order", "name"], kind="stable")
    return df[[c for c in DATASET_COLUMNS if c in df.columns]].reset_index(drop=True)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def issues(root: str, dataset: str | None = None) -> pd.DataFrame:
    """What registration skipped or repaired, per dataset and reason: :data:`ISSUE_COLUMNS`.

    ``meaning`` explains the reason in words; ``dataset=None`` returns every dataset's rows.
    """
    sql = "SELECT dataset, reason, action, count, example FROM dataset_issues"
    params: list[Any] = []
    if dataset is not None:
        sql += " WHERE dataset = ?"
        params.append(dataset)
    df = _ws(root).catalog.query(sql + " ORDER BY dataset, action, count DESC, reason", params)
    df["meaning"] = [SKIP_REASONS.get(r, "") for r in df["reason"]]
    return df[ISSUE_COLUMNS]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def runs(root: str, limit: int = 200) -> pd.DataFrame:
    """The latest runs, newest first: :data:`RUN_COLUMNS`."""
    return _ws(root).catalog.query(
        f"SELECT {', '.join(RUN_COLUMNS)} FROM runs ORDER BY started_at DESC NULLS LAST, id LIMIT ?", [int(limit)]
    )


@st.cache_data(ttl=TTL_S, show_spinner=False)
def sample_rows(root: str, dataset: str, n: int = 12, seed: int = 0) -> pd.DataFrame:
    """A seeded sample of ``n`` index rows of ``dataset`` (all of the index's columns).

    ``class_name`` is filled from the dataset's class list when the source left it out; missing
    values are None (not pandas NA) so each row can be handed back to ``Dataset.load_image``.
    """
    ds = open_dataset(_ws(root), dataset)
    index = ds.index
    rows = index.sample(n=min(n, len(index)), random_state=seed) if len(index) else index
    rows = rows.reset_index(drop=True)
    if "class_name" not in rows.columns:
        names = ds.classes() or []
        labels = rows["label"] if "label" in rows.columns else pd.Series([None] * len(rows))
        rows["class_name"] = [names[int(v)] if pd.notna(v) and 0 <= int(v) < len(names) else None for v in labels]
    return rows.astype(object).where(rows.notna(), None)


@st.cache_resource(ttl=60, show_spinner=False)
def dataset_handle(root: str, dataset: str) -> Dataset:
    """An opened dataset (catalog row + source) for reading images; shared across sessions."""
    return open_dataset(_ws(root), dataset)


def dataset_has_images(root: str, dataset: str) -> bool:
    """False for sources without pixels (e.g. LAION embedding releases)."""
    return bool(getattr(dataset_handle(root, dataset).source, "has_images", True))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def zeroshot_results(root: str) -> pd.DataFrame:
    """Zero-shot top-1/top-5 per (model, dataset) with the dataset's class count: model, dataset,
    metric, value, n_classes, run_id."""
    return _ws(root).catalog.query(
        "SELECT m.model, m.dataset, m.metric, m.value, d.n_classes, m.run_id FROM metrics m "
        "LEFT JOIN datasets d ON d.name = m.dataset "
        "WHERE m.metric IN ('zeroshot_top1', 'zeroshot_top5') AND m.corruption IS NULL "
        "ORDER BY m.model, m.dataset"
    )
