"""The test-time adaptation interface: one :class:`Adapter` per method, one registry, one run loop.

An adapter owns a copy of a source classifier and sees the test data batch by batch. For each batch
:meth:`Adapter.predict_and_adapt` returns the logits the method predicts and then adapts (BN statistics,
BN affine parameters), so the next batch sees the adapted model. Methods register a class with
:func:`register` (timm style); the registry entry carries the summary, the paper, ParamSpecs with ranges
(the dashboard renders them as forms) and the reference batch size::

    adapter = create_adapter("tent", model)                # reference defaults, own copy of the model
    for name, logits, batch in adapt_domains(adapter, {"fog-3": loader}, setting="reset"): ...

Settings [Wang et al. 2021; Rusak, Schneider et al. 2022]: ``reset`` (the default) restores the source
model and a fresh optimiser before every domain (each corruption x severity is adapted from the source
model); ``continual`` carries the adapted state from one domain to the next.

Methods that adapt BatchNorm raise :class:`NotApplicable` (a :class:`~core.errors.ConfigError`) for a
model without BatchNorm layers (a CLIP ViT normalises with LayerNorm), so an evaluation grid can report
"not applicable" for that cell instead of failing; :func:`applicable` asks the same without raising.

Pitfall: with batch statistics a prediction depends on the other images in its batch, so shuffle the
test set (:meth:`AdaptConfig.generator`) and keep the batch size fixed (:attr:`AdaptConfig.batch_size`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from core.errors import ConfigError, DataError
from core.registry import ParamSpec, Registry

#: ``reset``: every domain starts from the source model; ``continual``: no reset between domains.
SETTINGS = ("reset", "continual")
#: Autocast precisions (resolved by :func:`core.models.resolve_precision`; ``auto`` = bf16 on CUDA).
PRECISIONS = ("fp32", "auto", "bf16", "fp16")
#: The layers the methods adapt: torch's common (private) base of BatchNorm1d/2d/3d, SyncBatchNorm and the
#: lazy variants; InstanceNorm shares only its grandparent, _NormBase, and is not a BatchNorm.
BatchNorm = _BatchNorm
BN_TYPES: tuple[type[nn.Module], ...] = (_BatchNorm,)
#: Normalisation layers named in a NotApplicable message (what the model has instead of BatchNorm).
_OTHER_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
                                             nn.InstanceNorm3d, nn.LocalResponseNorm)


class NotApplicable(ConfigError):
    """The method cannot adapt this model (it needs BatchNorm layers and the model has none)."""


class Adapter:
    """Base of the registered methods: the source model, unchanged (``none``).

    Subclasses override :meth:`prepare` (which layers adapt, which parameters train) and
    :meth:`predict_and_adapt`. Construction validates the parameters through the registry (None = the
    registered default; unknown or out-of-range values raise ConfigError), so ``Tent(model, lr=1e-3)``
    and ``create_adapter("tent", model, lr=1e-3)`` behave alike.

    Args:
        model: a classifier ``(B, ...) -> (B, classes)`` logits; the device is taken from its parameters.
        inplace: adapt ``model`` itself instead of a deep copy (saves memory; the caller's model is
            changed: TENT-style methods drop its BN running statistics).
        precision: autocast precision of the forward passes: ``fp32`` (none, the default), ``auto``
            (bf16 on CUDA, fp32 elsewhere), ``bf16`` or ``fp16`` (refused for methods that train: no loss
            scaling); resolved into :attr:`precision`. Losses are computed in float32 either way.
        **params: the method's parameters (see ``ADAPTERS.entry(name).params``).

    Raises:
        NotApplicable: the method needs BatchNorm layers and ``model`` has none.
        ConfigError: unknown or out-of-range parameters, an unknown precision.
    """

    name: ClassVar[str] = ""
    #: Whether the method takes gradient steps (fp16 autocast is refused for those: no loss scaling).
    trains: ClassVar[bool] = False

    def __init__(self, model: nn.Module, *, inplace: bool = False, precision: str = "fp32",
                 **params: Any) -> None:
        self.params: dict[str, Any] = ADAPTERS.entry(self.name).validate_params(params)
        check_applicable(self.name, model)
        _check_precision(precision, trains=self.trains)
        self.model = self.prepare(model if inplace else copy.deepcopy(model))
        self.device = model_device(self.model)
        self.precision = _resolve_precision(self.device, precision, trains=self.trains)
        self._source_state = _clone_state(self.model)
        self.batches_seen = 0

    @property
    def epochs(self) -> int:
        """Passes over each domain (:func:`adapt_domain`); 1 = the online, one-pass setting."""
        return int(self.params.get("epochs", 1))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Configures ``model`` for the method and returns it; here: eval mode, no gradients."""
        model.eval()
        model.requires_grad_(False)
        return model

    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """(B, classes) float32 logits for the batch ``x`` (moved to the model's device)."""
        with torch.no_grad():
            logits = self.forward(x)
        self.batches_seen += 1
        return logits.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapted model's raw output on ``x`` under the adapter's autocast (no adaptation)."""
        x = x.to(self.device, non_blocking=True)
        with self.autocast():
            out: torch.Tensor = self.model(x)
        return out

    def reset(self) -> None:
        """Restores the source state (as prepared): parameters, buffers and the batch count."""
        self.model.load_state_dict(self._source_state, strict=True)
        self.batches_seen = 0

    def start_pass(self) -> None:
        """Called by :func:`adapt_domain` before each pass over a domain (soft PL refreshes its teacher)."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The autocast context of the forward passes (a no-op for fp32)."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        from core.models import autocast

        return autocast(self.device, self.precision)


ADAPTERS: Registry[type[Adapter]] = Registry("adaptation method")
A = TypeVar("A", bound=type[Adapter])


def register(name: str, *, summary: str, paper: str = "", params: Iterable[ParamSpec] = (),
             needs_bn: bool = True, batch_size: int | None = None) -> Callable[[A], A]:
    """Register an :class:`Adapter` subclass under ``name`` in :data:`ADAPTERS` (timm-style decorator).

    Args:
        needs_bn: the method adapts BatchNorm layers (a model without them is :class:`NotApplicable`).
        batch_size: the reference test batch size (the default of :attr:`AdaptConfig.batch_size`).
    """

    def deco(cls: A) -> A:
        cls.name = name
        ADAPTERS.register(name, summary=summary, paper=paper, params=tuple(params), needs_bn=needs_bn,
                          batch_size=batch_size)(cls)
        return cls

    return deco


def create_adapter(method: str, model: nn.Module, *, inplace: bool = False, precision: str = "fp32",
                   **params: Any) -> Adapter:
    """A registered method adapting (a copy of) ``model``; parameters left at None take the defaults.

    Raises:
        UnknownName: no such method (the message lists the available ones).
        NotApplicable: the method needs BatchNorm layers and the model has none.
        ConfigError: unknown or out-of-range parameters.
    """
    cls = ADAPTERS.get(method)
    return cls(model, inplace=inplace, precision=precision, **params)


@register("none", summary="the source model in eval mode: no adaptation (works for any model)",
          needs_bn=False)
class NoAdaptation(Adapter):
    """The source model in eval mode; BatchNorm layers normalise with the source running statistics."""


class SelfLearningAdapter(Adapter):
    """Trains only the BN affine parameters on an unsupervised loss: one forward per optimiser step.

    Shared by TENT, ENT, hard/soft PL and RPL [Wang et al. ICLR 2021; Rusak, Schneider et al. TMLR 2022].
    The model runs in eval mode (dropout off) while every BatchNorm layer normalises with the current
    batch's statistics and keeps none (TENT's ``configure_model``: ``track_running_stats=False``, running
    mean and variance None); every parameter except the BN weights and biases is frozen. TENT's code also
    puts the rest of the model in train mode, which differs only for models with dropout.

    Each step is one forward, the loss on its logits, one backward and one optimiser step; the logits
    returned are those of the (last) forward, made before its update. Subclasses define :meth:`loss`.
    """

    trains = True

    def __init__(self, model: nn.Module, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.optimizer = build_optimizer(bn_affine_parameters(self.model), self.params)
        self._source_optimizer = copy.deepcopy(self.optimizer.state_dict())

    def prepare(self, model: nn.Module) -> nn.Module:
        model = super().prepare(model)
        for _, layer in bn_layers(model):
            use_batch_statistics(layer)
            layer.requires_grad_(True)
        if not bn_affine_parameters(model):
            raise NotApplicable(f"adaptation method '{self.name}' is not applicable: the model's BatchNorm "
                                "layers have no affine parameters to train (affine=False)", hint="use bn")
        return model

    def loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Scalar loss of float32 (B, classes) ``logits`` computed on the batch ``x``."""
        raise NotImplementedError

    def predict_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """(B, classes) float32 logits of the batch's last forward, then that step's update.

        With ``steps`` = 1 (the default) the logits are those of the source-of-this-batch model, i.e.
        before the batch's only update.
        """
        x = x.to(self.device, non_blocking=True)
        logits = self._step(x)
        for _ in range(self.params["steps"] - 1):
            logits = self._step(x)
        self.batches_seen += 1
        return logits

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = self.forward(x)
            loss = self.loss(logits.float(), x)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return logits.detach().float()

    def reset(self) -> None:
        """Restores the source parameters and a fresh optimiser state (no momentum, step counts)."""
        super().reset()
        self.optimizer.load_state_dict(copy.deepcopy(self._source_optimizer))


# -- models ----------------------------------------------------------------------------------------
def bn_layers(model: nn.Module) -> list[tuple[str, BatchNorm]]:
    """``(name, module)`` of every BatchNorm layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def bn_affine_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weight and bias of every affine BatchNorm layer (what TENT and self-learning train)."""
    return [p for _, m in bn_layers(model) for p in (m.weight, m.bias) if isinstance(p, nn.Parameter)]


def use_batch_statistics(layer: BatchNorm) -> None:
    """Makes a BatchNorm layer normalise with batch statistics in train and eval mode and keep none.

    As TENT's ``configure_model``: ``track_running_stats=False`` and running mean/variance None; the
    layer then normalises with the biased batch variance (what ``F.batch_norm`` does in training).
    """
    layer.track_running_stats = False
    layer.running_mean = None
    layer.running_var = None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def applicable(method: str, model: nn.Module) -> bool:
    """Whether ``method`` can adapt ``model`` (False where it needs BatchNorm and the model has none).

    Raises:
        UnknownName: no such method.
    """
    try:
        check_applicable(method, model)
    except NotApplicable:
        return False
    return True


def check_applicable(method: str, model: nn.Module) -> None:
    """Raises :class:`NotApplicable` when ``method`` needs BatchNorm layers and ``model`` has none."""
    if not ADAPTERS.entry(method).extra.get("needs_bn", True) or bn_layers(model):
        return
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, _OTHER_NORMS)})
    has = f" (it normalises with {', '.join(others)})" if others else ""
    work = [e.name for e in ADAPTERS if not e.extra.get("needs_bn", True)]
    raise NotApplicable(f"adaptation method '{method}' is not applicable: the model has no BatchNorm layers{has}",
                        hint=f"methods that adapt any model: {', '.join(work)}")


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _resolve_precision(device: torch.device, precision: str, *, trains: bool) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for ``device`` (``auto``: bf16 on CUDA, fp32 elsewhere)."""
    if precision == "fp32":
        return precision
    from core.models import resolve_precision  # imports open_clip: only when mixed precision is asked for

    return _check_precision(resolve_precision(device, precision), trains=trains)


def _check_precision(precision: str, *, trains: bool) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp16" and trains:
        raise ConfigError("precision fp16 is refused for methods that take gradient steps (no loss scaling)",
                          hint="use bf16 or fp32")
    return precision


# -- running a domain ------------------------------------------------------------------------------
def batch_input(batch: Any) -> torch.Tensor:
    """The images of a batch: the tensor itself, or the first item of a ``(images, labels, ...)`` tuple."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise DataError(f"a test batch must be a tensor or a (images, labels, ...) sequence; got {type(batch).__name__}")


def adapt_domain(adapter: Adapter, batches: Iterable[Any]) -> Iterator[tuple[torch.Tensor, Any]]:
    """Adapts to one domain batch by batch; yields ``(logits, batch)`` of the last pass.

    ``logits`` (B, classes) are the predictions made before each batch's update (TENT's protocol).
    With ``epochs`` > 1 (the self-learning reference adapts for several passes) the earlier passes
    only adapt, so ``batches`` must be re-iterable (a DataLoader or a list, not a generator); a shuffling
    loader visits the images in a new order each pass, hence each batch is yielded with its logits.
    No reset happens here: see :func:`adapt_domains`.
    """
    epochs = adapter.epochs
    if epochs > 1 and isinstance(batches, Iterator):
        raise ConfigError(f"{epochs} passes over a domain need re-iterable batches (a DataLoader or a list), "
                          "got a one-shot iterator")
    for epoch in range(epochs):
        adapter.start_pass()
        for batch in batches:
            logits = adapter.predict_and_adapt(batch_input(batch))
            if epoch == epochs - 1:
                yield logits, batch


def adapt_domains(adapter: Adapter, domains: Mapping[str, Iterable[Any]] | Iterable[tuple[str, Iterable[Any]]],
                  *, setting: str = "reset") -> Iterator[tuple[str, torch.Tensor, Any]]:
    """Adapts to several domains in order; yields ``(domain, logits, batch)``.

    ``reset`` restores the source model and optimiser before every domain; ``continual`` never resets.
    """
    if setting not in SETTINGS:
        raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}; got {setting!r}")
    items = domains.items() if isinstance(domains, Mapping) else domains
    for name, batches in items:
        if setting == "reset":
            adapter.reset()
        for logits, batch in adapt_domain(adapter, batches):
            yield name, logits, batch


# -- config ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdaptConfig:
    """A resolved, validated adaptation run: what a run stores next to its outputs.

    Attributes:
        method: a registered method name.
        params: the method's parameters; resolved on creation (defaults filled in, ranges checked).
        setting: ``reset`` (source model per domain, the default) or ``continual``.
        seed: seeds :meth:`generator`, the shuffle order of the test batches (the methods themselves are
            deterministic: the model runs in eval mode).
        batch_size: test batch size; None = the method's reference batch size (None for ``none``).
        precision: autocast precision of the forward passes.

    Raises:
        UnknownName, ConfigError: on creation, for an unknown method or a bad value.
    """

    method: str = "none"
    params: Mapping[str, Any] = field(default_factory=dict)
    setting: str = "reset"
    seed: int = 0
    batch_size: int | None = None
    precision: str = "fp32"

    def __post_init__(self) -> None:
        entry = ADAPTERS.entry(self.method)
        object.__setattr__(self, "params", entry.validate_params(dict(self.params)))
        if self.setting not in SETTINGS:
            raise ConfigError(f"setting must be one of {', '.join(SETTINGS)}; got {self.setting!r}")
        object.__setattr__(self, "seed", ParamSpec("seed", "int", required=True).validate(self.seed))
        size = self.batch_size if self.batch_size is not None else entry.extra.get("batch_size")
        if size is not None:
            size = ParamSpec("batch_size", "int", min=1).validate(size)
        object.__setattr__(self, "batch_size", size)
        _check_precision(self.precision, trains=entry.obj.trains)

    def build(self, model: nn.Module, *, inplace: bool = False) -> Adapter:
        """The adapter for ``model``; raises NotApplicable where the method cannot adapt it."""
        return create_adapter(self.method, model, inplace=inplace, precision=self.precision, **self.params)

    def generator(self) -> torch.Generator:
        """A torch Generator seeded with :attr:`seed`, for ``DataLoader(..., shuffle=True, generator=g)``."""
        return torch.Generator().manual_seed(self.seed)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (the run's resolved config)."""
        return {"method": self.method, "params": dict(self.params), "setting": self.setting, "seed": self.seed,
                "batch_size": self.batch_size, "precision": self.precision}


# -- shared parameter specs ------------------------------------------------------------------------
OPTIMIZERS = ("sgd", "adam")


def optim_params(*, optimizer: str, lr: float, momentum: float, nesterov: bool, epochs: int = 1,
                 steps: int = 1) -> tuple[ParamSpec, ...]:
    """The optimiser ParamSpecs shared by the gradient-based methods, with a method's defaults."""
    return (
        ParamSpec("optimizer", "choice", optimizer, "sgd or adam (Adam betas 0.9, 0.999 as in TENT)",
                  choices=OPTIMIZERS),
        ParamSpec("lr", "float", lr, "learning rate of the BN affine parameters", min=0.0, max=1.0,
                  ticks=(1e-5, 1e-4, 2.5e-4, 7.5e-4, 1e-3, 1e-2)),
        ParamSpec("momentum", "float", momentum, "SGD momentum (ignored by Adam)", min=0.0, max=0.999),
        ParamSpec("nesterov", "bool", nesterov, "Nesterov momentum (SGD with momentum > 0 only)"),
        ParamSpec("weight_decay", "float", 0.0, "L2 penalty on the adapted parameters", min=0.0, max=1.0),
        ParamSpec("steps", "int", steps, "optimiser steps per test batch (TENT's OPTIM.STEPS)", min=1, max=100),
        ParamSpec("epochs", "int", epochs, "passes over each domain; 1 = online (predict once per image)",
                  min=1, max=100),
    )


def build_optimizer(params: list[nn.Parameter], cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD or Adam over ``params`` from the resolved ``optim_params`` values."""
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], betas=(0.9, 0.999), weight_decay=cfg["weight_decay"])
    if cfg["nesterov"] and cfg["momentum"] <= 0:
        raise ConfigError("nesterov needs momentum > 0", hint="set momentum (e.g. 0.9) or nesterov=false")
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"],
                           weight_decay=cfg["weight_decay"])
