"""The decoding engine: many sequences decoded together, token ids in, token ids out.

The engine knows nothing of text: no tokenizer, no printing. A caller adds requests (a prompt's
ids and its sampling settings), calls `step()`, and gets back what each row produced in that
step. Text, stop strings and printing sit on top of it (minigpt/generation.py, minigpt/chat.py).

    engine = Engine(model)
    row = engine.add(Request(prompt_ids, SamplingConfig(max_new_tokens=50, temperature=0)))
    while engine.has_work:
        for event in engine.step():   # TokenEvent(row, token, finish)
            ...

Rows come and go between steps, as a server's requests would: `add` a new one while others
are half done, `cancel` one nobody waits for any more. Each row has its own prompt length,
sampling settings, seed, stop ids and token budget.

One step:
    1. Rows added since the last step are prefilled: their prompts, right-padded to the longest,
       go through the model in one forward pass that fills a fresh KV cache, which is then
       joined to the running batch's cache (KVCache.extend).
    2. Rows already decoding feed their newest token, one per row, each at its own position,
       its keys and values written in place into the cache (no tensor grows per token).
    3. The next-token distribution of every row is computed at once on the device
       (`next_token_probabilities`), and one token per row is drawn from it; when every row is
       greedy, each simply takes its most likely token (no distribution, no random numbers).
    4. Stops are checked for all rows at once, and the new tokens and stop flags come to the host
       in one transfer: one wait for the device per step, whatever the number of rows.
    5. Finished rows leave the batch (their cache rows are dropped).

The KV cache is sized for what the rows need, the longest prompt + new tokens among them, not
the model's whole window. The window still bounds each row: a prompt must leave room for at
least one new token (else UserInputError), and a row whose prompt + max_new_tokens would pass
the window is cut there and finishes with "length", like a row that used up max_new_tokens.

`Engine(model, use_kv_cache=False)` recomputes every row's whole context at every step: slower
(each token costs the whole prefix), the same tokens. It is kept as the reference the cache is
measured and checked against (`--no-kv-cache`, tutorial 7, benchmarks/generate_throughput.py).

`Engine(model, compile=True)` runs step 2 through torch.compile (see `compiled_decode_step`); the
tokens are the eager engine's. benchmarks/decode_vs_llama_cpp.py measures both against llama.cpp.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Literal, Sequence

import torch

from minigpt.errors import UserInputError
from minigpt.model import GPT, KVCache

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]  # a stop id was sampled / the token budget is used up


@dataclass
class SamplingConfig:
    """How one row picks its tokens. The knobs, applied in this order at every step:

        repetition_penalty  makes tokens already in the context less likely (> 1 discourages)
        temperature         sharpens (< 1) or flattens (> 1) the distribution; 0 means greedy
        top_k               keeps only the k most likely tokens
        top_p               keeps the smallest set of tokens whose probabilities add up to p
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering
    repetition_penalty: float = 1.0  # 1.0 = no penalty
    seed: int | None = None  # None = a different sample each call (drawn from torch's global generator)
    stop_ids: tuple[int, ...] = ()  # the row ends at any of these (the stop token is not returned)


@dataclass(frozen=True)
class Request:
    """What to decode: a prompt's token ids and how to sample the continuation."""

    prompt_ids: Sequence[int]
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass(frozen=True)
class TokenEvent:
    """What one row did in one step.

    `token` is the new token id, or None when the row sampled one of its stop ids (the stop id
    is not passed on, as it is not part of the text). `finish` is None while the row goes on, and
    says why on the row's last event: "stop" or "length".
    """

    row: int
    token: int | None
    finish: FinishReason | None = None


@dataclass
class _Row:
    """The engine's host-side record of one row."""

    id: int
    prompt_ids: list[int]
    sampling: SamplingConfig
    budget: int  # how many tokens it may still produce in all: max_new_tokens, cut at the window
    generator: torch.Generator  # the row's own random stream: its tokens do not depend on its neighbours
    generated: int = 0

    @property
    def length(self) -> int:
        """Tokens in the row's context so far: the prompt and what it generated."""
        return len(self.prompt_ids) + self.generated

    @property
    def capacity(self) -> int:
        """The most positions the row will ever hold: its prompt and all of its budget."""
        return len(self.prompt_ids) + self.budget


class BatchSampling:
    """The sampling settings of a batch of rows as tensors on the device, one entry per row,
    plus what the host knows without asking the device (which filters any row uses at all)."""

    def __init__(self, settings: Sequence[SamplingConfig], vocab_size: int, device: torch.device):
        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]  # (rows, 1): broadcasts over the vocabulary

        self.temperature = column([s.temperature for s in settings])
        self.top_p = column([s.top_p for s in settings])
        self.repetition_penalty = column([s.repetition_penalty for s in settings])
        # top_k = 0 or >= vocab_size keeps every token: written as vocab_size so one rule covers all rows.
        top_k = [s.top_k if 0 < s.top_k < vocab_size else vocab_size for s in settings]
        self.top_k = torch.tensor(top_k, dtype=torch.long, device=device)[:, None]
        self.largest_top_k = max((k for k in top_k if k < vocab_size), default=0)  # 0: no row filters by top-k
        self.uses_top_p = any(s.top_p < 1.0 for s in settings)
        self.uses_penalty = any(s.repetition_penalty != 1.0 for s in settings)
        self.uses_greedy = any(s.temperature == 0 for s in settings)
        self.all_greedy = bool(settings) and all(s.temperature == 0 for s in settings)  # then no row needs a distribution
        # Stop ids as a (rows, most stop ids) table, padded with -1 (never a token), to test all rows at once.
        widest = max((len(s.stop_ids) for s in settings), default=0)
        table = [list(s.stop_ids) + [-1] * (widest - len(s.stop_ids)) for s in settings]
        self.stop_ids = torch.tensor(table, dtype=torch.long, device=device).view(len(settings), widest)


def penalised(logits: torch.Tensor, seen: torch.Tensor | None, sampling: BatchSampling) -> torch.Tensor:
    """The logits (rows, vocab) in float32, with each row's repetition penalty applied to the tokens
    `seen` (rows, vocab, bool) marks as already in its context (None when no row uses a penalty)."""
    logits = logits.float()
    if sampling.uses_penalty and seen is not None:
        # CTRL-style: shrink positive logits and push negative ones further down for seen tokens.
        penalty = sampling.repetition_penalty
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    return logits


def next_token_probabilities(logits: torch.Tensor, seen: torch.Tensor | None, sampling: BatchSampling) -> torch.Tensor:
    """Next-token probabilities (rows, vocab) from the logits (rows, vocab) of a batch of rows, each
    row with its own settings. `seen` (rows, vocab, bool) marks the tokens already in each row's
    context, for the repetition penalty (None when no row uses one)."""
    logits = penalised(logits, seen, sampling)
    greedy = sampling.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, sampling.temperature)
    if sampling.largest_top_k:
        # Each row's k-th largest logit, from one top-k of the largest k any row asks for.
        top_values = torch.topk(scaled, sampling.largest_top_k, dim=-1).values
        kth_largest = top_values.gather(-1, sampling.top_k.clamp(max=sampling.largest_top_k) - 1)
        kth_largest = torch.where(sampling.top_k < logits.size(-1), kth_largest, float("-inf"))  # top_k off: keep all
        scaled = scaled.masked_fill(scaled < kth_largest, float("-inf"))
    probabilities = torch.softmax(scaled, dim=-1)
    if sampling.uses_top_p:
        sorted_probabilities, order = torch.sort(probabilities, dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already cover top_p (rows with top_p = 1 keep all).
        drop = (sorted_probabilities.cumsum(dim=-1) - sorted_probabilities >= sampling.top_p) & (sampling.top_p < 1.0)
        sorted_probabilities = sorted_probabilities.masked_fill(drop, 0.0)
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
        probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
    if sampling.uses_greedy:  # temperature 0: all the probability on the (penalised) largest logit
        one_hot = torch.zeros_like(probabilities).scatter(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
        probabilities = torch.where(greedy, one_hot, probabilities)
    return probabilities


def next_token_distribution(logits: torch.Tensor, context: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities for the next token of one row from a 1-D logits vector; `context` is the ids so far.

    The one-row view of `next_token_probabilities`, the function the engine calls for a whole batch.
    """
    seen = torch.zeros(1, logits.numel(), dtype=torch.bool, device=logits.device)
    seen[0, context.long()] = True
    return next_token_probabilities(logits[None], seen, BatchSampling([sampling], logits.numel(), logits.device))[0]


def draw(probabilities: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row (rows,), by inverse transform sampling: lay the tokens' probabilities end
    to end on [0, total] and pick the token under uniforms[row] * total.

    Each uniform is in (0, 1], so the point is in (0, total] and the first token whose running
    sum reaches it has a probability above zero: a filtered-out token is never drawn.
    """
    cumulative = probabilities.cumsum(dim=-1)
    points = uniforms[:, None] * cumulative[:, -1:]
    return torch.searchsorted(cumulative, points).squeeze(-1).clamp(max=probabilities.size(-1) - 1)


def decode_logits(model: GPT, newest: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """The tensor work of one decoding step: logits (rows, vocab) for each row's newest token
    (rows, 1) at `positions` (rows, 1), its keys and values written into `cache` (already begun).
    A function of its own so that Engine(compile=True) can compile exactly this."""
    return model.lm_head(model.trunk(newest, positions.unsqueeze(1), cache)[:, -1])


# How inductor compiles the decoding step on a CPU. `freezing` treats the weights as constants,
# which lets `max_autotune` lay each weight matrix out for the C++ matrix kernels it generates
# (the CPP backend) instead of calling MKL's, whose one-row products stream a (out, in) matrix at
# half the memory bandwidth on some CPUs. The `small` preset, one row, 1 thread on a 2-core AMD
# EPYC (AVX-512): eager 115 tokens/s, compiled 135, frozen and autotuned 220. The autotuner's
# timings per matrix shape are not printed (they would fill the user's terminal).
CPU_DECODE_COMPILATION = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                          "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}

# One compiled step per model, shared by its engines (a chat's fresh engine per reply compiles
# nothing new): the model's parameters, their version counters when it was compiled, the step.
_compiled_steps: weakref.WeakKeyDictionary[GPT, tuple[list[torch.nn.Parameter], list[int], Callable[..., torch.Tensor]]] = (
    weakref.WeakKeyDictionary())


def compiled_decode_step(model: GPT) -> Callable[..., torch.Tensor]:
    """`decode_logits` through torch.compile for `model`: compiled at its first call (tens of
    seconds on a small CPU, less when inductor's on-disk cache has the kernels), again for a new
    batch size or cache capacity. On a CPU the weights are frozen into the compiled step
    (CPU_DECODE_COMPILATION): a step is compiled afresh when any weight changed in place since
    (training, load_state_dict), which each parameter's version counter tells, after
    torch.compiler.reset(). If compilation fails (no C compiler, say), it says so once and the step
    runs eagerly."""
    known = _compiled_steps.get(model)
    if known is not None:
        if [parameter._version for parameter in known[0]] == known[1]:
            return known[2]
        # torch.compile keeps its compiled graphs per function, not per torch.compile call: only
        # clearing them all makes the next call compile with the new weights (other compiled code in
        # this process, a compiled training model say, compiles again at its next call too).
        log.info("The model's weights changed since its decoding step was compiled: compiling it again.")
        torch.compiler.reset()
    import torch._inductor.config as inductor_config  # imported with the first compilation, not with the engine

    parameters = list(model.parameters())
    versions = [parameter._version for parameter in parameters]
    compiled = torch.compile(decode_logits, fullgraph=True)
    settings = CPU_DECODE_COMPILATION if parameters[0].device.type == "cpu" else {}

    def step(model: GPT, newest: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        try:
            with inductor_config.patch(settings):
                return compiled(model, newest, positions, cache)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: decode eagerly
            log.warning("torch.compile failed (%s); decoding without compilation.", str(error).splitlines()[0])
            _compiled_steps[model] = parameters, versions, decode_logits
            return decode_logits(model, newest, positions, cache)

    _compiled_steps[model] = parameters, versions, step
    return step


class Engine:
    """Decodes a changing batch of rows with one model: `add`, `cancel`, `step`, or `generate`.

    Row ids are given out by `add` and never reused. The batch's tensors (the KV cache, each row's
    tokens, the sampling settings) hold the decoding rows in the order of `self.rows`.
    """

    def __init__(self, model: GPT, use_kv_cache: bool = True, compile: bool = False):
        self.model = model
        self.use_kv_cache = use_kv_cache
        # compile=True: the decoding step (the model's trunk and head for one token per row) runs
        # through torch.compile (`compiled_decode_step`), over a cache whose shapes stay fixed while
        # the rows do (static_shapes). It pays the compilation first (tens of seconds on a small CPU;
        # again when the rows or the cache size change, after which the sizes are compiled as
        # symbolic) to save time at every token: worth it for long or many generations, measured in
        # benchmarks/decode_vs_llama_cpp.py. Opt-in (`minigpt generate --compile`).
        if compile and not use_kv_cache:
            raise ValueError("Engine(compile=True) compiles the KV-cache decoding step; it needs use_kv_cache=True.")
        self.compile = compile
        self.device = next(model.parameters()).device
        self.pending: list[_Row] = []  # added, prefilled at the next step
        self._mode_to_restore: bool | None = None  # the model's training flag, while the engine holds it in eval mode
        self.rows: list[_Row] = []  # decoding, in the order of the batch tensors below
        self._next_id = 0
        self._clear_batch()

    def _clear_batch(self) -> None:
        self.cache: KVCache | None = None  # (rows, ..., capacity, ...) with the cache; None without
        self.tokens = torch.zeros(0, 1, dtype=torch.long, device=self.device)  # (rows, capacity): prompt + generated
        self.lengths = torch.zeros(0, dtype=torch.long, device=self.device)  # (rows,): tokens filled in each row
        self.seen: torch.Tensor | None = None  # (rows, vocab) bool, only while a row uses a repetition penalty
        self.sampling = BatchSampling([], self.model.config.vocab_size, self.device)

    # ---------------------------------------------------------------- rows in, rows out

    def add(self, request: Request) -> int:
        """Queue a row for decoding (prefilled at the next `step`); return its row id."""
        prompt, sampling, window = list(request.prompt_ids), request.sampling, self.model.config.block_size
        if not prompt:
            raise UserInputError("Generation needs at least one prompt token (for example the end-of-text id).")
        if len(prompt) >= window:
            raise UserInputError(f"The prompt is {len(prompt)} tokens; this model reads at most {window - 1}.")
        if sampling.max_new_tokens < 1:
            raise UserInputError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}.")
        # Without a seed the row still gets a generator of its own, seeded from torch's global one.
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        budget = min(sampling.max_new_tokens, window - len(prompt))  # the window cuts a row at its end
        row = _Row(self._next_id, prompt, sampling, budget, generator)
        self._next_id += 1
        self.pending.append(row)
        return row.id

    def cancel(self, row_id: int) -> bool:
        """Stop decoding a row now (it yields no more events); False if it was not running."""
        waiting = [row for row in self.pending if row.id != row_id]
        kept = [index for index, row in enumerate(self.rows) if row.id != row_id]
        found = len(waiting) < len(self.pending) or len(kept) < len(self.rows)
        self.pending = waiting
        if len(kept) < len(self.rows):
            self._keep(kept)
        if not self.has_work:
            self._restore_mode()
        return found

    @property
    def has_work(self) -> bool:
        """Whether a row is waiting or decoding."""
        return bool(self.pending or self.rows)

    # ---------------------------------------------------------------- one step

    def step(self) -> list[TokenEvent]:
        """Produce one token for every row (prefilling new ones first); return one event per row."""
        if not self.has_work:
            return []
        # Evaluation mode (no dropout) from the first step until the batch empties, then the mode
        # the model had is restored: switching every module back and forth at each step costs time.
        if self._mode_to_restore is None:
            self._mode_to_restore = self.model.training
            self.model.eval()
        try:
            with torch.no_grad():
                if self.use_kv_cache:
                    logits = [self._decode_with_cache()] if self.rows else []
                    if self.pending:
                        logits.append(self._prefill_pending())
                    logits = torch.cat(logits)
                else:
                    self._join_pending()
                    logits = self._recompute()
                events = self._sample_and_finish(logits)
        except BaseException:
            self._restore_mode()
            raise
        if not self.has_work:
            self._restore_mode()
        return events

    def _restore_mode(self) -> None:
        if self._mode_to_restore is not None:
            self.model.train(self._mode_to_restore)
            self._mode_to_restore = None

    def _decode_with_cache(self) -> torch.Tensor:
        """Logits (rows, vocab) after feeding each decoding row's newest token at its own position."""
        newest = self.tokens.gather(1, (self.lengths - 1)[:, None])  # (rows, 1)
        positions = self.cache.begin(1)  # the host-side bookkeeping stays out of a compiled step
        step = compiled_decode_step(self.model) if self.compile else decode_logits
        logits = step(self.model, newest, positions, self.cache)
        self.cache.end(1)
        return logits

    def _prefill_pending(self) -> torch.Tensor:
        """Run the waiting rows' prompts, right-padded, through the model into a cache of their own,
        join them to the batch, and return the logits (new rows, vocab) at each prompt's last token."""
        rows, self.pending = self.pending, []
        prompts = self._padded([row.prompt_ids for row in rows], max(len(row.prompt_ids) for row in rows))
        cache = KVCache(self.model.config, len(rows), max(row.capacity for row in rows), self.device,
                        self.model.token_embedding.weight.dtype, static_shapes=self.compile)
        hidden = self.model.hidden_states(prompts, cache)
        # The cache counted the padding as filled: each row's length is its prompt, so the padding's
        # slots are masked, then overwritten by the row's own next tokens.
        cache.set_lengths([len(row.prompt_ids) for row in rows])
        last = torch.tensor([len(row.prompt_ids) - 1 for row in rows], device=self.device)
        logits = self.model.lm_head(hidden[torch.arange(len(rows), device=self.device), last])
        self._join(rows, prompts)
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.extend(cache)
        return logits

    def _join_pending(self) -> None:
        """Without a cache there is no prefill: waiting rows simply join the batch's token table."""
        if self.pending:
            rows, self.pending = self.pending, []
            self._join(rows, self._padded([row.prompt_ids for row in rows], max(len(row.prompt_ids) for row in rows)))

    def _recompute(self) -> torch.Tensor:
        """Without a cache: run every row's whole context (right-padded; causal attention keeps the
        padding after a row's end out of its real positions) and take the logits at its last token."""
        longest = max(row.length for row in self.rows)
        hidden = self.model.hidden_states(self.tokens[:, :longest])
        return self.model.lm_head(hidden[torch.arange(len(self.rows), device=self.device), self.lengths - 1])

    def _sample_and_finish(self, logits: torch.Tensor) -> list[TokenEvent]:
        """Draw one token per row, check stops for all rows at once, wait for the device once,
        then turn the results into events and drop the rows that finished."""
        if self.sampling.all_greedy:  # every row takes its most likely token: no distribution, no random numbers
            next_ids = penalised(logits, self.seen, self.sampling).argmax(dim=-1)
        else:
            probabilities = next_token_probabilities(logits, self.seen, self.sampling)
            # One uniform number per row from the row's own generator: (0, 1], see `draw`.
            uniforms = torch.cat([1.0 - torch.rand(1, generator=row.generator, device=self.device) for row in self.rows])
            next_ids = draw(probabilities, uniforms)
        stopped = (next_ids[:, None] == self.sampling.stop_ids).any(dim=-1)
        # Append the new tokens on the device (harmless for the rows about to finish).
        self.tokens.scatter_(1, self.lengths[:, None], next_ids[:, None])
        self.lengths = self.lengths + 1
        if self.seen is not None:
            self.seen.scatter_(1, next_ids[:, None], True)
        tokens, stops = torch.stack([next_ids, stopped.long()]).tolist()  # the step's one host-device sync
        events, keep = [], []
        for index, (row, token, stop) in enumerate(zip(self.rows, tokens, stops)):
            if stop:
                events.append(TokenEvent(row.id, None, "stop"))
                continue
            row.generated += 1
            if row.generated >= row.budget:
                events.append(TokenEvent(row.id, token, "length"))
            else:
                events.append(TokenEvent(row.id, token))
                keep.append(index)
        if len(keep) < len(self.rows):
            self._keep(keep)
        return events

    # ---------------------------------------------------------------- the batch's tensors

    def _padded(self, sequences: list[list[int]], width: int) -> torch.Tensor:
        """The sequences as one (rows, width) tensor, right-padded with zeros (any id would do: masked)."""
        table = torch.zeros(len(sequences), width, dtype=torch.long)
        for index, sequence in enumerate(sequences):
            table[index, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        return table.to(self.device)

    def _join(self, rows: list[_Row], prompts: torch.Tensor) -> None:
        """Append `rows` (their prompts as a right-padded table) to the batch's tensors."""
        capacity = max(row.capacity for row in self.rows + rows)
        pad = torch.nn.functional.pad
        self.tokens = torch.cat([pad(self.tokens, (0, capacity - self.tokens.size(1))),
                                 pad(prompts, (0, capacity - prompts.size(1)))])
        self.lengths = torch.cat([self.lengths, torch.tensor([row.length for row in rows], device=self.device)])
        self.rows = self.rows + rows
        self._rows_changed(joined=rows)

    def _keep(self, indices: list[int]) -> None:
        """Keep only the batch rows at `indices`: the others finished or were cancelled."""
        self.rows = [self.rows[index] for index in indices]
        if not self.rows:
            self._clear_batch()
            return
        capacity = max(row.capacity for row in self.rows)
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        self.tokens = self.tokens.index_select(0, index)[:, :capacity]
        self.lengths = self.lengths.index_select(0, index)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, index)
        if self.cache is not None:  # a compiled step keeps the cache's size: a new size would be a new compilation
            self.cache.keep_rows(indices, None if self.compile else capacity)
        self._rows_changed()

    def _rows_changed(self, joined: Sequence[_Row] = ()) -> None:
        """Rebuild the per-row settings; keep the seen-token table while any row has a repetition penalty."""
        vocab_size = self.model.config.vocab_size
        self.sampling = BatchSampling([row.sampling for row in self.rows], vocab_size, self.device)
        if not self.sampling.uses_penalty:
            self.seen = None
            return
        if self.seen is None or self.seen.size(0) != len(self.rows) - len(joined):  # (re)build from the tokens
            self.seen = torch.zeros(len(self.rows), vocab_size, dtype=torch.bool, device=self.device)
            rows = range(len(self.rows))
        else:  # extend with the new rows
            self.seen = torch.cat([self.seen, self.seen.new_zeros(len(joined), vocab_size)])
            rows = range(len(self.rows) - len(joined), len(self.rows))
        for index in rows:
            self.seen[index, self.tokens[index, : self.rows[index].length]] = True

    # ---------------------------------------------------------------- the convenience loop

    def generate(self, requests: Iterable[Request]) -> Iterator[TokenEvent]:
        """Add `requests` and step until every row (these and any added meanwhile) has finished,
        yielding the events as they come. Row ids follow the order of the requests."""
        for request in requests:
            self.add(request)
        while self.has_work:
            yield from self.step()
