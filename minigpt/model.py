"""The MiniGPT model: a decoder-only transformer, written out in full.

Read it top to bottom:
    RMSNorm            -> normalises each token's vector (cheaper than LayerNorm, no mean, no bias)
    rotary embeddings  -> tell attention where each token is by rotating queries and keys
    CausalSelfAttention-> each token looks at the tokens before it (grouped-query heads optional)
    GatedMLP           -> each token thinks on its own through a gated feed-forward network
    Block              -> pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))
    GPT                -> embeddings, a stack of blocks, a final norm, and the output head

The layout follows Llama (pre-norm RMSNorm, rotary positions, SwiGLU, no biases, tied
embeddings), so exporting to the Hugging Face `LlamaForCausalLM` layout is a renaming of tensors.

The same model runs the pretrained families MiniGPT loads (minigpt/families.py: Llama 3, Qwen2,
Qwen3, Gemma 3). Each of their differences is a switch of `ModelConfig`, off by default, and each
place that reads one says which family needs it and why: q/k/v biases (Qwen2), RMSNorm on each
head's queries and keys (Qwen3, Gemma 3), a (1 + w) norm gain, norms after attention and the MLP,
a GeLU gate, scaled embeddings, a query scale of its own and sliding-window layers (Gemma 3), and
rescaled rotary frequencies (Llama 3's `llama3`, Gemma 3's `linear`).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minigpt.config import ModelConfig
from minigpt.loss import chunked_next_token_loss, loss_chunk_positions, next_token_loss

CPU_FLOAT32_ATTENTION_MAX_KEYS = 256  # under bfloat16 autocast a CPU attends over this many keys or fewer in float32


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned per-channel gain."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        # Gemma stores the gain as an offset from 1: it scales by (1 + weight), so its weights start at 0.
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            # Gemma: normalised and scaled in float32, then rounded once to x's dtype, as transformers does.
            normalised = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
            return (normalised * (1.0 + self.weight.float())).type_as(x)
        # x / sqrt(mean(x^2) + eps) * weight, fused into one kernel by PyTorch.
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rotary_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device: torch.device | None = None) -> torch.Tensor:
    """The turning speed (radians per position) of each of a head's head_dim/2 channel pairs.

    Channel pair i rotates at frequency theta^(-2i/head_dim): fast-turning pairs tell nearby
    positions apart, slow-turning pairs tell far ones apart. `scaling` (a Hugging Face
    `rope_scaling`) slows the pairs down for contexts longer than the model was first trained on.
    """
    frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "linear":  # Gemma 3's global layers: every position divided by `factor`
        return frequencies / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1+: pairs that turn less than once per low_freq_factor-th of the original context
        # slow down by `factor`, pairs turning faster than high_freq_factor times keep their speed,
        # and the ones between blend the two smoothly.
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        original = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / frequencies
        slowed = torch.where(wavelength > original / low, frequencies / factor, frequencies)
        blend = (original / wavelength - low) / (high - low)
        smoothed = (1 - blend) * slowed / factor + blend * slowed
        between = (wavelength >= original / high) & (wavelength <= original / low)
        return torch.where(between, smoothed, slowed)
    return frequencies


def rotary_angles(positions: torch.Tensor, frequencies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (*positions.shape, head_dim) for tokens at `positions`.

    Computed for the positions a forward pass needs rather than kept as tables of block_size rows:
    a 128k-position Llama 3 would otherwise hold 64 MB of tables, and the products are the same
    float32 numbers either way.
    """
    angles = positions.float()[..., None] * frequencies.float()  # (..., head_dim/2), float32 even in a bfloat16 model
    angles = torch.cat([angles, angles], dim=-1)  # the two halves of a head share frequencies
    return angles.cos(), angles.sin()


def rotary_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions 0..length-1, shape (length, head_dim) (figures and tests draw them)."""
    return rotary_angles(torch.arange(length), rotary_frequencies(head_dim, theta))


def attention_mask(positions: torch.Tensor, keys: int, window: int = 0) -> torch.Tensor:
    """True where a query at `positions` (..., time) may see key slot j of 0..keys-1: j <= its
    position (causal) and, with a `window`, j among the latest `window` positions (a sliding-window layer)."""
    slots = torch.arange(keys, device=positions.device)
    visible = slots <= positions[..., None]
    if window:
        visible &= slots > positions[..., None] - window
    return visible


def packed_attention_mask(positions: torch.Tensor, window: int = 0) -> torch.Tensor:
    """(batch, 1, time, time): True where query slot i of a row may see key slot j, for rows that
    hold several sequences one after the other (packed chat fine-tuning), each numbered from
    position 0 (`positions`, (batch, time)).

    A sequence starts at slot i - positions[i], so slot j is visible when it lies in the query's
    own sequence and not after it: i - positions[i] <= j <= i. The mask is block-diagonal and
    lower-triangular within each block: no token sees another conversation. Each query sees at
    least itself, so no row of the softmax is empty. With a `window` (a sliding-window layer),
    j must also be among the latest `window` slots, as `attention_mask` does for a cache.
    """
    slots = torch.arange(positions.size(-1), device=positions.device)
    queries = slots[:, None]
    visible = (slots <= queries) & (slots >= (queries - positions[..., None]))
    if window:
        visible &= slots > queries - window
    return visible.unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x[i], x[i + d/2]) channel pair of x (batch, heads, time, d) by its position's angle.

    cos and sin are (time, d) when every row sits at positions 0..time-1 (training), or
    (batch, 1, time, d) when each token has a position of its own (decoding with a KV cache, or
    rows packed with several conversations, each starting at position 0).

    Because q and k are both rotated, their dot product depends only on the distance between
    two positions, which is exactly what attention needs to know.
    """
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return x * cos + rotated_half * sin


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float | None) -> torch.Tensor:
    """Attention for one new token per row (a decoding step), written out: q (batch, heads, 1,
    head_dim) over the cache's k, v (batch, kv_heads, keys, head_dim), `mask` (batch, 1, 1, keys)
    True where the query sees a key. The same numbers as F.scaled_dot_product_attention, whose CPU
    kernel works in blocks sized for many queries: for one query it cost 66 µs per layer in float32
    and 140 µs in bfloat16 (the `small` preset, 192 keys), where this, compiled, costs a few."""
    batch, heads, _, head_dim = q.shape
    kv_heads = k.size(1)
    # The query heads that share a key/value head (grouped-query attention) side by side: (batch, kv_heads, group, head_dim).
    q = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = (q @ k.transpose(-1, -2)).float() * (head_dim ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask.view(batch, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(batch, heads, 1, head_dim)


class KVCache:
    """Keys and values of past positions, one pair of tensors per layer, for fast generation.

    Without a cache every new token recomputes attention inputs for the whole prefix; with it,
    each step computes keys and values for the new tokens only and stores them here.

    The cache holds a batch of rows, and each row is at its own position: `lengths[row]` says how
    many positions of that row are filled. A forward pass writes row r's new tokens at positions
    lengths[r], lengths[r] + 1, ... (their rotary angles too, see GPT.hidden_states), and a query
    at position p sees that row's keys 0..p only: the slots past a row's end (unwritten, or a
    padding token's) never leak into it. The lengths are kept on the host too, so the sizes of a
    step are known without waiting for the device. The cache is sized by `capacity`, the most positions a
    row will need (prompt + new tokens), not by the model's window: a 32k-token window would
    otherwise cost 32k slots per row and layer for a 200-token reply.
    """

    def __init__(
        self, config: ModelConfig, batch_size: int, capacity: int, device: torch.device, dtype: torch.dtype,
        static_shapes: bool = False,
    ):
        if not 0 < capacity <= config.block_size:
            raise ValueError(f"A KV cache holds 1 to block_size ({config.block_size}) positions per row, not {capacity}.")
        shape = (batch_size, config.kv_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # positions filled, per row
        self.host_lengths = [0] * batch_size  # the same numbers on the host: checked without waiting for the device
        # Set by `begin` for the forward pass under way: where it writes (batch, time), how many slots
        # attention reads, and the mask over them (batch, 1, time, visible): True where a query sees a key.
        self.positions: torch.Tensor | None = None
        self.start: int | None = None  # the rows' one position, when they share it (see `begin`)
        self.rows: torch.Tensor | None = None  # (batch, 1) row numbers, to index the slots of rows at different positions
        self.visible = 0
        self.key_mask: torch.Tensor | None = None
        # Gemma 3's sliding-window layers see only the latest `sliding_window` keys: a mask of their own.
        # Their cache still holds every position, as the global layers' does (simpler, and the same
        # size); a ring buffer of `sliding_window` slots would be smaller on contexts past the window.
        self.sliding_window = config.sliding_window
        self.window_key_mask: torch.Tensor | None = None
        # static_shapes: attention reads all `capacity` slots, under a mask, at every step, so each
        # step has the same shapes and a compiled step (Engine(compile=True)) runs without
        # recompiling; without it, attention reads the slots up to the longest row's end only.
        self.static_shapes = static_shapes

    @property
    def batch_size(self) -> int:
        return self.lengths.size(0)

    @property
    def capacity(self) -> int:
        return self.keys[0].size(2)

    def set_lengths(self, lengths: list[int]) -> None:
        """Say how many positions of each row hold real tokens (after a right-padded prefill, say)."""
        self.host_lengths = list(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.lengths.device)

    def begin(self, time: int) -> torch.Tensor:
        """Prepare a forward pass of `time` new tokens per row; return their positions (batch, time)."""
        longest = max(self.host_lengths, default=0) + time
        if longest > self.capacity:
            raise ValueError(f"The KV cache holds {self.capacity} positions per row; {time} more do not fit.")
        device = self.lengths.device
        self.positions = self.lengths[:, None] + torch.arange(time, device=device)
        # Where every row is at the same position (a single row, or prompts of one length), the new
        # keys and values go into one slice of slots; else each row's go to its own (see `store`).
        # A compiled step always takes the general way, whose shapes do not depend on the positions.
        same = not self.static_shapes and len(set(self.host_lengths)) == 1
        self.start = self.host_lengths[0] if same else None
        self.rows = None if same else torch.arange(self.batch_size, device=device)[:, None]
        # Attention reads the slots up to the longest row's end, not the whole capacity. Key slot
        # j is visible to a query at position p when j <= p: causal, and per row. A single row
        # adding a single token sees every slot read, so it needs no mask (the fastest attention).
        self.visible = self.capacity if self.static_shapes else longest
        if self.batch_size == 1 and time == 1 and not self.static_shapes:
            self.key_mask = None
        else:
            self.key_mask = attention_mask(self.positions, self.visible).unsqueeze(1)  # (batch, 1, time, visible)
        if self.sliding_window:
            self.window_key_mask = attention_mask(self.positions, self.visible, self.sliding_window).unsqueeze(1)
        return self.positions

    def store(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values (batch, kv_heads, time, head_dim) of `layer` at each row's
        positions; return the layer's keys and values up to the longest row's end."""
        if self.start is not None:
            self.keys[layer][:, :, self.start : self.start + key.size(2)] = key
            self.values[layer][:, :, self.start : self.start + value.size(2)] = value
        else:  # indexing [rows, :, positions] addresses (batch, time, kv_heads, head_dim) elements
            self.keys[layer][self.rows, :, self.positions] = key.transpose(1, 2).to(self.keys[layer].dtype)
            self.values[layer][self.rows, :, self.positions] = value.transpose(1, 2).to(self.values[layer].dtype)
        return self.keys[layer][:, :, : self.visible], self.values[layer][:, :, : self.visible]

    def end(self, time: int) -> None:
        """The forward pass is done: every row is `time` positions longer."""
        self.lengths = self.lengths + time
        self.host_lengths = [length + time for length in self.host_lengths]
        self.positions = self.key_mask = self.window_key_mask = self.rows = self.start = None

    def keep_rows(self, rows: list[int], capacity: int | None = None) -> None:
        """Keep only `rows` (in that order), optionally shrunk to `capacity` positions per row."""
        capacity = capacity or self.capacity
        if max((self.host_lengths[row] for row in rows), default=0) > capacity:
            raise ValueError(f"Rows {rows} hold more than {capacity} positions.")
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.keys = [keys.index_select(0, index)[:, :, :capacity] for keys in self.keys]
        self.values = [values.index_select(0, index)[:, :, :capacity] for values in self.values]
        self.set_lengths([self.host_lengths[row] for row in rows])

    def extend(self, other: KVCache) -> None:
        """Append the rows of `other` after this cache's rows; the wider capacity of the two is kept."""
        capacity = max(self.capacity, other.capacity)

        def widened(tensor: torch.Tensor) -> torch.Tensor:
            return F.pad(tensor, (0, 0, 0, capacity - tensor.size(2)))

        self.keys = [torch.cat([widened(mine), widened(theirs)]) for mine, theirs in zip(self.keys, other.keys)]
        self.values = [torch.cat([widened(mine), widened(theirs)]) for mine, theirs in zip(self.values, other.values)]
        self.set_lengths(self.host_lengths + other.host_lengths)


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which a token sees only itself and the tokens before it.

    With n_kv_head < n_head (grouped-query attention) several query heads share one key/value
    head: the KV cache shrinks by n_head / n_kv_head at almost no cost in quality.

    A sliding-window layer (Gemma 3's local layers) sees only the latest `sliding_window` tokens.
    """

    def __init__(self, config: ModelConfig, sliding_window: int = 0):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        bias = config.attention_bias  # Qwen2: learned biases on q, k and v (not on the output)
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        if config.qk_norm:  # Qwen3, Gemma 3: each head's queries and keys normalised, which keeps attention logits tame
            self.q_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.norm_eps, config.norm_unit_offset)
        self.qk_norm = config.qk_norm
        # Gemma 3 scales scores by 1/sqrt(query_pre_attn_scalar) rather than 1/sqrt(head_dim); None = PyTorch's 1/sqrt(head_dim).
        self.scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None
        self.sliding_window = sliding_window
        self.dropout = config.dropout

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask` (batch, 1, time, time), for training on packed rows: True where a query may see a
        key (`packed_attention_mask`, already cut to this layer's window)."""
        batch, time, _ = x.shape
        # Project, then split the channels into heads: (batch, heads, time, head_dim).
        q = self.q_proj(x).view(batch, time, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        # Training (no cache): the usual lower-triangular mask, is_causal, or the packed rows' mask
        # given. Decoding with a cache: the new keys and values go into the cache, and the cache's
        # per-row mask says what each query sees. A sliding-window layer cuts each mask down to the
        # latest `sliding_window` keys.
        if cache is not None:
            k, v = cache.store(layer, k, v)
            mask = cache.window_key_mask if self.sliding_window else cache.key_mask
        elif mask is None and self.sliding_window and time > self.sliding_window:
            mask = attention_mask(torch.arange(time, device=x.device), time, self.sliding_window)
        # PyTorch's CPU attention kernel works on bfloat16 in tiles sized for long sequences, so
        # on short ones it is several times slower than float32 (4x at 64 keys, measured): there a
        # CPU run under bfloat16 autocast attends in float32, and the projections stay bfloat16.
        upcast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and k.size(2) <= CPU_FLOAT32_ATTENTION_MAX_KEYS
        if upcast:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if upcast else contextlib.nullcontext():
            if cache is not None and time == 1:
                y = one_query_attention(q, k, v, mask, self.scale)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=(cache is None and time > 1 and mask is None),
                    dropout_p=self.dropout if self.training else 0.0, scale=self.scale, enable_gqa=self.n_kv_head != self.n_head,
                )
        y = y.transpose(1, 2).contiguous().view(batch, time, self.n_head * self.head_dim)  # heads side by side again
        return self.o_proj(y)


class GatedMLP(nn.Module):
    """Feed-forward network with a gate: down(act(gate(x)) * up(x)); act is SiLU (SwiGLU) or,
    for Gemma, the tanh approximation of GeLU (GeGLU)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=False)
        self.gelu = config.mlp_activation == "gelu_tanh"  # Gemma was trained with GeLU (tanh approximation), not SiLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.gelu(self.gate_proj(x), approximate="tanh") if self.gelu else F.silu(self.gate_proj(x))
        return self.down_proj(gate * self.up_proj(x))


class Block(nn.Module):
    """One transformer layer. Pre-norm: the residual stream x is never normalised itself, which
    keeps gradients flowing straight through deep stacks."""

    def __init__(self, config: ModelConfig, sliding_window: int = 0):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        self.attention = CausalSelfAttention(config, sliding_window)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        self.mlp = GatedMLP(config)
        self.sandwich_norms = config.sandwich_norms
        if config.sandwich_norms:  # Gemma 3: each branch's output is normalised too before it joins the stream
            self.post_attention_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
            self.post_mlp_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.attention(self.attention_norm(x), cos, sin, cache, layer, mask)
        if self.sandwich_norms:
            attended = self.post_attention_norm(attended)
        x = x + self.dropout(attended)
        transformed = self.mlp(self.mlp_norm(x))
        if self.sandwich_norms:
            transformed = self.post_mlp_norm(transformed)
        x = x + self.dropout(transformed)
        return x


class GPT(nn.Module):
    """The whole model: token ids in, next-token logits (and optionally the loss) out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set (to the tokenizer's vocabulary size) before building GPT.")
        self.config = config
        # --gradient-checkpointing: keep only each block's input in the forward pass and recompute
        # the block in the backward pass (less memory, about a third more compute). Not part of
        # ModelConfig: it changes how the network is trained, not what it computes.
        self.gradient_checkpointing = False
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)
        # Every layer attends to the whole past, except Gemma 3's local (sliding-window) layers.
        self.layer_types = config.layer_types or ["full_attention"] * config.n_layer
        self.blocks = nn.ModuleList(
            Block(config, config.sliding_window if kind == "sliding_attention" else 0) for kind in self.layer_types
        )
        self.final_norm = RMSNorm(config.n_embd, config.norm_eps, config.norm_unit_offset)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Reading a token (embedding) and writing one (output head) share one matrix: fewer
            # parameters, and rare tokens learn from both directions.
            self.lm_head.weight = self.token_embedding.weight
        self.set_rotary_frequencies()
        self.apply(self._init_weights)
        # GPT-2's trick: each residual branch adds to the stream, so shrink the layers that write
        # into it by 1/sqrt(2 * n_layer) to keep the stream's variance steady with depth.
        for name, parameter in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def set_rotary_frequencies(self) -> None:
        """(Re)compute the rotary frequencies, buffers derived from the configuration (not saved):
        one set for global layers (rope_theta and the rope scaling: Llama 3's llama3, Gemma 3's
        linear) and, for Gemma 3's local layers, one at their own base (rope_local_theta), unscaled.
        A model laid out on the meta device (minigpt.families.load_model) calls it again once its
        weights are in place."""
        config, device = self.config, self.token_embedding.weight.device
        device = None if device.type == "meta" else device
        self.register_buffer("global_frequencies", rotary_frequencies(config.head_dim, config.rope_theta, config.rope_scaling, device),
                             persistent=False)
        if config.rope_local_theta:
            self.register_buffer("local_frequencies", rotary_frequencies(config.head_dim, config.rope_local_theta, device=device),
                                 persistent=False)

    def rotary(self, positions: torch.Tensor, layer_type: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for tokens at `positions` in a layer of `layer_type`, computed for the
        positions a pass needs (see rotary_angles)."""
        local = layer_type == "sliding_attention" and self.config.rope_local_theta
        return rotary_angles(positions, self.local_frequencies if local else self.global_frequencies)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk: token embeddings -> the blocks -> the final norm, one vector per position
        (batch, time, n_embd). Heads sit on it: the language-model head here, classification heads elsewhere.

        `positions` (batch, time), for rows packed with several sequences: each token's position
        in its own sequence, 0 where one starts. Attention then stays inside each sequence and
        the rotary angles restart with it, so every sequence is computed as if it had a row of its own."""
        time = idx.size(1)
        if cache is None:  # training, or a whole sequence at once
            if time > self.config.block_size:
                raise ValueError(f"Sequence of {time} tokens is longer than block_size {self.config.block_size}.")
            if positions is None:  # positions 0..time-1, the same for every row: cos, sin (time, head_dim)
                return self.trunk(idx, torch.arange(time, device=idx.device))
            # Packed rows: a position per token, and one mask per kind of layer
            masks = {kind: packed_attention_mask(positions, self.config.sliding_window if kind == "sliding_attention" else 0)
                     for kind in set(self.layer_types)}
            return self.trunk(idx, positions.unsqueeze(1), masks=masks)  # (batch, 1, time): cos, sin (batch, 1, time, head_dim)
        # Decoding: each row continues from its own position in the cache. The cache's host-side
        # bookkeeping (begin, end) stays outside `trunk`, the tensor work a compiled step runs.
        positions = cache.begin(time)
        hidden = self.trunk(idx, positions.unsqueeze(1), cache)  # (batch, 1, time): cos, sin (batch, 1, time, head_dim)
        cache.end(time)
        return hidden

    def trunk(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
              masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """`hidden_states` for tokens at `positions`, with the cache (if any) already told of the
        pass (KVCache.begin); `masks`, per kind of layer, for packed rows (none: causal, or the cache's)."""
        masks = masks or dict.fromkeys(self.layer_types)
        x = self.token_embedding(idx)
        # In the weights' dtype, as transformers does: a bfloat16 model rotates in bfloat16 (float32 ones are unchanged).
        rotations = {kind: tuple(table.to(x.dtype) for table in self.rotary(positions, kind)) for kind in set(self.layer_types)}
        if self.config.scale_embeddings:  # Gemma: embeddings x sqrt(width), the factor rounded to the embeddings' dtype as in transformers
            x = x * torch.tensor(self.config.n_embd**0.5).to(x.dtype)
        x = self.dropout(x)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and cache is None
        for layer, (block, kind) in enumerate(zip(self.blocks, self.layer_types)):
            cos, sin = rotations[kind]
            if recompute:  # the recomputation replays the same dropout masks (the RNG state is saved)
                x = checkpoint(block, x, cos, sin, None, layer, masks[kind], use_reentrant=False)
            else:
                x = block(x, cos, sin, cache, layer, masks[kind])
        return self.final_norm(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        loss_reduction: str = "mean",
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for every position of idx (batch, time); with targets, also the cross-entropy loss.

        Targets equal to IGNORE_INDEX (-100) do not count. `loss_reduction="sum"` returns the
        summed loss so a caller can divide by the number of targets across several micro-batches.
        `positions`: rows packed with several sequences (see hidden_states).

        When the float32 logits of the whole batch would pass LOSS_CHUNK_BYTES (the 150k-262k
        vocabularies of Qwen and Gemma), the loss is computed a slice of positions at a time
        (minigpt.loss.chunked_next_token_loss) and the logits returned are None: no one holds them all.
        """
        hidden = self.hidden_states(idx, cache, positions)
        if targets is None:
            return self.lm_head(hidden), None
        chunk = loss_chunk_positions(targets.numel(), self.config.vocab_size)
        if chunk < targets.numel():
            return None, chunked_next_token_loss(hidden, self.lm_head, targets, chunk, loss_reduction)
        logits = self.lm_head(hidden)
        return logits, next_token_loss(logits, targets, loss_reduction)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count (a tied matrix counts once); optionally without the token embedding."""
        total = sum(parameter.numel() for parameter in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token: forward + backward through every matrix multiply.

        Each weight does a multiply and an add per token (2 FLOPs) forward and twice that
        backward: 6 FLOPs per weight. Attention scores add 2 * 2 * block_size * width per layer
        forward (q @ k and weights @ v), again x3 with the backward pass. The embedding lookup
        is not a multiply; the output head is, tied or not.
        """
        config = self.config
        matrix_weights = sum(module.weight.numel() for module in self.modules() if isinstance(module, nn.Linear))
        attention = 12 * config.n_layer * config.block_size * config.n_head * config.head_dim
        return 6 * matrix_weights + attention
