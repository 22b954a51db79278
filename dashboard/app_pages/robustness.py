"""Robustness: corruption evaluations under a chosen protocol, each adaptation's gain over the source model,
error heat maps (corruption x severity), two grids side by side, and the published numbers beside.

Headlines come from the per-domain error rows through :mod:`core.evaluate.robustness` (in
:func:`dashboard.queries.robustness_headlines`): the mCE over severities 1-5 (Hendrycks & Dietterich, ICLR
2019; RobustBench), or the mean error at severity 5 as test-time adaptation papers report it (mCE is not
defined per severity). Published numbers (``reference_results``) are drawn apart and named by source.

The detection section shows P / mPC / rPC of ``eval-detection`` runs (Michaelis et al. 2019) as the
evaluation stored them, beside the published michaelis2019 rows, and AP per corruption.
"""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from core.errors import PrunescopeError
from core.evaluate.robustness import PROTOCOL_LABELS, PROTOCOLS
from dashboard import queries
from dashboard import robustness_charts as rcharts
from dashboard.widgets import md_plain

KEY = "robustness_"
EVAL_COMMAND = "prunescope eval corruptions DATASET --model CHECKPOINT [--adapt none,bn,tent,rpl]"
DETECTION_COMMAND = "prunescope eval detection DATA --model torchvision:fasterrcnn_resnet50_fpn"
#: The headline's name per protocol (the column and axis title).
METRIC_NAMES = {"all": "mCE (%)", "sev5": "mean error, severity 5 (%)"}
#: What a per-corruption difference averages, per protocol.
DIFF_WHAT = {"all": "mean error over severities 1-5", "sev5": "error at severity 5"}
Combo = queries.Combo


def render() -> None:
    root = queries.workspace_root()
    st.title("Robustness")
    st.caption("Top-1 error under the ImageNet-C corruptions (15 test, 4 hold-out; severities 1-5), with and "
               "without test-time adaptation. mCE normalises each corruption's error by AlexNet's "
               "(100 = AlexNet; Hendrycks & Dietterich, ICLR 2019); lower is better everywhere. Object "
               "detectors under the same corruptions are in their own section below (AP: higher is better).")
    try:
        rows = queries.corruption_metrics(root)
        reference, in_catalog = queries.reference_robustness(root)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    _classification(root, rows, reference)
    _detection_section(root, reference)
    _published(reference, in_catalog)


def _classification(root: str, rows: pd.DataFrame, reference: pd.DataFrame) -> None:
    """The classification grids: headlines, gains, one grid, two side by side, not applicable."""
    datasets = sorted(set(rows.loc[rows["metric"].isin(["error", "not_applicable"]), "dataset"]))
    if not datasets:
        st.info("No corruption evaluation yet. Evaluate a model on a corruption grid with "
                f"`{EVAL_COMMAND}`; the demo (`prunescope demo`) makes some.")
        return
    dataset, protocol = _controls(datasets)
    try:
        headlines = queries.robustness_headlines(root, dataset, protocol)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    if headlines.empty:
        st.info("This dataset has no error rows, only combinations marked not applicable (below).")
    else:
        _headline_section(headlines, reference, dataset, protocol)
        _heatmap_section(root, dataset, headlines)
        _compare_section(root, dataset, headlines, protocol)
    _not_applicable(rows, dataset)


def _controls(datasets: list[str]) -> tuple[str, str]:
    left, right = st.columns([1, 2], gap="large")
    dataset = left.selectbox("Dataset", datasets, key=KEY + "dataset")
    st.session_state.setdefault(KEY + "protocol", "all")
    protocol = right.radio("Protocol", list(PROTOCOLS), format_func=PROTOCOL_LABELS.get, horizontal=True,
                           key=KEY + "protocol",
                           help="all severities: mCE, normalised by AlexNet. Severity 5 only: the plain mean "
                                "error over the 15 test corruptions (AlexNet's per-severity errors are not "
                                "published, so no mCE exists for it).")
    return str(dataset), str(protocol or "all")


def _download(df: pd.DataFrame, name: str, key: str) -> None:
    """A CSV download of a chart's data (the button does not rerun the page)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    st.download_button("Download CSV", df.to_csv(index=False).encode("utf-8"), file_name=f"{safe}.csv",
                       mime="text/csv", key=KEY + "dl_" + key, icon=":material/download:", on_click="ignore")


def _combo_label(combo: Combo) -> str:
    run_id, model, adaptation = combo
    return f"{model} · {adaptation} · {run_id}"


def _drop_stale(key: str, options: list[Combo]) -> None:
    """Forget a selection that is no longer offered (another dataset or protocol), so the default applies."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


def _combos(headlines: pd.DataFrame) -> list[Combo]:
    return [(str(r), str(m), str(a)) for r, m, a in
            zip(headlines["run_id"], headlines["model"], headlines["adaptation"], strict=True)]


# -- headlines and gains ------------------------------------------------------------------------------
def _headline_section(headlines: pd.DataFrame, reference: pd.DataFrame, dataset: str, protocol: str) -> None:
    metric = METRIC_NAMES[protocol]
    best = rcharts.latest(headlines)
    published = rcharts.published_mce(reference) if protocol == "all" else None
    show = protocol == "all" and st.toggle("Show published mCE beside", value=True, key=KEY + "show_published")
    st.plotly_chart(rcharts.headline_bars(best, published if show else None, metric=metric),
                    key=KEY + "headline_chart")
    _published_note(protocol, dataset, show)
    _download(_chart_data(best, published if show else None), f"{dataset}-{protocol}-headline", "headline")
    st.caption("Bars show the newest run of each (model, adaptation); the table lists every run. Dotted bars "
               "and 'partial' mean a grid missing some test corruptions: the mean is over the complete ones.")
    st.dataframe(_headline_display(headlines, protocol), hide_index=True, width="stretch",
                 key=KEY + "headline_table")
    _download(headlines, f"{dataset}-{protocol}-headline-all-runs", "headline_all")
    _gain_section(headlines, dataset, protocol)


def _gain_section(headlines: pd.DataFrame, dataset: str, protocol: str) -> None:
    st.divider()
    st.subheader("Gain of each adaptation over the source model")
    gains = rcharts.gain_table(headlines)
    unit = "mCE points" if protocol == "all" else "error points (severity 5)"
    left, right = st.columns(2, gap="large")
    with left:
        st.plotly_chart(rcharts.gain_bars(gains, unit=unit), key=KEY + "gain_chart")
    with right:
        st.caption("gain = headline without adaptation − headline with it, same model, newest runs; "
                   "positive = the adaptation lowers the error.")
        shown = gains.rename(columns={"source": "without", "adapted": "with"})
        st.dataframe(shown.round(2), hide_index=True, width="stretch", key=KEY + "gain_table")
        _download(gains, f"{dataset}-{protocol}-gain", "gain")


def _chart_data(best: pd.DataFrame, published: pd.DataFrame | None) -> pd.DataFrame:
    """The headline chart's bars as one table; ``source`` says whose number each is."""
    ours = best[["model", "adaptation", "value", "partial", "missing", "run_id"]].assign(source="this workspace")
    if published is None or published.empty:
        return ours
    theirs = published[["source", "model", "adaptation", "value"]].assign(source=published["source"] + " (published)")
    return pd.concat([ours, theirs], ignore_index=True)


def _published_note(protocol: str, dataset: str, show: bool) -> None:
    if protocol != "all":
        st.caption("Published numbers are mCE over all severities, so none are drawn for severity 5.")
    elif show and dataset.lower() not in ("imagenet-c", "imagenet_c"):
        st.caption("The published bars are ResNet-50 results on ImageNet-C, not on this dataset: a yardstick, "
                   "not a like-for-like comparison.")


def _headline_display(headlines: pd.DataFrame, protocol: str) -> pd.DataFrame:
    """The headline table as shown: readable column names, the grid's state in words."""
    grid = [note if note else "complete" for note in headlines["note"]]
    out = pd.DataFrame({"run": headlines["run_id"], "model": headlines["model"],
                        "adaptation": headlines["adaptation"], METRIC_NAMES[protocol]: headlines["value"].round(2),
                        "grid": grid, "clean error (%)": headlines["clean_error"].round(2)})
    if protocol == "all":
        out["relative mCE (%)"] = headlines["relative_mce"].round(2)
    out["missing"] = headlines["missing"]
    return out


# -- one grid ---------------------------------------------------------------------------------------
def _grid(root: str, dataset: str, combo: Combo) -> tuple[pd.DataFrame, float | None] | None:
    try:
        return queries.robustness_grid(root, dataset, combo)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return None


def _heatmap_title(clean: float | None) -> str:
    return "Error (%) by corruption and severity" + (f", clean {clean:.1f}%" if clean is not None else "")


def _heatmap_section(root: str, dataset: str, headlines: pd.DataFrame) -> None:
    st.divider()
    st.subheader("One grid: corruption x severity")
    combos = _combos(headlines)
    _drop_stale(KEY + "grid", combos)
    combo = st.selectbox("Run · model · adaptation", combos, format_func=_combo_label, key=KEY + "grid")
    found = _grid(root, dataset, combo)
    if found is None:
        return
    grid, clean = found
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.plotly_chart(rcharts.error_heatmap(grid, title=_heatmap_title(clean), subtitle=_combo_label(combo)),
                        key=KEY + "heatmap")
        _download(grid.reset_index(), f"{dataset}-grid", "grid")
    with right:
        row = headlines.iloc[combos.index(combo)]
        st.text(_combo_label(combo))
        cols = st.columns(2)
        cols[0].metric("Clean error", "n/a" if clean is None else f"{clean:.1f}%")
        cols[1].metric("Cells evaluated", f"{int(grid.notna().to_numpy().sum())} of {grid.size}")
        cols = st.columns(2)
        for col, (label, protocol) in zip(cols, (("mCE", "all"), ("Mean error, severity 5", "sev5")), strict=True):
            value, partial = _value_under(root, dataset, combo, protocol)
            col.metric(label + (" (partial)" if partial else ""), "n/a" if pd.isna(value) else f"{value:.1f}")
        if row["note"]:
            st.text(f"{row['note']}" + (f"; missing: {row['missing']}" if row["missing"] else ""))
        test = grid[grid.index.isin(rcharts.TEST_CORRUPTIONS)]
        means = test.mean(axis=0).rename("mean error, test corruptions (%)").round(2).reset_index()
        st.dataframe(means, hide_index=True, key=KEY + "per_severity")


def _value_under(root: str, dataset: str, combo: Combo, protocol: str) -> tuple[float, bool]:
    """The combination's headline under ``protocol`` and whether it is partial (NaN when not computable)."""
    table = queries.robustness_headlines(root, dataset, protocol)
    hit = table[(table["run_id"] == combo[0]) & (table["model"] == combo[1]) & (table["adaptation"] == combo[2])]
    if hit.empty:
        return float("nan"), False
    return float(hit["value"].iloc[0]), bool(hit["partial"].iloc[0])


# -- side by side -----------------------------------------------------------------------------------
def _compare_section(root: str, dataset: str, headlines: pd.DataFrame, protocol: str) -> None:
    st.divider()
    st.subheader("Two grids side by side")
    combos = _combos(headlines)
    _drop_stale(KEY + "cmp_a", combos)
    _drop_stale(KEY + "cmp_b", combos)
    left, right = st.columns(2, gap="large")
    a = left.selectbox("A", combos, index=0, format_func=_combo_label, key=KEY + "cmp_a")
    b = right.selectbox("B", combos, index=min(1, len(combos) - 1), format_func=_combo_label, key=KEY + "cmp_b")
    found_a, found_b = _grid(root, dataset, a), _grid(root, dataset, b)
    if found_a is None or found_b is None:
        return
    (grid_a, clean_a), (grid_b, clean_b) = found_a, found_b
    zrange = _shared_range(grid_a, grid_b)
    for col, name, combo, grid, clean in ((left, "A", a, grid_a, clean_a), (right, "B", b, grid_b, clean_b)):
        with col:
            fig = rcharts.error_heatmap(grid, title=f"{name}: " + _heatmap_title(clean),
                                        subtitle=_combo_label(combo), zrange=zrange)
            st.plotly_chart(fig, key=KEY + "cmp_heatmap_" + name)
    diff = rcharts.difference_table(grid_a, grid_b, PROTOCOLS[protocol])
    left, right = st.columns([3, 2], gap="large")
    with left:
        st.plotly_chart(rcharts.difference_bars(diff, what=DIFF_WHAT[protocol]), key=KEY + "diff_chart")
    with right:
        st.dataframe(_diff_display(diff), hide_index=True, width="stretch", key=KEY + "diff_table")
        _download(diff, f"{dataset}-{protocol}-difference", "diff")


def _shared_range(*grids: pd.DataFrame) -> tuple[float, float] | None:
    values = pd.concat([g.stack() for g in grids if not g.empty]) if any(not g.empty for g in grids) else None
    if values is None or values.empty:
        return None
    return float(values.min()), float(values.max())


def _diff_display(diff: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"corruption": diff["corruption"], "hold-out": diff["hold_out"],
                         "A (%)": diff["a"].round(2), "B (%)": diff["b"].round(2),
                         "B − A": diff["difference"].round(2)})


# -- detection ---------------------------------------------------------------------------------------
def _detection_section(root: str, reference: pd.DataFrame) -> None:
    """P / mPC / rPC per model and run beside the published numbers, and AP per corruption."""
    st.divider()
    st.subheader("Detection (mPC / rPC)")
    st.caption("Object detectors under the same corruptions (Michaelis et al. 2019): P = clean AP, mPC = mean "
               "AP over the 15 test corruptions x severities 1-5, rPC = mPC / P. Pascal VOC reports AP50, "
               "COCO AP@[.5:.95]. Higher is better.")
    try:
        summary = queries.detection_summary(root)
        cells = queries.detection_metrics(root)
    except PrunescopeError as exc:
        st.error(md_plain(exc.one_line()))
        return
    published = rcharts.published_detection(reference)
    if summary.empty:
        st.info(f"No detection evaluation yet. Evaluate a detector with `{DETECTION_COMMAND}`.")
        if not published.empty:
            st.dataframe(_detection_display(summary, published), hide_index=True, width="stretch",
                         key=KEY + "det_table")
        return
    datasets = list(dict.fromkeys(summary["dataset"]))
    dataset = st.selectbox("Detection dataset", datasets, key=KEY + "det_dataset") if len(datasets) > 1 \
        else datasets[0]
    mine = summary[summary["dataset"] == dataset]
    st.dataframe(_detection_display(mine, published), hide_index=True, width="stretch", key=KEY + "det_table")
    st.caption("Published rows (michaelis2019, Faster R-CNN R50-FPN) were measured on COCO, Pascal VOC and "
               "Cityscapes, not here: a yardstick. An empty mPC means a partial grid (mPC needs all 75 cells).")
    _download(mine, f"{dataset}-detection-summary", "det_summary")
    _detection_bars(cells[cells["dataset"] == dataset], mine, dataset)


def _detection_bars(cells: pd.DataFrame, summary: pd.DataFrame, dataset: str) -> None:
    metrics = ["AP", "AP50"]
    default = str(summary["primary"].iloc[0]) if str(summary["primary"].iloc[0]) in metrics else "AP"
    st.session_state.setdefault(KEY + "det_metric", default)
    metric = st.radio("Bars show", metrics, horizontal=True, key=KEY + "det_metric",
                      help="AP@[.5:.95] (COCO's headline) or AP at IoU 0.5 (Pascal VOC's); both are stored.")
    newest = summary.drop_duplicates("model", keep="first")  # summary is newest run first
    keep = set(zip(newest["run_id"], newest["model"], strict=True))
    newest_run = pd.Series([(r, m) in keep for r, m in zip(cells["run_id"], cells["model"], strict=True)],
                           index=cells.index, dtype=bool)
    rows = cells[(cells["metric"] == metric) & newest_run]
    means = rcharts.corruption_ap_means(rows)
    st.plotly_chart(rcharts.detection_corruption_bars(means, metric=str(metric)), key=KEY + "det_chart")
    st.caption("Bars show the newest run of each model; the table above lists every run.")
    _download(means, f"{dataset}-detection-{metric}-per-corruption", "det_bars")


def _detection_display(summary: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """The detection table as shown: this workspace's runs, then the published rows marked as such."""
    ours = pd.DataFrame({"run": summary["run_id"], "model": summary["model"], "dataset": summary["dataset"],
                         "metric": summary["primary"], "P (%)": summary["P"].round(2),
                         "mPC (%)": summary["mPC"].round(2), "rPC (%)": summary["rPC"].round(2),
                         "origin": "this workspace", "note": summary["note"],
                         "corrupted cells": summary["cells"].astype("Int64")})
    theirs = pd.DataFrame({"run": "", "model": published["model"], "dataset": published["dataset"],
                           "metric": published["primary"], "P (%)": published["P"], "mPC (%)": published["mPC"],
                           "rPC (%)": published["rPC"], "origin": "published, " + published["source"].astype(str),
                           "note": "", "corrupted cells": pd.array([pd.NA] * len(published), "Int64")})
    frames = [f for f in (ours, theirs) if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else ours


# -- not applicable and published -------------------------------------------------------------------
def _not_applicable(rows: pd.DataFrame, dataset: str) -> None:
    na = queries.not_applicable(rows, dataset)
    if na.empty:
        return
    st.divider()
    st.subheader("Not applicable")
    st.caption("The evaluation skipped these combinations: the method cannot adapt the model (e.g. TENT and "
               "BN adaptation need BatchNorm layers, which CLIP's vision transformer lacks). They are not zeros.")
    st.dataframe(na.rename(columns={"run_id": "run"}), hide_index=True, key=KEY + "not_applicable")


def _published(reference: pd.DataFrame, in_catalog: bool) -> None:
    st.divider()
    st.subheader("Published reference numbers")
    where = ("the catalog's reference_results table" if in_catalog else
             "the copy shipped with prunescope (not yet loaded into this workspace's catalog)")
    st.caption(f"Numbers from the papers, in %, from {where}; they were not measured here. "
               "data/reference_results.csv names each source in full.")
    st.text("sources: " + ", ".join(sorted(map(str, reference["source"].unique()))))
    st.dataframe(reference, hide_index=True, width="stretch", key=KEY + "published")
    _download(reference, "published-reference-results", "published")


if __name__ == "__main__":
    render()
