"""Chat fine-tuning and LoRA on the one trainer: rows, starting from a model, exact resume, refusals."""

import dataclasses
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_file, run_script
from minigpt.config import apply_overrides, preset_config
from minigpt.data import ParallelBatches, TokenBlockStream
from minigpt.errors import UserInputError
from minigpt.generation import SamplingConfig, generate
from minigpt.metrics import read_metrics
from minigpt.loss import IGNORE_INDEX
from minigpt.lora import store_frozen_base
from minigpt.model import GPT
from minigpt.model_folder import LORA_ADAPTER_WEIGHTS, load, save_model_directory
from minigpt.run import initial_model_config, prepare_run
from minigpt.tokenizer import load_tokenizer
from minigpt.trainer import Callback


def settings(tmp_path, tokenizer_file, name, **overrides):
    return apply_overrides(preset_config("tiny"), {
        "train.tokenizer_path": str(tokenizer_file), "train.output_dir": str(tmp_path / "runs"), "train.run_name": name,
        "train.sample_tokens": 0, "train.eval_batches": 1, "train.disable_monitoring": True, "train.dtype": "float32",
        "train.shuffle_buffer": 8, **overrides,
    })


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, corpus_jsonl, tokenizer_file):
    """A tiny model pretrained for a few steps: the base every test here fine-tunes."""
    tmp_path = tmp_path_factory.mktemp("pretrained")
    config = settings(tmp_path, tokenizer_file, "base", **{"train.data_files": [str(corpus_jsonl)], "train.max_steps": 20})
    prepare_run(config, show_progress=False).train()
    return tmp_path / "runs" / "base" / "final_model"


def test_each_row_holds_one_whole_conversation_and_padding_is_never_a_target(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    stream = TokenBlockStream([chat_file(tmp_path / "chat.jsonl")], tokenizer, block_size=64, batch_size=4,
                              assistant_only_loss=True, one_document_per_row=True)
    inputs, targets = next(iter(stream))
    for row, row_targets in zip(inputs.tolist(), targets.tolist()):
        assert row[0] == tokenizer.im_start_id and row.count(tokenizer.im_start_id) == 2  # one user and one assistant turn
        end = row.index(tokenizer.eos_id)
        assert set(row[end + 1:]) <= {tokenizer.pad_id}  # nothing of another conversation after it
        counted = [token for token in row_targets if token != IGNORE_INDEX]
        assert tokenizer.decode(counted).endswith("<|im_end|><|endoftext|>") and "What is" not in tokenizer.decode(counted)


def test_a_batch_is_cut_after_its_last_target_and_the_loss_is_unchanged(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    stream = TokenBlockStream([chat_file(tmp_path / "chat.jsonl")], tokenizer, block_size=128, batch_size=4,
                              assistant_only_loss=True, one_document_per_row=True, loop=False)
    inputs, targets = next(iter(stream))
    width = inputs.shape[1]
    assert targets.shape[1] == width and width % 32 == 0 and width < 128  # these conversations are short
    assert inputs.is_contiguous() and targets.is_contiguous()  # evaluation views them flat
    assert (targets[:, width - 32:] != IGNORE_INDEX).any()  # no whole step of 32 columns without a target is kept
    full_inputs = torch.cat([inputs, torch.full((4, 128 - width), tokenizer.pad_id)], dim=1)  # the rows as they were
    full_targets = torch.cat([targets, torch.full((4, 128 - width), IGNORE_INDEX)], dim=1)
    config = dataclasses.replace(preset_config("tiny").model, vocab_size=tokenizer.vocab_size, block_size=128)
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        _, trimmed = model(inputs, targets, loss_reduction="sum")
        _, full = model(full_inputs, full_targets, loss_reduction="sum")
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-4)


def test_a_long_conversation_is_cut_at_its_end_and_counted(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    path = tmp_path / "long.jsonl"
    turns = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a time " * 40}]
    path.write_text(json.dumps({"conversations": turns}) + "\n" + json.dumps({"conversations": turns[:1] * 40 + turns[1:]}) + "\n")
    stream = TokenBlockStream([path], tokenizer, block_size=32, batch_size=2, assistant_only_loss=True, one_document_per_row=True, loop=False)
    batches = list(stream)
    assert len(batches) == 1 and batches[0][0].shape == (1, 32)
    assert tokenizer.decode(batches[0][0][0].tolist()).startswith("<|im_start|>user\nTell me a story.")  # the question stays
    assert stream.report.truncated == 2 and stream.report.dropped == 1  # the second: only user turns fit


def varied_chat_file(path):
    """Conversations of many lengths (some with a system turn, some with two exchanges), so rows pack unevenly."""
    with open(path, "w", encoding="utf-8") as file:
        for number in range(40):
            turns = [{"role": "system", "content": "Be brief."}] if number % 3 == 0 else []
            turns += [{"role": "user", "content": f"What is {number} times two?"},
                      {"role": "assistant", "content": f"{number} times two is {2 * number}." + " Indeed." * (number % 5)}]
            if number % 4 == 0:
                turns += [{"role": "user", "content": "And plus one?"}, {"role": "assistant", "content": f"{2 * number + 1}."}]
            file.write(json.dumps({"conversations": turns}) + "\n")
    return path


def test_packed_rows_hold_several_whole_conversations_each_numbered_from_zero(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    stream = TokenBlockStream([varied_chat_file(tmp_path / "chat.jsonl")], tokenizer, block_size=256, batch_size=4,
                              assistant_only_loss=True, pack_documents=True, loop=False)
    rows = 0
    for inputs, targets, positions in stream:
        for row, row_targets, row_positions in zip(inputs.tolist(), targets.tolist(), positions.tolist()):
            rows += 1
            starts = [index for index, position in enumerate(row_positions) if position == 0]
            for start, end in zip(starts, starts[1:] + [len(row)]):
                assert row_positions[start:end] == list(range(end - start))  # positions restart with each conversation
                if row[start] != tokenizer.pad_id:  # a conversation (the padding is a sequence of its own)
                    assert row[start] == tokenizer.im_start_id  # and it ends in this row: its end is read or predicted here
                    assert tokenizer.eos_id in row[start:end] + [row_targets[end - 1]]
                    assert row_targets[start - 1] == IGNORE_INDEX if start else True  # a start is nobody's target
    report = stream.report
    assert report.row_documents == 40 and report.rows == rows < 40 / 2  # several conversations per row, none lost
    assert report.row_tokens > 0.7 * rows * 257  # rows are mostly conversation, not padding


@pytest.mark.parametrize("family", ["minigpt", "gemma3-like"])
def test_packed_rows_give_each_conversation_the_loss_and_gradient_of_a_row_of_its_own(tmp_path, tokenizer_file, family):
    """The same conversations, one per row and packed: the same loss per conversation and the same
    gradient of their sum. The Gemma 3-like model has sliding-window layers (a window shorter
    than a conversation) with a rotary base of their own, so both masks and both rotary paths are checked,
    and its packed pass runs with gradient checkpointing."""
    tokenizer = load_tokenizer(tokenizer_file)
    data = varied_chat_file(tmp_path / "chat.jsonl")

    def stream(**layout):
        return TokenBlockStream([data], tokenizer, block_size=256, batch_size=64, assistant_only_loss=True, loop=False, **layout)

    (own_inputs, own_targets), = list(stream(one_document_per_row=True))
    (inputs, targets, positions), = list(stream(pack_documents=True))
    assert own_inputs.size(0) == 40 and inputs.size(0) < 20
    config = dataclasses.replace(preset_config("tiny").model, vocab_size=tokenizer.vocab_size, block_size=256)
    if family == "gemma3-like":
        config = dataclasses.replace(config, qk_norm=True, norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True,
                                     mlp_activation="gelu_tanh", query_pre_attn_scalar=24.0, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"], rope_local_theta=100.0)
    torch.manual_seed(0)
    model = GPT(config)

    def per_conversation(losses, conversation_ids):
        return torch.zeros(40).index_add(0, conversation_ids.flatten(), losses)

    _, own_losses = model(own_inputs, own_targets, loss_reduction="none")
    own = per_conversation(own_losses, torch.arange(40)[:, None].expand_as(own_inputs))
    own.sum().backward()
    own_gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    model.zero_grad()
    # The Gemma 3-like packed pass recomputes its blocks in the backward pass (--gradient-checkpointing):
    # that path must hand each block its mask too.
    model.gradient_checkpointing = family == "gemma3-like"
    _, packed_losses = model(inputs, targets, loss_reduction="none", positions=positions)
    starts = (positions == 0) & (inputs != tokenizer.pad_id)  # the padding after a row's conversations carries no loss
    conversation_ids = (starts.flatten().cumsum(0) - 1).view_as(positions)  # in reading order, as the rows above
    assert int(conversation_ids.max()) == 39
    packed = per_conversation(packed_losses, conversation_ids)
    torch.testing.assert_close(packed, own, rtol=1e-5, atol=1e-5)
    packed.sum().backward()
    for name, parameter in model.named_parameters():  # float32 sums in another order: 1e-7 of the largest entry seen
        expected = own_gradients[name]
        torch.testing.assert_close(parameter.grad, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()), msg=name)


def test_resuming_with_the_other_packing_is_refused(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    data = chat_file(tmp_path / "chat.jsonl")

    def stream(packed):
        return TokenBlockStream([data], tokenizer, block_size=64, batch_size=2, assistant_only_loss=True,
                                one_document_per_row=not packed, pack_documents=packed)

    packed, own_rows = stream(True), stream(False)
    next(iter(packed)), next(iter(own_rows))
    with pytest.raises(UserInputError, match="saved with --packing on and this run asks for --packing off: resume with --packing on"):
        stream(False).load_state_dict(packed.state_dict())
    with pytest.raises(UserInputError, match="resume with --packing off"):
        stream(True).load_state_dict(own_rows.state_dict())
    older = {key: value for key, value in own_rows.state_dict().items() if key != "pack_documents"}  # saved before packing existed
    with pytest.raises(UserInputError, match="resume with --packing off"):
        stream(True).load_state_dict(older)
    with pytest.raises(UserInputError, match="resume with --packing on"):  # read by data-loader workers: the same refusal
        ParallelBatches(stream(False), 2).load_state_dict(ParallelBatches(stream(True), 2).state_dict())


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fine_tuning_resumes_exactly_after_a_stop(tmp_path, tokenizer_file, pretrained, lora_rank):
    data = chat_file(tmp_path / "chat.jsonl")
    common = {"train.stage": "sft", "train.init_from": str(pretrained), "train.data_files": [str(data)],
              "train.max_steps": 20, "train.save_steps": 10, "train.eval_steps": 10, "train.lora_rank": lora_rank,
              "train.tokenizer_path": ""}

    def config(name):  # as the command line builds it: the model's shape comes from the initial model
        return dataclasses.replace(settings(tmp_path, tokenizer_file, name, **common), model=initial_model_config(str(pretrained)))

    straight = prepare_run(config("straight"), show_progress=False)
    straight.train()

    class StopAtTen(Callback):
        def on_log(self, trainer, row):
            if row["step"] == 10:
                trainer.stop_reason = "signal"  # as Ctrl-C does: save and stop

    stopped = prepare_run(config("stopped"), show_progress=False, callbacks=[StopAtTen()])
    assert stopped.train()["steps"] == 10
    resumed = prepare_run(apply_overrides(config("stopped"), {"train.resume": str(stopped.run_dir / "checkpoint_step_10")}),
                          show_progress=False)
    resumed.train()
    weights = LORA_ADAPTER_WEIGHTS if lora_rank else "model.safetensors"
    expected = load_file(straight.run_dir / "final_model" / weights)
    actual = load_file(resumed.run_dir / "final_model" / weights)
    assert expected.keys() == actual.keys() and all(torch.equal(expected[name], actual[name]) for name in expected)
    if lora_rank:
        saved = load_file(straight.run_dir / "checkpoint_step_10" / "model.safetensors")
        assert saved and all("lora" in name for name in saved)  # the frozen base is not copied into checkpoints
        backup = tmp_path / "base-backup"
        shutil.copytree(pretrained, backup)
        try:  # the base retrained (a valid model directory, other weights): the adapter no longer fits it
            base = load(pretrained)
            model, tokenizer, base_config = base.model, base.tokenizer, base.config
            with torch.no_grad():
                model.final_norm.weight.add_(1e-3)
            save_model_directory(pretrained, model, base_config, tokenizer)
            with pytest.raises(UserInputError, match="has changed"):
                prepare_run(apply_overrides(config("stopped"), {"train.resume": str(stopped.run_dir / "checkpoint_step_10")}),
                            show_progress=False)
        finally:
            shutil.rmtree(pretrained)
            shutil.copytree(backup, pretrained)


@pytest.mark.parametrize("precision", [
    pytest.param({"train.compile": True}, id="compiled", marks=pytest.mark.slow),  # inductor: tens of seconds
    pytest.param({"train.dtype": "bfloat16"}, id="bfloat16"),
])
def test_a_lora_run_trains_only_its_adapters_and_its_final_model_generates(tmp_path, tokenizer_file, pretrained, precision):
    """LoRA through prepare_run and the Trainer, compiled or under bfloat16 autocast: the loss falls,
    the base weights do not move, final_model/ holds only the adapter, and it loads back onto the
    base and generates."""
    data = chat_file(tmp_path / "chat.jsonl")
    config = dataclasses.replace(settings(tmp_path, tokenizer_file, "lora", **{
        "train.stage": "sft", "train.init_from": str(pretrained), "train.data_files": [str(data)], "train.tokenizer_path": "",
        "train.lora_rank": 4, "train.max_steps": 12, "train.log_steps": 1, "train.eval_steps": 100, "train.warmup_steps": 2,
        "train.learning_rate": 1e-2, **precision}), model=initial_model_config(str(pretrained)))
    trainer = prepare_run(config, show_progress=False)
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    torch._dynamo.reset()  # forget graphs other tests compiled
    trainer.train()
    losses = [row["loss"] for row in read_metrics(trainer.run_dir / "metrics.jsonl") if row.get("type") == "train"]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    after = trainer.model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items() if "lora_" not in name)
    assert all(not torch.equal(after[name], tensor) for name, tensor in before.items() if "lora_B" in name)
    final = trainer.run_dir / "final_model"
    assert (final / LORA_ADAPTER_WEIGHTS).is_file() and not (final / "model.safetensors").exists()
    merged = load(final)  # base + adapter, merged
    loaded, tokenizer = merged.model, merged.tokenizer
    prompt = tokenizer.chat_prompt([{"role": "user", "content": "What is 3 times two?"}])
    # The adapter on a freshly loaded base, held as the run held it: a bfloat16 run kept its frozen base in bfloat16.
    reference = load(final, merge_adapter=False).model
    if trainer.dtype != torch.float32:
        store_frozen_base(reference, trainer.dtype)
    with torch.no_grad():
        torch.testing.assert_close(reference(torch.tensor([prompt]))[0], trainer.model.eval()(torch.tensor([prompt]))[0], rtol=1e-4, atol=1e-5)
        if trainer.dtype == torch.float32:  # merged, the same float32 model
            torch.testing.assert_close(loaded(torch.tensor([prompt]))[0], reference(torch.tensor([prompt]))[0], rtol=1e-4, atol=1e-5)
    reply = generate(loaded, prompt, SamplingConfig(max_new_tokens=8, seed=0))
    assert 0 < len(reply) <= 8 and all(0 <= token < tokenizer.vocab_size for token in reply)


def test_flags_that_contradict_the_initial_model_are_refused(tmp_path, pretrained):
    chat_file(tmp_path / "chat.jsonl")
    wider = run_script("train.py", "--stage", "sft", "--init-from", str(pretrained), "--data-files", "chat.jsonl",
                       "--set", "model.n_embd=128", "--output-dir", "runs", cwd=tmp_path)
    assert wider.returncode == 2 and "model.n_embd = 64" in wider.stderr and "Traceback" not in wider.stderr
    lora_alone = run_script("train.py", "--config", "tiny", "--lora-rank", "4", "--output-dir", "runs", cwd=tmp_path)
    assert lora_alone.returncode == 2 and "--init-from" in lora_alone.stderr
    assert not (tmp_path / "runs").exists()


def test_sft_from_the_command_line_then_chat(tmp_path, pretrained):
    result = run_script("train.py", "--stage", "sft", "--init-from", str(pretrained), "--max-steps", "10", "--eval-steps", "10",
                        "--lora-rank", "4", "--dtype", "float32", "--output-dir", "runs", "--run-name", "chat", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "trainable" in result.stdout and "Chat with it" in result.stdout
    final = tmp_path / "runs" / "chat" / "final_model"
    assert (final / LORA_ADAPTER_WEIGHTS).is_file() and not (final / "model.safetensors").exists()
    assert json.loads((final / "config.json").read_text())["train"]["stage"] == "sft"
    assert json.loads((final / "config.json").read_text())["train"]["packing"] == "on"  # recorded: a resume keeps it
    assert re.search(r"conversations laid out in [\d,]+ rows \([\d.]+ per row", result.stdout + result.stderr)  # the data report
    reply = run_script("chat.py", str(final), "--prompt", "What does len do?", "--max-new-tokens", "8", "--seed", "0", cwd=tmp_path)
    assert reply.returncode == 0, reply.stderr
    assert "never chat-tuned" not in reply.stderr


def test_conversations_with_no_assistant_turn_are_left_out_and_counted(tmp_path, tokenizer_file):
    """A conversation the assistant never speaks in has nothing to learn: it is not trained on
    (its <|endoftext|> alone would be the row's only target) but counted in the data report; data
    made only of such conversations is refused in one sentence."""
    tokenizer = load_tokenizer(tokenizer_file)
    question = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two times two?"}]
    answered = question + [{"role": "assistant", "content": "Four."}]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"conversations": turns}) + "\n" for turns in [question, answered, question[1:]]))
    stream = TokenBlockStream([path], tokenizer, block_size=64, batch_size=4, assistant_only_loss=True, one_document_per_row=True, loop=False)
    (inputs, _), = list(stream)
    assert len(inputs) == 1 and "Four." in tokenizer.decode(inputs[0].tolist())
    assert stream.report.no_assistant == 2
    unanswered = tmp_path / "unanswered.jsonl"
    unanswered.write_text(json.dumps({"conversations": question}) + "\n")
    empty = TokenBlockStream([unanswered], tokenizer, block_size=64, batch_size=4, assistant_only_loss=True, one_document_per_row=True)
    with pytest.raises(UserInputError, match=r"^No conversation in .*unanswered.jsonl has an assistant turn[^\n]*$"):
        empty.check_not_empty()
