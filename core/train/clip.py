"""CLIP training on a registered dataset, or on the ids a pruning manifest kept.

``train_clip(ws, cfg)`` trains an open_clip architecture (default the project's ``demo-vit-tiny``) on
(image, caption) pairs of a dataset index with InfoNCE or AnInfoNCE (``core.train.losses``), AdamW and
a warm-up + cosine schedule (``core.train.schedule``). Everything lands in ``runs/<id>/``:
``params.json`` (resolved config), ``progress.jsonl`` (step, total, loss, lr, img/s), ``log.txt``,
``data.json`` (samples used and skipped, by reason) and ``checkpoints/step-NNNNNN.pt`` + ``last.pt``.
The final loss and throughput go to the catalog's ``metrics`` table (model ``clip:<run id>``).

Checkpoints hold the model (``state_dict``, reloadable with ``core.models.load_clip(arch,
checkpoint=path)``), the loss module (logit scale / lam), optimiser, scheduler, grad scaler, step,
RNG states and config. Resuming (``run_id=...``) continues the same run folder from ``last.pt``; the
step count, LR schedule and data order continue exactly, because the batch of step k (its sample
order: a permutation drawn from a torch Generator seeded by (seed, epoch); and its augmentations:
each sample's crop drawn from a generator seeded by (seed, step, slot)) is a pure function of the seed
and k, independent of workers, and the checkpoint restores every other state. So an interrupted and
resumed run ends with the weights of an uninterrupted one (bit-identical on CPU in our tests).

Several GPUs: launch with torchrun (``WORLD_SIZE`` > 1): one process per GPU, NCCL (gloo on CPU),
each rank reads its shard of every global batch, features are all-gathered for the loss (gradients
flow through the local shard, open_clip's approach), DDP averages gradients, and only rank 0 writes
files and the catalog. See docs/training.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler

from core import atomic
from core.errors import ConfigError, DataError, MissingFileError, PrunescopeError, UnknownName
from core.models import torch_threads
from core.train.losses import LOSSES, create_loss, loss_param_groups, total_loss
from core.train.schedule import warmup_cosine_scheduler
from core.workspace import Workspace, validate_name

log = logging.getLogger(__name__)

RUN_KIND = "train-clip"
CHECKPOINT_FORMAT = "prunescope.train_clip/1"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: Fields a resumed run may change; every other one must equal the stored config.
RESUMABLE_OVERRIDES = ("device", "precision", "num_workers", "cpu_threads", "log_every", "checkpoint_every",
                       "keep_checkpoints", "run_id")


# -- configuration ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainClipConfig:
    """A CLIP training run (validated on creation; stored in ``runs/<id>/params.json``).

    Args:
        dataset: a registered dataset with captions.
        manifest: a pruning manifest (a parquet path, or a manifest id under ``manifests/``) whose
            ``id`` column lists the kept ids; only those index rows are used. A manifest that also
            lists removed rows marks them with ``kept = false`` or a non-null ``reason``.
        model / pretrained: open_clip architecture and optional pretrained tag to start from.
        loss: a registered loss (``infonce``, ``aninfonce``).
        steps: optimiser updates in total; batch_size: samples per update per process.
        lr: AdamW peak LR of the model; lambda_lr: peak LR of AnInfoNCE's lam (paper: 1e-3).
        weight_decay: AdamW decay of weight matrices (not of biases, norms, logit scale, lam).
        warmup_steps: linear warm-up length; min_lr_ratio: cosine floor as a fraction of the peak.
        grad_clip: max global gradient norm (None: no clipping).
        checkpoint_every: steps between checkpoints (0: only at the end); keep_checkpoints: how many
            ``step-*.pt`` files to keep besides ``last.pt`` (0 keeps all).
        seed: model init, data order and augmentations.
        device: auto | cpu | cuda | cuda:N; precision: auto (bf16/fp16 autocast on CUDA, fp32 on CPU),
            fp32, bf16, fp16 (fp16 uses a GradScaler).
        num_workers: DataLoader worker processes (0 = load in the main process).
        cpu_threads: torch intra-op threads during the run (restored after); None keeps torch's
            default. On a small CPU shared with other work, 1 can be several times faster than all
            cores (demo-vit-tiny, batch 64, 2 busy cores: 85-100 img/s with 1 thread, 15 with 2).
        log_every: steps between progress records and log lines.
        run_id: resume this run from its ``last.pt`` instead of starting a new one.
    """

    dataset: str
    manifest: str | None = None
    model: str = "demo-vit-tiny"
    pretrained: str | None = None
    loss: str = "infonce"
    steps: int = 100
    batch_size: int = 64
    lr: float = 5e-4
    lambda_lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    seed: int = 0
    device: str | None = None
    precision: str = "auto"
    num_workers: int = 0
    cpu_threads: int | None = None
    log_every: int = 10
    run_id: str | None = None

    def __post_init__(self) -> None:
        validate_name(self.dataset, "dataset name")
        if self.loss not in LOSSES:
            LOSSES.entry(self.loss)  # raises UnknownName listing the losses
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        for name, low in (("steps", 1), ("batch_size", 2), ("warmup_steps", 0), ("checkpoint_every", 0),
                          ("keep_checkpoints", 0), ("num_workers", 0), ("log_every", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}")
        if self.warmup_steps > self.steps:
            raise ConfigError(f"warmup_steps ({self.warmup_steps}) must not exceed steps ({self.steps})")
        for name in ("lr", "lambda_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0; got {getattr(self, name)}")
        if self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("weight_decay must be >= 0 and min_lr_ratio in [0, 1]")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ConfigError(f"cpu_threads must be an integer >= 1 or None; got {self.cpu_threads!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or None; got {self.grad_clip}")
        if self.run_id is not None:
            validate_name(self.run_id, "run id")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainClipConfig:
        """A config from stored values; unknown keys raise ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**dict(values))


@dataclass(frozen=True)
class TrainResult:
    """What a call of :func:`train_clip` did. ``finished`` is False when it stopped early."""

    run_id: str
    run_dir: Path
    checkpoint: Path | None
    steps: int
    total_steps: int
    final_loss: float
    img_per_s: float
    n_samples: int
    skipped: dict[str, int] = field(default_factory=dict)
    finished: bool = True


def load_run_config(ws: Workspace, run_id: str) -> TrainClipConfig:
    """The stored config of a training run, with ``run_id`` set (for ``prunescope train clip --resume``).

    Raises:
        UnknownName: no training run ``run_id`` in this workspace.
    """
    params = ws.dir("runs", validate_name(run_id, "run id")) / "params.json"
    if not params.is_file():
        runs = ws.catalog.query("SELECT id FROM runs WHERE kind = ? ORDER BY started_at DESC LIMIT 10", [RUN_KIND])
        listed = ", ".join(runs["id"]) or "none"
        raise UnknownName(f"training run '{run_id}' not found; recent training runs: {listed}")
    stored = json.loads(params.read_text(encoding="utf-8"))
    if stored.get("kind") != RUN_KIND:
        raise UnknownName(f"run '{run_id}' is a {stored.get('kind')} run, not a CLIP training run")
    return replace(TrainClipConfig.from_dict(stored["config"]), run_id=run_id)


# -- data ---------------------------------------------------------------------------------------------
def read_manifest_ids(ws: Workspace, manifest: str) -> set[str]:
    """Kept ids of a manifest (a parquet path, or an id under ``manifests/``)."""
    path = Path(manifest).expanduser()
    if not path.is_file():
        by_id = ws.dir("manifests", f"{manifest}.parquet")
        if not by_id.is_file():
            raise MissingFileError(f"manifest {manifest} not found (neither a file nor {by_id})")
        path = by_id
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds for a bad file
        raise DataError(f"manifest {path} cannot be read as parquet: {' '.join(str(exc).split())[:200]}") from None
    if "id" not in df.columns:
        raise DataError(f"manifest {path} has no 'id' column; columns: {', '.join(map(str, df.columns))}")
    if "kept" in df.columns:
        df = df[df["kept"].fillna(False).astype(bool)]
    elif "reason" in df.columns:
        df = df[df["reason"].isna()]
    return set(df["id"].astype(str))


def training_index(ws: Workspace, cfg: TrainClipConfig) -> tuple[Any, pd.DataFrame, Counter[str]]:
    """The dataset, its usable index rows (manifest-filtered, captioned) and the per-reason skip counts."""
    from core.datasets import open_dataset

    ds = open_dataset(ws, cfg.dataset)
    index = ds.index
    skipped: Counter[str] = Counter()
    if cfg.manifest:
        kept = read_manifest_ids(ws, cfg.manifest)
        in_manifest = index["id"].astype(str).isin(kept)
        skipped["not_in_manifest"] = int((~in_manifest).sum())
        skipped["manifest_id_not_in_dataset"] = len(kept - set(index["id"].astype(str)))
        index = index[in_manifest]
    captions = index["caption"].astype("string").str.strip()
    has_caption = captions.notna() & (captions.str.len() > 0)
    skipped["missing_caption"] = int((~has_caption).sum())
    index = index[has_caption.fillna(False)].reset_index(drop=True)
    if index.empty:
        raise DataError(f"dataset '{cfg.dataset}' has no captioned samples to train on"
                        + (f" among the ids of manifest {cfg.manifest}" if cfg.manifest else ""))
    return ds, index, Counter({k: v for k, v in skipped.items() if v})


def sample_seed(seed: int, step: int, slot: int) -> int:
    """Seed of one sample's augmentation: a fixed mix of (run seed, step, slot in the global batch)."""
    return (seed * 0x9E3779B1 + step * 0x85EBCA77 + slot * 0xC2B2AE3D) % (2**63 - 1)


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(row, augmentation seed)`` for steps ``[start_step, total_steps)``.

    Epoch e is ``torch.randperm(n)`` from a Generator seeded with (seed, e), cut into global batches of
    ``batch_size * world_size``; rank r takes slice r of each. Batch k is a function of (seed, k) only,
    so a resumed run reads exactly the batches an uninterrupted one would. The tail of each epoch that
    does not fill a global batch is dropped (every rank sees the same number of equal batches).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int, total_steps: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.total_steps, self.start_step = total_steps, start_step
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // (batch_size * world_size)
        if self.per_epoch < 1:
            raise DataError(f"{n} training samples cannot fill one batch of {batch_size} x {world_size} process(es)",
                            hint="lower --batch-size")

    def permutation(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def batch(self, step: int, perm: torch.Tensor | None = None) -> list[tuple[int, int]]:
        epoch, k = divmod(step, self.per_epoch)
        perm = self.permutation(epoch) if perm is None else perm
        size = self.batch_size
        first = k * size * self.world_size + self.rank * size
        return [(int(perm[first + j]), sample_seed(self.seed, step, self.rank * size + j)) for j in range(size)]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        cached: tuple[int, torch.Tensor] | None = None
        for step in range(self.start_step, self.total_steps):
            epoch = step // self.per_epoch
            if cached is None or cached[0] != epoch:
                cached = (epoch, self.permutation(epoch))
            yield self.batch(step, cached[1])

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


class CaptionedImages(torch.utils.data.Dataset):
    """Index rows -> (image tensor, caption) with the training transform; an unreadable image gives
    ``(None, reason)``. Each sample's augmentation draws from the global torch RNG re-seeded with the
    sample's seed inside ``fork_rng``, so it does not depend on workers and leaves the RNG as it was."""

    def __init__(self, dataset: Any, rows: pd.DataFrame, transform: Callable[[Any], torch.Tensor]) -> None:
        self.dataset = dataset
        self.rows = rows.to_dict("records")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, str]:
        from core.sources import SampleError

        i, seed = key
        row = self.rows[i]
        try:
            image = self.dataset.load_image(row)
        except SampleError as exc:
            return None, exc.reason
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), str(row["caption"])


class Collate:
    """Stacks the readable samples of a batch, tokenizes their captions, counts the unreadable ones."""

    def __init__(self, tokenizer: Callable[..., torch.Tensor]) -> None:
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[tuple[torch.Tensor | None, str]]) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, int]]:
        good = [(img, cap) for img, cap in items if img is not None]
        bad = Counter(reason for img, reason in items if img is None)
        if not good:
            return None, None, dict(bad)
        images = torch.stack([img for img, _ in good])
        return images, self.tokenizer([cap for _, cap in good]), dict(bad)


# -- distributed ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device or "auto") not in ("cpu",)
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), owns)


def rank_device(info: DistInfo, device: str | None) -> torch.device:
    """This process's device: under torchrun, ``cuda:<local rank>`` when CUDA is used."""
    from core.models import select_device

    dev = select_device(device)
    if info.enabled and dev.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return dev


def gather_features(a: torch.Tensor, b: torch.Tensor, info: DistInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' (a, b) rows concatenated in rank order; gradients flow through this rank's rows only
    (open_clip's ``gather_features`` without ``gather_with_grad``). Ranks may hold different counts."""
    if not info.enabled:
        return a, b
    count = torch.tensor([a.shape[0]], device=a.device)
    counts = [torch.zeros_like(count) for _ in range(info.world_size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    out = []
    for local in (a, b):
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
        padded[: local.shape[0]] = local.detach()
        parts = [torch.zeros_like(padded) for _ in range(info.world_size)]
        dist.all_gather(parts, padded)
        parts = [p[:s] for p, s in zip(parts, sizes, strict=True)]
        parts[info.rank] = local
        out.append(torch.cat(parts))
    return out[0], out[1]


def _broadcast(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- model, loss, optimiser ---------------------------------------------------------------------------
@dataclass
class TrainState:
    """Everything a checkpoint holds, live."""

    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    step: int = 0
    skipped_images: Counter[str] = field(default_factory=Counter)


def build_loss(cfg: TrainClipConfig, model: nn.Module, embed_dim: int) -> nn.Module:
    """The loss module; InfoNCE shares the model's ``logit_scale`` so a saved model carries it, and a
    loss without one leaves the model's scale frozen (so DDP sees no unused trainable parameter)."""
    params = {"seed": cfg.seed} if "seed" in {p.name for p in LOSSES.entry(cfg.loss).params} else {}
    loss = create_loss(cfg.loss, dim=embed_dim, **params)
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, nn.Parameter):
        if hasattr(loss, "logit_scale"):
            loss.logit_scale = scale
        else:
            scale.requires_grad_(False)
    return loss


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # open_clip's rule: biases, gains (1-d), norms and the logit scale get no weight decay.
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(cfg: TrainClipConfig, model: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    """AdamW (betas 0.9/0.98, eps 1e-6 as CLIP) with decay / no-decay groups and the loss's own group."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not _no_decay(n, p)]
    no_decay = [p for n, p in named if _no_decay(n, p)]
    groups: list[dict[str, Any]] = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    seen = {id(p) for _, p in named}
    groups += loss_param_groups(loss, lr=cfg.lr, lambda_lr=cfg.lambda_lr, exclude=seen)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)


def build_state(cfg: TrainClipConfig, device: torch.device) -> tuple[TrainState, Any]:
    """Model (seeded init), loss, optimiser, scheduler and scaler at step 0; also the LoadedClip."""
    from core.models import load_clip, resolve_precision

    torch.manual_seed(cfg.seed)
    clip = load_clip(cfg.model, cfg.pretrained, device=str(device), precision=cfg.precision)
    model = clip.model.train()
    loss = build_loss(cfg, model, clip.embed_dim).to(device)
    optimizer = build_optimizer(cfg, model, loss)
    scheduler = warmup_cosine_scheduler(optimizer, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                                        min_ratio=cfg.min_lr_ratio)
    fp16 = resolve_precision(device, cfg.precision) == "fp16"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    return TrainState(model, loss, optimizer, scheduler, scaler), clip


# -- checkpoints --------------------------------------------------------------------------------------------
def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(state: TrainState, cfg: TrainClipConfig, run_dir: Path, *, world_size: int = 1,
                    metrics: Mapping[str, float] | None = None, skipped: Mapping[str, int] | None = None,
                    keep: int = 0) -> Path:
    """Write ``step-NNNNNN.pt`` and copy it to ``last.pt``, both atomically; prune old step files.

    The file loads with ``torch.load(..., weights_only=True)``; ``state_dict`` is the bare model's.
    ``skipped`` (default: this process's count) is the unreadable-image count of all ranks so far.
    """
    folder = checkpoint_dir(run_dir)
    obj = {
        "format": CHECKPOINT_FORMAT, "arch": cfg.model, "step": state.step, "total_steps": cfg.steps,
        "world_size": world_size,
        "state_dict": _unwrap(state.model).state_dict(), "loss_name": cfg.loss, "loss": state.loss.state_dict(),
        "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(), "rng": rng_state(), "config": cfg.to_dict(),
        "metrics": dict(metrics or {}), "skipped_images": dict(state.skipped_images if skipped is None else skipped),
    }
    path = folder / f"step-{state.step:06d}.pt"
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)
    with atomic.atomic_path(folder / "last.pt") as tmp:
        shutil.copyfile(path, tmp)
    if keep:
        for old in sorted(folder.glob("step-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(state: TrainState, path: Path, device: torch.device) -> dict[str, Any]:
    """Restore every part of ``state`` (and the RNG) from a checkpoint; returns the raw dict."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{path} is not a prunescope training checkpoint (format {ckpt.get('format')!r})")
    _unwrap(state.model).load_state_dict(ckpt["state_dict"])
    state.loss.load_state_dict(ckpt["loss"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    # Counts are of all ranks: rank 0 carries them on, the others count afresh.
    main = not dist.is_initialized() or dist.get_rank() == 0
    state.skipped_images = Counter(ckpt.get("skipped_images", {}) if main else {})
    torch.set_rng_state(ckpt["rng"]["torch"])
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt


def global_skips(local: Counter[str], info: DistInfo) -> Counter[str]:
    """Unreadable-image counts summed over all ranks (a collective call under torchrun)."""
    if not info.enabled:
        return Counter(local)
    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, dict(local))
    return sum((Counter(p) for p in parts), Counter())


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# -- run records ----------------------------------------------------------------------------------------
def _resumed_run(ws: Workspace, run_id: str) -> Any:
    """``recorded_run``'s bookkeeping for an existing training run (UnknownName when there is none)."""
    from core.runs import resumed_run

    return resumed_run(ws, run_id, RUN_KIND)


@contextlib.contextmanager
def _run_scope(ws: Workspace, cfg: TrainClipConfig, info: DistInfo) -> Iterator[Any]:
    """Rank 0 checks and records the run (new or resumed) and tells the other ranks its id and folder."""
    from core.runs import RunHandle, recorded_run

    if not info.is_main:
        run_id, run_dir = _broadcast(None, info)
        if run_id is None:
            raise PrunescopeError("rank 0 could not open the run; see its error")
        yield RunHandle(run_id, Path(run_dir))
        return
    announced = False
    try:
        if cfg.run_id:
            _check_resume(ws, cfg, info)
        stored = {k: v for k, v in cfg.to_dict().items() if k != "run_id"}
        scope = _resumed_run(ws, cfg.run_id) if cfg.run_id else recorded_run(ws, RUN_KIND, stored, seed=cfg.seed)
        with scope as handle:
            _broadcast((handle.id, str(handle.dir)), info)
            announced = True
            yield handle
    finally:
        if not announced:
            _broadcast((None, None), info)


@contextlib.contextmanager
def file_log(run_dir: Path, enabled: bool) -> Iterator[None]:
    """Send ``core.*`` log records (INFO and up) to ``run_dir/log.txt`` while training."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("core")
    handler = logging.FileHandler(Path(run_dir) / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


def _check_resume(ws: Workspace, cfg: TrainClipConfig, info: DistInfo) -> None:
    """Refuse, before touching the run's record, a resume whose config or world size differs."""
    stored = load_run_config(ws, cfg.run_id or "")
    diffs = [f"{f.name}: {getattr(stored, f.name)!r} -> {getattr(cfg, f.name)!r}" for f in fields(cfg)
             if f.name not in RESUMABLE_OVERRIDES and getattr(stored, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise ConfigError(f"cannot resume run {cfg.run_id} with a different config ({'; '.join(diffs)})",
                          hint="resume with the stored config (prunescope train clip --resume RUN_ID)")
    last = checkpoint_dir(ws.dir("runs", stored.run_id or "")) / "last.pt"
    if last.is_file():
        trained = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("world_size", 1))
        if trained != info.world_size:
            raise ConfigError(f"run {cfg.run_id} was trained with {trained} process(es), not {info.world_size}: "
                              "the global batch and data order depend on it",
                              hint=f"resume with torchrun --nproc_per_node={trained}" if trained > 1
                              else "resume without torchrun")


# -- the loop ------------------------------------------------------------------------------------------------
@dataclass
class _Meter:
    """Loss and throughput over the current log window and the whole call."""

    window_losses: list[float] = field(default_factory=list)
    window_images: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    total_images: int = 0
    total_time: float = 0.0
    last_losses: list[float] = field(default_factory=list)

    def add(self, loss: float, images: int) -> None:
        self.window_losses.append(loss)
        self.window_images += images
        self.total_images += images

    def flush(self) -> tuple[float, float]:
        """(mean loss, img/s) of the window, then start a new one."""
        elapsed = time.perf_counter() - self.window_start
        self.total_time += elapsed
        mean = sum(self.window_losses) / len(self.window_losses) if self.window_losses else float("nan")
        rate = self.window_images / elapsed if elapsed > 0 else 0.0
        if self.window_losses:
            self.last_losses = self.window_losses
        self.window_losses, self.window_images, self.window_start = [], 0, time.perf_counter()
        return mean, rate

    @property
    def img_per_s(self) -> float:
        return self.total_images / self.total_time if self.total_time > 0 else 0.0


def train_step(state: TrainState, images: torch.Tensor, tokens: torch.Tensor, cfg: TrainClipConfig,
               device: torch.device, info: DistInfo) -> float:
    """One update (autocast forward, feature gather, loss, scaled backward, clipping, step); returns the loss."""
    from core.models import autocast

    with autocast(device, cfg.precision):
        out = state.model(images.to(device, non_blocking=True), tokens.to(device, non_blocking=True))
    img_f, txt_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else (out[0], out[1])
    img_f, txt_f = gather_features(img_f.float(), txt_f.float(), info)
    loss = total_loss(state.loss(img_f, txt_f))
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg.grad_clip is not None:
        state.scaler.unscale_(state.optimizer)
        params = [p for g in state.optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return float(loss.detach().item())


def _batch_counts(images: torch.Tensor | None, info: DistInfo, device: torch.device) -> list[int]:
    n = torch.tensor([0 if images is None else images.shape[0]], device=device)
    if not info.enabled:
        return [int(n.item())]
    counts = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(counts, n)
    return [int(c.item()) for c in counts]


def _loop(state: TrainState, loader: DataLoader, cfg: TrainClipConfig, ctx: _LoopContext,
          stop_at: int) -> _Meter:
    meter = _Meter()
    for images, tokens, bad in loader:
        state.skipped_images.update(bad)
        counts = _batch_counts(images, ctx.info, ctx.device)
        if min(counts) == 0 or sum(counts) < 2:
            log.warning("step %d: too few readable images in the batch (%s); update skipped", state.step, counts)
        else:
            meter.add(train_step(state, images, tokens, cfg, ctx.device, ctx.info), sum(counts))
        state.scheduler.step()
        state.step += 1
        ctx.after_step(state, meter)
        if state.step >= stop_at:
            break
    return meter


@dataclass
class _LoopContext:
    """Per-call plumbing of the loop: where to write, how to report."""

    cfg: TrainClipConfig
    run_dir: Path
    device: torch.device
    info: DistInfo
    bar: Any = None
    saved_step: int = -1

    def after_step(self, state: TrainState, meter: _Meter) -> None:
        if self.bar is not None:
            self.bar.update(1)
        cfg, step = self.cfg, state.step
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss, rate = meter.flush()
            lr = _last_lr(state, step - 1)
            if self.info.is_main:
                from core.runs import ProgressWriter

                ProgressWriter(self.run_dir).write(stage="train", step=step, total=cfg.steps, loss=loss,
                                                   lr=lr, img_per_s=rate)
                log.info("step %d/%d loss %.4f lr %.3g img/s %.1f", step, cfg.steps, loss, lr, rate)
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{rate:.0f}")
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            skipped = global_skips(state.skipped_images, self.info)
            if self.info.is_main:
                save_checkpoint(state, cfg, self.run_dir, world_size=self.info.world_size, skipped=skipped,
                                keep=cfg.keep_checkpoints)
            self.saved_step = step


def _last_lr(state: TrainState, step: int) -> float:
    """The LR the update of ``step`` used (first group's: the model's)."""
    base = state.scheduler.base_lrs[0]
    return float(base * state.scheduler.lr_lambdas[0](step))


def train_clip(ws: Workspace, cfg: TrainClipConfig, *, progress: bool = False,
               stop_after_steps: int | None = None) -> TrainResult:
    """Train (or resume, when ``cfg.run_id`` is set) a CLIP model; see the module docstring.

    Args:
        progress: show a tqdm bar (CLI); the run's progress file is written either way.
        stop_after_steps: stop after this many updates in this call, checkpointing first (simulates
            an interruption; the run is then marked ``cancelled`` and resumes with ``run_id``).

    Raises:
        UnknownName: unknown dataset, model, loss or run. ConfigError: a resumed run's config differs.
        DataError: no captioned samples, or fewer than one batch. WeightsUnavailable: pretrained offline.
    """
    info = init_distributed(cfg.device)
    try:
        with torch_threads(cfg.cpu_threads), _run_scope(ws, cfg, info) as run, file_log(run.dir, info.is_main):
            result = _train_in_run(ws, cfg, run, info, progress, stop_after_steps)
            if not result.finished:
                run.message = f"stopped at step {result.steps} of {result.total_steps}; resume with run_id={run.id}"
        if info.is_main and not result.finished:
            ws.catalog.execute("UPDATE runs SET status = 'cancelled' WHERE id = ?", [run.id])
        return result
    finally:
        if info.owns_group:
            dist.destroy_process_group()


def _train_in_run(ws: Workspace, cfg: TrainClipConfig, run: Any, info: DistInfo, progress: bool,
                  stop_after_steps: int | None) -> TrainResult:
    device = rank_device(info, cfg.device)
    ds, rows, skipped = training_index(ws, cfg)
    state, clip = build_state(cfg, device)
    last = checkpoint_dir(run.dir) / "last.pt"
    if cfg.run_id and last.is_file():
        ckpt = load_checkpoint(state, last, device)
        log.info("resumed run %s at step %d of %d", run.id, state.step, cfg.steps)
        if state.step >= cfg.steps:  # nothing left to do: report the finished run as it was
            done = ckpt.get("metrics", {})
            return TrainResult(run.id, run.dir, last, state.step, cfg.steps, float(done.get("final_loss", math.nan)),
                               float(done.get("img_per_s", 0.0)), len(rows), dict(skipped), True)
    else:
        log.info("training %s (%s) on %s: %d samples, %d steps of %d x %d", cfg.model, cfg.loss, cfg.dataset,
                 len(rows), cfg.steps, cfg.batch_size, info.world_size)
    if info.enabled:
        dev_ids = [device.index] if device.type == "cuda" else None
        state.model = nn.parallel.DistributedDataParallel(state.model, device_ids=dev_ids)
    sampler = StepBatchSampler(len(rows), cfg.batch_size, seed=cfg.seed, total_steps=cfg.steps,
                               start_step=state.step, rank=info.rank, world_size=info.world_size)
    loader = DataLoader(CaptionedImages(ds, rows, clip.preprocess_train), batch_sampler=sampler,
                        collate_fn=Collate(clip.tokenizer), num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    stop_at = cfg.steps if stop_after_steps is None else min(cfg.steps, state.step + stop_after_steps)
    return _run_loop(ws, cfg, run, info, state, loader, len(rows), skipped, device, stop_at, progress)


def _run_loop(ws: Workspace, cfg: TrainClipConfig, run: Any, info: DistInfo, state: TrainState,
              loader: DataLoader, n_rows: int, skipped: Counter[str], device: torch.device, stop_at: int,
              progress: bool) -> TrainResult:
    ctx = _LoopContext(cfg, run.dir, device, info)
    with progress_bar(progress and info.is_main, cfg.steps, state.step) as ctx.bar:
        try:
            meter = _loop(state, loader, cfg, ctx, stop_at) if state.step < stop_at else _Meter()
        except KeyboardInterrupt:
            if info.is_main and state.step > max(0, ctx.saved_step):
                save_checkpoint(state, cfg, run.dir, world_size=info.world_size, keep=cfg.keep_checkpoints)
            raise
    final_loss = sum(meter.last_losses) / len(meter.last_losses) if meter.last_losses else float("nan")
    finished = state.step >= cfg.steps
    image_skips = global_skips(state.skipped_images, info)
    ckpt = None
    if info.is_main:
        ckpt = save_checkpoint(state, cfg, run.dir, world_size=info.world_size, skipped=image_skips,
                               keep=cfg.keep_checkpoints, metrics={"final_loss": final_loss, "img_per_s": meter.img_per_s})
        _write_data_summary(run.dir, n_rows, skipped + image_skips)
        if finished:
            _record_metrics(ws, run.id, cfg, final_loss, meter.img_per_s)
    result = TrainResult(run.id, run.dir, checkpoint_dir(run.dir) / "last.pt" if ckpt else None, state.step,
                         cfg.steps, final_loss, meter.img_per_s, n_rows, dict(skipped + image_skips), finished)
    if info.enabled:
        dist.barrier()
    return result


def _write_data_summary(run_dir: Path, n_rows: int, skipped: Mapping[str, int]) -> None:
    atomic.write_json(Path(run_dir) / "data.json", {"n_samples": n_rows, "skipped": dict(skipped)})


def _record_metrics(ws: Workspace, run_id: str, cfg: TrainClipConfig, final_loss: float, img_per_s: float) -> None:
    base = {"run_id": run_id, "model": f"clip:{run_id}", "dataset": cfg.dataset, "corruption": None,
            "severity": 0, "adaptation": "none"}
    rows = [{**base, "metric": "train_loss_final", "value": None if math.isnan(final_loss) else final_loss},
            {**base, "metric": "train_img_per_s", "value": img_per_s}]
    ws.catalog.insert("metrics", rows, replace_where="run_id = ? AND metric IN ('train_loss_final', 'train_img_per_s')",
                      replace_params=[run_id])


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, start: int) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=start, desc="train clip", unit="step") as bar:
        yield bar


# -- command line (torchrun entry point) ---------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """``python -m core.train.clip`` / ``torchrun ... -m core.train.clip``: one flag per config field."""
    parser = argparse.ArgumentParser(prog="python -m core.train.clip", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=None, help="workspace folder (default $PRUNESCOPE_WORKSPACE or data/workspace)")
    parser.add_argument("--resume", default=None, metavar="RUN_ID", help="resume this run with its stored config")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in fields(TrainClipConfig):
        if f.name == "run_id":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        parser.add_argument(flag, type=kind, default=None, help=f"default: {f.default!r}" if f.name != "dataset" else "registered dataset")
    return parser


def config_from_args(args: argparse.Namespace, ws: Workspace) -> TrainClipConfig:
    """The config the flags describe; with ``--resume`` the stored one, overridable in the fields that
    may change on resume (device, precision, workers, logging, checkpointing)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainClipConfig)
             if f.name != "run_id" and getattr(args, f.name) is not None}
    if args.resume:
        stored = load_run_config(ws, args.resume)
        return replace(stored, **given)
    if "dataset" not in given:
        raise ConfigError("--dataset is required (or --resume RUN_ID)")
    return TrainClipConfig(**given)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints ``error: ...`` and returns the error's exit code on a PrunescopeError."""
    args = build_parser().parse_args(argv)
    is_main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        ws = Workspace(args.workspace, create=is_main)
        cfg = config_from_args(args, ws)
        result = train_clip(ws, cfg, progress=is_main and not args.no_progress)
    except PrunescopeError as exc:
        print(f"error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    if is_main:
        print(json.dumps({"run_id": result.run_id, "checkpoint": str(result.checkpoint), "steps": result.steps,
                          "final_loss": result.final_loss, "img_per_s": round(result.img_per_s, 2),
                          "n_samples": result.n_samples, "skipped": result.skipped}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
