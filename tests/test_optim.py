"""The learning-rate schedule and AdamW's parameter groups."""

import dataclasses

import pytest

from minigpt.config import ModelConfig, TrainConfig
from minigpt.model import GPT
from minigpt.optim import build_optimizer, learning_rate_at

TRAIN = TrainConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)


def test_warmup_rises_linearly_to_the_peak():
    rates = [learning_rate_at(step, TRAIN) for step in range(10)]
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-3)
    assert all(later > earlier for earlier, later in zip(rates, rates[1:]))


@pytest.mark.parametrize("scheduler, middle", [("cosine", 5.5e-4), ("linear", 5.5e-4), ("constant", 1e-3)])
def test_decay_shapes(scheduler, middle):
    train = dataclasses.replace(TRAIN, lr_scheduler=scheduler)
    assert learning_rate_at(10, train) == pytest.approx(1e-3)
    assert learning_rate_at(60, train) == pytest.approx(middle)
    end = 1e-3 if scheduler == "constant" else 1e-4
    assert learning_rate_at(110, train) == pytest.approx(end)
    assert learning_rate_at(500, train) == pytest.approx(end)  # past the end it stays at the floor


def test_cosine_is_above_linear_early_and_below_late():
    cosine, linear = TRAIN, dataclasses.replace(TRAIN, lr_scheduler="linear")
    assert learning_rate_at(30, cosine) > learning_rate_at(30, linear)
    assert learning_rate_at(90, cosine) < learning_rate_at(90, linear)


def test_a_time_budget_drives_the_decay_when_it_ends_first():
    train = dataclasses.replace(TRAIN, max_steps=0, max_time=100.0)
    assert learning_rate_at(20, train, elapsed_seconds=0.0) == pytest.approx(1e-3)
    assert learning_rate_at(20, train, elapsed_seconds=50.0) == pytest.approx(5.5e-4)
    assert learning_rate_at(20, train, elapsed_seconds=100.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("step, elapsed_seconds, progress", [
    (60, 10.0, 0.5),  # the steps are half done, the time a tenth: the steps drive the decay
    (20, 50.0, 0.5),  # the time is half gone, the steps a tenth: the time drives it
    (110, 1.0, 1.0),  # the step budget ends first: the floor
    (20, 100.0, 1.0),  # the time budget ends first: the floor
])
def test_with_both_budgets_the_decay_follows_whichever_ends_first(step, elapsed_seconds, progress):
    train = dataclasses.replace(TRAIN, lr_scheduler="linear", max_time=100.0)  # 100 steps after warmup, or 100 seconds
    assert learning_rate_at(step, train, elapsed_seconds) == pytest.approx(1e-4 + (1.0 - progress) * 9e-4)


def test_norm_gains_get_no_weight_decay():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(parameter.dim() == 2 for parameter in decay["params"])
    assert all(parameter.dim() == 1 for parameter in no_decay["params"])
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == model.num_parameters()
