"""MiniGPT in a Jupyter notebook: a live training plot, a settings form, data analysis and a chat box.

Four pieces, each with a plain-Python core that works (and is tested) outside Jupyter, and a
thin Jupyter layer on top:

    LivePlotCallback    a trainer callback: one figure of loss, validation loss, learning rate,
                        gradient norm and tokens/s, redrawn in place while the run trains (in a
                        terminal: a printed progress line instead)
    SettingsForm        ipywidgets for the usual knobs; `config()` builds the very RunConfig the
                        `minigpt train` command builds from the same settings, checked the same way
    analyze_data        lengths, truncation at a block size, frequent tokens, and for chat data
                        turns per conversation and the share of tokens that carry loss
    ChatBox             a text box, sampling sliders and streamed replies, on minigpt.chat.ChatSession

A notebook calls these and `prepare_run(...).train()`; it never holds a copy of the training loop.

IPython and ipywidgets are optional: `pip install -e ".[notebook]"` brings them. This module
imports without them (the guarded imports below), so scripts and tests can use its plain parts.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from minigpt.chat import ChatSession
from minigpt.config import PRESETS, RunConfig, preset_config
from minigpt.errors import UserInputError
from minigpt.generation import DEFAULT_SAMPLING, SamplingConfig
from minigpt.model import GPT
from minigpt.plots import CURVE_PANELS, TRAIN_COLOR, VALIDATION_COLOR
from minigpt.run import configure
from minigpt.sources import DocumentReader, encode_documents
from minigpt.tokenizer import Tokenizer
from minigpt.trainer import Callback, Trainer

# Optional: only present where the notebook extra is installed. Without them the module still
# imports; the live plot prints instead of drawing, and the widgets say what to install.
try:
    from IPython import get_ipython
    from IPython.display import Image, display
except ImportError:  # pragma: no cover - exercised only where IPython is absent
    get_ipython = None
try:
    import ipywidgets as widgets
except ImportError:  # pragma: no cover - exercised only where ipywidgets is absent
    widgets = None

log = logging.getLogger("minigpt.notebook")

NOTEBOOK_EXTRA = 'pip install -e ".[notebook]"'


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where rich output can be shown), False in a terminal or script."""
    shell = get_ipython() if get_ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None  # a terminal IPython has no kernel


def figure_png(figure: Figure) -> bytes:
    """A figure rendered to PNG bytes (the Agg canvas: no window, no pyplot state)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def show_figure(figure: Figure) -> None:
    """Show a figure in the notebook (outside one, nothing is shown: scripts save figures instead)."""
    if in_notebook():
        display(Image(data=figure_png(figure)))


def _require_widgets() -> None:
    if widgets is None:
        raise UserInputError(f"The notebook widgets need ipywidgets; install it with {NOTEBOOK_EXTRA}.")


# ---------------------------------------------------------------------------------------------
# the live training plot


def format_duration(seconds: float | None) -> str:
    """12 -> '12s', 75 -> '1m15s', 3700 -> '1h01m'; None -> '?'."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(row: dict[str, Any], max_steps: int, evaluation: dict[str, float] | None = None) -> str:
    """One line on where a run stands, from its latest train row (with its epoch, when the run
    counts them) and evaluation figures ({"val loss": 2.31} or {"val loss": 0.84, "eval_f1_macro": 0.62})."""
    total = f"/{max_steps}" if max_steps else ""
    epoch = f" | epoch {row['epoch']:.2f}" if "epoch" in row else ""
    validation = "".join(f" | {name} {value:.4f}" for name, value in (evaluation or {}).items())
    return (f"step {row['step']}{total}{epoch} | loss {row['loss']:.4f}{validation} | lr {row['lr']:.2e} | "
            f"{row['tokens_per_second']:,.0f} tok/s | ETA {format_duration(row.get('eta_seconds'))}")


MONITOR_COLOR = "tab:green"  # the monitored metric when it is not the validation loss


class LivePlotCallback(Callback):
    """Redraw one figure in place while a run trains; print a progress line where there is no notebook.

    Drawing a figure costs many times a tiny model's step (tenths of a second against a few
    milliseconds on a 2-core CPU), so redrawing at every logged step could triple the training
    time (benchmarks/live_plot_overhead.py measures it). Two rules keep the cost small:

    - at most one redraw every `min_interval` seconds, the first `min_interval` seconds into the run, and
    - after a redraw that took d seconds, the next waits at least d / `max_overhead` seconds,
      so drawing takes at most `max_overhead` (3%) of the time however slow the figure is.

    The figure is shown once and then replaced through its display handle (`handle.update`),
    so the notebook holds one image, not one per redraw. `drawing_seconds` is the time spent
    drawing, to compare with the run's training time. When the objective monitors something
    other than the validation loss (a classifier's eval_f1_macro), the loss panel shows it too,
    on a second axis, and the progress line quotes it.

    `figures`: None draws figures inside a notebook and prints the progress line elsewhere; True
    always draws and shows them through IPython's display (benchmarks/live_plot_overhead.py
    measures that path in a plain IPython shell); False always prints.
    """

    def __init__(self, min_interval: float = 2.0, max_overhead: float = 0.03, figure_size: tuple[float, float] = (11, 6),
                 figures: bool | None = None):
        self.min_interval, self.max_overhead, self.figure_size = min_interval, max_overhead, figure_size
        self.figures = in_notebook() if figures is None else figures
        if self.figures and get_ipython is None:
            raise UserInputError(f"Showing the live figure needs IPython; install it with {NOTEBOOK_EXTRA}.")
        self.monitor = "val_loss"  # the objective's monitored metric, read at the start of a run
        self.train_rows: list[dict[str, Any]] = []
        self.eval_rows: list[dict[str, Any]] = []
        self.drawing_seconds = 0.0
        self.redraws = 0
        self.next_draw_at = 0.0
        self.handle: Any = None  # the IPython display handle of the figure, once shown

    def on_start(self, trainer: Trainer) -> None:
        self.train_rows, self.eval_rows = [], []
        self.next_draw_at, self.handle = time.perf_counter() + self.min_interval, None
        self.monitor = trainer.objective.monitor.metric

    def on_log(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.train_rows.append(row)
        if time.perf_counter() >= self.next_draw_at:
            self.draw(trainer)

    def on_evaluate(self, trainer: Trainer, row: dict[str, Any]) -> None:
        self.eval_rows.append(row)

    def on_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.train_rows:
            self.draw(trainer, final=trainer.stop_message())

    def title(self, trainer: Trainer, final: str = "") -> str:
        evaluation = {}
        if self.eval_rows:
            evaluation["val loss"] = self.eval_rows[-1]["val_loss"]
            if self.monitor != "val_loss":
                evaluation[self.monitor] = self.eval_rows[-1][self.monitor]
        line = progress_line(self.train_rows[-1], trainer.train_config.max_steps, evaluation)
        return f"{line}\n{final}" if final else line

    def draw(self, trainer: Trainer, final: str = "") -> None:
        """Show the figure (or print the progress line) now, and time it for the throttle."""
        start = time.perf_counter()
        if self.figures:
            image = Image(data=figure_png(self.figure(self.title(trainer, final))))
            if self.handle is None:
                self.handle = display(image, display_id=True)
            else:
                self.handle.update(image)
        else:
            print(self.title(trainer, final), flush=True)
        end = time.perf_counter()
        self.drawing_seconds += end - start
        self.redraws += 1
        self.next_draw_at = end + max(self.min_interval, (end - start) / self.max_overhead)

    def figure(self, title: str) -> Figure:
        """The four panels of `minigpt.plots.CURVE_PANELS` (validation loss as markers), under `title`."""
        figure = Figure(figsize=self.figure_size, dpi=72)
        FigureCanvasAgg(figure)
        panels = figure.subplots(2, 2).flatten()
        steps = [row["step"] for row in self.train_rows]
        for axes, (metric, panel_title, logarithmic) in zip(panels, CURVE_PANELS):
            values = [row.get(metric) for row in self.train_rows]
            axes.plot(steps, [np.nan if value is None else value for value in values], color=TRAIN_COLOR, linewidth=1.2)
            axes.set_title(panel_title)
            axes.set_xlabel("step")
            axes.grid(alpha=0.3)
            if logarithmic and all(value and value > 0 for value in values):
                axes.set_yscale("log")
        if self.eval_rows:
            eval_steps = [row["step"] for row in self.eval_rows]
            panels[0].plot(eval_steps, [row["val_loss"] for row in self.eval_rows],
                           color=VALIDATION_COLOR, marker="o", linestyle="--", label="validation")
            panels[0].legend(fontsize=8, loc="upper left")
            if self.monitor != "val_loss":
                monitored = panels[0].twinx()
                monitored.plot(eval_steps, [row[self.monitor] for row in self.eval_rows], color=MONITOR_COLOR, marker="s",
                               linestyle=":", label=self.monitor)
                monitored.set_ylabel(self.monitor, color=MONITOR_COLOR)
                monitored.legend(fontsize=8, loc="upper right")
        figure.suptitle(title, fontsize=10)
        figure.subplots_adjust(top=0.86, hspace=0.5, wspace=0.3)  # fixed margins: tight_layout would add half the drawing time
        return figure


# ---------------------------------------------------------------------------------------------
# the settings form


STAGES = {"pretrain": "pretrain", "SFT": "sft", "LoRA": "sft"}  # the form's choice -> train.stage (LoRA: sft with lora_rank)


@dataclass
class NotebookSettings:
    """What the settings form asks for. Empty or zero values leave the preset's setting alone."""

    preset: str = "tiny"
    data_file: str = ""  # empty: the built-in corpus (pretrain) or the built-in chat set (SFT)
    stage: str = "pretrain"  # one of STAGES
    init_from: str = ""  # the model SFT and LoRA start from
    learning_rate: float = 0.0
    max_steps: int = 0
    lora_rank: int = 8  # LoRA only
    lora_alpha: float = 16.0  # LoRA only

    def overrides(self) -> dict[str, Any]:
        """The settings as the dotted keys `minigpt train`'s flags set (--data-files, --stage, ...)."""
        if self.stage not in STAGES:
            raise UserInputError(f"Unknown stage '{self.stage}'; choose one of {', '.join(STAGES)}.")
        overrides: dict[str, Any] = {"train.stage": STAGES[self.stage]}
        if self.data_file:
            overrides["train.data_files"] = [self.data_file]
        if self.init_from:
            overrides["train.init_from"] = self.init_from
        if self.learning_rate:
            overrides["train.learning_rate"] = self.learning_rate
        if self.max_steps:
            overrides["train.max_steps"] = self.max_steps
        if self.stage == "LoRA":
            overrides.update({"train.lora_rank": self.lora_rank, "train.lora_alpha": self.lora_alpha})
        return overrides


def config_from_settings(settings: NotebookSettings, extra: dict[str, Any] | None = None) -> RunConfig:
    """The RunConfig `minigpt train --config PRESET <flags>` builds from the same settings, validated.

    As on the command line: the preset first, then the settings; a run started from a model
    (init_from) takes that model's shape. `extra` holds further dotted overrides (output_dir,
    eval_steps, ...), applied with the settings. Raises UserInputError with the CLI's sentence.
    """
    overrides = {**settings.overrides(), **(extra or {})}
    return configure(preset_config(settings.preset), overrides, {key: f"'{key}'" for key in overrides}, source="settings")


class SettingsForm:
    """Widgets for NotebookSettings, with a Check button that shows the configuration or its error.

    `form.settings()` reads the widgets; `form.config(extra)` builds the RunConfig exactly as
    `config_from_settings` does (that is, as the CLI does). Display it with `display(form.widget)`.
    """

    def __init__(self, defaults: NotebookSettings | None = None):
        _require_widgets()
        defaults = defaults or NotebookSettings()
        style = {"description_width": "110px"}
        self.preset = widgets.Dropdown(options=list(PRESETS), value=defaults.preset, description="preset", style=style)
        self.data_file = widgets.Text(value=defaults.data_file, description="data file", placeholder="empty: built-in data", style=style)
        self.stage = widgets.ToggleButtons(options=list(STAGES), value=defaults.stage, description="stage", style=style)
        self.init_from = widgets.Text(value=defaults.init_from, description="start from", placeholder="a final_model/ (SFT, LoRA)", style=style)
        self.learning_rate = widgets.FloatLogSlider(value=defaults.learning_rate or preset_config(defaults.preset).train.learning_rate,
                                                    min=-5, max=-1, description="learning rate", readout_format=".1e", style=style)
        self.max_steps = widgets.IntText(value=defaults.max_steps or preset_config(defaults.preset).train.max_steps,
                                         description="steps", style=style)
        self.lora_rank = widgets.IntSlider(value=defaults.lora_rank, min=1, max=64, description="LoRA rank", style=style)
        self.lora_alpha = widgets.FloatText(value=defaults.lora_alpha, description="LoRA alpha", style=style)
        self.check = widgets.Button(description="Check", button_style="info")
        self.message = widgets.HTML()
        self.check.on_click(lambda _button: self.show_check())
        self.stage.observe(lambda _change: self._show_lora_fields(), names="value")
        self._show_lora_fields()
        self.widget = widgets.VBox([self.preset, self.data_file, self.stage, self.init_from, self.learning_rate, self.max_steps,
                                    self.lora_rank, self.lora_alpha, widgets.HBox([self.check, self.message])])

    def _show_lora_fields(self) -> None:
        shown = self.stage.value == "LoRA"
        for box in (self.lora_rank, self.lora_alpha):
            box.layout.display = None if shown else "none"

    def settings(self) -> NotebookSettings:
        return NotebookSettings(
            preset=self.preset.value, data_file=self.data_file.value.strip(), stage=self.stage.value,
            init_from=self.init_from.value.strip(), learning_rate=self.learning_rate.value, max_steps=self.max_steps.value,
            lora_rank=self.lora_rank.value, lora_alpha=self.lora_alpha.value,
        )

    def config(self, extra: dict[str, Any] | None = None) -> RunConfig:
        return config_from_settings(self.settings(), extra)

    def show_check(self, extra: dict[str, Any] | None = None) -> bool:
        """Put 'OK' or the configuration's error (the CLI's sentence) next to the button."""
        try:
            config = self.config(extra)
        except UserInputError as error:
            self.message.value = f"<span style='color:#b00'>error: {error}</span>"
            return False
        train = config.train
        self.message.value = (f"OK: {train.stage}{f' + LoRA rank {train.lora_rank}' if train.lora_rank else ''}, "
                              f"{train.max_steps} steps at learning rate {train.learning_rate:g}")
        return True


# ---------------------------------------------------------------------------------------------
# data analysis


@dataclass
class DataStatistics:
    """What a data set looks like through a tokenizer at a block size."""

    documents: int
    block_size: int
    characters: np.ndarray  # per document
    tokens: np.ndarray  # per document, <|endoftext|> included: what the model reads
    truncated_share: float  # documents longer than one row of block_size + 1 tokens
    top_tokens: list[tuple[str, int]]  # the most frequent tokens and their counts
    turns: np.ndarray | None = None  # chat data: turns per conversation
    loss_token_share: float | None = None  # chat data: the share of tokens the loss is computed on
    summary: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.summary = {
            "documents": self.documents,
            "mean_tokens_per_document": float(self.tokens.mean()),
            "median_tokens_per_document": float(np.median(self.tokens)),
            "max_tokens_per_document": int(self.tokens.max()),
            "total_tokens": int(self.tokens.sum()),
            "characters_per_token": float(self.characters.sum() / max(1, self.tokens.sum())),
            "truncated_share": self.truncated_share,
        }
        if self.turns is not None:
            self.summary["mean_turns_per_conversation"] = float(self.turns.mean())
            self.summary["loss_token_share"] = float(self.loss_token_share or 0.0)


def analyze_data(sources: Sequence[Path | str], tokenizer: Tokenizer, block_size: int, text_field: str = "text",
                 max_documents: int = 2000, top: int = 20) -> DataStatistics:
    """Read up to `max_documents` documents of `sources` (files or "builtin", "builtin-sft") and measure them.

    Documents go through the same path to tokens as training (`encode_documents`: chat through
    the chat template, <|endoftext|> after each), so the counts are the ones the model sees.
    A document longer than block_size + 1 tokens does not fit one row: in chat fine-tuning
    (one conversation per row) its end is cut off. The loss share is the share of tokens whose
    mask is True: the assistant's words (render_chat), which are all the loss is computed on.
    """
    reader = DocumentReader(list(sources), text_field)
    documents = list(islice(iter(reader.next_document, None), max_documents or None))
    reader.close()
    if not documents:
        raise UserInputError(f"{', '.join(map(str, sources))} holds no documents to analyse.")
    encoded = encode_documents(documents, tokenizer)
    lengths = np.array([len(ids) for ids, _ in encoded])
    characters = np.array([len(document.text) if document.text is not None
                           else sum(len(turn["content"]) for turn in document.conversations) for document in documents])
    counts = Counter(int(token) for ids, _ in encoded for token in ids)
    top_tokens = [(tokenizer.decode([token]), count) for token, count in counts.most_common(top)]
    chats = [(document, mask) for document, (_, mask) in zip(documents, encoded) if document.conversations is not None]
    turns = np.array([len(document.conversations) for document, _ in chats]) if chats else None
    loss_share = sum(int(mask.sum()) for _, mask in chats) / sum(len(mask) for _, mask in chats) if chats else None
    return DataStatistics(documents=len(documents), block_size=block_size, characters=characters, tokens=lengths,
                          truncated_share=float((lengths > block_size + 1).mean()), top_tokens=top_tokens,
                          turns=turns, loss_token_share=loss_share)


def plot_data(statistics: DataStatistics) -> Figure:
    """Histograms of characters and tokens per document (with the block size marked), the most
    frequent tokens, and for chat data the turns per conversation."""
    chat = statistics.turns is not None
    figure = Figure(figsize=(12, 7 if chat else 3.6), dpi=72)
    FigureCanvasAgg(figure)
    panels = figure.subplots(2 if chat else 1, 3).flatten()
    panels[0].hist(statistics.characters, bins=40, color=TRAIN_COLOR)
    panels[0].set(title="characters per document", xlabel="characters", ylabel="documents")
    panels[1].hist(statistics.tokens, bins=40, color=TRAIN_COLOR)
    panels[1].axvline(statistics.block_size + 1, color="tab:red", linestyle="--", label="one row (block_size + 1)")
    panels[1].set(title=f"tokens per document ({100 * statistics.truncated_share:.1f}% longer than a row)", xlabel="tokens")
    panels[1].legend(fontsize=8)
    names = [repr(text)[1:-1][:12] for text, _ in statistics.top_tokens][::-1]
    panels[2].barh(names, [count for _, count in statistics.top_tokens][::-1], color=TRAIN_COLOR)
    panels[2].set(title="most frequent tokens", xlabel="count")
    panels[2].tick_params(axis="y", labelsize=7)
    if chat:
        panels[3].hist(statistics.turns, bins=np.arange(statistics.turns.max() + 2) - 0.5, color=VALIDATION_COLOR)
        panels[3].set(title="turns per conversation", xlabel="turns", ylabel="conversations")
        share = statistics.loss_token_share or 0.0
        panels[4].bar(["assistant (loss)", "prompt and template"], [share, 1 - share], color=[VALIDATION_COLOR, "tab:gray"])
        panels[4].set(title="share of tokens that carry loss", ylim=(0, 1))
        panels[5].axis("off")
    figure.tight_layout()
    return figure


# ---------------------------------------------------------------------------------------------
# chat


class ChatBox:
    """A chat in the notebook: a text box, sampling sliders, and replies streamed into an Output widget.

    The conversation is a `minigpt.chat.ChatSession` (`chat.session`), the one `minigpt chat` runs:
    the same template, stop tokens and trimming to the window; the sliders set its sampling per reply.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, system: str = "", max_new_tokens: int = 64):
        _require_widgets()
        self.message = widgets.Text(placeholder="Ask something and press Enter", layout={"width": "60%"})
        model_defaults = tokenizer.sampling_defaults  # a pretrained folder's generation_config.json; {} for MiniGPT's models
        self.temperature = widgets.FloatSlider(value=model_defaults.get("temperature", DEFAULT_SAMPLING["temperature"]),
                                               min=0.0, max=2.0, step=0.05, description="temperature")
        self.top_p = widgets.FloatSlider(value=model_defaults.get("top_p", DEFAULT_SAMPLING["top_p"]), min=0.05, max=1.0, step=0.05, description="top-p")
        self.top_k = int(model_defaults.get("top_k", 0))  # no slider: the model's own, else off
        self.repetition_penalty = float(model_defaults.get("repetition_penalty", 1.0))
        self.max_new_tokens = widgets.IntSlider(value=max_new_tokens, min=8, max=model.config.block_size // 2, description="max tokens")
        self.send = widgets.Button(description="Send", button_style="primary")
        self.clear = widgets.Button(description="Reset")
        self.output = widgets.Output(layout={"border": "1px solid #ccc", "min_height": "80px"})
        self.send.on_click(lambda _button: self.ask(self.message.value))
        self.message.continuous_update = False
        self.message.observe(lambda change: self.ask(change["new"]), names="value")
        self.clear.on_click(lambda _button: self.reset())
        self.widget = widgets.VBox([
            widgets.HBox([self.message, self.send, self.clear]),
            widgets.HBox([self.temperature, self.top_p, self.max_new_tokens]), self.output,
        ])
        self.session = ChatSession(model, tokenizer, self.sampling(), system)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens.value, temperature=self.temperature.value,
                              top_k=self.top_k, top_p=self.top_p.value, repetition_penalty=self.repetition_penalty)

    def ask(self, message: str) -> str:
        """Answer `message`: the reply streams into the Output widget as it is sampled."""
        message = message.strip()
        if not message:
            return ""
        self.message.value = ""
        with self.output:
            print(f"you> {message}\nassistant> ", end="", flush=True)
            self.session.sampling = self.sampling()
            try:
                return self.session.reply(message)
            except UserInputError as error:
                print(f"error: {error}")
                return ""

    def reset(self) -> None:
        self.session.reset()
        self.output.clear_output()

