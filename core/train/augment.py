"""Noise augmentation for robust classifier training: Gaussian, speckle and adversarial noise (ANT).

Ref: Rusak, Schott, Zimmermann, Bitterwolf, Bringmann, Bethge & Brendel, "A simple way to make neural
networks robust against diverse image corruptions" (ECCV 2020; arXiv 2001.06057 "Increasing the
robustness of DNNs against image corruptions by playing the Game of Noise"), code: bethgelab/game-of-noise.

Noise is added in [0, 1] pixel space, *before* normalisation (our classifiers normalise inside the
model, :mod:`core.classifiers`), then clamped to [0, 1]. A fraction of each batch (``clean_fraction``,
0.5 in the paper) stays clean, bit for bit.

- ``gaussian``: ``x + n``, ``n ~ N(0, sigma^2)`` i.i.d. per value; one sigma for all images (paper:
  0.5, "Gauss_sigma_0.5") or, with ``sigma=None``, one per image drawn uniformly from
  :data:`GAUSSIAN_SIGMAS` ("Gauss_mult").
- ``speckle``: ``x + x * n``, ``n ~ N(0, sigma^2)``, sigma per image from :data:`SPECKLE_SIGMAS`
  (or a fixed one); black pixels stay black.
- ``ant``: adversarial noise training. A small convolutional *noise generator* maps i.i.d. Gaussian
  input to a noise image, scaled to a fixed L2 norm per image, and is trained to *maximise* the
  classifier's cross-entropy while the classifier learns to resist it (:class:`AdversarialNoise`).
  Past generator states are replayed for part of the noisy images (experience replay), so the
  classifier does not forget noise it has beaten.

ANT defaults (:class:`AntConfig`), from game-of-noise's ``train.py`` / ``utils.py`` /
``Networks/generators.py``: generator ``NoiseResNet1x1Conv`` (four 1x1 convolutions, 20 hidden
channels, ReLU, plus the Gaussian input as a residual; weights ~ N(0, 0.01^2), biases 0, so it starts as
near-Gaussian noise); Adam with lr 1e-4, one generator update per classifier batch, on the clean batch
with the classifier in eval mode; ``--epsilon_generator 135`` (L2 norm per 3x224x224 image in [0, 1],
i.e. a per-value RMS of 135 / sqrt(150528) = 0.348); ``p_clean 0.5, p_current 0.3, p_history 0.1``:
half the batch clean, 30 % noise of the current generator, and 10 % slices from randomly chosen past
generators (one saved per epoch) filling the rest.

Differences from the reference code, on purpose:
- the L2 budget scales with ``sqrt(C*H*W)`` so that other resolutions keep the paper's per-value RMS;
- the noise is scaled to the budget *before* clamping (the reference solves for the scale at which the
  *clipped* perturbation has norm epsilon, ``fix_perturbation_size``), so after clamping the effective
  norm is at most the budget;
- the replay pool is bounded (``pool_size`` states, reservoir-sampled over all snapshots, so it stays
  a uniform sample of the whole history like the reference's "every past epoch"), and a snapshot is
  taken every ``snapshot_every`` generator updates rather than once per epoch;
- which images stay clean is a seeded random choice, not the first slots of the batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import ConfigError

NOISE_KINDS = ("none", "gaussian", "speckle", "ant")
#: Per-image Gaussian sigmas of "Gauss_mult" (game-of-noise ``gaussian_noise_torch``).
GAUSSIAN_SIGMAS = (0.08, 0.12, 0.18, 0.26, 0.38)
#: Per-image speckle sigmas (game-of-noise ``speckle_noise_torch``).
SPECKLE_SIGMAS = (0.15, 0.2, 0.35, 0.45, 0.6)
#: The image shape the paper's ANT epsilon refers to (ImageNet crops).
ANT_REFERENCE_SHAPE = (3, 224, 224)
GENERATOR_KINDS = ("1x1", "3x3")


# -- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AntConfig:
    """Adversarial noise training (validated on creation). Defaults: game-of-noise (see module docstring).

    Args:
        epsilon: L2 norm of the noise per image at :data:`ANT_REFERENCE_SHAPE` (paper: 135); for an image
            of D values the budget is ``epsilon * sqrt(D / 150528)``.
        generator: ``1x1`` (per-pixel noise distribution, paper default) or ``3x3`` (spatially correlated).
        hidden: channels of the generator's hidden layers (paper: 20).
        init_std: std of the generator's initial conv weights (paper: 0.01; biases start at 0).
        lr: Adam learning rate of the generator (paper: 1e-4).
        current_fraction: share of the noisy images perturbed by the current generator once the replay
            pool is not empty (paper: p_current / (1 - p_clean) = 0.3 / 0.5); before that, all of them.
        replay_fraction: share of the noisy images per replayed past generator (paper: 0.1 / 0.5).
        pool_size: most past generator states kept (the reference keeps one per epoch, unbounded).
        snapshot_every: generator updates between snapshots into the pool (the reference: one epoch).
    """

    epsilon: float = 135.0
    generator: str = "1x1"
    hidden: int = 20
    init_std: float = 0.01
    lr: float = 1e-4
    current_fraction: float = 0.6
    replay_fraction: float = 0.2
    pool_size: int = 8
    snapshot_every: int = 100

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ConfigError(f"ANT epsilon must be > 0; got {self.epsilon}")
        if self.generator not in GENERATOR_KINDS:
            raise ConfigError(
                f"ANT generator must be one of {', '.join(GENERATOR_KINDS)}; got {self.generator!r}"
            )
        for name in ("hidden", "pool_size", "snapshot_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ANT {name} must be an integer >= 1; got {value!r}")
        if not (self.lr > 0 and self.init_std >= 0):
            raise ConfigError("ANT lr must be > 0 and init_std >= 0")
        if not 0 < self.current_fraction <= 1 or not 0 < self.replay_fraction <= 1:
            raise ConfigError("ANT current_fraction and replay_fraction must be in (0, 1]")


@dataclass(frozen=True)
class NoiseConfig:
    """Which noise the noisy part of each batch gets (validated on creation).

    Args:
        kind: none | gaussian | speckle | ant.
        sigma: noise std for gaussian / speckle; None draws one per image from :data:`GAUSSIAN_SIGMAS`
            or :data:`SPECKLE_SIGMAS`. Not used by ``ant`` and ``none``.
        clean_fraction: share of each batch left clean (paper: 0.5); ``round(B * clean_fraction)``
            images stay bit-identical (Python's round: halves to even, like the reference's np.round).
        seed: seeds the generator :func:`add_noise` uses when it is not given one.
        ant: the adversary's settings (kind ``ant`` only).
    """

    kind: str = "none"
    sigma: float | None = None
    clean_fraction: float = 0.5
    seed: int = 0
    ant: AntConfig = field(default_factory=AntConfig)

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ConfigError(f"noise kind must be one of {', '.join(NOISE_KINDS)}; got {self.kind!r}")
        if self.sigma is not None and not (isinstance(self.sigma, int | float) and self.sigma > 0):
            raise ConfigError(f"noise sigma must be > 0 or None (the per-image set); got {self.sigma!r}")
        if self.sigma is not None and self.kind in ("none", "ant"):
            raise ConfigError(f"noise sigma applies to gaussian and speckle noise, not {self.kind!r}")
        cf = self.clean_fraction
        if isinstance(cf, bool) or not isinstance(cf, int | float) or not 0 <= cf <= 1:
            raise ConfigError(f"clean_fraction must be in [0, 1]; got {cf!r}")

    @property
    def sigma_set(self) -> tuple[float, ...]:
        """The sigmas images draw from: ``(sigma,)`` when fixed, else the paper's set for the kind."""
        if self.sigma is not None:
            return (float(self.sigma),)
        return SPECKLE_SIGMAS if self.kind == "speckle" else GAUSSIAN_SIGMAS


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch Generator on ``device`` seeded with ``seed`` (noise draws happen where the images are)."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed) % (2**63 - 1))


# -- Gaussian and speckle noise ------------------------------------------------------------------------------
def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    out = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=like.device, dtype=like.dtype)


def sample_sigmas(n: int, cfg: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """Returns: (n,) per-image noise std, uniform over ``cfg.sigma_set`` (on the generator's device)."""
    choices = torch.tensor(cfg.sigma_set, dtype=torch.float32, device=generator.device)
    pick = torch.randint(len(choices), (n,), generator=generator, device=generator.device)
    return choices[pick]


def sample_noise(
    x: torch.Tensor, cfg: NoiseConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The additive perturbation of gaussian / speckle noise, before clamping.

    Args:
        x: (B, C, H, W) images in [0, 1].

    Returns:
        (B, C, H, W) delta (gaussian: ``n``; speckle: ``x * n``; ``n ~ N(0, sigma_b^2)``) and the (B,)
        sigmas used. Ref: game-of-noise ``gaussian_noise_torch`` / ``speckle_noise_torch``.
    """
    if cfg.kind not in ("gaussian", "speckle"):
        raise ConfigError(f"sample_noise draws gaussian or speckle noise, not {cfg.kind!r}")
    sigmas = sample_sigmas(x.shape[0], cfg, generator).to(device=x.device, dtype=x.dtype)
    n = _randn(tuple(x.shape), generator, x) * sigmas.view(-1, *([1] * (x.ndim - 1)))
    return (x * n if cfg.kind == "speckle" else n), sigmas


def noisy_selection(batch: int, clean_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Returns: (batch,) bool, True for the ``batch - round(batch * clean_fraction)`` images to perturb,
    chosen uniformly at random (on the generator's device)."""
    n_clean = round(batch * clean_fraction)
    order = torch.randperm(batch, generator=generator, device=generator.device)
    mask = torch.zeros(batch, dtype=torch.bool, device=generator.device)
    mask[order[n_clean:]] = True
    return mask


def add_noise(
    x: torch.Tensor,
    cfg: NoiseConfig,
    generator: torch.Generator | None = None,
    adversary: AdversarialNoise | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Perturb all but ``round(B * cfg.clean_fraction)`` images of a batch, then clamp them to [0, 1].

    Args:
        x: (B, C, H, W) float images in [0, 1], before normalisation.
        generator: the randomness (which images, sigmas, noise); default one seeded with ``cfg.seed``
            on ``x``'s device. The output is a function of ``x`` and the generator's state.
        adversary: the noise generator of kind ``ant`` (required for it).

    Returns:
        (B, C, H, W) batch whose clean images are bit-identical to ``x``, and the (B,) bool mask of the
        perturbed ones (on ``x``'s device). Kind ``none`` returns ``x`` itself and an all-False mask.
    """
    if x.ndim != 4:
        raise ValueError(f"add_noise expects (B, C, H, W) images; got shape {tuple(x.shape)}")
    if cfg.kind == "none":
        return x, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if cfg.kind == "ant" and adversary is None:
        raise ConfigError("noise kind 'ant' needs an AdversarialNoise (the noise generator)")
    gen = generator if generator is not None else make_generator(cfg.seed, x.device)
    mask = noisy_selection(x.shape[0], cfg.clean_fraction, gen).to(x.device)
    out = x.clone()
    if not bool(mask.any()):
        return out, mask
    picked = x[mask]
    if cfg.kind == "ant":
        assert adversary is not None
        out[mask] = adversary.perturb(picked, gen)
    else:
        delta, _ = sample_noise(picked, cfg, gen)
        out[mask] = (picked + delta).clamp_(0.0, 1.0)
    return out, mask


# -- adversarial noise (ANT) ------------------------------------------------------------------------------
class NoiseGenerator(nn.Module):
    """The Noise Generator of game-of-noise: i.i.d. N(0, 1) input -> noise image of the same shape.

    ``1x1``: four 1x1 convolutions (C -> hidden -> hidden -> hidden -> C) with ReLUs, plus the input
    as a residual (``NoiseResNet1x1Conv``), i.e. a learned per-pixel distribution with channel
    correlations. ``3x3``: the second convolution is 3x3 on a padded input (``NoiseResNet3x3Conv``),
    giving 3x3 spatial correlations.
    """

    def __init__(self, channels: int = 3, hidden: int = 20, kind: str = "1x1") -> None:
        super().__init__()
        if kind not in GENERATOR_KINDS:
            raise ConfigError(
                f"noise generator kind must be one of {', '.join(GENERATOR_KINDS)}; got {kind!r}"
            )
        self.kind = kind
        self.pad = 1 if kind == "3x3" else 0
        k2 = 3 if kind == "3x3" else 1
        self.conv1 = nn.Conv2d(channels, hidden, 1)
        self.conv2 = nn.Conv2d(hidden, hidden, k2)
        self.conv3 = nn.Conv2d(hidden, hidden, 1)
        self.conv4 = nn.Conv2d(hidden, channels, 1)

    def reset(self, std: float, generator: torch.Generator) -> None:
        """Weights ~ N(0, std^2), biases 0 (the paper's init: starts as near-Gaussian noise)."""
        with torch.no_grad():
            for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
                w = torch.randn(conv.weight.shape, generator=generator, device=generator.device) * std
                conv.weight.copy_(w.to(conv.weight.device))
                assert conv.bias is not None
                conv.bias.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Args: z: (B, C, H + 2p, W + 2p) Gaussian input (p = 1 for 3x3). Returns: (B, C, H, W) raw noise."""
        residual = z[:, :, self.pad : z.shape[2] - self.pad, self.pad : z.shape[3] - self.pad]
        h = F.relu(self.conv1(z))
        h = F.relu(self.conv2(h))
        h = F.relu(self.conv3(h))
        return self.conv4(h) + residual


def l2_budget(
    shape: tuple[int, ...], epsilon: float, reference: tuple[int, ...] = ANT_REFERENCE_SHAPE
) -> float:
    """The L2 norm per image for images of ``shape`` (C, H, W) (or (B, C, H, W)): ``epsilon`` scaled by
    ``sqrt(numel / numel(reference))``, so the per-value RMS equals the paper's at 3x224x224."""
    per_image = math.prod(shape[-3:])
    return float(epsilon) * math.sqrt(per_image / math.prod(reference))


def scale_to_norm(delta: torch.Tensor, norm: float) -> torch.Tensor:
    """Returns: ``delta`` rescaled so each image (dim 0 slice) has L2 norm ``norm``."""
    lengths = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    return delta * (norm / lengths).view(-1, *([1] * (delta.ndim - 1)))


class AdversarialNoise:
    """Adversarial noise training's adversary: a noise generator, its optimiser and a replay pool.

    Usage in a training step (images in [0, 1])::

        adv.step(x, lambda noisy: F.cross_entropy(model(noisy), y))   # classifier in eval mode
        x_train, mask = add_noise(x, cfg, generator, adversary=adv)     # calls adv.perturb

    The randomness (generator input, replay choices) comes from the torch Generator passed in, so a
    step is a pure function of the state (:meth:`state_dict`) and that generator.
    """

    def __init__(
        self,
        cfg: AntConfig | None = None,
        *,
        channels: int = 3,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg or AntConfig()
        self.seed = seed
        self.device = torch.device(device)
        self.net = NoiseGenerator(channels, self.cfg.hidden, self.cfg.generator).to(self.device)
        self.net.reset(self.cfg.init_std, torch.Generator().manual_seed(seed))
        self._replay_net = copy.deepcopy(self.net).requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.cfg.lr)
        self.pool: list[dict[str, torch.Tensor]] = []
        self.updates = 0
        self.snapshots = 0

    # -- noise -----------------------------------------------------------------------------------
    def budget(self, shape: tuple[int, ...]) -> float:
        """L2 norm of the noise per image of ``shape`` (see :func:`l2_budget`)."""
        return l2_budget(tuple(shape), self.cfg.epsilon)

    def delta(
        self, x: torch.Tensor, generator: torch.Generator, net: nn.Module | None = None
    ) -> torch.Tensor:
        """Returns: (B, C, H, W) noise of ``net`` (default: the current generator) with L2 norm
        :meth:`budget` per image, before clamping; differentiable w.r.t. the generator."""
        b, c, h, w = x.shape
        pad = self.net.pad
        z = _randn((b, c, h + 2 * pad, w + 2 * pad), generator, x)
        raw = (net if net is not None else self.net)(z)
        return scale_to_norm(raw, self.budget(tuple(x.shape)))

    @torch.no_grad()
    def perturb(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noisy images ``clamp(x + delta, 0, 1)``: the first ``round(B * current_fraction)`` from the
        current generator (all of them while the pool is empty), the rest in slices of
        ``round(B * replay_fraction)`` from past generators drawn at random from the pool.

        Args:
            x: (B, C, H, W) images in [0, 1]. Returns: (B, C, H, W) in [0, 1], no gradient.
        """
        gen = generator if generator is not None else make_generator(self.seed, x.device)
        n = x.shape[0]
        n_current = n if not self.pool else max(1, round(n * self.cfg.current_fraction))
        parts = [self.delta(x[:n_current], gen)] if n_current else []
        size = max(1, round(n * self.cfg.replay_fraction))
        for start in range(n_current, n, size):
            pick = int(torch.randint(len(self.pool), (1,), generator=gen, device=gen.device).item())
            self._replay_net.load_state_dict(self.pool[pick])
            parts.append(self.delta(x[start : start + size], gen, self._replay_net))
        return (x + torch.cat(parts)).clamp_(0.0, 1.0)

    # -- training ----------------------------------------------------------------------------------
    def step(
        self,
        x: torch.Tensor,
        loss_fn: Callable[[torch.Tensor], torch.Tensor],
        generator: torch.Generator | None = None,
    ) -> float:
        """One generator update that *increases* ``loss_fn(clamp(x + delta, 0, 1))`` (gradient ascent).

        Args:
            x: (B, C, H, W) clean images in [0, 1] (the reference uses the whole clean batch).
            loss_fn: noisy images -> scalar classifier loss (e.g. cross-entropy, the classifier in eval
                mode). Only the generator's parameters get gradients; the classifier's stay untouched.

        Returns:
            The classifier loss on the noisy images before the update (what the adversary maximises).
        """
        gen = generator if generator is not None else make_generator(self.seed + self.updates, x.device)
        self.net.train()
        noisy = (x.detach() + self.delta(x, gen)).clamp(0.0, 1.0)
        loss = loss_fn(noisy)
        params = [p for p in self.net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(-loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        if self.updates % self.cfg.snapshot_every == 0:
            self.snapshot()
        return float(loss.detach().item())

    def snapshot(self) -> None:
        """Put the current generator into the replay pool: appended while there is room, else replacing
        a random entry with probability ``pool_size / snapshots`` (reservoir sampling), so the pool is a
        uniform sample of every snapshot so far and never holds more than ``pool_size`` states."""
        self.snapshots += 1
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        if len(self.pool) < self.cfg.pool_size:
            self.pool.append(state)
            return
        rng = torch.Generator().manual_seed(self.seed * 1_000_003 + self.snapshots)
        slot = int(torch.randint(self.snapshots, (1,), generator=rng).item())
        if slot < self.cfg.pool_size:
            self.pool[slot] = state

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: generator, optimiser, pool, counters."""
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "pool": list(self.pool),
            "updates": self.updates,
            "snapshots": self.snapshots,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (deep-copied: torch optimisers would otherwise share moment tensors)."""
        state = copy.deepcopy(state)
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pool = [{k: v.to(self.device) for k, v in s.items()} for s in state["pool"]]
        self.updates = int(state["updates"])
        self.snapshots = int(state["snapshots"])
