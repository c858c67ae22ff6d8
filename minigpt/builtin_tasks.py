"""The built-in tasks: multiple-choice questions generated from what Python carries, offline.

`minigpt evaluate MODEL --tasks builtin` needs no download, like the built-in corpus. A question
counts only if the model cannot have trained on it, so every task is made from text the built-in
sets hold out of training, by the same rule as their validation split (a document's stable hash
below the validation fraction, `minigpt.sources.document_hash_fraction`):

    stdlib_module    a docstring from a module whose document the built-in corpus holds out:
                     which of four standard-library modules is it from?
    stdlib_function  the same docstrings: which of four functions or classes of that module
                     does it document?
    chat_answers     a held-out conversation of the built-in chat set (`minigpt.sft_corpus`):
                     which of four answers (its own and other held-out conversations') replies
                     to its first question?

Each has four choices, so chance is 1/4, and each question's choices are shuffled by a hash of
the question: the right answer sits at every position about as often, and the tasks are the same
on every run of the same Python version. Which documents are held out depends on the Python
version (the corpus is its standard library), so scores compare models evaluated on the same one.

A limit to know: the built-in chat set is held out by conversation, not by module, so a model
chat-tuned on it has seen answers about the held-out modules' members that quote the docstrings
stdlib_module and stdlib_function ask about; chat_answers is the clean task for such a model.
"""

from __future__ import annotations

import ast
import hashlib
import random
from functools import lru_cache

from minigpt.config import TrainConfig
from minigpt.corpus import module_document, parse_module, stdlib_modules
from minigpt.evaluation import ChoiceQuestion, Task
from minigpt.sft_corpus import builtin_sft_conversations, first_paragraph
from minigpt.sources import Document, document_hash_fraction

BUILTIN_TASKS = "builtin"  # the name --tasks takes for these tasks
TASK_NAMES = ("stdlib_module", "stdlib_function", "chat_answers")  # in the order builtin_tasks() returns them
CHOICES_PER_QUESTION = 4
MODULE_QUESTION = "Which module of the Python standard library has this docstring?\n\n{}\n\nAnswer:"
FUNCTION_QUESTION = "Which function or class of the `{}` module has this docstring?\n\n{}\n\nAnswer:"


def _rng(key: str) -> random.Random:
    """A random stream fixed by `key` (Python's hash() changes between runs; this does not)."""
    return random.Random(int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big"))


def _question(key: str, question: str, answer: str, pool: list[str], system: str = "") -> ChoiceQuestion | None:
    """`answer` and three other texts of `pool`, shuffled by `key`; None if the pool is too small."""
    others = sorted(set(pool) - {answer})
    if len(others) < CHOICES_PER_QUESTION - 1:
        return None
    rng = _rng(key)
    choices = [answer, *rng.sample(others, CHOICES_PER_QUESTION - 1)]
    rng.shuffle(choices)
    return ChoiceQuestion(question, tuple(choices), choices.index(answer), system=system)


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def _documented_members(tree: ast.Module) -> list[tuple[str, str]]:
    """(qualified name, docstring's first paragraph) of a module's public functions, classes and methods."""
    members = []

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_public(node.name):
                docstring = ast.get_docstring(node)
                if docstring and first_paragraph(docstring):
                    members.append((prefix + node.name, first_paragraph(docstring)))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    return members


@lru_cache(maxsize=2)
def builtin_tasks(val_fraction: float = TrainConfig.val_fraction) -> tuple[Task, ...]:
    """The built-in tasks, from the documents held out at `val_fraction` (the default validation
    fraction). The first call parses the standard library (a few seconds on one core)."""
    module_names = [name for name, _ in stdlib_modules() if _is_public(name)]
    module_questions, function_questions = [], []
    for name, path in stdlib_modules():
        document = module_document(path, name)
        # The corpus's documents end with a newline (minigpt.corpus.builtin_documents): hashed as it holds them.
        if document is None or document_hash_fraction(Document(text=document + "\n")) >= val_fraction:
            continue
        parsed = parse_module(path)
        members = _documented_members(parsed[1]) if parsed else []
        member_names = [member for member, _ in members]
        for member, docstring in members:
            key = f"{name}.{member}"
            module_questions.append(_question(key, MODULE_QUESTION.format(docstring), name, module_names))
            function_questions.append(_question(key, FUNCTION_QUESTION.format(name, docstring), member, member_names))
    held_out_chats = [record["conversations"] for record in builtin_sft_conversations()
                      if document_hash_fraction(Document(conversations=record["conversations"])) < val_fraction]
    firsts = []  # (system prompt, first question, first answer) of each held-out conversation
    for turns in held_out_chats:
        system = turns[0]["content"] if turns[0]["role"] == "system" else ""
        user, assistant = [turn["content"] for turn in turns if turn["role"] != "system"][:2]
        firsts.append((system, user, assistant))
    answers = [answer for _, _, answer in firsts]
    chat_questions = [_question(question, question, answer, answers, system) for system, question, answer in firsts]
    tasks = (module_questions, function_questions, chat_questions)
    return tuple(Task(name, tuple(q for q in questions if q is not None)) for name, questions in zip(TASK_NAMES, tasks))
