"""What every command has in common: the `minigpt` entry point, flag spellings, --help, --version,
--print-config, exit codes, and log lines that never break the progress bar."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

import minigpt
from conftest import REPO, run_in_process, run_script
from minigpt.cli import COMMANDS
from minigpt.cli.common import dash_spellings

MINIGPT = Path(sys.executable).parent / "minigpt"  # the console script pip installed next to this Python


def run_minigpt(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(MINIGPT), *arguments], cwd=cwd, capture_output=True, text=True, timeout=120)


def print_config(*arguments: str, cwd: Path) -> dict:
    result = run_in_process("train", "--config", "tiny", *arguments, "--print-config", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_version_lives_in_one_place_and_the_console_script_reports_it(tmp_path):
    result = run_minigpt("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"minigpt {minigpt.__version__}"


def test_the_console_script_runs_every_command(tmp_path):
    result = run_minigpt("--help", cwd=tmp_path)
    assert result.returncode == 0 and all(name in result.stdout for name in COMMANDS)
    printed = run_minigpt("train", "--config", "tiny", "--max_steps", "7", "--print-config", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    assert json.loads(printed.stdout)["train"]["max_steps"] == 7
    assert not list(tmp_path.iterdir())  # --print-config writes nothing


def test_python_dash_m_minigpt_names_itself_in_messages(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    help_text = subprocess.run([sys.executable, "-m", "minigpt", "--help"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert help_text.returncode == 0 and "usage: python -m minigpt" in help_text.stdout
    error = subprocess.run([sys.executable, "-m", "minigpt", "train", "--bogus"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert error.returncode == 2 and "see python -m minigpt train --help" in error.stderr


def test_errors_name_the_command_the_user_typed(tmp_path):
    installed = run_minigpt("train", "--bogus", cwd=tmp_path)
    assert installed.returncode == 2 and "(see minigpt train --help)" in installed.stderr
    script = run_script("train.py", "--bogus", cwd=tmp_path)
    assert script.returncode == 2 and f"(see python {REPO / 'scripts' / 'train.py'} --help)" in script.stderr


def test_underscore_spellings_and_lr_are_aliases(tmp_path):
    config = print_config("--learning_rate", "0.01", "--max_steps=9", "--gradient_accumulation_steps", "2", cwd=tmp_path)
    assert config["train"]["learning_rate"] == 0.01 and config["train"]["max_steps"] == 9
    assert config["train"]["gradient_accumulation_steps"] == 2
    assert print_config("--lr", "0.02", cwd=tmp_path)["train"]["learning_rate"] == 0.02
    assert dash_spellings(["--set", "model.n_layer=6", "--text_field=my_field", "--", "--not_a_flag"]) == [
        "--set", "model.n_layer=6", "--text-field=my_field", "--", "--not_a_flag"]


def test_flags_are_never_abbreviated(tmp_path):
    result = run_in_process("train", "--config", "tiny", "--lr-sched", "constant", "--print-config", cwd=tmp_path)
    assert result.returncode == 2 and "unrecognized arguments: --lr-sched" in result.stderr


def test_a_switch_set_in_a_config_file_can_be_turned_off(tmp_path):
    (tmp_path / "run.toml").write_text('preset = "tiny"\n[train]\nplot_loss = true\n')
    on = run_in_process("train", "--config", "run.toml", "--print-config", cwd=tmp_path)
    assert json.loads(on.stdout)["train"]["plot_loss"] is True
    off = run_in_process("train", "--config", "run.toml", "--no-plot-loss", "--print-config", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert json.loads(off.stdout)["train"]["plot_loss"] is False


def test_help_shows_the_chosen_presets_defaults_in_groups_with_examples(tmp_path):
    tiny = run_in_process("train", "--config", "tiny", "--help", cwd=tmp_path).stdout
    medium = run_in_process("train", "--help", cwd=tmp_path).stdout
    assert "peak learning rate (default: 0.003)" in " ".join(tiny.split())
    assert "peak learning rate (default: 0.0006)" in " ".join(medium.split())
    for group in ("data:", "model:", "optimisation:", "schedule:", "checkpoints:", "runtime:", "monitoring:", "examples:", "exit status:"):
        assert f"\n{group}\n" in tiny, group
    assert "--plot-loss, --no-plot-loss" in tiny


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(tmp_path, command):
    result = run_in_process(command, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: minigpt {command}")


def test_the_same_thing_has_the_same_name_in_every_command(tmp_path):
    monitor = run_in_process("monitor", "--help", cwd=tmp_path).stdout
    plot = run_in_process("plot", "--help", cwd=tmp_path).stdout
    tokenizer = run_in_process("tokenizer", "--help", cwd=tmp_path).stdout
    train = run_in_process("train", "--help", cwd=tmp_path).stdout
    assert "--output-dir" in monitor and "--checkpoints-dir" not in monitor
    assert "usage: minigpt plot [-h] [--output OUTPUT] [RUN ...]" in " ".join(plot.split())
    assert "--vocab-size" in tokenizer and "--vocab-size" in train


def run_in_terminal(command: list[str], cwd: Path, timeout: float = 240) -> str:
    """Run a command on a pseudo-terminal 120 columns wide (so progress bars draw) and return all it printed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(command, cwd=cwd, stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command exited and closed the terminal
            break
        if not chunk:
            break
        output += chunk
    process.wait(timeout=timeout)
    os.close(leader)
    return output.decode("utf-8", errors="replace")


def test_warnings_print_on_their_own_line_above_the_progress_bar(tmp_path, corpus_jsonl):
    lines = corpus_jsonl.read_text().splitlines()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join(lines[:40] + ["{broken"] + lines[40:]) + "\n")
    output = run_in_terminal([sys.executable, str(REPO / "scripts" / "train_tokenizer.py"), "--data-files", str(mixed),
                              "--vocab-size", "300", "--output", "tok.json"], cwd=tmp_path)
    assert "tokenizer:" in output, output  # the bar was drawn
    warnings = [line for line in output.split("\n") if "Skipping" in line]
    assert warnings, output
    for line in warnings:
        # The bar is cleared (a carriage return) before the warning, so after the last carriage
        # return the terminal line holds the warning alone.
        shown = line.rstrip("\r").split("\r")[-1]
        assert shown.startswith(f"Skipping {mixed}:41: "), repr(line)


def test_installed_metadata_carries_the_package_version():
    from importlib.metadata import version

    assert version("minigpt") == minigpt.__version__


def test_the_readme_test_command_installs_and_runs_what_ci_does():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest\n' in readme
    assert 'pip install --quiet -c constraints.txt -e ".[test]"\nCI=true python -m pytest --durations=30\n' in ci  # CI=true: a missing optional package fails
