"""The built-in chat set: questions and answers about Python, generated from what Python carries.

So that chat fine-tuning (`--stage sft`) works offline with no data prepared, this module writes
a few thousand conversations from three sources on every machine:
    keywords       `keyword.kwlist`; the answer is the opening prose of the keyword's help topic
                   (`pydoc_data.topics`, the text behind `help("if")`)
    built-ins      every public name of `builtins`; the answer is the first paragraph of its
                   docstring, and a follow-up "Show its signature." is answered where
                   `inspect.signature` knows one
    the library    for each standard-library module (parsed with `ast`, never imported, exactly
                   like the pretraining corpus in `minigpt.corpus`): what the module is for, and
                   for each public top-level function or class what it does; functions get the
                   signature follow-up, modules a "Which functions does it offer?" follow-up
Every choice (the question's wording, whether a system turn opens the conversation) comes from
a hash of the subject's name, so the set is identical on every run of the same Python version.
The answers are short first paragraphs: a small model can learn the format (answer, then stop
with <|im_end|>) long before it learns the facts.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import inspect
import json
import keyword
import pydoc
from functools import lru_cache

from pydoc_data.topics import topics  # a plain dict of strings: importing it does nothing else

from minigpt.corpus import parse_module, signature_text, stdlib_modules

BUILTIN_SFT = "builtin-sft"  # the name that stands for this set among data sources
SYSTEM_PROMPTS = (
    "You are a helpful assistant who answers questions about Python.",
    "You are a concise Python tutor. Answer in a few sentences.",
    "Answer questions about the Python standard library accurately.",
)
SYSTEM_TURN_SHARE = 4  # one conversation in this many opens with a system turn
MAX_ANSWER_CHARACTERS = 600  # a longer first paragraph is cut at its last sentence end before this
MAX_LISTED_FUNCTIONS = 12  # "Which functions does it offer?" names at most this many

KEYWORD_QUESTIONS = ("What does the `{}` keyword do?", "Explain the Python keyword `{}`.", "How is `{}` used in Python?")
BUILTIN_QUESTIONS = ("What does `{}` do?", "What is the built-in `{}` for?", "Explain `{}` in Python.")
MODULE_QUESTIONS = ("What is the `{}` module for?", "What does the `{}` module provide?", "Describe the `{}` module.")
MEMBER_QUESTIONS = ("What does `{}` do?", "What is `{}` for?", "Explain `{}`.")
SIGNATURE_FOLLOW_UP = "Show its signature."
FUNCTIONS_FOLLOW_UP = "Which functions does it offer?"


def _choice(name: str, options: int) -> int:
    """A stable index in range(options) for a subject (Python's hash() changes between runs)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "big") % options


def first_paragraph(text: str) -> str:
    """The first paragraph of a docstring, on one line, cut at a sentence end if very long."""
    paragraph = " ".join(inspect.cleandoc(text).split("\n\n")[0].split())
    if len(paragraph) <= MAX_ANSWER_CHARACTERS:
        return paragraph
    cut = paragraph.rfind(". ", 0, MAX_ANSWER_CHARACTERS)
    return paragraph[: cut + 1] if cut > 0 else paragraph[:MAX_ANSWER_CHARACTERS].rstrip() + "..."


def _conversation(subject: str, question: str, answer: str, follow_ups: list[tuple[str, str]]) -> dict:
    """One record in the same shape as a data file's: {"conversations": [turns]}."""
    turns = []
    if _choice("system:" + subject, SYSTEM_TURN_SHARE) == 0:
        turns.append({"role": "system", "content": SYSTEM_PROMPTS[_choice(subject, len(SYSTEM_PROMPTS))]})
    for user, assistant in [(question, answer), *follow_ups]:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"conversations": turns}


def _keyword_answer(word: str) -> str | None:
    """The first prose paragraph of the keyword's help topic (headings and grammar rules skipped)."""
    topic = pydoc.Helper.keywords.get(word)
    topic = topic[0] if isinstance(topic, tuple) else topic
    for paragraph in topics.get(topic, "").split("\n\n")[1:]:
        if paragraph and not paragraph[0].isspace() and not paragraph.startswith("*"):
            return first_paragraph(paragraph)
    return None


def _keyword_conversations() -> list[dict]:
    found = []
    for word in keyword.kwlist:
        answer = _keyword_answer(word)
        if answer:
            found.append(_conversation(word, KEYWORD_QUESTIONS[_choice(word, 3)].format(word), answer, []))
    return found


def _builtin_conversations() -> list[dict]:
    found = []
    for name in sorted(dir(builtins)):
        value = getattr(builtins, name)
        documentation = inspect.getdoc(value)
        if name.startswith("_") or not documentation:
            continue
        follow_ups = []
        try:
            follow_ups.append((SIGNATURE_FOLLOW_UP, f"`{name}{inspect.signature(value)}`"))
        except (TypeError, ValueError):  # many C functions publish no signature
            pass
        question = BUILTIN_QUESTIONS[_choice(name, 3)].format(name)
        found.append(_conversation(name, question, first_paragraph(documentation), follow_ups))
    return found


def _is_public(name: str) -> bool:
    return not any(part.startswith("_") for part in name.split("."))


def _module_conversations() -> list[dict]:
    found = []
    for module_name, path in stdlib_modules():
        parsed = parse_module(path) if _is_public(module_name) else None
        if parsed is None:
            continue
        tree = parsed[1]
        members = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and _is_public(node.name)]
        functions = [node.name for node in members if isinstance(node, ast.FunctionDef)]
        docstring = ast.get_docstring(tree)
        if docstring:
            follow_ups = []
            if functions:
                listed = ", ".join(f"`{name}`" for name in functions[:MAX_LISTED_FUNCTIONS])
                follow_ups.append((FUNCTIONS_FOLLOW_UP, f"The `{module_name}` module defines {listed}."))
            question = MODULE_QUESTIONS[_choice(module_name, 3)].format(module_name)
            found.append(_conversation(module_name, question, first_paragraph(docstring), follow_ups))
        for node in members:
            member_docstring = ast.get_docstring(node)
            if not member_docstring:
                continue
            qualified = f"{module_name}.{node.name}"
            follow_ups = []
            if isinstance(node, ast.FunctionDef):
                follow_ups.append((SIGNATURE_FOLLOW_UP, f"`{module_name}.{signature_text(node)}`"))
            question = MEMBER_QUESTIONS[_choice(qualified, 3)].format(qualified)
            found.append(_conversation(qualified, question, first_paragraph(member_docstring), follow_ups))
    return found


@lru_cache(maxsize=1)
def builtin_sft_conversations() -> tuple[dict, ...]:
    """Every conversation of the set, as {"conversations": [...]} records, in a fixed order.

    Kept in memory after the first call (a few MB); a first call parses the standard library
    (about a second on one core).
    """
    return tuple(_keyword_conversations() + _builtin_conversations() + _module_conversations())


@lru_cache(maxsize=1)
def builtin_sft_fingerprint() -> str:
    """A short key for the set's content: a hash of every conversation (it changes with Python)."""
    text = json.dumps(builtin_sft_conversations(), sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
