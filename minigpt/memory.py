"""Memory that manages itself: the estimate before a run, the batch that fits, the backoff during one.

Where a training step's memory goes (float32 weights, AdamW):

    weights              4 bytes per parameter
    gradients            4 bytes per *trainable* parameter (LoRA: only the adapters)
    optimizer state      AdamW keeps two running averages per trainable parameter: 8 bytes
    activations          what the forward pass saves for the backward pass; it grows with the
                         tokens of a micro-batch (batch x block), see `activation_elements`
    backward working     the backward pass of the loss holds three vocabulary-wide float32 tensors
                         per token at once (see `loss_elements`), and that of each block the
                         gradients of its activations, one block's worth at a time

So a 12M-parameter model needs about 16 bytes x 12M = 190 MB before it sees a single token, and
then ~100-400 KB more for every token of the micro-batch. Activations usually dominate; gradient
checkpointing trades them for compute: each block keeps only its input, and recomputes the rest
in the backward pass (about a third more compute, one block's activations alive at a time).

The estimate is derived from the shapes (no calibration), and checked by the tests against what
autograd really saves (`torch.autograd.graph.saved_tensors_hooks`) and against the peak resident
memory of a real step.

This module also holds the pieces the trainer uses when memory runs out mid-run (`split_batch`,
`resize_stream`, `smallest_factor`) and the per-interval peak memory it reports (`PeakMemory`).
"""

from __future__ import annotations

import logging
import math
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from minigpt.config import ModelConfig, RunConfig
from minigpt.data import ParallelBatches, TokenBlockStream
from minigpt.errors import UserInputError
from minigpt.model import GPT
from minigpt.objective import Batch, Objective
from minigpt.runtime import autocast, synchronize

log = logging.getLogger("minigpt.memory")

ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of its parameter
FIT_MARGIN = 0.9  # plan for at most this share of the memory the device has free
THROUGHPUT_GAIN = 1.1  # a larger micro-batch must raise tokens/s by 10% to be worth its memory
PROBE_SECONDS = 10.0  # stop probing larger micro-batches once one takes longer than this


# ------------------------------------------------------------------------------------------------
# the estimate


def activation_elements(config: ModelConfig) -> tuple[int, int]:
    """(per layer, per layer with gradient checkpointing) elements saved for backward, per token.

    Follow one token through a Block (d = n_embd, kv = kv_heads * head_dim, h = hidden_dim) and
    count what autograd keeps for the backward pass:

        attention_norm   its input x and its output (the q/k/v projections' input)     2d
        attention        rotated q (d), rotated k and v (2 kv), the attention output
                         (d) and its contiguous copy, the o_proj input (d)            3d + 2kv
        mlp_norm         its input (the new residual stream) and its output            2d
        SwiGLU           gate(x) (silu's input), silu(gate) and up(x) (the product's
                         inputs), and the product (down_proj's input)                   4h
                                                                              = 7d + 2kv + 4h

    A frozen Linear (LoRA's base) needs only its weight for the input's gradient, but the
    adapter beside it saves the same input, so LoRA changes little. Not counted: the attention's
    log-sum-exp (n_head numbers per token), dropout masks (1 byte per element, dropout > 0 only).

    With gradient checkpointing each block saves only its input (d); during the backward pass
    one block at a time recomputes its full 7d + 2kv + 4h.
    """
    d, kv, h = config.n_embd, config.kv_heads * config.head_dim, config.hidden_dim
    return 7 * d + 2 * kv + 4 * h, d


def loss_elements(config: ModelConfig) -> tuple[int, int]:
    """(saved, transient) float32 elements per token at the output: the final norm's input and
    output (2d) and the log-softmax of the logits (vocab) are saved; the backward pass of the
    log-softmax then holds three more vocabulary-wide tensors at once: the incoming gradient, the
    softmax exp(log-softmax) and the logits' gradient it produces (3 x vocab)."""
    return 2 * config.n_embd + config.vocab_size, 3 * config.vocab_size


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    trainable: int
    embedding: int


def count_parameters(model: torch.nn.Module) -> ParameterCounts:
    """Parameters counted once each (tied embeddings share one matrix)."""
    parameters = list(model.parameters())  # .parameters() already yields a shared tensor once
    embedding = model.token_embedding.weight.numel() if isinstance(model, GPT) else 0
    return ParameterCounts(sum(p.numel() for p in parameters), sum(p.numel() for p in parameters if p.requires_grad), embedding)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes of one training step, by kind. `activations` are for the whole micro-batch."""

    parameters: ParameterCounts
    batch_size: int
    block_size: int
    dtype: torch.dtype
    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_checkpointed: int
    backward_working: int

    def peak(self, gradient_checkpointing: bool) -> int:
        """Everything alive at the start of the backward pass of a step's last micro-batch: the
        gradients of the earlier micro-batches are there already, all activations are still saved."""
        activations = self.activations_checkpointed if gradient_checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer_state + activations + self.backward_working


def estimate_memory(model: torch.nn.Module, config: ModelConfig, batch_size: int, dtype: torch.dtype) -> MemoryEstimate:
    """The memory of a training step of `model` (it may live on the meta device: only shapes are read).

    Under autocast (bfloat16/float16) the blocks' activations are stored in that type, 2 bytes an
    element; the loss is computed in float32 whatever the precision.
    """
    counts = count_parameters(model)
    parameter_bytes = next(model.parameters()).element_size()
    tokens = batch_size * config.block_size
    per_layer, per_layer_checkpointed = activation_elements(config)
    saved_loss, transient_loss = loss_elements(config)
    item = torch.empty((), dtype=dtype).element_size()
    float32 = 4
    trainable_bytes = counts.trainable * parameter_bytes
    return MemoryEstimate(
        parameters=counts, batch_size=batch_size, block_size=config.block_size, dtype=dtype,
        weights=counts.total * parameter_bytes,
        gradients=trainable_bytes,
        optimizer_state=ADAMW_STATES * trainable_bytes,
        activations=tokens * (config.n_layer * per_layer * item + saved_loss * float32),
        activations_checkpointed=tokens * ((config.n_layer * per_layer_checkpointed + per_layer) * item + saved_loss * float32),
        backward_working=tokens * (transient_loss * float32 + per_layer * item),
    )


# ------------------------------------------------------------------------------------------------
# what the device has


@dataclass(frozen=True)
class DeviceMemory:
    usable: int  # bytes a run may still take
    description: str


def device_memory(device: torch.device, max_memory_percent: float = 0.0) -> DeviceMemory:
    """What a run may use: CUDA, the GPU's free memory; a CPU (and MPS, whose memory is the
    system's), the available RAM, and with --max-memory only what keeps system memory under it."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return DeviceMemory(free, f"CUDA {gb(free)} free of {gb(total)}")
    system = psutil.virtual_memory()
    usable, description = system.available, f"RAM {gb(system.available)} available of {gb(system.total)}"
    if max_memory_percent:
        # psutil's percent is (total - available) / total: stay under the limit.
        ceiling = int(system.total * max_memory_percent / 100) - (system.total - system.available)
        usable = max(0, min(usable, ceiling))
        description += f", {gb(usable)} under --max-memory {max_memory_percent:g}%"
    return DeviceMemory(usable, description)


def gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------------
# probes: one real micro-step


def time_micro_step(model: torch.nn.Module, objective: Objective, batch_size: int, block_size: int,
                    device: torch.device, dtype: torch.dtype) -> float:
    """Seconds of one forward and backward pass at this micro-batch (after one warm-up pass).

    The model runs with dropout off and the random number generators forked, and its gradients
    are cleared afterwards, so a probe before training leaves the run exactly as it was.
    """
    batch = objective.to_device(objective.example_batch(batch_size, block_size), device)
    was_training = model.training
    model.train(False)
    seconds = math.inf
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for _ in range(2):
                start = time.perf_counter()
                with autocast(device, dtype):
                    loss = objective.loss(model, batch)
                loss.backward()
                synchronize(device)
                seconds = time.perf_counter() - start
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return seconds


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int
    accumulation: int
    reason: str


def divisors(number: int) -> list[int]:
    return [candidate for candidate in range(1, number + 1) if number % candidate == 0]


def choose_micro_batch(model: torch.nn.Module, objective: Objective, config: RunConfig, device: torch.device,
                       dtype: torch.dtype) -> BatchChoice:
    """--batch-size auto: the micro-batch to train with, and the accumulation that keeps the global
    batch (batch_size x gradient_accumulation_steps sequences of the configuration) unchanged.

    Candidates are the divisors of the global batch, smallest first. A candidate must fit: on CUDA
    it is tried (an out-of-memory error ends the search); elsewhere its estimated peak must stay
    under FIT_MARGIN of the memory available (and --max-memory). Of those that fit, the search
    stops where doubling the work no longer raises tokens/s by THROUGHPUT_GAIN: a CPU is often
    as fast at 4 sequences as at 32, and the smaller micro-batch leaves memory for everything else.
    """
    train, block = config.train, config.model.block_size
    global_batch = train.batch_size * train.gradient_accumulation_steps
    budget = device_memory(device, train.max_memory)
    chosen, best_rate, why = 0, 0.0, ""
    for candidate in divisors(global_batch):
        if device.type != "cuda":
            peak = estimate_memory(model, config.model, candidate, dtype).peak(train.gradient_checkpointing)
            if peak > FIT_MARGIN * budget.usable:
                why = f"{candidate} would need about {gb(peak)}, over {FIT_MARGIN:.0%} of {budget.description}"
                break
        try:
            seconds = time_micro_step(model, objective, candidate, block, device, dtype)
        except torch.OutOfMemoryError:
            seconds = math.nan  # handled below, outside the except block that holds the failed tensors
        if math.isnan(seconds):
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            why = f"{candidate} ran out of memory ({budget.description})"
            break
        rate = candidate * block / seconds
        log.info("auto batch size: micro-batch %d: %s tokens/s", candidate, f"{rate:,.0f}")
        if chosen and rate < THROUGHPUT_GAIN * best_rate:
            why = f"{candidate} was no faster ({rate:,.0f} against {best_rate:,.0f} tokens/s)"
            break
        chosen, best_rate = candidate, rate
        if seconds > PROBE_SECONDS:
            why = f"a micro-batch of {candidate} already takes {seconds:.0f} s"
            break
    if not chosen:
        raise UserInputError(f"Even a micro-batch of 1 does not fit: {why}; use a smaller model or --block-size.")
    why = why or f"it is the whole global batch of {global_batch}"
    return BatchChoice(chosen, global_batch // chosen,
                       f"micro-batch {chosen} x accumulation {global_batch // chosen} = the global batch of {global_batch} "
                       f"sequences ({global_batch * block:,} tokens) per step; larger: {why}")


# ------------------------------------------------------------------------------------------------
# backing off when a step runs out of memory


def smallest_factor(number: int) -> int:
    """The smallest prime factor of number (2 for even numbers; number itself for a prime; 1 for 1):
    dividing the micro-batch by it and multiplying the accumulation by it keeps their product."""
    return next((factor for factor in range(2, math.isqrt(number) + 1) if number % factor == 0), number)


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`parts` equal micro-batches cut from a batch along its first (batch) dimension, in order.
    A batch is a tensor or a tuple, list or dict of them (whatever an objective's stream yields)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.chunk(parts))
    if isinstance(batch, dict):
        pieces = {key: split_batch(value, parts) for key, value in batch.items()}
        return [{key: value[index] for key, value in pieces.items()} for index in range(parts)]
    if isinstance(batch, (tuple, list)):
        return [type(batch)(items) for items in zip(*(split_batch(item, parts) for item in batch))]
    raise TypeError(f"cannot split a batch of type {type(batch).__name__}")


def resize_stream(stream: Any, batch_size: int) -> bool:
    """Make a training stream yield micro-batches of `batch_size` from its next batch on; False if it
    cannot. A TokenBlockStream hands out blocks in one fixed order whatever the batch size, so two
    batches of 4 are exactly one batch of 8: the run sees the same data. Worker processes
    (ParallelBatches) hold their own copies of the stream, so once reading has begun they cannot
    change; the fixed batch of --overfit-batch cannot either."""
    if isinstance(stream, ParallelBatches) and stream.consumed == 0:
        stream = stream.stream
    if isinstance(stream, TokenBlockStream):
        stream.batch_size = batch_size
        return True
    return False


# ------------------------------------------------------------------------------------------------
# peak memory per log interval

PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"  # written to clear_refs, Linux resets the process's peak resident size (VmHWM)


class PeakMemory:
    """The highest memory use since the last reading: `peak_rss_bytes` of the process, and on CUDA
    `peak_accelerator_allocated_bytes` (tensors) and `peak_accelerator_reserved_bytes` (what
    PyTorch's caching allocator holds; what the GPU really gives up).

    On Linux the peak resident size is VmHWM in /proc/self/status, reset after each reading;
    elsewhere it is getrusage's ru_maxrss, the peak over the whole life of the process.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.linux = platform.system() == "Linux" and PROC_STATUS.exists()
        self.reset()

    def reset(self) -> None:
        if self.linux:
            try:
                PROC_CLEAR_REFS.write_text(RESET_PEAK_RSS)
            except OSError:  # not permitted here: VmHWM stays the lifetime peak
                pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def rss_peak(self) -> int:
        if self.linux:
            for line in PROC_STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
        maximum = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maximum if platform.system() == "Darwin" else maximum * 1024  # macOS: bytes; Linux, BSD: kB

    def read_and_reset(self) -> dict[str, int]:
        peaks = {"peak_rss_bytes": self.rss_peak()}
        if self.device.type == "cuda":
            peaks["peak_accelerator_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
            peaks["peak_accelerator_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        self.reset()
        return peaks


# ------------------------------------------------------------------------------------------------
# the dry-run report


def dry_run_report(estimate: MemoryEstimate, config: RunConfig, budget: DeviceMemory,
                   micro_step_seconds: float | None, optimizer_seconds: float | None = None) -> str:
    """The table `minigpt train --dry-run` prints."""
    train = config.train
    counts = estimate.parameters
    tokens_per_step = train.batch_size * train.gradient_accumulation_steps * estimate.block_size
    dtype = str(estimate.dtype).replace("torch.", "")
    rows = [
        ("parameters", f"{counts.total:,} ({counts.trainable:,} trainable, {counts.embedding:,} in the embedding)"),
        ("micro-batch", f"{estimate.batch_size} x {estimate.block_size} tokens, {dtype}, "
                        f"accumulation {train.gradient_accumulation_steps}: {tokens_per_step:,} tokens per optimizer step"),
        ("weights", gb(estimate.weights)),
        ("gradients", gb(estimate.gradients)),
        ("optimizer state", f"{gb(estimate.optimizer_state)} (AdamW: {ADAMW_STATES} per trainable parameter)"),
        ("activations", f"{gb(estimate.activations)} ({gb(estimate.activations_checkpointed)} with gradient checkpointing)"),
        ("backward working", f"{gb(estimate.backward_working)} (the loss's and one block's gradients)"),
    ]
    for checkpointing in (False, True):
        peak = estimate.peak(checkpointing)
        chosen = " <- this run" if checkpointing == train.gradient_checkpointing else ""
        verdict = "fits" if peak <= FIT_MARGIN * budget.usable else "DOES NOT FIT"
        rows.append((f"peak{' (checkpointing)' if checkpointing else ''}", f"{gb(peak)}: {verdict}{chosen}"))
    rows.append(("device", budget.description))
    if micro_step_seconds is None:
        rows.append(("step time", "not measured (--dry-run-no-probe, or the step does not fit)"))
    else:
        step = train.gradient_accumulation_steps * micro_step_seconds + (optimizer_seconds or 0.0)
        rows.append(("step time", f"about {step:.2f} s ({tokens_per_step / step:,.0f} tokens/s) from one timed micro-step"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def time_optimizer_step(optimizer: torch.optim.Optimizer, model: torch.nn.Module, device: torch.device) -> float:
    """Seconds of one AdamW update on zero gradients (its state is created by a first, untimed one).
    For the dry-run only: it changes the weights (weight decay), so run it on a throwaway model."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    seconds = math.inf
    for _ in range(2):
        start = time.perf_counter()
        optimizer.step()
        synchronize(device)
        seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds


def probe_fits(estimate: MemoryEstimate, budget: DeviceMemory, gradient_checkpointing: bool) -> bool:
    return estimate.peak(gradient_checkpointing) <= FIT_MARGIN * budget.usable

