"""Command-line front doors. Each module parses arguments and calls into the library.

`COMMANDS` is the one list of commands: `minigpt <name>` runs the module's `main`, and
`scripts/<script>` is the same command for a checkout that is not installed. A new command is
one line here (and its module).
"""

from __future__ import annotations

from typing import NamedTuple


class Command(NamedTuple):
    module: str  # the module whose `main(argv)` runs the command
    script: str  # its door in scripts/
    summary: str  # one line for `minigpt --help`


COMMANDS: dict[str, Command] = {
    "train": Command("minigpt.cli.train", "train.py", "train a model from a preset, a config file and flags"),
    "generate": Command("minigpt.cli.generate", "generate.py", "sample text from a trained model"),
    "evaluate": Command("minigpt.cli.evaluate", "evaluate.py", "loss on text, task scores (multiple choice, generation, built-in tasks)"),
    "report": Command("minigpt.cli.report", "report.py", "write a run's report card (report.md, report.html), or compare runs"),
    "monitor": Command("minigpt.cli.monitor", "monitor_training.py", "watch runs live, or compare them"),
    "plot": Command("minigpt.cli.plot_curves", "plot_training_curves.py", "draw runs' metrics to a PNG"),
    "tokenizer": Command("minigpt.cli.train_tokenizer", "train_tokenizer.py", "train and save a tokenizer on its own"),
    "prepare-data": Command("minigpt.cli.prepare_data", "prepare_data.py", "tokenize data once into a token cache"),
    "chat": Command("minigpt.cli.chat", "chat.py", "talk to a chat-tuned model in the terminal"),
    "merge-lora": Command("minigpt.cli.merge_lora", "merge_lora.py", "fold a LoRA adapter into its base model"),
    "train-classifier": Command("minigpt.cli.train_classifier", "train_classifier.py", "train text classification heads (multi-task, macro-F1)"),
    "classify": Command("minigpt.cli.classify", "classify.py", "label texts with a trained classifier"),
    "serve": Command("minigpt.cli.serve", "serve.py", "serve a model: the OpenAI API and a chat page in the browser"),
    "export": Command("minigpt.cli.export", "export.py", "write a model for transformers, llama.cpp/Ollama (GGUF) or PEFT (a LoRA adapter)"),
}
# Other names of a command: `minigpt eval` is `minigpt evaluate`.
ALIASES: dict[str, str] = {"eval": "evaluate"}
