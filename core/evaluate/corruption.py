"""Corruption robustness: the grid model x corruption x severity x adaptation, stored in the catalog.

Ref: Hendrycks & Dietterich, ICLR 2019 (ImageNet-C, mCE); Schneider, Rusak et al., NeurIPS 2020 (BN
adaptation); Wang et al., ICLR 2021 (TENT); Rusak, Schneider et al., TMLR 2022 (self-learning).

Two kinds of input, chosen by the dataset:

- a corrupted tree already on disk (``imagenet_c`` / ``cifar_c`` datasets, whose index has
  ``corruption`` and ``severity`` columns): each domain's images are used as they are, centre-cropped to
  the model's input size and never resized (ImageNet-C's images are 224 px already); the clean error
  comes from ``clean_dataset`` when given;
- a clean labelled dataset: every domain is made on the fly by :class:`core.corrupt.CorruptedView`
  (seeded per image, so every model and method sees the same pixels), then the model's eval transform.

A domain's images are shuffled once with a seed derived from the run's seed and the domain (BatchNorm
statistics depend on the batch, so the order and the batch size are fixed and recorded) and fed in
batches of ``batch_size`` to each (model, method) adapter: ``reset`` restores the source model before
every domain (the default), ``continual`` carries the adaptation from one domain to the next in grid order
(clean first). Methods that need BatchNorm are recorded as not applicable for models without it (a CLIP
ViT) instead of failing the grid.

Outputs (run kind ``eval-corruptions``; see README "SQL tables"): ``runs/<id>/results.parquet`` (one row
per model, adaptation and domain: ``model, adaptation, corruption, severity, n, n_correct, error``),
rows in ``metrics`` (``error`` per domain in %, clean error with corruption NULL and severity 0, and the
summaries ``mCE``, ``relative_mCE``, ``mean_error``, ``mean_error_sev5`` where computable, plus
``not_applicable`` = 1), and progress records. A crashed run resumes with ``run_id``: finished
(model, adaptation, domain) cells are kept (for ``continual``, an unfinished sequence restarts).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from core import atomic
from core.errors import ConfigError, DataError, MissingFileError
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

RUN_KIND = "eval-corruptions"
SETTINGS = ("reset", "continual")
#: A domain's transformed images are kept in memory for all (model, method) pairs up to this size.
CACHE_BYTES = 1 << 29
RESULT_COLUMNS = ("model", "adaptation", "corruption", "severity", "n", "n_correct", "error")
CLEAN = ("clean", 0)


@dataclass(frozen=True)
class CorruptionEvalConfig:
    """One evaluation grid.

    Attributes:
        dataset: a registered labelled dataset: clean images (corrupted on the fly) or a corrupted tree
            (``imagenet_c`` / ``cifar_c``, used as is).
        models: what to evaluate, each ``[LABEL=]SPEC``; SPEC is a classifier checkpoint (a path, or a
            ``train-classifier`` run id, whose ``last.pt`` is used), ``clip:CHECKPOINT`` (a CLIP
            checkpoint, classified zero-shot with the dataset's class names) or ``clip:ARCH:TAG``.
        corruptions: corruption names (default: the 15 test corruptions); severities: 1-5.
        adaptations: registered adaptation methods (``core.adapt.ADAPTERS``); ``adapt_params``: per method,
            parameter overrides (e.g. ``{"tent": {"lr": 1e-3}}``).
        setting: reset (each domain starts from the source model) or continual.
        clean: also evaluate the clean images (needed for relative mCE and the gain plots).
        clean_dataset: the clean counterpart of a corrupted tree (ignored for on-the-fly corruption).
        batch_size: test batch size, fixed for every method so results compare (BN depends on it).
        limit: evaluate only the first ``limit`` images of each domain (quick looks; None = all).
        corrupt_size: centre-crop to this many px before corrupting on the fly (224 = ImageNet-C's
            protocol); None corrupts the images as stored.
        seed: corruption noise and batch order; device: auto | cpu | cuda[:N]; num_workers: image loading
            and corruption processes; cpu_threads: torch CPU threads during the run (None: unchanged; 1 is
            often fastest on a small, busy CPU).
        run_id: resume this run.
    """

    dataset: str
    models: tuple[str, ...]
    corruptions: tuple[str, ...] = ()
    severities: tuple[int, ...] = (1, 2, 3, 4, 5)
    adaptations: tuple[str, ...] = ("none",)
    adapt_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    setting: str = "reset"
    clean: bool = True
    clean_dataset: str | None = None
    batch_size: int = 64
    limit: int | None = None
    corrupt_size: int | None = None
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    cpu_threads: int | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        from core.adapt import ADAPTERS, AdaptConfig
        from core.corrupt import TEST_CORRUPTIONS, check_corruption, check_severity

        validate_name(self.dataset, "dataset name")
        if self.clean_dataset is not None:
            validate_name(self.clean_dataset, "dataset name")
        if not self.models:
            raise ConfigError("name at least one model to evaluate")
        object.__setattr__(self, "models", tuple(self.models))
        names = tuple(self.corruptions) or TEST_CORRUPTIONS
        object.__setattr__(self, "corruptions", tuple(dict.fromkeys(check_corruption(c) for c in names)))
        object.__setattr__(self, "severities", tuple(sorted({check_severity(s) for s in self.severities})))
        if not self.severities:
            raise ConfigError("give at least one severity")
        if not self.adaptations:
            raise ConfigError("give at least one adaptation method (none = the source model)")
        unknown = set(self.adapt_params) - set(self.adaptations)
        if unknown:
            raise ConfigError(f"adapt_params for methods not in the grid: {', '.join(sorted(unknown))}")
        resolved = {}
        for method in dict.fromkeys(self.adaptations):
            ADAPTERS.entry(method)
            resolved[method] = dict(AdaptConfig(method, dict(self.adapt_params.get(method, {}))).params)
        object.__setattr__(self, "adaptations", tuple(resolved))
        object.__setattr__(self, "adapt_params", resolved)
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}; got {self.setting!r}")
        for name, value, low in (("batch_size", self.batch_size, 1), ("limit", self.limit, 1),
                                 ("corrupt_size", self.corrupt_size, 32), ("num_workers", self.num_workers, 0),
                                 ("cpu_threads", self.cpu_threads, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
        if self.run_id is not None:
            validate_name(self.run_id, "run id")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["adapt_params"] = {k: dict(v) for k, v in self.adapt_params.items()}
        return out

    def domains(self) -> list[tuple[str, int]]:
        """Grid order: clean first (when asked), then each corruption at each severity."""
        return ([CLEAN] if self.clean else []) + [(c, s) for c in self.corruptions for s in self.severities]


# -- models ----------------------------------------------------------------------------------------
@dataclass
class EvalModel:
    """A model ready for the grid: ``module`` maps (B, 3, S, S) images in [0, 1] to (B, classes) logits."""

    label: str
    spec: str
    module: torch.nn.Module
    image_size: int
    crop_ratio: float = 1.0


class ZeroShotClassifier(torch.nn.Module):
    """A CLIP image tower as a classifier: CLIP normalisation, image embedding, cosine to the class
    prompts' mean text embedding, times CLIP's logit scale (Radford et al. 2021)."""

    weights: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, visual: torch.nn.Module, weights: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                 scale: float) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("weights", weights)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.visual((x - self.mean) / self.std)
        z = torch.nn.functional.normalize(z.float(), dim=-1)
        return self.scale * z @ self.weights.T


def load_eval_model(ws: Workspace, item: str, classnames: Sequence[str], device: torch.device) -> EvalModel:
    """The model of one ``models`` entry (see :class:`CorruptionEvalConfig`) on ``device``, in eval mode."""
    from core.models import split_label

    label, spec = split_label(item)
    if spec.startswith("clip:"):
        return _clip_model(ws, label, spec, classnames, device)
    from core.classifiers import load_classifier

    path = _checkpoint_path(ws, spec)
    model = load_classifier(path, device=device)
    if model.num_classes != len(classnames):
        raise DataError(f"model {spec} predicts {model.num_classes} classes but the dataset has {len(classnames)}")
    default = f"{model.arch} {Path(path).parent.parent.name}" if Path(path).parent.name == "checkpoints" else Path(path).stem
    return EvalModel(label or default, spec, model.eval(), int(model.image_size), float(model.crop_ratio))


def _checkpoint_path(ws: Workspace, spec: str) -> Path:
    """A checkpoint file: ``spec`` as a path (absolute, relative to the workspace, or to the current
    folder) or a run id whose ``checkpoints/last.pt`` exists."""
    candidates = [Path(spec), ws.root / spec]
    if "/" not in spec and "\\" not in spec:
        candidates.append(ws.root / "runs" / spec / "checkpoints" / "last.pt")
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise MissingFileError(f"model checkpoint {spec} not found (a path, or a train-classifier run id)")
    return found


def _clip_model(ws: Workspace, label: str | None, spec: str, classnames: Sequence[str],
                device: torch.device) -> EvalModel:
    from core.evaluate.zeroshot import DEFAULT_TEMPLATES, build_text_classifier, readable_classnames
    from core.models import checkpoint_arch, load_clip

    rest = spec[len("clip:"):]
    if Path(rest).is_file() or (ws.root / rest).is_file():
        path = Path(rest) if Path(rest).is_file() else ws.root / rest
        arch = checkpoint_arch(path)
        if arch is None:
            raise DataError(f"{path} does not record its CLIP architecture", hint="use clip:ARCH:TAG")
        clip = load_clip(arch, checkpoint=path, device=str(device))
        default = f"{arch} zero-shot"
    else:
        arch, _, tag = rest.partition(":")
        clip = load_clip(arch, tag or None, device=str(device))
        default = f"{arch}:{tag or 'random-init'} zero-shot"
    W = build_text_classifier(lambda t: clip.encode_texts(t).cpu().numpy(), readable_classnames(classnames),
                              DEFAULT_TEMPLATES)
    visual: torch.nn.Module = clip.model.visual  # type: ignore[assignment]
    size = int(clip.image_size)
    mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    module = ZeroShotClassifier(visual, torch.as_tensor(W, device=device), mean, std, 100.0).to(device).eval()
    return EvalModel(label or default, spec, module, size)


# -- domains ---------------------------------------------------------------------------------------
@dataclass
class DomainData:
    """The images of one domain as the models see them, shuffled once, with their labels."""

    images: dict[tuple[int, float], torch.Tensor]  # (image size, crop ratio) -> (n, 3, S, S) in [0, 1]
    labels: torch.Tensor  # (n,) int64


def domain_seed(seed: int, domain: tuple[str, int]) -> int:
    """A stable seed of one domain's batch order (BLAKE2b; the same for every model and method)."""
    digest = hashlib.blake2b(f"{seed}:{domain[0]}:{domain[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**63)


class _Source:
    """Where a domain's uint8 images come from: on-the-fly corruption or a corrupted tree on disk."""

    def __init__(self, ws: Workspace, cfg: CorruptionEvalConfig) -> None:
        from core.datasets import open_dataset

        self.cfg = cfg
        self.ds = open_dataset(ws, cfg.dataset)
        index = self.ds.index
        self.precorrupted = {"corruption", "severity"} <= set(index.columns)
        if "label" not in index.columns or index["label"].isna().all():
            raise DataError(f"dataset '{cfg.dataset}' has no labels to measure errors against")
        self.clean_ds = open_dataset(ws, cfg.clean_dataset) if (self.precorrupted and cfg.clean_dataset) else None
        classes = self.ds.classes() or (self.clean_ds.classes() if self.clean_ds is not None else None)
        if not classes:
            raise DataError(f"dataset '{cfg.dataset}' has no class names")
        self.classes: list[str] = list(classes)
        if self.precorrupted:
            found = set(zip(index["corruption"], index["severity"].astype(int), strict=True))
            missing = [d for d in cfg.domains() if d != CLEAN and d not in found]
            if missing:
                raise DataError(f"dataset '{cfg.dataset}' lacks {len(missing)} domains of the grid, e.g. "
                                f"{missing[0][0]} severity {missing[0][1]}", hint="restrict --corruptions / --severities")

    def has(self, domain: tuple[str, int]) -> bool:
        return not (domain == CLEAN and self.precorrupted and self.clean_ds is None)

    def arrays(self, domain: tuple[str, int]) -> tuple[list[np.ndarray], list[int], int]:
        """(uint8 (H, W, 3) images, labels, unreadable count) of the domain, in index order."""
        from core.corrupt import CorruptedView, to_rgb_uint8

        images: list[np.ndarray] = []
        labels: list[int] = []
        skipped = 0
        if domain == CLEAN or self.precorrupted:
            ds, rows = self._rows(domain)
            for row in rows.to_dict("records")[: self.cfg.limit]:
                try:
                    img = ds.load_image(row)
                except Exception:  # noqa: BLE001  a broken file is a counted skip
                    skipped += 1
                    continue
                images.append(to_rgb_uint8(img))
                labels.append(int(row["label"]))
            return images, labels, skipped
        view = CorruptedView(self.ds, domain[0], domain[1], seed=self.cfg.seed, size=self.cfg.corrupt_size)
        for i, (row, img) in enumerate(view):
            if self.cfg.limit is not None and i >= self.cfg.limit:
                break
            if row.get("label") is None or pd.isna(row.get("label")):
                continue
            images.append(img)
            labels.append(int(row["label"]))
        return images, labels, view.report.n_skipped

    def _rows(self, domain: tuple[str, int]) -> tuple[Any, pd.DataFrame]:
        if domain == CLEAN:
            ds = self.clean_ds if self.precorrupted else self.ds
            assert ds is not None
            index = ds.index
            return ds, index[index["label"].notna()]
        index = self.ds.index
        mask = (index["corruption"] == domain[0]) & (index["severity"].astype(int) == domain[1]) & index["label"].notna()
        return self.ds, index[mask]


def _tensor(images: list[np.ndarray], size: int, crop_ratio: float, precorrupted: bool) -> torch.Tensor:
    """(n, 3, size, size) float in [0, 1]: resize (not for a corrupted tree) then centre-crop."""
    from PIL import Image
    from torchvision.transforms import functional as F

    out = []
    for arr in images:
        img = Image.fromarray(arr)
        if not precorrupted:
            img = F.resize(img, round(size / crop_ratio))
        out.append(F.to_tensor(F.center_crop(img, [size, size])))
    return torch.stack(out) if out else torch.zeros((0, 3, size, size))


# -- the grid --------------------------------------------------------------------------------------
def evaluate_corruptions(ws: Workspace, cfg: CorruptionEvalConfig, *, progress: bool = False) -> pd.DataFrame:
    """Run (or resume) the grid; returns the per-domain results and stores everything (module docstring).

    Raises:
        ConfigError / UnknownName: a bad config. DataError: an unlabelled dataset, a model whose class
            count differs, a corrupted tree missing domains. MissingFileError: a checkpoint not found.
    """
    from core.models import torch_threads

    with torch_threads(cfg.cpu_threads):
        return _evaluate(ws, cfg, progress)


def _evaluate(ws: Workspace, cfg: CorruptionEvalConfig, progress: bool) -> pd.DataFrame:
    from core.models import select_device
    from core.runs import ProgressWriter, recorded_run, resumed_run

    source = _Source(ws, cfg)
    device = select_device(None if cfg.device == "auto" else cfg.device)
    models = [load_eval_model(ws, m, source.classes, device) for m in cfg.models]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"two models share the label {next(x for x in labels if labels.count(x) > 1)!r}",
                          hint="name them: --model vanilla=PATH --model noise=PATH")
    scope = resumed_run(ws, cfg.run_id, RUN_KIND) if cfg.run_id else recorded_run(ws, RUN_KIND, cfg.to_dict(),
                                                                                   seed=cfg.seed)
    with scope as run:
        path = run.dir / "results.parquet"
        done = pd.read_parquet(path) if path.exists() else pd.DataFrame(columns=list(RESULT_COLUMNS))
        grid = _Grid(cfg, source, models, device, done, ProgressWriter(run.dir), progress)
        results = grid.run(lambda df: atomic.write_parquet(path, df))
        _store(ws, run.id, cfg, results, grid.not_applicable)
        run.message = _message(results)
    return results


class _Grid:
    """The loop over domains, models and methods, with the finished cells of a resumed run kept."""

    def __init__(self, cfg: CorruptionEvalConfig, source: _Source, models: list[EvalModel], device: torch.device,
                 done: pd.DataFrame, writer: Any, progress: bool) -> None:
        self.cfg, self.source, self.models, self.device = cfg, source, models, device
        self.done = done
        self.writer, self.progress = writer, progress
        self.not_applicable: list[tuple[str, str, str]] = []
        self.adapters = self._adapters()

    def _adapters(self) -> dict[tuple[str, str], Any]:
        from core.adapt import NotApplicable, create_adapter

        out = {}
        for model in self.models:
            for method in self.cfg.adaptations:
                try:
                    out[(model.label, method)] = create_adapter(method, model.module, **self.cfg.adapt_params[method])
                except NotApplicable as exc:
                    self.not_applicable.append((model.label, method, exc.one_line()))
                    log.info("%s on %s: not applicable (%s)", method, model.label, exc.one_line())
        return out

    def _finished(self, label: str, method: str, domain: tuple[str, int]) -> bool:
        d = self.done
        return bool(((d["model"] == label) & (d["adaptation"] == method) & (d["corruption"] == domain[0])
                     & (d["severity"] == domain[1])).any()) if len(d) else False

    def run(self, save: Any) -> pd.DataFrame:
        from tqdm import tqdm

        rows = self.done.to_dict("records")
        domains = [d for d in self.cfg.domains() if self.source.has(d)]
        if self.cfg.setting == "continual":  # an unfinished sequence restarts from its first domain
            complete = {k for k in self.adapters if all(self._finished(*k, d) for d in domains)}
            rows = [r for r in rows if (r["model"], r["adaptation"]) in complete]
            self.done = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
        bar = tqdm(domains, desc="domains", unit="domain", disable=not self.progress)
        for i, domain in enumerate(bar):
            todo = [k for k in self.adapters if not self._finished(*k, domain)]
            if todo:
                data = self._domain(domain)
                for key in todo:
                    rows.append(self._cell(key, domain, data))
                save(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)))
            self.writer.write(stage="eval-corruptions", step=i + 1, total=len(domains), domain=f"{domain[0]}-{domain[1]}")
        return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))

    def _domain(self, domain: tuple[str, int]) -> DomainData:
        images, labels, skipped = self.source.arrays(domain)
        if not images:
            raise DataError(f"domain {domain[0]} severity {domain[1]} has no readable labelled image")
        if skipped:
            log.warning("%s severity %d: %d unreadable images skipped", domain[0], domain[1], skipped)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(domain_seed(self.cfg.seed, domain)))
        y = torch.as_tensor(labels, dtype=torch.int64)[order]
        sizes = {(m.image_size, m.crop_ratio) for m in self.models}
        tensors = {s: _tensor(images, s[0], s[1], self.source.precorrupted)[order] for s in sizes}
        return DomainData(tensors, y)

    def _cell(self, key: tuple[str, str], domain: tuple[str, int], data: DomainData) -> dict[str, Any]:
        from core.adapt import adapt_domain

        model = next(m for m in self.models if m.label == key[0])
        adapter = self.adapters[key]
        if self.cfg.setting == "reset" or domain == self.cfg.domains()[0]:
            adapter.reset()
        X = data.images[(model.image_size, model.crop_ratio)]
        batches = [(X[i: i + self.cfg.batch_size], data.labels[i: i + self.cfg.batch_size])
                   for i in range(0, len(X), self.cfg.batch_size)]
        correct = 0
        for logits, (_, y) in adapt_domain(adapter, batches):
            correct += int((logits.argmax(1).cpu() == y).sum())
        n = len(X)
        return {"model": key[0], "adaptation": key[1], "corruption": domain[0], "severity": domain[1], "n": n,
                "n_correct": correct, "error": 1.0 - correct / n}


# -- storing ---------------------------------------------------------------------------------------
def summaries(results: pd.DataFrame, *, corruptions: Sequence[str] | None = None) -> pd.DataFrame:
    """Per (model, adaptation): ``mCE``, ``relative_mCE``, ``mean_error``, ``mean_error_sev5`` (all %), the
    ones computable from the grid (mCE needs all 15 test corruptions at severities 1-5)."""
    from core.evaluate.robustness import Partial, mce, mean_error, relative_mce

    out = []
    for (model, method), part in results.groupby(["model", "adaptation"], sort=False):
        domains = part[part["corruption"] != CLEAN[0]][["corruption", "severity", "error"]]
        clean = part.loc[part["corruption"] == CLEAN[0], "error"]
        values: dict[str, Any] = {}
        for name, fn in (("mCE", lambda d: mce(d)), ("mean_error", lambda d: mean_error(d)),
                         ("mean_error_sev5", lambda d: mean_error(d, protocol="sev5"))):
            try:
                values[name] = fn(domains)
            except (ConfigError, DataError):
                continue
        if len(clean):
            with contextlib.suppress(ConfigError, DataError):
                values["relative_mCE"] = relative_mce(domains, float(clean.iloc[0]))
        for metric, value in values.items():
            if not isinstance(value, Partial):
                out.append({"model": model, "adaptation": method, "metric": metric, "value": float(value)})
    return pd.DataFrame(out, columns=["model", "adaptation", "metric", "value"])


def _store(ws: Workspace, run_id: str, cfg: CorruptionEvalConfig, results: pd.DataFrame,
           not_applicable: list[tuple[str, str, str]]) -> None:
    rows = [{"run_id": run_id, "model": r.model, "dataset": cfg.dataset,
             "corruption": None if r.corruption == CLEAN[0] else r.corruption, "severity": int(r.severity),
             "adaptation": r.adaptation, "metric": "error", "value": 100.0 * float(r.error)}
            for r in results.itertuples()]
    rows += [{"run_id": run_id, "model": r.model, "dataset": cfg.dataset, "corruption": None, "severity": 0,
              "adaptation": r.adaptation, "metric": r.metric, "value": float(r.value)}
             for r in summaries(results).itertuples()]
    rows += [{"run_id": run_id, "model": model, "dataset": cfg.dataset, "corruption": None, "severity": 0,
              "adaptation": method, "metric": "not_applicable", "value": 1.0} for model, method, _ in not_applicable]
    ws.catalog.insert("metrics", rows, replace_where="run_id = ?", replace_params=[run_id])


def _message(results: pd.DataFrame) -> str:
    parts = []
    for row in summaries(results).itertuples():
        if row.metric in ("mCE", "mean_error"):
            parts.append(f"{row.model}/{row.adaptation} {row.metric} {row.value:.1f}")
    return "; ".join(parts)[:480] or f"{len(results)} cells"


def load_results(ws: Workspace, run_id: str) -> pd.DataFrame:
    """The per-domain results of a run (``results.parquet``)."""
    found = ws.catalog.query("SELECT run_dir FROM runs WHERE id = ? AND kind = ?", [validate_name(run_id, "run id"),
                                                                                    RUN_KIND])
    if found.empty:
        raise DataError(f"corruption evaluation '{run_id}' not found")
    path = ws.abs(found["run_dir"].iloc[0]) / "results.parquet"
    if not path.exists():
        raise MissingFileError(f"{path} is missing (the run wrote no result yet)")
    return pd.read_parquet(path)


def select_hyperparameter(ws: Workspace, base: CorruptionEvalConfig, method: str, param: str,
                          values: Sequence[Any], *, progress: bool = False) -> tuple[Any, pd.DataFrame]:
    """Choose ``param`` of ``method`` on the four hold-out corruptions only (never the test ones).

    Ref: Rusak, Schneider et al., TMLR 2022 (hyper-parameters selected on ImageNet-C's hold-out
    corruptions: speckle_noise, gaussian_blur, spatter, saturate). Each value is evaluated with ``base``'s
    dataset, models, severities and batch size; the value with the lowest mean error over models and
    hold-out domains wins (ties: the first). The table and the choice go to ``metrics`` (run kind
    ``adapt-select``; metrics ``holdout_error:<param>=<value>`` in % and ``selected:<param>``).

    Returns:
        ``(chosen value, table)`` with table columns ``value, mean_error`` (%).
    """
    from core.corrupt import HOLDOUT_CORRUPTIONS
    from core.runs import recorded_run

    if not values:
        raise ConfigError(f"give at least one value of {param} to choose from")
    rows = []
    with recorded_run(ws, "adapt-select", {"method": method, "param": param, "values": list(values),
                                           "base": base.to_dict()}, seed=base.seed) as run:
        for value in values:
            cfg = CorruptionEvalConfig(**{**base.to_dict(), "corruptions": HOLDOUT_CORRUPTIONS, "clean": False,
                                          "adaptations": (method,), "adapt_params": {method: {param: value}},
                                          "run_id": None})
            results = evaluate_corruptions(ws, cfg, progress=progress)
            rows.append({"value": value, "mean_error": 100.0 * float(results["error"].mean())})
        table = pd.DataFrame(rows)
        chosen = table.loc[table["mean_error"].idxmin(), "value"]
        metrics = [{"run_id": run.id, "model": ",".join(base.models), "dataset": base.dataset, "corruption": None,
                    "severity": 0, "adaptation": method, "metric": f"holdout_error:{param}={r['value']}",
                    "value": r["mean_error"]} for r in rows]
        metrics.append({"run_id": run.id, "model": ",".join(base.models), "dataset": base.dataset, "corruption": None,
                        "severity": 0, "adaptation": method, "metric": f"selected:{param}", "value": float(chosen)})
        ws.catalog.insert("metrics", metrics)
        atomic.write_json(run.dir / "selection.json", {"method": method, "param": param, "chosen": chosen,
                                                        "table": rows})
        run.message = f"{method} {param} = {chosen} (hold-out mean error {table['mean_error'].min():.1f}%)"
    return chosen, table
