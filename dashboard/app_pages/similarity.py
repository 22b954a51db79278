"""Train-test similarity: how close the pool is to each benchmark's test samples, compared with the
reference train set, the test samples beside their nearest neighbours, and the paper's pruning.

Ref: Mayilvahanan et al., "Does CLIP's generalization performance mainly stem from high train-test
similarity?", ICLR 2024. The analysis itself is ``prunescope similarity`` (core.similarity_stage); the
pruning preview runs the ``similarity`` method on the pool's clustering and saves it through
:func:`core.prune.run_pruning`, like the Pruning page.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from core.errors import PrunescopeError
from dashboard import charts, queries, widgets
from dashboard.app_pages.runs import train_on_manifest_button
from dashboard.widgets import md_plain

KEY = "similarity_"
PAIRS_PER_PAGE = 6
PAIRS_PER_ROW = 2
#: Gallery orders: label -> (column, ascending).
ORDERS = {
    "pool neighbour most similar first": ("nn_pool_sim", False),
    "pool neighbour least similar first": ("nn_pool_sim", True),
    "pool closest relative to reference first": ("margin", False),
    "reference closest relative to pool first": ("margin", True),
}
SUMMARY_COLUMNS = {"benchmark": "benchmark", "n_test": "test samples",
                   "share_test_pool_closer": "share with a closer pool neighbour",
                   "n_prune": "pool samples closer than reference", "median_s_ref": "median reference → test",
                   "median_nn_pool_sim": "median pool → test"}


def render() -> None:
    root = queries.workspace_root()
    st.title("Train-test similarity")
    st.caption("For each test sample, its nearest reference sample (the reference set plays ImageNet-train) sets "
               "its own threshold; a pool sample nearer to that test sample than the threshold is 'closer than "
               "reference'. Pruning those samples asks whether a model's accuracy came from near copies of "
               "the test set (Mayilvahanan et al., ICLR 2024).")
    try:
        analyses, damaged = queries.similarity_analyses(root)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    for message in damaged:  # a damaged analysis is named, the readable ones stay usable
        st.warning(md_plain(message))
    if analyses.empty:
        st.info("No similarity analysis yet. Run one with `prunescope similarity POOL_SET REFERENCE_SET "
                "BENCHMARK_SET...` (embedding sets of one model; `prunescope embeddings` lists them). The demo "
                "has one: `prunescope demo`.")
        return
    names = list(dict.fromkeys(analyses["analysis"]))
    analysis = st.selectbox("Analysis", names, key=KEY + "analysis")
    summary = analyses[analyses["analysis"] == analysis].reset_index(drop=True)
    first = summary.iloc[0]
    st.text(f"pool: {first['pool_set']}    reference: {first['reference_set']}")
    _summary(summary)
    benchmark = st.segmented_control("Benchmark", summary["benchmark"].tolist(), key=KEY + "benchmark",
                                     default=summary["benchmark"].iloc[0]) or summary["benchmark"].iloc[0]
    row = summary.set_index("benchmark").loc[benchmark]
    try:
        test = queries.similarity_part(root, analysis, str(benchmark), "test")
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    left, right = st.columns(2)
    left.plotly_chart(charts.similarity_histograms(test, benchmark=str(benchmark)), key=KEY + "hist")
    right.plotly_chart(charts.similarity_scatter(test, benchmark=str(benchmark)), key=KEY + "scatter")
    _gallery(root, test, str(row["embedding_set"]), str(first["pool_set"]), str(first["reference_set"]))
    _prune_section(root, analysis, summary, str(first["pool_set"]))


def _summary(summary: pd.DataFrame) -> None:
    table = summary[list(SUMMARY_COLUMNS)].rename(columns=SUMMARY_COLUMNS)
    left, right = st.columns([3, 2])
    left.dataframe(table, hide_index=True, key=KEY + "summary", width="stretch", column_config={
        SUMMARY_COLUMNS["share_test_pool_closer"]: st.column_config.NumberColumn(format="percent"),
        SUMMARY_COLUMNS["median_s_ref"]: st.column_config.NumberColumn(format="%.4f"),
        SUMMARY_COLUMNS["median_nn_pool_sim"]: st.column_config.NumberColumn(format="%.4f"),
    })
    right.plotly_chart(charts.share_closer(summary), key=KEY + "share")


# -- the neighbour gallery ------------------------------------------------------------------------------
def _gallery(root: str, test: pd.DataFrame, bench_set: str, pool_set: str, reference_set: str) -> None:
    st.divider()
    st.subheader("Test samples beside their nearest neighbours")
    controls = st.columns([2, 1, 1])
    order = controls[0].selectbox("Order", list(ORDERS), key=KEY + "order")
    only_closer = controls[1].toggle("only where the pool is closer", key=KEY + "only_closer")
    rows = test.assign(margin=test["nn_pool_sim"] - test["s_ref"])
    if only_closer:
        rows = rows[rows["margin"] > 0]
    column, ascending = ORDERS[order]
    rows = rows.sort_values([column, "id"], ascending=[ascending, True], kind="stable")
    pages = max(1, -(-len(rows) // PAIRS_PER_PAGE))
    page = int(controls[2].number_input(f"page (of {pages})", 1, pages, 1, key=KEY + "page"))
    shown = rows.iloc[(page - 1) * PAIRS_PER_PAGE : page * PAIRS_PER_PAGE]
    if shown.empty:
        st.info("No test sample here.")
        return
    try:
        datasets = {role: queries.set_dataset(root, s) for role, s in
                    (("test", bench_set), ("pool", pool_set), ("reference", reference_set))}
        found = {"test": queries.index_rows(root, datasets["test"], shown["id"].tolist()),
                 "pool": queries.index_rows(root, datasets["pool"], shown["nn_pool_id"].tolist()),
                 "reference": queries.index_rows(root, datasets["reference"], shown["ref_id"].tolist())}
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    clusters = _clusters_of(root, pool_set)
    by_id = {role: df.set_index("id", drop=False) for role, df in found.items()}
    pairs = list(shown.itertuples())
    for start in range(0, len(pairs), PAIRS_PER_ROW):  # two pairs a row: six tiles of thumbnail size
        row_cells = st.columns(3 * PAIRS_PER_ROW, gap="small")
        for i, pair in enumerate(pairs[start : start + PAIRS_PER_ROW]):
            _pair(root, row_cells[3 * i : 3 * i + 3], pair, datasets, by_id, clusters)


def _pair(root: str, cells: list[Any], pair: Any, datasets: dict[str, str], by_id: dict[str, pd.DataFrame],
          clusters: pd.Series | None) -> None:
    """One test sample, its nearest pool sample and its nearest reference sample, side by side."""
    _cell(cells[0], root, datasets["test"], by_id["test"], str(pair.id), "test sample",
          f"{int(pair.n_closer):,} pool samples closer than reference")
    cluster = clusters.get(str(pair.nn_pool_id)) if clusters is not None else None
    _cell(cells[1], root, datasets["pool"], by_id["pool"], str(pair.nn_pool_id), "nearest pool sample",
          f"cos {pair.nn_pool_sim:.4f}" + (f", cluster {int(cluster)}" if cluster is not None else ""))
    _cell(cells[2], root, datasets["reference"], by_id["reference"], str(pair.ref_id), "nearest reference sample",
          f"cos {pair.s_ref:.4f}")


def _cell(cell: Any, root: str, dataset: str, rows: pd.DataFrame, sample_id: str, title: str, note: str) -> None:
    with cell:
        if sample_id not in rows.index:
            st.text(f"{title}: {widgets.shorten(sample_id, 40)} is not in dataset {widgets.shorten(dataset, 40)}")
            return
        row = dict(rows.loc[sample_id]) | {"note": note}
        widgets.sample_tile(root, dataset, row, title=title)


def _clusters_of(root: str, pool_set: str) -> pd.Series | None:
    """Cluster per pool id from the newest clustering of the pool set, None when it has none."""
    cids = _pool_clusterings(root, pool_set)
    if not cids:
        return None
    try:
        return queries.id_clusters(root, cids[0])
    except PrunescopeError:
        return None


def _pool_clusterings(root: str, pool_set: str) -> list[str]:
    clusterings = queries.clusterings(root)
    return clusterings.loc[clusterings["embedding_set"] == pool_set, "id"].tolist()


# -- pruning to reference similarity ----------------------------------------------------------------
def _prune_section(root: str, analysis: str, summary: pd.DataFrame, pool_set: str) -> None:
    st.divider()
    st.subheader("Prune the pool to reference similarity")
    st.caption("Removes every pool sample that is closer to some test sample than that sample's nearest "
               "reference sample (the paper's setting). The manifest lists the kept ids; the pool is untouched.")
    cids = _pool_clusterings(root, pool_set)
    if not cids:
        st.info(f"Manifests are saved per clustering: cluster the pool first (`prunescope cluster {pool_set}`). "
                f"Pool samples closer than reference per benchmark: "
                + ", ".join(f"{b} {int(n):,}" for b, n in zip(summary["benchmark"], summary["n_prune"], strict=True)))
        return
    controls, results = st.columns([1, 2], gap="large")
    with controls:
        cid = st.selectbox("Clustering of the pool", cids, key=KEY + "clustering")
        chosen = st.multiselect("Benchmarks", summary["benchmark"].tolist(), default=summary["benchmark"].tolist(),
                                key=KEY + "benchmarks")
    if not chosen:
        results.info("Choose at least one benchmark.")
        return
    steps = [("similarity", {"analysis": analysis, "benchmarks": ",".join(chosen)})]
    try:
        with st.spinner("Reading the clustering..."):
            counts = queries.similarity_counts(root, cid, analysis)
            sel = queries.preview(root, cid, steps, "input")
    except PrunescopeError as exc:
        results.error(md_plain(exc.one_line()))
        return
    with results:
        cols = st.columns(3)
        cols[0].metric("Pool rows", f"{sel.n_in:,}")
        cols[1].metric("Removed", f"{len(sel.removed):,}", f"{len(sel.removed) / max(sel.n_in, 1):.1%}",
                       delta_color="off")
        cols[2].metric("Kept", f"{len(sel.kept):,}")
        per_bench = pd.DataFrame({"benchmark": list(counts), "pool samples closer than reference": list(counts.values())})
        st.dataframe(per_bench, hide_index=True, key=KEY + "per_bench")
    st.plotly_chart(charts.kept_by_cluster(sel.per_cluster), key=KEY + "by_cluster")
    _save(root, cid, steps)


def _save(root: str, cid: str, steps: list[tuple[str, dict[str, Any]]]) -> None:
    name = st.text_input("Manifest name (optional)", key=KEY + "name")
    if st.button("Save manifest", key=KEY + "save", type="primary"):
        try:
            with st.spinner("Writing the manifest..."):
                info = queries.save_pruning(root, cid, steps, "input", name.strip() or None)
        except PrunescopeError as exc:
            st.error(md_plain(exc.one_line()))
            return
        st.session_state[KEY + "saved"] = info.id
        st.success(f"Saved {info.id}: {info.n_kept:,} of {info.n_in:,} rows kept.")
        st.code(f"prunescope export {info.id} --format ids --out kept.txt", language="bash")
    train_on_manifest_button(root, st.session_state.get(KEY + "saved"), key=KEY + "train")


if __name__ == "__main__":
    render()
