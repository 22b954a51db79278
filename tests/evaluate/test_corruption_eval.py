"""The corruption grid: per-domain errors equal a brute-force loop, catalog rows, not-applicable methods,
resume, and a corrupted tree on disk used as is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from core.errors import ConfigError, DataError, MissingFileError


@pytest.fixture(scope="module")
def grid_ws(tmp_path_factory):
    """A 3-class image folder (12 images of 40 px per class) and a random resnet-demo checkpoint."""
    from core.classifiers import build_classifier, save_classifier
    from core.datasets import register_dataset
    from core.workspace import Workspace

    root = tmp_path_factory.mktemp("grid")
    rng = np.random.default_rng(0)
    colours = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}
    for name, rgb in colours.items():
        for j in range(12):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, size=(40, 40, 3)), 0, 255).astype(np.uint8)
            (root / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / "src" / name / f"{name}_{j}.png")
    ws = Workspace(root / "ws")
    register_dataset(ws, "shapes", "image_folder", root / "src", role="benchmark")
    torch.manual_seed(0)
    model = build_classifier("resnet-demo", 3, classes=list(colours), image_size=32)
    save_classifier(model, ws.root / "models" / "demo.pt")
    return ws


def _config(**kw):
    from core.evaluate.corruption import CorruptionEvalConfig

    base = dict(dataset="shapes", models=("demo=models/demo.pt",), corruptions=("gaussian_noise", "fog"),
                severities=(1, 5), adaptations=("none", "bn"), batch_size=8, seed=3)
    return CorruptionEvalConfig(**(base | kw))


def _brute_error(ws, corruption: str, severity: int, seed: int, adaptation: str) -> float:
    """Corrupt every image with the view, transform, run the model batch by batch in the same order."""
    from core.adapt import create_adapter
    from core.classifiers import load_classifier
    from core.corrupt import CorruptedView
    from core.datasets import open_dataset
    from core.evaluate.corruption import _tensor, domain_seed

    ds = open_dataset(ws, "shapes")
    model = load_classifier(ws.root / "models" / "demo.pt")
    if corruption == "clean":
        images = [np.asarray(ds.load_image(r).convert("RGB")) for r in ds.index.to_dict("records")]
    else:
        images = [img for _, img in CorruptedView(ds, corruption, severity, seed=seed)]
    labels = torch.as_tensor(ds.index["label"].astype(int).to_numpy())
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(domain_seed(seed, (corruption, severity))))
    X, y = _tensor(images, 32, 1.0, False)[order], labels[order]
    adapter = create_adapter(adaptation, model)
    wrong = 0
    for i in range(0, len(X), 8):
        wrong += int((adapter.predict_and_adapt(X[i:i + 8]).argmax(1) != y[i:i + 8]).sum())
    return wrong / len(X)


def test_grid_equals_brute_force_and_is_stored(grid_ws):
    from core.evaluate.corruption import evaluate_corruptions

    results = evaluate_corruptions(grid_ws, _config())
    assert len(results) == 2 * (1 + 2 * 2)  # 2 methods x (clean + 4 domains)
    for row in results.itertuples():
        want = _brute_error(grid_ws, row.corruption, row.severity, 3, row.adaptation)
        assert row.error == pytest.approx(want), (row.corruption, row.severity, row.adaptation)
        assert row.n == 36
    metrics = grid_ws.catalog.query("SELECT * FROM metrics WHERE metric = 'error' AND model = 'demo'")
    assert len(metrics) == len(results)
    clean = metrics[metrics["corruption"].isna()]
    assert set(clean["severity"]) == {0} and (clean["value"] <= 100).all()
    run = grid_ws.catalog.query("SELECT status FROM runs WHERE kind = 'eval-corruptions'")
    assert run["status"].tolist() == ["done"]


def test_resume_keeps_finished_cells_and_fills_the_rest(grid_ws):
    from core.evaluate.corruption import evaluate_corruptions, load_results

    first = evaluate_corruptions(grid_ws, _config(adaptations=("none",)))
    run_id = grid_ws.catalog.query("SELECT id FROM runs WHERE kind = 'eval-corruptions' ORDER BY started_at DESC "
                                   "LIMIT 1")["id"].iloc[0]
    path = grid_ws.dir("runs", run_id, "results.parquet")
    import pandas as pd

    pd.read_parquet(path).iloc[:2].to_parquet(path)  # a crash after two cells
    resumed = evaluate_corruptions(grid_ws, _config(adaptations=("none",), run_id=run_id))
    key = ["model", "adaptation", "corruption", "severity"]
    assert resumed.sort_values(key).reset_index(drop=True)[key + ["error"]].equals(
        first.sort_values(key).reset_index(drop=True)[key + ["error"]])
    assert len(load_results(grid_ws, run_id)) == len(first)


def test_methods_needing_bn_are_not_applicable_to_a_model_without_it(grid_ws, monkeypatch):
    from core.evaluate import corruption as grid

    real = grid.load_eval_model

    def no_bn(ws, item, classnames, device):
        m = real(ws, item, classnames, device)
        m.module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(len(classnames)))
        m.module(torch.zeros(1, 3, 32, 32))
        return m

    monkeypatch.setattr(grid, "load_eval_model", no_bn)
    results = grid.evaluate_corruptions(grid_ws, _config(corruptions=("fog",), severities=(2,), adaptations=("none", "tent")))
    assert set(results["adaptation"]) == {"none"}
    na = grid_ws.catalog.query("SELECT adaptation FROM metrics WHERE metric = 'not_applicable'")
    assert "tent" in set(na["adaptation"])


def test_a_corrupted_tree_on_disk_is_used_as_is(grid_ws, tmp_path):
    from core.corrupt import write_imagenet_c
    from core.datasets import register_dataset
    from core.evaluate.corruption import evaluate_corruptions

    write_imagenet_c("shapes", tmp_path / "shapes-c", ws=grid_ws, corruptions=("fog",), severities=(3,), seed=3)
    register_dataset(grid_ws, "shapes_c", "imagenet_c", tmp_path / "shapes-c", role="benchmark")
    results = evaluate_corruptions(grid_ws, _config(dataset="shapes_c", corruptions=("fog",), severities=(3,),
                                                    adaptations=("none",), clean_dataset="shapes"))
    assert set(zip(results["corruption"], results["severity"], strict=True)) == {("clean", 0), ("fog", 3)}
    assert (results["n"] == 36).all()
    with pytest.raises(DataError, match="lacks"):
        evaluate_corruptions(grid_ws, _config(dataset="shapes_c", corruptions=("snow",), severities=(3,)))


def test_summaries_need_the_full_grid():
    import pandas as pd

    from core.corrupt import TEST_CORRUPTIONS
    from core.evaluate.corruption import summaries
    from core.evaluate.robustness import alexnet_errors

    alex = alexnet_errors()
    rows = [{"model": "m", "adaptation": "none", "corruption": c, "severity": s, "error": float(alex[c])}
            for c in TEST_CORRUPTIONS for s in range(1, 6)]
    rows.append({"model": "m", "adaptation": "none", "corruption": "clean", "severity": 0, "error": 0.4348})
    out = summaries(pd.DataFrame(rows)).set_index("metric")["value"]
    assert out["mCE"] == pytest.approx(100.0) and out["relative_mCE"] == pytest.approx(100.0)
    assert set(summaries(pd.DataFrame(rows[5:]))["metric"]) == {"mean_error_sev5"} or "mCE" not in set(
        summaries(pd.DataFrame(rows[5:]))["metric"])


@pytest.mark.parametrize(("kw", "exc", "match"), [
    ({"models": ()}, ConfigError, "at least one model"),
    ({"severities": (6,)}, ConfigError, "severity"),
    ({"corruptions": ("fogg",)}, Exception, "fog"),
    ({"adaptations": ("tentt",)}, Exception, "tent"),
    ({"adapt_params": {"tent": {"lr": 1e-3}}}, ConfigError, "not in the grid"),
    ({"setting": "online"}, ConfigError, "reset, continual"),
    ({"batch_size": 0}, ConfigError, "batch_size"),
])
def test_bad_configs(kw, exc, match):
    with pytest.raises(exc, match=match):
        _config(**kw)


def test_missing_checkpoint_is_named(grid_ws):
    from core.evaluate.corruption import evaluate_corruptions

    with pytest.raises(MissingFileError, match="nope.pt"):
        evaluate_corruptions(grid_ws, _config(models=("nope.pt",)))


def test_selection_uses_only_the_holdout_corruptions_and_records_the_choice(grid_ws):
    from core.corrupt import HOLDOUT_CORRUPTIONS
    from core.evaluate.corruption import select_hyperparameter

    base = _config(adaptations=("tent",), severities=(5,), clean=False, limit=12)
    chosen, table = select_hyperparameter(grid_ws, base, "tent", "lr", [1e-4, 0.5])
    assert chosen == table.loc[table["mean_error"].idxmin(), "value"]
    runs = grid_ws.catalog.query("SELECT id FROM runs WHERE kind = 'eval-corruptions' ORDER BY started_at DESC LIMIT 2")
    for run_id in runs["id"]:
        cells = grid_ws.catalog.query("SELECT DISTINCT corruption FROM metrics WHERE run_id = ? AND metric = 'error'",
                                      [run_id])
        assert set(cells["corruption"]) == set(HOLDOUT_CORRUPTIONS)
    sel = grid_ws.catalog.query("SELECT value FROM metrics WHERE metric = 'selected:lr'")
    assert sel["value"].tolist() == [chosen]
