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
    from core.files import read_table

    path = _ws(root).dir("clusters", clustering_id, "assignments.parquet")
    return read_table(path, f"the assignments of clustering '{clustering_id}'", columns=["row"]).column("row").to_numpy()


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
def similarity_analyses(root: str) -> tuple[pd.DataFrame, list[str]]:
    """``(rows, damaged)``: one row per (analysis, benchmark) of every readable similarity analysis
    (``analysis, pool_set, reference_set, benchmark, embedding_set, n_test, n_pool, share_test_pool_closer,
    n_prune, share_pool_pruned, median_s_ref, median_nn_pool_sim``; newest analysis first), and a one-line
    error for each analysis whose meta.json cannot be read (the others stay usable)."""
    from core.errors import PrunescopeError
    from core.similarity_stage import analysis_meta, list_analyses

    ws = _ws(root)
    found: list[tuple[float, str, dict[str, Any]]] = []
    damaged: list[str] = []
    for analysis in list_analyses(ws):
        try:
            mtime = ws.dir("similarity", analysis, "meta.json").stat().st_mtime
            found.append((mtime, analysis, analysis_meta(ws, analysis)))
        except PrunescopeError as exc:
            damaged.append(exc.one_line())
        except OSError as exc:  # removed between the listing and the read
            damaged.append(f"similarity analysis '{analysis}': {exc.strerror or exc}")
    rows = []
    for _, analysis, meta in sorted(found, key=lambda f: (-f[0], f[1])):
        config = meta["config"]
        for summary in meta["summary"]:
            rows.append({"analysis": analysis, "pool_set": config["pool_set"],
                         "reference_set": config["reference_set"], **summary})
    return pd.DataFrame(rows), damaged


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


# -- robustness ---------------------------------------------------------------------------------------
#: Columns of a corruption evaluation's metrics rows (see :func:`corruption_metrics`).
CORRUPTION_COLUMNS = ["run_id", "started_at", "model", "dataset", "corruption", "severity", "adaptation", "metric",
                      "value"]
#: Columns of :func:`robustness_headlines`.
HEADLINE_COLUMNS = ["run_id", "started_at", "model", "adaptation", "value", "partial", "missing", "note",
                    "clean_error", "relative_mce"]
#: Identifies one grid: (run id, model label, adaptation).
Combo = tuple[str, str, str]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def corruption_metrics(root: str) -> pd.DataFrame:
    """Every metrics row of the corruption evaluations (runs of kind ``eval-corruptions``, or any run with
    per-corruption ``error`` rows), newest run first: :data:`CORRUPTION_COLUMNS`.

    Errors and summaries are in % as written; a NULL run id, model or dataset reads ``(none)``, a NULL
    adaptation ``none`` (the column's default), a NULL severity 0.
    """
    return _ws(root).catalog.query(
        "WITH evals AS (SELECT id FROM runs WHERE kind = 'eval-corruptions' "
        "UNION SELECT DISTINCT run_id FROM metrics WHERE metric = 'error' AND corruption IS NOT NULL) "
        "SELECT coalesce(m.run_id, '(none)') AS run_id, r.started_at, coalesce(m.model, '(none)') AS model, "
        "coalesce(m.dataset, '(none)') AS dataset, m.corruption, coalesce(m.severity, 0) AS severity, "
        "coalesce(m.adaptation, 'none') AS adaptation, m.metric, m.value "
        "FROM metrics m JOIN evals e ON e.id IS NOT DISTINCT FROM m.run_id LEFT JOIN runs r ON r.id = m.run_id "
        "ORDER BY r.started_at DESC NULLS LAST, run_id, model, adaptation, m.corruption NULLS FIRST, severity"
    )


@st.cache_data(ttl=TTL_S, show_spinner=False)
def reference_robustness(root: str) -> tuple[pd.DataFrame, bool]:
    """Published numbers (``reference_results``, values in %) and whether they come from the catalog.

    A catalog whose table is still empty (the demo loads it) falls back to the copy shipped in ``data/``,
    so the page can always show them; the flag is False then.
    """
    from core.reference import REFERENCE_COLUMNS, reference_results

    order = ["source", "dataset", "model", "adaptation", "metric", "corruption"]
    df = _ws(root).catalog.query(
        f"SELECT {', '.join(REFERENCE_COLUMNS)} FROM reference_results ORDER BY {', '.join(order[:-1])}, "
        "corruption NULLS FIRST"
    )
    if not df.empty:
        return df, True
    shipped = reference_results().sort_values(order, na_position="first", kind="stable")
    return shipped.reset_index(drop=True), False


def _errors(rows: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The per-domain and clean ``error`` rows of ``dataset``."""
    return rows[(rows["dataset"] == dataset) & (rows["metric"] == "error")]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def robustness_headlines(root: str, dataset: str, protocol: str) -> pd.DataFrame:
    """The protocol's headline per (run, model, adaptation) of ``dataset``: :data:`HEADLINE_COLUMNS`.

    ``value`` is the mCE (``all``) or the mean error at severity 5 (``sev5``), in %, computed from the
    per-domain error rows by :mod:`core.evaluate.robustness`; an incomplete grid gives the mean over the
    complete test corruptions with ``partial`` True and ``missing`` saying what is absent. A grid the metric
    functions reject keeps ``value`` NaN with their one-line message in ``note``. ``clean_error`` in %
    (NaN without a clean row); ``relative_mce`` in % (``all`` only, needs the clean error).
    """
    errors = _errors(corruption_metrics(root), dataset)
    keys = ["run_id", "model", "adaptation"]
    rows = [_headline(errors.loc[idx], protocol) for _, idx in errors.groupby(keys, sort=False).groups.items()]
    return pd.DataFrame(rows, columns=HEADLINE_COLUMNS)


def _headline(group: pd.DataFrame, protocol: str) -> dict[str, Any]:
    """One grid's headline row (see :func:`robustness_headlines`)."""
    from core.errors import PrunescopeError
    from core.evaluate import robustness

    first = group.iloc[0]
    out: dict[str, Any] = {"run_id": first["run_id"], "started_at": first["started_at"], "model": first["model"],
                           "adaptation": first["adaptation"], "value": float("nan"), "partial": False,
                           "missing": "", "note": "", "clean_error": float("nan"), "relative_mce": float("nan")}
    clean = group.loc[group["corruption"].isna(), "value"]
    if len(clean):
        out["clean_error"] = float(clean.iloc[-1])
    grid = group[group["corruption"].notna()]
    if grid.empty:
        out["note"] = "no per-corruption errors"
        return out
    table = pd.DataFrame({"corruption": grid["corruption"], "severity": grid["severity"], "error": grid["value"] / 100})
    try:
        if protocol == "all":
            part = robustness.mce(table, allow_partial=True)
        else:
            part = robustness.mean_error(table, protocol=protocol, allow_partial=True)
        if protocol == "all" and len(clean):
            out["relative_mce"] = robustness.relative_mce(table, out["clean_error"] / 100, allow_partial=True).value
    except PrunescopeError as exc:
        out["note"] = exc.one_line()
        return out
    out["value"], out["partial"] = part.value, bool(part.missing)
    out["missing"] = "; ".join(f"{c} ({', '.join(map(str, s))})" for c, s in part.missing.items())
    if part.missing:
        out["note"] = f"partial ({15 - len(part.missing)} of 15)"
    return out


@st.cache_data(ttl=TTL_S, show_spinner=False)
def robustness_grid(root: str, dataset: str, combo: Combo) -> tuple[pd.DataFrame, float | None]:
    """One grid: error in % by corruption (rows: all 15 test then the 4 hold-out corruptions, evaluated or
    not, then any other name alphabetically) x severity (columns 1-5; missing cells NaN), and the clean error
    in % (or None). Repeated cells are averaged here; :func:`robustness_headlines` reports them."""
    from core.corrupt import ALL_CORRUPTIONS, SEVERITIES

    errors = _errors(corruption_metrics(root), dataset)
    run_id, model, adaptation = combo
    mine = errors[(errors["run_id"] == run_id) & (errors["model"] == model) & (errors["adaptation"] == adaptation)]
    clean = mine.loc[mine["corruption"].isna(), "value"]
    cells = mine[mine["corruption"].notna() & mine["severity"].isin(SEVERITIES)]
    grid = cells.pivot_table(index="corruption", columns="severity", values="value", aggfunc="mean")
    grid = grid.reindex(index=[*ALL_CORRUPTIONS, *sorted(set(grid.index) - set(ALL_CORRUPTIONS))],
                        columns=list(SEVERITIES))
    grid.index.name, grid.columns.name = "corruption", "severity"
    return grid.astype(float), (float(clean.iloc[-1]) if len(clean) else None)


#: Columns of :func:`detection_metrics`.
DETECTION_METRIC_COLUMNS = ["run_id", "started_at", "model", "dataset", "corruption", "severity", "metric", "value",
                            "primary"]
#: Columns of :func:`detection_summary`.
DETECTION_SUMMARY_COLUMNS = ["run_id", "started_at", "model", "dataset", "primary", "P", "mPC", "rPC", "cells",
                             "note"]
#: Cells of a full detection grid (Michaelis et al. 2019: 15 test corruptions x severities 1-5).
DETECTION_FULL_GRID = 75


def _primary_metric(config_json: object) -> str:
    """The primary AP (``AP`` / ``AP50``) an ``eval-detection`` run recorded in its config (AP when unsure)."""
    import json

    try:
        metric = json.loads(str(config_json)).get("metric")
    except (json.JSONDecodeError, AttributeError):
        metric = None
    return "AP50" if metric == "ap50" else "AP"


@st.cache_data(ttl=TTL_S, show_spinner=False)
def detection_metrics(root: str) -> pd.DataFrame:
    """Every metrics row of the detection evaluations (runs of kind ``eval-detection``), newest run first:
    :data:`DETECTION_METRIC_COLUMNS`.

    Per-domain ``AP`` / ``AP50`` (clean: corruption NULL, severity 0) and per-model ``P`` / ``mPC`` / ``rPC``,
    all in % as written; ``primary`` is the run's P / mPC metric (``AP`` or ``AP50``).
    """
    ws = _ws(root)
    rows = ws.catalog.query(
        "SELECT m.run_id, r.started_at, coalesce(m.model, '(none)') AS model, "
        "coalesce(m.dataset, '(none)') AS dataset, m.corruption, coalesce(m.severity, 0) AS severity, m.metric, "
        "m.value, r.config_json FROM metrics m JOIN runs r ON r.id = m.run_id WHERE r.kind = 'eval-detection' "
        "ORDER BY r.started_at DESC NULLS LAST, m.run_id, model, m.corruption NULLS FIRST, severity"
    )
    rows["primary"] = [_primary_metric(c) for c in rows["config_json"]]
    return rows[DETECTION_METRIC_COLUMNS]


@st.cache_data(ttl=TTL_S, show_spinner=False)
def detection_summary(root: str) -> pd.DataFrame:
    """P, mPC and rPC (in %, higher = better) per (run, model, dataset) of the detection evaluations:
    :data:`DETECTION_SUMMARY_COLUMNS`, newest run first.

    The values are the ones the evaluation stored (mPC by ``core.evaluate.robustness.mpc``, which needs the
    full 15 x 5 grid: a partial grid has none and ``note`` says how many of the 75 cells it has); ``cells``
    counts the corrupted cells with a primary-metric value.
    """
    rows = detection_metrics(root)
    out = []
    for (run_id, model, dataset), part in rows.groupby(["run_id", "model", "dataset"], sort=False):
        first = part.iloc[0]
        values = dict(zip(part["metric"], part["value"], strict=False))
        cells = int(((part["metric"] == first["primary"]) & part["corruption"].notna()).sum())
        note = "" if "mPC" in values else (
            f"partial grid ({cells} of {DETECTION_FULL_GRID} cells): no mPC" if cells else "clean only: no mPC")
        out.append({"run_id": run_id, "started_at": first["started_at"], "model": model, "dataset": dataset,
                    "primary": first["primary"], "P": values.get("P", float("nan")),
                    "mPC": values.get("mPC", float("nan")), "rPC": values.get("rPC", float("nan")), "cells": cells,
                    "note": note})
    return pd.DataFrame(out, columns=DETECTION_SUMMARY_COLUMNS)


def not_applicable(rows: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """The (run, model, adaptation) combinations of ``dataset`` an evaluation marked not applicable
    (e.g. TENT on a model without BatchNorm): ``run_id, model, adaptation``."""
    na = rows[(rows["dataset"] == dataset) & (rows["metric"] == "not_applicable")]
    return na[["run_id", "model", "adaptation"]].drop_duplicates().reset_index(drop=True)


# -- runs and jobs ---
# Jobs change every second while they run, so nothing here is cached except the names a form offers.
# These are the dashboard's only writes besides manifests and map caches, and all of them go through
# core.jobs: submit (a validated, typed config; the job process is started from an argument list, never a
# shell), schedule, cancel and resume.
#: Lines of a job's ``log.txt`` the Runs page shows.
JOB_LOG_LINES = 40
#: Columns of :func:`jobs_table`.
JOB_TABLE_COLUMNS = ["id", "stage", "target", "status", "fraction", "resource", "submitted_at", "started_at",
                     "ended_at", "message"]


def _job_refs() -> set[tuple[str, str]]:
    """The (table, key) pairs that job parameters may name (see ``core.jobs.Ref``)."""
    from core.jobs import STAGES

    return {(ref.table, ref.key) for name in STAGES.names() for ref in STAGES.get(name).refs}


@st.cache_data(ttl=TTL_S, show_spinner=False)
def ref_names(root: str, table: str, key: str, role: str | None = None) -> list[str]:
    """The names a job parameter may take from the catalog (``datasets.name``, ``embedding_sets.id``, ...):
    those of datasets with ``role`` first (an embedding set by its dataset's role), then newest first (so a
    form's default is what was made last), then by name. Only the pairs some stage's refs declare are
    accepted."""
    if (table, key) not in _job_refs():
        raise ValueError(f"not a job reference: {table}.{key}")
    if table == "embedding_sets":
        source, role_of = "embedding_sets t LEFT JOIN datasets d ON d.name = t.dataset", "d.role"
    elif table == "datasets":
        source, role_of = "datasets t", "t.role"
    else:
        source, role_of = f"{table} t", "NULL"
    df = _ws(root).catalog.query(
        f"SELECT t.{key} AS name FROM {source} GROUP BY t.{key} "
        f"ORDER BY bool_or(coalesce({role_of} = ?, false)) DESC, max(t.created_at) DESC NULLS LAST, name",
        [role])
    return [str(v) for v in df["name"]]


def advance_queue(root: str) -> list[str]:
    """Move the job queue on: jobs whose process vanished are marked failed and queued jobs start while
    slots are free (:func:`core.jobs.schedule`, which runs :func:`core.jobs.refresh` first, under the queue
    lock). Returns the ids started."""
    from core import jobs

    return jobs.schedule(_ws(root))


def submit_job(root: str, stage: str, params: dict[str, Any]) -> str:
    """Queue a job (validated by :func:`core.jobs.submit`; nothing is written when it raises ConfigError,
    UnknownName or PathOutsideWorkspace: file parameters must lie inside the workspace or a registered dataset
    root) and start it when a slot is free; returns its run id."""
    from core import jobs

    run_id = jobs.submit(_ws(root), stage, params, confine_paths=True)
    advance_queue(root)
    runs.clear()
    return run_id


def jobs_table(root: str, limit: int = 200) -> pd.DataFrame:
    """The latest jobs, newest submission first: :data:`JOB_TABLE_COLUMNS` (``fraction`` in [0, 1] or None
    while a stage reports no progress; 1 when done)."""
    from core import jobs

    df = jobs.list_jobs(_ws(root), limit=limit)
    order = df["submitted_at"].fillna(df["started_at"].astype(str)).astype(str)
    df = df.assign(_order=order).sort_values(["_order", "id"], ascending=False, kind="stable")
    return df[JOB_TABLE_COLUMNS].reset_index(drop=True)


def _job_params(root: str, run_id: str) -> dict[str, Any]:
    """A job's ``params.json`` (UnknownName when the run is not a job)."""
    import json

    from core import jobs
    from core.errors import UnknownName
    from core.workspace import validate_name

    path = _ws(root).dir("runs", validate_name(run_id, "run id")) / jobs.PARAMS_FILE
    try:
        params: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        params = {}
    if "job" not in params:
        raise UnknownName(f"job '{run_id}' not found (no runs/{run_id}/{jobs.PARAMS_FILE})")
    return params


def job_detail(root: str, run_id: str) -> dict[str, Any]:
    """One job: its ``runs`` row, ``stage``, ``resource``, ``fraction`` and ``progress`` (the latest record)
    as :func:`core.jobs.job_status` gives them, plus ``log_tail`` (:data:`JOB_LOG_LINES` lines),
    ``config`` and ``call`` (the stored, resolved parameters), ``outputs``, ``resumes`` and ``history``
    (every progress record, oldest first)."""
    from core import jobs
    from core.runs import read_progress

    ws = _ws(root)
    job = _job_params(root, run_id)["job"]
    out = jobs.job_status(ws, run_id)
    out["log_tail"] = jobs.log_tail(ws, run_id, JOB_LOG_LINES)
    out["history"] = read_progress(ws.dir("runs", run_id))
    out.update(config=job.get("config", {}), call=job.get("call", {}), outputs=job.get("outputs", []),
               resumes=int(job.get("resumes", 0)), submitted_at=job.get("submitted_at"))
    return out


def cancel_job(root: str, run_id: str) -> str:
    """Cancel a queued or running job (:func:`core.jobs.cancel`: a running one gets SIGTERM, then SIGKILL to
    its process group after a grace period); returns its final status."""
    from core import jobs

    status = jobs.cancel(_ws(root), run_id)
    runs.clear()
    return status


def resume_job(root: str, run_id: str) -> str:
    """Queue a failed or cancelled job again under its id (training continues from its checkpoint, the other
    stages skip finished work) and start it when a slot is free; returns the id."""
    from core import jobs

    jobs.resume(_ws(root), run_id)
    advance_queue(root)
    runs.clear()
    return run_id


def rerun_params(root: str, run_id: str) -> tuple[str, dict[str, Any]]:
    """(stage, parameters) to launch a job like ``run_id`` again, for the Launch form to edit.

    The stored config is the resolved one; a value the config derives by itself when the parameter is left
    empty (an output id such as ``clustering_id``, ``num_workers``) is left out, so that editing ``k`` names
    a new clustering instead of overwriting the old one. ``run_id`` (continue that run) is left out too: a
    re-run is a new job. Call options (``replace``) are kept.
    """
    from core import jobs
    from core.errors import PrunescopeError

    job = _job_params(root, run_id)["job"]
    stage, config = str(job["stage"]), dict(job.get("config", {}))
    config.pop("run_id", None)
    entry = jobs.STAGES.entry(stage)
    for spec in entry.params:
        if spec.default is not None or spec.required or config.get(spec.name) is None:
            continue
        try:  # what the config makes of the other values alone
            others = {k: v for k, v in config.items() if k != spec.name}
            derived = jobs.plain_config(jobs.build_config(stage, others))
        except PrunescopeError:
            continue
        if derived.get(spec.name) == config[spec.name]:
            config[spec.name] = None
    return stage, {**config, **dict(job.get("call", {}))}


def manifest_dataset(root: str, pruning_id: str) -> str:
    """The dataset a registered pruning's manifest selects from (its clustering's embedding set's dataset)."""
    import json

    ws = _ws(root)
    row = ws.catalog.row("prunings", "id", pruning_id, what="pruning")
    clustering_id = json.loads(row["config_json"])["clustering_id"]
    found = ws.catalog.query("SELECT e.dataset FROM clusterings c JOIN embedding_sets e "
                             "ON e.id = c.embedding_set WHERE c.id = ?", [clustering_id])
    if found.empty:
        from core.errors import UnknownName

        raise UnknownName(f"clustering '{clustering_id}' of pruning '{pruning_id}' not found in the catalog")
    return str(found["dataset"].iloc[0])


def train_on_manifest(root: str, pruning_id: str) -> str:
    """Queue a ``train-clip`` job on the pool restricted to a saved manifest (the stage's other parameters at
    their defaults; re-run it from the Runs page to change them); returns the job's id."""
    params = {"dataset": manifest_dataset(root, pruning_id), "manifest": pruning_id}
    return submit_job(root, "train-clip", params)


def clear_result_caches() -> None:
    """Forget cached catalog reads after a job ended, so the other pages show its results at once."""
    for fn in (summary, datasets, runs, clusterings, prunings, similarity_analyses, corruption_metrics,
               zeroshot_results, ref_names):
        fn.clear()
