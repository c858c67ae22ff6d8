"""Reading a run directory: is the run healthy, how far along is it, which run is best?

Everything here reads only the files a run writes (status.json, config.json, metrics.jsonl), so
it works on a live run (a torn last line is skipped), a finished one, and one whose process died
without saying so (status "running", but its process is gone).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from minigpt.anomalies import Anomaly, diagnose
from minigpt.errors import UserInputError
from minigpt.metrics import evaluation_scalars, read_metrics

LOSS_WINDOW = 20  # logged rows in the "recent mean" of the loss
CHART_LEVELS = "▁▂▃▄▅▆▇█"
STALE_SECONDS = 600  # a live process that has not updated its status for this long looks stuck


@dataclass
class RunReport:
    run_dir: Path
    state: str  # running / finished / stopped / failed / crashed / stalled / starting / unknown (status.json damaged)
    step: int = 0
    max_steps: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    train: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    message: str = ""
    monitor_metric: str = "val_loss"  # the metric the run's objective calls better (status.json says which)
    monitor_mode: str = "min"

    @property
    def best(self) -> float | None:
        """The best value of the monitored metric over the run's evaluations."""
        values = [row[self.monitor_metric] for row in self.evaluations
                  if isinstance(row.get(self.monitor_metric), (int, float)) and math.isfinite(row[self.monitor_metric])]
        if not values:
            return None
        return max(values) if self.monitor_mode == "max" else min(values)


def process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def find_latest_run(root: str | Path = "checkpoints") -> Path:
    """The run under `root` whose metrics or status changed last."""
    root = Path(root)
    runs = [path.parent for path in root.glob("*/config.json")] if root.is_dir() else []
    if not runs:
        raise UserInputError(f"No run found under {root}/; give a run directory, or start one with scripts/train.py.")

    def last_change(run: Path) -> float:
        return max((run / name).stat().st_mtime for name in ("config.json", "status.json", "metrics.jsonl") if (run / name).exists())

    return max(runs, key=last_change)


def read_run(run_dir: str | Path, now: float | None = None) -> RunReport:
    """Everything the monitor shows about one run."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserInputError(f"{run_dir} is not a run directory (it has no config.json).")
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except ValueError:  # not JSON, or not UTF-8
        raise UserInputError(f"{run_dir / 'config.json'} is damaged (not readable JSON); this run cannot be shown.") from None
    try:
        status = json.loads((run_dir / "status.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        status = {"state": "starting"}
    except (OSError, ValueError):  # torn (a copy cut short, a disk error): written atomically, it is never half-written
        status = {"state": "unknown"}
    if not isinstance(status, dict):
        status = {"state": "unknown"}
    rows = read_metrics(run_dir / "metrics.jsonl")
    state = status.get("state", "starting")
    if state == "running":
        if not process_alive(status.get("pid")):
            state = "crashed"
        elif (now or time.time()) - status.get("updated_at", 0) > STALE_SECONDS:
            state = "stalled"
    train = [row for row in rows if row.get("type") == "train"]
    monitor = status.get("monitor", {})
    return RunReport(
        run_dir=run_dir, state=state, step=status.get("step", train[-1]["step"] if train else 0),
        max_steps=config.get("train", {}).get("max_steps", 0), config=config, train=train,
        evaluations=[row for row in rows if row.get("type") == "eval"], anomalies=diagnose(rows),
        message=status.get("message", ""), monitor_metric=monitor.get("metric", "val_loss"), monitor_mode=monitor.get("mode", "min"),
    )


def loss_chart(losses: list[float], width: int = 60) -> str:
    """The loss as one line of block characters, oldest on the left, each column a bucket's mean."""
    values = [loss for loss in losses if math.isfinite(loss)]
    if not values:
        return ""
    columns = min(width, len(values))
    means = [statistics.mean(values[len(values) * column // columns : len(values) * (column + 1) // columns]) for column in range(columns)]
    low, high = min(means), max(means)
    scale = (len(CHART_LEVELS) - 1) / (high - low) if high > low else 0
    return "".join(CHART_LEVELS[round((mean - low) * scale)] for mean in means)


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


STATE_NOTES = {
    "crashed": "its process is gone without a final status; resume it with --resume",
    "stalled": f"no update for over {STALE_SECONDS // 60} minutes; is it stuck or paused?",
    "starting": "no status yet",
    "unknown": "its status.json is damaged (cut short?); what follows comes from metrics.jsonl",
}


def render_report(report: RunReport, width: int = 60) -> str:
    """A screenful about one run."""
    lines = [f"run {report.run_dir}  [{report.state}]"]
    if report.state in STATE_NOTES:
        lines.append(f"  note: {STATE_NOTES[report.state]}")
    if report.message:
        lines.append(f"  {report.message}")
    if not report.train:
        lines.append("  no training steps logged yet")
        return "\n".join(lines)
    last = report.train[-1]
    losses = [row["loss"] for row in report.train]
    finite = [loss for loss in losses if math.isfinite(loss)]
    recent = [loss for loss in losses[-LOSS_WINDOW:] if math.isfinite(loss)]
    timing = f"elapsed {_duration(last.get('elapsed_seconds'))}"
    if report.state in ("running", "stalled"):
        timing += f"  ETA {_duration(last.get('eta_seconds'))}"
    if report.max_steps:
        progress = min(1.0, report.step / report.max_steps)
        filled = int(progress * 30)
        lines.append(f"  step {report.step:,} / {report.max_steps:,}  [{'#' * filled}{'.' * (30 - filled)}] {progress:.0%}  {timing}")
    else:
        lines.append(f"  step {report.step:,}  {timing}")
    if finite:
        lines.append(f"  loss now {last['loss']:.4f} | mean of last {len(recent)} {statistics.mean(recent) if recent else math.nan:.4f} | "
                     f"min {min(finite):.4f} | max {max(finite):.4f}")
        lines.append(f"  {loss_chart(losses, width)}")
    if report.evaluations:
        evaluation = report.evaluations[-1]
        scores = " | ".join(f"{name.removeprefix('val_')} {value:.4f}" for name, value in evaluation_scalars(evaluation).items())
        best = f"{report.best:.4f}" if report.best is not None else "-"
        lines.append(f"  validation at step {evaluation['step']:,}: {scores} | best {report.monitor_metric} {best}")
    figures = [
        ("tokens_per_second", "{:,.0f} tokens/s", 1), ("mfu", "MFU {:.1%}", 1), ("cpu_percent", "CPU {:.0f}%", 1),
        ("rss_bytes", "RSS {:.2f} GB", 1e-9), ("peak_rss_bytes", "peak RSS {:.2f} GB", 1e-9), ("system_memory_percent", "system memory {:.0f}%", 1),
        ("accelerator_memory_bytes", "accelerator memory {:.2f} GB", 1e-9), ("accelerator_utilisation", "GPU busy {:.0f}%", 1),
    ]
    lines.append("  " + " | ".join(text.format(last[name] * scale) for name, text, scale in figures if last.get(name) is not None))
    for anomaly in report.anomalies:
        lines.append(f"  ! {anomaly.message} {anomaly.advice}")
    if not report.anomalies:
        lines.append("  no anomalies")
    return "\n".join(lines)


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items() if isinstance(values, dict) for key, value in values.items()}


IGNORED_IN_COMPARISON = {"train.run_name", "train.resume", "train.output_dir"}


def compare_runs(reports: list[RunReport]) -> str:
    """A table of the runs side by side: the settings that differ, and the best of each run's monitored metric."""
    settings = [_flatten(report.config) for report in reports]
    keys = sorted({key for flat in settings for key in flat} - IGNORED_IN_COMPARISON)
    differing = [key for key in keys if len({json.dumps(flat.get(key), sort_keys=True) for flat in settings}) > 1]
    best = [report.best for report in reports]
    metrics = {(report.monitor_metric, report.monitor_mode) for report in reports}
    metric, mode = metrics.pop() if len(metrics) == 1 else ("", "min")  # runs judged by different metrics are not ranked
    sign = -1 if mode == "max" else 1
    scored = [index for index, value in enumerate(best) if value is not None and metric]
    best_index = min(scored, key=lambda index: sign * best[index], default=None)
    header = ["run", "state", "step", *differing, f"best {metric.replace('_', ' ') or 'metric'}"]
    rows = []
    for index, (report, flat) in enumerate(zip(reports, settings)):
        mark = " <- best" if index == best_index else ""
        value = f"{best[index]:.4f}{mark}" if best[index] is not None else "-"
        rows.append([report.run_dir.name, report.state, f"{report.step:,}", *(str(flat.get(key)) for key in differing), value])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    if not differing:
        lines.append("(the runs share every setting)")
    return "\n".join(lines)
