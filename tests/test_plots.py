"""Loss-curve PNGs: valid images, robust to NaN and short runs, written atomically."""

import math

import matplotlib.image
import pytest

from minigpt.plots import save_loss_curve

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def curve(count: int) -> list[tuple[int, float]]:
    return [(step, 5.0 * math.exp(-step / 300) + 1.5 + 0.1 * math.sin(step)) for step in range(1, count + 1)]


@pytest.mark.parametrize("train, validation", [
    (curve(1), []),
    (curve(50), []),
    (curve(2500), [(step, 2.0 + 1000 / step) for step in range(250, 2501, 250)]),
    (curve(20) + [(21, math.nan), (22, math.inf)], [(10, math.nan), (20, 3.0)]),
])
def test_valid_png_for_every_shape_of_run(tmp_path, train, validation):
    path = save_loss_curve(tmp_path / "plots" / "loss.png", train, validation, title="run")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 800 and height > 300
    assert [entry.name for entry in path.parent.iterdir()] == ["loss.png"]  # no temporary files left


def test_nothing_to_plot_is_an_error(tmp_path):
    with pytest.raises(ValueError):
        save_loss_curve(tmp_path / "loss.png", [(1, math.nan)])
    assert not (tmp_path / "loss.png").exists()


def test_pyplot_state_is_untouched(tmp_path):
    import matplotlib.pyplot as pyplot

    save_loss_curve(tmp_path / "loss.png", curve(10))
    assert pyplot.get_fignums() == []
