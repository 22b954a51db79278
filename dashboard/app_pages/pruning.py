"""Pruning: build a chain (SemDeDup first, then DBP, SSP, CLIP score or random), tune it with sliders that
re-plan at once, look at what goes per cluster and why, save a manifest, compare two manifests.

A slider move re-runs the chain on a cached :class:`core.prune.PruneContext`, whose SemDeDup similarities
(independent of eps) and DBP plans are computed once, so no embedding is read again. Saving writes the
manifest through :func:`core.prune.run_pruning` (the same call as ``prunescope prune``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from core.errors import PrunescopeError
from dashboard import charts, queries, widgets
from dashboard.app_pages.runs import train_on_manifest_button
from dashboard.widgets import md_plain

KEY = "pruning_"
DEDUP = "semdedup"
NOTHING = "(nothing)"
FRACTION_LABELS = {"input": "of what reaches the step", "pool": "of the whole pool"}
GALLERY_N = 12
CURVE_EPS = tuple(float(v) for v in np.geomspace(1e-5, 0.3, 40))


def render() -> None:
    root = queries.workspace_root()
    st.title("Pruning")
    info = widgets.clustering_picker(root, key=KEY + "clustering", empty_hint=(
        "Pruning works on concept clusters. Cluster an embedding set first: "
        "`prunescope cluster EMBEDDING_SET --k 100` (the demo has one: `prunescope demo`)."))
    if info is None:
        return
    try:
        prunings = queries.prunings(root)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    cid, dataset = str(info.name), str(info["dataset"])
    mine = prunings[prunings["config_json"].str.contains(json.dumps(cid), regex=False)]
    controls, results = st.columns([1, 2], gap="large")
    with controls:
        steps, fraction_of = _chain_form(mine)
    with results:
        sel = _preview(root, cid, steps, fraction_of)
        if sel is None:
            return
        _charts(root, cid, dataset, sel, steps)
    _cluster_gallery(root, cid, dataset, sel)
    _save_section(root, cid, steps, fraction_of)
    _compare_section(root, prunings)


# -- the chain ----------------------------------------------------------------------------------------
def _methods() -> Any:
    from core.prune import METHODS

    return METHODS


def _apply_saved(mine: pd.DataFrame) -> None:
    """Fill the form from a saved pruning's chain (callback of the 'Start from' selector)."""
    choice = st.session_state.get(KEY + "start")
    if not choice or choice not in set(mine["id"]):
        return
    config = json.loads(mine.set_index("id").loc[choice, "config_json"])
    chain = [(name, params) for name, params in config["chain"]]
    st.session_state[KEY + "dedup"] = bool(chain and chain[0][0] == DEDUP)
    if chain and chain[0][0] == DEDUP:
        _set_params("s1", chain.pop(0)[1])
    st.session_state[KEY + "method"] = chain[0][0] if chain else NOTHING
    if chain:
        _set_params(f"s2_{chain[0][0]}", chain[0][1])
    st.session_state[KEY + "fraction_of"] = config.get("fraction_of", "input")


def _set_params(prefix: str, params: dict[str, Any]) -> None:
    """Seed the form's widgets (a slider with ticks snaps the value to its nearest stop itself)."""
    for name, value in params.items():
        st.session_state[f"{KEY}{prefix}_{name}"] = value
        st.session_state[f"{KEY}{prefix}_{name}_on"] = value is not None


def _chain_form(mine: pd.DataFrame) -> tuple[list[tuple[str, dict[str, Any]]], str]:
    methods = _methods()
    first_visit = not st.session_state.get(KEY + "ready")
    st.session_state[KEY + "ready"] = True
    if not mine.empty:
        if first_visit or st.session_state.get(KEY + "start") not in set(mine["id"]):
            st.session_state[KEY + "start"] = mine["id"].iloc[0]
            if first_visit:  # start from the newest saved pruning; later saves leave the form alone
                _apply_saved(mine)
        st.selectbox("Start from a saved pruning", mine["id"].tolist(), key=KEY + "start", on_change=_apply_saved,
                     args=(mine,), help="fills the form with that manifest's chain")
    steps: list[tuple[str, dict[str, Any]]] = []
    st.subheader("1. Deduplicate")
    st.session_state.setdefault(KEY + "dedup", True)
    if st.toggle("SemDeDup first (as the DBP paper does)", key=KEY + "dedup"):
        entry = methods.entry(DEDUP)
        st.caption(entry.summary)
        steps.append((DEDUP, widgets.param_form(entry.params, key=KEY + "s1")))
    st.subheader("2. Then prune")
    names = [n for n in methods.names() if n != DEDUP] + [NOTHING]
    st.session_state.setdefault(KEY + "method", "dbp" if "dbp" in names else names[0])
    method = st.selectbox("Method", names, key=KEY + "method")
    if method != NOTHING:
        entry = methods.entry(method)
        st.caption(f"{entry.summary}" + (f" — {entry.paper}" if entry.paper else ""))
        steps.append((method, widgets.param_form(entry.params, key=f"{KEY}s2_{method}")))
    st.session_state.setdefault(KEY + "fraction_of", "input")
    fraction_of = st.radio("keep_fraction is", list(FRACTION_LABELS), format_func=FRACTION_LABELS.get,
                           key=KEY + "fraction_of", horizontal=True)
    return steps, str(fraction_of)


def _preview(root: str, cid: str, steps: list[tuple[str, dict[str, Any]]], fraction_of: str) -> Any:
    if not steps:
        st.info("Choose at least one step.")
        return None
    try:
        with st.spinner("Preparing the clustering (first time only: reads the embeddings once)..."):
            queries.prune_context(root, cid)
        start = time.perf_counter()
        sel = queries.preview(root, cid, steps, fraction_of)
        ms = (time.perf_counter() - start) * 1000
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return None
    cols = st.columns(4)
    cols[0].metric("Input rows", f"{sel.n_in:,}")
    cols[1].metric("Kept", f"{len(sel.kept):,}", f"{len(sel.kept) / max(sel.n_in, 1):.1%}", delta_color="off")
    cols[2].metric("Removed", f"{len(sel.removed):,}")
    cols[3].metric("Re-planned in", f"{ms:,.0f} ms")
    counts = pd.DataFrame([{"reason": r, "removed": n} for r, n in sel.reason_counts().items() if n])
    if not counts.empty:
        st.dataframe(counts, hide_index=True, key=KEY + "reasons")
    return sel


# -- results ------------------------------------------------------------------------------------------
def _charts(root: str, cid: str, dataset: str, sel: Any, steps: list[tuple[str, dict[str, Any]]]) -> None:
    per = sel.per_cluster
    dedup = next((p for n, p in steps if n == DEDUP), None)
    if dedup is not None:
        with st.spinner("Drawing the eps curve..."):
            curve = queries.eps_curve(root, cid, str(dedup.get("order") or "hard"), CURVE_EPS)
        st.plotly_chart(charts.eps_curve(curve, eps=dedup.get("eps"), reference=queries.semdedup_reference()),
                        key=KEY + "curve")
    color = next((c for c in per.columns if c.endswith("complexity")), None)
    left, right = st.columns(2)
    with left:
        st.plotly_chart(charts.quota_scatter(per, color_col=color), key=KEY + "quota")
    with right:
        st.plotly_chart(charts.kept_by_cluster(per), key=KEY + "by_cluster")
    truth = _truth(root, cid, dataset, sel)
    if truth is not None:
        st.plotly_chart(charts.kept_by_truth(truth), key=KEY + "truth")


def _truth(root: str, cid: str, dataset: str, sel: Any) -> pd.DataFrame | None:
    from core.demo.truth import kept_by_truth

    try:
        categories = queries.truth_categories(root, dataset)
    except PrunescopeError:
        return None
    if categories is None:
        return None
    kept = np.zeros(sel.n_in, dtype=bool)
    kept[sel.kept] = True
    return kept_by_truth(categories, queries.assignment_rows(root, cid), kept)


def _cluster_gallery(root: str, cid: str, dataset: str, sel: Any) -> None:
    st.divider()
    st.subheader("What goes, cluster by cluster")
    per = sel.per_cluster.sort_values(["removed", "size"], ascending=False)
    table = queries.cluster_table(root, cid)
    names = dict(zip(table["cluster"].astype(int), table["label"].fillna(""), strict=True))
    removed = dict(zip(per["cluster"].astype(int), per["removed"].astype(int), strict=True))
    cluster = st.selectbox("Cluster", list(removed), key=KEY + "cluster",
                           format_func=lambda c: f"{c}: {widgets.shorten(names.get(c, ''), 40)} ({removed[c]:,} removed)")
    ctx = queries.prune_context(root, cid)
    removed_tab, kept_tab = st.tabs(["Removed, with the reason", "Kept"])
    with removed_tab:
        in_cluster = np.flatnonzero(ctx.labels[sel.removed] == cluster)[:GALLERY_N]
        notes = [_reason_note(sel, ctx, i) for i in in_cluster]
        _samples(root, cid, dataset, sel.removed[in_cluster], notes, key="removed")
    with kept_tab:
        kept = sel.kept[ctx.labels[sel.kept] == cluster][:GALLERY_N]
        _samples(root, cid, dataset, kept, [f"1 - cos = {ctx.dist[p]:.3f}" for p in kept], key="kept")


def _reason_note(sel: Any, ctx: Any, i: int) -> str:
    reason = sel.reason_names[int(sel.reason[i])]
    ref = int(sel.ref[i])
    score = float(sel.score[i])
    return f"{reason} {score:.4f}" + (f" vs {ctx.ids[ref]}" if ref >= 0 else "")


def _samples(root: str, cid: str, dataset: str, positions: np.ndarray, notes: list[str], *, key: str) -> None:
    if len(positions) == 0:
        st.info("Nothing here for this cluster.")
        return
    try:
        index = queries.dataset_handle(root, dataset).index
        local = queries.dataset_has_images(root, dataset)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    rows = index.iloc[queries.assignment_rows(root, cid)[positions]].reset_index(drop=True)
    rows = rows.astype(object).where(rows.notna(), None)
    rows["note"] = notes
    if local:
        widgets.thumbnail_grid(root, dataset, rows, columns=6)
    elif "url" in rows.columns:
        widgets.url_gallery(rows, key=KEY + "gallery_" + key)
    else:
        st.dataframe(rows[[c for c in ("id", "caption", "note") if c in rows.columns]], hide_index=True,
                     key=KEY + "gallery_" + key)


# -- manifests ----------------------------------------------------------------------------------------
def _save_section(root: str, cid: str, steps: list[tuple[str, dict[str, Any]]], fraction_of: str) -> None:
    st.divider()
    st.subheader("Save the manifest")
    st.caption("Writes manifests/<id>.parquet (kept ids, removed ids with their reason) and registers it; "
               "the source data is never touched.")
    name = st.text_input("Name (optional; default from the clustering, methods and settings)", key=KEY + "name")
    if st.button("Save manifest", key=KEY + "save", type="primary", disabled=not steps):
        try:
            with st.spinner("Writing the manifest..."):
                info = queries.save_pruning(root, cid, steps, fraction_of, name.strip() or None)
        except PrunescopeError as exc:
            st.error(md_plain(exc.one_line()))
            return
        st.session_state[KEY + "saved"] = info.id
        st.success(f"Saved: {info.n_kept:,} of {info.n_in:,} rows kept.")
        st.code(f"prunescope export {info.id} --format ids --out kept.txt\n"
                f"prunescope train clip DATASET --manifest {info.id}", language="bash")
    train_on_manifest_button(root, st.session_state.get(KEY + "saved"), key=KEY + "train")


def _compare_section(root: str, prunings: pd.DataFrame) -> None:
    if len(prunings) < 2:
        return
    st.divider()
    st.subheader("Compare two manifests")
    ids = prunings["id"].tolist()
    left, right = st.columns(2)
    a = left.selectbox("A", ids, index=0, key=KEY + "cmp_a")
    b = right.selectbox("B", ids, index=1, key=KEY + "cmp_b")
    try:
        counts, per = queries.manifest_overlap(root, a, b)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    cols = st.columns(4)
    cols[0].metric("Kept by A", f"{counts['kept_a']:,}")
    cols[1].metric("Kept by B", f"{counts['kept_b']:,}")
    cols[2].metric("Kept by both", f"{counts['both']:,}")
    cols[3].metric("Jaccard", f"{counts['both'] / max(counts['either'], 1):.2f}")
    st.plotly_chart(charts.manifest_overlap(per, (a, b)), key=KEY + "compare")


if __name__ == "__main__":
    render()
