"""Detector training on COCO / Pascal VOC ground truth (the demo detector on the demo world's scenes).

``train_detector(ws, cfg)`` trains a registered detector (:mod:`core.detection.models`, default
``demo-frcnn``) from random init with torchvision's detection losses, SGD (momentum 0.9) or AdamW,
linear warm-up then cosine decay (:mod:`core.train.schedule`), gradient-norm clipping and optional
horizontal flips. Crowd / VOC ``difficult`` boxes are left out of the targets (as torchvision's
references do); images without boxes stay in (they teach the background).

Everything lands in ``runs/<id>/`` (run kind ``train-detector``): ``params.json`` (resolved config),
``progress.jsonl`` (step, total, loss and its parts, lr, img/s), ``log.txt``, ``data.json`` and
``checkpoints/last.pt`` (a :data:`core.detection.models.CHECKPOINT_FORMAT` checkpoint with the training
state added: load it with ``load_detector(ws, run_id)``). Final loss, throughput and, with ``val_data``,
clean COCO AP / AP50 (percent) go to the catalog's ``metrics`` table as model ``detector:<run id>``.

Resuming (``run_id=...``) continues from ``last.pt`` with the stored config. Batch k (images: a
permutation seeded by (seed, epoch), :class:`core.train.clip.StepBatchSampler`; each image's flip: a
seed of (seed, k, slot)) is a pure function of the seed and k, and the checkpoint holds the model,
optimiser, scheduler and torch RNG (the RPN's box sampling draws from it), so a resumed run ends with
an uninterrupted run's weights (bit-identical on CPU with the same thread count).

Ref: Ren et al., Faster R-CNN (NeurIPS 2015); torchvision's detection reference recipes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import atomic
from core.detection.data import DetectionSet, open_detection
from core.detection.models import DETECTORS, build_detector, detector_arch, save_detector_checkpoint
from core.errors import ConfigError, DataError, UnknownName
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

RUN_KIND = "train-detector"
OPTIMIZERS = ("sgd", "adamw")
AUGMENTS = ("flip", "none")
#: Fields a resumed run may change; every other one must equal the stored config.
RESUMABLE_OVERRIDES = ("device", "num_workers", "cpu_threads", "log_every", "checkpoint_every", "run_id")
#: Gradient-norm clip (from-scratch detectors spike early without it).
GRAD_CLIP = 10.0

#: Demo detector recipes per demo world size: training scenes ``sources/demo/detection-train``,
#: evaluation scenes ``sources/demo/detection``. ``tiny`` is sized for about 3 minutes on two CPU cores.
DEMO_DETECTOR: dict[str, dict[str, Any]] = {
    # tiny: 600 scenes, 2400 images seen (4 epochs); clean AP50 about 0.8 on the 40 evaluation scenes
    "tiny": {"arch": "demo-frcnn", "steps": 200, "batch_size": 12, "lr": 1e-3, "optimizer": "adamw",
             "weight_decay": 1e-4, "warmup_steps": 20, "augment": "flip", "cpu_threads": 2},
    "small": {"arch": "demo-frcnn", "steps": 600, "batch_size": 16, "lr": 1e-3, "optimizer": "adamw",
              "weight_decay": 1e-4, "warmup_steps": 50, "augment": "flip", "cpu_threads": 2},
    "full": {"arch": "demo-frcnn", "steps": 2000, "batch_size": 16, "lr": 1e-3, "optimizer": "adamw",
             "weight_decay": 1e-4, "warmup_steps": 100, "augment": "flip", "cpu_threads": None},
}


# -- configuration ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainDetectorConfig:
    """A detector training run (validated on creation; stored in ``runs/<id>/params.json``).

    Args:
        data: training ground truth: a COCO json, a folder with ``annotations.json`` or a VOC root
            (relative paths are taken inside the workspace); split: the VOC split to train on.
        val_data: optional evaluation set (same forms); its clean COCO AP / AP50 is reported at the end;
            val_split: its VOC split. Categories are matched by id and name, else by name.
        arch: a registered detector (``core.detection.models.DETECTORS``).
        steps: optimiser updates; batch_size: images per update; lr: peak learning rate; optimizer:
            sgd (momentum 0.9) or adamw; weight_decay: on conv / linear weights only; warmup_steps: linear
            warm-up before the cosine decay to 0.
        augment: flip (horizontal, p = 0.5, boxes mirrored) or none.
        seed: model init, data order, flips and the detector's own box sampling.
        device: auto | cpu | cuda | cuda:N; cpu_threads: torch threads during the run (None: unchanged);
            num_workers: DataLoader workers.
        checkpoint_every: steps between checkpoints (0: only at the end); log_every: steps between
            progress records.
        run_id: resume this run from its ``last.pt``.
    """

    data: str
    val_data: str | None = None
    arch: str = "demo-frcnn"
    split: str = "train"
    val_split: str = "val"
    steps: int = 200
    batch_size: int = 12
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    augment: str = "flip"
    seed: int = 0
    device: str = "auto"
    cpu_threads: int | None = None
    num_workers: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    run_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("data", "split", "val_split"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ConfigError(f"{name} must be a non-empty path or name; got {getattr(self, name)!r}")
        if self.val_data is not None and (not isinstance(self.val_data, str) or not self.val_data.strip()):
            raise ConfigError(f"val_data must be a path or None; got {self.val_data!r}")
        detector_arch(self.arch)  # UnknownName listing the architectures
        for name, choices in (("optimizer", OPTIMIZERS), ("augment", AUGMENTS)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        for name, low, optional in (("steps", 1, False), ("batch_size", 1, False), ("warmup_steps", 0, False),
                                    ("seed", 0, False), ("cpu_threads", 1, True), ("num_workers", 0, False),
                                    ("checkpoint_every", 0, False), ("log_every", 1, False)):
            value = getattr(self, name)
            if optional and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}{' or None' if optional else ''}; got {value!r}")
        if not isinstance(self.lr, int | float) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a number > 0; got {self.lr!r}")
        if not isinstance(self.weight_decay, int | float) or not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0; got {self.weight_decay!r}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        if self.run_id is not None:
            validate_name(self.run_id, "run id")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainDetectorConfig:
        """A config from stored values; unknown keys raise ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown detector training option(s): {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        return cls(**dict(values))


def demo_config(size: str, data: str, val_data: str | None = None, **overrides: Any) -> TrainDetectorConfig:
    """The :data:`DEMO_DETECTOR` recipe of a demo world size as a config (``overrides`` win)."""
    if size not in DEMO_DETECTOR:
        raise ConfigError(f"unknown demo size {size!r}; available: {', '.join(DEMO_DETECTOR)}")
    return TrainDetectorConfig(data=data, val_data=val_data, **{**DEMO_DETECTOR[size], **overrides})


@dataclass(frozen=True)
class DetectorTrainResult:
    """What a call of :func:`train_detector` did. ``finished`` is False when it stopped early.

    ``ap`` / ``ap50``: clean COCO AP@[.5:.95] / AP@.5 on ``val_data`` as fractions (None without it).
    """

    run_id: str
    run_dir: Path
    checkpoint: Path | None
    steps: int
    total_steps: int
    final_loss: float
    seconds: float
    img_per_s: float
    n_images: int
    ap: float | None = None
    ap50: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)
    finished: bool = True


def load_run_config(ws: Workspace, run_id: str) -> TrainDetectorConfig:
    """The stored config of a detector training run, with ``run_id`` set (for resuming).

    Raises:
        UnknownName: no detector training run ``run_id`` in this workspace.
    """
    params = ws.dir("runs", validate_name(run_id, "run id")) / "params.json"
    stored = json.loads(params.read_text(encoding="utf-8")) if params.is_file() else {}
    if stored.get("kind") != RUN_KIND:
        runs = ws.catalog.query("SELECT id FROM runs WHERE kind = ? ORDER BY started_at DESC LIMIT 10", [RUN_KIND])
        raise UnknownName(f"detector training run '{run_id}' not found; recent ones: {', '.join(runs['id']) or 'none'}")
    return replace(TrainDetectorConfig.from_dict(stored["config"]), run_id=run_id)


# -- data ----------------------------------------------------------------------------------------------------
def resolve_data(ws: Workspace, path: str, split: str) -> DetectionSet:
    """A detection set from a path (relative ones inside the workspace), see :func:`open_detection`."""
    p = Path(path).expanduser()
    return open_detection(p if p.is_absolute() else ws.root / p, split=split)


def val_label_map(train: DetectionSet, val: DetectionSet) -> dict[int, int]:
    """Model label (1..K over ``train.categories``) -> ``val`` category id: same id and name, else same name.

    Raises:
        DataError: no category in common.
    """
    by_id = {int(c["id"]): str(c["name"]) for c in val.categories}
    by_name = {str(c["name"]): int(c["id"]) for c in val.categories}
    out: dict[int, int] = {}
    for label, c in enumerate(train.categories, start=1):
        if by_id.get(int(c["id"])) == c["name"]:
            out[label] = int(c["id"])
        elif c["name"] in by_name:
            out[label] = by_name[c["name"]]
    if not out:
        raise DataError(f"val_data {val.name!r} shares no category (by id or name) with the training set {train.name!r}")
    return out


def flip_of(seed: int) -> bool:
    """Whether the sample with augmentation seed ``seed`` is flipped (p = 0.5)."""
    return bool(torch.rand(1, generator=torch.Generator().manual_seed(seed)).item() < 0.5)


class DetectionTrainImages(torch.utils.data.Dataset):
    """Keys ``(image index, augmentation seed)`` -> (image (3, H, W) in [0, 1], target) or (None, reason).

    The target holds the non-crowd boxes (float32 xyxy pixels, mirrored with the image) and labels
    (int64, 1..K in ``categories`` order), torchvision's training format.
    """

    def __init__(self, ds: DetectionSet, augment: str) -> None:
        self.ds = ds
        self.augment = augment
        self.label = {c["id"]: i for i, c in enumerate(ds.categories, start=1)}

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | str]:
        i, seed = key
        try:
            pixels = np.asarray(self.ds.load_image(i))
        except DataError:
            return None, "unreadable_image"
        im = self.ds.images[i]
        keep = ~im.iscrowd
        boxes = torch.from_numpy(im.boxes[keep].copy())
        labels = torch.tensor([self.label[int(c)] for c in im.category_ids[keep]], dtype=torch.int64)
        image = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div_(255.0)
        if self.augment == "flip" and flip_of(seed):
            width = image.shape[-1]
            image = image.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes.reshape(-1, 4), "labels": labels}


def collate(items: Sequence[tuple[Any, Any]]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]], dict[str, int]]:
    """The readable samples of a batch as lists (torchvision's detection input), plus skips by reason."""
    good = [(img, t) for img, t in items if img is not None]
    bad = Counter(str(t) for img, t in items if img is None)
    return [img for img, _ in good], [t for _, t in good], dict(bad)


# -- state and checkpoints -----------------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a checkpoint holds, live."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    losses: list[float] = field(default_factory=list)


def build_state(cfg: TrainDetectorConfig, num_classes: int, device: torch.device) -> TrainState:
    """Model (seeded init), optimiser (decay on weights with >= 2 dims only) and schedule at step 0."""
    from core.train.schedule import warmup_cosine_scheduler

    torch.manual_seed(cfg.seed)
    model = build_detector(cfg.arch, num_classes).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = (torch.optim.AdamW(groups, lr=cfg.lr) if cfg.optimizer == "adamw"
                 else torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9))
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps)
    return TrainState(model, optimizer, scheduler)


def save_state(state: TrainState, cfg: TrainDetectorConfig, run_dir: Path, categories: list[dict],
               metrics: Mapping[str, Any] | None = None) -> Path:
    """``checkpoints/last.pt``: a detector checkpoint plus the training state (atomic)."""
    from core.train.clip import checkpoint_dir, rng_state

    path = checkpoint_dir(run_dir) / "last.pt"
    extra = {"step": state.step, "total_steps": cfg.steps, "optimizer": state.optimizer.state_dict(),
             "scheduler": state.scheduler.state_dict(), "rng": rng_state(), "config": cfg.to_dict(),
             "skipped": dict(state.skipped), "losses": list(state.losses), "metrics": dict(metrics or {})}
    save_detector_checkpoint(path, state.model, arch=cfg.arch, categories=categories, extra=extra)
    return path


def load_state(state: TrainState, path: Path) -> None:
    """Restore model, optimiser, schedule, step, counters and the torch RNG from ``last.pt``."""
    from core.detection.models import read_detector_checkpoint

    ckpt = read_detector_checkpoint(path)
    if "optimizer" not in ckpt:
        raise DataError(f"{path} holds a detector but no training state; it cannot be resumed")
    state.model.load_state_dict(ckpt["state_dict"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.step = int(ckpt["step"])
    state.skipped = Counter(ckpt.get("skipped", {}))
    state.losses = [float(v) for v in ckpt.get("losses", [])]
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def train_step(state: TrainState, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]],
               device: torch.device) -> dict[str, float] | None:
    """One update on a batch; returns the loss and its parts, or None when the loss was not finite
    (the update is skipped and counted)."""
    images = [img.to(device) for img in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    parts = state.model(images, targets)
    loss = sum(parts.values())
    if not torch.isfinite(loss):
        state.skipped["non_finite_loss"] += 1
        log.warning("step %d: non-finite loss (%s); update skipped", state.step,
                    {k: float(v) for k, v in parts.items()})
        return None
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in state.model.parameters() if p.requires_grad], GRAD_CLIP)
    state.optimizer.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts.items()}}


# -- the loop ------------------------------------------------------------------------------------------------
@dataclass
class _Loop:
    """Per-call plumbing: config, where to write, the bar, the progress window."""

    cfg: TrainDetectorConfig
    run_dir: Path
    device: torch.device
    categories: list[dict]
    bar: Any = None
    window: list[dict[str, float]] = field(default_factory=list)
    images: int = 0
    total_images: int = 0
    start: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    def run(self, state: TrainState, batches: Iterable[Any], stop_at: int) -> None:
        for images, targets, bad in batches:
            state.skipped.update(bad)
            out = train_step(state, images, targets, self.device) if images else None
            if out is not None:
                state.losses.append(out["loss"])
                self.window.append(out)
                self.images += len(images)
            state.scheduler.step()
            state.step += 1
            self.after_step(state)
            if state.step >= stop_at:
                break

    def after_step(self, state: TrainState) -> None:
        from core.runs import ProgressWriter

        if self.bar is not None:
            self.bar.update(1)
        step, cfg = state.step, self.cfg
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - self.start
            self.seconds += elapsed
            self.total_images += self.images
            keys = self.window[0].keys() if self.window else ("loss",)
            rec = {k: _mean([w[k] for w in self.window]) for k in keys}
            lr = float(state.scheduler.get_last_lr()[0])
            ProgressWriter(self.run_dir).write(stage="train", step=step, total=cfg.steps, lr=lr,
                                               img_per_s=self.images / elapsed if elapsed > 0 else 0.0, **rec)
            log.info("step %d/%d loss %.4f lr %.3g", step, cfg.steps, rec["loss"], lr)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}")
            self.window, self.images, self.start = [], 0, time.perf_counter()
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_state(state, cfg, self.run_dir, self.categories)

    @property
    def img_per_s(self) -> float:
        return self.total_images / self.seconds if self.seconds > 0 else 0.0


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# -- entry point ---------------------------------------------------------------------------------------------
def train_detector(ws: Workspace, cfg: TrainDetectorConfig, *, progress: bool = False,
                   stop_after_steps: int | None = None) -> DetectorTrainResult:
    """Train (or resume, when ``cfg.run_id`` is set) a detector; see the module docstring.

    Args:
        progress: show a tqdm bar (CLI); the run's progress file is written either way.
        stop_after_steps: stop after this many updates in this call, checkpointing first (simulates an
            interruption; the run is then marked ``cancelled`` and resumes with ``run_id``).

    Raises:
        UnknownName: unknown architecture or run. ConfigError: a resumed run's config differs; data in
            neither format. DataError / MissingFileError: unreadable or missing annotations, fewer images
            than a batch, a val set without common categories.
    """
    from core.models import select_device, torch_threads
    from core.train.clip import file_log

    device = select_device(cfg.device)
    if cfg.run_id:
        _check_resume(ws, cfg)
    train = resolve_data(ws, cfg.data, cfg.split)
    if len(train) < cfg.batch_size:
        raise DataError(f"{len(train)} training images cannot fill one batch of {cfg.batch_size}",
                        hint="lower batch_size")
    val = resolve_data(ws, cfg.val_data, cfg.val_split) if cfg.val_data else None
    val_map = val_label_map(train, val) if val is not None else None
    with torch_threads(cfg.cpu_threads), _run_scope(ws, cfg) as run, file_log(run.dir, True):
        result = _train_in_run(ws, cfg, run, train, (val, val_map), device, progress, stop_after_steps)
        if not result.finished:
            run.message = f"stopped at step {result.steps} of {result.total_steps}; resume with run_id={run.id}"
    if not result.finished:
        ws.catalog.execute("UPDATE runs SET status = 'cancelled' WHERE id = ?", [run.id])
    return result


def _run_scope(ws: Workspace, cfg: TrainDetectorConfig) -> Any:
    from core.runs import recorded_run, resumed_run

    if cfg.run_id:
        return resumed_run(ws, cfg.run_id, RUN_KIND)
    return recorded_run(ws, RUN_KIND, {k: v for k, v in cfg.to_dict().items() if k != "run_id"}, seed=cfg.seed)


def _check_resume(ws: Workspace, cfg: TrainDetectorConfig) -> None:
    """Refuse, before touching the run's record, a resume whose config differs from the stored one."""
    stored = load_run_config(ws, cfg.run_id or "")
    diffs = [f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(cfg)
             if f.name not in RESUMABLE_OVERRIDES and getattr(stored, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise ConfigError(f"cannot resume run {cfg.run_id} with a different config ({'; '.join(diffs)})",
                          hint="resume with the stored config (load_run_config)")


def _train_in_run(ws: Workspace, cfg: TrainDetectorConfig, run: Any, train: DetectionSet,
                  val: tuple[DetectionSet | None, dict[int, int] | None], device: torch.device, progress: bool,
                  stop_after_steps: int | None) -> DetectorTrainResult:
    from torch.utils.data import DataLoader

    from core.train.clip import StepBatchSampler, checkpoint_dir

    last = checkpoint_dir(run.dir) / "last.pt"
    state = build_state(cfg, len(train.categories) + 1, device)
    if cfg.run_id and last.is_file():
        load_state(state, last)
        log.info("resumed run %s at step %d of %d", run.id, state.step, cfg.steps)
    else:
        log.info("training %s on %s: %d images, %d boxes, %d categories, %d steps of %d", cfg.arch, train.name,
                 len(train), train.n_boxes, len(train.categories), cfg.steps, cfg.batch_size)
    sampler = StepBatchSampler(len(train), cfg.batch_size, seed=cfg.seed, total_steps=cfg.steps,
                               start_step=state.step)
    # A generator of its own: the loader's base seed would otherwise be drawn from the global torch RNG,
    # which the detector's box samplers use and the checkpoint restores (a resume would draw it twice).
    loader = DataLoader(DetectionTrainImages(train, cfg.augment), batch_sampler=sampler, collate_fn=collate,
                        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed))
    stop_at = cfg.steps if stop_after_steps is None else min(cfg.steps, state.step + stop_after_steps)
    loop = _Loop(cfg, run.dir, device, train.categories)
    _run_loop(loop, state, loader, stop_at, progress)
    return _finish(ws, cfg, run, train, val, state, loop)


def _run_loop(loop: _Loop, state: TrainState, loader: Any, stop_at: int, progress: bool) -> None:
    from core.train.clip import progress_bar

    with progress_bar(progress, loop.cfg.steps, state.step) as loop.bar:
        if loop.bar is not None:
            loop.bar.set_description("train detector")
        try:
            if state.step < stop_at:
                loop.run(state, loader, stop_at)
        except KeyboardInterrupt:
            save_state(state, loop.cfg, loop.run_dir, loop.categories)
            raise


def clean_ap(model: torch.nn.Module, ds: DetectionSet, label_to_category: Mapping[int, int],
             device: torch.device, batch_size: int = 16) -> dict[str, float]:
    """COCO AP / AP50 / AP75 (fractions) of ``model`` on the clean images of ``ds``."""
    from core.detection.coco_eval import coco_ap, predict

    pairs = ((np.asarray(ds.load_image(i)), im.image_id) for i, im in enumerate(ds.images))
    detections = predict(model, pairs, label_to_category=label_to_category, batch_size=batch_size, device=device)
    return coco_ap(ds.coco_gt(), detections)


def _finish(ws: Workspace, cfg: TrainDetectorConfig, run: Any, train: DetectionSet,
            val: tuple[DetectionSet | None, dict[int, int] | None], state: TrainState,
            loop: _Loop) -> DetectorTrainResult:
    """Clean AP on val_data, final checkpoint, data summary, catalog metrics; the result."""
    finished = state.step >= cfg.steps
    final_loss = _mean(state.losses[-min(len(state.losses), cfg.log_every):])
    scores = None
    val_ds, val_map = val
    if finished and val_ds is not None and val_map is not None:
        scores = clean_ap(state.model, val_ds, val_map, loop.device)
        log.info("clean AP on %s: %.4f, AP50 %.4f (%d images)", val_ds.name, scores["ap"], scores["ap50"],
                 len(val_ds))
    metrics = {"final_loss": final_loss, "img_per_s": loop.img_per_s, **(scores or {})}
    ckpt = save_state(state, cfg, run.dir, train.categories, metrics)
    skipped = {**train.skipped, **{f"train_{k}": v for k, v in state.skipped.items()}}
    atomic.write_json(Path(run.dir) / "data.json", {
        "train": train.name, "n_images": len(train), "n_boxes": train.n_boxes,
        "categories": train.categories, "skipped": skipped, "val": val_ds.name if val_ds is not None else None,
    })
    if finished:
        _record_metrics(ws, run.id, cfg, train, val_ds, final_loss, loop.img_per_s, scores)
    return DetectorTrainResult(run.id, Path(run.dir), ckpt, state.step, cfg.steps, final_loss, loop.seconds,
                               loop.img_per_s, len(train), scores["ap"] if scores else None,
                               scores["ap50"] if scores else None, skipped, finished)


def _record_metrics(ws: Workspace, run_id: str, cfg: TrainDetectorConfig, train: DetectionSet,
                    val: DetectionSet | None, final_loss: float, img_per_s: float,
                    scores: Mapping[str, float] | None) -> None:
    base = {"run_id": run_id, "model": f"detector:{run_id}", "dataset": train.name, "corruption": None,
            "severity": 0, "adaptation": "none"}
    rows = [{**base, "metric": "train_loss_final", "value": None if math.isnan(final_loss) else final_loss},
            {**base, "metric": "train_img_per_s", "value": img_per_s}]
    if scores is not None and val is not None:
        rows += [{**base, "dataset": val.name, "metric": "AP", "value": 100.0 * scores["ap"]},
                 {**base, "dataset": val.name, "metric": "AP50", "value": 100.0 * scores["ap50"]}]
    ws.catalog.insert("metrics", rows, replace_where="run_id = ? AND metric IN "
                      "('train_loss_final', 'train_img_per_s', 'AP', 'AP50')", replace_params=[run_id])


__all__ = [
    "DEMO_DETECTOR", "DETECTORS", "RUN_KIND", "DetectorTrainResult", "TrainDetectorConfig", "demo_config",
    "load_run_config", "train_detector",
]
