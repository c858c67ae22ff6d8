"""Measuring a model: loss, perplexity and bits per byte; and task scores (see "task scores" below).

    loss           mean cross-entropy per predicted token, in nats
    perplexity     exp(loss): as unsure as a uniform choice among this many tokens
    bits per byte  total cross-entropy in bits divided by the UTF-8 bytes the targets stand for

and, token by token, `token_logprobs`: the log-probability of each token of one text given the
ones before it, and the likeliest alternatives (what `minigpt serve` answers to `logprobs`).

Loss and perplexity depend on the tokenizer (bigger tokens carry more text each, so their loss
is higher); bits per byte does not, so it compares runs with different tokenizers fairly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import torch
from tqdm import tqdm

from minigpt.distributed import all_reduce_sum, this_process_share
from minigpt.engine import Engine, Request, SamplingConfig
from minigpt.errors import UserInputError
from minigpt.generation import stream_text
from minigpt.loss import IGNORE_INDEX
from minigpt.model import GPT
from minigpt.runtime import autocast
from minigpt.sources import ReadProblem, json_records
from minigpt.tokenizer import Tokenizer


@dataclass
class EvaluationResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "val_loss": self.loss, "val_perplexity": self.perplexity, "val_bits_per_byte": self.bits_per_byte,
            "val_tokens": self.tokens,
        }


@torch.no_grad()
def evaluate(
    model: GPT,
    batches: Iterable[tuple[torch.Tensor, ...]],
    token_byte_lengths: torch.Tensor,
    max_batches: int = 0,
    dtype: torch.dtype = torch.float32,
) -> EvaluationResult:
    """Evaluate on up to `max_batches` (0 = all) batches of (inputs, targets), or of (inputs,
    targets, positions) for packed rows (see GPT.hidden_states). Under torchrun every process
    must call this, with the same batches: each evaluates its share."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    token_byte_lengths = token_byte_lengths.to(device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_tokens = torch.zeros((), dtype=torch.long, device=device)
    total_bytes = torch.zeros((), dtype=torch.long, device=device)
    # Under torchrun each process takes every world_size-th of the same batches and the sums are
    # added up over the processes: the result is the single-process result on the same batches.
    for inputs, targets, *positions in this_process_share(islice(batches, max_batches or None)):
        inputs, targets = inputs.to(device), targets.to(device)
        positions = positions[0].to(device) if positions else None
        with autocast(device, dtype):
            _, losses = model(inputs, targets, loss_reduction="none", positions=positions)
        counted = targets.view(-1) != IGNORE_INDEX
        total_nats += losses.double().sum()  # ignored positions contribute 0
        total_tokens += counted.sum()
        total_bytes += token_byte_lengths[targets.view(-1)[counted]].sum()
    model.train(was_training)
    for total in (total_nats, total_tokens, total_bytes):
        all_reduce_sum(total)
    tokens, byte_count = int(total_tokens), int(total_bytes)
    if tokens == 0:
        raise ValueError("Evaluation saw no target tokens: the validation data is empty.")
    loss = float(total_nats) / tokens
    bits_per_byte = float(total_nats) / math.log(2) / byte_count if byte_count else float("nan")
    return EvaluationResult(loss, math.exp(min(loss, 700.0)), bits_per_byte, tokens, byte_count)


@dataclass(frozen=True)
class TokenLogprob:
    """How likely the model found one token of a sequence, given the tokens before it."""

    token: int
    logprob: float | None  # natural log; None for the first token, which nothing comes before
    top: list[tuple[int, float]]  # the likeliest tokens at this place and their log-probabilities, likeliest first


@torch.no_grad()
def token_logprobs(model: GPT, ids: Sequence[int], top: int = 0) -> list[TokenLogprob]:
    """Each token's log-probability under the model (the raw distribution: no temperature or
    filtering), from one forward pass over `ids` (at most the model's window)."""
    ids = list(ids)
    if not 0 < len(ids) <= model.config.block_size:
        raise ValueError(f"token_logprobs reads 1 to {model.config.block_size} tokens, got {len(ids)}")
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))
    logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # row t: the distribution of token t + 1
    chosen = logprobs.gather(-1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()
    values, tokens = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], logprobs[:, :0].long())
    alternatives = [list(zip(row_tokens, row_values)) for row_tokens, row_values in zip(tokens.tolist(), values.tolist())]
    return [TokenLogprob(ids[0], None, [])] + [TokenLogprob(token, logprob, best)
                                                for token, logprob, best in zip(ids[1:], chosen, alternatives)]


# ----------------------------------------------------------------------------- task scores
#
# Loss says how well a model predicts text; a task score says whether it picks the right answer.
# Two kinds of task record, read from .jsonl/.json files (one file = one task) or built in
# (minigpt.builtin_tasks):
#
#   multiple choice  {"question", "choices": [...], "answer": index or the choice's text}, with an
#                    optional "context" (a passage before the question) and "system" (a system
#                    prompt). Each choice is scored by the model's log-probability of its tokens
#                    after the question; the pick is the choice with the highest score.
#                        accuracy       picks by the summed log-probability of the choice's tokens
#                        accuracy_norm  picks by that sum divided by the choice's length in
#                                       characters (lm-evaluation-harness's acc_norm), which stops
#                                       short choices winning only because they are short
#   generation       {"prompt", "answer"}: the model's greedy reply, scored by exact match and by
#                    whether it contains the answer (both after collapsing whitespace)
#
# The prompt comes in one of two formats:
#   plain  a document continued: <|endoftext|> (where every training document starts), then
#          `context\nquestion`, then " choice": lm-evaluation-harness's layout (its
#          target_delimiter " "), so the two give the same scores on the same records
#   chat   the conversation [system] [user: question] [assistant: choice] rendered by the model's
#          own chat template (Tokenizer.render_chat); only the reply's tokens are scored, not the
#          end-of-turn token that closes it
# With K few-shot examples, K other records of the same task come first: in the plain format as
# "question answer" paragraphs separated by blank lines, in the chat format as earlier exchanges.
#
# A task's `centered` score puts chance at 0 and a perfect score at 1, so tasks with different
# numbers of choices average fairly; the mean over the tasks is the headline `score`.

CHAT_FORMAT, PLAIN_FORMAT = "chat", "plain"
EVAL_RESULTS_FILE = "eval_results.json"  # `minigpt eval` copies its results here, next to a run's final_model/
FEWSHOT_SEPARATOR = "\n\n"  # between few-shot examples in the plain format (lm-evaluation-harness's)


@dataclass(frozen=True)
class ChoiceQuestion:
    """A multiple-choice record; `answer` is the index of the right choice."""

    question: str
    choices: tuple[str, ...]
    answer: int
    context: str = ""
    system: str = ""

    @property
    def prompt_text(self) -> str:
        return f"{self.context}\n{self.question}" if self.context else self.question

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer]


@dataclass(frozen=True)
class GenerationQuestion:
    """A generation record: the reply to `prompt` should be `answer`."""

    prompt: str
    answer: str
    system: str = ""

    @property
    def prompt_text(self) -> str:
        return self.prompt

    @property
    def answer_text(self) -> str:
        return self.answer


Question = ChoiceQuestion | GenerationQuestion


@dataclass(frozen=True)
class Task:
    """A named list of records of one kind: a task file, or a built-in task."""

    name: str
    questions: tuple[Question, ...]

    @property
    def is_multiple_choice(self) -> bool:
        return isinstance(self.questions[0], ChoiceQuestion)

    @property
    def chance(self) -> float:
        """The accuracy of picking at random: the mean of 1 / choices (0 for generation)."""
        if not self.is_multiple_choice:
            return 0.0
        return sum(1 / len(question.choices) for question in self.questions) / len(self.questions)


def question_from_record(record: object, where: str) -> Question:
    """A task record as a ChoiceQuestion or GenerationQuestion; UserInputError naming `where` if malformed."""
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: a task record must be a JSON object, got {str(record)[:60]}.")
    system = record.get("system", "")
    if "choices" in record:
        question, choices, answer, context = record.get("question"), record["choices"], record.get("answer"), record.get("context", "")
        if not isinstance(question, str) or not question:
            raise UserInputError(f"{where}: a multiple-choice record needs a non-empty string 'question'.")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise UserInputError(f"{where}: 'choices' must be a list of at least two non-empty strings.")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UserInputError(f"{where}: 'answer' must be an index into 'choices' (0 to {len(choices) - 1}) or one of the choices' texts, got {answer!r}.")
        if not isinstance(context, str) or not isinstance(system, str):
            raise UserInputError(f"{where}: 'context' and 'system' must be strings.")
        return ChoiceQuestion(question, tuple(choices), answer, context, system)
    if "prompt" in record:
        prompt, answer = record["prompt"], record.get("answer")
        if not (isinstance(prompt, str) and prompt and isinstance(answer, str) and answer.strip() and isinstance(system, str)):
            raise UserInputError(f"{where}: a generation record needs a non-empty string 'prompt' and 'answer'.")
        return GenerationQuestion(prompt, answer, system)
    raise UserInputError(f"{where}: a task record has 'question' and 'choices' (multiple choice) or 'prompt' and 'answer' (generation).")


def is_task_record(record: object) -> bool:
    """Whether a data file's first record is a task record (else it is text, for the loss)."""
    return isinstance(record, dict) and ("choices" in record or ("prompt" in record and "answer" in record))


def task_from_records(name: str, records: Iterable[tuple[str, object]]) -> Task:
    """A task from (where, record) pairs; every record must be of the same kind."""
    questions = tuple(question_from_record(record, where) for where, record in records)
    if not questions:
        raise UserInputError(f"Task {name} holds no records.")
    kinds = {type(question) for question in questions}
    if len(kinds) > 1:
        raise UserInputError(f"Task {name} mixes multiple-choice and generation records; put each kind in a file of its own.")
    return Task(name, questions)


def read_task_file(path: Path) -> Task | None:
    """The task a .jsonl/.json file holds, named after the file; None if its first record is not
    a task record (a file of text, for the loss). A bad line is refused, naming it: a score on
    part of a task would not be the task's score."""
    if path.suffix not in (".json", ".jsonl"):
        return None
    items = json_records(path)
    first = next(items, None)
    if first is None or not is_task_record(first[1]):
        return None

    def checked() -> Iterator[tuple[str, object]]:
        for where, record in chain([first], items):
            if isinstance(record, ReadProblem):  # why a line could not be read
                raise UserInputError(f"{where} is {record}; fix or remove that line.")
            yield where, record

    return task_from_records(path.stem, checked())


# ---------------------------------------------------------------- prompts


def uses_chat_format(stage: str, chat_stages: Sequence[str], hugging_face_name: str = "") -> bool:
    """The default format: chat for a model whose last training stage chat-tunes (sft, dpo, ...),
    or for a pretrained Hugging Face folder whose name marks it as instruction-tuned (…-Instruct,
    …-chat, …-it; `hugging_face_name` is empty for MiniGPT's own folders, whose stage says it)."""
    name = hugging_face_name.lower()
    instruction_tuned = bool(name) and (any(mark in name for mark in ("instruct", "chat")) or name.endswith(("-it", "_it")))
    return stage in chat_stages or instruction_tuned


def fewshot_examples(questions: Sequence[Question], index: int, count: int) -> list[Question]:
    """The `count` records after record `index`, wrapping around at the end (never itself)."""
    if count >= len(questions):
        raise UserInputError(f"--num-fewshot {count} needs more than {count} records in the task, which has {len(questions)}.")
    return [questions[(index + offset) % len(questions)] for offset in range(1, count + 1)]


def plain_prompt(question: Question, examples: Sequence[Question]) -> str:
    """The plain format's text before the answer: the system prompt, the few-shot examples, the question."""
    parts = [f"{example.prompt_text} {example.answer_text}" for example in examples] + [question.prompt_text]
    return (question.system + FEWSHOT_SEPARATOR if question.system else "") + FEWSHOT_SEPARATOR.join(parts)


def chat_turns(question: Question, examples: Sequence[Question]) -> list[dict]:
    """The chat format's conversation before the answer: [system], the few-shot exchanges, the question."""
    turns = [{"role": "system", "content": question.system}] if question.system else []
    for example in examples:
        turns += [{"role": "user", "content": example.prompt_text}, {"role": "assistant", "content": example.answer_text}]
    return turns + [{"role": "user", "content": question.prompt_text}]


def choice_tokens(tokenizer: Tokenizer, question: ChoiceQuestion, choice: str, examples: Sequence[Question],
                  chat: bool) -> tuple[list[int], list[int]]:
    """(context ids, choice ids) for scoring one choice: the model reads the context and the choice,
    and the log-probabilities of the choice ids are summed.

    Plain: as lm-evaluation-harness encodes a pair, the context + " " + choice is encoded whole and
    the context's own tokens are cut off the front, so a token that would merge across the seam is
    tokenized as in running text. Chat: the conversation with the choice as the assistant's reply,
    rendered by the template; the reply is the last run of the template's assistant mask, cut
    before its first stop id (the end-of-turn token and whatever the template puts after it).
    """
    if not chat:
        context = plain_prompt(question, examples)
        whole = tokenizer.encode(context + " " + choice)
        context_ids = tokenizer.encode(context.rstrip())  # lm-evaluation-harness moves the context's trailing spaces to the choice
        return [tokenizer.eos_id] + context_ids, whole[len(context_ids):]
    ids, mask = tokenizer.render_chat(chat_turns(question, examples) + [{"role": "assistant", "content": choice}])
    end = max(index for index, masked in enumerate(mask) if masked) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    stop_ids = set(tokenizer.stop_ids(chat=True))
    reply = ids[start:end]
    cut = next((index for index, token in enumerate(reply) if token in stop_ids), len(reply))
    return ids[:start], reply[:cut]


def generation_prompt(tokenizer: Tokenizer, question: Question, examples: Sequence[Question], chat: bool) -> list[int]:
    """The ids a generation record's reply continues."""
    if chat:
        return tokenizer.chat_prompt(chat_turns(question, examples))
    return [tokenizer.eos_id] + tokenizer.encode(plain_prompt(question, examples))


# ---------------------------------------------------------------- scoring


@torch.no_grad()
def continuation_log_probabilities(model: GPT, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int,
                                   progress: Callable[[int], None] | None = None) -> list[float]:
    """The summed log-probability of each pair's continuation ids after its context ids.

    Pairs go through the model `batch_size` at a time, right-padded (causal attention keeps the
    padding out of every real position); the output head runs only at the positions that predict
    a continuation token, not over every position's whole vocabulary. A pair longer than the
    model's window loses its oldest context tokens, as lm-evaluation-harness truncates.
    `progress(n)` is told of each batch done.
    """
    window = model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        rows = []
        for context, continuation in pairs[start:start + batch_size]:
            if not continuation:
                raise UserInputError("A choice encodes to no tokens after its question; check the task's choices.")
            if len(continuation) > window:
                raise UserInputError(f"A choice of {len(continuation)} tokens does not fit this model's {window}-token window.")
            rows.append(((context + continuation)[-(window + 1):], len(continuation)))  # the inputs are all but the last token
        width = max(len(sequence) for sequence, _ in rows) - 1
        inputs = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (sequence, _) in enumerate(rows):
            inputs[row, : len(sequence) - 1] = torch.tensor(sequence[:-1])
        hidden = model.hidden_states(inputs.to(device))
        for row, (sequence, count) in enumerate(rows):
            # The token at position i is predicted by the output at position i - 1.
            predicting = hidden[row, len(sequence) - 1 - count: len(sequence) - 1]
            log_probabilities = torch.log_softmax(model.lm_head(predicting).float(), dim=-1)
            targets = torch.tensor(sequence[-count:], device=device)
            scores.append(float(log_probabilities.gather(1, targets[:, None]).double().sum()))
        if progress is not None:
            progress(len(rows))
    model.train(was_training)
    return scores


@dataclass
class TaskResult:
    """One task's scores, and each record's details for --log-samples."""

    name: str
    kind: str  # "multiple_choice" or "generation"
    n: int
    chance: float
    metrics: dict[str, float]  # accuracy, accuracy_norm (multiple choice); exact_match, contains (generation)
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy_norm" if self.kind == "multiple_choice" else "exact_match"]

    @property
    def centered(self) -> float:
        """(accuracy - chance) / (1 - chance): chance is 0, perfect is 1, worse than chance is negative.
        Multiple choice centres accuracy_norm, generation exact match (whose chance is 0)."""
        return (self.accuracy - self.chance) / (1 - self.chance)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "n": self.n, **self.metrics, "chance": self.chance, "centered": self.centered}


def score_multiple_choice(model: GPT, tokenizer: Tokenizer, task: Task, chat: bool, num_fewshot: int = 0,
                          batch_size: int = 16, progress: Callable[[int], None] | None = None) -> TaskResult:
    """Score every choice of every record (one model row per choice) and count the right picks."""
    questions = task.questions
    pairs, owners = [], []
    for index, question in enumerate(questions):
        examples = fewshot_examples(questions, index, num_fewshot) if num_fewshot else []
        for choice in question.choices:
            pairs.append(choice_tokens(tokenizer, question, choice, examples, chat))
            owners.append(index)
    scores = continuation_log_probabilities(model, pairs, batch_size, progress)
    right = right_norm = 0
    samples = []
    position = 0
    for question in questions:
        sums = scores[position:position + len(question.choices)]
        position += len(question.choices)
        normalised = [total / len(choice) for total, choice in zip(sums, question.choices)]
        pick, pick_norm = _argmax(sums), _argmax(normalised)
        right += pick == question.answer
        right_norm += pick_norm == question.answer
        samples.append({"question": question.question, "choices": list(question.choices), "answer": question.answer,
                        "log_probabilities": sums, "log_probabilities_per_character": normalised,
                        "pick": pick, "pick_norm": pick_norm})
    n = len(questions)
    return TaskResult(task.name, "multiple_choice", n, task.chance,
                      {"accuracy": right / n, "accuracy_norm": right_norm / n}, samples)


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal scores, as numpy's argmax


def normalise_answer(text: str) -> str:
    return " ".join(text.split())


def score_generation(engine: Engine, tokenizer: Tokenizer, task: Task, chat: bool, num_fewshot: int = 0,
                     max_new_tokens: int = 64, batch_size: int = 16,
                     progress: Callable[[int], None] | None = None) -> TaskResult:
    """Each record's greedy reply, decoded `batch_size` rows at a time on the engine: exact match
    and contains. A plain-format reply ends at the end of its line (the answer is one line), a chat
    reply at the end of its turn."""
    questions = task.questions
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop_ids=tokenizer.stop_ids(chat))
    requests = []
    for index, question in enumerate(questions):
        examples = fewshot_examples(questions, index, num_fewshot) if num_fewshot else []
        prompt = generation_prompt(tokenizer, question, examples, chat)
        requests.append(Request(prompt[-(engine.model.config.block_size - 1):], sampling))
    replies = [""] * len(questions)
    for start in range(0, len(requests), batch_size):
        for piece in stream_text(engine, tokenizer, requests[start:start + batch_size], stop_strings=() if chat else ("\n",)):
            replies[start + piece.index] += piece.text
            if piece.finish is not None and progress is not None:
                progress(1)
    exact = contains = 0
    samples = []
    for question, reply in zip(questions, replies):
        reply_text, answer = normalise_answer(reply), normalise_answer(question.answer)
        exact += reply_text == answer
        contains += answer in reply_text
        samples.append({"prompt": question.prompt, "answer": question.answer, "reply": reply,
                        "exact_match": reply_text == answer, "contains": answer in reply_text})
    n = len(questions)
    return TaskResult(task.name, "generation", n, 0.0, {"exact_match": exact / n, "contains": contains / n}, samples)


def score_tasks(model: GPT, tokenizer: Tokenizer, tasks: Sequence[Task], chat: bool, num_fewshot: int = 0,
                batch_size: int = 16, max_new_tokens: int = 64, show_progress: bool = True) -> list[TaskResult]:
    """Every task's scores, with one progress bar over all the model rows (a choice or a reply each)."""
    total = sum(len(question.choices) if isinstance(question, ChoiceQuestion) else 1
                for task in tasks for question in task.questions)
    results = []
    engine = Engine(model)
    with tqdm(total=total, unit="row", desc="tasks", disable=None if show_progress else True) as bar:
        for task in tasks:
            bar.set_postfix_str(task.name)
            if task.is_multiple_choice:
                results.append(score_multiple_choice(model, tokenizer, task, chat, num_fewshot, batch_size, bar.update))
            else:
                results.append(score_generation(engine, tokenizer, task, chat, num_fewshot, max_new_tokens, batch_size, bar.update))
    return results


def headline_score(results: Sequence[TaskResult]) -> float:
    """The mean of the tasks' centred scores."""
    return sum(result.centered for result in results) / len(results)
