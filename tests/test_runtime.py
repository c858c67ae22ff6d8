"""Device, precision, threads and compilation choices."""

import json
import logging
import os
import platform
import random

import numpy
import pytest
import torch

from minigpt import run as run_module
from minigpt.config import ModelConfig, apply_overrides, preset_config
from minigpt.errors import UserInputError
from minigpt.model import GPT
from minigpt.run import prepare_run
from minigpt.runtime import (
    available_cpu_cores, compile_mode, compile_model, configure_threads, rng_state, select_device, select_dtype,
    set_rng_state,
)


def test_device_and_dtype_choices_on_this_machine():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="no CUDA GPU"):
            select_device("cuda")
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16 and select_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(UserInputError, match="float16 training is not supported on the CPU"):
        select_dtype("float16", torch.device("cpu"))
    with pytest.raises(UserInputError, match="Unknown dtype 'half'"):
        select_dtype("half", torch.device("cpu"))


@pytest.mark.parametrize("faster", [torch.float32, torch.bfloat16])
def test_auto_precision_on_a_cpu_is_the_measured_one_and_recorded(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch, faster):
    """On a CPU, --dtype auto is decided by timing this very model in both precisions (select_dtype
    alone only gives float32 until then); the run computes in the faster one and records it in
    config.json, so a resumed run computes exactly as this one did."""
    probes = []

    def timed(model, loss_of):  # stands in for the timing, which depends on the CPU and its load
        loss = loss_of(model)
        probes.append(loss)
        return faster

    monkeypatch.setattr(run_module, "fastest_cpu_dtype", timed)
    config = apply_overrides(preset_config("tiny"), {
        "train.data_files": [str(corpus_jsonl)], "train.tokenizer_path": str(tokenizer_file), "train.device": "cpu",
        "train.dtype": "auto", "train.output_dir": str(tmp_path / "runs"), "train.run_name": "auto", "train.val_fraction": 0.1})
    trainer = prepare_run(config, show_progress=False)
    (loss,) = probes
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad  # the probe timed a real training loss
    assert trainer.dtype == faster
    assert json.loads((trainer.run_dir / "config.json").read_text())["train"]["dtype"] == str(faster).removeprefix("torch.")


def test_threads_follow_the_available_cores():
    cores = available_cpu_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    previous = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert configure_threads(0) == cores
    finally:
        torch.set_num_threads(previous)


def test_compile_modes_per_device():
    assert compile_mode(torch.device("cuda")) == "max-autotune"
    assert compile_mode(torch.device("cpu")) == "default"
    assert compile_mode(torch.device("cpu"), "reduce-overhead") == "reduce-overhead"


def test_rng_state_round_trip():
    state = rng_state()
    first = (torch.rand(3), random.random(), numpy.random.rand())
    set_rng_state(state)
    second = (torch.rand(3), random.random(), numpy.random.rand())
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]


def test_a_failing_compiler_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss_of(probe):
        return probe(tokens[:, :-1], tokens[:, 1:])[1]


    def broken_compile(module, mode="default"):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor exploded")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    assert compile_model(model, lambda runner: runner(tokens, tokens)[1]) is model
    assert "torch.compile failed (inductor exploded)" in caplog.text


def test_cpu_precision_is_float32_without_fast_bfloat16_and_measured_with_it(monkeypatch, caplog):
    from minigpt import runtime

    caplog.set_level(logging.INFO, logger="minigpt.runtime")
    model = GPT(ModelConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16))
    tokens = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))

    def loss_of(probe):
        return probe(tokens[:, :-1], tokens[:, 1:])[1]

    monkeypatch.setattr(runtime, "cpu_bfloat16_units", lambda: None)
    assert runtime.fastest_cpu_dtype(model, loss_of) == torch.float32
    assert "no bfloat16 matrix instructions" in caplog.text
    monkeypatch.setattr(runtime, "cpu_bfloat16_units", lambda: "AMX")
    monkeypatch.setattr(runtime, "PROBE_ROUNDS", (4, 4))  # real timings on a shared machine rarely repeat within 10%
    state = torch.get_rng_state()
    assert runtime.fastest_cpu_dtype(model, loss_of) in (torch.float32, torch.bfloat16)  # which one depends on the CPU
    assert torch.equal(state, torch.get_rng_state())  # the measurement draws nothing from the run's generator
    assert "ms in float32" in caplog.text


class NoisyClock:
    """A stand-in for runtime's `time` module: each probe step takes its true cost in its precision
    times the machine's load at that moment. `load(step)` is the slowdown of the step-th step."""

    def __init__(self, float32_ms: float, bfloat16_ms: float, load):
        self.now, self.steps = 0.0, 0
        self.cost = {False: float32_ms / 1000, True: bfloat16_ms / 1000}
        self.load = load

    def perf_counter(self) -> float:
        return self.now

    def step(self) -> None:
        self.now += self.cost[torch.is_autocast_enabled("cpu")] * self.load(self.steps)
        self.steps += 1


def random_spikes(seed: int):
    """Another process takes the core during about a third of the steps, slowing them 2-10x."""
    draws = random.Random(seed)
    return lambda step: (1 + draws.uniform(1, 9) if draws.random() < 0.35 else 1.0) * draws.uniform(0.95, 1.05)


def busy_then_idle(step: int) -> float:
    """A load that ends while the probe runs: the first steps are five times slower."""
    return 5.0 if step < 4 else 1.0


def idle_then_busy(step: int) -> float:
    return 1.0 if step < 4 else 5.0


@pytest.mark.parametrize("float32_ms, bfloat16_ms, expected", [
    (24, 53, torch.float32),  # the tiny run: conversions cost more than bfloat16 saves
    (100, 95, torch.float32),  # a win within the noise is no win
    (100, 45, torch.bfloat16),  # a CPU with bfloat16 units on a large model
])
def test_auto_cpu_precision_does_not_follow_timing_noise(monkeypatch, caplog, float32_ms, bfloat16_ms, expected):
    """--dtype auto on a CPU with bfloat16 units measures the step in both precisions: the same
    model on the same CPU must get the same precision whether the machine is idle, busy in bursts,
    or busy during one part of the measurement (issue #33: 492 vs 481 ms, then 24 vs 53 ms)."""
    from minigpt import runtime

    caplog.set_level(logging.INFO, logger="minigpt.runtime")
    model = torch.nn.Linear(2, 1)  # the clock says what a step costs; the probe's own work is kept trivial
    monkeypatch.setattr(runtime, "cpu_bfloat16_units", lambda: "AMX")
    loads = [lambda step: 1.0, busy_then_idle, idle_then_busy] + [random_spikes(seed) for seed in range(30)]
    choices = []
    for load in loads:
        clock = NoisyClock(float32_ms, bfloat16_ms, load)
        monkeypatch.setattr(runtime, "time", clock)

        def loss_of(probe):
            clock.step()
            return probe.weight.sum()

        choices.append(runtime.fastest_cpu_dtype(model, loss_of))
    assert choices == [expected] * len(loads)
    assert f"{float32_ms:.0f} ms in float32" in caplog.text  # the log says what was measured


def test_a_probe_of_big_steps_stops_early_when_the_answer_is_clear_and_leaves_the_model_as_it_came(monkeypatch):
    """A 135M model's float32 step takes seconds (34 s on a 2-core EPYC): the probe stops after
    about PROBE_SECONDS once bfloat16 is under half of float32's time, instead of the 4 to 20 rounds
    a millisecond step gets; and it runs on the model itself, so it must leave no gradients behind."""
    from minigpt import runtime

    model = torch.nn.Linear(2, 1)
    model.train(True)
    monkeypatch.setattr(runtime, "cpu_bfloat16_units", lambda: "AMX")
    clock = NoisyClock(6_000, 2_000, lambda step: 1.0)
    monkeypatch.setattr(runtime, "time", clock)

    def loss_of(probe):
        assert not probe.training  # no dropout while timing
        clock.step()
        return probe.weight.sum()

    assert runtime.fastest_cpu_dtype(model, loss_of) == torch.bfloat16
    assert clock.steps == 2 + 2 * 2  # the warm-up pair, then two rounds: 16 s of timed steps passed the 10 s budget
    assert model.training and all(parameter.grad is None for parameter in model.parameters())
    clock = NoisyClock(34_000, 3_300, lambda step: 1.0)  # steps longer than the budget: the warm-up pair says it already
    monkeypatch.setattr(runtime, "time", clock)
    assert runtime.fastest_cpu_dtype(model, loss_of) == torch.bfloat16 and clock.steps == 2


def test_malloc_tuning_applies_on_glibc_and_is_skipped_elsewhere(monkeypatch):
    from minigpt import runtime

    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.keep_freed_memory_for_reuse() is on_glibc  # glibc accepted both thresholds
    monkeypatch.setattr(platform, "libc_ver", lambda: ("musl", "1.2"))
    assert runtime.keep_freed_memory_for_reuse() is False


def test_resume_with_dtype_auto_keeps_the_recorded_precision(tmp_path, corpus_jsonl, tokenizer_file, monkeypatch):
    """A resumed run computes in the precision its start chose, even when --dtype auto is given
    again and a new measurement would choose the other one."""
    from conftest import run_in_process

    choices = iter([torch.bfloat16, torch.float32])
    monkeypatch.setattr(run_module, "fastest_cpu_dtype", lambda model, loss_of: next(choices))
    run = ["--config", "tiny", "--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file), "--output-dir", "runs",
           "--run-name", "auto", "--val-fraction", "0.1", "--dtype", "auto", "--device", "cpu", "--eval-steps", "100",
           "--sample-tokens", "0", "--set", "model.n_layer=1", "--block-size", "16", "--batch-size", "2"]
    assert run_in_process("train", *run, "--max-steps", "2", cwd=tmp_path).returncode == 0
    resumed = run_in_process("train", *run, "--max-steps", "3", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())["train"]["dtype"] == "bfloat16"
