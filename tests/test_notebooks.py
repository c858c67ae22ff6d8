"""minigpt.notebook outside Jupyter, and every notebook of notebooks/ executed headless.

The notebooks run in a real kernel (nbclient, the "python3" kernel of this interpreter), each in
a fresh temporary directory, with their default (small) parameters: a notebook that no longer
runs top to bottom fails here, not in a reader's hands.
"""

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest
from ipykernel.kernelspec import install as install_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient

from conftest import require
from minigpt.cli.train import build_parser, config_from_arguments
from minigpt.config import apply_overrides, load_config, preset_config
from minigpt import stages
from minigpt.errors import UserInputError
from minigpt.generation import SamplingConfig, generate
from minigpt.notebook import (
    STAGES, LivePlotCallback, NotebookSettings, analyze_data, config_from_settings, format_duration,
    in_notebook, plot_data, progress_line,
)
from minigpt.model_folder import load
from minigpt.objective import Monitor
from minigpt.run import prepare_run
from minigpt.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "python3"


def tiny_run(tmp_path, corpus_jsonl, tokenizer_file, name, callbacks=(), **overrides):
    config = apply_overrides(preset_config("tiny"), {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.max_steps": 10,
        "train.eval_steps": 5, "train.eval_batches": 2, "train.save_steps": 10, "train.log_steps": 5, "train.sample_tokens": 0,
        "train.output_dir": str(tmp_path), "train.run_name": name, "train.dtype": "float32", **overrides,
    })
    trainer = prepare_run(config, show_progress=False, callbacks=list(callbacks))
    return trainer, trainer.train()


@pytest.fixture(scope="module")
def base_model(tmp_path_factory, corpus_jsonl, tokenizer_file):
    """A tiny model trained for a few steps: the final_model/ directory."""
    trainer, _ = tiny_run(tmp_path_factory.mktemp("base"), corpus_jsonl, tokenizer_file, "base")
    return trainer.run_dir / "final_model"


# ---------------------------------------------------------------------------------- live plot


def test_outside_jupyter_the_live_plot_prints_progress_and_times_itself(tmp_path, corpus_jsonl, tokenizer_file, capsys):
    assert not in_notebook()
    live = LivePlotCallback(min_interval=0.0)
    trainer, summary = tiny_run(tmp_path, corpus_jsonl, tokenizer_file, "live", callbacks=[live])
    # The live plot's own lines ("step 5/10 | ..."), not the library's log lines printed beside them.
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"step \d+/\d+ \|", line) or line.startswith("Reached")]
    assert lines[0].startswith("step 5/10 | loss ") and "tok/s | ETA" in lines[0]
    assert "val loss" in lines[-2] and lines[-1] == "Reached max_steps."
    assert len(live.train_rows) == 2 and len(live.eval_rows) == 2
    assert live.redraws >= 2 and 0 < live.drawing_seconds < summary["training_seconds"]
    figure = live.figure("title")
    loss_panel = figure.axes[0]
    assert len(figure.axes) == 4 and len(loss_panel.lines) == 2  # train and validation loss
    assert list(loss_panel.lines[0].get_xdata()) == [5, 10]


class FakeTrainer:
    """What the live plot reads of a trainer: the step budget and the objective's monitored metric."""

    def __init__(self, monitor: Monitor = Monitor()):
        self.train_config = SimpleNamespace(max_steps=100)
        self.objective = SimpleNamespace(monitor=monitor)

    def stop_message(self) -> str:
        return "Reached max_steps."


def train_row(step):
    return {"step": step, "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_second": 1.0, "eta_seconds": 9.0}


def test_the_live_plot_throttles_its_redraws():
    live = LivePlotCallback(min_interval=60.0)
    live.on_start(FakeTrainer())
    for step in range(1, 11):
        live.on_log(FakeTrainer(), train_row(step))
    assert live.redraws == 0  # every row came within the first minimum interval of the run
    live.next_draw_at = 0.0  # as if that interval had passed
    for step in range(11, 21):
        live.on_log(FakeTrainer(), train_row(step))
    assert live.redraws == 1  # one redraw; the rows after it come within the next interval
    live.on_end(FakeTrainer(), {})
    assert live.redraws == 2 and live.train_rows[-1]["step"] == 20  # the end always draws the final state


def test_the_live_plot_shows_a_monitored_metric_other_than_the_loss(capsys):
    trainer = FakeTrainer(Monitor("eval_f1_macro", "max"))  # a classifier's
    live = LivePlotCallback(min_interval=0.0)
    live.on_start(trainer)
    for step, f1 in ((5, 0.4), (10, 0.6)):
        live.on_log(trainer, train_row(step))
        live.on_evaluate(trainer, {"step": step, "val_loss": 2.0 - f1, "eval_f1_macro": f1})
    live.draw(trainer)
    assert "step 10/100 | loss 1.0000 | val loss 1.4000 | eval_f1_macro 0.6000 | lr" in capsys.readouterr().out.splitlines()[-1]
    figure = live.figure("title")
    assert len(figure.axes) == 5  # the four panels and the loss panel's second axis
    monitored = figure.axes[-1]
    assert monitored.get_ylabel() == "eval_f1_macro" and list(monitored.lines[0].get_ydata()) == [0.4, 0.6]


def test_with_figures_the_live_plot_shows_one_image_and_updates_it_in_place():
    """The Jupyter path in a plain IPython shell (what benchmarks/live_plot_overhead.py times): a
    subprocess, so that the shell it creates does not outlive the test."""
    code = (
        "from types import SimpleNamespace\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "from IPython.utils.capture import capture_output\n"
        "from traitlets.config import Config\n"
        "from minigpt.notebook import LivePlotCallback\n"
        "from minigpt.objective import Monitor\n"
        "InteractiveShell.instance(config=Config({'HistoryManager': {'enabled': False}}))\n"
        "live = LivePlotCallback(min_interval=0.0, figures=True)\n"
        "trainer = SimpleNamespace(train_config=SimpleNamespace(max_steps=100), objective=SimpleNamespace(monitor=Monitor()),\n"
        "                          stop_message=lambda: 'Reached max_steps.')\n"
        "row = {'loss': 1.0, 'lr': 1e-3, 'grad_norm': 1.0, 'tokens_per_second': 1.0, 'eta_seconds': 9.0}\n"
        "with capture_output() as captured:\n"
        "    live.on_start(trainer)\n"
        "    for step in (5, 10):\n"
        "        live.on_log(trainer, {'step': step, **row})\n"
        "        live.next_draw_at = 0.0  # draw at every row\n"
        "    live.on_end(trainer, {})\n"
        "images = [output for output in captured.outputs if 'image/png' in output.data]\n"
        "print(len(images), live.redraws, len({image.transient['display_id'] for image in images}), [image.update for image in images])\n"
        "print(repr(captured.stdout))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["3 3 1 [False, True, True]", "''"]  # no progress line printed


def test_the_progress_line_gives_the_epoch_when_the_run_counts_them():
    assert progress_line({**train_row(30), "epoch": 1.25}, 60).startswith("step 30/60 | epoch 1.25 | loss 1.0000 | ")
    assert progress_line(train_row(30), 60).startswith("step 30/60 | loss 1.0000 | ")


def test_format_duration():
    assert [format_duration(seconds) for seconds in (None, 12, 75, 3700)] == ["?", "12s", "1m15s", "1h01m"]


# ------------------------------------------------------------------------------- settings form


def cli_config(argv):
    base = load_config("tiny")
    return config_from_arguments(build_parser(base, "tiny").parse_args(["--config", "tiny", *argv]), base)


def test_the_settings_build_the_config_the_cli_builds(base_model, corpus_jsonl):
    pretrain = NotebookSettings(preset="tiny", data_file=str(corpus_jsonl), learning_rate=2e-3, max_steps=50)
    assert config_from_settings(pretrain) == cli_config(["--data-files", str(corpus_jsonl), "--lr", "2e-3", "--max-steps", "50"])
    lora = NotebookSettings(preset="tiny", stage="LoRA", init_from=str(base_model), max_steps=30, lora_rank=4, lora_alpha=8.0)
    expected = cli_config(["--stage", "sft", "--init-from", str(base_model), "--max-steps", "30", "--lora-rank", "4", "--lora-alpha", "8"])
    assert config_from_settings(lora) == expected
    assert config_from_settings(lora, {"train.eval_steps": 7}).train.eval_steps == 7
    assert set(STAGES.values()) <= set(stages.STAGES)


def test_the_settings_give_the_cli_validation_messages():
    with pytest.raises(UserInputError, match="train.learning_rate must be positive"):
        config_from_settings(NotebookSettings(learning_rate=-1.0))
    with pytest.raises(UserInputError, match="already trained model"):
        config_from_settings(NotebookSettings(stage="LoRA"))
    with pytest.raises(UserInputError, match="Unknown preset"):
        config_from_settings(NotebookSettings(preset="huge"))


def test_the_settings_form_shows_the_error_or_ok():
    widgets = require("ipywidgets")
    from minigpt.notebook import SettingsForm

    form = SettingsForm(NotebookSettings(max_steps=40))
    assert isinstance(form.widget, widgets.VBox)
    assert form.show_check() and form.message.value.startswith("OK: pretrain, 40 steps")
    form.stage.value = "LoRA"
    assert not form.show_check() and "already trained model" in form.message.value
    assert form.lora_rank.layout.display is None  # the LoRA fields appear with the LoRA stage


# ------------------------------------------------------------------------------- data analysis


def test_analysis_of_plain_text(corpus_jsonl, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    statistics = analyze_data([corpus_jsonl], tokenizer, block_size=64, max_documents=50)
    assert statistics.documents == 50 and len(statistics.tokens) == 50
    assert 0 < statistics.truncated_share <= 1  # documentation pages are longer than 65 tokens
    assert statistics.truncated_share == pytest.approx((statistics.tokens > 65).mean())
    assert statistics.turns is None and statistics.loss_token_share is None
    assert len(statistics.top_tokens) == 20 and statistics.top_tokens[0][1] >= statistics.top_tokens[-1][1]
    assert statistics.summary["total_tokens"] == int(statistics.tokens.sum())
    assert len(plot_data(statistics).axes) == 3


def test_analysis_of_chat_data(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    path = tmp_path / "chat.jsonl"
    path.write_text('{"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}\n'
                    '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}, '
                    '{"role": "assistant", "content": "Because."}, {"role": "user", "content": "Ok"}, {"role": "assistant", "content": "Yes"}]}\n')
    statistics = analyze_data([path], tokenizer, block_size=64)
    assert list(statistics.turns) == [2, 5]
    ids, mask = tokenizer.render_chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}])
    assert statistics.tokens[0] == len(ids) + 1  # plus <|endoftext|>
    assert 0 < statistics.loss_token_share < 0.5  # the template and the questions carry no loss
    assert len(plot_data(statistics).axes) == 6


# ---------------------------------------------------------------------------------------- chat


def test_the_chat_box_is_the_terminal_chat_session_with_the_sliders_settings(base_model, capsys):
    require("ipywidgets")
    from minigpt.notebook import ChatBox

    loaded = load(base_model)
    model, tokenizer = loaded.model, loaded.tokenizer
    chat = ChatBox(model, tokenizer, system="Be brief.", max_new_tokens=8)
    chat.temperature.value = 0.0
    first = chat.ask("  Hello?  ")
    # Outside a kernel the Output widget does not capture: the reply streams to stdout.
    assert capsys.readouterr().out == f"you> Hello?\nassistant> {first}\n"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0, stop_ids=(tokenizer.im_end_id, tokenizer.eos_id))
    assert first == tokenizer.decode(generate(model, tokenizer.chat_prompt(turns), greedy))  # what `minigpt chat` answers
    second = chat.ask("And then?")  # the 64-token window may drop the first exchange (tests/test_chat_cli.py checks how)
    assert chat.session.history[-2:] == [{"role": "user", "content": "And then?"}, {"role": "assistant", "content": second}]
    chat.max_new_tokens.value = 20
    chat.ask("More?")
    assert chat.session.sampling.max_new_tokens == 20 and chat.session.prompt_limit == model.config.block_size - 20
    history = list(chat.session.history)
    assert chat.ask("   ") == "" and chat.session.history == history  # an empty message is not sent
    chat.reset()
    assert chat.session.history == []


# ----------------------------------------------------------------------------------- notebooks


def test_there_are_notebooks_and_none_holds_outputs():
    assert [path.name for path in NOTEBOOKS] == ["01_pretrain_quickstart.ipynb", "02_finetune_lora_chat.ipynb", "03_classification.ipynb"]
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} holds outputs: strip them"


def ensure_kernel() -> None:
    """The "python3" kernel is this interpreter's (jupyter_client starts kernels named python3
    with sys.executable); install its spec into this environment where none is found."""
    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        install_kernel_spec(prefix=sys.prefix, kernel_name=KERNEL)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    ensure_kernel()
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout's minigpt
    notebook = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(notebook, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    errors = [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]
    assert not errors  # execute() raises on the first error; this is a second guard


def test_the_module_imports_without_ipython_and_ipywidgets():
    code = ("import sys; sys.modules['IPython'] = sys.modules['ipywidgets'] = None  # importing them now fails\n"
            "import minigpt.notebook as notebook; assert not notebook.in_notebook()\n"
            "try:\n    notebook.SettingsForm()\nexcept notebook.UserInputError as error:\n    print(error)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "install it with pip install" in result.stdout
