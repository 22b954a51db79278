"""Warm-up + cosine schedule: values at key steps, and the LambdaLR wrapper resumed from a state."""

from __future__ import annotations

import math

import pytest
import torch

from core.train.schedule import lr_at, lr_factor, warmup_cosine_scheduler


def test_schedule_values_at_key_steps():
    kw = {"base_lr": 1e-3, "total_steps": 110, "warmup_steps": 10}
    assert lr_at(0, **kw) == pytest.approx(1e-4)          # first update is (0+1)/10 of the base
    assert lr_at(4, **kw) == pytest.approx(5e-4)
    assert lr_at(9, **kw) == pytest.approx(1e-3)          # end of warm-up reaches the base
    assert lr_at(10, **kw) == pytest.approx(1e-3)         # cosine starts at the top
    assert lr_at(60, **kw) == pytest.approx(5e-4)         # half-way down the cosine
    assert lr_at(35, **kw) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-15)
    assert lr_at(500, **kw) == pytest.approx(0.0, abs=1e-15)  # past the end stays at the floor


def test_schedule_floor_and_no_warmup():
    assert lr_factor(0, total_steps=100) == pytest.approx(1.0)
    assert lr_factor(100, total_steps=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, total_steps=100, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_factor(3, total_steps=4, warmup_steps=4) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        lr_factor(-1, total_steps=10)


def _opt() -> torch.optim.Optimizer:
    w = torch.nn.Parameter(torch.zeros(2))
    lam = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [w], "lr": 5e-4}, {"params": [lam], "lr": 1e-3}])


def test_scheduler_applies_to_every_group_and_resumes_by_state():
    opt = _opt()
    sched = warmup_cosine_scheduler(opt, total_steps=20, warmup_steps=5)
    seen = []
    for _ in range(12):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    for k, (lr_w, lr_lam) in enumerate(seen):
        assert lr_w == pytest.approx(lr_at(k, base_lr=5e-4, total_steps=20, warmup_steps=5))
        assert lr_lam == pytest.approx(lr_at(k, base_lr=1e-3, total_steps=20, warmup_steps=5))

    state = sched.state_dict()
    opt2 = _opt()
    sched2 = warmup_cosine_scheduler(opt2, total_steps=20, warmup_steps=5)
    sched2.load_state_dict(state)
    # A freshly built optimiser holds the base LRs until the scheduler writes the resumed step's LR.
    for g, lr in zip(opt2.param_groups, sched2.get_last_lr(), strict=True):
        g["lr"] = lr
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(12, base_lr=5e-4, total_steps=20, warmup_steps=5))


def test_scheduler_rejects_bad_lengths():
    with pytest.raises(ValueError):
        warmup_cosine_scheduler(_opt(), total_steps=0)
    with pytest.raises(ValueError):
        warmup_cosine_scheduler(_opt(), total_steps=5, warmup_steps=6)
