"""BN adaptation (Schneider, Rusak et al. 2020) against the formula computed by hand, layer by layer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from core.adapt import NotApplicable, create_adapter
from core.errors import DataError

EPS = 1e-5


def tiny_bn_model(seed: int = 0) -> nn.Sequential:
    """conv-BN2d-ReLU-conv-BN2d-pool-linear-BN1d-linear with random source statistics and affine params."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 5),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-1.0, 1.0)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def by_hand(model: nn.Sequential, x: torch.Tensor, prior: float, *, unbiased: bool = True) -> torch.Tensor:
    """The model's forward with every BN layer normalising by the paper's mixed statistics, in float64."""
    model = model.double()
    h = x.double()
    n = x.shape[0]
    for m in model:
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            dims = [d for d in range(h.ndim) if d != 1]
            count = h.numel() // h.shape[1]
            mean_b = h.sum(dim=dims) / count
            sq = ((h - mean_b.view(1, -1, *[1] * (h.ndim - 2))) ** 2).sum(dim=dims)
            var_b = sq / (count - 1) if unbiased else sq / count
            w = 1.0 if math.isinf(prior) else prior / (prior + n)
            mean = w * m.running_mean + (1 - w) * mean_b
            var = w * m.running_var + (1 - w) * var_b
            shape = (1, -1, *[1] * (h.ndim - 2))
            h = (h - mean.view(shape)) / torch.sqrt(var.view(shape) + m.eps) * m.weight.view(shape) + m.bias.view(shape)
        else:
            h = m(h)
    return h.float()


@pytest.fixture
def x() -> torch.Tensor:
    # shifted and scaled so the batch statistics differ clearly from the source ones
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 2.0 + 0.7


def test_huge_prior_equals_source_eval(x: torch.Tensor) -> None:
    model = tiny_bn_model()
    with torch.no_grad():
        source = model(x)
    out = create_adapter("bn", model, N=1e9).predict_and_adapt(x)
    torch.testing.assert_close(out, source, rtol=1e-5, atol=1e-5)
    out_inf = create_adapter("bn", model, N=float("inf")).predict_and_adapt(x)
    torch.testing.assert_close(out_inf, source, rtol=0, atol=1e-6)


def test_full_adaptation_uses_unbiased_batch_variance(x: torch.Tensor) -> None:
    model = tiny_bn_model()
    out = create_adapter("bn", model, N=0).predict_and_adapt(x)
    torch.testing.assert_close(out, by_hand(tiny_bn_model(), x, 0.0), rtol=1e-4, atol=1e-5)
    # the test tells unbiased from biased (F.batch_norm in training mode normalises with the biased one)
    biased = by_hand(tiny_bn_model(), x, 0.0, unbiased=False)
    assert (out - biased).abs().max() > 1e-4
    with torch.no_grad():
        train_mode = tiny_bn_model().train()(x)
    torch.testing.assert_close(train_mode, biased, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prior", [1.0, 16.0, 100.0])
def test_intermediate_prior_matches_formula_on_the_whole_model(x: torch.Tensor, prior: float) -> None:
    out = create_adapter("bn", tiny_bn_model(), N=prior).predict_and_adapt(x)
    torch.testing.assert_close(out, by_hand(tiny_bn_model(), x, prior), rtol=1e-4, atol=1e-5)


def test_one_layer_by_hand() -> None:
    """A single BatchNorm2d, N = 16, n = 4: weights 16/20 (source) and 4/20 (batch), written out."""
    layer = nn.BatchNorm2d(2).eval()
    layer.running_mean.copy_(torch.tensor([1.0, -2.0]))
    layer.running_var.copy_(torch.tensor([4.0, 0.25]))
    layer.weight.data.copy_(torch.tensor([2.0, 0.5]))
    layer.bias.data.copy_(torch.tensor([0.1, -0.3]))
    layer.requires_grad_(False)
    x = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 2, 3, 1) ** 1.5 / 10
    out = create_adapter("bn", layer, N=16).predict_and_adapt(x)
    for c in range(2):
        vals = [float(v) for v in x[:, c].flatten()]
        mean_b = sum(vals) / len(vals)
        var_b = sum((v - mean_b) ** 2 for v in vals) / (len(vals) - 1)
        mean = 0.8 * float(layer.running_mean[c]) + 0.2 * mean_b
        var = 0.8 * float(layer.running_var[c]) + 0.2 * var_b
        expect = [(v - mean) / math.sqrt(var + EPS) * float(layer.weight[c]) + float(layer.bias[c]) for v in vals]
        assert out[:, c].flatten().tolist() == pytest.approx(expect, rel=1e-5, abs=1e-6)


def test_no_state_carries_over_and_source_untouched(x: torch.Tensor) -> None:
    model = tiny_bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapter = create_adapter("bn", model, N=4.0)
    first = adapter.predict_and_adapt(x)
    for _ in range(3):
        adapter.predict_and_adapt(torch.randn(8, 3, 6, 6) * 3)
    torch.testing.assert_close(adapter.predict_and_adapt(x), first, rtol=0, atol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_prediction_depends_on_the_batch(x: torch.Tensor) -> None:
    adapter = create_adapter("bn", tiny_bn_model(), N=0)
    whole = adapter.predict_and_adapt(x)
    half = adapter.predict_and_adapt(x[:4])
    assert not torch.allclose(whole[:4], half)


def test_single_value_per_channel_is_a_data_error() -> None:
    layer = nn.BatchNorm1d(3).eval()
    with pytest.raises(DataError, match="more than one value"):
        create_adapter("bn", layer, N=0).predict_and_adapt(torch.randn(1, 3))


def test_prior_needs_source_statistics() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    with pytest.raises(NotApplicable, match="source statistics"):
        create_adapter("bn", model, N=8)
    out = create_adapter("bn", model, N=0).predict_and_adapt(torch.randn(5, 3))
    assert out.shape == (5, 2)


def test_bn_without_affine_parameters() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2, affine=False), nn.Flatten(), nn.Linear(8, 3))
    out = create_adapter("bn", model.eval(), N=2).predict_and_adapt(torch.randn(4, 3, 2, 2))
    assert out.shape == (4, 3) and torch.isfinite(out).all()
