"""Zero-shot classification and image-text retrieval with a CLIP model (CLIP, Radford et al. 2021).

A text classifier is built from class names x prompt templates: each class's prompts are embedded,
L2-normalised, averaged and re-normalised (the CLIP recipe). Images are embedded through the
embedding stage (``core.embed``: sharded, resumable, recorded in the catalog), then classified by the
largest cosine similarity. Metrics go to the catalog's ``metrics`` table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.errors import ConfigError, DataError, MissingFileError
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

#: Default prompt templates (a subset of CLIP's ImageNet prompt ensemble); a templates file overrides.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a drawing of a {}.",
    "a rendition of a {}.",
    "a cropped photo of a {}.",
    "itap of a {}.",
)


# -- pure functions ----------------------------------------------------------------------------------
def topk_accuracy(logits: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose label is among the k largest logits, per k (k capped at the class count).

    Args:
        logits: (N, C) scores, larger = more likely. labels: (N,) ints in [0, C).
    """
    if len(labels) == 0:
        raise DataError("no labelled samples to evaluate")
    order = np.argsort(-logits, axis=1, kind="stable")
    hits = order == labels[:, None]
    return {k: float(hits[:, : min(k, logits.shape[1])].any(axis=1).mean()) for k in ks}


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Returns: (C,) top-1 accuracy per class; NaN for classes without samples."""
    correct = np.bincount(labels, weights=(pred == labels).astype(float), minlength=n_classes)
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k of paired retrieval: image i's caption is text i, and vice versa.

    Args:
        image_emb, text_emb: (N, D) L2-normalised rows, row i of each forming a pair.

    Returns: ``{"i2t_recall@k": ..., "t2i_recall@k": ...}`` fractions in [0, 1].
    """
    if image_emb.shape != text_emb.shape or len(image_emb) == 0:
        raise DataError(f"retrieval needs paired embeddings of equal shape; got {image_emb.shape} and {text_emb.shape}")
    sim = image_emb.astype(np.float32) @ text_emb.astype(np.float32).T
    target = np.arange(len(sim))
    out = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        # rank of the true partner = number of candidates scoring strictly higher.
        true = s[target, target][:, None]
        rank = (s > true).sum(axis=1)
        for k in ks:
            out[f"{name}_recall@{k}"] = float((rank < k).mean())
    return out


def build_text_classifier(encode_texts: Any, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Returns: (C, D) float32 unit rows, the mean of each class's normalised prompt embeddings.

    ``encode_texts(list[str]) -> (B, D)`` normalised embeddings (e.g. ``LoadedClip.encode_texts``).
    """
    if not classnames or not templates:
        raise ConfigError("zero-shot needs at least one class name and one template")
    rows = []
    for name in classnames:
        emb = np.asarray(encode_texts([t.format(name) for t in templates]), dtype=np.float32)
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        mean = emb.mean(axis=0)
        rows.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
    return np.stack(rows)


# -- class names and templates -------------------------------------------------------------------------
def read_names(path: str | Path) -> list[str]:
    """Class names or templates from a .json list (strings, or dicts with "name") or a text file (one per line)."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"{p} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        items = json.loads(text)
        return [it["name"] if isinstance(it, dict) else str(it) for it in items]
    return [line.strip() for line in text.splitlines() if line.strip()]


def readable_classnames(classes: Sequence[str]) -> list[str]:
    """Folder-style class names made prompt-ready: ``red_triangle`` -> ``red triangle``."""
    return [c.replace("_", " ").strip() for c in classes]


# -- the stage -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ZeroShotConfig:
    """A zero-shot evaluation of one model on some labelled datasets.

    Attributes:
        datasets: registered labelled datasets to classify.
        model / pretrained / checkpoint: the CLIP model (as for ``core.embed``).
        classnames: file of class names in label order (default: each dataset's own classes).
        templates: file of prompt templates with ``{}`` (default: DEFAULT_TEMPLATES).
        model_label: how the model is named in ``metrics`` (default: checkpoint stem, tag, or arch).
        retrieval: also compute image-text recall@k on captioned datasets.
    """

    datasets: tuple[str, ...]
    model: str = "demo-vit-tiny"
    pretrained: str | None = None
    checkpoint: str | None = None
    classnames: str | None = None
    templates: str | None = None
    model_label: str | None = None
    retrieval: bool = True
    batch_size: int = 256
    num_workers: int = 0
    device: str | None = None
    ks: tuple[int, ...] = field(default=(1, 5))

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("name at least one dataset to evaluate")
        for name in self.datasets:
            validate_name(name, "dataset name")
        if self.checkpoint and not Path(self.checkpoint).is_file():
            raise MissingFileError(f"checkpoint {self.checkpoint} does not exist")
        if self.batch_size < 1 or any(k < 1 for k in self.ks):
            raise ConfigError("batch_size and every k must be >= 1")

    @property
    def label(self) -> str:
        if self.model_label:
            return self.model_label
        if self.checkpoint:
            return f"{self.model}:{Path(self.checkpoint).parent.parent.name or Path(self.checkpoint).stem}"
        return f"{self.model}:{self.pretrained or 'random-init'}"


def evaluate_zeroshot(ws: Workspace, cfg: ZeroShotConfig, *, progress: bool = False) -> pd.DataFrame:
    """Classify every dataset zero-shot; returns and stores the metric rows (one block per dataset).

    Metrics: ``zeroshot_top{k}`` (fraction), ``zeroshot_class_acc:<class>`` per class, and for captioned
    datasets ``i2t_recall@k`` / ``t2i_recall@k``.
    """
    from core.models import load_clip
    from core.runs import recorded_run

    clip = load_clip(cfg.model, cfg.pretrained, checkpoint=cfg.checkpoint, device=cfg.device)
    templates = read_names(cfg.templates) if cfg.templates else list(DEFAULT_TEMPLATES)
    frames = []
    with recorded_run(ws, "eval_zeroshot", asdict(cfg)) as run:
        for name in cfg.datasets:
            frames.append(_evaluate_one(ws, cfg, clip, name, templates, run.id, progress))
        result = pd.concat(frames, ignore_index=True)
        _store(ws, result, cfg.label, list(cfg.datasets))
        top1 = result[result.metric == "zeroshot_top1"]
        run.message = ", ".join(f"{d} top1 {v:.3f}" for d, v in zip(top1.dataset, top1.value, strict=True))
    return result


def _evaluate_one(ws: Workspace, cfg: ZeroShotConfig, clip: Any, name: str, templates: list[str], run_id: str,
                  progress: bool) -> pd.DataFrame:
    from core.datasets import open_dataset

    ds = open_dataset(ws, name)
    classes = _classnames(cfg, ds)
    modality = "both" if cfg.retrieval and _captioned(ds) else "image"
    image_ids, image_X, text = _embed(ws, cfg, name, modality, progress)
    index = ds.index.set_index("id")
    labels = index.loc[image_ids, "label"]
    keep = labels.notna().to_numpy() & (labels.fillna(-1).to_numpy() < len(classes))
    if not keep.any():
        raise DataError(f"dataset '{name}' has no labels that match its {len(classes)} class names")
    y = labels.to_numpy()[keep].astype(np.int64)
    W = build_text_classifier(lambda t: clip.encode_texts(t).cpu().numpy(), classes, templates)
    logits = np.asarray(image_X, dtype=np.float32)[keep] @ W.T
    rows = [(f"zeroshot_top{k}", v) for k, v in topk_accuracy(logits, y, cfg.ks).items()]
    acc = per_class_accuracy(logits.argmax(1), y, len(classes))
    rows += [(f"zeroshot_class_acc:{c}", float(a)) for c, a in zip(classes, acc, strict=True) if not np.isnan(a)]
    if text is not None:
        rows += list(_retrieval(image_ids, image_X, *text).items())
    rows.append(("n_evaluated", float(keep.sum())))
    log.info("zero-shot %s on %s: top1 %.3f", cfg.label, name, dict(rows)["zeroshot_top1"])
    return pd.DataFrame({"run_id": run_id, "model": cfg.label, "dataset": name, "metric": [r[0] for r in rows],
                         "value": [r[1] for r in rows]})


def _classnames(cfg: ZeroShotConfig, ds: Any) -> list[str]:
    if cfg.classnames:
        return read_names(cfg.classnames)
    classes = ds.classes()
    if not classes:
        raise DataError(f"dataset '{ds.name}' has no class names", hint="pass --classnames FILE (one name per line, label order)")
    return readable_classnames(classes)


def _captioned(ds: Any) -> bool:
    return "caption" in ds.index and bool(ds.index["caption"].notna().any())


def _embed(ws: Workspace, cfg: ZeroShotConfig, name: str, modality: str,
           progress: bool) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    from core.embed import EmbedConfig, embed_dataset, load_embeddings

    ecfg = EmbedConfig(dataset=name, model=cfg.model, pretrained=cfg.pretrained, checkpoint=cfg.checkpoint,
                       modality=modality, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=cfg.device)
    info = embed_dataset(ws, ecfg, progress=progress)
    ids, X = load_embeddings(ws, info.id, "image")
    text = load_embeddings(ws, info.id, "text") if modality == "both" else None
    return ids, X, text


def _retrieval(image_ids: np.ndarray, image_X: np.ndarray, text_ids: np.ndarray, text_X: np.ndarray) -> dict[str, float]:
    """Recall@k over the samples that have both an image and a caption embedding."""
    pos = {sid: i for i, sid in enumerate(text_ids)}
    both = [(i, pos[sid]) for i, sid in enumerate(image_ids) if sid in pos]
    if len(both) < 2:
        return {}
    ii, tt = map(np.asarray, zip(*both, strict=True))
    return retrieval_recall(np.asarray(image_X, np.float32)[ii], np.asarray(text_X, np.float32)[tt])


def _store(ws: Workspace, result: pd.DataFrame, model: str, datasets: list[str]) -> None:
    """Replace this model's zero-shot rows for these datasets in ``metrics``."""
    rows = [{"run_id": r.run_id, "model": r.model, "dataset": r.dataset, "corruption": None, "severity": 0,
             "adaptation": "none", "metric": r.metric, "value": float(r.value)} for r in result.itertuples()]
    marks = ", ".join("?" for _ in datasets)
    ws.catalog.insert("metrics", rows, replace_where=(
        f"model = ? AND dataset IN ({marks}) AND (metric LIKE 'zeroshot_%' OR metric LIKE '%_recall@%' "
        "OR metric = 'n_evaluated')"), replace_params=[model, *datasets])
