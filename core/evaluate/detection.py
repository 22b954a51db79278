"""Detection under corruption: COCO AP per model x corruption x severity, with P, mPC and rPC.

Ref: Michaelis et al., "Benchmarking Robustness in Object Detection: Autonomous Driving when Winter is
Coming" (2019): P = clean AP; mPC = mean AP over the 15 test corruptions x severities 1-5; rPC = mPC / P.
Pascal VOC reports AP50, COCO and Cityscapes AP@[.5:.95] (``metric="auto"`` follows that choice).

Two kinds of input, chosen by ``data``:

- clean ground truth (a COCO json, a COCO folder or a Pascal VOC root): each domain is made on the fly by
  :class:`core.detection.data.CorruptedDetection` (seeded per image, so every model sees the same
  pixels); boxes are unchanged, the corruptions move no object;
- a corrupted tree written by :func:`core.detection.data.write_corrupted_detection`: each domain's images
  are read from ``<corruption>/<severity>/``; the clean domain needs ``clean_data`` (the tree holds no clean
  copy), domains the tree lacks are skipped with a warning.

A domain's images are decoded (and corrupted) once, in chunks of ``batch_size``, and fed to every model
that has not finished the domain; unreadable images are left out of both the detections and the ground
truth of that domain (counted in the log). Each model's output labels are matched to the dataset's
categories (:func:`match_categories`); dataset categories no model label covers are left out of its AP
(with a warning), since no detector can find them.

Outputs (run kind ``eval-detection``): ``runs/<id>/results.parquet`` (one row per model and domain:
``model, corruption, severity, n_images, ap, ap50, ap75`` with AP as fractions), rows in ``metrics``
(``AP`` and ``AP50`` per domain in %, clean with corruption NULL and severity 0; per model ``P``,
``mPC``, ``rPC`` in % on the primary metric, mPC / rPC only for a full 15 x 5 grid; adaptation
``none``) and progress records. A crashed run resumes with ``run_id``: finished (model, domain) cells
are kept.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core import atomic
from core.errors import ConfigError, DataError, MissingFileError
from core.workspace import Workspace, validate_name

if TYPE_CHECKING:
    import torch

    from core.detection.data import DetectionSet

log = logging.getLogger(__name__)

RUN_KIND = "eval-detection"
RESULT_COLUMNS = ("model", "corruption", "severity", "n_images", "ap", "ap50", "ap75")
CLEAN = ("clean", 0)
METRICS = ("auto", "ap", "ap50")
#: Catalog metric name of each AP column (values stored in %).
METRIC_NAMES = {"ap": "AP", "ap50": "AP50"}
#: Config fields that define the numbers of a run: a resume must not change them.
GRID_FIELDS = ("data", "clean_data", "models", "metric", "dataset", "split", "batch_size", "limit", "seed")
#: Pascal VOC class names -> the COCO name of the same class (for a COCO model on VOC, or back).
NAME_ALIASES = {"aeroplane": "airplane", "motorbike": "motorcycle", "sofa": "couch", "tvmonitor": "tv"}


@dataclass(frozen=True)
class DetectionEvalConfig:
    """One detection robustness grid.

    Attributes:
        data: detection ground truth (a COCO json, a folder with ``annotations.json``, a VOC root) or a
            corrupted tree from ``write_corrupted_detection``; relative paths are looked up in the
            workspace first.
        models: detector specs of :func:`core.detection.models.load_detector`: ``[LABEL=]torchvision:ARCH``,
            ``[LABEL=]PATH.pt`` or ``[LABEL=]RUN_ID`` of a ``train-detector`` run.
        corruptions: corruption names (default: the 15 test corruptions); severities: 1-5.
        clean: also evaluate the clean images (P, needed for rPC).
        clean_data: the clean ground truth + images of a corrupted tree (ignored otherwise).
        metric: the primary AP of P / mPC / rPC: ``ap`` (AP@[.5:.95]), ``ap50``, or ``auto`` (VOC -> ap50,
            else ap, as Michaelis et al.); resolved when the run starts.
        dataset: name stored in ``metrics`` (default: the data's name, e.g. its folder).
        split: the VOC image set (ImageSets/Main/<split>.txt); ignored for COCO.
        batch_size: images per forward pass (the detector pads a batch to its largest image).
        limit: evaluate only the first ``limit`` images (quick looks; None = all).
        seed: corruption noise; device: auto | cpu | cuda[:N]; cpu_threads: torch CPU threads (None:
            unchanged). run_id: resume this run (the grid fields must match the stored ones).
    """

    data: str
    models: tuple[str, ...]
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    clean: bool = True
    clean_data: str | None = None
    metric: str = "auto"
    dataset: str | None = None
    split: str = "val"
    batch_size: int = 8
    limit: int | None = None
    seed: int = 0
    device: str = "auto"
    cpu_threads: int | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        from core.corrupt import TEST_CORRUPTIONS, check_corruption, check_severity

        if not str(self.data or "").strip():
            raise ConfigError("give the detection data: a COCO json / folder, a VOC root or a corrupted tree")
        if isinstance(self.models, str) or not self.models or not all(str(m).strip() for m in self.models):
            raise ConfigError("name at least one detector to evaluate", hint="e.g. --model torchvision:fasterrcnn_resnet50_fpn")
        object.__setattr__(self, "models", tuple(str(m).strip() for m in self.models))
        names = tuple(self.corruptions) or TEST_CORRUPTIONS
        object.__setattr__(self, "corruptions", tuple(dict.fromkeys(check_corruption(c) for c in names)))
        object.__setattr__(self, "severities", tuple(sorted({check_severity(s) for s in self.severities})))
        if not self.severities:
            raise ConfigError("give at least one severity (1-5)")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {', '.join(METRICS)}; got {self.metric!r}")
        if self.dataset is not None:
            validate_name(self.dataset, "dataset name")
        for name, value, low in (("batch_size", self.batch_size, 1), ("limit", self.limit, 1),
                                 ("cpu_threads", self.cpu_threads, 1), ("seed", self.seed, 0)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
        if self.run_id is not None:
            validate_name(self.run_id, "run id")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def domains(self) -> list[tuple[str, int]]:
        """Grid order: clean first (when asked), then each corruption at each severity."""
        return ([CLEAN] if self.clean else []) + [(c, s) for c in self.corruptions for s in self.severities]


# -- categories ------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    key = re.sub(r"[\s_\-]+", "", str(name).strip().lower())
    return NAME_ALIASES.get(key, key)


def match_categories(model_names: Mapping[int, str], model_ids: Mapping[int, int],
                     categories: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Model output label -> dataset category id.

    When every model label's (category id, name) is a dataset category, the ids are used as they are
    (the model was trained on this label set); otherwise labels are matched by name (case, spaces,
    underscores and the VOC/COCO spellings of :data:`NAME_ALIASES` ignored). Labels of no dataset class
    are left out.

    Raises:
        DataError: the model and the dataset share no category.
    """
    by_id = {int(c["id"]): str(c["name"]) for c in categories}
    direct = {int(lab): int(cid) for lab, cid in model_ids.items()}
    if direct and all(by_id.get(cid) is not None and _norm(by_id[cid]) == _norm(model_names.get(lab, ""))
                      for lab, cid in direct.items()):
        return direct
    by_name = {_norm(name): cid for cid, name in by_id.items()}
    out = {int(lab): by_name[_norm(name)] for lab, name in model_names.items() if _norm(name) in by_name}
    if not out:
        raise DataError(f"the detector's classes ({_sample(model_names.values())}) share no category with the "
                        f"dataset's ({_sample(by_id.values())})",
                        hint="evaluate a detector trained on these classes, or one whose class names match")
    return out


def _sample(names: Any, k: int = 5) -> str:
    names = [str(n) for n in names]
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


@dataclass
class EvalDetector:
    """A detector ready for the grid: its label, module on the device and label -> dataset category id."""

    label: str
    spec: str
    module: torch.nn.Module
    label_to_category: dict[int, int]


def _load_detector(ws: Workspace, spec: str, device: torch.device) -> Any:
    """:func:`core.detection.models.load_detector` (a seam: tests put a stub detector here)."""
    from core.detection.models import load_detector

    return load_detector(ws, spec, device)


def load_eval_detectors(ws: Workspace, specs: Sequence[str], categories: Sequence[Mapping[str, Any]],
                        device: torch.device) -> list[EvalDetector]:
    """The grid's detectors, each with its categories matched to the dataset's; labels must differ."""
    out = []
    covered: set[int] = set()
    for spec in specs:
        det = _load_detector(ws, spec, device)
        mapping = match_categories(det.categories, det.category_ids, categories)
        covered |= set(mapping.values())
        out.append(EvalDetector(det.label, spec, det.module.eval(), mapping))
        uncovered = [c["name"] for c in categories if int(c["id"]) not in mapping.values()]
        if uncovered:
            log.warning("%s: no output for %d dataset categories (left out of its AP): %s", det.label,
                        len(uncovered), _sample(uncovered))
    labels = [d.label for d in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two detectors share the label {next(x for x in labels if labels.count(x) > 1)!r}",
                          hint="name them: --model base=torchvision:fasterrcnn_resnet50_fpn --model mine=RUN_ID")
    return out


def restrict_gt(gt: Mapping[str, Any], image_ids: set[int] | None = None,
                category_ids: set[int] | None = None) -> dict[str, Any]:
    """``gt`` with only the given images and categories (None: all) and their annotations."""
    images = [im for im in gt["images"] if image_ids is None or int(im["id"]) in image_ids]
    cats = [c for c in gt["categories"] if category_ids is None or int(c["id"]) in category_ids]
    keep_img, keep_cat = {int(im["id"]) for im in images}, {int(c["id"]) for c in cats}
    anns = [a for a in gt["annotations"] if int(a["image_id"]) in keep_img and int(a["category_id"]) in keep_cat]
    return {**gt, "images": images, "annotations": anns, "categories": cats}


# -- data ------------------------------------------------------------------------------------------
def resolve_data_path(ws: Workspace, path: str) -> Path:
    """``path`` as given when absolute, else inside the workspace when it exists there, else as given."""
    p = Path(path).expanduser()
    if not p.is_absolute() and (ws.root / p).exists():
        return ws.root / p
    if not p.exists():
        raise MissingFileError(f"detection data {path} not found (looked in {ws.root} and {Path.cwd()})")
    return p


def is_voc(ds: DetectionSet) -> bool:
    """Whether the set has Pascal VOC's 20 classes with ids 1-20 (read from VOC, or a tree written from it)."""
    from core.detection.data import VOC_CLASSES

    return [(c["id"], c["name"]) for c in ds.categories] == list(enumerate(VOC_CLASSES, start=1))


class _Source:
    """Where a domain's images come from: on-the-fly corruption or a corrupted tree on disk."""

    def __init__(self, ws: Workspace, cfg: DetectionEvalConfig) -> None:
        from core.detection.data import is_corrupted_tree, open_detection, read_coco

        self.cfg = cfg
        self.path = resolve_data_path(ws, cfg.data)
        self.tree = is_corrupted_tree(self.path)
        if self.tree:
            self.base = read_coco(self.path / "annotations.json", images_dir=self.path)
            self.base.name = self.path.name
            clean = open_detection(resolve_data_path(ws, cfg.clean_data), split=cfg.split) if cfg.clean_data else None
            self.clean = self._limit(clean) if clean is not None else None
            self.base = self._limit(self.base)
        else:
            self.base = self._limit(open_detection(self.path, split=cfg.split))
            self.clean = self.base
        if not self.base.n_boxes:
            raise DataError(f"detection data {cfg.data} has no box to find")
        self.name = cfg.dataset or validate_name(_safe_name(self.base.name), "dataset name")

    def _limit(self, ds: DetectionSet) -> DetectionSet:
        return ds.subset(self.cfg.limit) if self.cfg.limit is not None else ds

    def has(self, domain: tuple[str, int]) -> bool:
        if domain == CLEAN:
            return self.clean is not None
        return not self.tree or (self.path / domain[0] / str(domain[1])).is_dir()

    def domain_set(self, domain: tuple[str, int]) -> DetectionSet:
        """The annotations (and images, except for on-the-fly corruption) of one domain."""
        from core.detection.data import open_corrupted_tree

        if domain == CLEAN:
            assert self.clean is not None
            return self.clean
        return self._limit(open_corrupted_tree(self.path, *domain)) if self.tree else self.base

    def images(self, domain: tuple[str, int], skipped: list[int]) -> Iterator[tuple[np.ndarray, int]]:
        """(uint8 (H, W, 3) pixels, image id) of the domain; ids of unreadable images go to ``skipped``."""
        from core.detection.data import CorruptedDetection

        ds = self.domain_set(domain)
        view = None if (domain == CLEAN or self.tree) else CorruptedDetection(ds, *domain, seed=self.cfg.seed)
        for i, im in enumerate(ds.images):
            try:
                rgb = np.asarray(ds.load_image(i))
            except DataError as exc:
                log.warning("%s-%d: %s", domain[0], domain[1], exc.one_line())
                skipped.append(im.image_id)
                continue
            yield (view.apply(rgb, im.image_id) if view is not None else rgb), im.image_id


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(name)).strip("-.") or "detection"


# -- the grid --------------------------------------------------------------------------------------
def evaluate_detection(ws: Workspace, cfg: DetectionEvalConfig, *, progress: bool = False) -> pd.DataFrame:
    """Run (or resume) the grid; returns the per-domain results and stores everything (module docstring).

    Returns:
        One row per (model, domain): ``model, corruption ("clean" for the clean images), severity (0 for
        clean), n_images, ap, ap50, ap75`` (fractions; higher = better); ``attrs`` holds ``run_id``,
        ``metric`` (the resolved primary AP) and ``dataset``.

    Raises:
        ConfigError / UnknownName: a bad config or resume. DataError: data without boxes, a detector
            sharing no category with the data, a domain with no readable image. MissingFileError: data or
            a checkpoint not found. WeightsUnavailable: torchvision weights not cached while offline.
    """
    from core.models import torch_threads

    with torch_threads(cfg.cpu_threads):
        return _evaluate(ws, cfg, progress)


def _evaluate(ws: Workspace, cfg: DetectionEvalConfig, progress: bool) -> pd.DataFrame:
    from core.models import select_device
    from core.runs import ProgressWriter, recorded_run, resumed_run

    source = _Source(ws, cfg)
    cfg = replace(cfg, metric=_primary(cfg.metric, source.base), dataset=source.name)
    if cfg.clean and source.clean is None:
        log.warning("the corrupted tree %s holds no clean images: P and rPC need clean_data", cfg.data)
    device = select_device(None if cfg.device == "auto" else cfg.device)
    detectors = load_eval_detectors(ws, cfg.models, source.base.categories, device)
    if cfg.run_id:
        _check_resume(ws, cfg)
    scope = resumed_run(ws, cfg.run_id, RUN_KIND) if cfg.run_id else recorded_run(ws, RUN_KIND, cfg.to_dict(),
                                                                                   seed=cfg.seed)
    with scope as run:
        path = run.dir / "results.parquet"
        done = pd.read_parquet(path) if path.exists() else _empty()
        grid = _Grid(cfg, source, detectors, device, done, ProgressWriter(run.dir), progress)
        results = grid.run(lambda df: atomic.write_parquet(path, df))
        _store(ws, run.id, cfg, results)
        run.message = _message(cfg, results)
    results.attrs.update(run_id=run.id, metric=cfg.metric, dataset=cfg.dataset)
    return results


def _primary(metric: str, ds: DetectionSet) -> str:
    return metric if metric != "auto" else ("ap50" if is_voc(ds) else "ap")


def _check_resume(ws: Workspace, cfg: DetectionEvalConfig) -> None:
    """Refuse a resume whose grid fields differ from the stored config (before the run is touched); the
    grid may grow (more corruptions, severities, the clean domain), and the stored config then says so."""
    import json

    from core.errors import UnknownName

    found = ws.catalog.query("SELECT run_dir FROM runs WHERE id = ? AND kind = ?", [cfg.run_id, RUN_KIND])
    if found.empty:
        raise UnknownName(f"{RUN_KIND} run '{cfg.run_id}' not found in the catalog")
    params_path = ws.abs(found["run_dir"].iloc[0]) / "params.json"
    try:
        params = json.loads(params_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise DataError(f"{params_path} is missing or unreadable: cannot check what run {cfg.run_id} evaluated") from None
    stored = params.get("config", {})
    given = cfg.to_dict()
    changed = [k for k in GRID_FIELDS if k in stored and _plain(stored[k]) != _plain(given[k])]
    if changed:
        parts = [f"{k} (stored {stored[k]!r}, given {given[k]!r})" for k in changed]
        raise ConfigError(f"run {cfg.run_id} was started with other settings: {'; '.join(parts)}",
                          hint="resume with the run's own settings, or start a new run")
    grown = {**given, "run_id": None, "clean": bool(stored.get("clean")) or cfg.clean,
             "corruptions": list(dict.fromkeys([*stored.get("corruptions", []), *cfg.corruptions])),
             "severities": sorted({*stored.get("severities", []), *cfg.severities})}
    atomic.write_json(params_path, {**params, "config": grown})


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _empty() -> pd.DataFrame:
    return pd.DataFrame(columns=list(RESULT_COLUMNS))


class _Grid:
    """The loop over domains and detectors, with the finished cells of a resumed run kept."""

    def __init__(self, cfg: DetectionEvalConfig, source: _Source, detectors: list[EvalDetector],
                 device: torch.device, done: pd.DataFrame, writer: Any, progress: bool) -> None:
        self.cfg, self.source, self.detectors, self.device = cfg, source, detectors, device
        self.done, self.writer, self.progress = done, writer, progress

    def _finished(self, label: str, domain: tuple[str, int]) -> bool:
        d = self.done
        return bool(((d["model"] == label) & (d["corruption"] == domain[0]) & (d["severity"] == domain[1])).any()) \
            if len(d) else False

    def run(self, save: Any) -> pd.DataFrame:
        from tqdm.auto import tqdm

        rows = self.done.to_dict("records")
        domains = [d for d in self.cfg.domains() if self.source.has(d)]
        absent = [f"{c}-{s}" for c, s in self.cfg.domains() if (c, s) not in domains and (c, s) != CLEAN]
        if absent:
            log.warning("the corrupted tree lacks %d domains (skipped): %s", len(absent), _sample(absent))
        if not domains:
            raise DataError(f"nothing to evaluate: {self.cfg.data} has none of the asked domains")
        bar = tqdm(domains, desc="domains", unit="domain", disable=not self.progress)
        for i, domain in enumerate(bar):
            todo = [d for d in self.detectors if not self._finished(d.label, domain)]
            if todo:
                rows.extend(self._domain(domain, todo))
                save(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)))
            self.writer.write(stage=RUN_KIND, step=i + 1, total=len(domains), domain=f"{domain[0]}-{domain[1]}")
        return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))

    def _domain(self, domain: tuple[str, int], todo: list[EvalDetector]) -> list[dict[str, Any]]:
        """Detections of every detector in ``todo`` on the domain's images (decoded once), scored."""
        from core.detection.coco_eval import coco_ap, predict

        skipped: list[int] = []
        detections: dict[str, list[dict[str, Any]]] = {d.label: [] for d in todo}
        seen: set[int] = set()
        for chunk in _chunks(self.source.images(domain, skipped), self.cfg.batch_size):
            seen.update(image_id for _, image_id in chunk)
            for det in todo:
                detections[det.label] += predict(det.module, chunk, label_to_category=det.label_to_category,
                                                 batch_size=self.cfg.batch_size, device=self.device)
        if not seen:
            raise DataError(f"domain {domain[0]} severity {domain[1]}: no readable image")
        if skipped:
            log.warning("%s severity %d: %d unreadable images left out", domain[0], domain[1], len(skipped))
        gt = self.source.domain_set(domain).coco_gt()
        rows = []
        for det in todo:
            scores = coco_ap(restrict_gt(gt, seen, set(det.label_to_category.values())), detections[det.label])
            rows.append({"model": det.label, "corruption": domain[0], "severity": domain[1],
                         "n_images": len(seen), **scores})
        return rows


def _chunks(items: Iterator[tuple[np.ndarray, int]], size: int) -> Iterator[list[tuple[np.ndarray, int]]]:
    chunk: list[tuple[np.ndarray, int]] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- summaries and storing -------------------------------------------------------------------------
def summaries(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per model: ``P`` (clean AP), ``mPC`` and ``rPC`` on ``metric`` (``ap`` / ``ap50``), in %.

    mPC comes from :func:`core.evaluate.robustness.mpc` and needs every test corruption at severities 1-5
    (a partial grid gets none); rPC from :func:`core.evaluate.robustness.rpc` needs P > 0 and mPC.
    Ref: Michaelis et al. (2019).
    """
    from core.evaluate.robustness import mpc, rpc

    if metric not in METRIC_NAMES:
        raise ConfigError(f"metric must be ap or ap50; got {metric!r}")
    out = []
    for model, part in results.groupby("model", sort=False):
        clean = part.loc[part["corruption"] == CLEAN[0], metric].dropna()
        cells = part[part["corruption"] != CLEAN[0]][["corruption", "severity", metric]].dropna()
        values: dict[str, float] = {}
        if len(clean):
            values["P"] = 100.0 * float(clean.iloc[0])
        if len(cells):
            with contextlib.suppress(DataError):  # a partial grid: no mPC (never a mean over fewer cells)
                values["mPC"] = 100.0 * mpc(cells, value=metric)
        if "mPC" in values and values.get("P", 0.0) > 0:
            values["rPC"] = rpc(values["mPC"], values["P"])
        out += [{"model": model, "metric": k, "value": v} for k, v in values.items() if np.isfinite(v)]
    return pd.DataFrame(out, columns=["model", "metric", "value"])


def metric_rows(run_id: str, dataset: str, results: pd.DataFrame, metric: str) -> list[dict[str, Any]]:
    """The ``metrics`` rows of a run: AP / AP50 per cell and P / mPC / rPC per model (all in %)."""
    base = {"run_id": run_id, "dataset": dataset, "adaptation": "none"}
    rows = []
    for r in results.to_dict("records"):
        for column, name in METRIC_NAMES.items():
            if pd.notna(r[column]):
                rows.append({**base, "model": r["model"], "corruption": None if r["corruption"] == CLEAN[0]
                             else r["corruption"], "severity": int(r["severity"]), "metric": name,
                             "value": 100.0 * float(r[column])})
    rows += [{**base, "model": r.model, "corruption": None, "severity": 0, "metric": r.metric, "value": r.value}
             for r in summaries(results, metric).itertuples()]
    return rows


def _store(ws: Workspace, run_id: str, cfg: DetectionEvalConfig, results: pd.DataFrame) -> None:
    assert cfg.dataset is not None
    ws.catalog.insert("metrics", metric_rows(run_id, cfg.dataset, results, cfg.metric),
                      replace_where="run_id = ?", replace_params=[run_id])


def _message(cfg: DetectionEvalConfig, results: pd.DataFrame) -> str:
    table = summaries(results, cfg.metric)
    n_cells = int((results["corruption"] != CLEAN[0]).sum()) // max(results["model"].nunique(), 1)
    parts = []
    for model, part in table.groupby("model", sort=False):
        values = dict(zip(part["metric"], part["value"], strict=True))
        parts.append(f"{model}: " + ", ".join(f"{k} {values[k]:.1f}" for k in ("P", "mPC", "rPC") if k in values))
    note = "" if (table["metric"] == "mPC").any() else \
        f" (no mPC: {n_cells} corrupted cells per model, mPC needs the 15 test corruptions x severities 1-5)"
    return (f"{METRIC_NAMES[cfg.metric]} " + "; ".join(parts))[:400] + note


def load_detection_results(ws: Workspace, run_id: str) -> pd.DataFrame:
    """The per-domain results of an ``eval-detection`` run (``results.parquet``; AP as fractions)."""
    found = ws.catalog.query("SELECT run_dir FROM runs WHERE id = ? AND kind = ?",
                             [validate_name(run_id, "run id"), RUN_KIND])
    if found.empty:
        raise DataError(f"detection evaluation '{run_id}' not found")
    path = ws.abs(found["run_dir"].iloc[0]) / "results.parquet"
    if not path.exists():
        raise MissingFileError(f"{path} is missing (the run wrote no result yet)")
    return pd.read_parquet(path)
