"""The report card of a run: report.md and report.html in its run directory.

One page says what a run was and what came of it, read from the files the run left:

    config.json        the stage, the data, the model's shape, the settings
    sessions.jsonl     each session's command line and machine (written by `minigpt train`)
    summary.json       tokens, time, throughput, losses, parameters, what the data held
    metrics.jsonl      the curves (loss and learning rate, drawn into the page) and the samples
    eval_results.json  the last `minigpt eval` of its final_model/

A run started with --init-from is one stage of a chain (pretraining, then chat fine-tuning, ...):
the report follows init_from back to the first run and gives each run a section, oldest first.
`write_comparison` puts several runs side by side instead. The HTML is one self-contained file
(the plots are embedded as data), so it can be mailed or attached as it is.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minigpt.config import RunConfig, load_config
from minigpt.errors import UserInputError
from minigpt.evaluation import EVAL_RESULTS_FILE
from minigpt.files import atomic_write_bytes
from minigpt.metrics import read_metrics
from minigpt.model_folder import FolderKind, identify
from minigpt.plots import training_curves_figure
from minigpt.runtime import machine_description

SESSIONS_FILE = "sessions.jsonl"
SAMPLES_SHOWN = 3


def record_session(run_dir: str | Path, command_line: str) -> None:
    """Append this session's command line and machine to the run's sessions.jsonl (a resumed run
    adds a line: it may run on another machine)."""
    line = json.dumps({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command_line,
                       "cwd": os.getcwd(), "machine": machine_description()})
    with open(Path(run_dir) / SESSIONS_FILE, "a", encoding="utf-8") as file:
        file.write(line + "\n")


@dataclass
class RunRecord:
    """What a run directory holds, read once."""

    directory: Path
    config: RunConfig
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    sessions: list[dict[str, Any]]
    evaluation: dict[str, Any] | None
    status: dict[str, Any]
    starts_from: str = ""  # init_from when it is not a MiniGPT run (a Hugging Face folder), for the chain's first section
    plots: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.directory.name

    @property
    def stage(self) -> str:
        return self.config.train.stage


def _json_file(path: Path) -> dict | None:
    """The JSON object in `path` (a run's summary, status or evaluation results), None if there is
    no such file; a damaged one (cut short, or not an object) is refused in one sentence."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, ValueError) as error:
        raise UserInputError(f"{path} cannot be read as JSON ({error}).") from None
    if value is not None and not isinstance(value, dict):
        raise UserInputError(f"{path} is damaged: it holds a JSON {type(value).__name__}, not an object.")
    return value


def read_run(directory: str | Path) -> RunRecord:
    """A run directory's files; UserInputError if it is not a run directory."""
    directory = Path(directory).resolve()
    if not (directory / "config.json").is_file() or not (directory / "metrics.jsonl").is_file():
        raise UserInputError(f"{directory} is not a run directory (it lacks config.json or metrics.jsonl); give a directory under checkpoints/.")
    sessions_file = directory / SESSIONS_FILE
    sessions = [json.loads(line) for line in sessions_file.read_text(encoding="utf-8").splitlines() if line.strip()] if sessions_file.is_file() else []
    return RunRecord(directory, load_config(str(directory / "config.json")), _json_file(directory / "summary.json") or {},
                     read_metrics(directory / "metrics.jsonl"), sessions, _json_file(directory / EVAL_RESULTS_FILE),
                     _json_file(directory / "status.json") or {})


def run_chain(directory: str | Path) -> list[RunRecord]:
    """The run and the runs it started from (--init-from), oldest first. The chain ends at a run
    trained from scratch, or at a model that is not a MiniGPT run (a Hugging Face folder, or one
    moved away), which the first section names."""
    chain = [read_run(directory)]
    while (init_from := chain[0].config.train.init_from):
        # A relative --init-from was relative to where the run was started (sessions.jsonl says where).
        started_in = Path(chain[0].sessions[0].get("cwd", ".")) if chain[0].sessions else Path(".")
        path = Path(init_from) if Path(init_from).is_absolute() or Path(init_from).exists() else started_in / init_from
        try:
            folder = identify(path)
        except UserInputError:
            chain[0].starts_from = f"{init_from} (no longer there)"
            break
        # A final_model/ or a checkpoint sits in its run directory (an adapter's final_model/ too).
        parent = folder.path.parent
        if folder.kind is FolderKind.HUGGING_FACE or not (parent / "metrics.jsonl").is_file():
            chain[0].starts_from = init_from
            break
        if any(parent.resolve() == record.directory for record in chain):
            break  # a run cannot start from itself; stop rather than loop
        chain.insert(0, read_run(parent))
    return chain


def _plot(record: RunRecord) -> bytes | None:
    """The run's loss and learning-rate curves (with gradient norm and throughput) as PNG bytes."""
    try:
        figure = training_curves_figure({record.name: record.rows})
    except ValueError:  # no training rows yet
        return None
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _facts(record: RunRecord) -> list[tuple[str, str]]:
    """(label, value) rows of a run: data, tokenizer, model, time and losses."""
    config, summary, train = record.config, record.summary, record.config.train
    model = config.model
    evaluations = [row for row in record.rows if row.get("type") == "eval"]
    best = min(evaluations, key=lambda row: row.get("val_loss", float("inf")), default=None)
    last = evaluations[-1] if evaluations else None
    data = summary.get("data") or {}
    tokenizer_source = train.tokenizer_path or ("the starting model's" if train.init_from else "trained for the run")
    rows = [
        ("stage", record.stage + (f" (from {train.init_from})" if train.init_from else " (from scratch)")),
        ("state", f"{record.status.get('state', 'unknown')}: {record.status.get('message', '')}".strip()),
        ("data", ", ".join(train.data_files) or "-"),
        ("documents read", f"{_number(data.get('documents'))} ({_number(data.get('bad_lines'))} bad lines skipped)"),
        ("tokenizer", f"{train.tokenizer_type}, {model.vocab_size:,} tokens ({tokenizer_source})"),
        ("model", f"{model.n_layer} layers, {model.n_head} heads, width {model.n_embd}, context {model.block_size}"),
        ("parameters", _number(summary.get("parameters"))),
        ("steps", _number(summary.get("steps"))),
        ("tokens trained on", _number(summary.get("tokens"))),
        ("training time", f"{summary['training_seconds'] / 60:.1f} min" if summary.get("training_seconds") is not None else "-"),
        ("tokens per second", _number(summary.get("tokens_per_second"), 0)),
        ("last training loss", _number(summary.get("last_train_loss"))),
    ]
    if best is not None:
        rows.append(("best validation loss", f"{_number(best.get('val_loss'))} at step {best['step']:,}"
                     + (f" ({_number(best.get('val_bits_per_byte'))} bits/byte)" if "val_bits_per_byte" in best else "")))
    if last is not None:
        rows.append(("last validation loss", f"{_number(last.get('val_loss'))} at step {last['step']:,}"
                     + (f" ({_number(last.get('val_bits_per_byte'))} bits/byte)" if "val_bits_per_byte" in last else "")))
    return rows


def _evaluation_rows(evaluation: dict[str, Any]) -> list[list[str]]:
    rows = [[name, _number(scores.get("n")), _number(scores.get("accuracy", scores.get("exact_match"))),
             _number(scores.get("accuracy_norm", scores.get("contains"))), _number(scores.get("chance")), _number(scores.get("centered"))]
            for name, scores in (evaluation.get("tasks") or {}).items()]
    if "score" in evaluation:
        rows.append(["score (mean centred)", "", "", "", "", _number(evaluation["score"])])
    return rows


EVALUATION_HEADER = ["task", "n", "accuracy (exact match)", "accuracy_norm (contains)", "chance", "centred"]


def _samples(record: RunRecord) -> list[tuple[int, str]]:
    """The last few samples the run generated at its evaluations: (step, text)."""
    samples = [(row["step"], row["sample"]) for row in record.rows if row.get("type") == "eval" and row.get("sample")]
    return samples[-SAMPLES_SHOWN:]


# ----------------------------------------------------------------------------- writing


class _Page:
    """The same content written twice: Markdown lines and HTML lines."""

    def __init__(self, title: str):
        self.markdown = [f"# {title}", ""]
        self.html = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{html.escape(title)}</title>",
                     "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                     "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}"
                     "pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}img{max-width:100%}</style></head><body>",
                     f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self.markdown += [f"{'#' * level} {text}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str) -> None:
        self.markdown += [text, ""]
        self.html.append(f"<p>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.markdown += ["```", text, "```", ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        def cell(value: str) -> str:
            return value.replace("|", "\\|").replace("\n", " ")
        self.markdown += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        self.markdown += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows] + [""]
        self.html.append("<table><tr>" + "".join(f"<th>{html.escape(value)}</th>" for value in header) + "</tr>"
                         + "".join("<tr>" + "".join(f"<td>{html.escape(value)}</td>" for value in row) + "</tr>" for row in rows)
                         + "</table>")

    def image(self, png: bytes, markdown_path: str, alt: str) -> None:
        """Markdown links the PNG file beside it; the HTML carries the image itself."""
        self.markdown += [f"![{alt}]({markdown_path})", ""]
        self.html.append(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>")

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        markdown, page = directory / f"{stem}.md", directory / f"{stem}.html"
        atomic_write_bytes(markdown, "\n".join(self.markdown).encode("utf-8"))
        atomic_write_bytes(page, "\n".join(self.html + ["</body></html>", ""]).encode("utf-8"))
        return markdown, page


def _plot_file(record: RunRecord, png: bytes, out: Path) -> str:
    """Write the run's curves as plots/report_curves.png in its run directory; the path from `out`."""
    path = record.directory / "plots" / "report_curves.png"
    path.parent.mkdir(exist_ok=True)
    atomic_write_bytes(path, png)
    return os.path.relpath(path, out)


def _run_section(page: _Page, record: RunRecord, out: Path, number: int, of: int) -> None:
    page.heading(f"{number}. {record.stage}: {record.name}" if of > 1 else f"{record.stage}: {record.name}")
    page.paragraph(f"Run directory: {record.directory}")
    if record.starts_from:
        page.paragraph(f"Starts from {record.starts_from}, which is not a MiniGPT run directory.")
    if record.sessions:
        page.heading("Command line", 3)
        page.code("\n".join(f"[{session.get('started', '?')}] {session.get('command', '?')}" for session in record.sessions))
        machine = record.sessions[-1].get("machine") or {}
        page.heading("Environment", 3)
        page.table(["", ""], [[key.replace("_", " "), "-" if value is None else str(value)] for key, value in machine.items()])
    else:
        page.paragraph("Command line and environment: not recorded (the run was made before MiniGPT recorded them).")
    page.heading("Run", 3)
    page.table(["", ""], [[label, value] for label, value in _facts(record)])
    if record.evaluation:
        page.heading("Evaluations", 3)
        text = record.evaluation.get("text")
        if text:
            page.paragraph(f"On text: loss {_number(text.get('loss'))}, bits per byte {_number(text.get('bits_per_byte'))} "
                           f"over {_number(text.get('tokens'))} tokens.")
        if record.evaluation.get("tasks"):
            page.paragraph(f"Tasks ({record.evaluation.get('format', '?')} format, {record.evaluation.get('num_fewshot', 0)}-shot):")
            page.table(EVALUATION_HEADER, _evaluation_rows(record.evaluation))
    png = _plot(record)
    if png is not None:
        page.heading("Curves", 3)
        page.image(png, _plot_file(record, png, out), f"training curves of {record.name}")
    samples = _samples(record)
    if samples:
        page.heading("Samples", 3)
        for step, text in samples:
            page.paragraph(f"step {step:,}:")
            page.code(text)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """report.md and report.html in `run_dir`: one section per run of its chain, oldest first."""
    chain = run_chain(run_dir)
    out = chain[-1].directory
    page = _Page(f"MiniGPT run report: {chain[-1].name}")
    page.paragraph("Stages: " + " -> ".join(f"{record.stage} ({record.name})" for record in chain))
    for number, record in enumerate(chain, start=1):
        _run_section(page, record, out, number, len(chain))
    return page.write(out, "report")


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> tuple[Path, Path]:
    """comparison.md and comparison.html in `out`: the runs side by side, then each run's section."""
    records = [read_run(directory) for directory in run_dirs]
    out = Path(out)
    if not out.is_dir():
        raise UserInputError(f"--output {out} is not a directory; create it or name another.")
    page = _Page("MiniGPT runs compared: " + ", ".join(record.name for record in records))
    facts = [dict(_facts(record)) for record in records]
    labels = list(dict.fromkeys(label for fact in facts for label in fact))
    rows = [[label, *(fact.get(label, "-") for fact in facts)] for label in labels]
    rows.append(["eval score (mean centred)", *(_number((record.evaluation or {}).get("score")) for record in records)])
    page.table(["", *(record.name for record in records)], rows)
    try:
        figure = training_curves_figure({record.name: record.rows for record in records})
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        atomic_write_bytes(out / "comparison_curves.png", buffer.getvalue())
        page.heading("Curves")
        page.image(buffer.getvalue(), "comparison_curves.png", "training curves of the runs")
    except ValueError:  # none of the runs has training rows
        pass
    for number, record in enumerate(records, start=1):
        _run_section(page, record, out, number, len(records))
    return page.write(out, "comparison")
