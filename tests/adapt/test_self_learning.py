"""TENT and self-learning (ENT, hard PL, soft PL, RPL): losses, what trains, the step protocol, resets."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.adapt import (
    AdaptConfig,
    Adapter,
    SelfLearningAdapter,
    adapt_domain,
    adapt_domains,
    bn_affine_parameters,
    create_adapter,
    entropy,
    gce,
    soft_ce,
)
from core.errors import ConfigError, DataError

GRADIENT_METHODS = ("tent", "ent", "hard_pl", "soft_pl", "rpl")
PLAIN_SGD = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "nesterov": False}


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def batches(k: int, seed: int = 1, n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=g) * 1.5 + 0.3 for _ in range(k)]


def is_bn_affine(name: str, model: nn.Module) -> bool:
    module = model.get_submodule(name.rpartition(".")[0])
    return isinstance(module, nn.BatchNorm2d)


# -- losses against brute force --------------------------------------------------------------------
def probs_by_hand(logits: torch.Tensor) -> list[list[float]]:
    out = []
    for row in logits.tolist():
        exps = [math.exp(v) for v in row]
        out.append([e / sum(exps) for e in exps])
    return out


def test_entropy_brute_force() -> None:
    logits = torch.randn(6, 7, generator=torch.Generator().manual_seed(0)) * 3
    expect = sum(-sum(p * math.log(p) for p in row) for row in probs_by_hand(logits)) / 6
    assert float(entropy(logits)) == pytest.approx(expect, rel=1e-5)
    assert float(entropy(torch.zeros(2, 4))) == pytest.approx(math.log(4), rel=1e-6)  # uniform: log C


def test_gce_limits_and_pseudo_labels() -> None:
    logits = torch.randn(10, 5, generator=torch.Generator().manual_seed(0)) * 2
    labels = torch.randint(0, 5, (10,), generator=torch.Generator().manual_seed(1))
    p = probs_by_hand(logits)
    p_y = [row[int(y)] for row, y in zip(p, labels, strict=True)]
    ce = sum(-math.log(v) for v in p_y) / 10
    assert float(gce(logits, labels, q=1e-4)) == pytest.approx(ce, rel=1e-3)
    assert float(gce(logits, labels, q=1.0)) == pytest.approx(sum(1 - v for v in p_y) / 10, rel=1e-5)
    q = 0.8
    assert float(gce(logits, labels, q=q)) == pytest.approx(sum((1 - v**q) / q for v in p_y) / 10, rel=1e-5)
    # default targets: the argmax of the logits themselves
    p_max = [max(row) for row in p]
    assert float(gce(logits)) == pytest.approx(sum((1 - v**q) / q for v in p_max) / 10, rel=1e-5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="q"):
            gce(logits, labels, q=bad)


def test_soft_ce_brute_force_and_zero_gradient_to_own_softmax() -> None:
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    teacher = torch.softmax(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), 1)
    p = probs_by_hand(logits)
    expect = sum(-sum(t * math.log(v) for t, v in zip(trow, prow, strict=True))
                 for trow, prow in zip(teacher.tolist(), p, strict=True)) / 4
    assert float(soft_ce(logits, teacher)) == pytest.approx(expect, rel=1e-5)
    z = logits.clone().requires_grad_(True)
    soft_ce(z, z.softmax(1)).backward()
    assert z.grad is not None and z.grad.abs().max() < 1e-6
    with pytest.raises(DataError, match="shape"):
        soft_ce(logits, teacher[:, :2])


# -- one step against the formula ------------------------------------------------------------------
def _entropy(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = z.exp() / z.exp().sum(1, keepdim=True)
    return -(p * p.log()).sum(1).mean()


def _hard_pl(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_p = z - z.exp().sum(1, keepdim=True).log()
    return -log_p[torch.arange(len(z)), z.detach().argmax(1)].mean()


def _rpl(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    p = z.exp() / z.exp().sum(1, keepdim=True)
    p_y = p[torch.arange(len(z)), z.detach().argmax(1)]
    return ((1 - p_y**0.8) / 0.8).mean()


def _soft_pl(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    log_p = z - z.exp().sum(1, keepdim=True).log()
    return -(t * log_p).sum(1).mean()


MANUAL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "tent": _entropy, "ent": _entropy, "hard_pl": _hard_pl, "rpl": _rpl, "soft_pl": _soft_pl,
}


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_one_step_is_sgd_on_the_methods_loss(method: str) -> None:
    """Returned logits = the forward before the update; new BN params = p - lr * grad of the formula."""
    x = batches(1)[0]
    adapter = create_adapter(method, tiny_model(), **PLAIN_SGD)
    ref = copy.deepcopy(adapter.model)  # prepared: BN on batch statistics, BN affine trainable
    with torch.no_grad():
        teacher = ref(x).softmax(1)  # soft_pl's teacher: the source model until a refresh
    z = ref(x)
    params = dict(ref.named_parameters())
    trained = [n for n in params if is_bn_affine(n, ref)]
    grads = torch.autograd.grad(MANUAL_LOSSES[method](z, teacher), [params[n] for n in trained])

    logits = adapter.predict_and_adapt(x)

    torch.testing.assert_close(logits, z.detach(), rtol=0, atol=0)
    new = dict(adapter.model.named_parameters())
    for n, g in zip(trained, grads, strict=True):
        assert g.abs().max() > 0, n  # the loss moves every BN parameter
        torch.testing.assert_close(new[n], params[n].detach() - 0.05 * g, rtol=1e-5, atol=1e-7)
    for n, p in params.items():
        if n not in trained:
            assert torch.equal(new[n], p), n


def test_rpl_with_small_q_steps_like_hard_pl() -> None:
    x = batches(1)[0]
    hard = create_adapter("hard_pl", tiny_model(), **PLAIN_SGD)
    rpl = create_adapter("rpl", tiny_model(), q=1e-4, **PLAIN_SGD)
    rpl_08 = create_adapter("rpl", tiny_model(), **PLAIN_SGD)
    for adapter in (hard, rpl, rpl_08):
        adapter.predict_and_adapt(x)
    source = [p.detach() for p in bn_affine_parameters(create_adapter("hard_pl", tiny_model()).model)]

    def delta(adapter: Adapter) -> torch.Tensor:
        return torch.cat([(p - p0).flatten() for p, p0 in zip(bn_affine_parameters(adapter.model), source, strict=True)])

    assert delta(hard).abs().max() > 0
    torch.testing.assert_close(delta(rpl), delta(hard), rtol=2e-3, atol=1e-7)
    assert not torch.allclose(delta(rpl_08), delta(hard), rtol=1e-2)  # q = 0.8 is not cross-entropy


# -- TENT's protocol -------------------------------------------------------------------------------
def test_tent_trains_only_bn_affine_and_drops_running_stats() -> None:
    model = tiny_model()
    source = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = create_adapter("tent", model, lr=0.05)
    for x in batches(4):
        adapter.predict_and_adapt(x)
    after = dict(adapter.model.named_parameters())
    assert [n for n, p in after.items() if p.requires_grad] == [n for n in after if is_bn_affine(n, model)]
    for n, p in model.named_parameters():
        if is_bn_affine(n, model):
            assert not torch.equal(after[n], p), n
        else:
            assert torch.equal(after[n], p), n
    for m in adapter.model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is None and m.running_var is None and not m.track_running_stats
    assert not adapter.model.training  # eval mode: dropout off; BN still on batch statistics
    for k, v in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(v, source[k]), k


@pytest.mark.parametrize("steps", [1, 3])
def test_one_optimizer_step_and_one_forward_per_step(steps: int) -> None:
    adapter = create_adapter("tent", tiny_model(), steps=steps)
    forwards = []
    adapter.model.register_forward_hook(lambda *_: forwards.append(1))
    with mock.patch.object(adapter.optimizer, "step", wraps=adapter.optimizer.step) as step:
        for x in batches(5):
            adapter.predict_and_adapt(x)
    assert step.call_count == 5 * steps
    assert len(forwards) == 5 * steps
    assert adapter.batches_seen == 5


def test_returns_predictions_from_before_the_update() -> None:
    adapter = create_adapter("tent", tiny_model(), lr=0.1)
    for x in batches(3):
        before = copy.deepcopy(adapter.model)
        with torch.no_grad():
            expect = before(x)
        logits = adapter.predict_and_adapt(x)
        torch.testing.assert_close(logits, expect, rtol=0, atol=0)
        with torch.no_grad():
            assert not torch.allclose(adapter.model(x), expect)  # the update happened after


def test_adapts_inside_no_grad() -> None:
    adapter = create_adapter("tent", tiny_model(), lr=0.1)
    p0 = [p.clone() for p in bn_affine_parameters(adapter.model)]
    with torch.no_grad():
        adapter.predict_and_adapt(batches(1)[0])
    assert any(not torch.equal(p, q) for p, q in zip(bn_affine_parameters(adapter.model), p0, strict=True))


# -- reset and continual ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_reset_restores_source_parameters_and_optimizer(method: str) -> None:
    xs = batches(4)
    adapter = create_adapter(method, tiny_model(), lr=0.05, momentum=0.9, nesterov=True, teacher_update=2
                             ) if method == "soft_pl" else create_adapter(method, tiny_model(), lr=0.05, momentum=0.9)
    fresh = copy.deepcopy(adapter)
    for x in xs[:3]:
        adapter.predict_and_adapt(x)
    adapter.reset()
    for k, v in fresh.model.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[k], v), k
    assert len(adapter.optimizer.state) == 0 and adapter.batches_seen == 0
    # the same future as a fresh adapter: equal predictions and parameters for two more batches
    for x in xs[3:] + xs[:1]:
        torch.testing.assert_close(adapter.predict_and_adapt(x), fresh.predict_and_adapt(x), rtol=0, atol=0)
    for p, q in zip(bn_affine_parameters(adapter.model), bn_affine_parameters(fresh.model), strict=True):
        assert torch.equal(p, q)


def test_reset_vs_continual_settings() -> None:
    d1, d2 = batches(3, seed=1), batches(2, seed=2)
    cfg = {"lr": 0.1}
    reset = list(adapt_domains(create_adapter("tent", tiny_model(), **cfg), {"a": d1, "b": d2}, setting="reset"))
    cont = list(adapt_domains(create_adapter("tent", tiny_model(), **cfg), [("a", d1), ("b", d2)],
                              setting="continual"))
    alone = list(adapt_domain(create_adapter("tent", tiny_model(), **cfg), d2))
    assert [name for name, _, _ in reset] == ["a"] * 3 + ["b"] * 2
    for (_, logits, batch), (expect, b2) in zip(reset[3:], alone, strict=True):
        assert batch is b2
        torch.testing.assert_close(logits, expect, rtol=0, atol=0)  # reset: domain b starts from the source
    assert not torch.allclose(cont[3][1], alone[0][0])  # continual: domain b starts where a ended
    for (_, la, _), (_, lc, _) in zip(reset[:3], cont[:3], strict=True):
        torch.testing.assert_close(la, lc, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="setting"):
        list(adapt_domains(create_adapter("tent", tiny_model()), {"a": d1}, setting="episodic"))


# -- passes, teachers, batches ---------------------------------------------------------------------
def test_epochs_adapt_every_pass_and_yield_the_last() -> None:
    xs = batches(3)
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in xs]
    adapter = create_adapter("rpl", tiny_model(), epochs=2)
    with mock.patch.object(adapter.optimizer, "step", wraps=adapter.optimizer.step) as step:
        out = list(adapt_domain(adapter, labelled))
    assert step.call_count == 6 and len(out) == 3
    assert [b is lb for (_, b), lb in zip(out, labelled, strict=True)] == [True] * 3
    with pytest.raises(ConfigError, match="re-iterable"):
        list(adapt_domain(create_adapter("rpl", tiny_model(), epochs=2), iter(xs)))
    with pytest.raises(DataError, match="batch"):
        list(adapt_domain(create_adapter("rpl", tiny_model()), ["not a tensor"]))


def test_soft_pl_teacher_refreshes() -> None:
    xs = batches(4)
    instant = create_adapter("soft_pl", tiny_model(), teacher_update=1, lr=1.0)
    p0 = [p.clone() for p in bn_affine_parameters(instant.model)]
    for x in xs:
        instant.predict_and_adapt(x)
    for p, q in zip(bn_affine_parameters(instant.model), p0, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5)  # own softmax as teacher: no gradient

    per_pass = create_adapter("soft_pl", tiny_model(), lr=0.5)
    teacher0 = [p.clone() for p in bn_affine_parameters(per_pass.teacher)]
    list(adapt_domain(per_pass, xs))
    for p, q in zip(bn_affine_parameters(per_pass.teacher), teacher0, strict=True):
        assert torch.equal(p, q)  # the teacher stays fixed within a pass
    assert any(not torch.equal(p, q) for p, q in zip(bn_affine_parameters(per_pass.model), teacher0, strict=True))
    per_pass.start_pass()
    for p, q in zip(bn_affine_parameters(per_pass.teacher), bn_affine_parameters(per_pass.model), strict=True):
        assert torch.equal(p, q)


# -- configuration errors --------------------------------------------------------------------------
def test_optimizer_choices_and_errors() -> None:
    adam = create_adapter("tent", tiny_model(), optimizer="adam", lr=1e-3)
    assert isinstance(adam.optimizer, torch.optim.Adam) and adam.optimizer.defaults["betas"] == (0.9, 0.999)
    sgd = create_adapter("tent", tiny_model())
    assert isinstance(sgd.optimizer, torch.optim.SGD)
    assert sgd.optimizer.defaults["momentum"] == 0.9 and sgd.optimizer.defaults["nesterov"]
    with pytest.raises(ConfigError, match="nesterov"):
        create_adapter("tent", tiny_model(), momentum=0.0)
    with pytest.raises(ConfigError, match="fp16"):
        create_adapter("tent", tiny_model(), precision="fp16")
    with pytest.raises(ConfigError, match="fp16"):
        AdaptConfig("rpl", precision="fp16")


def test_bn_without_affine_is_not_applicable_for_training() -> None:
    from core.adapt import NotApplicable

    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False), nn.Flatten(), nn.Linear(8, 3))
    with pytest.raises(NotApplicable, match="affine"):
        create_adapter("tent", model)


def test_losses_do_not_leak_into_other_parameters_with_dropout() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(64, 3))
    adapter = create_adapter("ent", model.eval())
    x = batches(1)[0]
    a, b = copy.deepcopy(adapter), copy.deepcopy(adapter)
    torch.testing.assert_close(a.predict_and_adapt(x), b.predict_and_adapt(x), rtol=0, atol=0)  # dropout off
    assert isinstance(adapter, SelfLearningAdapter)
    assert F.softmax(a.predict_and_adapt(x), 1).shape == (8, 3)
