"""What the notebook's live plot costs a training run: the same short run with and without it.

    python benchmarks/live_plot_overhead.py [--preset tiny] [--steps 300] [--rounds 3] [--log-steps 5]

The "with" run draws through the live plot's real figure path, as in Jupyter: every redraw builds
the figure, renders it to PNG on matplotlib's non-interactive Agg canvas, shows it once through
IPython's display and then replaces it in place through the display handle. Outside Jupyter there
is no kernel to send the image to, so an in-process IPython shell publishes it and the images are
captured in memory (a kernel would also base64-encode the PNG and send it over a socket, a
fraction of a millisecond for a figure of this size). The script checks that it was one image
updated in place.

The runs alternate, without / with, for --rounds rounds after an untimed warm-up (which also
trains the tokenizer, reused by every run), and the figures are the medians: the time of
`Trainer.train()` for each variant, their ratio, and the live plot's own account of its drawing
time and redraws. A tiny model's steps take milliseconds while a redraw takes tens of
milliseconds, so the throttle (at most one redraw every --min-interval seconds, and drawing kept
under --max-overhead of the time) is what keeps the cost small: the script also says what
drawing at every logged row would have cost.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402
from IPython.utils.capture import capture_output  # noqa: E402
from traitlets.config import Config  # noqa: E402

from minigpt.config import RunConfig, apply_overrides, preset_config  # noqa: E402
from minigpt.notebook import LivePlotCallback  # noqa: E402
from minigpt.run import prepare_run  # noqa: E402
from minigpt.trainer import Callback  # noqa: E402


def run_config(arguments: argparse.Namespace, output_dir: str, name: str, steps: int) -> RunConfig:
    return apply_overrides(preset_config(arguments.preset), {
        "train.max_steps": steps, "train.log_steps": arguments.log_steps, "train.eval_steps": steps, "train.eval_batches": 2,
        "train.save_steps": steps, "train.sample_tokens": 0, "train.dtype": "float32", "train.num_threads": arguments.num_threads,
        "train.output_dir": output_dir, "train.run_name": name,
    })


def timed_run(config: RunConfig, callbacks: list[Callback]) -> float:
    """Seconds of `Trainer.train()` (the set-up, reading data and building the model, is left out)."""
    trainer = prepare_run(config, show_progress=False, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def run_with_live_plot(config: RunConfig, arguments: argparse.Namespace) -> tuple[float, LivePlotCallback]:
    live = LivePlotCallback(min_interval=arguments.min_interval, max_overhead=arguments.max_overhead, figures=True)
    with capture_output() as captured:
        seconds = timed_run(config, [live])
    images = [output for output in captured.outputs if "image/png" in output.data]
    display_ids = {output.transient.get("display_id") for output in images}
    if len(images) != live.redraws or len(display_ids) != 1 or images[0].update or not all(image.update for image in images[1:]):
        raise SystemExit(f"expected one figure shown and then updated in place, got {len(images)} images "
                         f"with {len(display_ids)} display id(s) for {live.redraws} redraws")
    return seconds, live


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="without/with pairs, after one untimed warm-up pair")
    parser.add_argument("--log-steps", type=int, default=5, help="a train row (and a chance to redraw) every this many steps")
    parser.add_argument("--min-interval", type=float, default=LivePlotCallback().min_interval, help="the throttle: seconds between redraws at least")
    parser.add_argument("--max-overhead", type=float, default=LivePlotCallback().max_overhead,
                        help="the throttle: the share of the time drawing may take at most")
    parser.add_argument("--num-threads", type=int, default=0, help="0: the available cores")
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()
    if arguments.steps < 1 or arguments.rounds < 1 or arguments.log_steps < 1:
        parser.error("--steps, --rounds and --log-steps must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the runs' INFO lines would only add noise
    # IPython's display publishes through this shell, as it does through a kernel (no history file: nothing to keep)
    InteractiveShell.instance(config=Config({"HistoryManager": {"enabled": False}}))

    output_dir = tempfile.mkdtemp(prefix="live_plot_overhead_")
    without, with_plot, lives = [], [], []
    for round_number in range(arguments.rounds + 1):  # round 0: the warm-up
        seconds_without = timed_run(run_config(arguments, output_dir, f"without-{round_number}", arguments.steps), [])
        seconds_with, live = run_with_live_plot(run_config(arguments, output_dir, f"with-{round_number}", arguments.steps), arguments)
        if round_number == 0:
            continue
        without.append(seconds_without)
        with_plot.append(seconds_with)
        lives.append(live)
        print(f"round {round_number}: without {seconds_without:.2f} s | with {seconds_with:.2f} s "
              f"({live.redraws} redraws, {live.drawing_seconds:.2f} s drawing)", flush=True)

    median_without, median_with = statistics.median(without), statistics.median(with_plot)
    drawing = statistics.median(live.drawing_seconds for live in lives)
    redraws = statistics.median(live.redraws for live in lives)
    per_redraw = statistics.median(live.drawing_seconds / live.redraws for live in lives)
    logged_rows = arguments.steps // arguments.log_steps
    print(f"\n{arguments.preset} preset, {arguments.steps} steps, a train row every {arguments.log_steps} steps; "
          f"throttle: at most one redraw every {arguments.min_interval:g} s, drawing under {arguments.max_overhead:.0%} of the time")
    print(f"median without the live plot: {median_without:.2f} s | with it: {median_with:.2f} s | "
          f"ratio {median_with / median_without:.3f} ({100 * (median_with / median_without - 1):+.1f}%)")
    print(f"the live plot's own account: {drawing:.2f} s drawing in {redraws:g} redraws ({1000 * per_redraw:.0f} ms each), "
          f"{100 * drawing / median_with:.1f}% of the run")
    print(f"unthrottled, a redraw at each of the {logged_rows} train rows would take about {logged_rows * per_redraw:.1f} s, "
          f"{100 * logged_rows * per_redraw / median_without:.0f}% of the run without the plot")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({
            "preset": arguments.preset, "steps": arguments.steps, "log_steps": arguments.log_steps,
            "min_interval": arguments.min_interval, "max_overhead": arguments.max_overhead,
            "seconds_without": without, "seconds_with": with_plot, "ratio": median_with / median_without,
            "drawing_seconds": [live.drawing_seconds for live in lives], "redraws": [live.redraws for live in lives],
        }, indent=2))


if __name__ == "__main__":
    main()
