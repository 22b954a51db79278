"""Test-time adaptation of a classifier with BatchNorm: one interface, one module per family, one registry.

Methods (``ADAPTERS``): ``none`` (base.py), ``bn`` (bn.py: BN adaptation with prior N, Schneider, Rusak
et al. 2020), ``tent`` and ``ent`` (tent.py: entropy minimisation, Wang et al. 2021 / Rusak, Schneider et
al. 2022), ``hard_pl``, ``soft_pl``, ``rpl`` (pseudo_label.py, Rusak, Schneider et al. 2022). Losses in
:mod:`core.adapt.losses`::

    cfg = AdaptConfig("tent", setting="reset")              # reference defaults, validated
    adapter = cfg.build(model)                              # NotApplicable for a model without BN
    for domain, logits, (images, labels) in adapt_domains(adapter, {"fog-3": loader}, setting=cfg.setting):
        ...
"""

from core.adapt import bn, pseudo_label, tent  # noqa: F401  (registers the methods)
from core.adapt.base import (
    ADAPTERS,
    BN_TYPES,
    SETTINGS,
    AdaptConfig,
    Adapter,
    NoAdaptation,
    NotApplicable,
    SelfLearningAdapter,
    adapt_domain,
    adapt_domains,
    applicable,
    bn_affine_parameters,
    bn_layers,
    check_applicable,
    create_adapter,
    register,
)
from core.adapt.bn import BNAdapter, PriorBatchNorm
from core.adapt.losses import entropy, gce, soft_ce
from core.adapt.pseudo_label import RPL, HardPL, SoftPL
from core.adapt.tent import Ent, Tent

__all__ = [
    "ADAPTERS", "BN_TYPES", "RPL", "SETTINGS", "AdaptConfig", "Adapter", "BNAdapter", "Ent", "HardPL",
    "NoAdaptation", "NotApplicable", "PriorBatchNorm", "SelfLearningAdapter", "SoftPL", "Tent", "adapt_domain",
    "adapt_domains", "applicable", "bn_affine_parameters", "bn_layers", "check_applicable", "create_adapter",
    "entropy", "gce", "register", "soft_ce",
]
