"""Loss-curve PNGs: valid images, robust to NaN and short runs, written atomically, fast on long runs;
and, through the figure objects before saving, that the curves and statistics drawn are the data's."""

import math
import time

import matplotlib.image
import numpy as np
import pytest

from minigpt.plots import (
    CURVE_PANELS, MAX_DRAWN_POINTS, _decimate, _rolling_mean, confusion_matrix_figure, loss_curve_figure, save_confusion_matrix,
    save_loss_curve, training_curves_figure,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def curve(count: int) -> list[tuple[int, float]]:
    return [(step, 5.0 * math.exp(-step / 300) + 1.5 + 0.1 * math.sin(step)) for step in range(1, count + 1)]


def assert_png(path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, channels = matplotlib.image.imread(path).shape  # matplotlib reads PNG itself, no Pillow
    assert (width, height, channels) == (1200, 500, 4)


@pytest.mark.parametrize("train, validation", [
    (curve(1), []),
    (curve(50), []),
    (curve(2500), [(step, 2.0 + 1000 / step) for step in range(250, 2501, 250)]),
    (curve(20) + [(21, math.nan), (22, math.inf), (23, -math.inf), (24, 1.4)], [(10, math.nan), (20, 3.0)]),
    (curve(30), [(10, math.nan), (20, math.inf)]),  # no finite validation loss at all
], ids=["one point", "train only", "with validation", "nan and inf", "all validation nan"])
def test_valid_png_for_every_shape_of_run(tmp_path, train, validation):
    path = save_loss_curve(tmp_path / "plots" / "loss.png", train, validation, title="run")  # parent is created
    assert path == tmp_path / "plots" / "loss.png"
    assert_png(path)
    assert [entry.name for entry in path.parent.iterdir()] == ["loss.png"]  # no temporary files left


def lines_labelled(axes, label: str) -> list:
    return [line for line in axes.get_lines() if line.get_label() == label]


def test_the_loss_figure_draws_both_curves_and_the_statistics_of_the_data():
    train = curve(50) + [(51, math.nan)]
    validation = [(10, 4.0), (20, 3.25), (30, math.inf), (40, 3.5)]
    figure = loss_curve_figure(train, validation, title="my run", recent_steps=25)
    whole, recent = figure.axes
    finite_train = train[:50]
    (raw,) = lines_labelled(whole, "train")
    np.testing.assert_array_equal(raw.get_xdata(), [step for step, _ in finite_train])
    np.testing.assert_array_equal(raw.get_ydata(), [loss for _, loss in finite_train])
    (drawn_validation,) = lines_labelled(whole, "validation")
    np.testing.assert_array_equal(drawn_validation.get_xdata(), [10, 20, 40])  # the Inf is left out
    np.testing.assert_array_equal(drawn_validation.get_ydata(), [4.0, 3.25, 3.5])
    assert lines_labelled(whole, "train (centred rolling mean)")  # 50 points: enough to smooth
    (recent_validation,) = lines_labelled(recent, "validation")
    np.testing.assert_array_equal(recent_validation.get_xdata(), [40])  # the window holds steps 26 to 50
    assert recent.get_title() == "last 25 steps" and figure.texts[0].get_text() == "my run"
    statistics = figure.texts[1].get_text()
    losses = [loss for _, loss in finite_train]
    assert "steps      1 to 50 (50 train points)" in statistics
    assert f"last {losses[-1]:.4f}  min {min(losses):.4f}  max {max(losses):.4f}  mean {np.mean(losses):.4f}" in statistics
    assert "validation last 3.5000  best 3.2500 at step 20" in statistics
    assert "left out   1 train and 1 validation NaN/Inf losses" in statistics


def test_a_loss_figure_without_finite_validation_draws_no_validation_curve():
    figure = loss_curve_figure(curve(5), [(2, math.nan)])
    statistics = figure.texts[1].get_text()
    assert not lines_labelled(figure.axes[0], "validation") and "validation last" not in statistics
    assert "0 train and 1 validation NaN/Inf losses" in statistics
    (raw,) = lines_labelled(figure.axes[0], "train")
    assert raw.get_marker() == "None" and not lines_labelled(figure.axes[0], "train (centred rolling mean)")  # too few to smooth


def test_a_run_with_epochs_gets_an_epoch_axis_over_each_panel():
    figure = loss_curve_figure(curve(40), epoch_steps=10)
    figure.canvas.draw()  # a secondary axis takes its limits from its panel when drawn
    for panel in figure.axes[:2]:
        (epochs,) = panel.child_axes
        assert epochs.get_xlabel() == "epoch"
        assert epochs.get_xlim() == pytest.approx([limit / 10 for limit in panel.get_xlim()])
    assert not any(panel.child_axes for panel in loss_curve_figure(curve(40)).axes)


def test_the_training_curves_figure_draws_every_metric_of_every_run():
    def rows(scale: float) -> list[dict]:
        train = [{"type": "train", "step": step, "loss": scale * 5 / step, "lr": 1e-3 * step, "grad_norm": scale / step,
                  "tokens_per_second": 1000.0 * scale} for step in range(1, 11)]
        return train + [{"type": "eval", "step": 5, "val_loss": scale * 1.5}, {"type": "eval", "step": 10, "val_loss": scale}]

    figure = training_curves_figure({"first": rows(1.0), "second": rows(2.0)})
    panels = figure.axes
    assert [axes.get_title() for axes in panels] == [title for _, title, _ in CURVE_PANELS]
    for axes, (metric, _, _) in zip(panels, CURVE_PANELS):
        for name, scale in (("first", 1.0), ("second", 2.0)):
            (line,) = lines_labelled(axes, name)
            np.testing.assert_array_equal(line.get_xdata(), range(1, 11))
            np.testing.assert_allclose(line.get_ydata(), [row[metric] for row in rows(scale)[:10]])
    validation = [line for line in panels[0].get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in validation] == [[1.5, 1.0], [3.0, 2.0]]
    assert [list(line.get_xdata()) for line in validation] == [[5, 10], [5, 10]]
    assert panels[2].get_yscale() == "log" and panels[1].get_yscale() == "linear"  # gradient norms span decades
    with pytest.raises(ValueError, match="no training metrics"):
        training_curves_figure({"empty": [{"type": "eval", "step": 1, "val_loss": 2.0}]})


def test_redrawing_replaces_the_file(tmp_path):
    path = tmp_path / "loss.png"
    save_loss_curve(path, curve(10))
    save_loss_curve(str(path), curve(500), [(250, 2.0)], recent_steps=100)
    assert_png(path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["loss.png"]


@pytest.mark.parametrize("train", [[], [(1, math.nan), (2, math.inf)]])
def test_nothing_to_plot_is_an_error(tmp_path, train):
    with pytest.raises(ValueError):
        save_loss_curve(tmp_path / "loss.png", train)
    assert list(tmp_path.iterdir()) == []


def test_pyplot_state_is_untouched(tmp_path):
    import matplotlib.pyplot as pyplot

    save_loss_curve(tmp_path / "loss.png", curve(10))
    assert pyplot.get_fignums() == []


def test_decimation_keeps_spikes_and_ends():
    steps = np.arange(100_000, dtype=float)
    losses = np.full(100_000, 2.0)
    losses[12_345], losses[54_321] = 9.0, 0.5  # one-step spikes that every-k-th-point thinning would drop
    drawn_steps, drawn_losses = _decimate(steps, losses)
    assert len(drawn_losses) <= MAX_DRAWN_POINTS + 2
    assert {12_345, 54_321, 0, 99_999} <= set(drawn_steps.astype(int))
    assert np.all(np.diff(drawn_steps) > 0)  # still in step order


def test_rolling_mean_is_centred():
    ramp = np.arange(100, dtype=float)
    np.testing.assert_allclose(_rolling_mean(ramp, 11), ramp)  # no lag: a straight line stays put
    noisy = np.array([1.0, 3.0] * 50)
    smoothed = _rolling_mean(noisy, 11)
    assert smoothed[0] == 1.0 and smoothed[-1] == 3.0  # the window shrinks to the raw value at the ends
    np.testing.assert_allclose(smoothed[5:-5], 2.0, atol=0.1)


def test_a_long_run_plots_quickly(tmp_path):
    rng = np.random.default_rng(0)
    losses = 2.0 + 3.0 * np.exp(-np.arange(100_000) / 10_000) + rng.normal(0, 0.1, 100_000)
    train = list(enumerate(losses.tolist(), start=1))
    started = time.perf_counter()
    assert_png(save_loss_curve(tmp_path / "loss.png", train, train[::5000]))
    assert time.perf_counter() - started < 2.0  # about 0.15-0.3 s on 2 CPU cores


def test_the_confusion_matrix_figure_shows_counts_shaded_by_row_and_saves_as_a_png(tmp_path):
    counts = [[8, 2, 0], [1, 1, 0], [0, 0, 5]]
    figure = confusion_matrix_figure(counts, ["cat", "dog", "fish"], "pets")
    axes = figure.axes[0]
    assert sorted(text.get_text() for text in axes.texts) == sorted(str(value) for row in counts for value in row)
    shares = axes.images[0].get_array()
    assert shares[0].tolist() == [0.8, 0.2, 0.0] and shares[1].tolist() == [0.5, 0.5, 0.0]  # each row's share, not raw counts
    assert [label.get_text() for label in axes.get_yticklabels()] == ["cat", "dog", "fish"] and axes.get_title() == "pets"
    path = save_confusion_matrix(tmp_path / "confusion.png", counts, ["cat", "dog", "fish"])
    assert path.read_bytes()[:8] == PNG_SIGNATURE and [entry.name for entry in tmp_path.iterdir()] == ["confusion.png"]
