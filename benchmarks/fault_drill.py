"""The kill -9 drill: crash a training run again and again, resume it each time, and prove nothing is lost.

    python benchmarks/fault_drill.py [--faults 20] [--max-steps 160] [--save-steps 4] [--seed 0] [--workdir DIR] [--stage dpo]

It trains a `tiny` model (float32, so every run computes exactly the same numbers) twice on the
same data (pretraining; with --stage dpo, preference tuning of a random tiny model on arithmetic
pairs, whose reference log-probabilities are computed before the first step and stored with the run): once straight through, and once under fire. The second run is killed with SIGKILL
`--faults` times: at a random moment (anywhere: while importing, tokenizing, stepping, writing
metrics or checkpoints), or at one of the named instants inside checkpoint writing where a crash
does most harm (`MINIGPT_FAULT_POINT`, see `minigpt.files.fault_point`). After every kill it is
continued with `--resume`, as a user would, and finally left to finish. Then it checks:

    resumes          every --resume found a loadable checkpoint (none refused, none damaged)
    bit-identical    the final weights equal the uninterrupted run's, bit for bit
    lost steps       steps missing from the finished run's metrics (each step done exactly once in the end)
    recomputed       steps done by a killed session after its last checkpoint, so done again (the price of a crash)
    leftover files   temporary files or directories, or a lock, left in the run directory at the end

and prints a table. Exit status 0 when nothing was lost, 1 otherwise. The slow test
tests/faults/test_kill.py::test_the_drill runs a shorter drill; this script runs the full one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minigpt.checkpoint import latest_checkpoint, list_checkpoints  # noqa: E402
from minigpt.config import apply_overrides, preset_config  # noqa: E402
from minigpt.corpus import builtin_documents  # noqa: E402
from minigpt.files import FAULT_POINT_VARIABLE, LOCK_NAME, TEMPORARY_PREFIX, verify_manifest  # noqa: E402
from minigpt.metrics import read_metrics  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.model_folder import save_model_directory  # noqa: E402
from minigpt.tokenizer import train_bpe_tokenizer  # noqa: E402

FAULT_POINTS = ("after_weights", "before_rename", "after_rename_before_prune", "during_prune")
RANDOM_MOMENT = "random moment"
# A random kill lands this fraction of the uninterrupted run's wall time after launch: from start-up
# to a third of the way through training. A fraction, not seconds, so that a faster or slower machine
# kills at the same places in the run (seconds let one kill on a fast CI machine swallow most of it).
KILL_WINDOW_FRACTION = (0.05, 0.35)


@dataclass
class DrillReport:
    faults: Counter = field(default_factory=Counter)  # kind of fault -> times injected
    resumes: int = 0
    refused_resumes: list[str] = field(default_factory=list)  # what --resume said when it failed
    recomputed_steps: int = 0
    lost_steps: int = 0
    bit_identical: bool = False
    leftover_files: list[str] = field(default_factory=list)
    damaged_checkpoints: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (self.bit_identical and not self.refused_resumes and self.lost_steps == 0 and not self.leftover_files
                and not self.damaged_checkpoints)

    def table(self) -> str:
        rows = [(kind, str(count)) for kind, count in sorted(self.faults.items())]
        rows += [
            ("faults injected", str(sum(self.faults.values()))),
            ("resumes (all found a loadable checkpoint)" if not self.refused_resumes else "resumes (some refused!)",
             str(self.resumes)),
            ("bit-identical finals", "1/1" if self.bit_identical else "0/1"),
            ("lost steps", str(self.lost_steps)),
            ("recomputed steps (after the last checkpoint of a killed session)", str(self.recomputed_steps)),
            ("leftover files", str(len(self.leftover_files))),
            ("damaged checkpoints", str(len(self.damaged_checkpoints))),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"{'fault / check':<{width}}  value", f"{'-' * width}  -----"]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def prepare_data(workdir: Path, stage: str = "pretrain") -> tuple[Path, list[str]]:
    """A ~150 KB JSONL corpus and a 512-token BPE tokenizer trained on it (in this process: seconds);
    the data file, and the flags that name the stage, the tokenizer or the model to start from.
    For --stage dpo: 300 preference pairs and a random tiny model with that tokenizer."""
    corpus, tokenizer = workdir / "corpus.jsonl", workdir / "tokenizer.json"
    texts, size = [], 0
    for document in builtin_documents():
        texts.append(document)
        size += len(document)
        if size > 150_000:
            break
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    trained = train_bpe_tokenizer(texts, vocab_size=512, show_progress=False)
    trained.save(tokenizer)
    if stage == "pretrain":
        return corpus, ["--tokenizer", str(tokenizer), "--sample-tokens", "8"]
    pairs = workdir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"What is {n} times two?", "chosen": f"{n} times two is {2 * n}.",
                                         "rejected": f"{n} times two is {2 * n + 7}."}) + "\n" for n in range(300)))
    config = apply_overrides(preset_config("tiny"), {"model.vocab_size": trained.vocab_size})
    torch.manual_seed(0)
    model = save_model_directory(workdir / "start_model", GPT(config.model), config, trained)
    return pairs, ["--stage", "dpo", "--init-from", str(model), "--learning-rate", "1e-3"]


def train_command(data: Path, stage_flags: list[str], run_name: str, max_steps: int, save_steps: int, resume: bool) -> list[str]:
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "--output-dir", "runs", "--run-name", run_name]
    if resume:
        return command + ["--resume"]  # the run's config.json holds everything else
    return command + [
        "--config", "tiny", "--dtype", "float32", "--data-files", str(data), *stage_flags,
        "--max-steps", str(max_steps), "--save-steps", str(save_steps), "--eval-steps", str(max_steps),  # evaluating only at the end keeps it quick
        "--log-steps", "1", "--val-fraction", "0.1",
    ]


def steps_logged(run: Path) -> list[int]:
    """The training steps in metrics.jsonl (one row per step: --log-steps 1)."""
    return [row["step"] for row in read_metrics(run / "metrics.jsonl") if row.get("type") == "train"]  # a torn last line is skipped


def checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rpartition("_")[2]) if checkpoint is not None else 0


def run_session(command: list[str], workdir: Path, fault: str, rng: random.Random,
                run_seconds: float) -> subprocess.CompletedProcess | int:
    """One training session, killed by `fault`: the exit status, or the completed process if it was not killed.

    `run_seconds` is how long the uninterrupted run took; a random kill lands within a fraction of it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop(FAULT_POINT_VARIABLE, None)
    if fault != RANDOM_MOMENT:
        env[FAULT_POINT_VARIABLE] = f"{fault}@{rng.randint(1, 3)}"  # the 1st, 2nd or 3rd pass through the point
        return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=run_seconds * rng.uniform(*KILL_WINDOW_FRACTION))
        return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)  # it ended before the kill
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return process.returncode


def run_drill(workdir: Path, faults: int = 20, max_steps: int = 160, save_steps: int = 4, seed: int = 0,
              log=print, stage: str = "pretrain") -> DrillReport:
    """Run the drill in `workdir` and return what it found (see the module's docstring)."""
    rng = random.Random(seed)
    report = DrillReport()
    data, stage_flags = prepare_data(workdir, stage)
    started = time.perf_counter()
    straight = subprocess.run(train_command(data, stage_flags, "straight", max_steps, save_steps, resume=False),
                              cwd=workdir, capture_output=True, text=True, timeout=600)
    if straight.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {straight.stderr}")
    run_seconds = time.perf_counter() - started

    run = workdir / "runs" / "drill"
    finished = False
    for number in range(1, faults + 1):
        resume = latest_checkpoint(run) is not None
        fault = rng.choice((RANDOM_MOMENT, *FAULT_POINTS))
        outcome = run_session(train_command(data, stage_flags, "drill", max_steps, save_steps, resume), workdir, fault, rng,
                              run_seconds)
        if isinstance(outcome, subprocess.CompletedProcess):
            if resume and outcome.returncode == 2:
                report.refused_resumes.append(outcome.stderr.strip())
            if outcome.returncode not in (0, -signal.SIGKILL):
                raise RuntimeError(f"session {number} failed with status {outcome.returncode}: {outcome.stderr}")
            if outcome.returncode == 0:  # it finished before the fault could strike: the drill is over
                report.resumes += resume
                finished = True
                log(f"fault {number}: the run finished before the fault ({fault}) struck")
                break
        report.faults[fault] += 1
        report.resumes += resume
        reached = max(steps_logged(run), default=0)
        saved = checkpoint_step(latest_checkpoint(run))
        report.recomputed_steps += max(0, reached - saved)
        log(f"fault {number:2d}: {fault:<26} killed at step ~{reached:3d}, newest checkpoint {saved:3d}")

    if not finished:
        final = subprocess.run(train_command(data, stage_flags, "drill", max_steps, save_steps, resume=True),
                               cwd=workdir, capture_output=True, text=True, timeout=600)
        report.resumes += 1
        if final.returncode != 0:
            report.refused_resumes.append(final.stderr.strip())
            return report

    expected = load_file(workdir / "runs" / "straight" / "final_model" / "model.safetensors")
    actual = load_file(run / "final_model" / "model.safetensors")
    report.bit_identical = expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)
    steps = steps_logged(run)
    report.lost_steps = len(set(range(1, max_steps + 1)) - set(steps)) + (len(steps) - len(set(steps)))  # missing or doubled
    report.leftover_files = sorted(path.name for path in run.iterdir() if path.name.startswith(TEMPORARY_PREFIX) or path.name == LOCK_NAME)
    for checkpoint in [*list_checkpoints(run), run / "final_model"]:
        try:
            verify_manifest(checkpoint)
        except Exception as damage:  # noqa: BLE001 - any failure to verify is what the drill reports
            report.damaged_checkpoints.append(str(damage))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="how many times to kill the run (default: 20)")
    parser.add_argument("--max-steps", type=int, default=160, help="length of the run (default: 160)")
    parser.add_argument("--save-steps", type=int, default=4, help="checkpoint interval (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of faults and moments (default: 0)")
    parser.add_argument("--workdir", type=Path, help="where to train (default: a temporary directory, removed after)")
    parser.add_argument("--stage", choices=("pretrain", "dpo"), default="pretrain", help="what the drilled run trains (default: pretrain)")
    arguments = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fault-drill-") as temporary:
        workdir = arguments.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        report = run_drill(workdir, arguments.faults, arguments.max_steps, arguments.save_steps, arguments.seed, stage=arguments.stage)
    print()
    print(report.table())
    for message in report.refused_resumes + report.damaged_checkpoints + report.leftover_files:
        print(f"  ! {message}")
    print(f"\n{'PASSED' if report.passed else 'FAILED'}: the drill took {time.perf_counter() - started:.0f} s")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
