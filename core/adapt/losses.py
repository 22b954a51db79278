"""Unsupervised test-time losses on classifier logits: entropy, generalised cross-entropy, soft CE.

Every function takes ``(B, classes)`` logits, computes in float32 whatever their dtype, and returns the
mean over the batch (a scalar; lower = more confident / closer to the targets).
"""

from __future__ import annotations

import torch

from core.errors import ConfigError, DataError

#: GCE's q in the self-learning paper (RPL) [Rusak, Schneider et al. TMLR 2022; Zhang & Sabuncu 2018].
GCE_Q = 0.8


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean softmax entropy ``-sum_c p_c log p_c`` over the batch, in nats. Ref: TENT (Wang et al. 2021)."""
    logits = _check_logits(logits)
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()


def gce(logits: torch.Tensor, targets: torch.Tensor | None = None, q: float = GCE_Q) -> torch.Tensor:
    """Mean generalised cross-entropy ``(1 - p(y|x)^q) / q``.

    ``q -> 0`` approaches cross-entropy ``-log p(y|x)``; ``q = 1`` is ``1 - p(y|x)`` (MAE up to a factor).
    Refs: Zhang & Sabuncu, NeurIPS 2018; RPL (Rusak, Schneider et al. TMLR 2022, q = 0.8).

    Args:
        logits: (B, classes).
        targets: (B,) int64 class indices; None = the hard pseudo-labels ``argmax(logits)`` of the
            current model (no gradient flows through them).
        q: in (0, 1].
    """
    logits = _check_logits(logits)
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"GCE's q must lie in (0, 1]; got {q}")
    if targets is None:
        targets = logits.detach().argmax(1)
    p_y = logits.softmax(1).gather(1, targets.view(-1, 1).to(logits.device)).squeeze(1)
    return ((1.0 - p_y.pow(q)) / q).mean()


def soft_ce(logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy ``-sum_c t_c log p_c`` of the student's softmax to a teacher's probabilities.

    The teacher probabilities are detached (soft pseudo-labels). Note the gradient with respect to the
    logits is ``softmax(logits) - t``: zero when ``t`` is the same model's own softmax on the same batch.

    Args:
        logits: (B, classes) student logits.
        teacher_probs: (B, classes) rows summing to 1.
    """
    logits = _check_logits(logits)
    if teacher_probs.shape != logits.shape:
        raise DataError(f"teacher probabilities {tuple(teacher_probs.shape)} and logits "
                        f"{tuple(logits.shape)} differ in shape")
    t = teacher_probs.detach().float().to(logits.device)
    return -(t * logits.log_softmax(1)).sum(1).mean()


def _check_logits(logits: torch.Tensor) -> torch.Tensor:
    if logits.ndim != 2:
        raise DataError(f"logits must be (batch, classes); got shape {tuple(logits.shape)}")
    return logits.float()
