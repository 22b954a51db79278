"""Losses against hand-written references (no open_clip, no data): CPU, well under a second."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core.errors import ConfigError, UnknownName
from core.train.losses import LOSSES, AnInfoNCELoss, InfoNCELoss, create_loss, total_loss


def _pairs(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    b = F.normalize(a + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return a.float(), b.float()


def _hand_clip_loss(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """CLIP loss written out with loops: -log softmax of the matching pair, both directions."""
    n = len(a)
    total = 0.0
    for i in range(n):
        row = [scale * float(a[i] @ b[j]) for j in range(n)]
        col = [scale * float(b[i] @ a[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(x) for x in row))
        total += -col[i] + math.log(sum(math.exp(x) for x in col))
    return total / (2 * n)


def _hand_nt_xent_cosine(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """SimCLR NT-Xent with cosine similarity / tau, written out with loops over the 2N anchors."""
    z = torch.cat([a, b]).double()
    n2 = len(z)
    half = n2 // 2
    total = 0.0
    for i in range(n2):
        pos = (i + half) % n2
        logits = {j: float(z[i] @ z[j]) / tau for j in range(n2) if j != i}
        total += -logits[pos] + math.log(sum(math.exp(x) for x in logits.values()))
    return total / n2


def test_infonce_equals_hand_written_cross_entropy():
    a, b = _pairs()
    loss = InfoNCELoss()
    assert math.isclose(loss.scale().item(), 1 / 0.07, rel_tol=1e-6)
    got = loss(a, b)["contrastive_loss"].item()
    assert got == pytest.approx(_hand_clip_loss(a, b, 1 / 0.07), rel=1e-5)


def test_infonce_logit_scale_is_clamped_and_learnable():
    a, b = _pairs()
    loss = InfoNCELoss()
    loss(a, b)["contrastive_loss"].backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs() > 0
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(1000.0))
    assert loss.scale().item() == pytest.approx(100.0)
    assert loss(a, b)["contrastive_loss"].item() == pytest.approx(_hand_clip_loss(a, b, 100.0), rel=1e-4)


def test_infonce_can_share_the_models_logit_scale():
    shared = torch.nn.Parameter(torch.tensor(math.log(10.0)))
    loss = InfoNCELoss(logit_scale=shared)
    assert loss.logit_scale is shared
    a, b = _pairs()
    assert loss(a, b)["contrastive_loss"].item() == pytest.approx(_hand_clip_loss(a, b, 10.0), rel=1e-5)


@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_aninfonce_with_identity_over_tau_is_cosine_nt_xent(tau):
    """Lambda = I/tau: -0.5/tau ||a-b||^2 = (a.b - 1)/tau on the sphere; the -1/tau cancels in softmax."""
    a, b = _pairs(n=7, d=4, seed=3)
    loss = AnInfoNCELoss(dim=4)
    with torch.no_grad():  # softplus(lam) = 1/tau  <=>  lam = log(exp(1/tau) - 1)
        loss.lam.fill_(math.log(math.expm1(1.0 / tau)))
    assert torch.allclose(loss.Lambda, torch.full((4,), 1.0 / tau))
    got = loss(a, b)["contrastive_loss"].item()
    assert got == pytest.approx(_hand_nt_xent_cosine(a, b, tau), rel=1e-5)
    # The similarity itself differs from cos/tau by exactly the constant -1/tau.
    sim = loss.similarity(a, b)
    assert torch.allclose(sim, (a @ b.T - 1.0) / tau, atol=1e-5)


def test_aninfonce_similarity_is_the_quadratic_form():
    a, b = _pairs(n=3, d=5, seed=1)
    loss = AnInfoNCELoss(dim=5, seed=7)
    lam = loss.Lambda.detach()
    want = torch.tensor([[-0.5 * float(((a[i] - b[j]) ** 2 * lam).sum()) for j in range(3)] for i in range(3)])
    assert torch.allclose(loss.similarity(a, b).detach(), want, atol=1e-6)


def test_aninfonce_gradient_reaches_lambda():
    a, b = _pairs(n=8, d=6)
    loss = AnInfoNCELoss(dim=6, seed=0)
    total_loss(loss(a, b)).backward()
    assert loss.lam.grad is not None
    assert torch.isfinite(loss.lam.grad).all() and (loss.lam.grad.abs() > 0).all()


def test_aninfonce_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    one, two = AnInfoNCELoss(dim=16, seed=5), AnInfoNCELoss(dim=16, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(one.lam, two.lam)
    assert 0.02 < one.lam.std().item() < 0.3  # 0.1 * N(0, 1)
    assert not torch.equal(one.lam, AnInfoNCELoss(dim=16, seed=6).lam)


def test_lambda_gets_its_own_learning_rate():
    groups = AnInfoNCELoss(dim=4).param_groups(lr=1e-4, lambda_lr=1e-3)
    assert [g["name"] for g in groups] == ["loss_lambda"]
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.0
    groups = InfoNCELoss().param_groups(lr=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("loss_scale", 1e-4)]


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_builds_runs_and_backprops(name):
    entry = LOSSES.entry(name)
    assert entry.summary and entry.paper
    loss = create_loss(name, dim=5)
    a, b = _pairs(d=5)
    a.requires_grad_(True)
    parts = loss(a, b)
    assert any(k.endswith("_loss") for k in parts)
    total_loss(parts).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_loss_registry_lookup_fails_loudly():
    assert set(LOSSES.names()) >= {"infonce", "aninfonce"}
    with pytest.raises(UnknownName, match="available: aninfonce, infonce"):
        create_loss("infonse")
    with pytest.raises(ConfigError, match="unknown parameter"):
        create_loss("infonce", temperature=0.1)
    with pytest.raises(ConfigError, match=">= 0.001"):
        create_loss("infonce", init_temperature=0.0)
    assert isinstance(create_loss("aninfonce", dim=3, seed=1), AnInfoNCELoss)
