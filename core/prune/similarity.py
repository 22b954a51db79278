"""Train-test-similarity pruning: remove pool rows that are too close to the test benchmarks.

Ref: Mayilvahanan et al., "Does CLIP's generalization performance mainly stem from high train-test
similarity?", ICLR 2024 (brendel-group/clip-ood); ALGORITHMS.md "Train-test similarity".

The method reads a finished similarity analysis (:mod:`core.similarity_stage`, ``prunescope similarity``)
through the context's :attr:`~core.prune.base.PruneContext.similarity_source`: per context row and
benchmark, its max cosine to the benchmark's test samples (``max_sim``) and whether it is closer to some
test sample than that sample's nearest reference neighbour (``closer``). Over several benchmarks a row's
similarity is its largest ``max_sim`` and it is closer when it is closer for any of them. Modes:

- ``closer_than_reference`` (the paper's setting): remove every row closer than reference to some test
  sample (per-test-sample thresholds, computed by the analysis);
- ``most_similar``: remove the ``count`` rows most similar to the benchmarks (or all but ``keep_fraction``);
- ``near`` / ``far``: keep a split of ``count`` rows (or ``keep_fraction`` of them) nearest to / farthest
  from the benchmarks, as the paper's pool splits.

Rows the analysis did not cover (another pool, an invalid embedding) are never removed as similar; the
splits, which must rank every row they keep, remove them with the reason ``similarity:not_analysed``.
Ties go to the lower position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from core.errors import ConfigError, DataError
from core.prune.base import (
    PruneContext,
    Selection,
    budget,
    check_fraction,
    keep_fraction_param,
    register,
    register_reason,
    selection_from_mask,
)
from core.registry import ParamSpec

MODES = ("closer_than_reference", "most_similar", "near", "far")
CLOSER = register_reason("similarity:closer_than_reference",
                         "similarity {score:.4f} to a test sample, closer than that sample's reference neighbour")
MOST_SIMILAR = register_reason("similarity:most_similar", "similarity {score:.4f}, among the most similar to the test sets")
OUTSIDE = register_reason("similarity:outside_split", "similarity {score:.4f}, outside the split")
NOT_ANALYSED = register_reason("similarity:not_analysed", "not covered by the similarity analysis")


@dataclass(frozen=True)
class SimilarityTable:
    """One analysis aligned with a context's original rows.

    Attributes:
        analysis: the analysis id.
        benchmarks: the benchmark names (columns).
        max_sim: (n, B) float32 max cosine of each row to each benchmark's test samples; larger = nearer;
            NaN = the row is not in the analysis.
        closer: (n, B) bool, True when the row is closer than reference to some test sample of benchmark b.
    """

    analysis: str
    benchmarks: tuple[str, ...]
    max_sim: np.ndarray
    closer: np.ndarray

    def __post_init__(self) -> None:
        B = len(self.benchmarks)
        if B == 0 or self.max_sim.ndim != 2 or self.max_sim.shape[1] != B or self.closer.shape != self.max_sim.shape:
            raise DataError(f"a similarity table needs (n, {B}) max_sim and closer arrays; got "
                            f"{self.max_sim.shape} and {self.closer.shape}")

    def columns(self, benchmarks: str | None) -> list[int]:
        """Column indices of a comma list of benchmark names (None = all); ConfigError for unknown ones."""
        if benchmarks is None or not benchmarks.strip():
            return list(range(len(self.benchmarks)))
        names = [b.strip() for b in benchmarks.split(",") if b.strip()]
        unknown = [b for b in names if b not in self.benchmarks]
        if unknown:
            raise ConfigError(f"benchmark {', '.join(map(repr, unknown))} is not in analysis '{self.analysis}'; "
                              f"it has {', '.join(self.benchmarks)}")
        return [self.benchmarks.index(b) for b in dict.fromkeys(names)]


#: ``analysis id or None (= the default) -> SimilarityTable`` aligned with the context's rows.
SimilaritySource = Callable[[str | None], SimilarityTable]


def similarity_table(ctx: PruneContext, analysis: str | None) -> SimilarityTable:
    """The context's similarity table for ``analysis`` (None = the source's default), cached per context."""
    if ctx.similarity_source is None:
        raise DataError("this context has no train-test similarity analysis",
                        hint="run `prunescope similarity` on the clustering's embedding set first")
    key = f"similarity:{analysis or ''}"
    if key not in ctx.shared:
        table = ctx.similarity_source(analysis)
        if table.max_sim.shape[0] != ctx.n:
            raise DataError(f"similarity table has {table.max_sim.shape[0]} rows, the context {ctx.n}")
        ctx.shared[key] = ctx.shared[f"similarity:{table.analysis}"] = table
    found: SimilarityTable = ctx.shared[key]
    return found


def combined(table: SimilarityTable, columns: list[int], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(max_sim, closer)`` of ``rows`` over the chosen benchmarks: the largest similarity (NaN when the
    row is not analysed) and whether it is closer than reference for any of them."""
    sims = table.max_sim[rows][:, columns]
    analysed = ~np.isnan(sims).all(axis=1)
    best = np.full(len(rows), np.nan, np.float32)
    best[analysed] = np.nanmax(sims[analysed], axis=1)
    return best, table.closer[rows][:, columns].any(axis=1)


def closer_counts(ctx: PruneContext, analysis: str | None = None) -> dict[str, int]:
    """Active rows closer than reference per benchmark, plus ``"any benchmark (removed)"`` (what the paper's pruning removes)."""
    table = similarity_table(ctx, analysis)
    closer = table.closer[ctx.rows]
    counts = {b: int(closer[:, i].sum()) for i, b in enumerate(table.benchmarks)}
    return counts | {"any benchmark (removed)": int(closer.any(axis=1).sum())}


@register(
    "similarity",
    summary="remove pool rows close to the test benchmarks (closer than the reference set, the n most "
            "similar) or keep a near / far split",
    paper="Mayilvahanan et al., Does CLIP's generalization performance mainly stem from high train-test "
          "similarity? (ICLR 2024)",
    params=[
        ParamSpec("mode", "choice", "closer_than_reference", choices=MODES,
                  help="closer_than_reference = the paper's pruning; most_similar = remove the most similar "
                       "rows; near / far = keep the rows nearest to / farthest from the benchmarks"),
        ParamSpec("analysis", "str", None, help="similarity analysis id (default: the newest on this pool)"),
        ParamSpec("benchmarks", "str", None, help="comma list of benchmarks (default: all of the analysis)"),
        ParamSpec("count", "int", None, min=0,
                  help="most_similar: rows to remove; near / far: rows to keep"),
        keep_fraction_param(None, "instead of count, the fraction of the input to keep (most_similar, near, far)"),
    ],
)
def similarity_prune(ctx: PruneContext, *, mode: str, analysis: str | None, benchmarks: str | None,
                     count: int | None, keep_fraction: float | None) -> Selection:
    """Similarity pruning of the context's active rows (needs a similarity analysis; see the module)."""
    table = similarity_table(ctx, analysis)
    columns = table.columns(benchmarks)
    sims, closer = combined(table, columns, ctx.rows)
    resolved = {"analysis": table.analysis, "benchmarks": ",".join(table.benchmarks[c] for c in columns)}
    if mode == "closer_than_reference":
        if count is not None or keep_fraction is not None:
            raise ConfigError("mode closer_than_reference takes no count or keep_fraction (its thresholds are "
                              "the test samples' reference similarities)")
        sel = selection_from_mask(ctx, ~closer, reason_names=[CLOSER], score=sims)
        return replace(sel, params=resolved)
    n_keep = _kept_rows(mode, count, keep_fraction, ctx.n_active)
    analysed = ~np.isnan(sims)
    if mode == "most_similar":
        keep = _rank_keep(sims, analysed, ctx.n_active - n_keep, most=True, invert=True)
        reason = np.zeros(ctx.n_active, np.int16)
        names = [MOST_SIMILAR]
    else:
        if n_keep > int(analysed.sum()):
            raise DataError(f"a {mode} split of {n_keep} rows needs that many analysed rows; "
                            f"{int(analysed.sum())} of the {ctx.n_active} are in analysis '{table.analysis}'")
        keep = _rank_keep(sims, analysed, n_keep, most=mode == "near", invert=False)
        reason = (~analysed).astype(np.int16)
        names = [OUTSIDE, NOT_ANALYSED]
    sel = selection_from_mask(ctx, keep, reason_names=names, reason=reason, score=sims)
    return replace(sel, params=resolved | {"count": count, "keep_fraction": keep_fraction})


def _kept_rows(mode: str, count: int | None, keep_fraction: float | None, n: int) -> int:
    """Rows the mode keeps, from ``count`` (removed for most_similar, kept for splits) or ``keep_fraction``."""
    if (count is None) == (keep_fraction is None):
        raise ConfigError(f"mode {mode} needs exactly one of count and keep_fraction")
    if keep_fraction is not None:
        return budget(check_fraction("keep_fraction", keep_fraction), n)
    assert count is not None
    if count > n:
        raise ConfigError(f"count {count} exceeds the {n} rows this step sees")
    return n - count if mode == "most_similar" else count


def _rank_keep(sims: np.ndarray, analysed: np.ndarray, n_take: int, *, most: bool, invert: bool) -> np.ndarray:
    """(n,) bool mask of the ``n_take`` analysed rows of largest (``most``) or smallest similarity, ties by
    position; ``invert`` returns its complement (the rows NOT taken). Unanalysed rows are never taken."""
    pos = np.arange(len(sims))
    key = np.where(analysed, -sims if most else sims, np.inf)
    taken = np.lexsort((pos, key))[:n_take]
    taken = taken[analysed[taken]]
    mask = np.zeros(len(sims), dtype=bool)
    mask[taken] = True
    return ~mask if invert else mask
