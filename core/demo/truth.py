"""Ground truth of a pool, as pruning is judged against it: one category per sample.

The demo pool's index carries the generator's truth (``is_exact_dup``, ``is_near_dup``, ``is_junk``,
``caption_kind``; see :mod:`core.demo.pool`); any pool with those columns works the same way. A sample
falls in the first category that applies, in :data:`TRUTH_CATEGORIES` order, so each is counted once.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The categories, most specific first. ``bad caption`` = a generic or spam caption on a real image.
TRUTH_CATEGORIES = ("exact duplicate", "near duplicate", "junk", "wrong caption", "bad caption", "clean")
#: Columns whose presence makes a pool's ground truth usable.
TRUTH_COLUMNS = ("is_exact_dup", "is_near_dup", "is_junk", "caption_kind")


def has_truth(index: pd.DataFrame) -> bool:
    """Whether the index carries the ground-truth columns."""
    return all(c in index.columns for c in TRUTH_COLUMNS)


def truth_categories(index: pd.DataFrame) -> pd.Series:
    """(N,) categorical of :data:`TRUTH_CATEGORIES` per index row (aligned with ``index``)."""
    def flag(column: str) -> np.ndarray:
        return index[column].fillna(False).astype(bool).to_numpy()

    kind = index["caption_kind"].astype(object).fillna("correct").to_numpy()
    conditions = [flag("is_exact_dup"), flag("is_near_dup"), flag("is_junk"), kind == "wrong",
                  np.isin(kind, ["generic", "spam"])]
    values = np.select(conditions, list(TRUTH_CATEGORIES[:-1]), default=TRUTH_CATEGORIES[-1])
    return pd.Series(pd.Categorical(values, categories=list(TRUTH_CATEGORIES)), index=index.index, name="truth")


def kept_by_truth(categories: pd.Series, rows: np.ndarray, kept: np.ndarray) -> pd.DataFrame:
    """How a pruning treated each category.

    Args:
        categories: per dataset index row (from :func:`truth_categories`).
        rows: (n,) dataset index row of each pruning input row.
        kept: (n,) bool, whether the pruning kept that row.

    Returns:
        ``category, n, kept, removed, fraction_kept`` for every category present, in
        :data:`TRUTH_CATEGORIES` order.
    """
    cats = categories.to_numpy()[np.asarray(rows, dtype=np.int64)]
    df = pd.DataFrame({"category": pd.Categorical(cats, categories=list(TRUTH_CATEGORIES)),
                       "kept": np.asarray(kept, dtype=bool)})
    out = df.groupby("category", observed=True)["kept"].agg(n="size", kept="sum").reset_index()
    out["removed"] = out["n"] - out["kept"]
    out["fraction_kept"] = out["kept"] / out["n"]
    out["category"] = out["category"].astype(str)
    return out
