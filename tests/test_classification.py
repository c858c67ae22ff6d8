"""Text classification: labelled data, heads on the trunk, metrics, the commands end to end."""

import json
import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import minigpt.trainer
from minigpt.checkpoint import load_weights
from minigpt.classification import (
    ClassificationObjective, balanced_class_weights, confusion_matrix, parse_task_weights, scores_from_confusion, scores_table,
)
from minigpt.cli import classify, train_classifier
from minigpt.config import RunConfig, apply_overrides
from minigpt.run import check_config
from minigpt.errors import UserInputError
from minigpt.heads import LM_ROWS_STEP, GPTClassifier
from minigpt.labelled_corpus import GROUPS, builtin_labelled_records, group_of
from minigpt.data import ROW_WIDTH_STEP
from minigpt.labelled_data import (
    ClassificationBatches, EncodedRecords, build_label_maps, encode_records, find_tasks, pad_batch, read_labelled_records,
)
from minigpt.loss import IGNORE_INDEX
from minigpt.model import GPT
from minigpt.model_folder import load_classifier, save_model_directory
from minigpt.tokenizer import SPECIAL_TOKENS, load_tokenizer

SHORT_RUN = ["--block-size", "32", "--batch-size", "8", "--eval-steps", "10", "--save-steps", "10", "--log-steps", "5",
             "--max-time", "0", "--dtype", "float32", "--disable-monitoring"]
TINY = ["--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2", "--vocab-size", "300", *SHORT_RUN]


def write_jsonl(path, records):
    path.write_text("".join((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n" for record in records),
                    encoding="utf-8")
    return path


def two_task_records(count):
    """Sentiment (strings) and length (integers) are both readable from the words."""
    records = []
    for number in range(count):
        good = number % 2 == 0
        words = ("great lovely happy fine " if good else "awful sad broken bad ") * (1 + number % 3)
        record = {"text": words.strip(), "sentiment_labels": "positive" if good else "negative", "size_labels": number % 3}
        if number % 7 == 3:
            del record["size_labels"]  # a missing label: the record still trains sentiment
        records.append(record)
    return records


# --- metrics, checked by hand ---------------------------------------------------------------

def test_metrics_match_a_hand_computed_imbalanced_case():
    true = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    predicted = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    counts = confusion_matrix(true, predicted, 2)
    assert counts.tolist() == [[8, 0], [1, 1]]
    scores = scores_from_confusion(counts)
    # class 0: precision 8/9, recall 1 -> F1 16/17; class 1: precision 1, recall 1/2 -> F1 2/3
    assert scores["accuracy"] == pytest.approx(0.9)
    assert scores["f1"] == pytest.approx([16 / 17, 2 / 3])
    assert scores["f1_macro"] == pytest.approx((16 / 17 + 2 / 3) / 2)
    assert scores["support"] == [8, 2]


def test_a_class_never_predicted_scores_zero_and_pulls_macro_f1_down():
    scores = scores_from_confusion(confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2))
    assert scores["accuracy"] == 0.75
    assert scores["precision"][1] == 0.0 and scores["recall"][1] == 0.0
    assert scores["f1_macro"] == pytest.approx((6 / 7) / 2)


def test_the_scores_table_lists_each_class_with_its_figures():
    scores = scores_from_confusion(confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 0, 0, 0]), 2))
    lines = scores_table(scores, ["spam", "ham"]).splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "F1", "support"]
    assert lines[1].split() == ["spam", "0.7500", "1.0000", "0.8571", "3"]
    assert lines[2].split() == ["ham", "0.0000", "0.0000", "0.0000", "1"]


def test_classes_absent_from_the_evaluation_are_left_out_of_the_mean():
    scores = scores_from_confusion(confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 1]), 3))
    assert scores["f1_macro"] == 1.0


def test_task_and_class_weights():
    assert parse_task_weights("a=2,b=0.5", ["a", "b", "c"]) == {"a": 2.0, "b": 0.5, "c": 1.0}
    with pytest.raises(UserInputError, match="TASK=WEIGHT"):
        parse_task_weights("z=1", ["a"])
    assert balanced_class_weights(np.array([0, 0, 0, 1, IGNORE_INDEX]), 2).tolist() == pytest.approx([4 / 6, 2.0])


# --- data -----------------------------------------------------------------------------------

def test_records_tasks_label_maps_and_bad_lines(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a", "sentiment_labels": "pos", "toxicity_labels": 1},
        {"text": "b", "sentiment_labels": "neg"},
        {"sentiment_labels": "neg"},
        {"text": "c", "toxicity_labels": 1.5},
        "not json",
        {"text": "d", "sentiment_labels": "pos", "toxicity_labels": 0},
    ])
    with caplog.at_level(logging.WARNING):
        records = read_labelled_records([path])
    assert [record.text for record in records] == ["a", "b", "d"]
    assert f"{path}:3: no text in field 'text'" in caplog.text
    assert f"{path}:4: field 'toxicity_labels': label 1.5 is a float where a class" in caplog.text
    assert f"{path}:5: not valid JSON" in caplog.text
    tasks = find_tasks(records)
    assert tasks == ["sentiment", "toxicity"]
    assert build_label_maps(records, tasks) == {"sentiment": ["neg", "pos"], "toxicity": [0, 1]}
    with pytest.raises(UserInputError, match="no training record has a 'topic_labels'"):
        find_tasks(records, "topic")


def test_refusals_in_one_sentence(tmp_path):
    records = read_labelled_records([write_jsonl(tmp_path / "one.jsonl", [{"text": "x", "labels": "a"}, {"text": "y", "labels": "a"}])])
    with pytest.raises(UserInputError, match="single class"):
        build_label_maps(records, ["labels"])
    with pytest.raises(UserInputError, match="holds no usable labelled records"):
        read_labelled_records([write_jsonl(tmp_path / "blank.jsonl", ["", "   "])])
    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"text": "x", "labels": 1}, {"text": "y", "labels": 2}]))
    assert [record.labels for record in read_labelled_records([array])] == [{"labels": 1}, {"labels": 2}]


def test_unknown_label_is_reported_and_ignored(tmp_path, tokenizer_file, caplog):
    tokenizer = load_tokenizer(tokenizer_file)
    records = read_labelled_records([write_jsonl(tmp_path / "val.jsonl", [{"text": "x", "labels": "c"}, {"text": "y", "labels": "a"}])])
    with caplog.at_level(logging.WARNING):
        encoded = encode_records(records, tokenizer, {"labels": ["a", "b"]}, block_size=8)
    assert f"{tmp_path / 'val.jsonl'}:1: label 'c' of task 'labels' was not seen in the training data" in caplog.text
    assert encoded.labels.tolist() == [[IGNORE_INDEX], [0]]


def test_long_texts_are_cut_and_counted_and_the_stream_resumes_exactly(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    records = read_labelled_records([write_jsonl(tmp_path / "t.jsonl", two_task_records(21))])
    maps = build_label_maps(records, find_tasks(records))
    encoded = encode_records(records, tokenizer, maps, block_size=6)
    assert encoded.report.truncated > 0 and max(len(ids) for ids in encoded.ids) == 6
    stream = ClassificationBatches(encoded, 4, tokenizer.pad_id, seed=3)
    batches = iter(stream)
    for _ in range(7):  # into the second epoch
        next(batches)
    state = stream.state_dict()
    expected = [next(batches) for _ in range(3)]
    assert state == {"epoch": {"passes": 1, "position": 4}, "group_by_length": False}  # 21 records: 6 batches a pass, the last one short
    resumed = ClassificationBatches(encoded, 4, tokenizer.pad_id, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(expected, iter(resumed)):
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    saved_before_epoch_state = ClassificationBatches(encoded, 4, tokenizer.pad_id, seed=3)
    saved_before_epoch_state.load_state_dict({"epoch": 1, "position": 4})  # the format before EpochState
    for want, got in zip(expected, iter(saved_before_epoch_state)):
        assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_batch_widths_are_few_whatever_the_texts_lengths():
    """Batches are padded to a multiple of ROW_WIDTH_STEP columns, never past the longest record,
    and each row's length still says where its text ends."""
    lengths = [3, 5, 33, 40, 70, 71, 100, 2, 64, 65]
    ids = [np.arange(1, 1 + length, dtype=np.int64) for length in lengths]
    encoded = EncodedRecords(ids, np.zeros((len(ids), 1), dtype=np.int64))
    for batch_ids, batch_lengths, _ in ClassificationBatches(encoded, 2, pad_id=0, loop=False):
        longest = int(batch_lengths.max())
        assert batch_ids.size(1) == min(100, -(-longest // ROW_WIDTH_STEP) * ROW_WIDTH_STEP)
        for row, length in zip(batch_ids, batch_lengths):
            assert row[:length].tolist() == list(range(1, 1 + int(length))) and not row[length:].any()


# --- the model ------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["last", "mean", "max"])
def test_padding_never_changes_a_prediction(pooling):
    torch.manual_seed(0)
    config = apply_overrides(RunConfig(), {"model.vocab_size": 50, "model.block_size": 64, "model.n_layer": 2, "model.n_embd": 32,
                                           "model.n_head": 2, "train.pooling": pooling})
    config.train.label_maps = {"sentiment": ["neg", "pos"], "size": [0, 1, 2]}
    model = GPTClassifier(config).eval()
    text = np.array([5, 9, 13, 7, 21, 3, 8, 11], dtype=np.int64)
    other = np.arange(10, 10 + 4 * len(text), dtype=np.int64) % 50  # a row 4x as long: the text gets 24 pads
    alone = model.classify(*pad_batch([text], pad_id=3))
    in_batch = model.classify(*pad_batch([text, other], pad_id=3))
    for task in alone:
        torch.testing.assert_close(in_batch[task][0], alone[task][0], rtol=1e-5, atol=1e-6)


def test_loss_weight_counts_labelled_pairs_and_skips_missing_labels():
    objective = ClassificationObjective({"a": [0, 1], "b": ["x", "y", "z"]}, {"a": 1.0, "b": 0.5})
    labels = torch.tensor([[0, IGNORE_INDEX], [1, 2], [IGNORE_INDEX, 0]])
    assert objective.weight((None, None, labels)) == pytest.approx(2 * 1.0 + 2 * 0.5)
    logits = {"a": torch.zeros(3, 2), "b": torch.zeros(3, 3)}
    expected = 2 * np.log(2) + 0.5 * 2 * np.log(3)
    assert float(objective._losses(logits, labels)) == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_language_model_loss_is_the_next_token_loss_of_the_real_tokens_only():
    """The auxiliary loss of a padded batch is the language model's own loss over the texts'
    tokens (padding predicts nothing and is never predicted), scaled into the step's weighted mean."""
    torch.manual_seed(0)
    config = apply_overrides(RunConfig(), {"model.vocab_size": 50, "model.block_size": 64, "model.n_layer": 1, "model.n_embd": 32,
                                           "model.n_head": 2, "train.pooling": "max", "train.stage": "classify"})
    config.train.label_maps = {"labels": ["a", "b"]}
    model = GPTClassifier(config).eval()
    texts = [np.array([5, 9, 13, 7, 21], dtype=np.int64), np.array([8, 11, 30], dtype=np.int64), np.array([4], dtype=np.int64)]
    ids, lengths = pad_batch(texts, pad_id=3)
    labels = torch.tensor([[0], [1], [IGNORE_INDEX]])
    summed = sum(float(GPT.forward(model, torch.from_numpy(text[None, :-1]), torch.from_numpy(text[None, 1:]), loss_reduction="sum")[1])
                 for text in texts if len(text) > 1)
    language_model = summed / sum(len(text) - 1 for text in texts)  # 6 predicted tokens; the one-token text predicts none
    objective = ClassificationObjective(config.train.label_maps, {"labels": 1.0}, lm_loss_weight=0.5)
    classification = float(objective._losses(model.classify(ids, lengths), labels))
    assert objective.weight((ids, lengths, labels)) == 2.0
    assert float(objective.loss(model, (ids, lengths, labels))) == pytest.approx(classification + 0.5 * 2.0 * language_model, rel=1e-5)
    alone_ids, alone_lengths = pad_batch(texts[:1], pad_id=3)
    _, alone = model.classify(alone_ids, alone_lengths, language_model_loss=True)
    padded_ids = pad_batch([texts[0], np.arange(20, dtype=np.int64)], pad_id=3)[0][:1]
    _, padded = model.classify(padded_ids, torch.tensor([5]), language_model_loss=True)
    assert float(padded) == pytest.approx(float(alone), rel=1e-5)  # 15 pads after the text change nothing
    # However many positions a batch scores, the language-model head sees whole groups of rows: a
    # CPU's oneDNN keeps one compiled kernel per shape, and a new shape every step grew memory without end.
    seen = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].shape[0]))
    for count in (1, 2, 3):
        batch_ids, batch_lengths = pad_batch([np.arange(5, 5 + 7 * count + n, dtype=np.int64) for n in range(count)], pad_id=3)
        model.classify(batch_ids, batch_lengths, language_model_loss=True)
    assert len(seen) == 3 and all(rows == LM_ROWS_STEP for rows in seen)
    with pytest.raises(UserInputError, match="--freeze-trunk"):
        check_config(apply_overrides(config, {"train.lm_loss_weight": 1.0, "train.freeze_trunk": True, "train.init_from": "base"}))
    with pytest.raises(UserInputError, match="--stage classify only"):
        check_config(apply_overrides(config, {"train.lm_loss_weight": 1.0, "train.stage": "pretrain"}))


# --- the built-in labelled set --------------------------------------------------------------

def test_builtin_labelled_set_is_fixed_and_split_cleanly():
    train, validation = builtin_labelled_records()
    assert group_of("email.mime.text") == "network" and group_of("asyncio.tasks") == "concurrency" and group_of("this") is None
    assert {record["labels"] for record in train} == set(GROUPS) == {record["labels"] for record in validation}
    assert not {record["text"] for record in train} & {record["text"] for record in validation}
    assert len(validation) > 0.1 * (len(train) + len(validation))


# --- the commands, end to end ---------------------------------------------------------------

def test_multi_task_training_then_classify(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", two_task_records(60))
    val = write_jsonl(tmp_path / "val.jsonl", two_task_records(12) + [{"text": "great fine", "sentiment_labels": "meh"}])
    status = train_classifier.main(["--data-files", str(train), "--val-data-files", str(val), "--output-dir", str(tmp_path / "runs"),
                                    "--run-name", "mt", "--max-steps", "20", "--task-weights", "sentiment=1,size=0.5",
                                    "--class-weights", "balanced", "--pooling", "last", *TINY])
    assert status == 0
    run = tmp_path / "runs" / "mt"
    config = json.loads((run / "final_model" / "config.json").read_text())["train"]
    assert config["label_maps"] == {"sentiment": ["negative", "positive"], "size": [0, 1, 2]} and config["stage"] == "classify"
    evaluations = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evaluations and {"eval_f1_macro", "val_loss", "sentiment_f1_macro", "size_accuracy"} <= set(evaluations[-1])
    assert (run / "plots" / "confusion_sentiment_latest.png").is_file() and (run / "plots" / "confusion_size_step_10.png").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["monitor"] == "eval_f1_macro" and summary["best_eval_f1_macro"] == max(row["eval_f1_macro"] for row in evaluations)

    capsys.readouterr()
    output = tmp_path / "predictions.jsonl"
    assert classify.main([str(run / "final_model"), "--data-files", str(val), "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["text"] for line in lines] == [record["text"] for record in two_task_records(12)] + ["great fine"]
    size = lines[0]["predictions"]["size"]
    assert isinstance(size["label"], int) and set(size["probabilities"]) == {"0", "1", "2"}
    assert sum(size["probabilities"].values()) == pytest.approx(1.0)
    assert "sentiment: 12 labelled records" in printed and "macro-F1" in printed

    assert classify.main([str(run / "final_model"), "--text", "awful sad"]) == 0
    assert "sentiment: " in capsys.readouterr().out
    model = load_classifier(run / "final_model").model
    assert set(model.heads) == {"sentiment", "size"}


def test_a_classifier_trains_in_epochs_and_writes_the_best_evaluation_as_final_model_once(tmp_path, capsys, monkeypatch):
    """60 records in batches of 8: an epoch is 8 steps. Evaluated and saved at each epoch's end,
    every row carries its epoch, and final_model/ (written once) holds the best evaluation's weights."""
    written = []
    save_model_directory_once = minigpt.trainer.save_model_directory
    monkeypatch.setattr(minigpt.trainer, "save_model_directory",
                        lambda path, *rest: written.append(path.name) or save_model_directory_once(path, *rest))
    train = write_jsonl(tmp_path / "train.jsonl", two_task_records(60))
    val = write_jsonl(tmp_path / "val.jsonl", two_task_records(12))
    assert train_classifier.main(["--data-files", str(train), "--val-data-files", str(val), "--output-dir", str(tmp_path / "runs"),
                                  "--run-name", "epochs", "--num-epochs", "3", "--eval-strategy", "epoch", "--save-strategy", "epoch",
                                  *TINY]) == 0
    run = tmp_path / "runs" / "epochs"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["epoch"]) for row in rows if row["type"] == "eval"] == [(8, 1.0), (16, 2.0), (24, 3.0)]
    assert [row["epoch"] for row in rows if row["type"] == "train"] == [step / 8 for step in range(5, 25, 5)]
    assert sorted(path.name for path in run.glob("checkpoint_step_*")) == ["checkpoint_step_16", "checkpoint_step_24", "checkpoint_step_8"]
    assert written == ["final_model"]
    summary = json.loads((run / "summary.json").read_text())
    best = max((row for row in rows if row["type"] == "eval"), key=lambda row: row["eval_f1_macro"])
    assert summary["steps"] == 24 and summary["best_eval_f1_macro"] == best["eval_f1_macro"]
    loaded = load_classifier(run / "final_model")
    final, config = loaded.model, loaded.config
    assert (config.train.epoch_steps, config.train.max_steps) == (8, 24)
    kept = GPTClassifier(config)
    load_weights(kept, run / f"checkpoint_step_{best['step']}" / "model.safetensors")
    assert all(torch.equal(tensor, kept.state_dict()[name]) for name, tensor in final.state_dict().items())


def test_without_validation_data_the_last_weights_are_the_final_model(tmp_path, capsys):
    """--val-fraction 0 and no --val-data-files: nothing is evaluated, so final_model/ is the last
    step's weights (said so), and no confusion matrix is promised. Here with max pooling and the
    auxiliary next-token loss, which train together."""
    train = write_jsonl(tmp_path / "train.jsonl", two_task_records(40))
    assert train_classifier.main(["--data-files", str(train), "--val-fraction", "0", "--output-dir", str(tmp_path / "runs"),
                                  "--run-name", "last", "--max-steps", "10", "--pooling", "max", "--lm-loss-weight", "1", *TINY]) == 0
    run = tmp_path / "runs" / "last"
    printed = "".join(capsys.readouterr())
    assert "the last step's weights: there was no validation data" in printed and "Confusion matrices" not in printed
    assert not (run / "plots").exists() and not any('"eval"' in line for line in (run / "metrics.jsonl").read_text().splitlines())
    loaded = load_classifier(run / "final_model")
    final, config = loaded.model, loaded.config
    assert config.train.pooling == "max" and config.train.lm_loss_weight == 1.0
    last = GPTClassifier(config)
    load_weights(last, run / "checkpoint_step_10" / "model.safetensors")
    assert all(torch.equal(tensor, last.state_dict()[name]) for name, tensor in final.state_dict().items())


def test_chinese_texts_without_spaces_train_end_to_end(tmp_path, capsys):
    """Short texts with no spaces between words: --tokenizer-type auto measures that they are Chinese
    and makes each character a token (said in the log, recorded in config.json), ten steps of the
    smallest model learn the 48 records, and predictions come back as the training data's strings."""
    good, bad = ["这部电影非常好看", "我很喜欢这本书", "今天天气真好", "服务热情周到"], ["这部电影太难看了", "我讨厌这本书", "今天天气很糟糕", "服务态度很差"]
    records = [{"text": text, "labels": "好评"} for text in good * 6] + [{"text": text, "labels": "差评"} for text in bad * 6]
    train = write_jsonl(tmp_path / "zh.jsonl", records)
    assert train_classifier.main(["--data-files", str(train), "--val-data-files", str(train), "--output-dir", str(tmp_path / "runs"),
                                  "--run-name", "zh", "--max-steps", "10", "--learning-rate", "0.01", "--tokenizer-type", "auto", *TINY,
                                  "--eval-steps", "10", "--save-steps", "10"]) == 0
    assert "100% of the training text's characters are Chinese, Japanese or Korean" in "".join(capsys.readouterr())
    loaded = load_classifier(tmp_path / "runs" / "zh" / "final_model")
    assert loaded.config.train.tokenizer_type == "char" and loaded.tokenizer.kind == "char"
    assert loaded.tokenizer.vocab_size == len(SPECIAL_TOKENS) + 1 + len(set("".join(good + bad)))
    capsys.readouterr()
    output = tmp_path / "predictions.jsonl"
    assert classify.main([str(tmp_path / "runs" / "zh" / "final_model"), "--data-files", str(train), "--output", str(output)]) == 0
    assert "labels: 48 labelled records, accuracy 1.0000" in capsys.readouterr().out
    raw = output.read_text(encoding="utf-8")
    assert "这部电影非常好看" in raw  # written as text, not as \u escapes
    predictions = [json.loads(line)["predictions"]["labels"] for line in raw.splitlines()]
    assert [prediction["label"] for prediction in predictions] == [record["labels"] for record in records]
    assert all(set(prediction["probabilities"]) == {"好评", "差评"} for prediction in predictions)


@pytest.fixture
def pretrained_model(tmp_path, tokenizer_file):
    """A small language model's final_model/ to fine-tune (random weights do: only what changes is checked)."""
    tokenizer = load_tokenizer(tokenizer_file)
    config = apply_overrides(RunConfig(), {"model.vocab_size": tokenizer.vocab_size, "model.block_size": 32, "model.n_layer": 1,
                                           "model.n_embd": 32, "model.n_head": 2})
    torch.manual_seed(0)
    return save_model_directory(tmp_path / "pretrained", GPT(config.model), config, tokenizer)


@pytest.mark.parametrize("method", ["freeze-trunk", "lora"])
def test_linear_probe_and_lora_train_only_what_they_should(tmp_path, capsys, pretrained_model, method):
    """--freeze-trunk trains the heads alone; LoRA trains the heads and the adapters; either way the
    trunk's own weights stay the pretrained ones, and final_model/ is one classifier `classify` loads."""
    data = write_jsonl(tmp_path / "train.jsonl", two_task_records(40))
    extra = ["--freeze-trunk"] if method == "freeze-trunk" else ["--lora-rank", "4", "--lora-targets", "q,v"]
    status = train_classifier.main(["--init-from", str(pretrained_model), "--data-files", str(data), "--val-data-files", str(data),
                                    "--output-dir", str(tmp_path / "runs"), "--run-name", method, "--max-steps", "10",
                                    "--learning-rate", "0.01", *SHORT_RUN, *extra])
    assert status == 0
    run = tmp_path / "runs" / method
    pretrained = load_file(str(pretrained_model / "model.safetensors"))
    # A checkpoint of a run with frozen weights holds exactly the trainable ones.
    trained = load_file(str(run / "checkpoint_step_10" / "model.safetensors"))
    heads = {name for name in trained if name.startswith("heads.")}
    adapters = set(trained) - heads
    assert heads == {f"heads.{task}.{part}" for task in ("sentiment", "size") for part in ("weight", "bias")}
    if method == "freeze-trunk":
        assert adapters == set()
    else:
        assert adapters and all(".lora_A." in name or ".lora_B." in name for name in adapters)
        assert {name.split(".")[3] for name in adapters} == {"q_proj", "v_proj"}
        assert all(trained[name].abs().sum() > 0 for name in adapters if ".lora_B." in name)  # B starts at zero
    assert all(trained[f"heads.{task}.bias"].abs().sum() > 0 for task in ("sentiment", "size"))  # biases start at zero

    final = load_file(str(run / "final_model" / "model.safetensors"))
    merged = {name for name in pretrained if name.split(".")[-2] in ("q_proj", "v_proj")} if method == "lora" else set()
    for name, tensor in pretrained.items():
        if name in merged:  # the adapters, folded into the layers they sat on
            assert not torch.equal(final[name], tensor), name
        else:
            assert torch.equal(final[name], tensor), name
    capsys.readouterr()
    assert classify.main([str(run / "final_model"), "--text", "great lovely happy"]) == 0
    assert capsys.readouterr().out.startswith("sentiment: ")


def test_bad_input_is_one_sentence_and_writes_nothing(tmp_path, capsys):
    single = write_jsonl(tmp_path / "single.jsonl", [{"text": "x", "labels": "a"}, {"text": "y", "labels": "a"}])
    status = train_classifier.main(["--data-files", str(single), "--val-data-files", str(single), "--output-dir", str(tmp_path / "runs"),
                                    "--run-name", "bad", *TINY])
    error = capsys.readouterr().err
    assert status == 2 and "single class" in error and "Traceback" not in error
    assert not (tmp_path / "runs" / "bad").exists()
    assert train_classifier.main(["--freeze-trunk", "--data-files", str(single), "--output-dir", str(tmp_path / "runs"), *TINY]) == 2
    assert "--init-from" in capsys.readouterr().err
    # A missing validation file, like a missing training file, is one sentence; no built-in text
    # set is offered instead, since none holds labelled records.
    for flag in ("--data-files", "--val-data-files"):
        files = {"--data-files": str(single), flag: str(tmp_path / "missing.jsonl")}
        status = train_classifier.main([*(part for pair in files.items() for part in pair), "--output-dir", str(tmp_path / "runs"),
                                        "--run-name", "missing", *TINY])
        error = capsys.readouterr().err
        assert status == 2 and error.strip() == f"error: Data file {tmp_path / 'missing.jsonl'} does not exist; check the path.", error
        assert not (tmp_path / "runs" / "missing").exists()


def test_labels_true_one_and_one_point_zero_are_not_merged_into_one_class(tmp_path, caplog):
    """Python counts True == 1 == 1.0 as one set element: a class map built from them would merge
    three spellings into one class. A label is an integer or a string; the others are bad lines."""
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "a", "labels": 1}, {"text": "b", "labels": True}, {"text": "c", "labels": 1.0}, {"text": "d", "labels": 0},
    ])
    with caplog.at_level(logging.WARNING):
        records = read_labelled_records([path])
    assert [record.text for record in records] == ["a", "d"]
    assert f"{path}:2: field 'labels': label True is a bool where a class" in caplog.text
    assert f"{path}:3: field 'labels': label 1.0 is a float where a class" in caplog.text
    assert build_label_maps(records, ["labels"]) == {"labels": [0, 1]}


def test_group_by_length_batches_texts_of_about_one_length_and_still_sees_each_text_once_an_epoch():
    """With group_by_length each run of LENGTH_GROUP_BATCHES batches is sorted by length before it
    is cut: much less padding than random batches, every record once per epoch, a different
    grouping next epoch. Without it (the default) the order is the plain shuffle. A checkpoint's
    position belongs to one of the two orders: resuming in the other is refused."""
    from minigpt.labelled_data import LENGTH_GROUP_BATCHES

    generator = np.random.default_rng(0)
    lengths = generator.integers(1, 200, size=LENGTH_GROUP_BATCHES * 8 * 3 + 5)  # three groups of 8-record batches and a short tail
    encoded = EncodedRecords([np.full(length, 7, dtype=np.int64) for length in lengths], np.zeros((len(lengths), 1), dtype=np.int64))
    stream = ClassificationBatches(encoded, 8, pad_id=0, seed=1, group_by_length=True)
    first, second = stream._order(0), stream._order(1)
    assert sorted(first) == sorted(second) == list(range(len(lengths)))
    assert not np.array_equal(first, second)

    def padding_share(order: np.ndarray) -> float:
        batches = [lengths[order[start : start + 8]] for start in range(0, len(order), 8)]
        return sum(batch.max() * len(batch) - batch.sum() for batch in batches) / sum(batch.max() * len(batch) for batch in batches)

    shuffled = ClassificationBatches(encoded, 8, pad_id=0, seed=1)._order(0)
    assert np.array_equal(shuffled, np.random.default_rng([1, 0]).permutation(len(lengths)))
    assert padding_share(first) < padding_share(shuffled) / 3
    assert set(first[-5:]) == set(shuffled[-5:])  # the epoch's short last batch stays last
    state = stream.state_dict()
    assert state["group_by_length"] is True
    with pytest.raises(UserInputError, match="saved with --group-by-length and this run asks without"):
        ClassificationBatches(encoded, 8, pad_id=0, seed=1).load_state_dict(state)
    ClassificationBatches(encoded, 8, pad_id=0, seed=1).load_state_dict({"epoch": {"passes": 0, "position": 8}})  # an older checkpoint: ungrouped
    from minigpt.classification import LARGE_SET_RECORDS, groups_by_length

    assert [groups_by_length("auto", LARGE_SET_RECORDS), groups_by_length("auto", LARGE_SET_RECORDS + 1)] == [False, True]
    assert groups_by_length("on", 10) and not groups_by_length("off", 10**6)
