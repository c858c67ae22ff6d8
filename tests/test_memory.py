"""Memory: the estimate against what autograd saves and a real step's peak, gradient checkpointing,
--batch-size auto, out-of-memory backoff, --dry-run and the peak memory in the metrics."""

import contextlib
import json
import subprocess
import sys
import textwrap
import weakref

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from minigpt.cli.train import main as train_main
from minigpt.config import ModelConfig, RunConfig, TrainConfig, apply_overrides, preset_config
from minigpt.lora import LoRAConfig, apply_lora
from minigpt import loss as loss_module, memory
from minigpt.memory import DeviceMemory, PeakMemory, estimate_memory, process_memory, smallest_factor, split_batch
from minigpt.metrics import read_metrics
from minigpt.model import GPT
from minigpt.objective import LanguageModelObjective
from minigpt.optim import build_optimizer
from minigpt.runtime import autocast
from minigpt.tokenizer import load_tokenizer
from minigpt.trainer import Callback
from test_trainer import tiny


def saved_activation_bytes(model: GPT, tokens: torch.Tensor, dtype: torch.dtype, math_attention: bool = False) -> int:
    """Bytes autograd saves for the backward pass of a forward pass (under autocast unless float32),
    each storage once, weights and buffers left out (autocast's weight copies are in)."""
    known = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers()]}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in known:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    kernel = sdpa_kernel([SDPBackend.MATH]) if math_attention else contextlib.nullcontext()
    with kernel, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast(CPU, dtype):
        model(tokens[:, :-1], tokens[:, 1:], loss_reduction="sum")
    return sum(storages.values())


CPU = torch.device("cpu")
ALL_TARGETS, SOME_TARGETS = LoRAConfig(rank=4), LoRAConfig(rank=4, dropout=0.1, targets=("q", "o", "down"))


@pytest.mark.parametrize("dtype, block_size, dropout, lora, math_attention, checkpointing", [
    (torch.float32, 64, 0.0, None, False, False),
    (torch.float32, 64, 0.0, None, False, True),
    (torch.float32, 64, 0.0, None, True, False),  # --disable-optimizations: the attention weights are kept
    (torch.float32, 64, 0.1, None, False, False),  # dropout: masks, and a CPU attends by the math path
    (torch.bfloat16, 64, 0.0, None, False, False),  # a CPU attends over short blocks in float32
    (torch.bfloat16, 320, 0.0, None, False, False),  # ... and over long ones in bfloat16
    (torch.bfloat16, 320, 0.0, None, False, True),
    (torch.bfloat16, 320, 0.1, None, False, False),
    (torch.float32, 64, 0.0, ALL_TARGETS, False, False),
    (torch.bfloat16, 320, 0.0, ALL_TARGETS, False, True),
    (torch.float32, 320, 0.1, SOME_TARGETS, False, False),
    (torch.bfloat16, 64, 0.0, SOME_TARGETS, False, False),
])
def test_the_activation_terms_match_what_autograd_saves(dtype, block_size, dropout, lora, math_attention, checkpointing):
    config = RunConfig(model=ModelConfig(vocab_size=512, block_size=block_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                         dropout=dropout),
                       train=TrainConfig(disable_optimizations=math_attention, gradient_checkpointing=checkpointing))
    torch.manual_seed(0)
    model = GPT(config.model).train()
    model.gradient_checkpointing = checkpointing
    if lora:
        apply_lora(model, lora)
    tokens = torch.randint(0, 512, (2, block_size + 1))
    estimate = estimate_memory(model, config, batch_size=2, dtype=dtype, device=CPU)
    if checkpointing:  # the blocks' weight copies are made in the backward pass; the output head's is kept now
        expected = estimate.activations_checkpointed + (0 if dtype == torch.float32 else 2 * model.lm_head.weight.numel())
    else:
        expected = estimate.activations + estimate.weight_copies
    assert expected == pytest.approx(saved_activation_bytes(model, tokens, dtype, math_attention), rel=0.015)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loss_in_slices_keeps_no_log_probabilities(monkeypatch, dtype):
    """Past LOSS_CHUNK_BYTES the loss goes a slice at a time: the estimate drops the kept
    log-probabilities, as autograd does."""
    config = RunConfig(model=ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_BYTES", 4 * 512 * 32)  # 32 positions of logits at a time
    torch.manual_seed(0)
    model = GPT(config.model).train()
    estimate = estimate_memory(model, config, batch_size=2, dtype=dtype, device=CPU)
    assert estimate.loss_chunk == 32 and estimate.log_probabilities == 0
    tokens = torch.randint(0, 512, (2, 65))
    assert estimate.activations + estimate.weight_copies == pytest.approx(saved_activation_bytes(model, tokens, dtype), rel=0.015)


class LiveTensors(TorchDispatchMode):
    """The most bytes of tensors alive at once while it is active: each new storage an operation
    returns is counted until it is freed. Storages that existed before (the weights) are not."""

    def __init__(self, existing: list[torch.Tensor]):
        super().__init__()
        self.existing = {tensor.untyped_storage().data_ptr() for tensor in existing}
        self.sizes: dict[int, int] = {}
        self.alive = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(result):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.sizes and key not in self.existing:
                    self.sizes[key] = storage.nbytes()
                    self.alive += storage.nbytes()
                    weakref.finalize(storage, self.free, key)
        self.peak = max(self.peak, self.alive)
        return result

    def free(self, key: int) -> None:
        self.alive -= self.sizes.pop(key, 0)


@pytest.mark.parametrize("vocabulary", [512, 4096])
@pytest.mark.parametrize("dtype, checkpointing, accumulation, optimizer", [
    (torch.float32, False, 1, "adamw"), (torch.float32, True, 1, "adamw"), (torch.float32, False, 2, "adamw"),
    (torch.bfloat16, False, 1, "adamw"), (torch.bfloat16, True, 2, "adamw"), (torch.float32, False, 1, "muon"),
])
def test_the_tensor_peak_of_two_training_steps(vocabulary, dtype, checkpointing, accumulation, optimizer):
    config = apply_overrides(preset_config("tiny"), {"model.vocab_size": vocabulary, "model.block_size": 128, "model.n_embd": 128,
                                                     "train.gradient_accumulation_steps": accumulation, "train.optimizer": optimizer})
    torch.manual_seed(0)
    model = GPT(config.model)
    model.gradient_checkpointing = checkpointing
    optimizer = build_optimizer(model, config.train, "cpu")
    tokens = torch.randint(0, vocabulary, (4, 129))
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    live = LiveTensors([*model.parameters(), *model.buffers()])
    with live:
        for _ in range(2):  # the second step has the optimizer's state
            for _ in range(accumulation):
                with autocast(CPU, dtype):
                    loss = model(inputs, targets, loss_reduction="sum")[1] / targets.numel()
                loss.backward()
                del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    estimate = estimate_memory(model, config, 4, dtype, CPU)
    assert estimate.tensors(checkpointing) == pytest.approx(estimate.weights + live.peak, rel=0.1)


RUN_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from minigpt.config import apply_overrides, preset_config
    from minigpt.metrics import read_metrics
    from minigpt.run import plan_dry_run, prepare_run
    preset, batch, data, tokenizer, output = sys.argv[1:]
    config = apply_overrides(preset_config(preset), {
        "model.vocab_size": preset_config(preset).train.tokenizer_vocab_size, "train.batch_size": batch, "train.dtype": "float32",
        "train.data_files": [data], "train.tokenizer_path": tokenizer, "train.output_dir": output, "train.max_steps": 3,
        "train.log_steps": 1, "train.save_steps": 100, "train.val_fraction": 0.0, "train.sample_tokens": 0, "train.plot_loss": False})
    estimate = plan_dry_run(config).estimate  # what minigpt train --dry-run prints, then the run itself
    trainer = prepare_run(config, show_progress=False)
    trainer.train()
    peak = max(row["peak_rss_bytes"] for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row.get("type") == "train")
    print(json.dumps({"estimate": estimate.peak(False), "measured": peak}))
""")


@pytest.mark.parametrize("preset, batch", [("tiny", 8), pytest.param("small", 4, marks=pytest.mark.slow)])  # small: CI's slow stage
def test_the_dry_run_estimate_is_within_30_percent_of_a_real_runs_peak(preset, batch, tmp_path, corpus_jsonl, tokenizer_file):
    """A fresh process (its peak resident memory is its own) works out the dry-run's estimate, then
    trains three steps through prepare_run and reads the peak the run logs. The model has the
    preset's own vocabulary (the tokenizer here has 512 tokens; the logits do not care which are
    used); `small` runs at a micro-batch of 4 instead of 16 to keep the test short, where its
    activations are still a third of the peak."""
    result = subprocess.run([sys.executable, "-c", RUN_PEAK_SCRIPT, preset, str(batch), str(corpus_jsonl), str(tokenizer_file),
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    assert peaks["estimate"] == pytest.approx(peaks["measured"], rel=0.3), peaks


def loss_and_gradients(model: torch.nn.Module, tokens: torch.Tensor, dtype: torch.dtype = torch.float32,
                       seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    with autocast(CPU, dtype):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora, dtype, compiled", [
    (False, torch.float32, False), (True, torch.float32, False), (False, torch.bfloat16, False), (True, torch.bfloat16, False),
    (False, torch.float32, True), (True, torch.bfloat16, True),
])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(lora, dtype, compiled):
    """Recomputing each block in the backward pass (dropout replays its masks) changes no number:
    in float32 and under bfloat16 autocast, with LoRA, and compiled (the graph traced through the
    checkpoints by torch.compile's AOTAutograd, without a C compiler's wait) against plain eager.
    Compiled bfloat16 rounds in other places than eager bfloat16 does, checkpointing or not (0.6% of
    the largest gradient here): that case is held to bfloat16's precision."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, dropout=0.1)
    model = GPT(config)
    if lora:
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q", "v", "down")))
    tokens = torch.randint(0, 256, (3, 33))
    loss, gradients = loss_and_gradients(model, tokens, dtype)
    model.gradient_checkpointing = True
    if compiled:
        torch._dynamo.reset()
        checkpointed_loss, checkpointed_gradients = loss_and_gradients(torch.compile(model, backend="aot_eager"), tokens, dtype)
        checkpointed_gradients = {name.removeprefix("_orig_mod."): gradient for name, gradient in checkpointed_gradients.items()}
    else:
        checkpointed_loss, checkpointed_gradients = loss_and_gradients(model, tokens, dtype)
    torch.testing.assert_close(checkpointed_loss, loss)
    assert gradients.keys() == checkpointed_gradients.keys() and gradients
    for name, gradient in gradients.items():
        tolerance = dict(rtol=0.02, atol=0.02 * gradient.abs().max().item()) if compiled and dtype == torch.bfloat16 else {}
        torch.testing.assert_close(checkpointed_gradients[name], gradient, msg=name, **tolerance)


class StopAt(Callback):
    """Stops a run after `step` as Ctrl-C does: it saves a checkpoint, then stops."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, trainer, row):
        if row["step"] == self.step:
            trainer.stop_reason = "signal"


def test_a_checkpointed_run_resumes_exactly(tmp_path, corpus_jsonl, tokenizer_file):
    common = {"train.gradient_checkpointing": True, "model.dropout": 0.1, "train.max_steps": 4, "train.save_steps": 2,
              "train.log_steps": 1, "train.eval_steps": 100}
    straight = tiny(tmp_path, corpus_jsonl, tokenizer_file, "straight", **common)
    straight.train()
    stopped = tiny(tmp_path, corpus_jsonl, tokenizer_file, "stopped", **common)
    stopped.callbacks.append(StopAt(2))
    assert stopped.train()["steps"] == 2
    assert json.loads((stopped.run_dir / "config.json").read_text())["train"]["gradient_checkpointing"] is True
    resumed = tiny(tmp_path, corpus_jsonl, tokenizer_file, "stopped", **common,
                   **{"train.resume": str(stopped.run_dir / "checkpoint_step_2")})
    assert resumed.model.gradient_checkpointing
    resumed.train()
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(actual, expected), name


@pytest.mark.slow
def test_a_compiled_checkpointed_run_trains_as_the_eager_plain_run(tmp_path, corpus_jsonl, tokenizer_file, caplog):
    """--enable-compile with --gradient-checkpointing, compiled by inductor as a run compiles."""
    common = {"train.max_steps": 4, "train.log_steps": 1, "train.eval_steps": 100}
    plain = tiny(tmp_path, corpus_jsonl, tokenizer_file, "plain", **common)
    compiled = tiny(tmp_path, corpus_jsonl, tokenizer_file, "compiled", **common,
                    **{"train.compile": True, "train.gradient_checkpointing": True})
    torch._dynamo.reset()
    assert run_losses(compiled) == pytest.approx(run_losses(plain), rel=1e-4)
    assert "torch.compile failed" not in caplog.text


def test_splitting_a_batch_and_the_factor_that_keeps_the_global_batch():
    inputs, targets = torch.arange(12).view(6, 2), torch.arange(12, 24).view(6, 2)
    halves = split_batch((inputs, targets), 2)
    assert len(halves) == 2 and torch.equal(torch.cat([half[0] for half in halves]), inputs)
    assert torch.equal(split_batch({"x": inputs}, 3)[2]["x"], inputs[4:])
    assert [smallest_factor(n) for n in (1, 2, 8, 9, 6, 7)] == [1, 2, 2, 3, 2, 7]


class OneOutOfMemory(LanguageModelObjective):
    """Raises torch.OutOfMemoryError once, on the `at`-th call of loss (after earlier micro-batches' backward)."""

    def __init__(self, tokenizer, at: int):
        super().__init__(tokenizer, sample_tokens=0)
        self.calls, self.at = 0, at

    def loss(self, model, batch):
        self.calls += 1
        if self.calls == self.at:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        return super().loss(model, batch)


def run_losses(trainer) -> list[float]:
    trainer.train()
    return [row["loss"] for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row.get("type") == "train"]


def test_out_of_memory_backoff_continues_the_same_curve(tmp_path, corpus_jsonl, tokenizer_file):
    common = {"train.max_steps": 4, "train.log_steps": 1, "train.eval_steps": 100, "train.save_steps": 100}
    plain = tiny(tmp_path, corpus_jsonl, tokenizer_file, "plain",
                 **common, **{"train.batch_size": 4, "train.gradient_accumulation_steps": 4})
    expected = run_losses(plain)
    injected = tiny(tmp_path, corpus_jsonl, tokenizer_file, "injected",
                    **common, **{"train.batch_size": 8, "train.gradient_accumulation_steps": 2})
    # Step 2's second micro-batch (call 4) fails after the first one's backward.
    injected.objective = OneOutOfMemory(injected.tokenizer, at=4)
    losses = run_losses(injected)
    assert losses == pytest.approx(expected, rel=1e-5)
    rows = [row for row in read_metrics(injected.run_dir / "metrics.jsonl") if row.get("type") == "memory"]
    assert [row["message"] for row in rows] == ["reducing micro-batch from 8 to 4 (gradient accumulation 2 -> 4)"]
    saved = json.loads((injected.run_dir / "config.json").read_text())["train"]
    assert (saved["batch_size"], saved["gradient_accumulation_steps"]) == (4, 4)
    for (name, value), plain_value in zip(injected.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(value, plain_value, rtol=1e-4, atol=1e-6, msg=name)


def test_out_of_memory_at_micro_batch_one_saves_and_stops(tmp_path, corpus_jsonl, tokenizer_file):
    run = tiny(tmp_path, corpus_jsonl, tokenizer_file, "full", **{"train.batch_size": 1, "train.max_steps": 5, "train.save_steps": 100})
    run.objective = OneOutOfMemory(run.tokenizer, at=3)
    summary = run.train()
    assert summary["stop_reason"] == "out_of_memory" and summary["steps"] == 2
    assert (run.run_dir / "checkpoint_step_2").is_dir() and not (run.run_dir / "final_model").exists()
    assert "micro-batch of 1" in json.loads((run.run_dir / "status.json").read_text())["message"]


def test_auto_batch_size_is_printed_recorded_and_kept_by_a_resume(tmp_path, corpus_jsonl, tokenizer_file, capsys):
    """minigpt train --batch-size auto: the choice and its reason are printed and written to
    config.json; a resumed run, given the same command again, keeps the recorded micro-batch and
    accumulation (not the accumulation on the command line, which asked for the global batch) and
    ends bit-identical to a run started with those numbers."""
    command = ["--config", "tiny", "--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file), "--output-dir",
               str(tmp_path / "runs"), "--dtype", "float32", "--gradient-accumulation-steps", "2", "--save-steps", "2",
               "--log-steps", "1", "--eval-steps", "100", "--eval-batches", "1", "--sample-tokens", "0"]
    assert train_main([*command, "--run-name", "auto", "--batch-size", "auto", "--max-steps", "2"]) == 0
    saved = json.loads((tmp_path / "runs" / "auto" / "config.json").read_text())["train"]
    micro, accumulation = saved["batch_size"], saved["gradient_accumulation_steps"]
    assert micro * accumulation == 16  # the tiny preset's 8 sequences x the 2 micro-batches asked for
    printed = capsys.readouterr().out
    assert f"Batch size auto: micro-batch {micro} x accumulation {accumulation} = the global batch of 16 sequences" in printed
    assert "larger: " in printed
    rows = [row for row in read_metrics(tmp_path / "runs" / "auto" / "metrics.jsonl") if row.get("type") == "train"]
    assert rows and all(row["peak_rss_bytes"] > 0 for row in rows)

    assert train_main([*command, "--run-name", "auto", "--batch-size", "auto", "--max-steps", "4", "--resume"]) == 0
    assert "Batch size auto" not in capsys.readouterr().out  # measured once, at the start; the resume reads config.json
    assert train_main([*command, "--run-name", "straight", "--batch-size", str(micro), "--gradient-accumulation-steps",
                       str(accumulation), "--max-steps", "4"]) == 0
    resumed = load_file(tmp_path / "runs" / "auto" / "final_model" / "model.safetensors")
    straight = load_file(tmp_path / "runs" / "straight" / "final_model" / "model.safetensors")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[name], straight[name]) for name in resumed)

    capsys.readouterr()
    assert train_main([*command, "--run-name", "straight", "--batch-size", "auto", "--max-steps", "6", "--resume"]) == 2
    assert "chooses the micro-batch when a run starts" in capsys.readouterr().err  # a run started with a number stays with it


def test_auto_batch_size_stops_at_the_first_micro_batch_whose_estimate_does_not_fit(tokenizer_file, monkeypatch):
    config = apply_overrides(preset_config("tiny"), {"model.vocab_size": 4096, "model.block_size": 256, "model.n_embd": 128,
                                                     "train.batch_size": 8})
    model, objective = GPT(config.model), LanguageModelObjective(load_tokenizer(tokenizer_file))
    resident = process_memory(CPU, torch.float32)

    def need(batch: int) -> int:  # beyond what the process holds, as choose_micro_batch reckons it
        estimate = estimate_memory(model, config, batch, torch.float32, CPU, accumulation=8 // batch)
        return estimate.tensors(False) + estimate.allocator_slack - estimate.weights

    budget = DeviceMemory(int((need(2) + need(4)) / 2 / memory.FIT_MARGIN), "a test budget")  # 2 fits, 4 does not
    assert need(4) - need(2) > 40e6  # far more than the process's size moves between two readings
    monkeypatch.setattr(memory, "device_memory", lambda device, max_memory=0.0: budget)
    monkeypatch.setattr(memory, "time_micro_step", lambda model, objective, batch, *rest: 0.01)  # a larger batch always pays
    choice = memory.choose_micro_batch(model, objective, config, CPU, torch.float32)
    assert (choice.micro_batch, choice.accumulation) == (2, 4)
    assert "larger: 4 would need about" in choice.reason and "a test budget" in choice.reason
    assert process_memory(CPU, torch.float32) == pytest.approx(resident, rel=0.05)


def test_dry_run_prints_the_table_and_writes_no_run(tmp_path, tokenizer_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = ["--config", "tiny", "--tokenizer", str(tokenizer_file), "--output-dir", "runs", "--dry-run"]
    assert train_main([*command, "--gradient-checkpointing"]) == 0
    printed = capsys.readouterr().out
    for label in ("parameters", "weights", "gradients", "optimizer state", "activations", "loss backward", "block backward",
                  "process", "allocator slack", "peak (checkpointing)", "device", "step time"):
        assert label in printed
    assert "tokens per optimizer step" in printed and "s (" in printed
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as bad:
        train_main([*command, "--batch-size", "lots"])
    assert bad.value.code == 2 and "number or auto" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_peak_memory_reads_the_process_peak():
    peak = PeakMemory(torch.device("cpu"))
    block = torch.ones(64 * 2**20 // 4)  # 64 MB touched
    reading = peak.read_and_reset()["peak_rss_bytes"]
    del block
    assert reading > 64 * 2**20
