"""Pure chart builders: a DataFrame in, a Plotly figure out.

No Streamlit here, so every function is unit-tested on its own (``tests/dashboard/test_charts.py``).
Category labels (dataset names, reasons) are user-controlled text: Plotly renders a small HTML
subset in labels (``<a href>``, ``<b>``...), so :func:`plain` escapes ``<`` and ``>`` first.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.graph_objects as go

#: One colour per dataset role; the accent colour (pool) matches .streamlit/config.toml.
ROLE_COLORS = {"pool": "#4C5FD5", "benchmark": "#E8833A", "reference": "#3AA57A"}
OTHER_COLOR = "#8A8FA3"
SKIPPED_COLOR = "#C9CCD6"
ACTION_COLORS = {"skipped": "#D9534F", "repaired": "#E8B13A"}
MODEL_COLORS = ("#4C5FD5", "#E8833A", "#3AA57A", "#B5478C", "#2E9BC4", "#8A6D3B")
FONT = dict(family="sans-serif", size=13, color="#1F2430")


def plain(text: object) -> str:
    """``text`` with ``<``/``>``/``&`` escaped so Plotly shows it literally (no tags, no links)."""
    return html.escape(str(text), quote=False)


def _layout(fig: go.Figure, *, title: str, x_title: str, y_title: str, height: int) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=15)),
        xaxis_title=x_title,
        yaxis_title=y_title,
        height=height,
        margin=dict(l=10, r=10, t=60, b=10),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1, title_text="",
                    traceorder="normal"),
        font=FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
        bargap=0.3,
    )
    # plotly.js leaves automargin off: without it long tick labels are clipped by the tight margins.
    fig.update_xaxes(automargin=True, gridcolor="#ECEEF3", zeroline=False)
    fig.update_yaxes(automargin=True, gridcolor="#ECEEF3", zeroline=False)
    return fig


def _count_ticks(largest: float) -> dict[str, object]:
    """Axis settings for counts: whole-number ticks (no 0.2 steps when the largest count is small)."""
    return dict(rangemode="tozero", tickformat=",d", **({"dtick": 1} if largest <= 8 else {}))


def empty_figure(message: str, *, height: int = 300) -> go.Figure:
    """A blank figure that says ``message`` (for an empty table), with no axes."""
    fig = go.Figure()
    fig.add_annotation(text=plain(message), showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color=OTHER_COLOR))
    fig.update_layout(height=height, xaxis_visible=False, yaxis_visible=False, plot_bgcolor="white",
                      paper_bgcolor="white", margin=dict(l=10, r=10, t=30, b=10))
    return fig


def samples_per_dataset(datasets: pd.DataFrame) -> go.Figure:
    """Stacked bars per dataset: readable samples coloured by role, skipped entries on top in grey.

    Args:
        datasets: one row per dataset with ``name``, ``role``, ``n_samples``, ``n_skipped``.

    Returns:
        One bar trace per role present (named after the role) plus a ``skipped`` trace; x is the
        dataset name, y a count of samples.
    """
    if datasets.empty:
        return empty_figure("no datasets registered")
    names = [plain(n) for n in datasets["name"]]
    fig = go.Figure()
    roles = [r for r in ROLE_COLORS if r in set(datasets["role"])]
    roles += sorted(set(datasets["role"]) - set(ROLE_COLORS))
    for role in roles:
        mask = (datasets["role"] == role).to_numpy()
        sub = datasets[mask]
        fig.add_bar(
            name=plain(role), x=[n for n, m in zip(names, mask, strict=True) if m], y=sub["n_samples"].tolist(),
            marker_color=ROLE_COLORS.get(role, OTHER_COLOR),
            hovertemplate="%{x}<br>%{y:,} readable samples<extra>" + plain(role) + "</extra>",
        )
    fig.add_bar(
        name="skipped", x=names, y=datasets["n_skipped"].tolist(), marker_color=SKIPPED_COLOR,
        marker_pattern_shape="/", hovertemplate="%{x}<br>%{y:,} skipped<extra></extra>",
    )
    fig.update_layout(barmode="stack")
    fig.update_xaxes(categoryorder="array", categoryarray=names, showgrid=False)
    totals = datasets["n_samples"] + datasets["n_skipped"]
    largest = float(totals.max())
    title = "Samples per dataset"
    if largest > 30 * max(float(totals[totals > 0].min()), 1.0):
        # A 20k-sample pool beside 300-sample benchmarks flattens the benchmarks to nothing on a linear axis.
        lo = float(totals[totals > 0].min())
        ticks = [m * 10**e for e in range(0, 12) for m in (1, 3) if lo / 3 <= m * 10**e <= largest * 3]
        fig.update_yaxes(type="log", tickformat=",d", tickvals=ticks)
        title += " (log scale)"
    else:
        fig.update_yaxes(**_count_ticks(largest))
    return _layout(fig, title=title, x_title="", y_title="samples", height=380)


def skip_reasons(issues: pd.DataFrame) -> go.Figure:
    """Horizontal bars: entries skipped or repaired, per reason, summed over datasets.

    Args:
        issues: rows with ``reason``, ``action`` (skipped | repaired), ``count`` (and ``dataset``).

    Returns:
        One bar trace per action present; y is the reason, x the number of entries.
    """
    if issues.empty:
        return empty_figure("nothing was skipped or repaired")
    totals = issues.groupby(["action", "reason"], as_index=False)["count"].sum()
    order = totals.groupby("reason")["count"].sum().sort_values().index.tolist()
    fig = go.Figure()
    known = list(ACTION_COLORS)
    for action in sorted(totals["action"].unique(), key=lambda a: (known.index(a) if a in known else len(known), a)):
        sub = totals[totals["action"] == action]
        fig.add_bar(
            name=plain(action), y=[plain(r) for r in sub["reason"]], x=sub["count"].tolist(), orientation="h",
            marker_color=ACTION_COLORS.get(action, OTHER_COLOR),
            hovertemplate="%{y}<br>%{x:,} entries<extra>" + plain(action) + "</extra>",
        )
    fig.update_layout(barmode="stack", showlegend=True)
    fig.update_yaxes(categoryorder="array", categoryarray=[plain(r) for r in order], showgrid=False)
    fig.update_xaxes(**_count_ticks(float(totals.groupby("reason")["count"].sum().max())))
    fig = _layout(fig, title="Skipped and repaired entries by reason", x_title="entries", y_title="",
                  height=max(380, 140 + 36 * len(order)))
    # A lone reason would otherwise fill the plot with one slab of colour.
    fig.update_layout(bargap=0.3 if len(order) > 3 else 0.65)
    return fig


def zeroshot_accuracy(results: pd.DataFrame, *, chance: float | None = None) -> go.Figure:
    """Grouped bars: zero-shot top-1 (%) per dataset, one trace per model, with a chance line.

    Args:
        results: rows with ``model``, ``dataset``, ``metric`` (only ``zeroshot_top1`` is drawn) and
            ``value`` (a fraction).
        chance: top-1 of guessing (1 / classes), drawn as a dotted line when given.
    """
    top1 = results[results["metric"] == "zeroshot_top1"]
    if top1.empty:
        return empty_figure("no zero-shot evaluation yet")
    fig = go.Figure()
    for i, (model, sub) in enumerate(top1.groupby("model", sort=True)):
        fig.add_bar(name=plain(model), x=[plain(d) for d in sub["dataset"]], y=(sub["value"] * 100).tolist(),
                    marker_color=MODEL_COLORS[i % len(MODEL_COLORS)],
                    hovertemplate="%{x}<br>top-1 %{y:.1f}%<extra>" + plain(model) + "</extra>")
    if chance is not None:
        fig.add_hline(y=chance * 100, line_dash="dot", line_color=OTHER_COLOR,
                      annotation_text=f"chance {chance:.1%}", annotation_position="top right")
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 100], ticksuffix="%")
    return _layout(fig, title="Zero-shot top-1 by benchmark", x_title="", y_title="top-1 accuracy", height=360)
