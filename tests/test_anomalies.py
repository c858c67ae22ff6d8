"""Each anomaly rule fires on the series it is meant for, and stays quiet on a healthy run."""

import math

from minigpt.anomalies import PLATEAU_WINDOW, diagnose


def train_rows(losses, **fields):
    return [{"type": "train", "step": 10 * (index + 1), "loss": loss, "grad_norm": 1.0, "tokens_per_second": 1000.0,
             "system_memory_percent": 40.0, **fields} for index, loss in enumerate(losses)]


def kinds(rows):
    return {anomaly.kind for anomaly in diagnose(rows)}


HEALTHY = train_rows([5.0 * 0.99**index for index in range(100)]) + [
    {"type": "eval", "step": step, "val_loss": loss} for step, loss in [(200, 4.5), (400, 4.2), (600, 4.0)]
]


def test_a_healthy_run_raises_nothing():
    assert diagnose(HEALTHY) == []


def test_non_finite_loss():
    rows = train_rows([3.0] * 5 + [math.nan])
    found = diagnose(rows)
    assert "non_finite_loss" in {anomaly.kind for anomaly in found}
    assert all(anomaly.advice for anomaly in found)


def test_loss_spike():
    assert "loss_spike" in kinds(train_rows([3.0, 2.9, 3.1, 3.0, 2.95, 3.05, 6.0]))
    assert "loss_spike" not in kinds(train_rows([3.0, 2.9, 3.1, 3.0, 2.95, 3.05, 3.5]))


def test_loss_plateau():
    assert "loss_plateau" in kinds(train_rows([2.0 + 0.01 * (index % 3) for index in range(PLATEAU_WINDOW)]))
    assert "loss_plateau" not in kinds(train_rows([2.0] * (PLATEAU_WINDOW - 1)))  # too early to tell


def test_exploding_and_vanishing_gradients():
    exploding = train_rows([3.0] * 3)
    exploding[-1]["grad_norm"] = 250.0
    vanishing = train_rows([3.0] * 3)
    vanishing[-1]["grad_norm"] = 0.001
    assert "exploding_gradient" in kinds(exploding)
    assert "vanishing_gradient" in kinds(vanishing)


def test_overfitting():
    rows = train_rows([3.0 - 0.02 * index for index in range(60)]) + [
        {"type": "eval", "step": step, "val_loss": loss} for step, loss in [(200, 3.0), (400, 3.1), (600, 3.3)]
    ]
    assert "overfitting" in kinds(rows)
    improving = rows[:-1] + [{"type": "eval", "step": 600, "val_loss": 2.9}]
    assert "overfitting" not in kinds(improving)


def test_throughput_drop_memory_and_accelerator():
    slow = train_rows([3.0] * 12)
    slow[-1]["tokens_per_second"] = 300.0
    assert "throughput_drop" in kinds(slow)
    full = train_rows([3.0] * 3, system_memory_percent=95.0)
    assert "memory_pressure" in kinds(full)
    idle = train_rows([3.0] * 3, accelerator_utilisation=12.0)
    assert "low_accelerator_utilisation" in kinds(idle)
