"""Noise augmentation (Rusak et al. ECCV 2020): clean share, noise statistics, determinism, ANT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError
from core.train.augment import (
    GAUSSIAN_SIGMAS,
    SPECKLE_SIGMAS,
    AdversarialNoise,
    AntConfig,
    NoiseConfig,
    add_noise,
    l2_budget,
    make_generator,
    sample_noise,
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(b: int, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand((b, 3, side, side), generator=torch.Generator().manual_seed(seed))


def _noise(kind: str, **kw) -> tuple[NoiseConfig, AdversarialNoise | None]:
    cfg = NoiseConfig(kind, **kw)
    return cfg, (AdversarialNoise(cfg.ant, seed=1) if kind == "ant" else None)


# -- configuration -------------------------------------------------------------------------------------------
def test_noise_config_is_validated():
    with pytest.raises(ConfigError, match="noise kind must be one of none, gaussian, speckle, ant"):
        NoiseConfig("salt")
    with pytest.raises(ConfigError, match="clean_fraction"):
        NoiseConfig("gaussian", clean_fraction=1.5)
    with pytest.raises(ConfigError, match="sigma"):
        NoiseConfig("gaussian", sigma=-0.1)
    with pytest.raises(ConfigError, match="not 'ant'"):
        NoiseConfig("ant", sigma=0.5)
    with pytest.raises(ConfigError, match="generator"):
        AntConfig(generator="5x5")
    with pytest.raises(ConfigError, match="pool_size"):
        AntConfig(pool_size=0)
    assert NoiseConfig("gaussian").sigma_set == GAUSSIAN_SIGMAS
    assert NoiseConfig("speckle").sigma_set == SPECKLE_SIGMAS
    assert NoiseConfig("gaussian", sigma=0.5).sigma_set == (0.5,)


# -- the clean share -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gaussian", "speckle", "ant"])
@pytest.mark.parametrize(
    ("batch", "clean_fraction"), [(8, 0.5), (7, 0.5), (9, 0.25), (5, 0.0), (6, 1.0), (1, 0.5)]
)
def test_clean_images_stay_bit_identical_and_their_count_is_exact(kind, batch, clean_fraction):
    cfg, adv = _noise(kind, clean_fraction=clean_fraction)
    x = _images(batch)
    out, mask = add_noise(x, cfg, make_generator(3), adv)
    assert mask.dtype == torch.bool and mask.shape == (batch,)
    assert int((~mask).sum()) == round(batch * clean_fraction)
    assert torch.equal(out[~mask], x[~mask])
    noisy = out[mask]
    assert ((noisy >= 0) & (noisy <= 1)).all()
    if mask.any():  # each perturbed image really changed
        assert ((noisy - x[mask]).flatten(1).abs().amax(1) > 0).all()
    assert torch.equal(x, _images(batch))  # the input is not modified in place


def test_which_images_stay_clean_is_random_not_the_first_slots():
    cfg = NoiseConfig("gaussian", sigma=0.1)
    masks = {tuple(add_noise(_images(8), cfg, make_generator(s))[1].tolist()) for s in range(10)}
    assert len(masks) > 3


def test_none_returns_the_batch_untouched():
    x = _images(4)
    out, mask = add_noise(x, NoiseConfig("none"), make_generator(0))
    assert out is x and not mask.any()


# -- noise statistics ----------------------------------------------------------------------------------------
def test_gaussian_noise_has_the_requested_std_on_mid_grey():
    x = torch.full((64, 3, 32, 32), 0.5)
    out, mask = add_noise(x, NoiseConfig("gaussian", sigma=0.08), make_generator(0))
    diff = out[mask] - x[mask]  # 0.5 / 0.08 = 6 sigma from either bound: clamping never happens
    assert diff.std().item() == pytest.approx(0.08, rel=0.02)
    assert abs(diff.mean().item()) < 0.002


def test_speckle_is_multiplicative():
    x = torch.full((32, 3, 32, 32), 0.5)
    x[:, :, :16] = 0.0  # black top half
    out, mask = add_noise(x, NoiseConfig("speckle", sigma=0.15), make_generator(1))
    assert torch.equal(out[:, :, :16], x[:, :, :16])  # x = 0: x + x * n = 0
    rel = (out[mask][:, :, 16:] - 0.5) / 0.5  # = n, never clamped (0.5 * 0.15 * 6.7 = 0.5)
    assert rel.std().item() == pytest.approx(0.15, rel=0.03)


@pytest.mark.parametrize(("kind", "sigmas"), [("gaussian", GAUSSIAN_SIGMAS), ("speckle", SPECKLE_SIGMAS)])
def test_per_image_sigma_comes_from_the_papers_set(kind, sigmas):
    x = torch.full((40, 3, 48, 48), 0.5)
    delta, used = sample_noise(x, NoiseConfig(kind), make_generator(2))
    assert set(used.tolist()) <= {float(torch.tensor(s)) for s in sigmas}
    assert len(set(used.tolist())) == len(sigmas)  # 40 draws hit all five values
    scale = 1.0 if kind == "gaussian" else 0.5  # speckle: delta = x * n
    measured = (delta / scale).flatten(1).std(dim=1)
    assert torch.allclose(measured, used, rtol=0.05)


def test_same_generator_seed_gives_identical_output():
    x = _images(16)
    for kind in ("gaussian", "speckle"):
        cfg = NoiseConfig(kind)
        a, ma = add_noise(x, cfg, make_generator(5))
        b, mb = add_noise(x, cfg, make_generator(5))
        c, _ = add_noise(x, cfg, make_generator(6))
        assert torch.equal(a, b) and torch.equal(ma, mb)
        assert not torch.equal(a, c)
    cfg = NoiseConfig("gaussian", seed=9)
    assert torch.equal(add_noise(x, cfg)[0], add_noise(x, cfg)[0])  # default generator: cfg.seed


# -- adversarial noise (ANT) ---------------------------------------------------------------------------------
def test_l2_budget_keeps_the_papers_per_value_rms():
    assert l2_budget((3, 224, 224), 135.0) == pytest.approx(135.0)
    assert l2_budget((8, 3, 32, 32), 135.0) == pytest.approx(135.0 * math.sqrt(3 * 32 * 32 / (3 * 224 * 224)))
    assert l2_budget((3, 32, 32), 135.0) / math.sqrt(3 * 32 * 32) == pytest.approx(135 / math.sqrt(150528))


@pytest.mark.parametrize("generator", ["1x1", "3x3"])
def test_ant_noise_has_the_l2_budget_per_image_before_clamping(generator):
    adv = AdversarialNoise(AntConfig(generator=generator), seed=0)
    x = _images(6, side=20)
    delta = adv.delta(x, make_generator(0))
    assert delta.shape == x.shape
    norms = delta.flatten(1).norm(dim=1)
    assert torch.allclose(norms, torch.full_like(norms, adv.budget(tuple(x.shape))), rtol=1e-5)
    out = adv.perturb(x, make_generator(0))
    assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, x)


def _tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    with torch.no_grad():
        model[4].weight.mul_(10.0)  # confident logits, so that the noise can move the loss
    return model


def test_the_adversary_increases_the_classifiers_loss():
    model = _tiny_classifier().eval()
    x, y = _images(32, side=12, seed=1), torch.arange(32) % 4
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    adv = AdversarialNoise(AntConfig(lr=1e-2), seed=0)

    def loss_fn(noisy: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(noisy), y)

    def noisy_loss() -> float:  # the current generator's noise, with a fixed input draw
        with torch.no_grad():
            return float(loss_fn((x + adv.delta(x, make_generator(123))).clamp(0, 1)))

    before = noisy_loss()
    losses = [adv.step(x, loss_fn, make_generator(s)) for s in range(40)]
    after = noisy_loss()
    assert after > before + 0.1, (before, after)  # measured: 1.56 -> 1.88
    assert sum(losses[-5:]) > sum(losses[:5])
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())  # only the generator learns
    assert all(p.grad is None for p in model.parameters())


def test_replay_pool_is_bounded_and_replayed():
    adv = AdversarialNoise(AntConfig(snapshot_every=1, pool_size=3, lr=1e-2), seed=0)
    x = _images(8, side=8)
    for s in range(20):
        adv.step(x, lambda n: n.mean(), make_generator(s))
    assert adv.snapshots == 20 and len(adv.pool) == 3
    assert not all(torch.equal(adv.pool[0][k], adv.pool[1][k]) for k in adv.pool[0])
    # A past generator that only pushes pixels up: the replayed slice (the last 40 % of the noisy
    # images) gets it, the current (freshly initialised, zero-mean) generator's first 60 % do not.
    fresh = AdversarialNoise(AntConfig(), seed=0)
    grey = torch.full((10, 3, 8, 8), 0.5)
    shift = (fresh.perturb(grey, make_generator(0)) - 0.5).flatten(1).mean(1)
    assert (shift.abs() < 0.1).all()  # empty pool: every image from the current generator
    bright = {k: v.clone() for k, v in fresh.net.state_dict().items()}
    bright["conv4.bias"] = torch.full_like(bright["conv4.bias"], 1e3)
    fresh.pool = [bright]
    out = fresh.perturb(grey, make_generator(0))
    n_current = round(10 * fresh.cfg.current_fraction)
    assert (out[n_current:] > 0.5).all()
    assert ((out[:n_current] - 0.5).flatten(1).mean(1).abs() < 0.1).all()


def test_adversary_state_round_trips():
    a = AdversarialNoise(AntConfig(snapshot_every=2, lr=1e-2), seed=0)
    x = _images(8, side=8)
    for s in range(5):
        a.step(x, lambda n: n.std(), make_generator(s))
    b = AdversarialNoise(AntConfig(snapshot_every=2, lr=1e-2), seed=7)
    b.load_state_dict(a.state_dict())
    for s in range(5, 8):
        assert a.step(x, lambda n: n.std(), make_generator(s)) == b.step(
            x, lambda n: n.std(), make_generator(s)
        )
    assert torch.equal(a.perturb(x, make_generator(1)), b.perturb(x, make_generator(1)))


def test_ant_without_an_adversary_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs an AdversarialNoise"):
        add_noise(_images(2), NoiseConfig("ant"), make_generator(0))
