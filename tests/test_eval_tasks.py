"""Task scores (`minigpt evaluate` with task files or --tasks builtin), checked by hand on tiny models.

The hand computations share nothing with the library but the model: they build the token ids
from the tokenizer's `encode` (plain) or `chat_prompt` (chat) and sum a float64 log-softmax.
"""

import dataclasses
import json

import pytest
import torch

from conftest import run_in_process
from minigpt.builtin_tasks import builtin_tasks
from minigpt.config import ModelConfig, RunConfig
from minigpt.evaluation import (
    ChoiceQuestion, GenerationQuestion, Task, chat_turns, fewshot_examples, plain_prompt, score_generation, uses_chat_format,
)
from minigpt.engine import Engine
from minigpt.generation import SamplingConfig, complete
from minigpt.model import GPT
from minigpt.model_folder import save_model_directory
from minigpt.tokenizer import load_tokenizer, train_char_tokenizer

QUESTIONS = [  # two questions; the second gives its answer as the choice's text, with a context and a system prompt
    {"question": "Which is a colour?", "choices": ["red", "seven", "quickly"], "answer": 0},
    {"context": "Cats purr.", "question": "What do cats do?", "choices": ["bark", "purr"], "answer": "purr",
     "system": "Answer briefly."},
]


@pytest.fixture(scope="module")
def char_tokenizer():
    return train_char_tokenizer([json.dumps(QUESTIONS) + "abcdefghijklmnopqrstuvwxyz?:.\n`_ ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"],
                                show_progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory, char_tokenizer):
    """A tiny random model saved twice: as a pretrained run's final_model/ and as a chat-tuned one's."""
    root = tmp_path_factory.mktemp("eval-models")
    config = RunConfig(model=ModelConfig(vocab_size=char_tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    model = GPT(config.model).eval()
    sft = dataclasses.replace(config, train=dataclasses.replace(config.train, stage="sft"))
    (root / "pretrained").mkdir()
    (root / "pretrained" / "config.json").write_text("{}")  # a run directory around final_model/
    return {"plain": save_model_directory(root / "pretrained" / "final_model", model, config, char_tokenizer),
            "chat": save_model_directory(root / "sft" / "final_model", model, sft, char_tokenizer), "model": model}


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tasks") / "two_questions.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in QUESTIONS))
    return path


def log_probability(model: GPT, context: list[int], continuation: list[int]) -> float:
    """Summed log-probability of `continuation` after `context`, by hand."""
    ids = torch.tensor(context + continuation)
    with torch.no_grad():
        log_probabilities = torch.log_softmax(model(ids[None, :-1])[0][0].double(), dim=-1)
    return sum(log_probabilities[len(context) - 1 + offset, token].item() for offset, token in enumerate(continuation))


def test_plain_scores_sum_the_choice_tokens_log_probabilities_and_norm_divides_by_characters(models, task_file, char_tokenizer, tmp_path):
    result = run_in_process("evaluate", str(models["plain"]), "--data-files", str(task_file), "--log-samples", "samples.jsonl",
                            "--output", "results.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    right = right_norm = 0
    for record, sample in zip(QUESTIONS, samples):
        answer = record["answer"] if isinstance(record["answer"], int) else record["choices"].index(record["answer"])
        prompt = (f"{record['system']}\n\n" if "system" in record else "") + (f"{record['context']}\n" if "context" in record else "") + record["question"]
        # A character tokenizer: the choice's tokens are " " and its characters, after <|endoftext|> and the prompt.
        expected = [log_probability(models["model"], [char_tokenizer.eos_id] + char_tokenizer.encode(prompt), char_tokenizer.encode(" " + choice))
                    for choice in record["choices"]]
        assert sample["log_probabilities"] == pytest.approx(expected, rel=1e-5)
        normalised = [total / len(choice) for total, choice in zip(expected, record["choices"])]
        right += max(range(len(expected)), key=expected.__getitem__) == answer
        right_norm += max(range(len(normalised)), key=normalised.__getitem__) == answer
        assert sample["answer"] == answer
    report = json.loads((tmp_path / "results.json").read_text())
    scores = report["tasks"]["two_questions"]
    assert report["format"] == "plain" and scores["n"] == 2
    assert scores["accuracy"] == right / 2 and scores["accuracy_norm"] == right_norm / 2
    assert scores["chance"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert scores["centered"] == pytest.approx((right_norm / 2 - scores["chance"]) / (1 - scores["chance"]))
    assert report["score"] == scores["centered"]
    # A run's final_model/: the results are copied next to it for `minigpt report`.
    assert json.loads((models["plain"].parent / "eval_results.json").read_text()) == report
    assert "two_questions" in result.stdout and "score" in result.stdout


def test_a_chat_tuned_model_is_scored_on_the_reply_tokens_under_its_template(models, task_file, char_tokenizer, tmp_path):
    result = run_in_process("eval", str(models["chat"]), "--data-files", str(task_file), "--log-samples", "s.jsonl", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "chat"
    samples = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    for record, sample in zip(QUESTIONS, samples):
        turns = ([{"role": "system", "content": record["system"]}] if "system" in record else []) + [
            {"role": "user", "content": (f"{record['context']}\n" if "context" in record else "") + record["question"]}]
        # The reply's own tokens after the assistant's header: no leading space, no end-of-turn token.
        expected = [log_probability(models["model"], char_tokenizer.chat_prompt(turns), char_tokenizer.encode(choice))
                    for choice in record["choices"]]
        assert sample["log_probabilities"] == pytest.approx(expected, rel=1e-5)
    plain = run_in_process("eval", str(models["chat"]), "--data-files", str(task_file), "--format", "plain", "--json", cwd=tmp_path)
    assert json.loads(plain.stdout)["format"] == "plain"


def test_fewshot_layout_in_both_formats():
    questions = [ChoiceQuestion(f"Q{index}?", ("yes", "no"), index % 2) for index in range(3)]
    examples = fewshot_examples(questions, 2, 2)  # the records after it, wrapping around
    assert examples == [questions[0], questions[1]]
    assert plain_prompt(questions[2], examples) == "Q0? yes\n\nQ1? no\n\nQ2?"
    system = ChoiceQuestion("Q?", ("a", "b"), 0, context="Text.", system="Be brief.")
    assert plain_prompt(system, examples[:1]) == "Be brief.\n\nQ0? yes\n\nText.\nQ?"
    assert chat_turns(system, examples[:1]) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q0?"}, {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "Text.\nQ?"}]


def test_the_default_format_follows_the_last_stage_or_an_instruction_tuned_name():
    assert uses_chat_format("sft", ("sft", "dpo"))
    assert uses_chat_format("dpo", ("sft", "dpo"))
    assert not uses_chat_format("pretrain", ("sft", "dpo"))
    assert uses_chat_format("pretrain", ("sft",), "Qwen2.5-0.5B-Instruct") and uses_chat_format("pretrain", ("sft",), "gemma-3-1b-it")
    assert not uses_chat_format("pretrain", ("sft",), "Qwen2.5-0.5B")


def test_generation_scores_exact_match_and_contains(models, char_tokenizer):
    model = models["model"]
    prompt = "What do cats do?"
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0, stop_ids=char_tokenizer.stop_ids(False))
    reply = complete(model, char_tokenizer, [char_tokenizer.eos_id] + char_tokenizer.encode(prompt), greedy, stop_strings=("\n",))
    words = reply.split()
    assert words, "the random model's greedy reply is blank; pick another seed"
    task = Task("gen", (GenerationQuestion(prompt, reply), GenerationQuestion(prompt, words[0] + "zzzz"),
                        GenerationQuestion(prompt, words[-1])))
    result = score_generation(Engine(model), char_tokenizer, task, chat=False, max_new_tokens=12, batch_size=2)  # two batches
    assert [sample["reply"] for sample in result.samples] == [reply] * 3
    exact = [1, 0, int(" ".join(words) == words[-1])]  # the third answer is the reply's last word: whole only for a one-word reply
    assert result.metrics == {"exact_match": pytest.approx(sum(exact) / 3), "contains": pytest.approx(2 / 3)}
    assert result.centered == result.metrics["exact_match"] and result.chance == 0


def test_bad_task_records_are_refused_naming_the_line(models, tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"question": "Q?", "choices": ["a", "b"], "answer": 5}) + "\n")
    result = run_in_process("evaluate", str(models["plain"]), "--data-files", "bad.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "bad.jsonl:2" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "mixed.jsonl").write_text(json.dumps(QUESTIONS[0]) + "\n" + json.dumps({"prompt": "P", "answer": "A"}) + "\n")
    result = run_in_process("evaluate", str(models["plain"]), "--data-files", "mixed.jsonl", cwd=tmp_path)
    assert result.returncode == 2 and "mixes" in result.stderr
    result = run_in_process("evaluate", str(models["plain"]), "--tasks", "nonsense", cwd=tmp_path)
    assert result.returncode == 2 and "builtin" in result.stderr
    result = run_in_process("evaluate", str(models["plain"]), cwd=tmp_path)
    assert result.returncode == 2 and "--tasks builtin" in result.stderr


def test_a_random_model_scores_about_chance_on_the_builtin_tasks(tokenizer_file, tmp_path):
    tokenizer = load_tokenizer(tokenizer_file)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    folder = save_model_directory(tmp_path / "random", GPT(config.model), config, tokenizer)
    result = run_in_process("eval", str(folder), "--tasks", "builtin", "--batch-size", "32", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["tasks"]) == {task.name for task in builtin_tasks()}
    for scores in report["tasks"].values():
        assert scores["chance"] == 0.25 and scores["n"] >= 10
    assert abs(report["score"]) < 0.35, report  # about 0: a few dozen questions per task, so some noise
