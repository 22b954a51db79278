"""Corruption robustness metrics: CE, mCE, relative mCE, per-severity tables; mPC and rPC for detection.

Array/DataFrame in, numbers out; nothing here reads the catalog. A classification result is a long
table with columns ``corruption``, ``severity`` (1-5) and ``error`` (top-1 error as a fraction in
[0, 1], lower = better), one row per (corruption, severity). Every score in % is returned in %.

Two evaluation protocols (:data:`PROTOCOLS`):
- ``all``: severities 1-5, the ImageNet-C protocol of Hendrycks & Dietterich and RobustBench; its
  headline is the mCE, normalised by AlexNet.
- ``sev5``: severity 5 only, as test-time adaptation papers (Tent, EATA, ...) report. AlexNet's errors
  are published only as a mean over severities 1-5, so a CE normalised per severity does not exist for
  this protocol: its headline is the plain mean error over the 15 corruptions (:func:`mean_error`),
  and :func:`corruption_errors` / :func:`mce` refuse it rather than mix normalisers.

Refs: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations" (ICLR 2019); Michaelis et al., "Benchmarking Robustness in Object Detection: Autonomous
Driving when Winter is Coming" (2019).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple, overload

import numpy as np
import pandas as pd

from core.corrupt import ALL_CORRUPTIONS, SEVERITIES, TEST_CORRUPTIONS
from core.errors import ConfigError, DataError
from core.reference import read_table

log = logging.getLogger(__name__)

#: Severities each protocol averages over.
PROTOCOLS: dict[str, tuple[int, ...]] = {"all": (1, 2, 3, 4, 5), "sev5": (5,)}
PROTOCOL_LABELS: dict[str, str] = {
    "all": "all severities (Hendrycks / RobustBench)",
    "sev5": "severity 5 only (TTA benchmarks)",
}
ALEXNET_ERRORS_FILE = "alexnet_imagenet_c_errors.csv"
ALEXNET_CLEAN_FILE = "alexnet_clean_error.csv"


class Partial(NamedTuple):
    """A score over the corruptions that are complete, and what was missing.

    ``missing`` maps each left-out test corruption to its missing severities.
    """

    value: float
    missing: dict[str, tuple[int, ...]]


# -- reference numbers ---------------------------------------------------------------------------------
def alexnet_errors() -> pd.Series:
    """AlexNet's ImageNet-C top-1 error per test corruption, averaged over severities 1-5 (fractions).

    Returns:
        (15,) indexed by corruption in :data:`TEST_CORRUPTIONS` order. Source: ``data/`` (see its header).
    """
    table = read_table(ALEXNET_ERRORS_FILE).set_index("corruption")["mean_error"].astype(float)
    missing = [c for c in TEST_CORRUPTIONS if c not in table.index]
    if missing:
        raise DataError(f"{ALEXNET_ERRORS_FILE} lacks {', '.join(missing)}")
    return table.reindex(list(TEST_CORRUPTIONS)).rename("alexnet_mean_error")


def alexnet_clean_error() -> float:
    """AlexNet's clean ImageNet top-1 error (fraction, 0.4348); the source is named in ``data/`` ."""
    table = read_table(ALEXNET_CLEAN_FILE)
    return float(table.loc[table["model"] == "alexnet", "top1_error"].iloc[0])


# -- input checks --------------------------------------------------------------------------------------
def check_protocol(protocol: str) -> tuple[int, ...]:
    """The protocol's severities; ConfigError naming the protocols otherwise."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    return PROTOCOLS[protocol]


def check_table(df: pd.DataFrame, value: str = "error", *, fraction: bool = True) -> pd.DataFrame:
    """``df[[corruption, severity, value]]`` validated: severity 1-5, finite values, one row per cell.

    Args:
        value: the value column.
        fraction: values must lie in [0, 1] (errors); else only >= 0 (e.g. AP in % or fractions).

    Raises:
        DataError: a missing column, a bad severity or value, or a repeated (corruption, severity).
    """
    cols = ["corruption", "severity", value]
    absent = [c for c in cols if c not in df.columns]
    if absent:
        raise DataError(f"results need columns {', '.join(cols)}; missing {', '.join(absent)}")
    out = df[cols].copy()
    if out.empty:
        raise DataError("the results table is empty")
    out["corruption"] = out["corruption"].astype(str)
    out["severity"] = _severities(out["severity"])
    out[value] = _values(out[value], value, fraction=fraction)
    dup = out.duplicated(["corruption", "severity"], keep=False)
    if dup.any():
        first = out[dup].iloc[0]
        raise DataError(f"{int(dup.sum())} rows repeat a (corruption, severity), e.g. "
                        f"({first['corruption']}, {first['severity']}); keep one model / run per table")
    return out


def _severities(col: pd.Series) -> pd.Series:
    values = pd.to_numeric(col, errors="coerce")
    bad = col[values.isna() | ~values.isin(SEVERITIES)]
    if len(bad):
        raise DataError(f"severity must be 1-5; got {bad.iloc[0]!r}")
    return values.astype(int)


def _values(col: pd.Series, name: str, *, fraction: bool) -> pd.Series:
    values = pd.to_numeric(col, errors="coerce").astype(float)
    if not np.isfinite(values).all():
        raise DataError(f"column '{name}' has missing or non-finite values")
    if values.min() < 0:
        raise DataError(f"column '{name}' has negative values (min {values.min():g})")
    if fraction and values.max() > 1:
        raise DataError(f"errors must be fractions in [0, 1]; got up to {values.max():g}",
                        hint="divide percentages by 100")
    return values


def missing_cells(df: pd.DataFrame, severities: Sequence[int] = SEVERITIES,
                  corruptions: Sequence[str] = TEST_CORRUPTIONS) -> dict[str, tuple[int, ...]]:
    """Each of ``corruptions`` lacking some of ``severities`` in a checked table -> the missing ones."""
    have = set(zip(df["corruption"], df["severity"], strict=True))
    out = {}
    for c in corruptions:
        gone = tuple(s for s in severities if (c, s) not in have)
        if gone:
            out[c] = gone
    return out


def _require_complete(missing: dict[str, tuple[int, ...]], what: str) -> None:
    if missing:
        parts = [f"{c} ({_describe(s)})" for c, s in missing.items()]
        raise DataError(f"{what} needs all 15 test corruptions at every severity; missing: {'; '.join(parts)}",
                        hint="evaluate the missing cells, or pass allow_partial=True for a partial mean")


def _describe(severities: tuple[int, ...]) -> str:
    return "all severities" if severities == SEVERITIES else f"severities {', '.join(map(str, severities))}"


def _mean_errors(df: pd.DataFrame, severities: Sequence[int]) -> pd.Series:
    """Mean error over ``severities`` per test corruption complete at all of them (TEST order)."""
    sub = df[df["severity"].isin(severities) & df["corruption"].isin(TEST_CORRUPTIONS)]
    missing = missing_cells(df, severities)
    means = sub.groupby("corruption")["error"].mean()
    extra = sorted(set(df["corruption"]) - set(TEST_CORRUPTIONS))
    if extra:
        log.debug("not in the 15 test corruptions (left out of the means): %s", ", ".join(extra))
    return means.reindex([c for c in TEST_CORRUPTIONS if c in means.index and c not in missing])


# -- classification: ImageNet-C ------------------------------------------------------------------------
def corruption_errors(df: pd.DataFrame, *, protocol: str = "all") -> pd.Series:
    """CE_c = sum_s E_{c,s} / sum_s E^AlexNet_{c,s} for each test corruption complete in ``df``, in %.

    AlexNet's errors are published as means over severities 1-5, so sum_s E^AlexNet_{c,s} = 5 x mean
    and CE_c = mean_s E_{c,s} / mean^AlexNet_c. Lower = more robust; AlexNet scores 100.
    Ref: Hendrycks & Dietterich (ICLR 2019), Sec. 3.

    Args:
        df: long table (corruption, severity, error fraction).
        protocol: must be ``all``; ``sev5`` raises ConfigError (no per-severity AlexNet normaliser:
            report :func:`mean_error` for it).

    Returns:
        CE in %, indexed by corruption (TEST order); corruptions lacking a severity and the 4 hold-out
        ones are left out (:func:`mce` checks completeness).
    """
    if check_protocol(protocol) != PROTOCOLS["all"]:
        raise ConfigError(f"CE and mCE are defined over severities 1-5 only; for protocol '{protocol}' "
                          "use mean_error() (AlexNet's per-severity errors are not published)")
    means = _mean_errors(check_table(df), SEVERITIES)
    return (100.0 * means / alexnet_errors().reindex(means.index)).rename("ce")


def relative_corruption_errors(df: pd.DataFrame, clean_error: float, *,
                               alexnet_clean: float | None = None) -> pd.Series:
    """Relative CE_c = sum_s (E_{c,s} - E_clean) / sum_s (E^AlexNet_{c,s} - E^AlexNet_clean), in %.

    How much of the clean-to-corrupted degradation remains, relative to AlexNet's (100 = AlexNet's
    degradation, lower = degrades less). Ref: Hendrycks & Dietterich (ICLR 2019), Sec. 3.

    Args:
        df: long table (corruption, severity, error fraction); severities 1-5.
        clean_error: this model's clean top-1 error (fraction).
        alexnet_clean: AlexNet's clean error; default :func:`alexnet_clean_error` (0.4348).

    Returns:
        Relative CE in %, indexed by corruption, for test corruptions complete at severities 1-5.
    """
    clean = _fraction(clean_error, "clean_error")
    base = alexnet_clean_error() if alexnet_clean is None else _fraction(alexnet_clean, "alexnet_clean")
    means = _mean_errors(check_table(df), SEVERITIES)
    alex = alexnet_errors().reindex(means.index)
    return (100.0 * (means - clean) / (alex - base)).rename("relative_ce")


@overload
def mce(df: pd.DataFrame, *, allow_partial: Literal[False] = ...) -> float: ...
@overload
def mce(df: pd.DataFrame, *, allow_partial: Literal[True]) -> Partial: ...
def mce(df: pd.DataFrame, *, allow_partial: bool = False) -> float | Partial:
    """Mean Corruption Error: the mean of CE_c over the 15 test corruptions, in % (AlexNet = 100).

    Raises DataError when a test corruption or one of its severities 1-5 is missing; with
    ``allow_partial=True`` returns :class:`Partial` (the mean over the complete ones, and what is
    missing) instead. Ref: Hendrycks & Dietterich (ICLR 2019); ResNet-50 scores 76.7.
    """
    missing = missing_cells(check_table(df))
    ce = corruption_errors(df)
    value = float(ce.mean()) if len(ce) else float("nan")
    return _finish(value, missing, "mCE", allow_partial)


@overload
def relative_mce(df: pd.DataFrame, clean_error: float, *, allow_partial: Literal[False] = ...) -> float: ...
@overload
def relative_mce(df: pd.DataFrame, clean_error: float, *, allow_partial: Literal[True]) -> Partial: ...
def relative_mce(df: pd.DataFrame, clean_error: float, *, allow_partial: bool = False) -> float | Partial:
    """Relative mCE: the mean of :func:`relative_corruption_errors` over the 15, in % (AlexNet = 100).

    ``clean_error`` is this model's clean top-1 error (fraction); AlexNet's is :func:`alexnet_clean_error`.
    Missing cells as in :func:`mce`. Ref: Hendrycks & Dietterich (ICLR 2019).
    """
    missing = missing_cells(check_table(df))
    rel = relative_corruption_errors(df, clean_error)
    value = float(rel.mean()) if len(rel) else float("nan")
    return _finish(value, missing, "relative mCE", allow_partial)


@overload
def mean_error(df: pd.DataFrame, *, protocol: str = ..., allow_partial: Literal[False] = ...) -> float: ...
@overload
def mean_error(df: pd.DataFrame, *, protocol: str = ..., allow_partial: Literal[True]) -> Partial: ...
def mean_error(df: pd.DataFrame, *, protocol: str = "all", allow_partial: bool = False) -> float | Partial:
    """Unnormalised mean top-1 error over the 15 test corruptions and the protocol's severities, in %.

    The headline of the ``sev5`` protocol (TTA papers' "mean error at severity 5"), and RobustBench's
    corruption accuracy (100 - this) under ``all``. Each corruption weighs the same. Missing cells as in
    :func:`mce`.
    """
    severities = check_protocol(protocol)
    table = check_table(df)
    missing = missing_cells(table, severities)
    means = _mean_errors(table, severities)
    value = 100.0 * float(means.mean()) if len(means) else float("nan")
    return _finish(value, missing, f"the mean error ({protocol})", allow_partial)


def headline(df: pd.DataFrame, *, protocol: str = "all") -> tuple[str, float]:
    """The number a protocol reports, named: ``("mCE", ...)`` for ``all``, ``("mean error", ...)`` for
    ``sev5`` (both in %, lower = better). Raises like :func:`mce` on missing cells."""
    if check_protocol(protocol) == PROTOCOLS["all"]:
        return "mCE", mce(df)
    return "mean error", mean_error(df, protocol=protocol)


def _finish(value: float, missing: dict[str, tuple[int, ...]], what: str, allow_partial: bool) -> float | Partial:
    if allow_partial:
        if missing:
            log.warning("%s over %d of 15 corruptions (missing: %s)", what, 15 - len(missing),
                        ", ".join(missing))
        return Partial(value, missing)
    _require_complete(missing, what)
    return value


def per_severity_table(df: pd.DataFrame, *, percent: bool = True) -> pd.DataFrame:
    """Error by corruption (rows) x severity (columns 1-5): the heat map of a corruption grid.

    Rows follow :data:`ALL_CORRUPTIONS` order, then other names alphabetically; missing cells are NaN.
    Values in % when ``percent`` (default), else fractions as given.
    """
    table = check_table(df)
    grid = table.pivot(index="corruption", columns="severity", values="error")
    known = [c for c in ALL_CORRUPTIONS if c in grid.index]
    order = known + sorted(set(grid.index) - set(known))
    grid = grid.reindex(index=order, columns=list(SEVERITIES))
    grid.columns.name = "severity"
    return grid * 100.0 if percent else grid


def _fraction(x: float, name: str) -> float:
    value = float(x)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a fraction in [0, 1]; got {x!r}")
    return value


# -- detection: Michaelis et al. 2019 --------------------------------------------------------------------
def mpc(ap_table: pd.DataFrame, *, value: str = "ap") -> float:
    """Mean Performance under Corruption: mPC = 1/15 sum_c 1/5 sum_s P_{c,s} over the 15 test corruptions.

    Args:
        ap_table: long table (corruption, severity, ``value``), one row per cell; AP in any unit (AP50 for
            Pascal VOC, AP@[.5:.95] for COCO and Cityscapes, as fraction or %), returned in the same unit.

    Raises:
        DataError: a test corruption or severity is missing (never a mean over fewer cells).

    Ref: Michaelis et al., Benchmarking Robustness in Object Detection (2019), Sec. 3.
    """
    table = check_table(ap_table, value, fraction=False)
    _require_complete(missing_cells(table), "mPC")
    sub = table[table["corruption"].isin(TEST_CORRUPTIONS)]
    return float(sub.groupby("corruption")[value].mean().mean())


def rpc(mpc_value: float, clean_ap: float) -> float:
    """Relative Performance under Corruption: rPC = mPC / P, in % (P = clean AP, same unit as mPC).

    Higher = more of the clean performance survives corruption. Ref: Michaelis et al. (2019); Faster
    R-CNN R50-FPN: COCO 18.2 / 36.3 -> 50.2 %.
    """
    p, m = float(clean_ap), float(mpc_value)
    if not np.isfinite(p) or p <= 0:
        raise ConfigError(f"clean AP must be positive; got {clean_ap!r}")
    if not np.isfinite(m) or m < 0:
        raise ConfigError(f"mPC must be a non-negative number; got {mpc_value!r}")
    return 100.0 * m / p
