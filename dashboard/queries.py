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


# -- clusters ---------------------------------------------------------------------------------------
#: Index columns that hold a ground-truth concept per sample (the demo world's pool has the first).
TRUTH_COLUMNS = ("concept_name", "class_name")
#: Columns of the clusters table as the Clusters page shows them.
CLUSTER_COLUMNS = ["cluster", "label", "vocab_label", "size", "d_intra", "d_inter", "complexity", "vocab_score"]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def clusterings(root: str) -> pd.DataFrame:
    """Registered clusterings, newest first: id, embedding_set, dataset, k, seed, n, created_at."""
    return _ws(root).catalog.query(
        "SELECT c.id, c.embedding_set, e.dataset, c.k, c.seed, "
        "(SELECT coalesce(sum(size), 0) FROM clusters s WHERE s.clustering_id = c.id) AS n, c.created_at "
        "FROM clusterings c LEFT JOIN embedding_sets e ON e.id = c.embedding_set ORDER BY c.created_at DESC, c.id"
    )


@st.cache_data(ttl=TTL_S, show_spinner=False)
def cluster_table(root: str, clustering_id: str) -> pd.DataFrame:
    """One row per cluster: :data:`CLUSTER_COLUMNS`, ordered by cluster."""
    df = _ws(root).catalog.query(
        f"SELECT {', '.join(CLUSTER_COLUMNS)} FROM clusters WHERE clustering_id = ? ORDER BY cluster", [clustering_id]
    )
    return df


@st.cache_data(ttl=60, show_spinner=False)
def clustering_meta(root: str, clustering_id: str) -> dict[str, Any]:
    """The clustering's meta.json (config, n, skipped)."""
    from core.clustering import clustering_meta as read_meta

    return read_meta(_ws(root), clustering_id)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def members(root: str, clustering_id: str, dataset: str, cluster: int, end: str, n: int) -> pd.DataFrame:
    """``n`` members of a cluster from one end (``prototypical``/``atypical``), joined with their dataset
    index rows (caption, url, path ...) for the gallery; values None rather than NaN."""
    from core.clustering import cluster_members

    picks = cluster_members(_ws(root), clustering_id, cluster, n=n, end=end)
    index = dataset_handle(root, dataset).index
    rows = index.iloc[picks["row"].to_numpy()].reset_index(drop=True)
    rows = rows.drop(columns=[c for c in ("cluster", "dist_to_centroid", "pos") if c in rows.columns])
    out = pd.concat([picks.drop(columns=["id", "row"]), rows], axis=1)
    return out.astype(object).where(out.notna(), None)


def truth_column(root: str, dataset: str) -> str | None:
    """The dataset's ground-truth concept column (:data:`TRUTH_COLUMNS`), or None."""
    index = dataset_handle(root, dataset).index
    return next((c for c in TRUTH_COLUMNS if c in index.columns and index[c].notna().any()), None)


@st.cache_data(ttl=60, show_spinner=False)
def truth_composition(root: str, clustering_id: str, dataset: str, column: str) -> pd.DataFrame:
    """``cluster, value, count, share`` of a ground-truth column per cluster (majority first)."""
    from core.clustering import cluster_composition

    values = dataset_handle(root, dataset).index[column]
    return cluster_composition(_ws(root), clustering_id, values)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def centroid_map(root: str, clustering_id: str) -> pd.DataFrame | None:
    """The cached UMAP map of the centroids (``cluster, x, y``), None until computed."""
    from core import project

    ws = _ws(root)
    return project.centroid_map(ws, clustering_id) if project.has_centroid_map(ws, clustering_id) else None


@st.cache_data(ttl=TTL_S, show_spinner=False)
def member_map(root: str, clustering_id: str, cluster: int) -> pd.DataFrame | None:
    """The cached UMAP map of one cluster's members (``pos, id, row, x, y, dist_to_centroid``), or None."""
    from core import project

    ws = _ws(root)
    return project.member_map(ws, clustering_id, cluster) if project.has_member_map(ws, clustering_id, cluster) else None


def compute_maps(root: str, clustering_id: str, clusters: list[int] | None) -> None:
    """Compute (and cache on disk) the centroid map and the given clusters' member maps."""
    from core import project

    project.compute_maps(_ws(root), clustering_id, clusters=clusters)
    centroid_map.clear()
    member_map.clear()


@st.cache_resource(ttl=1800, max_entries=2, show_spinner=False)
def text_encoder(root: str, embedding_set: str) -> Any:
    """The embedding set's CLIP text tower (loaded once per set and shared across sessions)."""
    from core.search import load_text_encoder

    return load_text_encoder(_ws(root), embedding_set)


@st.cache_data(ttl=300, max_entries=50, show_spinner=False)
def text_search(root: str, clustering_id: str, embedding_set: str, text: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Nearest clusters and samples to a phrase (see :func:`core.search.search_clustering`)."""
    from core.search import search_clustering

    return search_clustering(_ws(root), clustering_id, text, encode=text_encoder(root, embedding_set))


# -- pruning ----------------------------------------------------------------------------------------
@st.cache_resource(ttl=1800, max_entries=2, show_spinner=False)
def prune_context(root: str, clustering_id: str) -> Any:
    """The clustering's PruneContext, shared across reruns and sessions: it caches the eps-independent
    SemDeDup similarities and the DBP plans, so a slider move re-plans without reading embeddings."""
    from core.prune import PruneContext

    return PruneContext.from_clustering(_ws(root), clustering_id)


@st.cache_resource(ttl=1800, max_entries=2, show_spinner=False)
def assignment_rows(root: str, clustering_id: str) -> Any:
    """(n,) int64 dataset index row of each clustered row (assignments order)."""
    import pyarrow.parquet as pq

    path = _ws(root).dir("clusters", clustering_id, "assignments.parquet")
    return pq.read_table(path, columns=["row"]).column("row").to_numpy()


def preview(root: str, clustering_id: str, steps: list[tuple[str, dict[str, Any]]], fraction_of: str) -> Any:
    """Run a chain on the cached context (not cached itself: a re-plan costs milliseconds)."""
    from core.prune import run_chain

    return run_chain(prune_context(root, clustering_id), steps, fraction_of=fraction_of)


def eps_curve(root: str, clustering_id: str, order: str, eps: tuple[float, ...]) -> pd.DataFrame:
    """SemDeDup's eps -> kept curve on the clustering (one pass over the embeddings, then cached)."""
    from core.prune.semdedup import semdedup_plan

    return semdedup_plan(prune_context(root, clustering_id), order).curve(list(eps))


@st.cache_data(ttl=TTL_S, show_spinner=False)
def prunings(root: str) -> pd.DataFrame:
    """Registered prunings, newest first (id, methods, n_in, n_kept, manifest_path, config_json, created_at)."""
    from core.prune.manifest import list_prunings

    return list_prunings(_ws(root))


@st.cache_data(ttl=300, max_entries=20, show_spinner=False)
def manifest_overlap(root: str, a: str, b: str) -> tuple[dict[str, int], pd.DataFrame]:
    """Two manifests side by side: counts (kept_a, kept_b, both, either) and, per cluster of A's
    clustering, ``cluster, kept_a, kept_b`` (B's kept ids counted in the cluster A gives them)."""
    from core.prune.manifest import load_manifest

    ws = _ws(root)
    ma = load_manifest(ws, a, columns=["id", "kept", "cluster"])
    mb = load_manifest(ws, b, columns=["id", "kept"])
    both = ma.merge(mb.rename(columns={"kept": "kept_b"}), on="id", how="outer")
    ka = both["kept"].fillna(False).astype(bool)
    kb = both["kept_b"].fillna(False).astype(bool)
    counts = {"kept_a": int(ka.sum()), "kept_b": int(kb.sum()), "both": int((ka & kb).sum()),
              "either": int((ka | kb).sum())}
    per = (pd.DataFrame({"cluster": both["cluster"], "kept_a": ka, "kept_b": kb}).dropna(subset=["cluster"])
           .groupby("cluster", as_index=False)[["kept_a", "kept_b"]].sum())
    return counts, per


@st.cache_data(ttl=60, show_spinner=False)
def truth_categories(root: str, dataset: str) -> pd.Series | None:
    """The pool's ground-truth category per index row (demo-style truth columns), or None."""
    from core.demo.truth import has_truth
    from core.demo.truth import truth_categories as categories

    index = dataset_handle(root, dataset).index
    return categories(index) if has_truth(index) else None


def save_pruning(root: str, clustering_id: str, steps: list[tuple[str, dict[str, Any]]], fraction_of: str,
                 pruning_id: str | None) -> Any:
    """Write and register the manifest of a chain (a short synchronous stage; reused when it exists)."""
    from core.prune.manifest import PruneConfig, run_pruning

    cfg = PruneConfig(clustering_id=clustering_id, chain=steps, fraction_of=fraction_of, pruning_id=pruning_id or None)
    info = run_pruning(_ws(root), cfg)
    prunings.clear()
    return info


@st.cache_data(show_spinner=False)
def semdedup_reference() -> pd.DataFrame:
    """Published SemDeDup eps -> fraction kept on LAION-440M (``data/semdedup_laion440m.csv``)."""
    from core.reference import read_table

    return read_table("semdedup_laion440m.csv")


# -- train-test similarity --------------------------------------------------------------------------
@st.cache_data(ttl=TTL_S, show_spinner=False)
def similarity_analyses(root: str) -> pd.DataFrame:
    """One row per (analysis, benchmark) of every finished similarity analysis: ``analysis, pool_set,
    reference_set, benchmark, embedding_set, n_test, n_pool, share_test_pool_closer, n_prune,
    share_pool_pruned, median_s_ref, median_nn_pool_sim``; newest analysis first."""
    from core.similarity_stage import analysis_meta, list_analyses

    ws = _ws(root)
    rows = []
    for analysis in sorted(list_analyses(ws), key=lambda a: -ws.dir("similarity", a, "meta.json").stat().st_mtime):
        meta = analysis_meta(ws, analysis)
        config = meta["config"]
        for summary in meta["summary"]:
            rows.append({"analysis": analysis, "pool_set": config["pool_set"],
                         "reference_set": config["reference_set"], **summary})
    return pd.DataFrame(rows)


@st.cache_data(ttl=TTL_S, max_entries=40, show_spinner=False)
def similarity_part(root: str, analysis: str, benchmark: str, part: str) -> pd.DataFrame:
    """The ``test`` or ``pool`` table of one benchmark of an analysis (see core.similarity_stage)."""
    from core.similarity_stage import load_similarity

    return load_similarity(_ws(root), analysis, benchmark, part)


@st.cache_data(ttl=TTL_S, show_spinner=False)
def set_dataset(root: str, set_id: str) -> str:
    """The dataset an embedding set embeds."""
    from core.embed import embedding_set_row

    return str(embedding_set_row(_ws(root), set_id)["dataset"])


@st.cache_resource(ttl=1800, max_entries=2, show_spinner=False)
def id_clusters(root: str, clustering_id: str) -> pd.Series:
    """Cluster of each clustered id (index = id), from the cached pruning context."""
    ctx = prune_context(root, clustering_id)
    return pd.Series(ctx.labels, index=pd.Index(ctx.ids, name="id"), name="cluster")


def similarity_counts(root: str, clustering_id: str, analysis: str) -> dict[str, int]:
    """Clustered rows closer than reference, per benchmark and for any of them."""
    from core.prune.similarity import closer_counts

    return closer_counts(prune_context(root, clustering_id), analysis)


def index_rows(root: str, dataset: str, ids: list[str]) -> pd.DataFrame:
    """The index rows of the distinct ``ids``, in first-seen order (missing ids dropped), None for NA."""
    index = dataset_handle(root, dataset).index
    wanted = list(dict.fromkeys(ids))
    rows = index[index["id"].isin(wanted)].drop_duplicates("id").set_index("id", drop=False)
    rows = rows.loc[[i for i in wanted if i in rows.index]].reset_index(drop=True)
    return rows.astype(object).where(rows.notna(), None)
