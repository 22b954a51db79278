"""Entropy minimisation of the BN affine parameters: TENT and the self-learning paper's ENT.

Both minimise the mean softmax entropy of the current batch's predictions with one optimiser step per
test batch, BN layers normalising with batch statistics (:class:`~core.adapt.base.SelfLearningAdapter`);
they differ only in their reference hyper-parameters.

- ``tent`` [Wang, Shelhamer et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR
  2021; DequanWang/tent]. ImageNet(-C) defaults: SGD, lr 0.00025, momentum 0.9, batch 64, one step per
  batch (paper, Sec. 4; the same values in mariodoebler/test-time-adaptation
  ``classification/cfgs/imagenet_c/tent.yaml``). Nesterov on: DequanWang/tent ``conf.py`` sets
  ``OPTIM.NESTEROV = True`` for its SGD (the paper says only "SGD with momentum"). The repository's
  CIFAR-10-C example instead uses Adam, lr 1e-3, batch 200 (``cfgs/tent.yaml``): ``optimizer="adam",
  lr=1e-3`` with a batch of 200.
- ``ent`` [Rusak, Schneider et al., "If your data distribution shifts, use self-learning", TMLR 2022]:
  the hyper-parameters of the paper's reference script (bethgelab/robustness ``selflearning/gce.py``,
  written for RPL): plain SGD (no momentum), lr 0.75e-3, batch 96, shuffled; that script makes 5 passes
  (epochs) over a domain, our default is 1 (the online setting; set ``epochs=5`` for the offline one).
  The paper tunes per method on the hold-out corruptions; these values are *unverified* for ENT.
"""

from __future__ import annotations

import torch

from core.adapt.base import SelfLearningAdapter, optim_params, register
from core.adapt.losses import entropy
from core.registry import ParamSpec

TENT_PAPER = ("Wang, Shelhamer, Liu, Olshausen, Darrell, Tent: Fully Test-Time Adaptation by Entropy "
              "Minimization, ICLR 2021 (DequanWang/tent)")
SELF_LEARNING_PAPER = ("Rusak, Schneider, Pachitariu et al., If your data distribution shifts, use "
                       "self-learning, TMLR 2022 (bethgelab/robustness)")
#: The self-learning reference script's settings (selflearning/gce.py: plain SGD lr 0.75e-3, batch 96).
SELF_LEARNING_LR = 0.75e-3
SELF_LEARNING_BATCH = 96


def self_learning_params() -> tuple[ParamSpec, ...]:
    """Optimiser ParamSpecs with the self-learning reference defaults (plain SGD, lr 0.75e-3, 1 epoch)."""
    return optim_params(optimizer="sgd", lr=SELF_LEARNING_LR, momentum=0.0, nesterov=False)


@register(
    "tent",
    summary="TENT: minimise the prediction entropy by training the BN affine parameters, one step per batch",
    paper=TENT_PAPER,
    params=optim_params(optimizer="sgd", lr=2.5e-4, momentum=0.9, nesterov=True),
    batch_size=64,
)
class Tent(SelfLearningAdapter):
    """Loss: mean softmax entropy of the batch (:func:`~core.adapt.losses.entropy`)."""

    def loss(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return entropy(logits)


@register(
    "ent",
    summary="ENT (self-learning): entropy minimisation of the BN affine parameters, reference script settings",
    paper=SELF_LEARNING_PAPER,
    params=self_learning_params(),
    batch_size=SELF_LEARNING_BATCH,
)
class Ent(Tent):
    """TENT's loss with the self-learning paper's reference optimiser (plain SGD, lr 0.75e-3)."""
