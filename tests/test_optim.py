"""The learning-rate schedule, AdamW's parameter groups, and Muon beside AdamW."""

import dataclasses

import pytest
import torch

from minigpt.config import ModelConfig, TrainConfig, apply_overrides, preset_config
from minigpt.errors import UserInputError
from minigpt.model import GPT
from minigpt.optim import MuonAndAdamW, build_optimizer, learning_rate_at
from minigpt.run import check_config
from test_memory import StopAt
from test_trainer import tiny

TRAIN = TrainConfig(learning_rate=1e-3, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)


def test_warmup_rises_linearly_to_the_peak():
    rates = [learning_rate_at(step, TRAIN) for step in range(10)]
    assert rates[0] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-3)
    assert all(later > earlier for earlier, later in zip(rates, rates[1:]))


@pytest.mark.parametrize("scheduler, middle", [("cosine", 5.5e-4), ("linear", 5.5e-4), ("constant", 1e-3)])
def test_decay_shapes(scheduler, middle):
    train = dataclasses.replace(TRAIN, lr_scheduler=scheduler)
    assert learning_rate_at(10, train) == pytest.approx(1e-3)
    assert learning_rate_at(60, train) == pytest.approx(middle)
    end = 1e-3 if scheduler == "constant" else 1e-4
    assert learning_rate_at(110, train) == pytest.approx(end)
    assert learning_rate_at(500, train) == pytest.approx(end)  # past the end it stays at the floor


def test_cosine_is_above_linear_early_and_below_late():
    cosine, linear = TRAIN, dataclasses.replace(TRAIN, lr_scheduler="linear")
    assert learning_rate_at(30, cosine) > learning_rate_at(30, linear)
    assert learning_rate_at(90, cosine) < learning_rate_at(90, linear)


def test_a_time_budget_drives_the_decay_when_it_ends_first():
    train = dataclasses.replace(TRAIN, max_steps=0, max_time=100.0)
    assert learning_rate_at(20, train, elapsed_seconds=0.0) == pytest.approx(1e-3)
    assert learning_rate_at(20, train, elapsed_seconds=50.0) == pytest.approx(5.5e-4)
    assert learning_rate_at(20, train, elapsed_seconds=100.0) == pytest.approx(1e-4)


@pytest.mark.parametrize("step, elapsed_seconds, progress", [
    (60, 10.0, 0.5),  # the steps are half done, the time a tenth: the steps drive the decay
    (20, 50.0, 0.5),  # the time is half gone, the steps a tenth: the time drives it
    (110, 1.0, 1.0),  # the step budget ends first: the floor
    (20, 100.0, 1.0),  # the time budget ends first: the floor
])
def test_with_both_budgets_the_decay_follows_whichever_ends_first(step, elapsed_seconds, progress):
    train = dataclasses.replace(TRAIN, lr_scheduler="linear", max_time=100.0)  # 100 steps after warmup, or 100 seconds
    assert learning_rate_at(step, train, elapsed_seconds) == pytest.approx(1e-4 + (1.0 - progress) * 9e-4)


def test_norm_gains_get_no_weight_decay():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = build_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(parameter.dim() == 2 for parameter in decay["params"])
    assert all(parameter.dim() == 1 for parameter in no_decay["params"])
    assert sum(p.numel() for group in optimizer.param_groups for p in group["params"]) == model.num_parameters()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    optimizer = build_optimizer(model, TrainConfig(optimizer="muon", learning_rate=2e-3, weight_decay=0.1), "cpu")
    assert isinstance(optimizer, MuonAndAdamW)
    muon = {id(parameter) for group in optimizer.muon.param_groups for parameter in group["params"]}
    for name, parameter in model.named_parameters():
        assert (id(parameter) in muon) == (name.startswith("blocks.") and parameter.dim() == 2), name
    # the embedding (tied to the output head) with decay, the gains without, all through AdamW
    decay, no_decay = optimizer.adamw.param_groups
    assert [parameter is model.token_embedding.weight for parameter in decay["params"]] == [True]
    assert no_decay["weight_decay"] == 0.0 and all(parameter.dim() == 1 for parameter in no_decay["params"])
    assert optimizer.muon.param_groups[0]["weight_decay"] == 0.1
    for group in optimizer.param_groups:  # as the schedule sets it: every group of both optimizers
        group["lr"] = 5e-4
    assert {group["lr"] for group in optimizer.muon.param_groups + optimizer.adamw.param_groups} == {5e-4}


@pytest.mark.parametrize("setting, flag", [({"train.lora_rank": 8}, "--lora-rank"),
                                           ({"train.stage": "classify", "train.freeze_trunk": True}, "--freeze-trunk")])
def test_muon_is_refused_for_a_run_that_trains_no_block_matrix(tmp_path, setting, flag):
    config = apply_overrides(preset_config("tiny"), {"train.optimizer": "muon", "train.init_from": str(tmp_path), **setting})
    with pytest.raises(UserInputError, match=f"a run with {flag} trains none of them: use --optimizer adamw"):
        check_config(config)


def test_muon_changes_the_update_and_a_muon_run_resumes_exactly_with_muon_only(tmp_path, corpus_jsonl, tokenizer_file):
    common = {"train.optimizer": "muon", "train.max_steps": 4, "train.save_steps": 2, "train.log_steps": 1, "train.eval_steps": 100}
    straight = tiny(tmp_path, corpus_jsonl, tokenizer_file, "straight", **common)
    summary = straight.train()
    assert summary["steps"] == 4
    adamw = tiny(tmp_path, corpus_jsonl, tokenizer_file, "adamw", **{**common, "train.optimizer": "adamw"})
    adamw.train()
    matrix = "blocks.0.attention.q_proj.weight"
    assert not torch.allclose(straight.model.state_dict()[matrix], adamw.model.state_dict()[matrix])

    stopped = tiny(tmp_path, corpus_jsonl, tokenizer_file, "stopped", **common)
    stopped.callbacks.append(StopAt(2))
    assert stopped.train()["steps"] == 2
    checkpoint = stopped.run_dir / "checkpoint_step_2"
    with pytest.raises(UserInputError, match="was trained with --optimizer muon .* resume with --optimizer muon"):
        tiny(tmp_path, corpus_jsonl, tokenizer_file, "stopped", **{**common, "train.optimizer": "adamw", "train.resume": str(checkpoint)})
    resumed = tiny(tmp_path, corpus_jsonl, tokenizer_file, "stopped", **common, **{"train.resume": str(checkpoint)})
    resumed.train()
    for (name, expected), actual in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(actual, expected), name
