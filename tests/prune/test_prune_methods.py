"""Every registered method honours the contract; the simple methods do what their papers say; bad input."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError, DataError, UnknownName
from core.prune import METHODS, PruneContext, Selection, select


def check_contract(sel: Selection, ctx: PruneContext, name: str) -> None:
    assert sel.kept.dtype == np.int64 and sel.removed.dtype == np.int64
    assert (np.diff(sel.kept) > 0).all() and (np.diff(sel.removed) > 0).all()
    both = np.concatenate([sel.kept, sel.removed])
    assert len(both) == ctx.n_active and (np.sort(both) == ctx.rows).all()  # a partition of the input
    assert len(sel.reason) == len(sel.score) == len(sel.ref) == len(sel.step) == len(sel.removed)
    assert ((sel.reason >= 0) & (sel.reason < len(sel.reason_names))).all()  # every removal has a reason
    assert all(r.split(":")[0] == name for r in sel.reason_names)
    assert all(d for d in sel.details(ctx.ids, ctx.labels))
    assert ((sel.ref == -1) | np.isin(sel.ref, ctx.rows)).all()
    pc = sel.per_cluster
    assert len(pc) == ctx.k and pc["size"].sum() == ctx.n_active and pc["kept"].sum() == len(sel.kept)
    assert (pc["kept"] + pc["removed"] == pc["size"]).all()
    assert sel.method == name and set(sel.params) == {p.name for p in METHODS.entry(name).params}
    assert sel.chain == ((name, sel.params),)


@pytest.mark.parametrize("name", METHODS.names())
def test_contract(planted, name):
    ctx = planted.context()
    check_contract(select(ctx, name), ctx, name)
    sub = ctx.subset(np.flatnonzero(planted.labels != 1)[::2])  # positions stay relative to the original rows
    sel = select(sub, name)
    check_contract(sel, sub, name)
    assert not np.isin(np.concatenate([sel.kept, sel.removed]), np.flatnonzero(planted.labels == 1)).any()


@pytest.mark.parametrize("name", METHODS.names())
def test_registry_metadata_renders_forms(name):
    entry = METHODS.entry(name)
    assert entry.summary and entry.paper and entry.params
    for spec in entry.params:
        assert spec.kind in {"int", "float", "choice", "bool", "str"} and spec.help


def test_unknown_method_lists_the_available_ones(planted):
    with pytest.raises(UnknownName, match="'semdup' not found.*did you mean 'semdedup'.*available: clip_score, dbp, "
                                          "random, semdedup, similarity, ssp"):
        select(planted.context(), "semdup")


@pytest.mark.parametrize(("name", "params", "match"), [
    ("random", {"keep_fraction": 0.0}, r"\(0, 1\]"),
    ("random", {"keep_fraction": 1.5}, "<= 1"),
    ("ssp", {"keep_fraction": -0.1}, ">= 0"),
    ("dbp", {"keep_fraction": float("nan")}, "must be a float"),
    ("semdedup", {"eps": -0.01}, ">= 0"),
    ("semdedup", {"mode": "transitive"}, "one of reference, one_per_group"),
    ("ssp", {"order": "hardest"}, "one of hard, easy, random"),
    ("ssp", {"fraction": 0.5}, "unknown parameter"),
    ("clip_score", {"threshold": 0.2, "keep_fraction": 0.5}, "not both"),
])
def test_bad_parameters_are_one_line_config_errors(planted, name, params, match):
    with pytest.raises(ConfigError, match=match) as exc:
        select(planted.context(), name, **params)
    assert "\n" not in exc.value.one_line()


def test_bad_inputs_are_data_errors(planted):
    p = planted
    cases = [
        lambda: PruneContext.from_arrays([], np.zeros(0, int), np.zeros(0), p.centroids),  # empty
        lambda: PruneContext.from_arrays(p.ids, p.labels + 1, p.dist, p.centroids),  # label k: k mismatch
        lambda: PruneContext.from_arrays(p.ids, p.labels, p.dist, p.centroids[:, :8], p.X),  # width mismatch
        lambda: PruneContext.from_arrays(p.ids, p.labels, np.full(len(p.ids), np.nan), p.centroids),
        lambda: PruneContext.from_arrays(np.zeros(len(p.ids)), p.labels, p.dist, p.centroids),  # duplicate ids
        lambda: select(PruneContext.from_arrays(p.ids, p.labels, p.dist, p.centroids), "semdedup"),  # no embeddings
        lambda: select(PruneContext.from_arrays(p.ids, p.labels, p.dist, p.centroids), "clip_score"),  # no captions
    ]
    for case in cases:
        with pytest.raises(DataError) as exc:
            case()
        assert "\n" not in exc.value.one_line()


def test_random_keeps_an_exact_seeded_count(planted):
    a = select(planted.context(seed=1), "random", keep_fraction=0.33)
    assert len(a.kept) == int(np.floor(0.33 * len(planted.ids) + 0.5))
    assert (select(planted.context(seed=1), "random", keep_fraction=0.33).kept == a.kept).all()
    assert not (select(planted.context(seed=2), "random", keep_fraction=0.33).kept == a.kept).all()


@pytest.mark.parametrize("order", ["hard", "easy"])
def test_ssp_keeps_the_hardest_or_easiest_globally(planted, order):
    sel = select(planted.context(), "ssp", keep_fraction=0.25, order=order)
    d = planted.dist
    if order == "hard":
        assert d[sel.kept].min() >= d[sel.removed].max()
    else:
        assert d[sel.kept].max() <= d[sel.removed].min()
    assert np.allclose(sel.score, d[sel.removed])


def test_clip_score_threshold_top_fraction_and_missing_captions(planted):
    ctx, clip = planted.context(), planted.clip
    by_thr = select(ctx, "clip_score", threshold=0.25)
    assert set(by_thr.kept.tolist()) == set(np.flatnonzero(clip >= 0.25).tolist())
    top = select(ctx, "clip_score")  # neither given: DataComp's top 30 %
    assert top.params == {"threshold": None, "keep_fraction": 0.3}
    assert len(top.kept) == round(0.3 * ctx.n) and np.nanmin(clip[top.kept]) >= np.nanmax(clip[top.removed])
    missing = np.flatnonzero(np.isnan(clip))
    for sel in (by_thr, top):
        assert set(missing) <= set(sel.removed.tolist())
        assert set(sel.reasons[np.isin(sel.removed, missing)]) == {"clip_score:no_caption"}
