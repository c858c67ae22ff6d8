"""The model: it learns, it cannot see the future, and its cache, counts and loss are right."""

import dataclasses

import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.generation import SamplingConfig, generate, next_token_distribution
import minigpt.loss as loss_module
import minigpt.model
from minigpt.loss import IGNORE_INDEX
from minigpt.model import CPU_FLOAT32_ATTENTION_MAX_KEYS, GPT, KVCache


def tiny_config(**changes) -> ModelConfig:
    base = ModelConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return dataclasses.replace(base, **changes)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    batch = torch.randint(0, 96, (4, 33))
    x, y = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first_loss = None
    for _ in range(300):
        _, loss = model(x, y)
        first_loss = first_loss if first_loss is not None else loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if loss.item() < 0.05:
            break
    assert first_loss == pytest.approx(torch.log(torch.tensor(96.0)).item(), abs=0.3)  # starts near uniform
    assert loss.item() < 0.05  # random tokens: only memorising the batch gets there


def test_future_tokens_never_change_past_logits():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 96, (2, 20))
    changed = idx.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 96
    with torch.no_grad():
        before, _ = model(idx)
        after, _ = model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12], rtol=0, atol=0)
    assert not torch.allclose(before[:, 12], after[:, 12])


def test_grouped_query_attention_equals_multi_head_with_shared_key_value_weights():
    torch.manual_seed(0)
    grouped = GPT(tiny_config(n_kv_head=2)).eval()
    full = GPT(tiny_config(n_kv_head=4)).eval()
    full_state = grouped.state_dict()
    head_dim = grouped.config.head_dim
    for name, tensor in grouped.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # Query heads 0,1 use key/value head 0 and heads 2,3 use head 1: repeat each kv head's rows.
            heads = tensor.view(2, head_dim, -1)
            full_state[name] = heads.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    full.load_state_dict(full_state)
    idx = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(grouped(idx)[0], full(idx)[0])


@pytest.mark.parametrize("static_shapes", [False, True])  # True: attention reads every slot under a mask (Engine(compile=True))
def test_kv_cache_logits_match_full_forward(static_shapes):
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    idx = torch.randint(0, 96, (1, 24))
    cache = KVCache(model.config, 1, 24, torch.device("cpu"), torch.float32, static_shapes)
    with torch.no_grad():
        full, _ = model(idx)
        prefix, _ = model(idx[:, :10], cache=cache)  # prefill
        chunk, _ = model(idx[:, 10:14], cache=cache)  # several tokens after a past
        steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(14, 24)]
    torch.testing.assert_close(torch.cat([prefix, chunk, *steps], dim=1), full, atol=1e-5, rtol=1e-4)
    assert cache.host_lengths == [24] and cache.lengths.tolist() == [24]
    with pytest.raises(ValueError, match="do not fit"):
        model(idx[:, :1], cache=cache)


@pytest.mark.parametrize("static_shapes", [False, True])
def test_kv_cache_rows_at_different_positions_match_their_own_full_forward(static_shapes):
    """Two rows of different lengths share a cache: a right-padded prefill, then one token per row
    per step, each at its own position; the padding never reaches a row's real positions."""
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    long, short = torch.randint(0, 96, (1, 20)), torch.randint(0, 96, (1, 12))
    cache = KVCache(model.config, 2, 20, torch.device("cpu"), torch.float32, static_shapes)
    prompts = torch.zeros(2, 10, dtype=torch.long)  # row 1's prompt is 7 tokens, padded to 10
    prompts[0], prompts[1, :7] = long[0, :10], short[0, :7]
    with torch.no_grad():
        long_full, short_full = model(long)[0][0], model(short)[0][0]
        prefill, _ = model(prompts, cache=cache)
        cache.set_lengths([10, 7])  # the padding's slots will be overwritten by row 1's next tokens
        steps = [model(torch.stack([long[0, 10 + t], short[0, 7 + t]])[:, None], cache=cache)[0][:, 0] for t in range(5)]
    torch.testing.assert_close(prefill[0], long_full[:10], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(prefill[1, :7], short_full[:7], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([step[0] for step in steps]), long_full[10:15], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.stack([step[1] for step in steps]), short_full[7:12], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("new_tokens", [10, 60])  # 60 runs into the 32-token window
def test_greedy_generation_is_the_same_with_and_without_cache(new_tokens):
    torch.manual_seed(0)
    model = GPT(tiny_config())
    prompt = [5, 17, 42]
    with_cache = generate(model, prompt, SamplingConfig(max_new_tokens=new_tokens, temperature=0), use_kv_cache=True)
    without = generate(model, prompt, SamplingConfig(max_new_tokens=new_tokens, temperature=0), use_kv_cache=False)
    assert with_cache == without
    assert len(with_cache) == min(new_tokens, 32 - len(prompt))  # the window ends a row ("length")
    assert model.training  # generation restores the mode it found


def test_sampling_is_reproducible_with_a_seed_and_stops_on_stop_tokens():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.0, top_k=10, top_p=0.9, repetition_penalty=1.3, seed=7)
    first = generate(model, [1, 2, 3], sampling)
    assert first == generate(model, [1, 2, 3], sampling)
    stop = first[5]
    stopped = generate(model, [1, 2, 3], dataclasses.replace(sampling, stop_ids=(stop,)))
    assert stopped == first[: first.index(stop)]


def test_distribution_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    context = torch.tensor([0])
    top_k = next_token_distribution(logits, context, SamplingConfig(top_k=2))
    assert (top_k[2:] == 0).all() and top_k.sum().item() == pytest.approx(1.0)
    full = torch.softmax(logits, dim=-1)
    top_p = next_token_distribution(logits, context, SamplingConfig(top_p=0.8))
    kept = int((top_p > 0).sum())
    assert full[: kept - 1].sum() < 0.8 <= full[:kept].sum()  # the smallest set that reaches p
    greedy = next_token_distribution(logits, context, SamplingConfig(temperature=0, repetition_penalty=10.0))
    assert greedy.argmax().item() == 1  # the penalty pushed the seen token 0 below token 1


def test_ignored_targets_leave_the_loss():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 96, (2, 16))
    targets = torch.randint(0, 96, (2, 16))
    masked = targets.clone()
    masked[:, :8] = IGNORE_INDEX
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 96), targets[:, 8:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    _, summed = model(idx, masked, loss_reduction="sum")
    torch.testing.assert_close(summed, expected * 16)


def test_parameter_count_and_flops():
    config = tiny_config()
    model = GPT(config)
    d, hidden, kv = config.n_embd, config.hidden_dim, config.kv_heads * config.head_dim
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * hidden + 2 * d  # q, o, k, v, gate/up/down, two norms
    embedding = config.vocab_size * d
    assert model.num_parameters() == embedding + config.n_layer * per_layer + d  # tied head counts once
    assert model.num_parameters(exclude_embeddings=True) == config.n_layer * per_layer + d
    matrix_weights = config.n_layer * (per_layer - 2 * d) + embedding  # the tied head is still a multiply
    assert model.flops_per_token() == 6 * matrix_weights + 12 * config.n_layer * config.block_size * d
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + embedding


@pytest.mark.parametrize("length, attention_dtype", [(32, torch.float32), (CPU_FLOAT32_ATTENTION_MAX_KEYS + 8, torch.bfloat16)])
def test_cpu_bfloat16_autocast_attends_over_short_sequences_in_float32(monkeypatch, length, attention_dtype):
    """The projections run in bfloat16 either way; only attention over short sequences is upcast."""
    seen = []
    attention = torch.nn.functional.scaled_dot_product_attention

    def recording_attention(q, k, v, **options):
        output = attention(q, k, v, **options)
        seen.append(output.dtype)  # autocast decides the computing dtype inside the call: look at what comes out
        return output

    monkeypatch.setattr(minigpt.model.F, "scaled_dot_product_attention", recording_attention)
    torch.manual_seed(0)
    model = GPT(tiny_config(block_size=length))
    batch = torch.randint(0, 96, (2, length + 1))
    _, float32_loss = model(batch[:, :-1], batch[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    assert seen[-2:] == [attention_dtype] * 2  # both layers, under autocast
    assert loss.item() == pytest.approx(float32_loss.item(), rel=0.02)
    assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())


def test_too_long_input_is_refused():
    model = GPT(tiny_config())
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_loss_equals_the_whole_loss_and_keeps_no_logits(monkeypatch, reduction):
    """Past LOSS_CHUNK_BYTES of float32 logits the loss is computed a slice of positions at a time:
    the same loss and gradients, and the backward pass keeps no vocabulary-wide tensor."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=500, block_size=32, n_layer=1, n_head=2, n_embd=32))
    idx, targets = torch.randint(0, 500, (3, 32)), torch.randint(0, 500, (3, 32))
    targets[0, :10] = IGNORE_INDEX

    def loss_gradients_and_widest_saved():
        model.zero_grad()
        widest = []
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: widest.append(tensor.shape[-1] if tensor.dim() else 0) or tensor,
                                                   lambda tensor: tensor):
            logits, loss = model(idx, targets, loss_reduction=reduction)
        (loss.sum() if reduction == "none" else loss).backward()
        return logits, loss.detach(), [parameter.grad.clone() for parameter in model.parameters()], max(widest)

    whole_logits, whole, whole_gradients, whole_widest = loss_gradients_and_widest_saved()
    monkeypatch.setattr(loss_module, "LOSS_CHUNK_BYTES", 4 * 500 * 20)  # 20 positions of logits at a time: 5 slices
    logits, chunked, gradients, widest = loss_gradients_and_widest_saved()
    assert whole_logits is not None and logits is None
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=1e-5)
    assert all(torch.allclose(mine, theirs, atol=1e-6) for mine, theirs in zip(gradients, whole_gradients))
    assert whole_widest == 500 and widest < 500  # the whole loss keeps logits as wide as the vocabulary; the chunked one none


def test_rms_norm_matches_a_hand_computation():
    """x / sqrt(mean(x^2) + eps) * weight, with numbers small enough to check by hand: for x = (3, 4),
    mean(x^2) = 12.5, and an eps of 0.5 makes the root sqrt(13). (A norm without eps, or by mean |x|,
    gives other numbers.)"""
    norm = minigpt.model.RMSNorm(2, eps=0.5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0]))
    expected = torch.tensor([[3.0, 8.0], [-3.0, -8.0]]) / 13**0.5
    torch.testing.assert_close(norm(torch.tensor([[3.0, 4.0], [-3.0, -4.0]])), expected)


def test_rotary_embedding_matches_a_hand_computation():
    """Rotate-half RoPE (Llama's layout) on a head of 4 channels: channel pairs (0, 2) and (1, 3)
    turn at theta^0 = 1 and theta^(-1/2) = 0.01 radians per position for theta 10^4. At position 2,
    (1, 0) in pair (0, 2) becomes (cos 2, sin 2), counter-clockwise; position 0 is left alone."""
    import math

    cos, sin = minigpt.model.rotary_tables(4, 3, 10_000.0)
    x = torch.zeros(1, 1, 3, 4)
    x[..., 0] = 1.0  # first channel of pair (0, 2), at every position
    x[0, 0, 2, 3] = 1.0  # second channel of pair (1, 3), at position 2 only
    rotated = minigpt.model.apply_rotary(x, cos, sin)[0, 0]
    expected = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [math.cos(1), 0.0, math.sin(1), 0.0],
        [math.cos(2), -math.sin(0.02), math.sin(2), math.cos(0.02)],
    ])
    torch.testing.assert_close(rotated, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_query_attention_is_pytorchs_attention_for_a_decoding_step(dtype):
    """The written-out attention of one new token per row gives F.scaled_dot_product_attention's
    numbers: grouped-query heads, a per-row mask over the cache, Gemma's own scale."""
    from minigpt.model import one_query_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, 8, 1, 16, dtype=dtype), torch.randn(3, 2, 10, 16, dtype=dtype), torch.randn(3, 2, 10, 16, dtype=dtype)
    mask = torch.arange(10)[None, None, None, :] < torch.tensor([10, 4, 7])[:, None, None, None]  # rows at different lengths
    for row_mask, scale in ((None, None), (mask, None), (mask, 0.3)):
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=row_mask,
                                                                    scale=scale, enable_gqa=True)
        torch.testing.assert_close(one_query_attention(q, k, v, row_mask, scale).float(), expected,
                                   **({} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}))
