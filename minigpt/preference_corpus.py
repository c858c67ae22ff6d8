"""The built-in preference set: the built-in chat set's answers preferred over spoiled ones.

So that preference tuning (`--stage dpo`) works offline with no data prepared, each conversation
of the built-in chat set (`minigpt.sft_corpus`) gives one pair: its first question (with the
system turn, if it opens with one) as the prompt, its reference answer as the chosen reply, and
a spoiled copy as the rejected one, spoiled in one of three ways, chosen by a hash of the question:

    another    the answer to another question (right in form, wrong in content)
    truncated  the answer cut off after its first third of words (it stops mid-sentence)
    repeated   the answer's opening words said over and over (the loop small models fall into)

A reply too short to cut or repeat gets another question's answer. Held out for validation: the
pairs whose prompt's stable hash falls below VALIDATION_FRACTION, the same on every run and
machine. The set is identical on every run of the same Python version.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from minigpt.files import atomic_write_bytes
from minigpt.preference_data import PreferencePair, holdout_split
from minigpt.sft_corpus import builtin_sft_conversations, builtin_sft_fingerprint

PREFERENCE_VERSION = 1  # bump when the pairs are made differently
VALIDATION_FRACTION = 0.05
MAXIMUM_PAIRS = 2000  # a stable, hash-chosen subset: enough to learn the preference, a reference pass of minutes on a CPU
MINIMUM_WORDS_TO_SPOIL = 6  # shorter answers are replaced by another question's answer
REPEATS = 4
SPOILERS = ("another", "truncated", "repeated")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def spoiled(answer: str, question: str, answers: list[str]) -> tuple[str, str]:
    """(how it was spoiled, the spoiled answer) for the answer to `question`; `answers`: every
    answer of the set, from which "another" draws."""
    words = answer.split()
    how = SPOILERS[_hash("spoil:" + question) % len(SPOILERS)] if len(words) >= MINIMUM_WORDS_TO_SPOIL else "another"
    if how == "truncated":
        return how, " ".join(words[: max(2, len(words) // 3)])
    if how == "repeated":
        return how, " ".join(words[: max(3, min(8, len(words) // 2))] * REPEATS)
    start = _hash("another:" + question) % len(answers)
    other = next(text for text in answers[start:] + answers[:start] if text != answer)
    return how, other


@lru_cache(maxsize=1)
def builtin_preference_pairs() -> tuple[tuple[PreferencePair, ...], tuple[PreferencePair, ...]]:
    """(train, validation) pairs, in a fixed order."""
    firsts = []
    for record in builtin_sft_conversations():
        turns = record["conversations"]
        reply = next(number for number, turn in enumerate(turns) if turn["role"] == "assistant")
        firsts.append((turns[:reply], turns[reply]["content"]))
    kept = sorted(firsts, key=lambda first: _hash(json.dumps(first[0])))[:MAXIMUM_PAIRS]
    answers = [answer for _, answer in kept]
    pairs = [PreferencePair(prompt, answer, spoiled(answer, prompt[-1]["content"], answers)[1], "")
             for prompt, answer in kept]
    train, validation = holdout_split(pairs, VALIDATION_FRACTION)
    return tuple(train), tuple(validation)


def builtin_preference_files(directory: str | Path) -> tuple[Path, Path]:
    """The built-in preference set as train.jsonl and val.jsonl under `directory` (written once per
    Python installation and version of this set, then reused), in the {"prompt", "chosen",
    "rejected"} form with the prompt as messages."""
    home = Path(directory) / f"builtin-preferences-{PREFERENCE_VERSION}-{builtin_sft_fingerprint()}"
    paths = home / "train.jsonl", home / "val.jsonl"
    if not all(path.is_file() for path in paths):
        for path, pairs in zip(paths, builtin_preference_pairs()):
            lines = (json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n" for pair in pairs)
            atomic_write_bytes(path, "".join(lines).encode("utf-8"))
    return paths
