"""Selecting by name and chaining methods (e.g. SemDeDup then DBP, as the DBP paper does).

Chain semantics: each step sees only the rows the previous step kept; every position stays relative
to the ORIGINAL context, and each removed row records the step that removed it. A step's
``keep_fraction`` is by default a fraction of ITS INPUT (``fraction_of="input"``, the DBP reference:
its ``--prune-ratio`` applies to the deduplicated pool); with ``fraction_of="pool"`` it is a fraction of
the chain's input, i.e. the step keeps ``round(keep_fraction * n_pool)`` rows, which must not exceed
what is left (ConfigError otherwise).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from core.errors import ConfigError
from core.prune.base import METHODS, PruneContext, Selection, budget, per_cluster_counts

FRACTION_OF = ("input", "pool")
Step = tuple[str, Mapping[str, Any]]


def select(ctx: PruneContext, method: str, **params: Any) -> Selection:
    """Run one registered method; unknown names raise UnknownName listing the available ones."""
    return METHODS.get(method)(ctx, **params)


def normalize_steps(steps: Sequence[Step | str]) -> list[tuple[str, dict[str, Any]]]:
    """``[("semdedup", {...}), "dbp"]`` -> ``[("semdedup", {...}), ("dbp", {})]``; checks the names."""
    out: list[tuple[str, dict[str, Any]]] = []
    for step in steps:
        name, params = (step, {}) if isinstance(step, str) else (step[0], dict(step[1] or {}))
        METHODS.entry(name)  # UnknownName early, before any work
        out.append((name, params))
    if not out:
        raise ConfigError("a pruning chain needs at least one step")
    return out


def run_chain(ctx: PruneContext, steps: Sequence[Step | str], *, fraction_of: str = "input") -> Selection:
    """Run the steps in order, each on the rows the previous one kept; one combined Selection.

    Args:
        ctx: the chain's input (its active rows are the "pool").
        steps: ``(method, params)`` pairs (a bare name means default parameters).
        fraction_of: ``input`` (keep_fraction of each step's own input) or ``pool`` (of the chain's input).

    Returns:
        Selection over ``ctx``: ``kept`` from the last step, ``removed`` from all steps with ``step``
        the 0-based step index, ``method`` the names joined by ``>``, ``chain`` the steps as run (their
        resolved parameters; keep fractions relative to each step's input), ``params`` the chain as
        given plus ``fraction_of``; ``per_cluster`` adds ``step<i>_removed`` and each step's own
        per-cluster columns as ``step<i>_<column>`` (i from 1).
    """
    if fraction_of not in FRACTION_OF:
        raise ConfigError(f"fraction_of must be one of {', '.join(FRACTION_OF)}; got {fraction_of!r}")
    plan = normalize_steps(steps)
    cur, results = ctx, []
    prefix: tuple[str, ...] = ()
    for i, (name, params) in enumerate(plan):
        step_params = _step_params(i, name, params, fraction_of, ctx.n_active, cur.n_active)
        prefix += (json.dumps([name, step_params], sort_keys=True, default=str),)
        sel, cur = _cached_step(ctx, prefix, cur, name, step_params)
        results.append(sel)
    return _combine(ctx, results, {"chain": [[n, p] for n, p in plan], "fraction_of": fraction_of})


#: Chain prefixes whose results a context keeps (each: a Selection and the subset its successor sees).
STEP_CACHE_SIZE = 6


def _cached_step(ctx: PruneContext, prefix: tuple[str, ...], cur: PruneContext, name: str,
                 params: dict[str, Any]) -> tuple[Selection, PruneContext]:
    """The step ending ``prefix`` and the context after it, reused when the same prefix ran on ``ctx``.

    A slider on the last step (DBP's keep_fraction, tau) then re-plans only that step: the earlier
    steps' Selections and subsets, with their cached plans (sorted groupings, DBP statistics), are
    kept on the chain's input context (least recently used first out).
    """
    cache: OrderedDict[tuple[str, ...], tuple[Selection, PruneContext]] = ctx.cache.setdefault(
        "chain_steps", OrderedDict())
    if prefix in cache:
        cache.move_to_end(prefix)
        return cache[prefix]
    sel = select(cur, name, **params)
    out = (sel, cur.subset(sel.kept))
    cache[prefix] = out
    while len(cache) > STEP_CACHE_SIZE:
        cache.popitem(last=False)
    return out


def _step_params(i: int, name: str, params: dict[str, Any], fraction_of: str, n_pool: int,
                 n_input: int) -> dict[str, Any]:
    """Params of step i with a pool-relative keep_fraction turned into a fraction of its input."""
    fraction = params.get("keep_fraction")
    if fraction_of == "input" or fraction is None or n_input == n_pool:
        return params
    target = budget(float(fraction), n_pool)
    if not 0 < target <= n_input:
        raise ConfigError(f"step {i + 1} ({name}): keep_fraction {fraction} of the pool is {target} rows, but "
                          f"{n_input} rows reach this step", hint="lower keep_fraction or use fraction_of='input'")
    return {**params, "keep_fraction": target / n_input}


def _combine(ctx: PruneContext, results: list[Selection], params: dict[str, Any]) -> Selection:
    names: list[str] = []
    for sel in results:
        names += [r for r in sel.reason_names if r not in names]
    codes = [np.array([names.index(r) for r in sel.reason_names], np.int16)[sel.reason] for sel in results]
    removed = np.concatenate([sel.removed for sel in results])
    order = np.argsort(removed, kind="stable")
    per_cluster = per_cluster_counts(ctx.labels, ctx.rows, results[-1].kept, ctx.k)
    for i, sel in enumerate(results, start=1):
        per_cluster[f"step{i}_removed"] = sel.per_cluster["removed"].to_numpy()
        for col in sel.per_cluster.columns.difference(["cluster", "size", "kept", "removed"], sort=False):
            per_cluster[f"step{i}_{col}"] = sel.per_cluster[col].to_numpy()
    steps = np.concatenate([np.full(len(sel.removed), i, np.int16) for i, sel in enumerate(results)])
    return Selection(
        kept=results[-1].kept, removed=removed[order], reason=np.concatenate(codes)[order],
        reason_names=tuple(names), score=np.concatenate([s.score for s in results])[order],
        ref=np.concatenate([s.ref for s in results])[order], step=steps[order], per_cluster=pd.DataFrame(per_cluster),
        method=">".join(s.method for s in results), params=params, chain=tuple((s.method, s.params) for s in results))
