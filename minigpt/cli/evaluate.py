"""`minigpt evaluate MODEL` (or `minigpt eval`): loss on text, and task scores.

    --data-files  files of `text` records (or .txt): loss, perplexity and bits per byte;
                  files of task records (multiple choice or generation, see minigpt/evaluation.py):
                  one task per file, scored
    --tasks builtin
                  the built-in tasks (minigpt/builtin_tasks.py), offline

The results, as printed by --json and written by --output (and, for a run's final_model/, copied
to eval_results.json in the run directory, where `minigpt report` finds them):

    {"model": path,
     "text":  {"loss", "perplexity", "bits_per_byte", "tokens", "bytes"},         with text files
     "format": "chat" | "plain", "num_fewshot": K,                                with tasks
     "tasks": {name: {"kind": "multiple_choice", "n", "accuracy", "accuracy_norm", "chance", "centered"}
                   | {"kind": "generation", "n", "exact_match", "contains", "chance": 0, "centered"}},
     "score": the mean of the tasks' centred scores}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from minigpt.builtin_tasks import BUILTIN_TASKS, TASK_NAMES, builtin_tasks
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.data import TokenBlockStream
from minigpt.errors import UserInputError
from minigpt.evaluation import (
    CHAT_FORMAT, EVAL_RESULTS_FILE, PLAIN_FORMAT, EvaluationResult, Task, TaskResult, evaluate, headline_score, read_task_file, score_tasks,
    uses_chat_format,
)
from minigpt.files import atomic_write_bytes, atomic_write_json
from minigpt.model_folder import FolderKind, LoadedModel, load_language_model
from minigpt.runtime import select_device
from minigpt.sources import BUILTIN_SOURCES, resolve_data_files
from minigpt.stages import STAGES

# Stages whose models answer in the chat format. "dpo" (preference tuning) is named here as well,
# so a DPO model is scored as a chat model whether or not this checkout's registry knows the stage.
CHAT_STAGES = tuple(name for name, stage in STAGES.items() if stage.chat) + ("dpo",)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=program_name("evaluate"), description="Evaluate a model: loss on text, and task scores (alias: minigpt eval).",
        epilog="Multiple-choice records: {\"question\", \"choices\": [...], \"answer\": index or text} (optional \"context\", "
               "\"system\"); generation records: {\"prompt\", \"answer\"}. See README.md, 'Evaluating a model'.",
    )
    add_shared_arguments(parser, "model", "data_files", "text_field")
    parser.add_argument("--tasks", nargs="+", metavar="NAME", default=[],
                        help=f"built-in tasks: '{BUILTIN_TASKS}' for all of them, or some of {', '.join(TASK_NAMES)}")
    parser.add_argument("--format", choices=["auto", CHAT_FORMAT, PLAIN_FORMAT], default="auto",
                        help="how a task's question is put to the model (auto: chat for a chat-tuned model, else plain)")
    parser.add_argument("--num-fewshot", type=int, default=0, metavar="K", help="put K other records of the task before each question")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="score only the first N records of each task (0 = all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the longest reply to a generation record")
    parser.add_argument("--log-samples", metavar="FILE", help="write each record's choices, scores and pick (or reply) as JSONL")
    parser.add_argument("--output", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--block-size", type=int, default=0, help="context length for the loss (default: the model's)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop the loss after this many batches (0 = all the data)")
    add_shared_arguments(parser, "device")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    return parser


def chosen_tasks(names: list[str]) -> list[Task]:
    """The built-in tasks --tasks names ('builtin' = all of them)."""
    unknown = [name for name in names if name != BUILTIN_TASKS and name not in TASK_NAMES]
    if unknown:
        raise UserInputError(f"Unknown task '{unknown[0]}'; --tasks takes '{BUILTIN_TASKS}' or any of {', '.join(TASK_NAMES)}.")
    if not names:
        return []
    tasks = {task.name: task for task in builtin_tasks()}
    return list(tasks.values()) if BUILTIN_TASKS in names else [tasks[name] for name in dict.fromkeys(names)]


def split_data_files(patterns: list[str]) -> tuple[list[Path | str], list[Task]]:
    """The text sources (for the loss) and the task files among --data-files."""
    text, tasks = [], []
    for source in resolve_data_files(patterns):
        task = None if source in BUILTIN_SOURCES else read_task_file(Path(source))
        if task is None:
            text.append(source)
        elif task.name in {known.name for known in tasks}:
            raise UserInputError(f"Two task files are named {task.name}; rename one (a task is named after its file).")
        else:
            tasks.append(task)
    return text, tasks


def text_scores(loaded: LoadedModel, sources: list[Path | str], arguments) -> EvaluationResult:
    model, tokenizer = loaded.model, loaded.tokenizer
    block_size = arguments.block_size or model.config.block_size
    if not 1 <= block_size <= model.config.block_size:
        raise UserInputError(f"--block-size must be between 1 and the model's {model.config.block_size}, got {block_size}.")
    stream = TokenBlockStream(sources, tokenizer, block_size, arguments.batch_size, split="all", loop=False,
                              text_field=arguments.text_field)
    stream.check_not_empty()
    byte_lengths = torch.tensor(tokenizer.token_byte_lengths(), dtype=torch.long)
    return evaluate(model, stream, byte_lengths, arguments.max_batches)


def print_table(text: EvaluationResult | None, results: list[TaskResult], chat: bool) -> None:
    if text is not None:
        print(f"loss           {text.loss:.4f} nats/token")
        print(f"perplexity     {text.perplexity:.2f}")
        print(f"bits per byte  {text.bits_per_byte:.4f}")
        print(f"tokens         {text.tokens:,} ({text.bytes:,} bytes, {text.bytes / text.tokens:.2f} bytes/token)")
    if not results:
        return
    width = max(len("task"), *(len(result.name) for result in results))
    print(f"{'task':<{width}}  {'n':>5}  {'accuracy':>8}  {'acc_norm':>8}  {'exact':>6}  {'contains':>8}  {'chance':>6}  {'centred':>7}")
    for result in results:
        def cell(name: str, size: int) -> str:
            return f"{result.metrics[name]:>{size}.4f}" if name in result.metrics else f"{'-':>{size}}"
        print(f"{result.name:<{width}}  {result.n:>5}  {cell('accuracy', 8)}  {cell('accuracy_norm', 8)}  {cell('exact_match', 6)}  "
              f"{cell('contains', 8)}  {result.chance:>6.4f}  {result.centered:>7.4f}")
    print(f"score (the mean centred score of {len(results)} task{'s' if len(results) > 1 else ''}, {'chat' if chat else 'plain'} format): "
          f"{headline_score(results):.4f}")


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    if not arguments.data_files and not arguments.tasks:
        raise UserInputError("Give --data-files (text for the loss, or task files) or --tasks builtin.")
    if arguments.batch_size < 1 or arguments.max_batches < 0 or arguments.limit < 0 or arguments.num_fewshot < 0:
        raise UserInputError("--batch-size must be at least 1, and --max-batches, --limit and --num-fewshot not negative.")
    if arguments.max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens must be at least 1, got {arguments.max_new_tokens}.")
    text_sources, tasks = split_data_files(arguments.data_files) if arguments.data_files else ([], [])
    tasks += chosen_tasks(arguments.tasks)
    if arguments.limit:
        tasks = [Task(task.name, task.questions[: arguments.limit]) for task in tasks]
    loaded = load_language_model(arguments.model, select_device(arguments.device))
    hugging_face_name = loaded.source.resolve().name if loaded.kind is FolderKind.HUGGING_FACE else ""
    chat = arguments.format == CHAT_FORMAT or (
        arguments.format == "auto" and uses_chat_format(loaded.stage, CHAT_STAGES, hugging_face_name))

    report: dict = {"model": str(loaded.source)}
    text = text_scores(loaded, text_sources, arguments) if text_sources else None
    if text is not None:
        report["text"] = {"loss": text.loss, "perplexity": text.perplexity, "bits_per_byte": text.bits_per_byte,
                          "tokens": text.tokens, "bytes": text.bytes}
    results = score_tasks(loaded.model, loaded.tokenizer, tasks, chat, arguments.num_fewshot, arguments.batch_size,
                          arguments.max_new_tokens) if tasks else []
    if results:
        report.update({"format": CHAT_FORMAT if chat else PLAIN_FORMAT, "num_fewshot": arguments.num_fewshot,
                       "tasks": {result.name: result.as_dict() for result in results}, "score": headline_score(results)})
    if arguments.log_samples:
        lines = [json.dumps({"task": result.name, **sample}, ensure_ascii=False) for result in results for sample in result.samples]
        atomic_write_bytes(arguments.log_samples, "".join(line + "\n" for line in lines).encode("utf-8"))
    if arguments.output:
        atomic_write_json(arguments.output, report)
    if loaded.source.name == "final_model" and (loaded.source.parent / "config.json").is_file():
        atomic_write_json(loaded.source.parent / EVAL_RESULTS_FILE, report)
    if arguments.json:
        print(json.dumps(report))
    else:
        print_table(text, results, chat)
    return 0 if text is None or math.isfinite(text.loss) else 1
