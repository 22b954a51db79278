"""core.evaluate.robustness against published numbers and brute-force loops.

Published values: Hendrycks & Dietterich (ICLR 2019) for CE / mCE of a torchvision ResNet-50, and
Michaelis et al. (2019) for Faster R-CNN R50-FPN mPC / rPC (see ../shared/ALGORITHMS.md).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.errors import ConfigError, DataError
from core.evaluate import robustness as R
from core.evaluate.robustness import (
    PROTOCOL_LABELS,
    PROTOCOLS,
    alexnet_clean_error,
    alexnet_errors,
    corruption_errors,
    headline,
    mce,
    mean_error,
    mpc,
    per_severity_table,
    relative_corruption_errors,
    relative_mce,
    rpc,
)
from core.reference import DATA_DIR

# The 15 test corruptions and AlexNet's mean errors over severities, typed from ALGORITHMS.md (not read
# from the code under test).
CORRUPTIONS = ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression"]
ALEXNET = [0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816, 0.826572, 0.819324,
           0.564592, 0.853204, 0.646056, 0.717840, 0.606500]
# torchvision ResNet-50: mean top-1 accuracy (%) over severities -> published CE (%).
RESNET50 = {
    "brightness": (68.02, 56.64), "contrast": (39.06, 71.43), "defocus_blur": (38.75, 74.71),
    "elastic_transform": (45.25, 84.75), "fog": (45.83, 66.11), "frost": (38.14, 74.84),
    "gaussian_noise": (29.29, 79.77), "glass_blur": (26.79, 88.61), "impulse_noise": (23.81, 82.58),
}
RESNET50_ROUNDED_CE = [80, 82, 83, 75, 89, 78, 80, 78, 75, 66, 57, 71, 85, 77, 77]


def long_table(errors: dict[str, list[float]] | dict[str, float], severities=(1, 2, 3, 4, 5)) -> pd.DataFrame:
    """corruption -> error per severity (a list) or one error for every severity."""
    rows = []
    for c, e in errors.items():
        per = e if isinstance(e, list) else [e] * len(severities)
        rows += [{"corruption": c, "severity": s, "error": v} for s, v in zip(severities, per, strict=True)]
    return pd.DataFrame(rows)


def random_grid(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    errors = np.random.default_rng(seed).uniform(0.05, 0.95, size=(15, 5))
    return long_table({c: errors[i].tolist() for i, c in enumerate(CORRUPTIONS)}), errors


# -- reference tables -----------------------------------------------------------------------------------
def test_alexnet_reference_numbers() -> None:
    alex = alexnet_errors()
    assert alex.index.tolist() == CORRUPTIONS
    np.testing.assert_allclose(alex.to_numpy(), ALEXNET)
    assert alexnet_clean_error() == pytest.approx(0.4348)
    header = (DATA_DIR / R.ALEXNET_CLEAN_FILE).read_text().splitlines()
    assert header[0].startswith("#") and any("robustness_metrics" in line for line in header if line.startswith("#"))


def test_protocols() -> None:
    assert PROTOCOLS == {"all": (1, 2, 3, 4, 5), "sev5": (5,)}
    assert PROTOCOL_LABELS["all"] == "all severities (Hendrycks / RobustBench)"
    assert PROTOCOL_LABELS["sev5"] == "severity 5 only (TTA benchmarks)"


# -- CE and mCE -------------------------------------------------------------------------------------------
def test_resnet50_ce_matches_the_published_values() -> None:
    df = long_table({c: 1 - acc / 100 for c, (acc, _) in RESNET50.items()})
    ce = corruption_errors(df)
    assert set(ce.index) == set(RESNET50)
    for c, (_, published) in RESNET50.items():
        assert ce[c] == pytest.approx(published, abs=0.02), c


def test_ce_uses_the_mean_over_severities() -> None:
    per_sev = [0.1, 0.2, 0.3, 0.4, 0.5]
    ce = corruption_errors(long_table({"fog": per_sev}))
    assert ce["fog"] == pytest.approx(100 * sum(per_sev) / (5 * 0.819324))


def test_mce_of_the_papers_rounded_resnet50_ces_is_76_9() -> None:
    # errors chosen so that each CE_c is the paper's rounded ResNet-50 value
    df = long_table({c: ce / 100 * a for c, ce, a in zip(CORRUPTIONS, RESNET50_ROUNDED_CE, ALEXNET, strict=True)})
    assert round(mce(df), 1) == 76.9
    np.testing.assert_allclose(corruption_errors(df).to_numpy(), RESNET50_ROUNDED_CE)


def test_alexnet_scores_100() -> None:
    df = long_table(dict(zip(CORRUPTIONS, ALEXNET, strict=True)))
    assert mce(df) == pytest.approx(100.0)
    assert relative_mce(df, 0.4348) == pytest.approx(100.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mce_against_a_brute_force_loop(seed: int) -> None:
    df, errors = random_grid(seed)
    expected = 0.0
    for i in range(15):
        total = 0.0
        for s in range(5):
            total += errors[i, s]
        expected += total / (5 * ALEXNET[i])
    expected = 100 * expected / 15
    shuffled = df.sample(frac=1.0, random_state=seed)  # row order must not matter
    assert mce(shuffled) == pytest.approx(expected, rel=1e-12)


def test_missing_cells_raise_and_partial_is_explicit() -> None:
    df, _ = random_grid()
    without_fog = df[df["corruption"] != "fog"]
    with pytest.raises(DataError, match=r"missing: fog \(all severities\)"):
        mce(without_fog)
    gap = df[~((df["corruption"] == "snow") & (df["severity"].isin([4, 5])))]
    with pytest.raises(DataError, match=r"snow \(severities 4, 5\)"):
        mce(gap)
    with pytest.raises(DataError, match="missing"):
        relative_mce(gap, 0.2)
    partial = mce(gap, allow_partial=True)
    assert partial.missing == {"snow": (4, 5)}
    assert partial.value == pytest.approx(corruption_errors(gap).drop("snow", errors="ignore").mean())
    assert "snow" not in corruption_errors(gap).index and len(corruption_errors(gap)) == 14


def test_holdout_corruptions_are_ignored_by_mce() -> None:
    df, _ = random_grid()
    extra = long_table({"spatter": 0.99, "saturate": 0.01})
    assert mce(pd.concat([df, extra])) == pytest.approx(mce(df))


@pytest.mark.parametrize("bad, match", [
    (pd.DataFrame({"corruption": ["fog"], "severity": [1]}), "missing error"),
    (long_table({"fog": 56.0}), r"fractions in \[0, 1\]"),
    (long_table({"fog": [0.1, 0.2, 0.3, 0.4, 0.5]}, severities=(0, 1, 2, 3, 4)), "severity must be 1-5"),
    (pd.concat([long_table({"fog": 0.5}), long_table({"fog": 0.4})]), "repeat"),
    (long_table({"fog": float("nan")}), "non-finite"),
    (pd.DataFrame(columns=["corruption", "severity", "error"]), "empty"),
])
def test_bad_tables_are_data_errors(bad: pd.DataFrame, match: str) -> None:
    with pytest.raises(DataError, match=match):
        corruption_errors(bad)


# -- relative mCE ------------------------------------------------------------------------------------------
def test_relative_ce_by_hand() -> None:
    # brightness: AlexNet mean 0.564592, AlexNet clean 0.4348 -> denominator 0.129792 per severity.
    # Errors 0.30, 0.32, 0.34, 0.36, 0.38 (mean 0.34), clean 0.25 -> numerator 5 x 0.09.
    df = long_table({"brightness": [0.30, 0.32, 0.34, 0.36, 0.38]})
    rel = relative_corruption_errors(df, 0.25)
    assert rel["brightness"] == pytest.approx(100 * 0.45 / (5 * 0.129792))
    assert rel["brightness"] == pytest.approx(69.34171597)


def test_relative_mce_by_hand_on_a_full_grid() -> None:
    # each corruption degrades by half of AlexNet's degradation over its own clean error -> 50 %
    clean = 0.2
    df = long_table({c: clean + 0.5 * (a - 0.4348) for c, a in zip(CORRUPTIONS, ALEXNET, strict=True)})
    assert relative_mce(df, clean) == pytest.approx(50.0)
    # the same errors with a worse clean error mean less degradation: (E - 0.3) vs (E - 0.2)
    expected = np.mean([100 * (0.5 * (a - 0.4348) - 0.1) / (a - 0.4348) for a in ALEXNET])
    assert relative_mce(df, 0.3) == pytest.approx(expected)


def test_relative_mce_rejects_a_percent_clean_error() -> None:
    df, _ = random_grid()
    with pytest.raises(ConfigError, match="fraction"):
        relative_mce(df, 23.9)


# -- severity-5 protocol, mean error, headline ----------------------------------------------------------------
def test_sev5_protocol_reports_the_mean_error_not_mce() -> None:
    df, errors = random_grid(4)
    assert mean_error(df, protocol="sev5") == pytest.approx(100 * errors[:, 4].mean())
    assert mean_error(df) == pytest.approx(100 * errors.mean())
    assert headline(df, protocol="sev5") == ("mean error", pytest.approx(100 * errors[:, 4].mean()))
    assert headline(df) == ("mCE", pytest.approx(mce(df)))
    with pytest.raises(ConfigError, match="mean_error"):
        corruption_errors(df, protocol="sev5")
    with pytest.raises(ConfigError, match="protocol must be one of all, sev5"):
        mean_error(df, protocol="sev4")


def test_sev5_only_table_is_complete_for_sev5_but_not_for_mce() -> None:
    df, errors = random_grid(5)
    sev5 = df[df["severity"] == 5]
    assert mean_error(sev5, protocol="sev5") == pytest.approx(100 * errors[:, 4].mean())
    with pytest.raises(DataError, match="severities 1, 2, 3, 4"):
        mce(sev5)
    with pytest.raises(DataError, match="missing"):
        mean_error(sev5[sev5["corruption"] != "fog"], protocol="sev5")


def test_per_severity_table() -> None:
    df, errors = random_grid(6)
    df = pd.concat([df, long_table({"spatter": 0.5}, severities=(2,)), long_table({"my_blur": 0.1}, severities=(1,))])
    grid = per_severity_table(df.sample(frac=1.0, random_state=0))
    assert grid.index.tolist() == [*CORRUPTIONS, "spatter", "my_blur"]
    assert grid.columns.tolist() == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(grid.loc[CORRUPTIONS].to_numpy(), 100 * errors)
    assert grid.loc["spatter", 2] == pytest.approx(50.0) and math.isnan(grid.loc["spatter", 1])
    assert per_severity_table(df, percent=False).loc["fog", 3] == pytest.approx(errors[9, 2])


# -- detection ------------------------------------------------------------------------------------------------
def ap_table(values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame([{"corruption": c, "severity": s + 1, "ap": values[i, s]}
                         for i, c in enumerate(CORRUPTIONS) for s in range(5)])


def test_mpc_against_a_brute_force_loop() -> None:
    values = np.random.default_rng(7).uniform(5, 40, size=(15, 5))
    expected = sum(sum(values[i, s] for s in range(5)) / 5 for i in range(15)) / 15
    assert mpc(ap_table(values)) == pytest.approx(expected)
    with pytest.raises(DataError, match="zoom_blur"):
        mpc(ap_table(values).query("corruption != 'zoom_blur'"))


@pytest.mark.parametrize("clean, mpc_value, published", [
    (36.3, 18.2, 50.2),   # COCO, AP@[.5:.95]
    (80.5, 48.6, 60.4),   # Pascal VOC, AP50
    (36.4, 12.2, 33.4),   # Cityscapes, AP@[.5:.95]
])
def test_rpc_reproduces_faster_rcnn_within_rounding(clean: float, mpc_value: float, published: float) -> None:
    # the published P and mPC are rounded to 0.1: the published rPC must lie in the range they allow
    low = rpc(mpc_value - 0.05, clean + 0.05)
    high = rpc(mpc_value + 0.05, clean - 0.05)
    assert low - 0.05 <= published <= high + 0.05
    assert rpc(mpc_value, clean) == pytest.approx(published, abs=0.15)


def test_rpc_of_a_computed_mpc_and_bad_inputs() -> None:
    values = np.full((15, 5), 18.2)
    assert rpc(mpc(ap_table(values)), 36.3) == pytest.approx(100 * 18.2 / 36.3)
    with pytest.raises(ConfigError, match="clean AP"):
        rpc(10.0, 0.0)
    with pytest.raises(DataError, match="negative"):
        mpc(ap_table(np.full((15, 5), -1.0)))
