"""Spotting an unhealthy run from its metrics, with a piece of advice for each finding.

Each rule looks at the rows of metrics.jsonl seen so far (train rows and eval rows) and says
whether something is wrong *now*. The trainer runs them as it logs and the monitor runs them
on a run directory, so both report the same things in the same words.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

Row = dict[str, Any]

SPIKE_FACTOR = 1.5  # a loss this many times the recent median is a spike
SPIKE_WINDOW = 20
PLATEAU_WINDOW = 60  # logged rows over which the loss must fall at least...
PLATEAU_MIN_DROP = 0.01  # ...this fraction, from the first third of the window to the last
EXPLODING_GRAD_NORM = 100.0
VANISHING_GRAD_NORM = 0.01
THROUGHPUT_DROP = 0.5  # tokens/s below this share of the run's median
MEMORY_LIMIT_PERCENT = 90.0
LOW_ACCELERATOR_UTILISATION = 30.0
# preference tuning (rows with dpo_loss; see minigpt.objective.Preference)
PREFERENCE_WINDOW = 20  # logged rows the preference rules look back over
STUCK_TOLERANCE = 0.002  # a DPO loss this close to ln 2 has not moved
CHOSEN_DROP = 1.0  # nats the chosen reply's mean log-probability may fall over the window before it is a finding
EXPLODING_MARGIN = 25.0  # a mean reward margin past this: the loss is ~e^-25, nothing is left to learn but distance


@dataclass(frozen=True)
class Anomaly:
    kind: str
    step: int
    message: str
    advice: str

    def as_dict(self) -> Row:
        return {"kind": self.kind, "step": self.step, "message": self.message, "advice": self.advice}


def _train_rows(rows: Sequence[Row]) -> list[Row]:
    return [row for row in rows if row.get("type") == "train"]


def _finite(values: Sequence[Any]) -> list[float]:
    return [float(value) for value in values if isinstance(value, (int, float)) and math.isfinite(value)]


def non_finite_loss(rows: Sequence[Row]) -> Anomaly | None:
    train = _train_rows(rows)
    if train and not _finite([train[-1].get("loss")]):
        return Anomaly("non_finite_loss", train[-1]["step"], f"The loss is {train[-1].get('loss')}.",
                       "Lower the learning rate, keep gradient clipping on, and check the data for empty or corrupt documents.")
    return None


def loss_spike(rows: Sequence[Row]) -> Anomaly | None:
    train = _train_rows(rows)
    recent = _finite([row.get("loss") for row in train[-SPIKE_WINDOW - 1 : -1]])
    if len(recent) < 5 or not _finite([train[-1].get("loss")]):
        return None
    median, last = statistics.median(recent), float(train[-1]["loss"])
    if last > SPIKE_FACTOR * median:
        return Anomaly("loss_spike", train[-1]["step"], f"The loss jumped to {last:.3f}, {last / median:.1f}x its recent median {median:.3f}.",
                       "A bad batch or a learning rate at its edge: lower the learning rate or lengthen the warmup; look at the data near this step.")
    return None


def loss_plateau(rows: Sequence[Row]) -> Anomaly | None:
    losses = _finite([row.get("loss") for row in _train_rows(rows)[-PLATEAU_WINDOW:]])
    if len(losses) < PLATEAU_WINDOW:
        return None
    third = PLATEAU_WINDOW // 3
    early, late = statistics.mean(losses[:third]), statistics.mean(losses[-third:])
    if late > early * (1 - PLATEAU_MIN_DROP):
        return Anomaly("loss_plateau", _train_rows(rows)[-1]["step"],
                       f"The loss has not fallen over the last {PLATEAU_WINDOW} logged steps ({early:.3f} -> {late:.3f}).",
                       "If it is early, raise the learning rate; if late, the model may be at capacity: more data, a bigger model, or stop.")
    return None


def gradient_norm(rows: Sequence[Row]) -> Anomaly | None:
    train = _train_rows(rows)
    norms = _finite([train[-1].get("grad_norm")]) if train else []
    if not norms:
        return None
    norm, step = norms[0], train[-1]["step"]
    if norm > EXPLODING_GRAD_NORM:
        return Anomaly("exploding_gradient", step, f"The gradient norm is {norm:.1f} (above {EXPLODING_GRAD_NORM:g}).",
                       "Turn gradient clipping on (--grad-clip 1.0) and lower the learning rate.")
    if norm < VANISHING_GRAD_NORM:
        return Anomaly("vanishing_gradient", step, f"The gradient norm is {norm:.4f} (below {VANISHING_GRAD_NORM:g}).",
                       "The model has stopped learning: check that the learning rate is not near zero and the loss is not masked out.")
    return None


def _train_loss_at(rows: Sequence[Row], step: int) -> float | None:
    """The last finite training loss logged at or before `step`."""
    losses = _finite([row.get("loss") for row in _train_rows(rows) if row["step"] <= step])
    return losses[-1] if losses else None


def overfitting(rows: Sequence[Row]) -> Anomaly | None:
    evaluations = [row for row in rows if row.get("type") == "eval" and _finite([row.get("val_loss")])]
    if len(evaluations) < 3:
        return None
    first, middle, last = evaluations[-3:]
    train_before, train_now = _train_loss_at(rows, first["step"]), _train_loss_at(rows, last["step"])
    if first["val_loss"] < middle["val_loss"] < last["val_loss"] and train_before and train_now and train_now < train_before:
        return Anomaly("overfitting", last["step"],
                       f"Validation loss rose at each of the last two evaluations ({first['val_loss']:.3f} -> {last['val_loss']:.3f}) while the training loss fell.",
                       "The model is memorising: stop early (--early-stopping-patience), add data, or raise dropout/weight decay.")
    return None


def throughput_drop(rows: Sequence[Row]) -> Anomaly | None:
    speeds = _finite([row.get("tokens_per_second") for row in _train_rows(rows)])
    if len(speeds) < 10:
        return None
    median = statistics.median(speeds[:-1])
    if speeds[-1] < THROUGHPUT_DROP * median:
        return Anomaly("throughput_drop", _train_rows(rows)[-1]["step"], f"Throughput fell to {speeds[-1]:,.0f} tokens/s from a median of {median:,.0f}.",
                       "Another program may be competing for the CPU/GPU, or the machine is swapping: check top / nvidia-smi.")
    return None


def memory_pressure(rows: Sequence[Row]) -> Anomaly | None:
    train = _train_rows(rows)
    percents = _finite([train[-1].get("system_memory_percent")]) if train else []
    if percents and percents[0] >= MEMORY_LIMIT_PERCENT:
        return Anomaly("memory_pressure", train[-1]["step"], f"System memory is {percents[0]:.0f}% used.",
                       "Lower --batch-size or --block-size, close other programs, or set --max-memory so the run stops cleanly in time.")
    return None


def low_accelerator_utilisation(rows: Sequence[Row]) -> Anomaly | None:
    train = _train_rows(rows)
    usage = _finite([train[-1].get("accelerator_utilisation")]) if train else []
    if usage and usage[0] < LOW_ACCELERATOR_UTILISATION:
        return Anomaly("low_accelerator_utilisation", train[-1]["step"], f"The GPU is busy only {usage[0]:.0f}% of the time.",
                       "The GPU waits on data or Python: raise --batch-size, use the token cache, or --enable-compile.")
    return None


def _preference_rows(rows: Sequence[Row]) -> list[Row]:
    """The last PREFERENCE_WINDOW train rows of a preference run (all of them with every metric), or none."""
    window = [row for row in _train_rows(rows) if "dpo_loss" in row][-PREFERENCE_WINDOW:]
    keys = ("dpo_loss", "margin", "logps_chosen", "logps_rejected")
    return window if len(window) == PREFERENCE_WINDOW and all(_finite([row.get(key) for key in keys]) == [row[key] for key in keys] for row in window) else []


def preference_stuck(rows: Sequence[Row]) -> Anomaly | None:
    window = _preference_rows(rows)
    if not window or any(abs(row["dpo_loss"] - math.log(2)) > STUCK_TOLERANCE for row in window):
        return None
    last = window[-1]
    margin = statistics.mean(abs(row["margin"]) for row in window)
    return Anomaly("preference_stuck", last["step"],
                   f"The DPO loss has stayed at ln 2 = 0.693 for {PREFERENCE_WINDOW} logged steps (mean |margin| {margin:.2g}): "
                   "the model still computes what the reference computes.",
                   f"The loss leaves ln 2 only once beta x (the chosen reply's log-ratio - the rejected one's) grows towards 1; "
                   f"at learning rate {last.get('lr', math.nan):g} and beta {last.get('dpo_beta', math.nan):g} it barely moves. Raise "
                   "--learning-rate (DPO on a small model moves at 1e-5 to 1e-3; check the warmup is over) or --dpo-beta, and check "
                   "that the chosen and rejected replies of the data differ.")


def chosen_falling(rows: Sequence[Row]) -> Anomaly | None:
    window = _preference_rows(rows)
    if not window:
        return None
    third = PREFERENCE_WINDOW // 3
    chosen = [statistics.mean(row["logps_chosen"] for row in part) for part in (window[:third], window[-third:])]
    rejected = [statistics.mean(row["logps_rejected"] for row in part) for part in (window[:third], window[-third:])]
    if chosen[0] - chosen[1] < CHOSEN_DROP or rejected[1] >= rejected[0]:
        return None
    return Anomaly("chosen_falling", window[-1]["step"],
                   f"The chosen replies' log-probability fell from {chosen[0]:.1f} to {chosen[1]:.1f} while the rejected ones' fell "
                   f"from {rejected[0]:.1f} to {rejected[1]:.1f}: the margin grows because both become unlikely.",
                   "The known failure of DPO: the model pushes both replies down and its own answers degrade. Add the chosen reply's "
                   "likelihood to the loss (--rpo-alpha 1), lower the learning rate, or keep the best evaluation (val_accuracy).")


def margin_exploding(rows: Sequence[Row]) -> Anomaly | None:
    window = _preference_rows(rows)
    if not window or window[-1]["margin"] < EXPLODING_MARGIN:
        return None
    last = window[-1]
    return Anomaly("margin_exploding", last["step"],
                   f"The reward margin is {last['margin']:.1f} (above {EXPLODING_MARGIN:g}): the DPO loss is near 0 and the model only "
                   "moves further from its reference.",
                   f"Over-optimisation: lower the learning rate (now {last.get('lr', math.nan):g}), raise --dpo-beta (now "
                   f"{last.get('dpo_beta', math.nan):g}) to hold the model nearer the reference, add --rpo-alpha, or stop at the best "
                   "validation preference accuracy (--early-stopping-patience).")


# Findings about one process's own machine or GPU. Under torchrun every process checks its own
# rows: their losses, gradient norms and validation metrics are all-reduced (the same everywhere,
# so rank 0 reports those once), but memory and GPU use are each process's own.
PER_PROCESS_KINDS = frozenset({"memory_pressure", "low_accelerator_utilisation"})

RULES: list[Callable[[Sequence[Row]], Anomaly | None]] = [
    non_finite_loss, loss_spike, loss_plateau, gradient_norm, overfitting, throughput_drop, memory_pressure,
    low_accelerator_utilisation, preference_stuck, chosen_falling, margin_exploding,
]


def diagnose(rows: Sequence[Row]) -> list[Anomaly]:
    """Every rule's finding about the latest state of the run."""
    return [anomaly for rule in RULES if (anomaly := rule(rows)) is not None]
