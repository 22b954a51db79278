"""Contrastive losses as small ``nn.Module`` s (open_clip style), behind one registry.

Every loss takes two batches of paired embeddings, ``(N, D)`` each (row i of one is the positive of row
i of the other), and returns a dict of named parts; the training loop sums every value whose key ends in
``_loss``. Losses compute in float32 whatever the autocast dtype of the features.

- ``infonce``: CLIP's symmetric cross-entropy over ``logit_scale * a @ b.T`` with a learnable logit
  scale (Radford et al. 2021).
- ``aninfonce``: anisotropic InfoNCE (Rusak, Reizinger, Juhos et al. 2024, brendel-group/AnInfoNCE):
  ``sim(a, b) = -0.5 (a - b)^T Lambda (a - b)`` with a learnable diagonal ``Lambda = diag(softplus(lam))``
  in the NT-Xent form over both views; no temperature (Lambda plays its part).

Use :func:`create_loss` to build one by name (``UnknownName`` lists the alternatives) and
:func:`loss_param_groups` to give a loss's own parameters their optimiser settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.registry import ParamSpec, Registry

#: CLIP's initial temperature and the ceiling of its logit scale (Radford et al. 2021).
CLIP_INIT_TEMPERATURE = 0.07
CLIP_MAX_LOGIT_SCALE = 100.0


class ContrastiveLoss(nn.Module):
    """Base of the registered losses: ``forward(a, b) -> {"..._loss": scalar, ...}``."""

    def param_groups(self, lr: float, lambda_lr: float = 1e-3) -> list[dict[str, Any]]:
        """Optimiser groups for this loss's own parameters (see :func:`loss_param_groups`)."""
        return loss_param_groups(self, lr=lr, lambda_lr=lambda_lr)


LOSSES: Registry[type[ContrastiveLoss]] = Registry("loss")


def total_loss(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of every part whose key ends in ``_loss`` (open_clip's convention)."""
    terms = [v for k, v in parts.items() if k.endswith("_loss")]
    if not terms:
        raise ValueError(f"a loss returned no '*_loss' part; keys: {', '.join(parts)}")
    return torch.stack([t.float() for t in terms]).sum()


@LOSSES.register(
    "infonce",
    summary="CLIP InfoNCE: symmetric cross-entropy over image-text logits with a learnable logit scale",
    paper="Radford et al., Learning Transferable Visual Models From Natural Language Supervision (2021)",
    params=(
        ParamSpec("init_temperature", "float", CLIP_INIT_TEMPERATURE,
                  "initial temperature; the logit scale starts at log(1/T)", min=1e-3, max=10.0),
        ParamSpec("max_logit_scale", "float", CLIP_MAX_LOGIT_SCALE,
                  "ceiling of exp(logit_scale) (CLIP clamps at 100)", min=1.0, max=1e4),
    ),
    needs_dim=False,
)
class InfoNCELoss(ContrastiveLoss):
    """Symmetric InfoNCE over L2-normalised pairs (CLIP).

    ``loss = 0.5 * (CE(s * A @ B.T, I) + CE(s * B @ A.T, I))`` with ``s = min(exp(logit_scale), max)``.

    Args:
        init_temperature: the logit scale starts at ``log(1 / init_temperature)``.
        max_logit_scale: ceiling of ``exp(logit_scale)``; above it the scale gets no gradient (CLIP
            clamps the parameter at ``log(100)`` after every step; clamping in forward is equivalent).
        logit_scale: share an existing parameter (e.g. ``model.logit_scale`` of an open_clip CLIP, so a
            saved model carries the learned scale) instead of creating one.
        normalize: L2-normalise the inputs first (they usually are already).
    """

    def __init__(self, init_temperature: float = CLIP_INIT_TEMPERATURE,
                 max_logit_scale: float = CLIP_MAX_LOGIT_SCALE, *,
                 logit_scale: nn.Parameter | None = None, normalize: bool = True) -> None:
        super().__init__()
        if logit_scale is None:
            logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.logit_scale = logit_scale
        self.max_logit_scale = float(max_logit_scale)
        self.normalize = normalize

    def scale(self) -> torch.Tensor:
        """The multiplicative logit scale, ``min(exp(logit_scale), max_logit_scale)``."""
        return self.logit_scale.float().exp().clamp(max=self.max_logit_scale)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{"contrastive_loss": scalar}`` (mean over the 2N anchors)."""
        a, b = image_features.float(), text_features.float()
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        logits = self.scale() * a @ b.T
        target = torch.arange(a.shape[0], device=a.device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        return {"contrastive_loss": loss}


@LOSSES.register(
    "aninfonce",
    summary="Anisotropic InfoNCE: learnable diagonal Lambda instead of a temperature (NT-Xent form)",
    paper="Rusak, Reizinger, Juhos et al., InfoNCE: Identifying the Gap Between Theory and Practice (2024)",
    params=(
        ParamSpec("lam_init_std", "float", 0.1, "std of the N(0, 1) init of lam (Lambda = softplus(lam))",
                  min=0.0, max=10.0),
        ParamSpec("seed", "int", 0, "seed of the generator drawing lam's initial values"),
    ),
    needs_dim=True,
)
class AnInfoNCELoss(ContrastiveLoss):
    """AnInfoNCE in the NT-Xent form over the 2N embeddings of both views.

    With ``Z = [A; B]`` (2N, D) L2-normalised and ``sim(a, b) = -0.5 (a - b)^T Lambda (a - b)``, anchor
    ``A_i`` has positive ``B_i`` and negatives ``A_k`` and ``B_k`` for ``k != i`` (and symmetrically for
    ``B_i``): ``loss = mean_i CE(sim(Z_i, Z_j)_{j != i}, positive)``. No temperature. With
    ``Lambda = I / tau`` this equals cosine NT-Xent (SimCLR) at temperature ``tau`` exactly, since on the
    sphere ``-0.5/tau ||a - b||^2 = (a.b - 1)/tau`` and the constant cancels in the softmax.
    Ref: brendel-group/AnInfoNCE ``losses.AnInfoNCELoss`` (its second view reuses the first view's cross
    terms; here the two views are treated symmetrically as the formula says).

    Args:
        dim: D, the embedding width (one Lambda entry per dimension).
        lam_init_std: ``lam ~ lam_init_std * N(0, 1)`` at init (paper: 0.1).
        seed: seed of the generator drawing that init (the global RNG is not touched).
        normalize: L2-normalise the inputs first.
    """

    def __init__(self, dim: int, lam_init_std: float = 0.1, seed: int = 0, *, normalize: bool = True) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"AnInfoNCE needs dim >= 1; got {dim}")
        gen = torch.Generator().manual_seed(int(seed))
        self.lam = nn.Parameter(lam_init_std * torch.randn(int(dim), generator=gen))
        self.normalize = normalize

    @property
    def Lambda(self) -> torch.Tensor:  # noqa: N802 - the paper's symbol
        """(D,) the diagonal of Lambda, ``softplus(lam)`` (positive)."""
        return F.softplus(self.lam.float())

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, M) ``-0.5 (a_i - b_j)^T Lambda (a_i - b_j)`` for every pair, without forming differences."""
        lam = self.Lambda
        sq_a = (a * a * lam).sum(-1)
        sq_b = (b * b * lam).sum(-1)
        return (a * lam) @ b.T - 0.5 * sq_a[:, None] - 0.5 * sq_b[None, :]

    def forward(self, features_a: torch.Tensor, features_b: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``{"contrastive_loss": scalar}`` (mean over the 2N anchors)."""
        a, b = features_a.float(), features_b.float()
        if self.normalize:
            a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        return {"contrastive_loss": nt_xent(self.similarity, a, b)}


def nt_xent(similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """NT-Xent (SimCLR) over the 2N rows of ``[a; b]`` with a pairwise ``similarity(x, y) -> (len x, len y)``.

    Row i's positive is row ``i + N`` (and vice versa); every other row except itself is a negative.
    """
    n = a.shape[0]
    z = torch.cat([a, b], dim=0)
    logits = similarity(z, z)
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, target)


def create_loss(name: str, *, dim: int | None = None, **params: Any) -> ContrastiveLoss:
    """Build a registered loss by name; ``dim`` (embedding width) is passed to losses that need it.

    Parameters left at None take the registered defaults; unknown ones raise ConfigError.
    Raises:
        UnknownName: ``name`` is not a registered loss (the message lists the available ones).
    """
    entry = LOSSES.entry(name)
    resolved = entry.validate_params({k: v for k, v in params.items() if v is not None})
    if entry.extra.get("needs_dim"):
        if dim is None:
            raise ValueError(f"loss '{name}' needs the embedding width (dim)")
        return entry.obj(dim, **resolved)
    return entry.obj(**resolved)


def loss_param_groups(loss: nn.Module, *, lr: float, lambda_lr: float = 1e-3,
                      exclude: set[int] | None = None) -> list[dict[str, Any]]:
    """Optimiser groups for a loss's own parameters, without weight decay.

    AnInfoNCE's ``lam`` gets ``lambda_lr`` (paper: 1e-3 vs 1e-4 for the encoder); anything else (the
    InfoNCE logit scale) gets ``lr``. Parameters whose ``id`` is in ``exclude`` (already in another
    group, e.g. a logit scale shared with the model) are left out. Each group carries a ``name``.
    """
    exclude = exclude or set()
    lam: list[nn.Parameter] = []
    other: list[nn.Parameter] = []
    for pname, p in loss.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        (lam if pname == "lam" else other).append(p)
    groups = []
    if lam:
        groups.append({"name": "loss_lambda", "params": lam, "lr": lambda_lr, "weight_decay": 0.0})
    if other:
        groups.append({"name": "loss_scale", "params": other, "lr": lr, "weight_decay": 0.0})
    return groups


