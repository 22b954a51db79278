"""Workspace level: run a chain on a clustering, write and register its manifest, export it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.clustering import load_assignments
from core.embed import load_embeddings
from core.errors import AlreadyExists, ConfigError, DataError, UnknownName
from core.prune import PruneContext, select
from core.prune.manifest import (
    DATACOMP_UID_DTYPE,
    PruneConfig,
    datacomp_uids,
    export_manifest,
    list_prunings,
    load_manifest,
    run_pruning,
)


def test_run_pruning_writes_registers_and_exports(clustered_ws, tmp_path):
    ws, cid = clustered_ws
    cfg = PruneConfig(cid, [("semdedup", {"eps": 0.02}), ("dbp", {"keep_fraction": 0.6})], seed=1)
    info = run_pruning(ws, cfg, max_chunk_bytes=30 * 16 * 4)  # about one cluster per pass over the shards
    assignments = load_assignments(ws, cid)
    df = load_manifest(ws, info.id)
    assert df["id"].tolist() == assignments["id"].tolist() and info.n_in == len(df) == 75
    assert info.n_kept == df["kept"].sum() == round(0.6 * (75 - (df["step"] == 1).sum()))
    removed = df[~df["kept"]]
    assert removed["reason"].notna().all() and df.loc[df["kept"], ["reason", "step", "detail"]].isna().all().all()
    dups = removed[removed["step"] == 1]
    assert len(dups) >= 3 and set(dups["reason"]) == {"semdedup:duplicate"}
    assert dups["ref_id"].isin(df["id"]).all() and dups["detail"].str.contains("cos 0.9").all()
    assert set(removed.loc[removed["step"] == 2, "reason"]) == {"dbp:over_quota"}
    ids, X = load_embeddings(ws, "pool.synthetic.both", "image")  # the same on arrays: same duplicates
    X = np.asarray(X)[[{i: p for p, i in enumerate(ids)}[i] for i in assignments["id"]]]
    arrays = PruneContext.from_arrays(assignments["id"], assignments["cluster"], assignments["dist_to_centroid"],
                                      np.load(ws.root / "clusters" / cid / "centroids.npy"), X)
    assert set(arrays.ids[select(arrays, "semdedup", eps=0.02).removed]) == set(dups["id"])

    row = list_prunings(ws).iloc[0]
    assert row["id"] == info.id and row["methods"] == "semdedup>dbp" and row["n_kept"] == info.n_kept
    assert json.loads(row["config_json"])["chain"][1] == ["dbp", {"keep_fraction": 0.6, "tau": 0.5, "balance": 0.5,
                                                                   "order": "hard", "n_neighbors": 20}]
    meta = json.loads((ws.root / "manifests" / f"{info.id}.json").read_text())
    assert meta["removed_by_step"] == [len(dups), int((removed["step"] == 2).sum())] and "git_rev" in meta

    kept = df.loc[df["kept"], "id"].tolist()
    sub = np.load(export_manifest(ws, info.id, "datacomp", tmp_path / "subset.npy"))
    assert sub.dtype == np.dtype("u8,u8") == DATACOMP_UID_DTYPE and len(sub) == len(kept)
    assert (np.sort(sub) == sub).all()
    assert {f"{a:016x}{b:016x}" for a, b in sub.tolist()} == set(kept)
    for fmt in ("ids", "wds_keys"):
        assert export_manifest(ws, info.id, fmt, tmp_path / f"{fmt}.txt").read_text().split() == kept
    with pytest.raises(ConfigError, match="export format"):
        export_manifest(ws, info.id, "csv", tmp_path / "x.csv")

    again = run_pruning(ws, cfg)  # reused
    assert again.selection is None and again.n_kept == info.n_kept
    with pytest.raises(AlreadyExists):
        run_pruning(ws, PruneConfig(cid, ["random"], pruning_id=info.id))
    with pytest.raises(UnknownName, match="pruning 'nope' not found"):
        load_manifest(ws, "nope")


def test_clip_scores_come_from_the_caption_embeddings(clustered_ws):
    ws, cid = clustered_ws
    ctx = PruneContext.from_clustering(ws, cid)
    ids_img, img = load_embeddings(ws, "pool.synthetic.both", "image")
    ids_txt, txt = load_embeddings(ws, "pool.synthetic.both", "text")
    assert list(ids_img) == list(ids_txt)
    img, txt = np.asarray(img, np.float32), np.asarray(txt, np.float32)
    want = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    pos = {i: p for p, i in enumerate(ids_img)}
    got = ctx.clip_scores()
    assert np.allclose(got, want[[pos[i] for i in ctx.ids]], atol=1e-5)
    sel = select(ctx, "clip_score", keep_fraction=0.5)
    assert len(sel.kept) == round(0.5 * ctx.n)


def test_config_validation_and_datacomp_uid_check():
    with pytest.raises(UnknownName):
        PruneConfig("c1", ["semdup"])
    with pytest.raises(ConfigError, match="eps"):
        PruneConfig("c1", [("semdedup", {"eps": -1})])
    cfg = PruneConfig("c1", ["semdedup", ("dbp", {"keep_fraction": 0.3})])
    assert cfg.chain[0][1]["eps"] == 0.05 and cfg.id.startswith("c1.semdedup-dbp.")
    with pytest.raises(DataError, match="not a DataComp uid"):
        datacomp_uids(["r0001"])
    uid = "0123456789abcdef" + "fedcba9876543210"
    assert datacomp_uids([uid]).tolist() == [(0x0123456789ABCDEF, 0xFEDCBA9876543210)]


def test_device_setting_runs_and_a_bad_device_fails_before_any_work(clustered_ws):
    ws, cid = clustered_ws
    cfg = PruneConfig(clustering_id=cid, chain=[("semdedup", {"eps": 0.05})], pruning_id="on-cpu")
    on_cpu = run_pruning(ws, cfg, device="cpu")
    auto = run_pruning(ws, PruneConfig(clustering_id=cid, chain=[("semdedup", {"eps": 0.05})], pruning_id="auto"),
                       device="auto")
    assert on_cpu.n_kept == auto.n_kept and (on_cpu.selection.kept == auto.selection.kept).all()
    with pytest.raises(ConfigError, match="unknown device"):
        run_pruning(ws, PruneConfig(clustering_id=cid, chain=["random"], pruning_id="never"), device="tpu")
    assert not ws.dir("manifests", "never.parquet").exists()
    assert ws.catalog.query("SELECT count(*) AS n FROM prunings WHERE id = 'never'")["n"].item() == 0
