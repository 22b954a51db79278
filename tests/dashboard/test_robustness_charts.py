"""dashboard.robustness_charts: the Robustness page's pure chart builders, tested without Streamlit."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from dashboard import robustness_charts as rc

HEADLINES = pd.DataFrame({
    "run_id": ["r1", "r1", "r1", "r2", "r2", "r0"],
    "started_at": pd.to_datetime(["2025-01-02"] * 3 + ["2025-01-03"] * 2 + ["2025-01-01"]),
    "model": ["resnet", "resnet", "resnet", "clip", "clip", "resnet"],
    "adaptation": ["none", "bn", "tent", "none", "tent", "bn"],
    "value": [80.0, 65.0, 60.5, 70.0, 72.0, 99.0],
    "partial": [False, False, True, False, False, False],
    "missing": ["", "", "fog (1, 2, 3, 4, 5)", "", "", ""],
})
PUBLISHED = pd.DataFrame({
    "source": ["schneider2020", "schneider2020", "rusak2020"],
    "model": ["ResNet-50", "ResNet-50", "ResNet-50 vanilla"],
    "dataset": ["imagenet-c"] * 3,
    "adaptation": ["none", "bn_full", "none"],
    "value": [76.7, 62.2, 76.7],
})


def grid(values: np.ndarray, corruptions: list[str]) -> pd.DataFrame:
    out = pd.DataFrame(values, index=pd.Index(corruptions, name="corruption"), columns=[1, 2, 3, 4, 5])
    out.columns.name = "severity"
    return out


def test_module_does_not_import_streamlit():
    code = "import sys, dashboard.robustness_charts; print('streamlit' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_latest_keeps_the_newest_run_per_model_and_adaptation():
    best = rc.latest(HEADLINES)
    assert len(best) == 5
    assert best.set_index(["model", "adaptation"]).loc[("resnet", "bn"), "run_id"] == "r1"


def test_gain_is_source_minus_method():
    gains = rc.gain_table(HEADLINES).set_index(["model", "adaptation"])
    assert gains.loc[("resnet", "bn"), "gain"] == pytest.approx(80.0 - 65.0)
    assert gains.loc[("resnet", "tent"), "gain"] == pytest.approx(80.0 - 60.5)
    assert gains.loc[("clip", "tent"), "gain"] == pytest.approx(70.0 - 72.0)  # negative: the method hurts
    assert bool(gains.loc[("resnet", "tent"), "partial"]) and not bool(gains.loc[("resnet", "bn"), "partial"])
    assert "none" not in gains.index.get_level_values("adaptation")


def test_gain_needs_a_source_model():
    assert rc.gain_table(HEADLINES[HEADLINES["adaptation"] != "none"]).empty
    fig = rc.gain_bars(rc.gain_table(HEADLINES.iloc[0:0]), unit="mCE points")
    assert not fig.data and "--adapt none" in fig.layout.annotations[0].text


def test_gain_bars_have_one_trace_per_method_with_the_gains():
    fig = rc.gain_bars(rc.gain_table(HEADLINES), unit="mCE points")
    assert [t.name for t in fig.data] == ["bn", "tent"]
    tent = fig.data[1]
    assert list(tent.x) == ["resnet", "clip"] and list(tent.y) == pytest.approx([19.5, -2.0])
    assert "partial" in tent.text[0] and tent.marker.pattern.shape[0] == rc.PARTIAL_PATTERN
    assert fig.layout.yaxis.title.text == "mCE points"


def test_headline_bars_group_by_adaptation_and_mark_partial():
    fig = rc.headline_bars(rc.latest(HEADLINES), metric="mCE (%)")
    assert [t.name for t in fig.data] == ["none", "bn", "tent"]
    by = {t.name: t for t in fig.data}
    assert list(by["none"].x) == ["resnet", "clip"] and list(by["none"].y) == [80.0, 70.0]
    assert by["tent"].y[0] == 60.5 and "partial" in by["tent"].text[0]
    assert by["tent"].marker.pattern.shape[0] == rc.PARTIAL_PATTERN and by["none"].marker.pattern.shape[0] == ""
    assert np.isnan(by["bn"].y[1])  # clip has no bn grid: a gap, not a zero
    assert by["bn"].marker.color == rc.ADAPTATION_COLORS["bn"]
    assert fig.layout.barmode == "group"


def test_published_bars_are_separate_and_labelled_published():
    fig = rc.headline_bars(rc.latest(HEADLINES), PUBLISHED, metric="mCE (%)")
    ours = [t for t in fig.data if not t.name.startswith("published")]
    published = [t for t in fig.data if t.name.startswith("published")]
    assert [t.name for t in published] == ["published, schneider2020", "published, rusak2020"]
    assert {t.xaxis for t in ours} == {"x"} and {t.xaxis for t in published} == {"x2"}  # own panel
    assert list(published[0].y) == [76.7, 62.2] and list(published[0].x) == ["ResNet-50", "ResNet-50<br>bn_full"]
    assert all(t.marker.pattern.shape for t in published)  # hatched
    assert not any(t.marker.pattern.shape == "" for t in published)
    assert "published" in " ".join(a.text for a in fig.layout.annotations)


def test_published_mce_keeps_only_summary_mce_rows():
    reference = pd.DataFrame({
        "source": ["a", "a", "b"], "model": ["m", "m", "m"], "dataset": ["imagenet-c"] * 3,
        "corruption": [None, "fog", None], "severity": [0, 0, 0], "adaptation": ["none"] * 3,
        "metric": ["mCE", "CE", "top1"], "value": [70.0, 66.0, 40.0]})
    assert rc.published_mce(reference)["value"].tolist() == [70.0]


def test_heatmap_z_is_the_grid_and_holdout_is_marked():
    names = ["gaussian_noise", "fog", "speckle_noise"]
    values = np.arange(15, dtype=float).reshape(3, 5) + 10
    values[1, 2] = np.nan
    fig = rc.error_heatmap(grid(values, names), title="Error, clean 20.0%", subtitle="m · none · r1",
                           zrange=(0.0, 100.0))
    heat = fig.data[0]
    np.testing.assert_array_equal(np.asarray(heat.z, float), values)
    assert list(heat.y) == ["gaussian_noise", "fog", "speckle_noise (hold-out)"]
    assert list(heat.x) == ["1", "2", "3", "4", "5"]
    assert (heat.zmin, heat.zmax) == (0.0, 100.0)
    assert "clean 20.0%" in fig.layout.title.text and "m · none · r1" in fig.layout.title.text
    assert fig.layout.yaxis.autorange == "reversed"
    assert [s.y0 for s in fig.layout.shapes] == [1.5]  # the line above the hold-out corruptions


def test_difference_is_b_minus_a_per_protocol():
    names = ["gaussian_noise", "fog", "saturate"]
    a = grid(np.full((3, 5), 40.0), names)
    b = grid(np.arange(15, dtype=float).reshape(3, 5) + 30, names[:2] + ["spatter"])
    diff = rc.difference_table(a, b, (1, 2, 3, 4, 5)).set_index("corruption")
    assert list(diff.index) == ["gaussian_noise", "fog", "spatter", "saturate"]
    assert diff.loc["gaussian_noise", "difference"] == pytest.approx(32.0 - 40.0)
    assert diff.loc["fog", "difference"] == pytest.approx(37.0 - 40.0)
    assert np.isnan(diff.loc["saturate", "difference"]) and bool(diff.loc["saturate", "hold_out"])
    sev5 = rc.difference_table(a, b, (5,)).set_index("corruption")
    assert sev5.loc["fog", "difference"] == pytest.approx(39.0 - 40.0)
    fig = rc.difference_bars(diff.reset_index(), what="mean error over severities 1-5")
    bars = fig.data[0]
    assert list(bars.y) == ["gaussian_noise", "fog"] and list(bars.x) == pytest.approx([-8.0, -3.0])
    assert bars.marker.color[0] == rc.KEPT_COLOR  # B better


def test_hostile_names_are_escaped():
    evil = "<script>alert(1)</script>"
    heads = HEADLINES.assign(model=[evil] * 3 + ["<b>x</b>"] * 2 + [evil], run_id="<img src=x>")
    fig = rc.headline_bars(rc.latest(heads), PUBLISHED.assign(source="<a href=x>s</a>"), metric="mCE (%)")
    text = fig.to_json()
    assert "<script>" not in text and "<b>x" not in text and "<a href" not in text
    assert "&lt;script&gt;" in text
    assert "<script>" not in rc.gain_bars(rc.gain_table(heads), unit="pts").to_json()
    heat = rc.error_heatmap(grid(np.ones((1, 5)), [evil]), title=evil, subtitle=evil)
    assert "<script>" not in heat.to_json()
    diff = rc.difference_bars(pd.DataFrame({"corruption": [evil], "difference": [1.0]}), what=evil)
    assert "<script>" not in diff.to_json()


@pytest.mark.parametrize("build", [
    lambda: rc.headline_bars(HEADLINES.iloc[0:0], metric="mCE (%)"),
    lambda: rc.gain_bars(rc.gain_table(HEADLINES.iloc[0:0]), unit="pts"),
    lambda: rc.error_heatmap(pd.DataFrame(), title="t"),
    lambda: rc.difference_bars(pd.DataFrame({"corruption": ["fog"], "difference": [np.nan]}), what="w"),
])
def test_empty_input_gives_a_message_not_an_error(build):
    fig = build()
    assert not fig.data and fig.layout.annotations[0].text


def test_wrap_breaks_long_labels_and_escapes_each_line():
    assert rc.wrap("resnet-demo vanilla") == "resnet-demo<br>vanilla"
    assert rc.wrap("<script>alert(1)</script>") == "&lt;script&gt;alert(<br>1)&lt;/script&gt;"
    long = rc.wrap("x" * 60)
    assert long.count("<br>") == 2 and long.endswith("…")
