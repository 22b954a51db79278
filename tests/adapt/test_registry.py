"""The adaptation registry: every method runs, metadata for the dashboard, applicability, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from core.adapt import ADAPTERS, AdaptConfig, NotApplicable, adapt_domain, applicable, create_adapter
from core.errors import ConfigError, UnknownName
from core.registry import ParamSpec

METHODS = ADAPTERS.names()
BN_METHODS = [e.name for e in ADAPTERS if e.extra["needs_bn"]]


def tiny_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5),
    ).eval()


class TinyViT(nn.Module):
    """A patch embedding, LayerNorm and a linear head: no BatchNorm (like a CLIP ViT)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(tokens).mean(1))


def test_the_reference_methods_are_registered() -> None:
    assert set(METHODS) >= {"none", "bn", "tent", "ent", "hard_pl", "soft_pl", "rpl"}
    assert set(BN_METHODS) == set(METHODS) - {"none"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_and_returns_logits(method: str) -> None:
    model = tiny_model()
    xs = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    adapter = create_adapter(method, model)
    out = list(adapt_domain(adapter, xs))
    assert len(out) == 3
    for logits, _batch in out:
        assert logits.shape == (6, 5) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
        assert not logits.requires_grad
    assert applicable(method, model)


@pytest.mark.parametrize("method", METHODS)
def test_metadata_for_forms(method: str) -> None:
    entry = ADAPTERS.entry(method)
    assert entry.summary and entry.obj.name == method
    if entry.extra["needs_bn"]:
        assert entry.paper and entry.extra["batch_size"] >= 1
    defaults = entry.validate_params({})
    for spec in entry.params:
        assert isinstance(spec, ParamSpec) and spec.help
        assert spec.validate(spec.default) == defaults[spec.name]
        assert spec.kind != "float" or spec.min is not None  # every number has a range
    json.dumps(AdaptConfig(method).to_dict())


def test_reference_defaults() -> None:
    """The defaults the docstrings cite (TENT ImageNet-C; self-learning reference script; RPL q)."""
    tent = ADAPTERS.entry("tent")
    got = tent.validate_params({})
    assert (got["optimizer"], got["lr"], got["momentum"], got["nesterov"], got["steps"]) == ("sgd", 2.5e-4, 0.9, True, 1)
    assert tent.extra["batch_size"] == 64
    for name in ("ent", "hard_pl", "soft_pl", "rpl"):
        entry = ADAPTERS.entry(name)
        got = entry.validate_params({})
        assert (got["optimizer"], got["lr"], got["momentum"], got["epochs"]) == ("sgd", 0.75e-3, 0.0, 1)
        assert entry.extra["batch_size"] == 96
    assert ADAPTERS.entry("rpl").validate_params({})["q"] == 0.8
    assert ADAPTERS.entry("bn").validate_params({})["N"] == 0.0


@pytest.mark.parametrize("method", BN_METHODS)
def test_model_without_batchnorm_is_not_applicable(method: str) -> None:
    vit = TinyViT()
    assert not applicable(method, vit)
    with pytest.raises(NotApplicable, match="no BatchNorm") as info:
        create_adapter(method, vit)
    assert isinstance(info.value, ConfigError)
    assert "LayerNorm" in info.value.message and "none" in (info.value.hint or "")
    with pytest.raises(NotApplicable):
        AdaptConfig(method).build(vit)


def test_none_adapts_any_model() -> None:
    vit = TinyViT().eval()
    x = torch.randn(2, 3, 8, 8)
    assert applicable("none", vit)
    with torch.no_grad():
        expect = vit(x)
    torch.testing.assert_close(create_adapter("none", vit).predict_and_adapt(x), expect, rtol=0, atol=0)


def test_none_is_the_source_model_in_eval_mode() -> None:
    model = tiny_model()
    model.train()  # the adapter puts its copy in eval mode: BN uses the source running statistics
    x = torch.randn(4, 3, 8, 8)
    out = create_adapter("none", model).predict_and_adapt(x)
    with torch.no_grad():
        expect = tiny_model().eval()(x)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


def test_unknown_method_lists_the_alternatives() -> None:
    with pytest.raises(UnknownName) as info:
        create_adapter("tnet", tiny_model())
    msg = str(info.value)
    assert "did you mean 'tent'" in msg and "available: " + ", ".join(sorted(METHODS)) in msg
    with pytest.raises(UnknownName):
        AdaptConfig("bogus")
    with pytest.raises(UnknownName):
        applicable("bogus", tiny_model())


def _out_of_range() -> list[tuple[str, str, object]]:
    cases = []
    for entry in ADAPTERS:
        for spec in entry.params:
            if spec.min is not None:
                cases.append((entry.name, spec.name, spec.min - 1))
            if spec.max is not None:
                cases.append((entry.name, spec.name, spec.max + 1))
            if spec.kind == "choice":
                cases.append((entry.name, spec.name, "nope"))
    return cases


@pytest.mark.parametrize(("method", "param", "value"), _out_of_range())
def test_out_of_range_params_are_refused(method: str, param: str, value: object) -> None:
    with pytest.raises(ConfigError, match=param):
        create_adapter(method, tiny_model(), **{param: value})
    with pytest.raises(ConfigError, match=param):
        AdaptConfig(method, {param: value})


def test_unknown_params_and_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="unknown parameter"):
        create_adapter("tent", tiny_model(), learning_rate=0.1)
    with pytest.raises(ConfigError, match="unknown parameter"):
        create_adapter("none", tiny_model(), N=3)
    with pytest.raises(ConfigError, match="setting"):
        AdaptConfig("tent", setting="episodic")
    with pytest.raises(ConfigError, match="batch_size"):
        AdaptConfig("tent", batch_size=0)
    with pytest.raises(ConfigError, match="precision"):
        AdaptConfig("tent", precision="fp8")


def test_config_resolves_round_trips_and_seeds() -> None:
    cfg = AdaptConfig("rpl", {"lr": "0.01", "q": None}, setting="continual", seed=3)
    assert cfg.params["lr"] == 0.01 and cfg.params["q"] == 0.8 and cfg.batch_size == 96
    again = AdaptConfig(**cfg.to_dict())
    assert again == cfg
    assert AdaptConfig("none").batch_size is None and AdaptConfig("tent", batch_size=32).batch_size == 32
    perm = [torch.randperm(20, generator=AdaptConfig("tent", seed=s).generator()) for s in (7, 7, 8)]
    assert torch.equal(perm[0], perm[1]) and not torch.equal(perm[0], perm[2])
    adapter = cfg.build(tiny_model())
    assert adapter.name == "rpl" and adapter.params == dict(cfg.params) and adapter.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method: str) -> None:
    xs = [torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    cpu = [logits for logits, _ in adapt_domain(create_adapter(method, tiny_model()), xs)]
    gpu_adapter = create_adapter(method, tiny_model().cuda())
    assert gpu_adapter.device.type == "cuda"
    gpu = [logits for logits, _ in adapt_domain(gpu_adapter, xs)]  # CPU batches are moved to the model
    for a, b in zip(cpu, gpu, strict=True):
        assert b.device.type == "cuda"
        torch.testing.assert_close(b.cpu(), a, rtol=1e-2, atol=1e-3)  # TF32 convolutions on CUDA
    bf16 = create_adapter(method, tiny_model().cuda(), precision="bf16")
    out = bf16.predict_and_adapt(xs[0])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
