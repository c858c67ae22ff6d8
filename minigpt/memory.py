"""Memory that manages itself: the estimate before a run, the batch that fits, the backoff during one.

Where a training step's memory goes (float32 weights, AdamW), term by term as the dry-run prints it:

    weights              4 bytes per parameter (a LoRA run computing in bfloat16 keeps its frozen base
                         matrices in 2: lora.store_frozen_base)
    gradients            4 bytes per *trainable* parameter (LoRA: only the adapters); during the
                         backward pass only with gradient accumulation (earlier micro-batches' are kept)
    optimizer state      AdamW keeps two running averages per trainable parameter: 8 bytes
    weight copies        under bfloat16/float16 autocast, a 2-byte copy of every matrix the forward
                         pass multiplies with, kept for the backward pass
    activations          what the forward pass keeps for the backward pass; it grows with the tokens
                         of a micro-batch (batch x block), see `saved_bytes_per_token`
    loss backward        the backward pass starts with two float32 gradients as wide as the
                         vocabulary per token (of the log-probabilities, then of the logits); past
                         LOSS_CHUNK_BYTES of logits (Qwen's and Gemma's 150k-262k vocabularies)
                         the loss goes a slice of positions at a time (minigpt.loss): no
                         log-probabilities are kept, and the backward pass holds one slice's
                         (recomputed log-probabilities and two gradients)
    block backward       later, a block's backward pass holds two SwiGLU-wide gradients at once
    process              on a CPU, the process itself: Python, PyTorch, the tokenizer, the data
                         reader (measured, `process_memory`: 350-400 MB)
    allocator slack      on a CPU, the holes glibc's heap keeps between tensors (ALLOCATOR_SLACK_BLOCKS)

The peak is the largest of three moments (`MemoryEstimate.phases`): the start of the backward pass,
a block's backward pass, and the optimizer's update. So a 12M-parameter model needs about 16 bytes
x 12M = 190 MB before it sees a single token, and then (float32, with the slack) about 40 KB (tiny),
380 KB (small) or 560 KB (medium) more for every token of the micro-batch. Activations usually dominate; gradient checkpointing trades them for compute: each
block keeps only its input, and recomputes the rest in the backward pass (about a third more
compute, one block's activations alive at a time).

The tensor terms are derived from the shapes, tensor by tensor (no calibration); the tests check
them against what autograd really keeps (`torch.autograd.graph.saved_tensors_hooks`), against the
most bytes of tensors alive at once in real training steps, and the whole estimate against the
peak resident memory of a real run. The process is measured; the allocator slack is the one
measured constant (benchmarks/memory.py prints it for each run).

This module also holds the pieces the trainer uses when memory runs out mid-run (`split_batch`,
`resize_stream`, `smallest_factor`) and the per-interval peak memory it reports (`PeakMemory`).
"""

from __future__ import annotations

import dataclasses
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

from minigpt.config import ModelConfig, RunConfig, TrainConfig
from minigpt.data import ParallelBatches, RecordBatches, TokenBlockStream
from minigpt.errors import UserInputError
from minigpt.heads import GPTClassifier
from minigpt.lora import LoRALinear
from minigpt.loss import loss_chunk_positions
from minigpt.model import CPU_FLOAT32_ATTENTION_MAX_KEYS, GPT
from minigpt.objective import Batch, Objective
from minigpt.optim import build_optimizer, trained_by_muon
from minigpt.runtime import autocast, synchronize

log = logging.getLogger("minigpt.memory")

ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the size of its parameter
MUON_STATES = 1  # the momentum buffer, the size of its matrix (--optimizer muon, for the blocks' matrices)
FIT_MARGIN = 0.9  # plan for at most this share of the memory the device has free
THROUGHPUT_GAIN = 1.1  # a larger micro-batch must raise tokens/s by 10% to be worth its memory
PROBE_SECONDS = 10.0  # stop probing larger micro-batches once one takes longer than this


# ------------------------------------------------------------------------------------------------
# the estimate: the tensors of a training step

FLOAT32 = 4  # the residual stream, the normalisations and the loss stay float32 under autocast
TOKEN_ID = 8  # an int64 token id: the embedding keeps its input, the loss its targets


def attention_path(device: torch.device, dtype: torch.dtype, keys: int, dropout: float, disable_optimizations: bool) -> str:
    """Which attention computation a training step runs, which decides what it keeps for backward:

        fused           scaled_dot_product_attention's fused kernel: q, k, v, the output and one
                        log-sum-exp per head, in the compute precision
        fused float32   the same in float32: a CPU under bfloat16 autocast attends over short blocks
                        in float32 (model.CPU_FLOAT32_ATTENTION_MAX_KEYS)
        math            softmax(q k^T) v written out in float32, which keeps the attention weights,
                        `keys` numbers per head per token: --disable-optimizations, and a CPU with
                        attention dropout (its fused kernel has none)
    """
    if disable_optimizations or (device.type == "cpu" and dropout > 0):
        return "math"
    upcast = device.type == "cpu" and dtype != torch.float32 and keys <= CPU_FLOAT32_ATTENTION_MAX_KEYS
    return "fused float32" if upcast else "fused"


@dataclass(frozen=True)
class SavedPerToken:
    """Bytes autograd keeps for the backward pass, per token of a micro-batch."""

    block: int  # one transformer block
    checkpointed_block: int  # one block under gradient checkpointing: its input only
    output: int  # the embedding's input, the final norm, the output head and the loss
    first_block_less: int  # what the first block does not keep when the embedding is frozen (LoRA)


def trains(module: torch.nn.Module) -> bool:
    return any(parameter.requires_grad for parameter in module.parameters())


def linear_input_bytes(linears: list[torch.nn.Module], width: int, precision: int, compute: int, already_kept: bool = False) -> int:
    """Bytes per token that Linear layers reading the same input (`width` numbers per token, stored
    in `precision` bytes) keep of it for their weight gradients. A Linear keeps its input only when
    its weight trains; a LoRA layer keeps its adapter's input (whose A trains) and the rank-R middle
    (B's input), and with adapter dropout the mask and the dropped input. In float32 the layers share
    one tensor (nothing more if something else keeps it already); under autocast each Linear casts
    the input to the compute precision itself and keeps its own copy."""
    total, shared = 0, False
    for linear in linears:
        if isinstance(linear, LoRALinear):
            total += linear.lora_A.out_features * compute
            if linear.dropout.p > 0:
                total += width * (precision + compute)
                continue
        elif not linear.weight.requires_grad:
            continue
        if precision == compute:
            shared = True
        else:
            total += width * compute
    return total + (width * precision if shared and not already_kept else 0)


def saved_bytes_per_token(model: GPT, dtype: torch.dtype, path: str, language_model: bool = True) -> SavedPerToken:
    """What a training step keeps for the backward pass, tensor by tensor, per token.

    Follow one token through a Block (d = n_embd, kv = kv_heads * head_dim, h = hidden_dim, n =
    n_head). Under autocast the residual stream and the RMSNorms stay float32 (4 bytes) and the
    Linear layers compute in bfloat16/float16 (2 bytes, "c" below); in float32 c = 4:

        each RMSNorm (2)     its input x (4d), 1/rms (4) and x/rms (4d) for its gain's gradient
        q, k, v, gate, up    their input, the norm's output: one shared 4d tensor in float32; under
                             autocast each Linear keeps its own cast, c x d apiece
        attention            q, k, v (d + 2kv) and the output (d) in the attention's precision,
                             a log-sum-exp (4 bytes) per head; the math path adds the weights
                             (block_size per head) and keeps k, v widened to every head
        o_proj               the attention's output; a cast of it where that precision differs
        SwiGLU               gate(x) (silu's input), silu(gate) and up(x) (the product's inputs)
                             and the product (down_proj's input): 4h in c
        dropout (if > 0)     a mask as large as what it drops, on each residual branch

    float32 this is 4 x (8d + 2kv + 4h + n + 2) bytes. With gradient checkpointing a block keeps
    only its input (4d); in the backward pass one block at a time recomputes everything above.
    LoRA (frozen base, adapters) keeps about the same: the frozen Linear needs no input for its
    weight, but the adapter beside it keeps it, plus its rank-R middle.
    """
    config = model.config
    d, kv, h, heads, keys = config.n_embd, config.kv_heads * config.head_dim, config.hidden_dim, config.n_head, config.block_size
    parameter = next(model.parameters()).element_size()  # 4: the model's weights are float32
    compute = torch.empty((), dtype=dtype).element_size() if dtype != torch.float32 else parameter
    attention = compute if path == "fused" else FLOAT32
    dropout_masks = config.dropout > 0
    block = model.blocks[0]
    first_block_less = 0
    if trains(block):
        norms = sum(FLOAT32 * (d + 1) + (FLOAT32 * d if trains(norm) else 0) for norm in (block.attention_norm, block.mlp_norm))
        projections = block.attention
        inputs = (linear_input_bytes([projections.q_proj, projections.k_proj, projections.v_proj], d, FLOAT32, compute)
                  + linear_input_bytes([block.mlp.gate_proj, block.mlp.up_proj], d, FLOAT32, compute))
        if path == "math":  # q, k and v widened to every head; the weights (and dropout's mask, the dropped weights)
            kept = attention * (3 * d + heads * keys * (3 if dropout_masks else 1))
            output = linear_input_bytes([projections.o_proj], d, attention, compute)  # a contiguous copy of the output
        else:  # q, k, v, the output (o_proj's input), one log-sum-exp per head
            kept = attention * (2 * d + 2 * kv) + FLOAT32 * heads
            output = linear_input_bytes([projections.o_proj], d, attention, compute, already_kept=True)
        mlp = 3 * compute * h + linear_input_bytes([block.mlp.down_proj], h, compute, compute)
        masks = 2 * compute * d if dropout_masks else 0
        per_block = norms + inputs + kept + output + mlp + masks
        if not model.token_embedding.weight.requires_grad:
            # Nothing below the first block needs a gradient: its attention norm keeps nothing, nor
            # do adapter dropouts on that norm's output keep their masks.
            adapters = [linear for linear in (projections.q_proj, projections.k_proj, projections.v_proj)
                        if isinstance(linear, LoRALinear) and linear.dropout.p > 0]
            first_block_less = FLOAT32 * (d + 1) + (FLOAT32 * d if trains(block.attention_norm) else 0) + FLOAT32 * d * len(adapters)
            if path == "math":  # q @ k^T keeps q only for k's gradient, weights @ v the (dropped) weights only for v's
                first_block_less += (0 if trains(projections.k_proj) else attention * d)
                first_block_less += (0 if trains(projections.v_proj) or not dropout_masks else attention * heads * keys)
    else:  # a frozen trunk (a classifier's): nothing in it needs a gradient
        per_block = 0
    embedding = TOKEN_ID + (FLOAT32 * d if dropout_masks else 0) if model.token_embedding.weight.requires_grad else 0
    final_norm = FLOAT32 * (d + 1) + (FLOAT32 * d if trains(model.final_norm) else 0)
    if language_model:  # the output head's input, float32 log-probabilities over the vocabulary, the targets
        head = linear_input_bytes([model.lm_head], d, FLOAT32, compute) + FLOAT32 * config.vocab_size + TOKEN_ID
    else:  # a classifier's heads read one pooled vector per sequence
        head = 0
    return SavedPerToken(per_block, FLOAT32 * d if per_block else 0, embedding + final_norm + head, first_block_less)


def weight_copy_bytes(model: GPT, dtype: torch.dtype, gradient_checkpointing: bool, language_model: bool = True) -> int:
    """Autocast multiplies with low-precision copies of the weights (made once per forward pass and
    kept for the backward pass, which needs them for the inputs' gradients): c bytes for every
    Linear weight. With gradient checkpointing the blocks' copies are made again in the backward
    pass, one block at a time; the output head's stays."""
    if dtype == torch.float32:
        return 0
    element = torch.empty((), dtype=dtype).element_size()

    def linear_weights(module: torch.nn.Module) -> int:  # a weight stored in the compute dtype (a LoRA run's frozen base) needs no copy
        return sum(layer.weight.numel() for layer in module.modules() if isinstance(layer, torch.nn.Linear) and layer.weight.dtype != dtype)

    blocks = linear_weights(model.blocks[0]) * (1 if gradient_checkpointing else len(model.blocks))
    return element * (blocks + (model.lm_head.weight.numel() if language_model else 0))


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
    """Bytes of one training step, by kind; those that grow with the tokens are for the whole micro-batch."""

    parameters: ParameterCounts
    batch_size: int
    block_size: int
    dtype: torch.dtype
    accumulation: int
    attention: str  # attention_path()
    weights: int
    gradients: int
    optimizer_state: int
    weight_copies: int  # autocast's low-precision copies of the weights
    weight_copies_checkpointed: int
    activations: int  # what autograd keeps for the backward pass
    activations_checkpointed: int
    log_probabilities: int  # the part of `activations` the loss keeps, freed before the blocks' backward pass
    block: int  # one block's activations (recomputed in the backward pass under gradient checkpointing)
    block_gradients: int  # the most a block's backward pass holds at once: two SwiGLU-wide gradients per token
    loss_gradients: int  # the backward pass's first tensors: two vocabulary-wide float32 gradients per token
    allocator_slack: int  # a CPU heap's holes (ALLOCATOR_SLACK_BLOCKS blocks' activations; 0 elsewhere)
    process: int = 0  # the process without the model (process_memory; 0 on CUDA)
    loss_chunk: int = 0  # positions per slice when the loss is computed in slices (minigpt.loss); 0 = all at once

    def phases(self, gradient_checkpointing: bool) -> dict[str, int]:
        """Bytes alive at the three moments a step peaks, beyond the process itself:

            loss backward    every activation is still kept, and the loss's backward pass holds the
                             gradients of the log-probabilities and of the logits
            block backward   the log-probabilities are gone; a block's backward pass holds the
                             gradients of silu(gate) and of up(x) while its product's is still
                             alive (with checkpointing it has recomputed the block's activations too)
            update           AdamW reads every gradient and its two states

        Gradients are alive during the backward pass only when the step has several micro-batches
        (the earlier ones left theirs); with one, they appear as the activations go."""
        copies = self.weight_copies_checkpointed if gradient_checkpointing else self.weight_copies
        kept = self.activations_checkpointed if gradient_checkpointing else self.activations
        resident = self.weights + self.optimizer_state + copies + (self.gradients if self.accumulation > 1 else 0)
        recomputed = self.block if gradient_checkpointing else 0
        return {
            "loss backward": resident + kept + self.loss_gradients,
            "block backward": resident + kept - self.log_probabilities + recomputed + self.block_gradients,
            "update": self.weights + self.optimizer_state + self.gradients,
        }

    def tensors(self, gradient_checkpointing: bool) -> int:
        """The most bytes of tensors alive at once."""
        return max(self.phases(gradient_checkpointing).values())

    def peak(self, gradient_checkpointing: bool) -> int:
        """The process's peak memory: its own size, the tensors' peak and the allocator's slack."""
        return self.process + self.tensors(gradient_checkpointing) + self.allocator_slack


def estimate_memory(model: torch.nn.Module, config: RunConfig, batch_size: int, dtype: torch.dtype, device: torch.device,
                    process: int = 0, accumulation: int | None = None) -> MemoryEstimate:
    """The memory of a training step of `model` (it may live on the meta device: only shapes are read)
    at `batch_size` sequences per micro-batch and `accumulation` micro-batches per step (default:
    the configuration's), computing in `dtype` (autocast unless float32) on `device`; `process` is
    what the process holds without the model (see `process_memory`)."""
    train = config.train
    counts = count_parameters(model)
    parameter_bytes = next(model.parameters()).element_size()
    language_model = not isinstance(model, GPTClassifier)  # a classifier's heads are small: no vocabulary-sized logits
    path = attention_path(device, dtype, config.model.block_size, config.model.dropout, train.disable_optimizations)
    saved = saved_bytes_per_token(model, dtype, path, language_model)
    tokens = batch_size * config.model.block_size
    trainable = counts.trainable * parameter_bytes
    vocabulary = FLOAT32 * config.model.vocab_size if language_model and counts.trainable else 0
    layers = len(model.blocks)
    compute = torch.empty((), dtype=dtype).element_size() if dtype != torch.float32 else parameter_bytes
    # A large vocabulary's loss goes a slice at a time, recomputed in the backward pass: it keeps
    # only the head's float32 input, not the log-probabilities, the input's cast or the head's
    # weight copy, and the backward pass holds one slice's recomputed log-probabilities and two gradients.
    chunk = loss_chunk_positions(tokens, config.model.vocab_size) if language_model else tokens
    chunked = chunk < tokens
    width = config.model.n_embd
    head_input = linear_input_bytes([model.lm_head], width, FLOAT32, compute) if language_model else 0
    unkept = tokens * (FLOAT32 * config.model.vocab_size + head_input - FLOAT32 * width) if chunked else 0
    # The rotary angles of the step's positions (cos and sin, float32, one pair per kind of layer), kept by every layer.
    rotary = 2 * FLOAT32 * config.model.block_size * config.model.head_dim * len(set(config.model.layer_types) or {0}) if saved.block else 0
    return MemoryEstimate(
        parameters=counts, batch_size=batch_size, block_size=config.model.block_size, dtype=dtype,
        accumulation=accumulation or train.gradient_accumulation_steps, attention=path,
        weights=sum(parameter.numel() * parameter.element_size() for parameter in model.parameters()),  # a LoRA base may be bfloat16
        gradients=trainable, optimizer_state=parameter_bytes * sum(
            (MUON_STATES if train.optimizer == "muon" and trained_by_muon(name, parameter) else ADAMW_STATES) * parameter.numel()
            for name, parameter in model.named_parameters() if parameter.requires_grad),
        weight_copies=weight_copy_bytes(model, dtype, False, language_model and not chunked),
        weight_copies_checkpointed=weight_copy_bytes(model, dtype, True, language_model and not chunked),
        activations=tokens * (layers * saved.block + saved.output - saved.first_block_less) - unkept + rotary,
        activations_checkpointed=tokens * (layers * saved.checkpointed_block + saved.output) - unkept + rotary,
        log_probabilities=0 if chunked else tokens * vocabulary, block=tokens * saved.block,
        block_gradients=tokens * 2 * compute * config.model.hidden_dim,
        loss_gradients=chunk * 3 * vocabulary if chunked else tokens * 2 * vocabulary,
        allocator_slack=ALLOCATOR_SLACK_BLOCKS * tokens * saved.block if device.type == "cpu" else 0, process=process,
        loss_chunk=chunk if chunked else 0,
    )


# ------------------------------------------------------------------------------------------------
# the process around the tensors (CPU)

# On a CPU the process holds more than its live tensors at the peak: glibc's malloc serves tensors
# under 32 MB from one heap (minigpt.runtime.keep_freed_memory_for_reuse), where each step frees
# and allocates blocks of many sizes in a different order, so holes form that later tensors do not
# fit; the heap grows for the first few steps, then settles. benchmarks/memory.py measures this
# slack: 3.2 to 6.5 blocks' activations after six steps of small and medium at their preset batch
# (float32 and bfloat16, with and without checkpointing; tiny's are lost in the process's own
# noise), and almost none when every tensor over 1 MB gets pages of its own (steps about 20% slower).
ALLOCATOR_SLACK_BLOCKS = 4


def process_memory(device: torch.device, dtype: torch.dtype) -> int:
    """The resident memory of this process, once warmed up like a run: besides what it holds already
    (the interpreter, PyTorch, MiniGPT; in a dry-run also the tokenizer and a data reader that has
    read its first batch), the compiler stack that building AdamW imports (about 70 MB) and the CPU
    kernels' runtime that a first step starts (about 20 MB): one training step of a throwaway
    model of a few thousand parameters brings both in. On CUDA the budget is the GPU's memory,
    which none of this uses: 0."""
    if device.type == "cuda":
        return 0
    with torch.random.fork_rng():
        model = GPT(ModelConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
        optimizer = build_optimizer(model, TrainConfig(), "cpu")
        tokens = torch.randint(0, 64, (2, 9))
        with autocast(torch.device("cpu"), dtype):
            loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        optimizer.step()
    del model, optimizer, loss
    return psutil.Process().memory_info().rss


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
    resident = process_memory(device, dtype)  # the model's weights included
    chosen, best_rate, why = 0, 0.0, ""
    for candidate in divisors(global_batch):
        if device.type != "cuda":
            estimate = estimate_memory(model, config, candidate * objective.rows_per_example, dtype, device,
                                       accumulation=global_batch // candidate)
            estimate = dataclasses.replace(estimate, process=max(0, resident - estimate.weights))
            need = estimate.peak(train.gradient_checkpointing) - resident
            if need > FIT_MARGIN * budget.usable:
                why = f"{candidate} would need about {gb(need)} more, over {FIT_MARGIN:.0%} of {budget.description}"
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
    cannot. A TokenBlockStream hands out blocks in one fixed order whatever the batch size (records
    held in memory, RecordBatches, count their position in records), so two
    batches of 4 are exactly one batch of 8: the run sees the same data. Worker processes
    (ParallelBatches) hold their own copies of the stream, so once reading has begun they cannot
    change; the fixed batch of --overfit-batch cannot either."""
    if isinstance(stream, ParallelBatches) and stream.consumed == 0:
        stream = stream.stream
    if isinstance(stream, (TokenBlockStream, RecordBatches)):
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
    """The table `minigpt train --dry-run` prints: each term of the estimate, then the peaks."""
    train = config.train
    counts = estimate.parameters
    tokens_per_step = train.batch_size * train.gradient_accumulation_steps * estimate.block_size
    dtype = str(estimate.dtype).replace("torch.", "")
    accumulating = "alive through the backward pass: accumulation > 1" if estimate.accumulation > 1 else "made as activations go"
    rows = [
        ("parameters", f"{counts.total:,} ({counts.trainable:,} trainable, {counts.embedding:,} in the embedding)"),
        ("micro-batch", f"{estimate.batch_size} x {estimate.block_size} tokens, {dtype}, "
                        f"accumulation {estimate.accumulation}: {tokens_per_step:,} tokens per optimizer step"),
        ("weights", gb(estimate.weights)),
        ("gradients", f"{gb(estimate.gradients)} ({accumulating})"),
        ("optimizer state", f"{gb(estimate.optimizer_state)} " + (
            f"(Muon: {MUON_STATES} per value of the blocks' matrices, AdamW: {ADAMW_STATES} per other trainable parameter)"
            if train.optimizer == "muon" else f"(AdamW: {ADAMW_STATES} per trainable parameter)")),
    ]
    if estimate.weight_copies:
        rows.append(("weight copies", f"{gb(estimate.weight_copies)} ({dtype} autocast's, kept for the backward pass; "
                                      f"{gb(estimate.weight_copies_checkpointed)} with gradient checkpointing)"))
    rows += [
        ("activations", f"{gb(estimate.activations)} ({gb(estimate.activations_checkpointed)} with gradient checkpointing; "
                        f"attention: {estimate.attention})"),
        ("loss backward", f"{gb(estimate.loss_gradients)} (gradients of the log-probabilities and the logits, float32"
                          + (f"; the loss goes {estimate.loss_chunk} positions at a time)" if estimate.loss_chunk else ")")),
        ("block backward", f"{gb(estimate.block_gradients)} (a block's SwiGLU gradients; with checkpointing also its "
                           f"{gb(estimate.block)} of recomputed activations)"),
    ]
    if estimate.process:
        rows.append(("process", f"{gb(estimate.process)} (Python, PyTorch, MiniGPT, the tokenizer and data reader: measured)"))
    if estimate.allocator_slack:
        rows.append(("allocator slack", f"{gb(estimate.allocator_slack)} ({ALLOCATOR_SLACK_BLOCKS} blocks' activations: "
                                        "holes in the CPU's heap)"))
    for checkpointing in (False, True):
        phases = estimate.phases(checkpointing)
        chosen = " <- this run" if checkpointing == train.gradient_checkpointing else ""
        verdict = "fits" if probe_fits(estimate, budget, checkpointing) else "DOES NOT FIT"
        rows.append((f"peak{' (checkpointing)' if checkpointing else ''}",
                     f"{gb(estimate.peak(checkpointing))} at the {max(phases, key=phases.get)}: {verdict}{chosen}"))
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
    """Whether a run fits in what the device has: beyond the process it starts as (which the
    estimate measured here), its peak must stay under FIT_MARGIN of the memory still free."""
    return estimate.peak(gradient_checkpointing) - estimate.process <= FIT_MARGIN * budget.usable

