"""Classifiers (registry, weights, saved models) and classifier training: a tiny labelled image folder,
resnet-demo for a few dozen steps on CPU, exact resume, noise on half the batch, manifests, bad inputs."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

import core.train.classifier as trainer
from core.classifiers import (
    CLASSIFIERS,
    build_classifier,
    classifier_spec,
    eval_transform,
    load_classifier,
    predict,
    save_classifier,
)
from core.errors import ConfigError, DataError, MissingFileError, UnknownName, WeightsUnavailable
from core.runs import read_progress
from core.sources.base import SKIP_REASONS
from core.train.classifier import TrainClassifierConfig, labelled_index, train_classifier

CLASSES = ("circle", "square", "triangle")
PER_CLASS = 20
CORRUPTED = "circle/circle_03.png"  # readable at registration, broken before training
TINY = {
    "batch_size": 8,
    "steps": 4,
    "lr": 0.05,
    "log_every": 1,
    "checkpoint_every": 2,
    "device": "cpu",
    "cpu_threads": 1,
}  # module fixtures run before the one-thread fixture; 2 threads on 2 busy cores crawl


@pytest.fixture(autouse=True)
def _one_thread():
    # Small convolutions gain nothing from a second thread and lose a lot when the two cores are shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- a tiny labelled dataset ---------------------------------------------------------------------------------
def make_shape(path: Path, label: int, seed: int, size: int = 32) -> None:
    """A class-coloured shape (circle, square or triangle by ``label``) of random size and place on a
    random light background."""
    rng = random.Random(seed)
    fg = [(200, 40, 40), (40, 90, 210), (30, 160, 60)][label]
    fg = tuple(min(255, max(0, c + rng.randint(-30, 30))) for c in fg)
    img = Image.new("RGB", (size, size), tuple(rng.randint(170, 255) for _ in range(3)))
    s = rng.randint(size // 2, size - 4)
    x0, y0 = rng.randint(0, size - s), rng.randint(0, size - s)
    box = [x0, y0, x0 + s - 1, y0 + s - 1]
    draw = ImageDraw.Draw(img)
    if label == 0:
        draw.ellipse(box, fill=fg)
    elif label == 1:
        draw.rectangle(box, fill=fg)
    else:
        draw.polygon([(x0 + s // 2, y0), (x0 + s - 1, y0 + s - 1), (x0, y0 + s - 1)], fill=fg)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@dataclass(frozen=True)
class ShapesWorkspace:
    ws: object
    root: Path
    ids: tuple[str, ...]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> ShapesWorkspace:
    """``shapes`` (3 classes x 20 images, one corrupted after registration), ``shapes_val`` (3 x 4, clean),
    ``two_shapes`` (2 classes). Tests add runs but never change the datasets."""
    from core.datasets import register_dataset
    from core.workspace import Workspace

    root = tmp_path_factory.mktemp("shapes")
    for c, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            make_shape(root / "train" / name / f"{name}_{i:02d}.png", c, 1000 * c + i)
        for i in range(4):
            make_shape(root / "val" / name / f"{name}_{i:02d}.png", c, 50_000 + 1000 * c + i)
            if c < 2:
                make_shape(root / "two" / name / f"{name}_{i:02d}.png", c, 90_000 + 1000 * c + i)
    ws = Workspace(root / "ws")
    register_dataset(ws, "shapes", "image_folder", root / "train")
    register_dataset(ws, "shapes_val", "image_folder", root / "val", role="benchmark")
    register_dataset(ws, "two_shapes", "image_folder", root / "two")
    (root / "train" / CORRUPTED).write_bytes(b"\x89PNG\r\n\x1a\n but the rest is gone")
    ids = tuple(labelled_index(ws, "shapes")[1]["id"].astype(str))
    return ShapesWorkspace(ws, root, ids)


def _cfg(**kw) -> TrainClassifierConfig:
    return TrainClassifierConfig(**{"dataset": "shapes", **TINY, **kw})


def _clean_images(sw: ShapesWorkspace, skip: str = CORRUPTED) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) readable training images in [0, 1] and their (N,) labels."""
    tf = eval_transform(32, 1.0)
    pairs = [
        (tf(Image.open(p).convert("RGB")), CLASSES.index(p.parent.name))
        for p in sorted((sw.root / "train").rglob("*.png"))
        if not str(p).endswith(skip)
    ]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def _final_state(run_dir: Path) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


# -- the registry and weights --------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", CLASSIFIERS.names())
def test_every_registered_classifier_builds_and_classifies(arch):
    spec = classifier_spec(arch)
    model = build_classifier(arch, 4, classes=["a", "b", "c", "d"]).eval()
    side = (
        64 if spec.image_size > 64 else spec.image_size
    )  # torchvision ResNets pool globally: any side works
    with torch.no_grad():
        logits = model(torch.rand(2, 3, side, side))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    meta = model.meta()
    assert meta["arch"] == arch and meta["num_classes"] == 4 and meta["image_size"] == spec.image_size
    assert meta["mean"] == pytest.approx(spec.mean) and meta["std"] == pytest.approx(spec.std)


def test_demo_resnet_is_narrow_with_batchnorm():
    model = build_classifier("resnet-demo", 10)
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n <= 500_000
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_unknown_names_and_bad_sizes_fail_loudly():
    with pytest.raises(
        UnknownName, match="classifier 'resnet-dmo' not found.*available: resnet-demo, resnet18"
    ):
        build_classifier("resnet-dmo", 3)
    with pytest.raises(ConfigError, match="num_classes"):
        build_classifier("resnet-demo", 0)
    with pytest.raises(ConfigError, match="class names"):
        build_classifier("resnet-demo", 3, classes=["a"])


def test_torchvision_weights_offline_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*_a, **_k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(WeightsUnavailable) as err:
        build_classifier("resnet18", 10, pretrained="IMAGENET1K_V1")
    text = str(err.value)
    assert "download.pytorch.org/models/resnet18-" in text and str(tmp_path / "torch") in text
    with pytest.raises(UnknownName, match="available: IMAGENET1K_V1, DEFAULT"):
        build_classifier("resnet18", 10, pretrained="IMAGENET1K_V9")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        build_classifier("resnet-demo", 10, pretrained="IMAGENET1K_V1")
    with pytest.raises(MissingFileError):
        build_classifier("resnet-demo", 10, pretrained=str(tmp_path / "missing.pt"))


def test_cached_torchvision_weights_load_and_the_head_is_replaced(tmp_path, monkeypatch):
    import torchvision

    from core.classifiers import torchvision_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _, cached = torchvision_weights_file("resnet18", "IMAGENET1K_V1")
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    cached.parent.mkdir(parents=True)
    torch.save(imagenet, cached)
    model = build_classifier("resnet18", 7, pretrained="IMAGENET1K_V1")
    own = model.backbone.state_dict()
    assert torch.equal(own["conv1.weight"], imagenet["conv1.weight"])
    assert torch.equal(own["layer4.1.bn2.running_var"], imagenet["layer4.1.bn2.running_var"])
    assert own["fc.weight"].shape == (7, 512)


def test_a_local_checkpoint_starts_another_classifier(tmp_path):
    torch.manual_seed(0)
    source = build_classifier("resnet-demo", 3, classes=list(CLASSES))
    path = save_classifier(source, tmp_path / "demo.pt")
    fine = build_classifier("resnet-demo", 5, pretrained=str(path))
    assert torch.equal(fine.backbone.stem[0].weight, source.backbone.stem[0].weight)
    assert fine.backbone.fc.weight.shape == (5, 64)
    same = build_classifier("resnet-demo", 3, pretrained=str(path))
    assert torch.equal(same.backbone.fc.weight, source.backbone.fc.weight)
    with pytest.raises(ConfigError, match="holds a resnet-demo classifier, not resnet18"):
        build_classifier("resnet18", 3, pretrained=str(path))
    torch.save({"conv9.weight": torch.zeros(3)}, tmp_path / "alien.pt")
    with pytest.raises(DataError, match="do not fit"):
        build_classifier("resnet-demo", 3, pretrained=str(tmp_path / "alien.pt"))


def test_saved_classifier_round_trips_with_identical_logits(tmp_path):
    torch.manual_seed(1)
    model = build_classifier("resnet-demo", 3, classes=list(CLASSES))
    model.train()(torch.rand(8, 3, 32, 32))  # move the BatchNorm running stats off their init
    path = save_classifier(model, tmp_path / "m.pt")
    loaded = load_classifier(path)
    x = torch.rand(5, 3, 32, 32)
    assert torch.equal(predict(model, x), predict(loaded, x))
    assert loaded.classes == list(CLASSES) and loaded.meta() == model.meta()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(DataError, match="not a prunescope classifier checkpoint"):
        load_classifier(tmp_path / "bare.pt")
    with pytest.raises(MissingFileError):
        load_classifier(tmp_path / "nope.pt")


# -- configuration -------------------------------------------------------------------------------------------
def test_config_is_validated_on_creation():
    with pytest.raises(UnknownName, match="available: resnet-demo"):
        TrainClassifierConfig(dataset="d", arch="vgg")
    with pytest.raises(ConfigError, match="optimizer must be one of sgd, adamw"):
        TrainClassifierConfig(dataset="d", optimizer="lion")
    with pytest.raises(ConfigError, match="noise kind"):
        TrainClassifierConfig(dataset="d", noise="pink")
    with pytest.raises(ConfigError, match="sigma"):
        TrainClassifierConfig(dataset="d", noise="ant", noise_sigma=0.5)
    with pytest.raises(ConfigError, match="clean_fraction"):
        TrainClassifierConfig(dataset="d", noise="gaussian", clean_fraction=2.0)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainClassifierConfig(dataset="d", batch_size=1)
    with pytest.raises(ConfigError, match="invalid dataset name"):
        TrainClassifierConfig(dataset="../etc")
    cfg = TrainClassifierConfig(dataset="d", noise="speckle", noise_sigma=0.2)
    assert TrainClassifierConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.noise_config().sigma_set == (0.2,)
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainClassifierConfig.from_dict({"dataset": "d", "lr_schedule": "cosine"})


# -- training ------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    result: trainer.ClassifierTrainResult
    state: trainer.TrainState


@pytest.fixture(scope="module")
def trained(shapes) -> Trained:
    """resnet-demo, 40 steps of 16 on the shapes (13 epochs: the corrupt image is read), with validation."""
    captured: list[trainer.TrainState] = []
    real = trainer.build_state

    def spy(*args, **kwargs):
        captured.append(real(*args, **kwargs))
        return captured[-1]

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer, "build_state", spy)
    try:
        result = train_classifier(
            shapes.ws,
            _cfg(steps=40, batch_size=16, log_every=5, checkpoint_every=20, val_dataset="shapes_val"),
        )
    finally:
        mp.undo()
    return Trained(result, captured[0])


def test_training_lowers_the_loss_and_beats_chance(trained, shapes):
    r = trained.result
    assert r.finished and r.steps == r.total_steps == 40 and len(r.loss_tail) == 40
    first, last = sum(r.loss_tail[:5]) / 5, sum(r.loss_tail[-5:]) / 5
    assert last < first - 0.2, (first, last)
    x, y = _clean_images(shapes)
    accuracy = float((predict(load_classifier(r.checkpoint), x).argmax(1) == y).float().mean())
    assert accuracy > 0.6, accuracy  # chance: 1/3
    assert r.val_accuracy is not None and 0 <= r.val_accuracy <= 1


def test_the_run_is_recorded(trained, shapes):
    r = trained.result
    run = shapes.ws.catalog.query("SELECT kind, status FROM runs WHERE id = ?", [r.run_id]).iloc[0]
    assert (run["kind"], run["status"]) == ("train-classifier", "done")
    params = json.loads((r.run_dir / "params.json").read_text())
    assert params["config"]["arch"] == "resnet-demo" and params["config"]["steps"] == 40
    progress = read_progress(r.run_dir)
    assert [p["step"] for p in progress] == list(range(5, 41, 5))
    assert all({"loss", "train_acc", "lr", "img_per_s"} <= set(p) for p in progress)
    metrics = shapes.ws.catalog.query(
        "SELECT dataset, metric, value FROM metrics WHERE run_id = ?", [r.run_id]
    )
    by_name = dict(zip(metrics.metric, metrics.value, strict=True))
    assert by_name["val_top1"] == pytest.approx(r.val_accuracy)
    assert metrics.set_index("metric").loc["val_top1", "dataset"] == "shapes_val"
    assert sorted(p.name for p in (r.run_dir / "checkpoints").iterdir()) == [
        "last.pt",
        "step-000020.pt",
        "step-000040.pt",
    ]


def test_a_corrupt_image_is_a_counted_skip(trained, shapes):
    skipped = trained.result.skipped
    reasons = {k: v for k, v in skipped.items() if k in SKIP_REASONS}
    assert reasons and sum(reasons.values()) >= 1, skipped
    data = json.loads((trained.result.run_dir / "data.json").read_text())
    assert data["skipped"] == skipped and data["n_samples"] == len(shapes.ids) == 3 * PER_CLASS


def test_checkpoint_reloads_with_identical_logits(trained, shapes):
    x, _ = _clean_images(shapes)
    loaded = load_classifier(trained.result.checkpoint)
    assert loaded.classes == list(CLASSES) and loaded.image_size == 32
    assert torch.equal(predict(trained.state.model, x), predict(loaded, x))


@pytest.mark.parametrize("noise", [{"noise": "gaussian"}, {"noise": "ant", "ant_snapshot_every": 2}])
def test_resume_reproduces_the_uninterrupted_weights(shapes, noise):
    cfg = _cfg(steps=7, checkpoint_every=3, **noise)
    full = train_classifier(shapes.ws, cfg)
    part = train_classifier(shapes.ws, cfg, stop_after_steps=4)
    assert not part.finished and part.steps == 4
    status = shapes.ws.catalog.query("SELECT status FROM runs WHERE id = ?", [part.run_id]).iloc[0, 0]
    assert status == "cancelled"
    done = train_classifier(shapes.ws, replace(cfg, run_id=part.run_id))
    assert done.finished and done.steps == 7 and done.run_id == part.run_id
    a, b = _final_state(full.run_dir), _final_state(done.run_dir)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    if noise["noise"] == "ant":
        assert len(a["adversary"]["pool"]) == 3  # snapshots at updates 2, 4, 6
        assert all(
            torch.equal(a["adversary"]["net"][k], b["adversary"]["net"][k]) for k in a["adversary"]["net"]
        )
    assert done.loss_tail == pytest.approx(full.loss_tail)
    # and it really learned something different from its start
    assert not torch.equal(
        a["state_dict"]["backbone.fc.weight"], build_classifier("resnet-demo", 3).backbone.fc.weight
    )


@pytest.mark.parametrize("kind", ["gaussian", "speckle", "ant", "none"])
def test_noise_is_applied_to_half_of_each_batch_before_normalisation(shapes, monkeypatch, kind):
    calls = []
    real = trainer.add_noise

    def spy(x, cfg, generator=None, adversary=None):
        out, mask = real(x, cfg, generator, adversary)
        calls.append(
            (
                cfg.kind,
                x.shape[0],
                int(mask.sum()),
                float(x.min()),
                float(x.max()),
                adversary is not None,
                torch.equal(out[~mask], x[~mask]),
            )
        )
        return out, mask

    monkeypatch.setattr(trainer, "add_noise", spy)
    result = train_classifier(shapes.ws, _cfg(steps=3, noise=kind))
    assert len(calls) == 3
    for got_kind, batch, noisy, lo, hi, has_adv, clean_same in calls:
        assert got_kind == kind and clean_same and has_adv == (kind == "ant")
        assert noisy == (0 if kind == "none" else batch - round(batch * 0.5))
        assert lo >= 0.0 and hi <= 1.0  # [0, 1] pixels: the model normalises after the noise
    progress = read_progress(result.run_dir)
    assert all((p["adv_loss"] is not None) == (kind == "ant") for p in progress)


def test_manifest_restricts_the_training_ids(shapes, monkeypatch, tmp_path):
    kept = [i for i in shapes.ids if int(i.rsplit("_", 1)[1][:2]) < 8]  # 8 per class
    manifest = tmp_path / "keep.parquet"
    pd.DataFrame({"id": list(shapes.ids), "kept": [i in kept for i in shapes.ids]}).to_parquet(manifest)
    read: list[str] = []
    real = trainer.LabelledImages.__getitem__

    def spy(self, key):
        read.append(str(self.rows[key[0]]["id"]))
        return real(self, key)

    monkeypatch.setattr(trainer.LabelledImages, "__getitem__", spy)
    result = train_classifier(shapes.ws, _cfg(steps=6, manifest=str(manifest)))
    assert result.n_samples == len(kept) == 24
    assert result.skipped["not_in_manifest"] == len(shapes.ids) - 24
    assert set(read) <= set(kept) and len(set(read)) >= 20


def test_bad_inputs_give_clear_errors(shapes, captioned, tmp_path):
    with pytest.raises(UnknownName, match="dataset 'nope' not found"):
        train_classifier(shapes.ws, _cfg(dataset="nope"))
    with pytest.raises(DataError, match="has no class labels"):
        train_classifier(captioned.ws, _cfg(dataset=captioned.dataset))
    with pytest.raises(DataError, match="cannot fill one batch of 64"):
        train_classifier(shapes.ws, _cfg(batch_size=64))
    with pytest.raises(DataError, match="other classes"):
        train_classifier(shapes.ws, _cfg(val_dataset="two_shapes"))
    alien = tmp_path / "alien.parquet"
    pd.DataFrame({"id": ["x/y.png"]}).to_parquet(alien)
    with pytest.raises(DataError, match="keeps none of the"):
        train_classifier(shapes.ws, _cfg(manifest=str(alien)))
    with pytest.raises(MissingFileError):
        train_classifier(shapes.ws, _cfg(manifest=str(tmp_path / "missing.parquet")))
    with pytest.raises(UnknownName, match="classifier training run 'r-0' not found"):
        train_classifier(shapes.ws, _cfg(run_id="r-0"))
    failed = shapes.ws.catalog.query(
        "SELECT count(*) FROM runs WHERE kind = 'train-classifier' AND status = 'failed'"
    )
    assert failed.iloc[0, 0] == 0  # input errors are found before a run is recorded


def test_resume_refuses_another_config(shapes):
    part = train_classifier(shapes.ws, _cfg(steps=4), stop_after_steps=2)
    with pytest.raises(ConfigError, match=r"cannot resume .*\(lr: 0.05 -> 0.1\)"):
        train_classifier(shapes.ws, _cfg(steps=4, lr=0.1, run_id=part.run_id))
    done = train_classifier(shapes.ws, _cfg(steps=4, run_id=part.run_id, log_every=2))  # log_every may change
    assert done.finished and done.steps == 4
