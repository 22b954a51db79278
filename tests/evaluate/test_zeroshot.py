import numpy as np
import pytest
from PIL import Image

from core.datasets import register_dataset
from core.errors import ConfigError, DataError, MissingFileError
from core.evaluate.zeroshot import (
    ZeroShotConfig,
    build_text_classifier,
    evaluate_zeroshot,
    per_class_accuracy,
    read_names,
    readable_classnames,
    retrieval_recall,
    topk_accuracy,
)
from core.workspace import Workspace


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_topk_matches_brute_force():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(200, 7)), rng.integers(0, 7, 200)
    got = topk_accuracy(logits, labels, ks=(1, 3, 10))
    for k in (1, 3):
        brute = np.mean([labels[i] in sorted(range(7), key=lambda c: -logits[i, c])[:k] for i in range(200)])
        assert got[k] == pytest.approx(brute)
    assert got[10] == 1.0  # k above the class count means every label is in the top k
    with pytest.raises(DataError):
        topk_accuracy(np.zeros((0, 3)), np.zeros(0, int))


def test_per_class_accuracy():
    pred = np.array([0, 0, 1, 2, 2, 2])
    labels = np.array([0, 1, 1, 2, 2, 0])
    acc = per_class_accuracy(pred, labels, 4)
    assert acc[:3].tolist() == [0.5, 0.5, 1.0] and np.isnan(acc[3])


def test_retrieval_recall_matches_brute_force():
    rng = np.random.default_rng(1)
    img = _unit(rng.normal(size=(50, 16)))
    txt = _unit(img + rng.normal(scale=0.8, size=img.shape))
    got = retrieval_recall(img, txt, ks=(1, 5))
    sim = img @ txt.T
    for k in (1, 5):
        i2t = np.mean([i in np.argsort(-sim[i])[:k] for i in range(50)])
        t2i = np.mean([i in np.argsort(-sim[:, i])[:k] for i in range(50)])
        assert got[f"i2t_recall@{k}"] == pytest.approx(i2t)
        assert got[f"t2i_recall@{k}"] == pytest.approx(t2i)
    perfect = retrieval_recall(img, img, ks=(1,))
    assert perfect == {"i2t_recall@1": 1.0, "t2i_recall@1": 1.0}


def test_text_classifier_is_mean_of_normalised_prompts():
    vocab = {"a {}": np.array([1.0, 0, 0]), "b {}": np.array([0, 3.0, 0])}

    def encode(texts):
        return np.stack([vocab[t.replace("cat", "{}").replace("dog", "{}")] * (2 if "dog" in t else 1) for t in texts])

    W = build_text_classifier(encode, ["cat", "dog"], ["a {}", "b {}"])
    expected = np.array([1, 1, 0]) / np.sqrt(2)
    assert np.allclose(W, [expected, expected]) and np.allclose(np.linalg.norm(W, axis=1), 1)
    with pytest.raises(ConfigError):
        build_text_classifier(encode, [], ["a {}"])


def test_names_files(tmp_path):
    (tmp_path / "c.txt").write_text("red triangle\n\nblue star\n")
    (tmp_path / "c.json").write_text('[{"name": "red triangle"}, "blue star"]')
    assert read_names(tmp_path / "c.txt") == read_names(tmp_path / "c.json") == ["red triangle", "blue star"]
    assert readable_classnames(["red_triangle"]) == ["red triangle"]
    with pytest.raises(MissingFileError):
        read_names(tmp_path / "nope.txt")


def test_config_validation(tmp_path):
    with pytest.raises(ConfigError):
        ZeroShotConfig(datasets=())
    with pytest.raises(ConfigError):
        ZeroShotConfig(datasets=("../x",))
    with pytest.raises(MissingFileError):
        ZeroShotConfig(datasets=("val",), checkpoint=str(tmp_path / "missing.pt"))


@pytest.fixture()
def captioned_ws(tmp_path):
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    colours = {"red_square": (220, 30, 30), "blue_square": (30, 30, 220), "green_square": (30, 200, 30)}
    for cls, rgb in colours.items():
        (root / cls).mkdir(parents=True)
        for i in range(4):
            arr = np.clip(np.array(rgb) + rng.normal(0, 20, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
            (root / cls / f"{i}.txt").write_text(f"a {cls.replace('_', ' ')} number {i}")
    ws = Workspace(tmp_path / "ws")
    register_dataset(ws, "colours", "image_folder", root, role="benchmark")
    return ws


def test_evaluate_zeroshot_end_to_end_writes_metrics(captioned_ws):
    ws = captioned_ws
    cfg = ZeroShotConfig(datasets=("colours",), batch_size=8)
    result = evaluate_zeroshot(ws, cfg)
    metrics = dict(zip(result.metric, result.value, strict=True))
    assert 0.0 <= metrics["zeroshot_top1"] <= metrics["zeroshot_top5"] == 1.0  # 3 classes: top-5 always hits
    assert {"zeroshot_class_acc:red square", "i2t_recall@1", "t2i_recall@5"} <= set(metrics)
    assert metrics["n_evaluated"] == 12
    stored = ws.catalog.query("SELECT * FROM metrics WHERE dataset = 'colours'")
    assert len(stored) == len(result) and (stored["adaptation"] == "none").all() and stored["corruption"].isna().all()
    # re-running replaces this model's rows instead of duplicating them
    evaluate_zeroshot(ws, cfg)
    assert len(ws.catalog.query("SELECT * FROM metrics WHERE dataset = 'colours'")) == len(result)
    runs = ws.catalog.query("SELECT status, message FROM runs WHERE kind = 'eval_zeroshot'")
    assert runs["status"].tolist() == ["done", "done"] and "colours top1" in runs["message"][0]


def test_dataset_without_classes_needs_classnames(captioned_ws, tmp_path):
    ws = captioned_ws
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (32, 32)).save(flat / "a.png")
    register_dataset(ws, "flat", "image_folder", flat)
    with pytest.raises(DataError, match="no class names"):
        evaluate_zeroshot(ws, ZeroShotConfig(datasets=("flat",)))
