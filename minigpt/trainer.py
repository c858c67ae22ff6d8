"""The training loop, written out by hand.

One optimiser step:
    1. set the learning rate from the schedule
    2. take `gradient_accumulation_steps` micro-batches; for each, forward, loss, backward
       (the summed loss is divided by the weight of the whole step, for a language model its
       target tokens, so accumulating k micro-batches gives exactly the gradient of one
       k-times larger batch)
    3. clip the gradient norm, skip the step if the loss or gradient is NaN/Inf
    4. AdamW update
Around it: logging, evaluation, checkpoints, early stopping, a time budget, and a clean stop on
Ctrl-C or SIGTERM. What a batch means (its loss, its weight, its tokens, how to evaluate, which
metric is "better") belongs to the objective (`minigpt.objective`); what else varies between
runs (plots, sinks, notebooks) lives in callbacks. There is never a second copy of this loop.

Epochs: when the run knows how many steps one pass over the data takes (train.epoch_steps, which
`minigpt.run.resolve_run_length` counts), every row carries `epoch` = step / epoch_steps, and
eval_strategy / save_strategy "epoch" evaluate and save at each epoch's end.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

from minigpt.anomalies import PER_PROCESS_KINDS, diagnose
from minigpt.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint, write_model_files
from minigpt.config import RunConfig
from minigpt.distributed import (
    PER_PROCESS, agree_on_stop, all_reduce_sum, gather_to_main, gradient_sync, is_distributed, is_main_process, rank,
    sum_over_processes, world_size, wrap_model,
)
from minigpt.errors import RunFailure, UserInputError
from minigpt.files import atomic_write_bytes, atomic_write_json, fault_point, unlock_run_directory
from minigpt.model_folder import AdapterRun, save_model_directory
from minigpt.memory import PeakMemory, resize_stream, smallest_factor, split_batch
from minigpt.metrics import MetricsWriter, evaluation_scalars, read_metrics
from minigpt.model import GPT
from minigpt.objective import Batch, Objective
from minigpt.optim import build_optimizer, learning_rate_at
from minigpt.plots import save_loss_curve
from minigpt.resources import ResourceGovernor, free_memory, process_cpu_seconds
from minigpt.run_log import RunLog
from minigpt.runtime import (
    accelerator_memory_bytes, accelerator_utilisation, autocast, compile_mode, compile_model, measure_matmul_peak,
    rng_state, set_rng_state, software_versions, synchronize,
)
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.trainer")

MAX_CONSECUTIVE_BAD_STEPS = 5  # NaN/Inf steps in a row before the run gives up
PROFILE_STEPS = (3, 13)  # --profile times steps 3 to 12 (the first ones warm caches up)
HISTORY_ROWS = 500  # metric rows kept in memory for the anomaly rules
PHASES = ("data", "forward", "backward", "optimizer")
# Reasons to stop that one process may reach alone, least to most severe: the processes agree on
# the most severe any of them reached (see `minigpt.distributed.agree_on_stop`).
LOCAL_STOP_REASONS = ("max_time", "signal", "memory_limit")


@dataclass
class Progress:
    """Counters that a checkpoint carries across a resume."""

    step: int = 0
    tokens_seen: int = 0
    elapsed_seconds: float = 0.0  # training wall-clock time, summed over resumed sessions
    best_metric: float | None = None  # the best value so far of the objective's monitored metric
    evaluations_without_improvement: int = 0
    skipped_steps: int = 0


@dataclass
class StepOutcome:
    """One optimizer step, as `Callback.on_step_end` sees it. The tensors are 0-d and stay on the
    device: reading one back waits for the device, so a callback reads them only when it must."""

    step: int
    loss: torch.Tensor  # the loss of the global batch
    grad_norm: torch.Tensor  # before clipping
    finite: torch.Tensor  # bool: loss and gradient norm were finite, so the update was applied
    tokens: int
    seconds: float  # wall time of the step, reading its data included
    learning_rate: float
    timed: bool  # the device was synchronised between phases: trainer.phase_seconds are this step's


class Callback:
    """Hooks for what varies between runs. In the order the loop calls them:

        on_start        the loop starts: the run directory exists
        on_gradients    on timed steps (logging, --profile), after backward and clipping, before
                        the update: the gradients are in place
        on_step_end     after every optimizer step, with its `StepOutcome`
        on_log          a train row was written to metrics.jsonl
        on_evaluate     an eval row was written
        on_checkpoint   a checkpoint was saved
        final_model     which model final_model/ holds; asked once, when the run ends well
        on_end          the run ended: summary.json and status.json are written

    The trainer's own callbacks (running totals, --profile, --max-cpu/--max-memory) run in every
    process under torchrun; the ones a run is given run in rank 0 only.
    """

    def on_start(self, trainer: "Trainer") -> None: ...

    def on_gradients(self, trainer: "Trainer") -> None: ...

    def on_step_end(self, trainer: "Trainer", outcome: StepOutcome) -> None: ...

    def on_log(self, trainer: "Trainer", row: dict[str, Any]) -> None: ...

    def on_evaluate(self, trainer: "Trainer", row: dict[str, Any]) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...

    def final_model(self, trainer: "Trainer") -> torch.nn.Module | None:
        """The complete model to write as final_model/ instead of the trained one; None: no opinion.
        The first callback with an answer decides; final_model/ is written once."""
        return None

    def on_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------
# the trainer's own callbacks


class RunningTotals(Callback):
    """What happened since the last train row, for the next one: the loss summed over the finite
    steps and their count (kept on the device until the row is written), the tokens and the
    seconds spent in training steps (evaluation and saving excluded), and the CPU time used."""

    def __init__(self, device: torch.device, process: psutil.Process):
        self.device, self.process = device, process
        self.start_window()

    def start_window(self) -> None:
        zero = torch.zeros((), device=self.device)
        self.loss_sum, self.finite_steps = zero.clone(), zero.clone()
        self.tokens, self.seconds = 0, 0.0
        self.wall_start, self.cpu_start = time.perf_counter(), process_cpu_seconds(self.process)

    def on_start(self, trainer: "Trainer") -> None:
        self.start_window()
        trainer.objective.log_metrics()  # forget what the probes before the loop measured (precision, batch size, compilation)

    def on_step_end(self, trainer: "Trainer", outcome: StepOutcome) -> None:
        self.loss_sum += torch.where(outcome.finite, outcome.loss, 0.0)
        self.finite_steps += outcome.finite
        self.tokens += outcome.tokens
        self.seconds += outcome.seconds

    def on_log(self, trainer: "Trainer", row: dict[str, Any]) -> None:
        self.start_window()

    def read(self, grad_norm: torch.Tensor) -> tuple[float, float, float]:
        """(the mean loss of the window's finite steps, NaN if none; `grad_norm`; tokens per
        second), the device's numbers read back in one transfer."""
        loss_sum, finite_steps, norm = torch.stack([self.loss_sum, self.finite_steps, grad_norm.float()]).tolist()
        return loss_sum / finite_steps if finite_steps else float("nan"), norm, self.tokens / self.seconds

    def cpu_percent(self) -> float:
        """The process's share of the whole machine's CPU time since the window started."""
        wall = time.perf_counter() - self.wall_start
        return 100 * (process_cpu_seconds(self.process) - self.cpu_start) / wall / (psutil.cpu_count() or 1)


class StepProfiler(Callback):
    """--profile: add up where steps 3 to 12 spend their time (the first ones warm caches up) and
    print the mean of each phase once, after step 12. The loop times the steps it `measures`."""

    def __init__(self) -> None:
        self.totals = dict.fromkeys(PHASES, 0.0)

    def measures(self, step: int) -> bool:
        return PROFILE_STEPS[0] <= step < PROFILE_STEPS[1]

    def on_step_end(self, trainer: "Trainer", outcome: StepOutcome) -> None:
        if not self.measures(outcome.step):
            return
        for phase in PHASES:
            self.totals[phase] += trainer.phase_seconds[phase]
        if outcome.step == PROFILE_STEPS[1] - 1:
            log.info(self.report())

    def report(self) -> str:
        steps = PROFILE_STEPS[1] - PROFILE_STEPS[0]
        total = sum(self.totals.values())
        lines = [f"Where the step time goes (mean of steps {PROFILE_STEPS[0]}-{PROFILE_STEPS[1] - 1}):"]
        for phase in PHASES:
            seconds = self.totals[phase]
            lines.append(f"  {phase:<10} {1000 * seconds / steps:9.1f} ms  {100 * seconds / total:5.1f}%")
        lines.append(f"  {'step':<10} {1000 * total / steps:9.1f} ms")
        return "\n".join(lines)


class ResourceLimits(Callback):
    """--max-cpu / --max-memory after every step (`minigpt.resources.ResourceGovernor`): sleep to
    hold the CPU share; when system memory stays above the limit, halve the micro-batch for the
    steps to come (the global batch stays), and at a micro-batch of 1 ask to stop with a checkpoint."""

    def __init__(self, governor: ResourceGovernor):
        self.governor = governor

    def on_step_end(self, trainer: "Trainer", outcome: StepOutcome) -> None:
        if not self.governor.after_step() and not trainer.reduce_micro_batch("system memory stayed above --max-memory"):
            trainer.requested_stop = "memory_limit"


class LossPlotCallback(Callback):
    """--plot-loss: redraw the loss curve at every checkpoint and at the end of the run."""

    def _plot(self, trainer: "Trainer", names: list[str]) -> None:
        rows = read_metrics(trainer.run_dir / "metrics.jsonl")
        train = [(row["step"], row["loss"]) for row in rows if row.get("type") == "train"]
        validation = [(row["step"], row["val_loss"]) for row in rows if row.get("type") == "eval"]
        if not train:
            return
        plots = trainer.run_dir / "plots"
        try:
            first = save_loss_curve(plots / names[0], train, validation, title=trainer.run_dir.name,
                                    epoch_steps=trainer.train_config.epoch_steps)
            for name in names[1:]:
                atomic_write_bytes(plots / name, first.read_bytes())  # a reader never sees half a PNG
        except Exception as error:  # noqa: BLE001 - a plot must never stop training
            log.warning("Could not draw the loss curve: %s", error)

    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None:
        self._plot(trainer, [f"loss_curve_step_{trainer.progress.step}.png", "loss_curve_latest.png"])

    def on_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        self._plot(trainer, [f"loss_curve_final_step_{trainer.progress.step}.png", "loss_curve_latest.png"])


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        model: GPT,
        tokenizer: Tokenizer,
        objective: Objective,
        train_batches: Any,
        val_batches: Any,
        run_dir: str | Path,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        callbacks: list[Callback] | None = None,
        show_progress: bool = True,
        adapter: AdapterRun | None = None,
        run_log: RunLog | None = None,
    ):
        self.config, self.train_config = config, config.train
        self.model, self.tokenizer, self.objective = model, tokenizer, objective
        self.train_batches, self.val_batches = train_batches, val_batches
        self.run_dir = Path(run_dir)
        self.device, self.dtype = device, dtype
        # Under torchrun only rank 0 writes files and prints; the other processes only compute.
        self.is_main = is_main_process()
        self.show_progress = show_progress and self.is_main
        self.adapter = adapter  # a LoRA run: only the adapters train, on a frozen base model
        self.run_log = run_log  # train.log, closed when train() returns
        self.optimizer = build_optimizer(model, self.train_config, device.type)
        # float16 has a narrow range: scale the loss up so small gradients do not flush to zero.
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        self.progress = Progress()
        self.session_start = time.perf_counter()  # of this session's training (set again when the loop starts)
        self.stop_reason: str | None = None
        self.requested_stop: str | None = None  # a signal or the memory limit, until the processes agree to stop
        self.stop_signal: int | None = None  # which signal stopped the run, if one did (SIGINT, SIGTERM)
        if "epoch" in (self.train_config.eval_strategy, self.train_config.save_strategy) and not self.train_config.epoch_steps:
            raise ValueError("eval/save_strategy 'epoch' needs train.epoch_steps: prepare_run resolves it (resolve_run_length).")
        self.process = psutil.Process()
        config = self.train_config
        self.monitoring = not config.disable_monitoring
        limits = bool(config.max_cpu or config.max_memory)
        # The limits are a promise to the machine's other users, not a measurement: they hold
        # even with monitoring off (which only drops the sampling, the anomaly rules and MFU).
        self.governor = ResourceGovernor(config.max_cpu, config.max_memory) if self.monitoring or limits else None
        if not self.monitoring and limits:
            log.warning("--disable-monitoring turns off sampling and anomaly checks, but the --max-cpu/--max-memory limits "
                        "stay in force (set them to 0 to lift them).")
        self.peak_memory = PeakMemory(device) if self.monitoring else None  # peak_rss_bytes per log row
        # Model FLOPs utilisation compares against a matrix-multiply peak measured right here.
        self.peak_flops = measure_matmul_peak(device, dtype) if self.monitoring else None
        self.history: list[dict[str, Any]] = []  # recent metric rows, for the anomaly rules
        self.active_anomalies: set[str] = set()
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)  # of the last timed step
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=False)  # opened when the loop starts
        # The run's callbacks (rank 0 only), then the trainer's own (every process).
        self.totals = RunningTotals(device, self.process)
        self.profiler = StepProfiler() if config.profile else None
        own = [self.totals, self.profiler, ResourceLimits(self.governor) if limits else None]
        self.callbacks = (list(callbacks or []) if self.is_main else []) + [callback for callback in own if callback is not None]
        # Reading a number back from a GPU waits for all the work queued before it. There, the
        # fused optimizer skips a NaN/Inf step on the device by itself (found_inf), and the
        # counts of skipped steps are read back only at logging, evaluation and saving steps.
        # On a CPU reading back costs nothing, so every step is checked at once.
        self.defer_readback = device.type != "cpu" and bool(self.optimizer.defaults.get("fused")) and self.scaler is None
        self.skipped_unsettled = torch.zeros((), dtype=torch.long, device=device)  # skipped steps not yet counted
        self.bad_run = torch.zeros((), dtype=torch.long, device=device)  # NaN/Inf steps in a row

    # ----------------------------------------------------------------------------------------
    # saving and resuming

    def elapsed(self) -> float:
        """Training wall-clock seconds, over this session and every session before a resume."""
        return self.progress.elapsed_seconds + time.perf_counter() - self.session_start

    def training_state(self) -> dict[str, Any]:
        progress = asdict(self.progress)
        progress["elapsed_seconds"] = self.elapsed()  # a resumed run continues the clock (and its --max-time)
        # Each process reads its own share of the data and draws its own random numbers, so the
        # checkpoint holds every process's data position and RNG state, by rank (a list of one
        # without torchrun). The weights and optimizer state are the same in every process.
        per_process = gather_to_main({"train_stream": self.train_batches.state_dict(), "rng": rng_state()})
        state = {"optimizer": self.optimizer.state_dict(), "processes": per_process, "progress": progress}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save_checkpoint(self, evaluation: dict[str, Any] | None = None) -> Path | None:
        """Save the run's state; `evaluation`, the metrics of an evaluation at this very step, goes
        into meta.json, where pruning finds the best checkpoint by the objective's metric.
        Every process must call this (it gathers their data positions); rank 0 writes, and returns
        the checkpoint's path; the others return None."""
        training_state = self.training_state()
        if not self.is_main:
            return None
        meta = {"tokens_seen": self.progress.tokens_seen, "saved_at": time.time(), **evaluation_scalars(evaluation or {})}
        if self.adapter is not None:
            meta.update(base_model=self.adapter.base_path, base_model_sha256=self.adapter.base_sha256)
        path = save_checkpoint(self.run_dir, self.progress.step, self.model, training_state, meta, self.config, self.tokenizer)
        monitor = self.objective.monitor
        prune_checkpoints(self.run_dir, self.train_config.keep_checkpoints, monitor.metric, monitor.mode == "max")
        log.info("Saved checkpoint %s", path)
        for callback in self.callbacks:
            callback.on_checkpoint(self, path)
        return path

    def resume(self, checkpoint_dir: str | Path) -> None:
        """Continue from a checkpoint exactly where it left off: weights, optimizer, data, RNGs."""
        state, meta = load_checkpoint(checkpoint_dir, self.model)
        if self.adapter is not None and meta.get("base_model_sha256") != self.adapter.base_sha256:
            raise UserInputError(
                f"The base model {self.adapter.base_path} has changed since this LoRA run's checkpoint {checkpoint_dir} "
                "was saved (its SHA-256 differs); restore that base model or start a new run."
            )
        saved_by = len(state["processes"])
        if saved_by != world_size():
            raise UserInputError(
                f"Checkpoint {checkpoint_dir} was saved by {saved_by} process(es) and this run has {world_size()}: resume it "
                f"with the same number (torchrun --nproc_per_node ... totalling {saved_by}), since each process's data "
                "position belongs to its own share of the documents."
            )
        saved_with = "muon" if "muon" in state["optimizer"] else "adamw"
        if saved_with != self.train_config.optimizer:
            raise UserInputError(
                f"Checkpoint {checkpoint_dir} was trained with --optimizer {saved_with} and this run asks for "
                f"{self.train_config.optimizer}: resume with --optimizer {saved_with}, since one optimizer's state does not carry over to the other."
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_batches.load_state_dict(state["processes"][rank()]["train_stream"])
        set_rng_state(state["processes"][rank()]["rng"])
        self.progress = Progress(**state["progress"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        log.info("Resumed from %s at step %d", checkpoint_dir, self.progress.step)

    # ----------------------------------------------------------------------------------------
    # the loop

    def train(self) -> dict[str, Any]:
        """Train until max_steps, max_time, early stopping, a stop signal, a memory limit or repeated NaN losses."""
        try:
            if self.train_config.disable_optimizations:
                # The plain textbook attention (softmax(q k^T) v, no fused kernel): slower, easiest to debug.
                with sdpa_kernel([SDPBackend.MATH]):
                    return self._train()
            return self._train()
        finally:
            if self.is_main:
                unlock_run_directory(self.run_dir)  # taken by prepare_run: the next trainer may use the directory
            if self.run_log is not None:
                self.run_log.close(last_line=self.stop_message() if self.stop_reason else "")

    def _train(self) -> dict[str, Any]:
        config = self.train_config
        self.metrics = MetricsWriter(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        batches = iter(self.train_batches)
        self.session_start = time.perf_counter()  # compiling counts towards --max-time
        model = self._model_to_train()
        self._write_status("running")
        for callback in self.callbacks:
            callback.on_start(self)
        previous_handlers = self._catch_stop_signals()
        bar = tqdm(
            total=config.max_steps or None, initial=self.progress.step, unit="step", dynamic_ncols=True,
            disable=None if self.show_progress else True, desc="training",  # None: only on a terminal
        )
        last_evaluation: dict[str, Any] | None = None
        evaluated_at = -1
        try:
            while self.stop_reason is None:
                if config.max_steps and self.progress.step >= config.max_steps:
                    self.stop_reason = "max_steps"
                    break
                step = self.progress.step + 1
                learning_rate = self._set_learning_rate()
                timed = step % config.log_steps == 0 or (self.profiler is not None and self.profiler.measures(step))
                started = time.perf_counter()
                micro_batches = [next(batches) for _ in range(config.gradient_accumulation_steps)]
                self.phase_seconds["data"] = time.perf_counter() - started
                result = self.step_with_backoff(model, micro_batches, timed)  # forward, backward, update
                if result is None:  # out of memory even at a micro-batch of 1
                    break
                outcome = StepOutcome(step, *result, seconds=time.perf_counter() - started, learning_rate=learning_rate, timed=timed)
                self._count_step(outcome)
                bar.update(1)
                for callback in self.callbacks:
                    callback.on_step_end(self, outcome)
                self.stop_reason = agree_on_stop(self._local_stop_reason(), LOCAL_STOP_REASONS, self.device)

                if not self.defer_readback or self._settling_step(step) or self.stop_reason:
                    self._settle_skipped_steps()
                if step % config.log_steps == 0 or self.stop_reason:
                    row = self._log(outcome)
                    bar.set_postfix(self._postfix(row))
                if self.val_batches is not None and self._evaluation_step(step):
                    last_evaluation, evaluated_at = self._evaluate(), step
                if self._save_step(step):
                    self.save_checkpoint(last_evaluation if evaluated_at == step else None)
        finally:
            bar.close()
            self._restore_signals(previous_handlers)
        return self._finish(last_evaluation, evaluated_at)

    def _model_to_train(self) -> torch.nn.Module:
        """The model the steps run: DDP-wrapped under torchrun, then compiled if asked (self.model stays the plain one)."""
        config = self.train_config
        model: torch.nn.Module = wrap_model(self.model, self.device)
        model.train()
        if config.compile and not config.disable_optimizations:
            model = compile_model(model, self.example_loss, mode=compile_mode(self.device, config.compile_mode))
        return model

    def _set_learning_rate(self) -> float:
        """Set the schedule's learning rate for the next step on every parameter group, and return it."""
        learning_rate = learning_rate_at(self.progress.step, self.train_config, self.elapsed())
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        return learning_rate

    def _count_step(self, outcome: StepOutcome) -> None:
        """Advance the progress counters; tally skipped steps and the run of bad ones on the device."""
        self.progress.step = outcome.step
        self.progress.tokens_seen += outcome.tokens
        self.skipped_unsettled += ~outcome.finite
        self.bad_run = (self.bad_run + 1) * ~outcome.finite

    def _local_stop_reason(self) -> str | None:
        """Why this process alone would stop now: a signal or the memory limit (requested), or the time budget."""
        config = self.train_config
        return self.requested_stop or ("max_time" if config.max_time and self.elapsed() >= config.max_time else None)

    def _evaluation_step(self, step: int) -> bool:
        """Whether `step` is one to evaluate at: every eval_steps, or at each epoch's end with eval_strategy epoch."""
        config = self.train_config
        return step % (config.epoch_steps if config.eval_strategy == "epoch" else config.eval_steps) == 0

    def _save_step(self, step: int) -> bool:
        """Whether `step` is one to save at: every save_steps, or at each epoch's end with save_strategy epoch."""
        config = self.train_config
        return step % (config.epoch_steps if config.save_strategy == "epoch" else config.save_steps) == 0

    def _epoch_field(self, step: int) -> dict[str, float]:
        """{"epoch": the passes over the training data at `step`, e.g. 1.25}, or {} when the run does not count epochs."""
        epoch_steps = self.train_config.epoch_steps
        return {"epoch": round(step / epoch_steps, 4)} if epoch_steps else {}

    @staticmethod
    def _postfix(row: dict[str, Any]) -> dict[str, str]:
        """The progress bar's figures from a train row: loss, learning rate, and the epoch if the run counts them."""
        postfix = {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}
        if "epoch" in row:
            postfix["epoch"] = f"{row['epoch']:.2f}"
        return postfix

    def _settling_step(self, step: int) -> bool:
        """A step whose skipped-step count must be exact: it is logged, evaluated or saved."""
        return step % self.train_config.log_steps == 0 or self._evaluation_step(step) or self._save_step(step)

    def _finish(self, last_evaluation: dict[str, Any] | None, evaluated_at: int) -> dict[str, Any]:
        """After the loop: evaluate and save the last step (unless the loop just did), write
        final_model/ (unless the run failed), summary.json and status.json; return the summary."""
        self._settle_skipped_steps()
        self.progress.elapsed_seconds = self.elapsed()
        self.session_start = time.perf_counter()  # the clock is now in progress.elapsed_seconds
        step = self.progress.step
        failed = self.stop_reason in ("non_finite_loss", "memory_limit", "out_of_memory")
        if step > 0 and evaluated_at != step and not failed and self.val_batches is not None:
            last_evaluation, evaluated_at = self._evaluate(), step
        if step > 0:
            if not self._save_step(step):
                self.save_checkpoint(last_evaluation if evaluated_at == step else None)
            if not failed and self.is_main:
                self.save_final_model()
        self.metrics.close()
        summary = self._summary(last_evaluation)
        if self.is_main:
            atomic_write_json(self.run_dir / "summary.json", summary)
        finished = self.stop_reason in ("max_steps", "max_time", "early_stopping")
        self._write_status("finished" if finished else "failed" if failed else "stopped", message=self.stop_message())
        for callback in self.callbacks:
            callback.on_end(self, summary)
        return summary

    def save_final_model(self) -> Path:
        """final_model/, written once: the model a callback chooses (`Callback.final_model`: a
        classifier's best evaluation), else the trained model, or for a LoRA run only its adapters
        (small), which load onto the recorded base model; each with config.json and tokenizer.json."""
        path = self.run_dir / "final_model"
        for callback in self.callbacks:
            chosen = callback.final_model(self)
            if chosen is not None:
                return save_model_directory(path, chosen, self.config, self.tokenizer)
        if self.adapter is None:
            return save_model_directory(path, self.model, self.config, self.tokenizer)
        return self.adapter.save(path, self.model, lambda directory: write_model_files(directory, self.config, self.tokenizer))

    def example_loss(self, model: torch.nn.Module) -> torch.Tensor:
        """The loss of a training step's forward pass on the objective's example batch, moved and
        laid out as optimizer_step does: compiling with it leaves the data stream untouched."""
        batch = self.objective.example_batch(self.train_config.batch_size, self.model.config.block_size)
        with autocast(self.device, self.dtype):
            return self.objective.loss(model, self.objective.to_device(batch, self.device))

    # ----------------------------------------------------------------------------------------
    # running out of memory: a smaller micro-batch, the same step

    def step_with_backoff(
        self, model: torch.nn.Module, micro_batches: list[Batch], timed: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None:
        """optimizer_step; if it runs out of memory, cut each micro-batch in parts (half, for an even
        size), redo the step on those, and keep the smaller micro-batch for the steps after. The
        global batch is unchanged, and so, to float rounding, is the step: its loss is divided by
        the weight of all its micro-batches however they are cut. None: it cannot be cut further."""
        while True:
            try:
                return self.optimizer_step(model, micro_batches, timed)
            except torch.OutOfMemoryError:
                pass  # recovered below: the except block's traceback still holds the failed step's tensors
            if is_distributed():
                raise self._out_of_memory_under_torchrun()
            parts = smallest_factor(self.train_config.batch_size)
            self.optimizer.zero_grad(set_to_none=True)  # the partial gradients of the failed attempt
            free_memory()
            if not self.reduce_micro_batch("out of memory"):
                self.stop_reason = "out_of_memory"
                return None
            micro_batches = [part for batch in micro_batches for part in split_batch(batch, parts)]

    def _out_of_memory_under_torchrun(self) -> RunFailure:
        """What stops every process when one runs out of memory under torchrun.

        The others are already in this step's gradient all-reduce, waiting for this process's
        gradients: it can neither retry with a smaller micro-batch alone nor join them in saving a
        checkpoint. So it says what happened and exits (status 1); torchrun then stops the rest,
        and the run continues from its last checkpoint with a micro-batch that fits.
        """
        config = self.train_config
        return RunFailure(
            f"Step {self.progress.step + 1}: the process of rank {rank()} (of {world_size()}) ran out of memory with a "
            f"micro-batch of {config.batch_size}, so every process stops; continue from the last checkpoint with "
            "--resume and a smaller --batch-size (a larger --gradient-accumulation-steps keeps the global batch) "
            "or --gradient-checkpointing."
        )

    def reduce_micro_batch(self, reason: str) -> bool:
        """Divide the micro-batch by its smallest factor and multiply the accumulation by it, for the
        steps to come; say so in the log and metrics.jsonl and record it in config.json (and so in
        every later checkpoint), so a resumed run continues with the same micro-batch. False when
        it is already 1, or the stream cannot change its batch size (dataloader workers)."""
        config = self.train_config  # changed in place: the loop reads the accumulation from it
        micro, accumulation = config.batch_size, config.gradient_accumulation_steps
        parts = smallest_factor(micro)
        if is_distributed():  # one process alone changing its batch would leave the others waiting in a collective
            log.error("Step %d: %s under torchrun: the micro-batch is not reduced across processes; "
                      "restart with a smaller --batch-size.", self.progress.step + 1, reason)
            return False
        if micro == 1 or not resize_stream(self.train_batches, micro // parts):
            log.error("Step %d: %s at a micro-batch of %d, which cannot be reduced further here.", self.progress.step + 1, reason, micro)
            return False
        config.batch_size, config.gradient_accumulation_steps = micro // parts, accumulation * parts
        message = (f"reducing micro-batch from {micro} to {config.batch_size} "
                   f"(gradient accumulation {accumulation} -> {config.gradient_accumulation_steps})")
        log.warning("Step %d: %s: %s", self.progress.step + 1, reason, message)
        self.metrics.write({"type": "memory", "step": self.progress.step + 1, "reason": reason, "message": message,
                       "batch_size": config.batch_size, "gradient_accumulation_steps": config.gradient_accumulation_steps})
        atomic_write_json(self.run_dir / "config.json", self.config.to_dict())
        return True

    def optimizer_step(
        self, model: torch.nn.Module, micro_batches: list[Batch], timed: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Forward, backward and update on one step's micro-batches.

        Returns the loss, the gradient norm and whether both are finite (0-d tensors, left on the
        device) and the number of tokens. A non-finite step is skipped, never applied.

        On `timed` steps the device is synchronised between phases so that phase_seconds holds
        the true forward / backward / optimizer times (elsewhere that wait would only slow the run).
        """
        clock = time.perf_counter
        forward = backward = 0.0
        # Divide by the weight of the whole step, not of each micro-batch: micro-batches with
        # more counted targets (chat data with masked prompts) then weigh correctly. Under
        # torchrun "the whole step" is every process's micro-batches: one all-reduce sums them.
        step_weight, tokens = sum_over_processes(
            sum(self.objective.weight(batch) for batch in micro_batches),
            sum(self.objective.tokens(batch) for batch in micro_batches), device=self.device,
        )
        tokens = int(tokens)
        # DDP *averages* the gradients of the P processes: it gives (1/P) sum_p grad(loss_p). We
        # want sum_p grad(loss_p) / step_weight, the gradient of the global batch, so each
        # process scales its loss by P before backward. With one process P = 1: nothing changes.
        processes = world_size()
        total_loss = torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            batch = self.objective.to_device(batch, self.device)
            # Under DDP only the last micro-batch's backward all-reduces the gradients (the earlier
            # ones add to the local gradients). DDP decides that in the forward pass, so the
            # forward goes inside no_sync() as well as the backward.
            with gradient_sync(model, enabled=index == len(micro_batches) - 1):
                start = clock()
                with autocast(self.device, self.dtype):
                    loss = self.objective.loss(model, batch) / max(step_weight, 1)
                fault_point("training_step")  # a test hook: out of memory (or a crash) here, on demand
                if timed:
                    synchronize(self.device)
                middle = clock()
                (self.scaler.scale(loss * processes) if self.scaler else loss * processes).backward()
            total_loss += loss.detach()
            if timed:
                synchronize(self.device)
            forward, backward = forward + middle - start, backward + clock() - middle
        # The loss of the global batch, identical in every process, so all agree to skip a bad step.
        all_reduce_sum(total_loss)
        start = clock()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        max_norm = self.train_config.grad_clip or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if timed:
            for callback in self.callbacks:
                callback.on_gradients(self)
        finite = torch.isfinite(total_loss) & torch.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif self.defer_readback:
            self.optimizer.found_inf = (~finite).float()  # the fused kernel skips the update when this is 1
            self.optimizer.step()
        elif bool(finite):  # a read-back: free on a CPU
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timed:
            synchronize(self.device)
        self.phase_seconds.update(forward=forward, backward=backward, optimizer=clock() - start)
        return total_loss, grad_norm.detach(), finite, tokens

    def _settle_skipped_steps(self) -> None:
        """Read the skipped-step tallies back from the device, report them, and stop after too many in a row."""
        skipped, bad_run = (int(value) for value in torch.stack([self.skipped_unsettled, self.bad_run]).tolist())
        if skipped:
            log.warning("Step %d: %d update(s) skipped since the last check: the loss or gradient norm was NaN/Inf.",
                        self.progress.step, skipped)
            self.progress.skipped_steps += skipped
            self.skipped_unsettled.zero_()
        if bad_run >= MAX_CONSECUTIVE_BAD_STEPS:
            self.stop_reason = "non_finite_loss"

    def _evaluate(self) -> dict[str, Any]:
        """Evaluate on the validation data, write the row, and track the monitored metric."""
        config, monitor = self.train_config, self.objective.monitor
        result = self.objective.evaluate(self.model, self.val_batches, config.eval_batches, self.dtype)
        step = self.progress.step
        row = {"type": "eval", "step": step, **self._epoch_field(step), "tokens": self.progress.tokens_seen, **result}
        if monitor.improves(result[monitor.metric], self.progress.best_metric):
            self.progress.best_metric = result[monitor.metric]
            self.progress.evaluations_without_improvement = 0
        else:
            self.progress.evaluations_without_improvement += 1
        log.info("step %d | %s", self.progress.step, self.objective.describe(result))
        if "sample" in result:
            log.info("sample: %r", result["sample"])
        self.metrics.write(row)
        for callback in self.callbacks:
            callback.on_evaluate(self, row)
        self._check_anomalies(row)
        patience = config.early_stopping_patience
        if patience and self.progress.evaluations_without_improvement >= patience:
            self.stop_reason = "early_stopping"
        return result

    def _log(self, outcome: StepOutcome) -> dict[str, Any]:
        """Write one train row to metrics.jsonl and the log, check it for anomalies, and return it."""
        config, step, elapsed = self.train_config, self.progress.step, self.elapsed()
        loss, grad_norm, tokens_per_second = self.totals.read(outcome.grad_norm)
        remaining = [(config.max_steps - step) * elapsed / step] if config.max_steps else []
        if config.max_time:
            remaining.append(max(0.0, config.max_time - elapsed))
        row: dict[str, Any] = {
            "type": "train",
            "step": step,
            **self._epoch_field(step),
            "tokens": self.progress.tokens_seen,
            "loss": loss,  # mean over the steps since the last row
            **(measured := self.objective.log_metrics()),  # what else the objective measured over those steps
            "lr": outcome.learning_rate,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens_per_second,
            "step_ms": 1000 * outcome.seconds,
            **{f"{phase}_ms": 1000 * seconds for phase, seconds in self.phase_seconds.items()},
            "skipped_steps": self.progress.skipped_steps,
            "elapsed_seconds": elapsed,
            "eta_seconds": min(remaining) if remaining else None,
        }
        if self.peak_flops:
            # tokens_per_second counts every process; the measured peak is one device's.
            row["mfu"] = self.model.flops_per_token() * tokens_per_second / world_size() / self.peak_flops
        if self.monitoring:
            row["cpu_percent"] = self.totals.cpu_percent()
            row["rss_bytes"] = self.process.memory_info().rss
            row["system_memory_percent"] = psutil.virtual_memory().percent
            row["accelerator_memory_bytes"] = accelerator_memory_bytes(self.device)
            row["accelerator_utilisation"] = accelerator_utilisation(self.device)
            if self.governor is not None:
                row["paused_seconds"] = self.governor.paused_seconds
            if self.peak_memory is not None:
                row.update(self.peak_memory.read_and_reset())
        self.metrics.write(row)
        memory = f" | mem {row['rss_bytes'] / 1e9:.1f} GB" if "rss_bytes" in row else ""
        log.info("step %d | loss %.4f%s | lr %.2e | %s tok/s%s", step, loss, self.objective.describe_log(measured), outcome.learning_rate,
                 f"{tokens_per_second:,.0f}", memory)
        for callback in self.callbacks:
            callback.on_log(self, row)
        self._check_anomalies(row)
        self._write_status("running")
        return row

    def _check_anomalies(self, row: dict[str, Any]) -> None:
        """Run the anomaly rules on recent rows; report each finding when it first appears. Under
        torchrun every process checks its own rows, with no collective (nothing to wait for): a
        finding about its own machine it reports itself, the rest (the same everywhere) rank 0 does."""
        if not self.monitoring:
            return
        self.history = self.history[-HISTORY_ROWS:] + [row]
        findings = diagnose(self.history)
        for anomaly in findings:
            if anomaly.kind not in self.active_anomalies:
                log.warning("Anomaly at step %d: %s %s", anomaly.step, anomaly.message, anomaly.advice,
                            extra=PER_PROCESS if anomaly.kind in PER_PROCESS_KINDS else None)
                self.metrics.write({"type": "anomaly", **anomaly.as_dict()})
        self.active_anomalies = {anomaly.kind for anomaly in findings}

    def _summary(self, evaluation: dict[str, Any] | None) -> dict[str, Any]:
        rows = read_metrics(self.run_dir / "metrics.jsonl")
        train_rows = [row for row in rows if row.get("type") == "train"]
        elapsed = self.progress.elapsed_seconds
        metric = self.objective.monitor.metric
        last = {f"last_{key}": value for key, value in evaluation_scalars(evaluation or {}).items()}
        return {
            "steps": self.progress.step,
            "tokens": self.progress.tokens_seen,
            "training_seconds": elapsed,
            "tokens_per_second": self.progress.tokens_seen / elapsed if elapsed else 0.0,
            "last_train_loss": train_rows[-1]["loss"] if train_rows else None,
            "monitor": metric,
            f"best_{metric}": self.progress.best_metric,
            **last,
            "skipped_steps": self.progress.skipped_steps,
            "stop_reason": self.stop_reason,
            "stop_signal": signal.Signals(self.stop_signal).name if self.stop_signal else None,
            "parameters": self.model.num_parameters(),
            "data": self._data_report(),
            "versions": software_versions(),
        }

    def _data_report(self) -> dict[str, int] | None:
        """What the training stream read (None where it is read in worker processes), said in one line."""
        report = getattr(self.train_batches, "report", None)
        if report is None:
            return None
        whole_documents = getattr(self.train_batches, "one_document_per_row", False) or getattr(self.train_batches, "pack_documents", False)
        rows = ""
        if report.rows:  # whole conversations in rows: how many share a row, and how much of a row they fill
            fill = report.row_tokens / (report.rows * (self.model.config.block_size + 1))
            rows = (f"; {report.row_documents:,} conversations laid out in {report.rows:,} rows "
                    f"({report.row_documents / report.rows:.2f} per row, {fill:.0%} of the rows' tokens)")
        log.info("Data: %s documents read, %s bad lines skipped%s%s", f"{report.documents:,}", f"{report.bad_lines:,}",
                 f", {report.truncated:,} cut to fit one row, {report.dropped:,} dropped (nothing to learn left after the cut), "
                 f"{report.no_assistant:,} left out (no assistant turn)" if whole_documents else "", rows)
        return {"documents": report.documents, "bad_lines": report.bad_lines, "truncated": report.truncated, "dropped": report.dropped,
                "no_assistant": report.no_assistant, "rows": report.rows, "row_documents": report.row_documents,
                "row_tokens": report.row_tokens}

    def stop_message(self) -> str:
        """One sentence on why the run ended and what to do next."""
        messages = {
            "max_steps": "Reached max_steps.",
            "max_time": "Reached the --max-time budget.",
            "early_stopping": f"Stopped early: {self.objective.monitor.metric} stopped improving.",
            "signal": "Stopped on request; continue with --resume.",
            "non_finite_loss": (
                f"Stopped: the loss or gradient was NaN/Inf for {MAX_CONSECUTIVE_BAD_STEPS} steps in a row. "
                "Lower the learning rate, keep gradient clipping on (--grad-clip 1.0), and check the data."
            ),
            "out_of_memory": (
                "Stopped with a checkpoint: a step ran out of memory even with a micro-batch of 1 "
                "(that step's batch was not trained on). Use --gradient-checkpointing, a smaller --block-size or model, "
                "or check the estimate with --dry-run, then --resume."
            ),
            "memory_limit": (
                f"Stopped with a checkpoint: system memory stayed above --max-memory {self.train_config.max_memory:g}%. "
                "Lower --batch-size or --block-size, or free memory, then --resume."
            ),
        }
        return messages.get(self.stop_reason or "", "Stopped.")

    # ----------------------------------------------------------------------------------------
    # status and signals

    def _write_status(self, state: str, message: str = "") -> None:
        if not self.is_main:
            return
        monitor = self.objective.monitor
        atomic_write_json(self.run_dir / "status.json", {
            "state": state, "pid": os.getpid(), "step": self.progress.step, "max_steps": self.train_config.max_steps,
            "updated_at": time.time(), "message": message, "monitor": {"metric": monitor.metric, "mode": monitor.mode},
            "versions": software_versions(),
        })

    def _catch_stop_signals(self) -> dict:
        """Ctrl-C or SIGTERM: finish the current step, save, and exit cleanly. A second one stops at once."""

        def request_stop(signum: int, _frame: Any) -> None:
            if self.requested_stop == "signal":
                raise KeyboardInterrupt
            self.requested_stop, self.stop_signal = "signal", signum
            log.warning("Received %s: saving a checkpoint after this step (press again to stop at once).", signal.Signals(signum).name)

        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[signum] = signal.signal(signum, request_stop)
            except ValueError:  # not in the main thread: leave signals alone
                pass
        return previous

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
