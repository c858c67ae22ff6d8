"""Loss-curve PNGs: valid images, robust to NaN and short runs, written atomically, fast on long runs."""

import math
import time

import matplotlib.image
import numpy as np
import pytest

from minigpt.plots import MAX_DRAWN_POINTS, _decimate, _rolling_mean, confusion_matrix_figure, save_confusion_matrix, save_loss_curve

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
