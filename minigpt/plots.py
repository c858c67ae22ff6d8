"""Loss-curve figures, and a preference run's curves.

Drawn with matplotlib's object API on the Agg (PNG) canvas: no window, no display, and no
pyplot global state, so plotting from inside a training run is safe on a headless server.
A figure made this way is not registered anywhere, so it is freed like any other Python object
once the function returns (pyplot figures, by contrast, live until `plt.close`).
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from minigpt.files import atomic_write_bytes

MAX_DRAWN_POINTS = 4000  # a 1200-pixel-wide figure cannot show more; drawing them only costs time
MIN_POINTS_TO_SMOOTH = 20  # below this a smoothed line says nothing the raw points do not
TRAIN_COLOR, VALIDATION_COLOR = "tab:blue", "tab:orange"


def _finite_points(points: Sequence[tuple[int, float | None]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Split (step, value) pairs into steps and values, leaving out NaN/Inf/None; also count those left out."""
    pairs = np.asarray(points, dtype=float).reshape(-1, 2)  # None becomes NaN
    finite = np.isfinite(pairs[:, 1])
    return pairs[finite, 0], pairs[finite, 1], int((~finite).sum())


def _decimate(steps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most about MAX_DRAWN_POINTS points to draw, without losing spikes.

    Taking every k-th point would silently drop the one-step loss spikes we most want to see, so
    from each bucket of k points we keep the lowest and the highest one instead.
    """
    count = len(values)
    if count <= MAX_DRAWN_POINTS:
        return steps, values
    bucket = math.ceil(2 * count / MAX_DRAWN_POINTS)
    buckets = math.ceil(count / bucket)
    # Repeat the last value to fill the last bucket. argmin/argmax return the first of equal
    # values, so they pick the real last point, never one of its repeats.
    grid = np.pad(values, (0, buckets * bucket - count), mode="edge").reshape(buckets, bucket)
    starts = np.arange(buckets) * bucket
    keep = np.concatenate([starts + grid.argmin(axis=1), starts + grid.argmax(axis=1), [0, count - 1]])
    keep = np.unique(keep)  # sorted, so the line still runs left to right
    return steps[keep], values[keep]


def _rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of each value with the `window // 2` values on either side of it.

    Centred, because a trailing mean (or TensorBoard's moving average) lags the raw curve by half
    a window and so floats above a steeply falling loss. Near the ends the window shrinks
    equally on both sides, so the line starts and ends on the raw values instead of being
    pulled toward the middle. A running sum gives every mean at once.
    """
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    reach = np.minimum(window // 2, np.minimum(index, len(values) - 1 - index))
    return (sums[index + reach + 1] - sums[index - reach]) / (2 * reach + 1)


def _smoothed(losses: np.ndarray, shown: np.ndarray) -> np.ndarray | None:
    """The rolling mean of all losses, cut to the `shown` ones; its window is 1/30 of the shown
    points, so both panels are equally smooth for their width. Computed over the whole run
    so that a zoomed panel's line goes on smoothly past its left edge."""
    count = int(shown.sum())
    if count < MIN_POINTS_TO_SMOOTH:
        return None
    return _rolling_mean(losses, max(5, count // 30))[shown]


def _draw_panel(
    axes: Axes,
    train: tuple[np.ndarray, np.ndarray],
    smoothed: np.ndarray | None,
    validation: tuple[np.ndarray, np.ndarray],
    title: str,
    epoch_steps: int = 0,
) -> None:
    steps, losses = train
    # Raw losses are faint when a smoothed line carries the trend, solid when they are all there is.
    # A line through a single point draws nothing, so a run's first point gets a marker.
    faint = smoothed is not None
    axes.plot(*_decimate(steps, losses), color=TRAIN_COLOR, alpha=0.35 if faint else 1.0,
              linewidth=0.8 if faint else 1.4, marker="o" if len(losses) == 1 else None, label="train")
    if smoothed is not None:
        axes.plot(*_decimate(steps, smoothed), color=TRAIN_COLOR, linewidth=1.8, label="train (centred rolling mean)")
    if len(validation[1]):
        axes.plot(*validation, color=VALIDATION_COLOR, marker="o", markersize=4, linewidth=1.2, label="validation")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.xaxis.set_major_locator(MaxNLocator("auto", steps=[1, 2, 2.5, 5, 10], integer=True))  # no "step 2.5"
    axes.grid(alpha=0.3)
    if epoch_steps:  # a second scale along the top: the same steps counted in passes over the data
        epochs = axes.secondary_xaxis("top", functions=(lambda step: step / epoch_steps, lambda epoch: epoch * epoch_steps))
        epochs.set_xlabel("epoch", fontsize=9)


def _statistics_text(
    train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray], left_out: tuple[int, int]
) -> str:
    """The numbers a reader wants without squinting at the axes; taken over every point, not the drawn ones."""
    steps, losses = train
    lines = [
        f"{'steps':<11}{steps[0]:.0f} to {steps[-1]:.0f} ({len(losses)} train points)",
        f"{'train':<11}last {losses[-1]:.4f}  min {losses.min():.4f}  max {losses.max():.4f}  mean {losses.mean():.4f}",
    ]
    val_steps, val_losses = validation
    if len(val_losses):
        best = int(val_losses.argmin())
        lines.append(f"{'validation':<11}last {val_losses[-1]:.4f}  "
                     f"best {val_losses[best]:.4f} at step {val_steps[best]:.0f}")
    if sum(left_out):
        lines.append(f"{'left out':<11}{left_out[0]} train and {left_out[1]} validation NaN/Inf losses")
    return "\n".join(lines)


def save_png(figure: Figure, path: str | Path) -> Path:
    """Render `figure` to PNG in memory, then write it atomically (temporary file beside the target,
    then rename), so a monitor or notebook reading the file never sees half an image."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def save_loss_curve(
    path: str | Path,
    train: Sequence[tuple[int, float]],
    validation: Sequence[tuple[int, float]] = (),
    title: str = "",
    recent_steps: int = 1000,
    epoch_steps: int = 0,
) -> Path:
    """Save a PNG of (step, loss) pairs (see `loss_curve_figure`), replaced atomically.

    Raises ValueError when there is no finite training loss yet.
    """
    return save_png(loss_curve_figure(train, validation, title, recent_steps, epoch_steps), path)


def loss_curve_figure(
    train: Sequence[tuple[int, float]],
    validation: Sequence[tuple[int, float]] = (),
    title: str = "",
    recent_steps: int = 1000,
    epoch_steps: int = 0,
) -> Figure:
    """The figure of (step, loss) pairs: the whole run beside its last `recent_steps` steps, with
    the loss statistics written above. NaN/Inf losses are left out (and counted). With
    `epoch_steps` (optimizer steps in one pass over the data), each panel has an epoch axis on top."""
    if recent_steps < 1:
        raise ValueError(f"recent_steps must be at least 1, not {recent_steps}.")
    steps, losses, train_left_out = _finite_points(train)
    if not len(losses):
        raise ValueError("There is no finite training loss to plot yet.")
    val_steps, val_losses, val_left_out = _finite_points(validation)

    figure = Figure(figsize=(12, 5), dpi=100)
    FigureCanvasAgg(figure)  # attaches itself to the figure: savefig then renders PNG, no pyplot involved
    whole_axes, recent_axes = figure.subplots(1, 2)
    # Fixed margins (not tight_layout): the top band holds title, legend and statistics, and
    # the panels never move between redraws, which makes a refreshing monitor view calmer.
    # An epoch axis along the panels' top takes some of that band.
    figure.subplots_adjust(left=0.055, right=0.985, bottom=0.1, top=0.68 if epoch_steps else 0.76, wspace=0.16)

    everything = np.ones(len(losses), dtype=bool)
    _draw_panel(whole_axes, (steps, losses), _smoothed(losses, everything), (val_steps, val_losses), "whole run", epoch_steps)

    window_start = steps[-1] - recent_steps  # the window holds steps after this one
    recent, recent_val = steps > window_start, val_steps > window_start
    recent_title = f"last {recent_steps} steps" + (" (the whole run)" if steps[0] > window_start else "")
    _draw_panel(recent_axes, (steps[recent], losses[recent]), _smoothed(losses, recent),
                (val_steps[recent_val], val_losses[recent_val]), recent_title, epoch_steps)

    figure.suptitle(title or "training loss", x=0.01, y=0.97, ha="left", va="top", fontsize=12)
    # One legend for both panels, in the top band, so it never hides a curve; the whole-run
    # panel has every kind of line the recent one has.
    figure.legend(*whole_axes.get_legend_handles_labels(), loc="upper left", bbox_to_anchor=(0.005, 0.9),
                  ncol=3, frameon=False, fontsize=9)
    statistics = _statistics_text((steps, losses), (val_steps, val_losses), (train_left_out, val_left_out))
    figure.text(0.985, 0.97, statistics, ha="right", va="top", multialignment="left", fontsize=8.5, family="monospace",
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7"})
    return figure


CURVE_PANELS = [  # (metric, title, logarithmic y axis)
    ("loss", "loss (validation: markers)", False),
    ("lr", "learning rate", False),
    ("grad_norm", "gradient norm", True),
    ("tokens_per_second", "tokens per second", False),
]


def save_training_curves(path: str | Path, runs: dict[str, Sequence[dict]]) -> Path:
    """One PNG of a run's (or several runs') metrics.jsonl rows (see `training_curves_figure`)."""
    return save_png(training_curves_figure(runs), path)


def training_curves_figure(runs: dict[str, Sequence[dict]]) -> Figure:
    """Loss, learning rate, gradient norm and throughput against the step, each run in its own
    colour, its validation losses as markers on the loss panel. Raises ValueError with nothing to draw."""
    figure = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 2).flatten()
    drawn = 0
    for color_index, (name, rows) in enumerate(runs.items()):
        color = f"C{color_index % 10}"
        train = [row for row in rows if row.get("type") == "train"]
        for axes, (metric, _, _) in zip(panels, CURVE_PANELS):
            steps, values, _ = _finite_points([(row["step"], row.get(metric)) for row in train])
            if len(values):
                axes.plot(*_decimate(steps, values), color=color, linewidth=1.2, label=name)
                drawn += 1
        val_steps, val_losses, _ = _finite_points([(row["step"], row.get("val_loss")) for row in rows if row.get("type") == "eval"])
        if len(val_losses):
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
    return figure


# A preference run's panels: (title, [(metric, label)], a dotted level line or None).
PREFERENCE_PANELS = (
    ("DPO loss (ln 2 at the start)", [("dpo_loss", "dpo_loss")], math.log(2)),
    ("rewards (beta x log-ratio to the reference)", [("rewards_chosen", "chosen"), ("rewards_rejected", "rejected"), ("margin", "margin")], 0.0),
    ("preference accuracy (0.5: no preference)", [("accuracy", "accuracy")], 0.5),
    ("log-probability of the replies", [("logps_chosen", "chosen"), ("logps_rejected", "rejected")], None),
)


def preference_curves_figure(rows: Sequence[dict], title: str = "") -> Figure:
    """The metrics of a preference run (`minigpt.objective.Preference`) against the step: the DPO
    loss, the rewards and their margin, the preference accuracy and the replies' log-probabilities,
    training rows as lines and evaluations (their val_ metrics) as markers. Raises ValueError with
    nothing to draw."""
    figure = Figure(figsize=(12, 8), dpi=100)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2, 2).flatten()
    train = [row for row in rows if row.get("type") == "train"]
    evaluations = [row for row in rows if row.get("type") == "eval"]
    if not any("dpo_loss" in row for row in train):
        raise ValueError("The run has no preference metrics to draw yet.")
    for axes, (panel_title, metrics, level) in zip(panels, PREFERENCE_PANELS):
        for index, (metric, label) in enumerate(metrics):
            color = f"C{index}"
            steps, values, _ = _finite_points([(row["step"], row.get(metric)) for row in train])
            if len(values):
                axes.plot(*_decimate(steps, values), color=color, linewidth=1.0, alpha=0.8, label=label)
            steps, values, _ = _finite_points([(row["step"], row.get(f"val_{metric}")) for row in evaluations])
            if len(values):
                axes.plot(steps, values, color=color, marker="o", markersize=4, linestyle="--", linewidth=1, label=f"val {label}")
        if level is not None:
            axes.axhline(level, color="grey", linestyle=":", linewidth=1)
        axes.set_title(panel_title)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return figure


def draw_confusion_matrix(axes, matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = ""):
    """Draw a confusion matrix on `axes`: row = the true class, column = the predicted one, each cell
    its count, shaded by the share of its row (so a rare class's mistakes show as clearly as a common
    one's). Returns the image, for a colour bar."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(len(labels)), [str(label) for label in labels], rotation=45, ha="right")
    axes.set_yticks(range(len(labels)), [str(label) for label in labels])
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for row in range(len(labels)):
        for column in range(len(labels)):
            axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                      color="white" if shares[row, column] > 0.5 else "black", fontsize=9)
    axes.set_title(title or "confusion matrix")
    return image


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> Figure:
    """`draw_confusion_matrix` as a figure of its own, with a colour bar."""
    size = 2.5 + 0.6 * len(labels)
    figure = Figure(figsize=(size + 1, size), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    figure.colorbar(draw_confusion_matrix(axes, matrix, labels, title), ax=axes, label="share of the true class")
    with warnings.catch_warnings():  # a label in a script the font lacks (Chinese, say) is drawn as boxes: fine for a plot
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        figure.tight_layout()
    return figure


def save_confusion_matrix(path: str | Path, matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str = "") -> Path:
    """A PNG of `confusion_matrix_figure`, written atomically like the loss curves."""
    with warnings.catch_warnings():  # drawing happens in savefig: the missing glyphs are met again there
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return save_png(confusion_matrix_figure(matrix, labels, title), path)
