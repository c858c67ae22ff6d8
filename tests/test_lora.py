"""LoRA: starts equal to the base, trains only the adapters, merges exactly, saves and loads safely."""

import json

import pytest
import torch
import torch.nn as nn

from minigpt.cli import chat
from minigpt.cli import merge_lora as merge_lora_cli
from minigpt.config import ModelConfig, RunConfig
from minigpt.errors import UserInputError
from minigpt.lora import (
    LoRAConfig, LoRALinear, apply_lora, count_trainable, format_trainable, load_lora_state_dict, lora_parameters,
    lora_state_dict, merge_lora, parse_targets, store_frozen_base,
)
from minigpt.model import GPT
from minigpt.model_folder import (
    LORA_ADAPTER_CONFIG, LORA_ADAPTER_WEIGHTS, FolderKind, base_model_checksum, base_model_files, load, save_adapter, save_model_directory,
)
from minigpt.tokenizer import load_tokenizer

CONFIG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG).eval()


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))


def trained_lora_model(config: LoRAConfig, steps: int = 3) -> GPT:
    """A wrapped tiny model after a few AdamW steps, so that B is no longer zero."""
    model = apply_lora(tiny_model(), config).train()
    optimizer = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    for step in range(steps):
        batch = tokens(step)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_a_wrapped_model_starts_equal_to_its_base():
    base = tiny_model()
    expected, _ = base(tokens())
    wrapped = apply_lora(tiny_model(), LoRAConfig(rank=4, alpha=8))
    assert sum(isinstance(module, LoRALinear) for module in wrapped.modules()) == 7 * CONFIG.n_layer
    actual, _ = wrapped(tokens())
    assert torch.equal(actual, expected)


def test_only_adapter_parameters_train_and_their_count_is_r_times_in_plus_out():
    model = apply_lora(tiny_model(), LoRAConfig(rank=4, targets=("q", "v", "down")))
    adapter_ids = {id(parameter) for parameter in lora_parameters(model)}
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == (id(parameter) in adapter_ids), name
    width, hidden, kv_width = CONFIG.n_embd, CONFIG.hidden_dim, CONFIG.kv_heads * CONFIG.head_dim
    # Per layer: q (width -> width), v (width -> kv_width), down (hidden -> width); R * (in + out) each.
    per_layer = 4 * ((width + width) + (width + kv_width) + (hidden + width))
    trainable, total = count_trainable(model)
    assert trainable == CONFIG.n_layer * per_layer
    assert total == tiny_model().num_parameters() + trainable
    assert format_trainable(410_000, 25_800_000) == "trainable 0.41M of 25.8M (1.6%)"


def test_merged_logits_equal_base_plus_adapter_after_training():
    model = trained_lora_model(LoRAConfig(rank=4, alpha=8, dropout=0.1))
    assert any(parameter.abs().sum() > 0 for name, parameter in lora_state_dict(model).items() if "lora_B" in name)
    with torch.no_grad():
        expected, _ = model(tokens(9))
        merged = merge_lora(model)
        actual, _ = merged(tokens(9))
    assert not any(isinstance(module, LoRALinear) for module in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model().state_dict())  # a plain GPT's names again
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_lora_state_dict_round_trip_and_mismatch():
    config = LoRAConfig(rank=2, targets=("q", "o"))
    model = trained_lora_model(config)
    state = lora_state_dict(model)
    assert state and all(".lora_" in name for name in state)
    fresh = apply_lora(tiny_model(), config)
    load_lora_state_dict(fresh, state)
    torch.testing.assert_close(fresh(tokens())[0], model(tokens())[0])
    with pytest.raises(UserInputError, match="other --lora-targets"):
        load_lora_state_dict(apply_lora(tiny_model(), LoRAConfig(rank=2, targets=("q",))), state)
    with pytest.raises(UserInputError, match="another rank"):
        load_lora_state_dict(apply_lora(tiny_model(), LoRAConfig(rank=3, targets=("q", "o"))), state)


@pytest.mark.parametrize("values, message", [
    ({"rank": 0}, "rank must be a whole number of at least 1"),
    ({"alpha": 0}, "alpha must be positive"),
    ({"dropout": 1.0}, "dropout must be in"),
    ({"targets": ("q", "lm_head")}, "Unknown LoRA target.* lm_head; choose among q, k, v, o, gate, up, down"),
])
def test_bad_lora_configs_are_refused_in_one_sentence(values, message):
    with pytest.raises(UserInputError, match=message):
        LoRAConfig(**values)


def test_parse_targets():
    assert parse_targets("q, v") == ("q", "v") and parse_targets("all") == LoRAConfig().targets


def test_bfloat16_autocast_forward_and_backward():
    model = apply_lora(tiny_model(), LoRAConfig(rank=4)).train()
    batch = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(batch[:, :-1], batch[:, 1:])
    loss.backward()
    assert logits.dtype == torch.bfloat16 and all(parameter.grad is not None for parameter in lora_parameters(model))


def test_a_frozen_base_stored_in_bfloat16_computes_what_autocast_computes():
    """Under bfloat16 autocast a float32 base is rounded to bfloat16 at every multiply; stored in
    bfloat16 it gives the same loss and adapter gradients, in half the memory, and adapters stay float32."""
    results = []
    for stored in (torch.float32, torch.bfloat16):
        model = trained_lora_model(LoRAConfig(rank=2)).train()
        if stored == torch.bfloat16:
            store_frozen_base(model, torch.bfloat16)
        batch = tokens()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        results.append((loss.detach(), [parameter.grad for parameter in lora_parameters(model)]))
    assert {module.base.weight.dtype for module in model.modules() if isinstance(module, LoRALinear)} == {torch.bfloat16}
    assert {parameter.dtype for parameter in lora_parameters(model)} == {torch.float32}
    (full_loss, full_gradients), (narrow_loss, narrow_gradients) = results
    assert torch.equal(full_loss, narrow_loss) and all(map(torch.equal, full_gradients, narrow_gradients))
    with torch.no_grad():  # outside autocast (a sample generated mid-run) the base multiplies in its own dtype
        assert model.eval()(tokens()[:, :-1])[0].dtype == torch.float32


@pytest.fixture
def base_directory(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    run_config = RunConfig(model=ModelConfig(**{**CONFIG.__dict__, "vocab_size": tokenizer.vocab_size}))
    torch.manual_seed(0)
    return save_model_directory(tmp_path / "base", GPT(run_config.model), run_config, tokenizer)


def test_save_and_load_adapter_round_trip(tmp_path, base_directory):
    config = LoRAConfig(rank=4, alpha=8, targets=("q", "k", "v"))
    model = load(base_directory).model
    apply_lora(model, config)
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.normal_(0, 0.1)
    checksum = base_model_checksum(base_directory)
    adapter = save_adapter(tmp_path / "adapter", model, config, base_directory, checksum)
    assert sorted(path.name for path in adapter.iterdir()) == [LORA_ADAPTER_CONFIG, LORA_ADAPTER_WEIGHTS]
    record = json.loads((adapter / LORA_ADAPTER_CONFIG).read_text())
    assert record["rank"] == 4 and record["targets"] == ["q", "k", "v"] and record["base_model_sha256"] == checksum
    loaded = load(adapter, merge_adapter=False)
    assert loaded.kind is FolderKind.LORA_ADAPTER and loaded.adapter.base_sha256 == checksum
    batch = tokens() % loaded.tokenizer.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch)[0], model(batch)[0])
        merged = load(adapter).model  # merged on load: a plain GPT, same logits
        torch.testing.assert_close(merged(batch)[0], model(batch)[0], atol=1e-5, rtol=0)
    assert not any(isinstance(module, LoRALinear) for module in merged.modules())


def test_an_adapter_refuses_a_changed_base(tmp_path, base_directory):
    config = LoRAConfig(rank=2)
    model = load(base_directory).model
    apply_lora(model, config)
    adapter = save_adapter(tmp_path / "adapter", model, config, base_directory, base_model_checksum(base_directory))
    [weights] = base_model_files(base_directory)
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserInputError, match="has changed since the adapter"):
        load(adapter)


def test_compiled_lora_model_matches_eager():
    model = trained_lora_model(LoRAConfig(rank=2, targets=("q",)), steps=1)
    compiled = torch.compile(model, backend="eager")  # the graph capture, without a C compiler's wait
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens())[0], model(tokens())[0])


def test_linear_layers_that_are_not_targets_stay_plain():
    model = apply_lora(tiny_model(), LoRAConfig(rank=2, targets=("gate",)))
    assert isinstance(model.blocks[0].mlp.gate_proj, LoRALinear)
    assert type(model.blocks[0].mlp.up_proj) is nn.Linear and type(model.lm_head) is nn.Linear


def test_merge_lora_script_writes_an_ordinary_model_with_the_adapters_logits(tmp_path, base_directory, capsys):
    config = LoRAConfig(rank=4, alpha=8)
    base = load(base_directory)
    model, tokenizer, run_config = base.model, base.tokenizer, base.config
    apply_lora(model, config)
    with torch.no_grad():
        for parameter in lora_parameters(model):
            parameter.normal_(0, 0.1)

    def run_files(directory):  # what a LoRA run's final_model/ carries besides the adapter
        (directory / "config.json").write_text(json.dumps(run_config.to_dict()))
        tokenizer.save(directory / "tokenizer.json")

    checksum = base_model_checksum(base_directory)
    adapter = save_adapter(tmp_path / "run" / "final_model", model, config, base_directory, checksum, run_files)
    assert merge_lora_cli.main([str(tmp_path / "run"), "--output", str(tmp_path / "merged")]) == 0
    merged = load(tmp_path / "merged").model
    batch = tokens() % tokenizer.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(merged(batch)[0], model(batch)[0], atol=1e-5, rtol=0)
    assert chat.main([str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "1"]) == 0  # the adapter, loaded transparently
    assert merge_lora_cli.main([str(base_directory), "--output", str(tmp_path / "other")]) == 2
    assert merge_lora_cli.main([str(adapter), "--output", str(adapter)]) == 2
    assert "not a LoRA adapter" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_lora_output_matches_a_hand_computation():
    """base(x) + (alpha / r) B A x with numbers checkable by hand: r 2, alpha 8 (scale 4), W the
    identity, A and B of ones: for x = (1, 2), A x = (3, 3), B A x = (6, 6), so (1, 2) + 4 (6, 6) =
    (25, 26). Scaled by alpha instead of alpha / r it would be (49, 50)."""
    base = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.eye(2))
    layer = LoRALinear(base, rank=2, alpha=8.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_A.weight.fill_(1.0)
        layer.lora_B.weight.fill_(1.0)
    torch.testing.assert_close(layer(torch.tensor([[1.0, 2.0]])), torch.tensor([[25.0, 26.0]]))
    torch.testing.assert_close(layer.merged().weight, torch.tensor([[9.0, 8.0], [8.0, 9.0]]))  # W + 4 B A
