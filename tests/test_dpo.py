"""Preference tuning (--stage dpo): the records, the loss against a hand computation, ln 2 at the
start, the stored reference, a run that learns, exact resume, LoRA, refusals and the anomaly rules."""

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_file, run_in_process
from minigpt.anomalies import diagnose
from minigpt.config import apply_overrides, preset_config
from minigpt.errors import UserInputError
from minigpt.metrics import read_metrics
from minigpt.model import GPT
from minigpt.model_folder import LORA_ADAPTER_WEIGHTS, load_language_model
from minigpt.objective import Preference
from minigpt.preference_corpus import spoiled
from minigpt.preference_data import PreferenceBatches, encode_pairs, last_reply_mask, read_preference_pairs
from minigpt.run import initial_model_config, prepare_run
from minigpt.stages.dpo import REFERENCE_FILE, reference_log_probs
from minigpt.tokenizer import load_tokenizer
from minigpt.trainer import Callback

LN2 = math.log(2)


def write_jsonl(path, records):
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record)) + "\n" for record in records))
    return path


def toy_pairs(count=120):
    """A preference a tiny model can learn: the right product over a wrong one."""
    return [{"prompt": f"What is {n} times two?", "chosen": f"{n} times two is {2 * n}.", "rejected": f"{n} times two is {2 * n + 7}."}
            for n in range(count)]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tokenizer_file):
    """A tiny model chat-tuned for a few steps from scratch: the start of every DPO run here."""
    tmp_path = tmp_path_factory.mktemp("chat_model")
    config = apply_overrides(preset_config("tiny"), {
        "train.stage": "sft", "train.tokenizer_path": str(tokenizer_file), "train.output_dir": str(tmp_path / "runs"),
        "train.run_name": "sft", "train.data_files": [str(chat_file(tmp_path / "chat.jsonl"))], "train.max_steps": 15,
        "train.sample_tokens": 0, "train.disable_monitoring": True, "train.dtype": "float32", "train.num_threads": 1,
        "train.val_fraction": 0.0,
    })
    prepare_run(config, show_progress=False).train()
    return tmp_path / "runs" / "sft" / "final_model"


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", toy_pairs())


def dpo_config(tmp_path, model, data, name, **overrides):
    """As the command line builds it: the model's shape comes from the initial model."""
    config = apply_overrides(preset_config("tiny"), {
        "train.stage": "dpo", "train.init_from": str(model), "train.data_files": [str(data)], "train.output_dir": str(tmp_path / "runs"),
        "train.run_name": name, "train.max_steps": 20, "train.log_steps": 1, "train.eval_steps": 10, "train.save_steps": 10,
        "train.learning_rate": 2e-3, "train.warmup_steps": 2, "train.val_fraction": 0.1, "train.eval_batches": 10,
        "train.disable_monitoring": True, "train.dtype": "float32", "train.num_threads": 1, **overrides,
    })
    return dataclasses.replace(config, model=initial_model_config(str(model)))


# ------------------------------------------------------------------------------------------ records


def test_the_three_record_forms_and_a_json_array_give_the_same_batches(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    system = "Answer briefly."
    plain = [{"system": system, "prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."},
             {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}]
    prompts = [[{"role": "system", "content": system}, {"role": "user", "content": "What is 2 + 2?"}],
               [{"role": "user", "content": "Name a colour."}]]
    conversational = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": record["chosen"]}],
                       "rejected": [{"role": "assistant", "content": record["rejected"]}]} for prompt, record in zip(prompts, plain)]
    whole = [{"chosen": prompt + [{"role": "assistant", "content": record["chosen"]}],
              "rejected": prompt + [{"role": "assistant", "content": record["rejected"]}]} for prompt, record in zip(prompts, plain)]
    array = tmp_path / "whole.json"
    array.write_text(json.dumps(whole))
    files = [write_jsonl(tmp_path / "plain.jsonl", plain), write_jsonl(tmp_path / "conversational.jsonl", conversational), array]
    batches = []
    for path in files:
        stream = PreferenceBatches(encode_pairs(read_preference_pairs([path]), tokenizer, 64), 2, tokenizer.pad_id, loop=False)
        batches.append(next(iter(stream)))
    for inputs, targets, _ in batches[1:]:
        assert torch.equal(inputs, batches[0][0]) and torch.equal(targets, batches[0][1])
    inputs, targets, reference = batches[0]
    assert inputs.shape[:2] == (2, 2) and torch.isnan(reference).all()  # NaN until the stage computes the reference
    scored = targets[0, 0][targets[0, 0] != -100].tolist()  # the chosen reply "4." and its end-of-turn token, nothing else
    assert tokenizer.decode(scored) == "4.<|im_end|>"


def test_bad_records_are_reported_with_file_and_line(tmp_path, caplog):
    user = {"role": "user", "content": "Hi"}
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Hi", "chosen": "Hello."},
        "not json",
        {"chosen": [user, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "b"}]},
        {"prompt": [user], "chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
        {"chosen": "a", "rejected": "b"},
        {"prompt": "", "chosen": "a", "rejected": "b"},
    ])
    with caplog.at_level(logging.WARNING):
        pairs = read_preference_pairs([path])
    assert [pair.chosen for pair in pairs] == ["Hello."]
    assert f"{path}:2: no 'rejected' field" in caplog.text
    assert f"{path}:3: not valid JSON" in caplog.text
    assert f"{path}:4: 'chosen' and 'rejected' differ at turn 1, before the last assistant reply" in caplog.text
    assert f"{path}:5: 'chosen' must be one assistant message" in caplog.text
    assert f"{path}:6: 'chosen' is a string, so the record needs a 'prompt'" in caplog.text
    assert f"{path}:7: 'prompt' is empty" in caplog.text
    with pytest.raises(UserInputError, match="holds no usable preference records"):
        read_preference_pairs([write_jsonl(tmp_path / "bad.jsonl", ["{}"])])
    with pytest.raises(UserInputError, match="must be .jsonl or .json records"):
        read_preference_pairs([tmp_path / "notes.txt"])


def test_the_last_reply_is_the_last_stretch_of_the_assistant_mask():
    assert last_reply_mask([False, True, True, False, False, True, True, False]).tolist() == [False] * 5 + [True, True, False]
    assert last_reply_mask([False, False]).tolist() == [False, False]


def test_the_built_in_set_spoils_each_answer_one_of_three_ways():
    answer = "The len function returns the number of items in a container."
    answers = [answer, "Something else entirely."]
    kinds = {spoiled(answer, f"question {number}", answers)[0] for number in range(30)}
    assert kinds == {"another", "truncated", "repeated"}
    for number in range(30):
        how, text = spoiled(answer, f"question {number}", answers)
        assert text != answer and (how != "another" or text == answers[1])
    how, text = spoiled("Too short.", "q", answers)
    assert how == "another" and text in answers


# ------------------------------------------------------------------------------------------ the loss


def two_pairs(tokenizer):
    """A tiny float32 model in eval mode and one batch of two pairs."""
    records = toy_pairs(2)
    from minigpt.preference_data import parse_preference
    pairs = [parse_preference(record, f"pairs:{number}") for number, record in enumerate(records)]
    stream = PreferenceBatches(encode_pairs(pairs, tokenizer, 64), 2, tokenizer.pad_id, loop=False)
    config = dataclasses.replace(preset_config("tiny").model, vocab_size=tokenizer.vocab_size, dropout=0.0)
    torch.manual_seed(0)
    return GPT(config), stream


def test_the_loss_at_the_start_is_ln_2(tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    model, stream = two_pairs(tokenizer)
    stream.encoded.reference = reference_log_probs(model, stream, torch.device("cpu"), torch.float32)
    batch = next(iter(stream))
    model.train()  # as in training (dropout is 0 in DPO)
    for rpo_alpha in (0.0, 1.0):
        objective = Preference(beta=0.1, rpo_alpha=rpo_alpha)
        loss = objective.loss(model, batch) / objective.weight(batch)
        metrics = objective.log_metrics()
        assert abs(metrics["dpo_loss"] - LN2) < 1e-6 and metrics["margin"] == pytest.approx(0.0, abs=1e-6)
        if not rpo_alpha:
            assert abs(loss.item() - LN2) < 1e-6


def test_the_loss_and_its_gradient_match_a_hand_computation(tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    model, stream = two_pairs(tokenizer)
    inputs, targets, _ = next(iter(stream))
    reference = torch.tensor([[-30.0, -31.5], [-28.0, -27.0]])  # a reference that is not the model
    beta, alpha = 0.5, 0.3
    objective = Preference(beta=beta, rpo_alpha=alpha)
    loss = objective.loss(model, (inputs, targets, reference)) / 2
    gradients = torch.autograd.grad(loss, list(model.parameters()))

    # By hand: log-softmax of the logits, the target tokens' entries summed over each reply.
    def by_hand():
        total = 0.0
        for pair in range(2):
            logps, lengths = [], []
            for reply in range(2):
                logits, _ = model(inputs[pair, reply][None])
                scored = targets[pair, reply] != -100
                log_softmax = torch.log_softmax(logits[0].double(), dim=-1)
                logps.append(log_softmax[scored, targets[pair, reply][scored]].sum())
                lengths.append(int(scored.sum()))
            margin = beta * ((logps[0] - reference[pair, 0]) - (logps[1] - reference[pair, 1]))
            total = total + torch.log1p(torch.exp(-margin)) + alpha * (-logps[0] / lengths[0])
        return total / 2

    expected = by_hand()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for got, want in zip(gradients, torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ runs


def test_a_run_starts_at_ln_2_learns_the_preference_and_stores_its_reference(tmp_path, chat_model, pairs_file):
    trainer = prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "dpo", **{"train.eval_steps": 5, "train.plot_loss": True}),
                          show_progress=False)
    before = trainer.objective.evaluate(trainer.model, trainer.val_batches, 0, torch.float32)
    assert before["val_accuracy"] == 0.5 and before["val_margin"] == 0  # the model is its reference: every pair a tie
    summary = trainer.train()
    rows = read_metrics(trainer.run_dir / "metrics.jsonl")
    train = [row for row in rows if row["type"] == "train"]
    evaluations = [row for row in rows if row["type"] == "eval"]
    assert abs(train[0]["dpo_loss"] - LN2) < 1e-6  # ln 2 whatever rpo_alpha is; the loss adds its term
    assert abs(train[0]["loss"] - (LN2 + trainer.train_config.rpo_alpha * train[0]["nll_chosen"])) < 1e-5
    assert {"rewards_chosen", "rewards_rejected", "margin", "accuracy", "logps_chosen", "logps_rejected"} <= set(train[0])
    assert train[-1]["margin"] > 0 and train[-1]["loss"] < train[0]["loss"]
    assert evaluations[-1]["val_accuracy"] >= 0.8 and evaluations[-1]["val_margin"] > evaluations[0]["val_margin"] > 0
    assert (trainer.run_dir / "plots" / "preference_curves_latest.png").is_file()
    assert summary["monitor"] == "val_accuracy" and summary["best_val_accuracy"] == max(row["val_accuracy"] for row in evaluations)
    # The stored reference is what the starting model computes, recomputed now.
    stored = load_file(trainer.run_dir / REFERENCE_FILE)
    initial = load_language_model(chat_model)
    recomputed = reference_log_probs(initial.model, trainer.train_batches, torch.device("cpu"), torch.float32)
    np.testing.assert_allclose(stored["train"].numpy(), recomputed, rtol=0, atol=1e-5)
    assert stored["val"].shape == (len(trainer.val_batches.encoded), 2)


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly(tmp_path, chat_model, pairs_file):
    straight = prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "straight"), show_progress=False)
    straight.train()

    class StopAtTen(Callback):
        def on_log(self, trainer, row):
            if row["step"] == 10:
                trainer.stop_reason = "signal"  # as Ctrl-C does: save and stop

    stopped = prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "stopped"), show_progress=False, callbacks=[StopAtTen()])
    assert stopped.train()["steps"] == 10
    resume = {"train.resume": str(stopped.run_dir / "checkpoint_step_10")}
    resumed = prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "stopped", **resume), show_progress=False)
    resumed.train()
    expected = load_file(straight.run_dir / "final_model" / "model.safetensors")
    actual = load_file(resumed.run_dir / "final_model" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    rows = [{key: row[key] for key in ("step", "loss", "margin")} for row in read_metrics(straight.run_dir / "metrics.jsonl") if row["type"] == "train"]
    assert rows == [{key: row[key] for key in ("step", "loss", "margin")}
                    for row in read_metrics(resumed.run_dir / "metrics.jsonl") if row["type"] == "train"]
    (stopped.run_dir / REFERENCE_FILE).unlink()
    with pytest.raises(UserInputError, match="reference log-probabilities are stored there"):
        prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "stopped", **resume), show_progress=False)


def test_with_lora_only_the_adapters_train_from_ln_2(tmp_path, chat_model, pairs_file):
    trainer = prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "lora", **{"train.lora_rank": 2, "train.max_steps": 4,
                                                                                    "train.val_fraction": 0.0}), show_progress=False)
    trainable = {name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad}
    assert trainable and all("lora" in name for name in trainable)
    trainer.train()
    first = read_metrics(trainer.run_dir / "metrics.jsonl")[0]
    assert abs(first["dpo_loss"] - LN2) < 1e-6
    assert (trainer.run_dir / "final_model" / LORA_ADAPTER_WEIGHTS).is_file()


def test_ref_model_is_the_reference(tmp_path, chat_model, pairs_file):
    from minigpt.model_folder import save_model_directory
    loaded = load_language_model(chat_model)
    with torch.no_grad():
        loaded.model.lm_head.weight.mul_(1.5)  # another model with the same tokenizer: sharper predictions
    other = save_model_directory(tmp_path / "other", loaded.model, loaded.config, loaded.tokenizer)
    trainer = prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "ref", **{"train.ref_model": str(other), "train.max_steps": 1,
                                                                                   "train.val_fraction": 0.0}), show_progress=False)
    trainer.train()
    stored = load_file(trainer.run_dir / REFERENCE_FILE)["train"].numpy()
    np.testing.assert_allclose(stored, reference_log_probs(loaded.model, trainer.train_batches, torch.device("cpu"), torch.float32), atol=1e-5)
    assert abs(read_metrics(trainer.run_dir / "metrics.jsonl")[0]["dpo_loss"] - LN2) > 1e-3  # the model is not its reference


def test_refusals_in_one_sentence(tmp_path, chat_model, pairs_file, tokenizer_file):
    common = ["--init-from", str(chat_model), "--data-files", str(pairs_file), "--output-dir", str(tmp_path / "runs")]
    refused = run_in_process("train", "--stage", "dpo", *common, "--dpo-beta", "0", cwd=tmp_path)
    assert refused.returncode == 2 and "train.dpo_beta must be positive" in refused.stderr
    refused = run_in_process("train", "--stage", "dpo", *common, "--rpo-alpha", "-1", cwd=tmp_path)
    assert refused.returncode == 2 and "train.rpo_alpha must not be negative" in refused.stderr
    refused = run_in_process("train", "--stage", "sft", *common, "--dpo-beta", "0.2", cwd=tmp_path)
    assert refused.returncode == 2 and "--dpo-beta applies to --stage dpo only" in refused.stderr
    refused = run_in_process("train", "--stage", "dpo", "--data-files", str(pairs_file), cwd=tmp_path)
    assert refused.returncode == 2 and "Preference tuning starts from a chat model: give it with --init-from" in refused.stderr
    text = tmp_path / "notes.txt"
    text.write_text("plain text\n")
    refused = run_in_process("train", "--stage", "dpo", "--init-from", str(chat_model), "--data-files", str(text), cwd=tmp_path)
    assert refused.returncode == 2 and "Preference data must be .jsonl or .json records" in refused.stderr
    # A reference whose tokenizer differs: a model of the same shape with a character vocabulary.
    other = tmp_path / "other"
    from minigpt.model_folder import save_model_directory
    from minigpt.tokenizer import train_char_tokenizer
    tokenizer = train_char_tokenizer(["What is 1 times two? 2 is the answer."], show_progress=False)
    loaded = load_language_model(chat_model)
    config = dataclasses.replace(loaded.config, model=dataclasses.replace(loaded.config.model, vocab_size=tokenizer.vocab_size))
    save_model_directory(other, GPT(config.model), config, tokenizer)
    with pytest.raises(UserInputError, match="has another tokenizer"):
        prepare_run(dpo_config(tmp_path, chat_model, pairs_file, "ref", **{"train.ref_model": str(other)}), show_progress=False)


def test_dry_run_and_help(tmp_path, chat_model, pairs_file):
    result = run_in_process("train", "--stage", "dpo", "--init-from", str(chat_model), "--data-files", str(pairs_file),
                            "--output-dir", str(tmp_path / "runs"), "--dry-run-no-probe", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "16 x 64 tokens" in result.stdout  # the estimate's micro-batch: 8 pairs are 16 rows
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").glob("*/reference_logprobs.safetensors"))
    assert "--dpo-beta" in run_in_process("train", "--help", cwd=tmp_path).stdout


# ------------------------------------------------------------------------------------------ anomaly rules


def rows(**series):
    length = len(next(iter(series.values())))
    return [{"type": "train", "step": 5 * (index + 1), "lr": 1e-6, "dpo_beta": 0.1, **{name: values[index] for name, values in series.items()}}
            for index in range(length)]


def test_a_loss_stuck_at_ln_2_names_the_learning_rate_and_beta():
    stuck = rows(loss=[LN2] * 30, dpo_loss=[LN2] * 30, margin=[1e-5] * 30, logps_chosen=[-20.0] * 30, logps_rejected=[-21.0] * 30)
    found = {anomaly.kind: anomaly for anomaly in diagnose(stuck)}
    assert "preference_stuck" in found and "learning rate 1e-06" in found["preference_stuck"].advice
    assert "beta 0.1" in found["preference_stuck"].advice
    moving = rows(loss=[LN2 - 0.01 * index for index in range(30)], dpo_loss=[LN2 - 0.01 * index for index in range(30)],
                  margin=[0.02 * index for index in range(30)], logps_chosen=[-20.0] * 30, logps_rejected=[-21.0 - index for index in range(30)])
    assert not {anomaly.kind for anomaly in diagnose(moving)} & {"preference_stuck", "chosen_falling"}


def test_both_replies_falling_and_exploding_margins_are_found():
    falling = rows(dpo_loss=[0.5] * 30, margin=[1.0 + 0.1 * index for index in range(30)],
                   logps_chosen=[-20.0 - index for index in range(30)], logps_rejected=[-21.0 - 1.2 * index for index in range(30)])
    assert "chosen_falling" in {anomaly.kind for anomaly in diagnose(falling)}
    exploding = rows(dpo_loss=[0.001] * 30, margin=[1.0] * 20 + [60.0] * 10, logps_chosen=[-20.0] * 30, logps_rejected=[-80.0] * 30)
    assert "margin_exploding" in {anomaly.kind for anomaly in diagnose(exploding)}
