"""Loss-curve figures.

Drawn with matplotlib's object API on the Agg (PNG) canvas: no window, no display, and no
pyplot global state, so plotting from inside a training run is safe on a headless server.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minigpt.checkpoint import atomic_write_bytes

MAX_DRAWN_POINTS = 4000  # more points than pixels only slows drawing down


def _finite_points(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float], int]:
    """Split (step, loss) pairs into steps and losses, leaving out NaN/Inf; also count those left out."""
    kept = [(step, loss) for step, loss in points if loss is not None and math.isfinite(loss)]
    return [step for step, _ in kept], [loss for _, loss in kept], len(points) - len(kept)


def _thin(steps: list[int], losses: list[float]) -> tuple[list[int], list[float]]:
    stride = max(1, len(steps) // MAX_DRAWN_POINTS)
    return steps[::stride], losses[::stride]


def _smooth(losses: list[float]) -> list[float]:
    """Exponential moving average over about 1/20 of the points, bias-corrected so the first
    points are not pulled toward 0."""
    span = max(2.0, len(losses) / 20)
    weight = 1 - 2 / (span + 1)
    smoothed, average = [], 0.0
    for index, loss in enumerate(losses, start=1):
        average = weight * average + (1 - weight) * loss
        smoothed.append(average / (1 - weight**index))
    return smoothed


def _draw(axes, train: tuple[list[int], list[float]], validation: tuple[list[int], list[float]], title: str) -> None:
    steps, losses = train
    drawn_steps, drawn_losses = _thin(steps, losses)
    axes.plot(drawn_steps, drawn_losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train")
    if len(losses) >= 10:
        axes.plot(drawn_steps, _thin(steps, _smooth(losses))[1], color="tab:blue", linewidth=1.6, label="train (smoothed)")
    if validation[0]:
        axes.plot(*validation, color="tab:orange", marker="o", markersize=3, linewidth=1.2, label="validation")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize=8)


def save_loss_curve(
    path: str | Path,
    train: Sequence[tuple[int, float]],
    validation: Sequence[tuple[int, float]] = (),
    title: str = "",
    recent_steps: int = 1000,
) -> Path:
    """Save a PNG with the whole run and its last `recent_steps` steps, with loss statistics written on it."""
    steps, losses, left_out = _finite_points(train)
    if not losses:
        raise ValueError("There is no finite training loss to plot yet.")
    val_steps, val_losses, _ = _finite_points(validation)

    figure = Figure(figsize=(12, 4.8), dpi=100)
    FigureCanvasAgg(figure)
    whole, recent = figure.subplots(1, 2)
    _draw(whole, (steps, losses), (val_steps, val_losses), "whole run")
    start = steps[-1] - recent_steps
    recent_train = [(s, l) for s, l in zip(steps, losses) if s > start]
    recent_val = [(s, l) for s, l in zip(val_steps, val_losses) if s > start]
    _draw(recent, ([s for s, _ in recent_train], [l for _, l in recent_train]),
          ([s for s, _ in recent_val], [l for _, l in recent_val]), f"last {recent_steps} steps")

    lines = [
        f"steps {steps[0]}-{steps[-1]}",
        f"train loss: current {losses[-1]:.4f}",
        f"min {min(losses):.4f}  max {max(losses):.4f}  mean {sum(losses) / len(losses):.4f}",
    ]
    if val_losses:
        lines.append(f"validation: last {val_losses[-1]:.4f}  best {min(val_losses):.4f}")
    if left_out:
        lines.append(f"{left_out} NaN/Inf point(s) left out")
    figure.text(0.995, 0.995, "\n".join(lines), ha="right", va="top", fontsize=8, family="monospace",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    figure.suptitle(title or "loss", x=0.01, ha="left", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 0.88))

    # Render in memory, then write atomically: a reader (the monitor) never sees half a PNG.
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


CURVE_PANELS = [  # (metric, title, logarithmic y axis)
    ("loss", "loss (validation: markers)", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm", True),
    ("tokens_per_second", "tokens per second", False),
]


def save_training_curves(path: str | Path, runs: dict[str, Sequence[dict]]) -> Path:
    """One PNG of a run's (or several runs') metrics.jsonl rows: loss, learning rate, gradient
    norm and throughput against the step, each run in its own colour."""
    figure = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 2).flatten()
    drawn = 0
    for color_index, (name, rows) in enumerate(runs.items()):
        color = f"C{color_index % 10}"
        train = [row for row in rows if row.get("type") == "train"]
        for axes, (metric, _, _) in zip(panels, CURVE_PANELS):
            steps, values, _ = _finite_points([(row["step"], row.get(metric)) for row in train])
            if values:
                axes.plot(*_thin(steps, values), color=color, linewidth=1.2, label=name)
                drawn += 1
        val_steps, val_losses, _ = _finite_points([(row["step"], row.get("val_loss")) for row in rows if row.get("type") == "eval"])
        if val_losses:
            panels[0].plot(val_steps, val_losses, color=color, marker="o", markersize=4, linestyle="--", linewidth=1)
    if not drawn:
        raise ValueError("The runs have no training metrics to draw yet.")
    for axes, (_, title, logarithmic) in zip(panels, CURVE_PANELS):
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if logarithmic and axes.lines:
            axes.set_yscale("log")
        if axes.lines:
            axes.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
