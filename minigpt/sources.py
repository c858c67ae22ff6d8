"""Where documents come from: data files, the built-in sets and token caches, read lazily.

    resolve_data_files   what the user named (files, directories, globs, "builtin" for the built-in
                         corpus, "builtin-sft" for the built-in chat set) -> a list of sources
    DocumentReader       sources -> one Document at a time; its position is five integers, so a
                         resumed run continues at the same byte of the same file
    TokenCache           an opened pre-tokenized cache (built by `minigpt.token_cache`)

A .jsonl file holds one record per line, and a .json file an array of the same records:
    {"text": "..."}                                      plain text (the field name is configurable)
    {"conversations": [{"role": ..., "content": ...}]}   a chat (roles: system, user, assistant)
    {"messages": [{"role": ..., "content": ...}]}        the same chat, in OpenAI's naming
    {"instruction": ..., "input": ..., "output": ...}    one exchange: a user turn (the instruction,
                                                         then a blank line and the input if there
                                                         is one) and the assistant's output
A chat or instruction record may carry a "system" string: it becomes the first turn.
A .json file is read whole with json.load (its records are then held in memory, about twice
the file's size): convert a file too large for that to JSONL, which streams line by line.
A .txt file is one document, read in pieces that end at blank lines (or after about 64 KB),
with <|endoftext|> only after its last piece.

Bad input is never silently dropped: a JSONL line that is not valid UTF-8, not JSON, not an
object, lacks the text field or holds a malformed chat record is skipped and reported with its
file and line number (a .json array's records: `file:item N`), and a file that is mostly bad
is refused.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np

from minigpt.chat_template import CHAT_ROLES
from minigpt.corpus import BUILTIN_CORPUS, builtin_corpus, builtin_corpus_fingerprint
from minigpt.errors import UserInputError
from minigpt.sft_corpus import BUILTIN_SFT, builtin_sft_conversations, builtin_sft_fingerprint
from minigpt.tokenizer import Tokenizer

log = logging.getLogger("minigpt.data")

DATA_SUFFIXES = (".jsonl", ".json", ".txt")
BUILTIN_SOURCES = (BUILTIN_CORPUS, BUILTIN_SFT)  # names that stand for a built-in set rather than a file
MAX_TEXT_PIECE_BYTES = 64 * 1024  # a .txt piece ends at a blank line, or at the first line end past this size
BAD_LINE_FRACTION = 0.5  # a file with more bad lines than this (once 20 lines are read) is refused
BAD_LINE_GRACE = 20
WARNINGS_PER_FILE = 10  # report this many bad lines of a file one by one, then only count them
REPORT_EXAMPLES = 10  # DataReport keeps this many "file:line: reason" examples
UTF8_BOM = b"\xef\xbb\xbf"
LINE_CHUNK_BYTES = 1 << 20  # a longer line is read, checked and hashed a chunk at a time (never copied whole)


def resolve_data_files(patterns: Sequence[str], builtin: bool = True) -> list[Path | str]:
    """Expand files, directories (searched recursively for .jsonl/.json/.txt) and globs into a list
    of files: each pattern's matches sorted, the patterns in the order given, no file twice.
    "builtin" (the built-in corpus) and "builtin-sft" (the built-in chat set) are passed through,
    unless `builtin` is False (labelled records, which no built-in text set holds)."""
    found: list[Path | str] = []
    for pattern in patterns:
        if builtin and pattern in BUILTIN_SOURCES:
            found.append(pattern)
            continue
        path = Path(pattern)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
            if not matches:
                raise UserInputError(f"Directory {path} holds no .jsonl, .json or .txt files; check the path or add files to it.")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(pattern):
            matches = sorted(Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file())
            if not matches:
                raise UserInputError(f"No file matches {pattern}; check the directory and the pattern.")
        else:
            hint = f" (or use '{BUILTIN_CORPUS}' for the built-in corpus)" if builtin else ""
            raise UserInputError(f"Data file {path} does not exist; check the path{hint}.")
        for match in matches:
            if match.suffix not in DATA_SUFFIXES:
                raise UserInputError(f"Data file {match} is neither .jsonl nor .txt nor .json; convert it or leave it out.")
            if match.stat().st_size == 0:
                raise UserInputError(f"Data file {match} is empty; fill it or leave it out.")
            if match not in found:
                found.append(match)
    return found


@dataclass
class Document:
    """One unit of training text, with where the next one starts."""

    text: str | None = None  # plain text ...
    conversations: list | None = None  # ... or a chat record ...
    tokens: np.ndarray | None = None  # ... or token ids from a token cache (<|endoftext|> included)
    assistant_mask: np.ndarray | None = None  # with `tokens`: True where the assistant speaks
    hash_fraction: float | None = None  # known in advance for cached documents
    ends_document: bool = True  # append <|endoftext|> after it (a .txt file's pieces: only the last)
    starts_document: bool = True  # put the tokenizer's BOS (if any) before it (a .txt file's pieces: only the first)


@dataclass
class DataReport:
    """What was read: kept documents and skipped lines, with the first few reasons."""

    documents: int = 0
    bad_lines: int = 0
    examples: list[str] = field(default_factory=list)
    truncated: int = 0  # one-document-per-row streams: documents cut at the end to fit a row
    dropped: int = 0  # ... and documents left with no target to learn from after the cut
    no_assistant: int = 0  # assistant-only streams: conversations the assistant never speaks in (nothing to learn)
    rows: int = 0  # whole-document streams (chat fine-tuning): rows laid out,
    row_documents: int = 0  # ... documents placed in them (1 per row unpacked),
    row_tokens: int = 0  # ... and their tokens (the rest of each row of block_size + 1 is padding)


@dataclass
class TokenCache:
    """An opened cache (built by `minigpt.token_cache.build_token_cache`): read-only arrays over its files."""

    directory: Path
    tokens: np.ndarray
    offsets: np.ndarray
    hash_fractions: np.ndarray
    assistant_mask: np.ndarray | None  # True where the assistant speaks; None: a cache without chat documents

    @classmethod
    def open(cls, directory: str | Path) -> "TokenCache":
        directory = Path(directory)
        try:
            index = json.loads((directory / "index.json").read_text())

            def array(name: str, dtype: str) -> np.ndarray:
                if not index["tokens"]:
                    return np.zeros(0, dtype=dtype)
                return np.memmap(directory / name, dtype=dtype, mode="r", shape=(index["tokens"],))

            tokens = array("tokens.bin", index["dtype"])
            mask = array("assistant_mask.bin", "bool") if index["has_chat"] else None
            offsets = np.load(directory / "offsets.npy")
            hash_fractions = np.load(directory / "hash_fractions.npy")
        except (OSError, ValueError, KeyError) as error:
            raise UserInputError(f"Token cache {directory} is unreadable ({error}); delete it to have it rebuilt.") from None
        return cls(directory, tokens, offsets, hash_fractions, mask)

    @property
    def documents(self) -> int:
        return len(self.offsets) - 1

    def document(self, index: int) -> Document:
        """Document `index`, already tokenized: ids, assistant mask and its hold-out hash."""
        start, end = self.offsets[index], self.offsets[index + 1]
        tokens = np.asarray(self.tokens[start:end], dtype=np.int64)
        mask = np.ones(len(tokens), dtype=bool) if self.assistant_mask is None else np.array(self.assistant_mask[start:end])
        return Document(tokens=tokens, assistant_mask=mask, hash_fraction=float(self.hash_fractions[index]), ends_document=False)

    def __str__(self) -> str:
        return f"token cache {self.directory}"


def _read_line(file: BinaryIO) -> bytes | bytearray:
    """The next line of `file` (empty at its end). A line longer than LINE_CHUNK_BYTES grows in
    place, a chunk at a time: `readline()` would gather its pieces and join them, holding a 200 MB
    line twice."""
    line = file.readline(LINE_CHUNK_BYTES)
    if len(line) < LINE_CHUNK_BYTES or line.endswith(b"\n"):
        return line
    grown = bytearray(line)
    while not grown.endswith(b"\n") and (chunk := file.readline(LINE_CHUNK_BYTES)):
        grown += chunk
    return grown


def _parse_jsonl_line(line: str, text_field: str) -> Document | str:
    """A Document, or the reason the line is bad."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg})"
    except RecursionError:
        return "JSON nested too deeply"
    return parse_record(record, text_field)


def parse_record(record: object, text_field: str = "text") -> Document | str:
    """One record of a .jsonl line or a .json array as a Document, or the reason it is bad.

    Plain text wins when the text field is there; otherwise the chat formats are tried in the
    order of the module docstring, and every one ends up as a list of turns for render_chat.
    """
    if not isinstance(record, dict):
        return "not a JSON object"
    if isinstance(record.get(text_field), str):
        if not _is_unicode_text(record[text_field]):
            return f"field '{text_field}' holds a lone surrogate escape such as \\ud800"
        return Document(text=record[text_field])
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        return "field 'system' is not a string"
    system_turns = [{"role": "system", "content": system}] if system is not None else []
    for key in ("conversations", "messages"):
        if key in record:
            if not isinstance(record[key], list):
                return f"'{key}' is not a list of turns"
            return _parse_conversations(system_turns + record[key], key, first_number=1 - len(system_turns))
    if "instruction" in record:
        turns = _instruction_turns(record)
        if isinstance(turns, str):
            return turns
        return _parse_conversations(system_turns + turns, "instruction record", first_number=1 - len(system_turns))
    return f"no string field '{text_field}' (nor a 'conversations' or 'messages' list, nor an 'instruction' record)"


def _instruction_turns(record: dict) -> list[dict] | str:
    """An Alpaca-style instruction record as a user turn and an assistant turn (or why it is bad).

    The user turn is the instruction, then, when `input` is not empty, a blank line and the input:
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"} ->
    user "Translate to French.\n\ncat", assistant "chat".
    """
    instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
    for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
        if not isinstance(value, str):
            return f"field '{name}' of the instruction record is not a string"
    request = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": request}, {"role": "assistant", "content": output}]


def _parse_conversations(turns: list, key: str = "conversations", first_number: int = 1) -> Document | str:
    """A chat record, checked here so that a bad one is reported with its line like any other.

    `first_number` numbers the turns as the file has them: a "system" field prepended as turn 0.
    """
    if not turns:
        return f"'{key}' is an empty list"
    for number, turn in enumerate(turns, start=first_number):
        if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
            roles = ", ".join(CHAT_ROLES)
            return f"turn {number} of '{key}' is not an object with a 'role' ({roles}) and a string 'content'"
        if not _is_unicode_text(turn["content"]):
            return f"turn {number} of '{key}' holds a lone surrogate escape such as \\ud800"
    return Document(conversations=turns)


def _is_unicode_text(text: str) -> bool:
    """False for a string with a lone surrogate ("\\ud800" is valid JSON but not text): the tokenizer
    would fail on it with an obscure TypeError in the middle of training. (Checked a million
    characters at a time: encoding a 200 MB text at once would hold it twice.)"""
    if text.isascii():
        return True
    try:
        for start in range(0, len(text), LINE_CHUNK_BYTES):
            text[start:start + LINE_CHUNK_BYTES].encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def document_hash_fraction(document: Document) -> float:
    """A stable number in [0, 1) per document (Python's hash() changes between runs; this does not)."""
    if document.hash_fraction is not None:
        return document.hash_fraction
    content = document.text if document.text is not None else json.dumps(document.conversations, sort_keys=True)
    digest = hashlib.blake2b(digest_size=8)
    for start in range(0, len(content), LINE_CHUNK_BYTES):  # the same sum as of the whole, without a copy of it
        digest.update(content[start:start + LINE_CHUNK_BYTES].encode("utf-8"))
    return int.from_bytes(digest.digest(), "big") / 2**64


def sources_fingerprint(sources: Sequence[Path | str]) -> list:
    """What identifies the content of the sources: each file's path, size and modification time
    (a built-in set: its own fingerprint). It changes when any file changes."""
    parts = []
    for source in sources:
        if source == BUILTIN_CORPUS:
            parts.append(["builtin", builtin_corpus_fingerprint()])
        elif source == BUILTIN_SFT:
            parts.append([BUILTIN_SFT, builtin_sft_fingerprint()])
        else:
            stat = Path(source).stat()
            parts.append([str(Path(source).resolve()), stat.st_size, stat.st_mtime_ns])
    return parts


def iter_documents(sources: Sequence[Path | str], text_field: str = "text", report: DataReport | None = None) -> Iterator[str]:
    """The text of every document of the sources, in order (chat records as their turns' contents).

    Used to train tokenizers; bad lines are reported and skipped exactly as in training, and
    counted in `report` if one is given.
    """
    reader = DocumentReader(list(sources), text_field, report)
    while (document := reader.next_document()) is not None:
        if document.text is not None:
            yield document.text
        else:
            yield "\n".join(turn["content"] for turn in document.conversations)


class DocumentReader:
    """Reads documents one at a time from a list of sources; its position is five integers."""

    def __init__(self, sources: list, text_field: str, report: DataReport | None = None):
        self.sources, self.text_field = sources, text_field
        self.report = report if report is not None else DataReport()
        self.source_index, self.offset, self.line_number = 0, 0, 0
        self.file: BinaryIO | None = None
        self.json_records: list | None = None  # the array of the current .json source, once read
        self.lines_read = self.bad_in_file = 0  # of the current file, for the bad-line rule
        self.first_bad_line = ""  # of the current file, to quote if every line turns out bad
        self.warn = True  # log bad lines (off once a pass has reported them)

    def position(self) -> list[int]:
        # The bad-line counts belong to it: a run resumed near the end of a file must judge the
        # file on all its lines, not only on the few read since the restart.
        return [self.source_index, self.offset, self.line_number, self.lines_read, self.bad_in_file]

    def seek(self, position: Sequence[int]) -> None:
        self.close()
        self.source_index, self.offset, self.line_number, self.lines_read, self.bad_in_file = (int(value) for value in position)
        self.first_bad_line = ""

    def close(self) -> None:
        self.json_records = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def next_document(self) -> Document | None:
        """The next document, or None at the end of the last source."""
        while self.source_index < len(self.sources):
            source = self.sources[self.source_index]
            if isinstance(source, TokenCache):
                document = self._next_cached(source)
            elif source in BUILTIN_SOURCES:
                document = self._next_builtin(source)
            elif Path(source).suffix == ".txt":
                document = self._next_text_piece(Path(source))
            elif Path(source).suffix == ".json":
                document = self._next_json_item(Path(source))
            else:
                document = self._next_jsonl(Path(source))
            if document is not None:
                self.report.documents += 1
                return document
            self._finish_source()
        return None

    def _finish_source(self) -> None:
        source = self.sources[self.source_index]
        if self.lines_read and self.bad_in_file == self.lines_read:
            unit = "item" if Path(source).suffix == ".json" else "line"
            raise UserInputError(f"Every {unit} of {source} is bad (e.g. {self.first_bad_line}); check its format or --text-field.")
        self.close()
        self.source_index += 1
        self.offset = self.line_number = self.lines_read = self.bad_in_file = 0
        self.first_bad_line = ""

    def _open(self, path: Path) -> BinaryIO:
        if self.file is None:
            self.file = open(path, "rb")
            if self.offset == 0 and self.file.read(len(UTF8_BOM)) == UTF8_BOM:
                self.offset = len(UTF8_BOM)  # a byte-order mark (Windows editors write one) is not content
            self.file.seek(self.offset)
        return self.file

    def _next_builtin(self, source: str) -> Document | None:
        # Both sets are held in memory: the position is simply an index.
        if source == BUILTIN_CORPUS:
            documents = builtin_corpus()
            if self.offset >= len(documents):
                return None
            self.offset += 1
            return Document(text=documents[self.offset - 1])
        conversations = builtin_sft_conversations()
        if self.offset >= len(conversations):
            return None
        self.offset += 1
        return Document(conversations=conversations[self.offset - 1]["conversations"])

    def _next_cached(self, cache: TokenCache) -> Document | None:
        if self.offset >= cache.documents:
            return None
        self.offset += 1
        return cache.document(self.offset - 1)

    def _next_jsonl(self, path: Path) -> Document | None:
        file = self._open(path)
        while raw := _read_line(file):
            self.offset += len(raw)
            self.line_number += 1
            if raw.isspace():
                continue
            self.lines_read += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                line = None
            del raw  # a line may be 200 MB: its bytes go before its text is parsed
            parsed = _parse_jsonl_line(line, self.text_field) if line is not None else "not valid UTF-8"
            del line
            if isinstance(parsed, Document):
                return parsed
            self._bad_line(path, parsed)
        return None

    def _next_json_item(self, path: Path) -> Document | None:
        """The next record of a .json array; `offset` and `line_number` count items, not bytes."""
        if self.json_records is None:
            self.json_records = read_json_array(path)
        while self.offset < len(self.json_records):
            self.offset += 1
            self.line_number = self.offset
            self.lines_read += 1
            parsed = parse_record(self.json_records[self.offset - 1], self.text_field)
            if isinstance(parsed, Document):
                return parsed
            self._bad_line(path, parsed)
        return None

    def _bad_line(self, path: Path, reason: str) -> None:
        self.bad_in_file += 1
        self.report.bad_lines += 1
        unit = "item" if path.suffix == ".json" else "line"
        where = f"{path}:item {self.line_number}" if unit == "item" else f"{path}:{self.line_number}"
        if self.bad_in_file == 1:
            self.first_bad_line = f"{unit} {self.line_number}: {reason}"
        if len(self.report.examples) < REPORT_EXAMPLES:
            self.report.examples.append(f"{where}: {reason}")
        if self.warn and self.bad_in_file <= WARNINGS_PER_FILE:
            log.warning("Skipping %s: %s", where, reason)
        if self.lines_read >= BAD_LINE_GRACE and self.bad_in_file > BAD_LINE_FRACTION * self.lines_read:
            raise UserInputError(
                f"{path} has {self.bad_in_file} bad {unit}s in its first {self.lines_read} (e.g. {unit} {self.line_number}: {reason}); "
                "fix the file or check --text-field."
            )

    def _next_text_piece(self, path: Path) -> Document | None:
        """A paragraph of a .txt file: lines up to and including a blank line.

        A paragraph ends early at the first line boundary past MAX_TEXT_PIECE_BYTES, and a line
        longer than that (a file with no line breaks at all, say) is cut on a character boundary,
        so memory stays bounded whatever the file looks like.
        """
        file = self._open(path)
        piece = bytearray()
        has_content = False  # blank lines before any text stay with the piece they precede
        first_line = self.line_number + 1
        at_start = self.lines_read == 0  # the file's first piece (counted per file)
        while raw := file.readline(MAX_TEXT_PIECE_BYTES):
            if len(raw) == MAX_TEXT_PIECE_BYTES and not raw.endswith(b"\n"):  # an overlong line: the rest comes next
                whole = raw[: _whole_characters(raw)]
                self.offset += len(whole)
                piece += whole
                break
            self.offset += len(raw)
            self.line_number += 1
            piece += raw
            is_blank = not raw.strip()
            if (is_blank and has_content) or len(piece) >= MAX_TEXT_PIECE_BYTES:
                break
            has_content = has_content or not is_blank
        if not piece:
            return None
        file.seek(self.offset)  # back to the end of the piece, where a cut line goes on
        at_end = file.read(1) == b""
        file.seek(self.offset)
        self.lines_read += 1
        try:
            # Windows line ends read as "\n": the same text trains the same whichever editor saved it.
            return Document(text=piece.decode("utf-8").replace("\r\n", "\n"), ends_document=at_end, starts_document=at_start)
        except UnicodeDecodeError:
            self._bad_line(path, f"the paragraph starting at line {first_line} is not valid UTF-8")
            return Document(text="", ends_document=at_end, starts_document=at_start)


def read_json_array(path: Path) -> list:
    """The records of a .json file, which must hold one array (a byte-order mark is allowed).

    The whole file is parsed at once (json.load has no streaming mode); JSONL is the format
    for data too large for memory.
    """
    try:
        records = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise UserInputError(f"{path} is not valid UTF-8 (byte {error.start}); save it as UTF-8.") from None
    except json.JSONDecodeError as error:
        raise UserInputError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}).") from None
    except RecursionError:
        raise UserInputError(f"{path} holds JSON nested too deeply to read; flatten its records.") from None
    if not isinstance(records, list):
        raise UserInputError(
            f"{path} does not hold a JSON array of records; write it as [{{...}}, {{...}}] "
            "or as a .jsonl file with one record per line."
        )
    return records


class ReadProblem(str):
    """Why a record could not be read or used: what `json_records` and a record parser give instead of a record."""


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, parsed record or the reason it is unreadable) for each record of a .jsonl file (where:
    `file:line`, blank lines skipped) or a .json array (`file:item N`)."""
    if path.suffix == ".json":
        yield from ((f"{path}:item {number}", record) for number, record in enumerate(read_json_array(path), start=1))
        return
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8"))
            except UnicodeDecodeError:
                yield f"{path}:{number}", ReadProblem("not valid UTF-8")
            except (json.JSONDecodeError, RecursionError):
                yield f"{path}:{number}", ReadProblem("not valid JSON")


def read_records(sources: Sequence[Path | str], parse: Callable[[Any, str], Any], kind: str, needs: str,
                 report: DataReport | None = None) -> list:
    """Every good record of the .jsonl/.json sources, in order, as `parse(record, where)` makes it;
    a record it answers with a `ReadProblem` is skipped with a `file:line: reason` warning (the
    first WARNINGS_PER_FILE of a file) and counted in the report's bad lines. A source of another
    kind, or one with no good record, is refused: `kind` names the records ("labelled"), `needs`
    says what a record needs."""
    report = report if report is not None else DataReport()
    records: list = []
    for source in sources:
        path = Path(source)
        if path.suffix not in (".jsonl", ".json"):
            raise UserInputError(f"{kind.capitalize()} data must be .jsonl or .json records; {path} is neither.")
        bad, good_before = 0, len(records)
        for where, item in json_records(path):
            parsed = item if isinstance(item, ReadProblem) else parse(item, where)
            if isinstance(parsed, ReadProblem):
                bad += 1
                report.bad_lines += 1
                if bad <= WARNINGS_PER_FILE:
                    log.warning("Skipping %s: %s", where, parsed)
                continue
            records.append(parsed)
        if len(records) == good_before:
            raise UserInputError(f"{path} holds no usable {kind} records; each needs {needs}.")
    report.documents += len(records)
    return records


def _whole_characters(chunk: bytes) -> int:
    """The length of `chunk` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(chunk)) + 1):
        byte = chunk[-back]
        if byte < 0x80:  # ASCII: nothing is cut
            return len(chunk)
        if byte >= 0xC0:  # the first byte of a character of 2, 3 or 4 bytes
            length = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(chunk) if back >= length else len(chunk) - back
    return len(chunk)  # not UTF-8 at all: the decoder will say so


LONG_TEXT_CHARACTERS = 1 << 16  # a longer text is tokenized in pieces of about this many characters
PIECES_PER_CALL = 16  # ... this many pieces to one (parallel) call of the tokenizer: about 1M characters
TOKENIZE_BATCH_CHARACTERS = 1 << 20  # documents are read and tokenized in batches of at most this many characters


def text_pieces(text: str, size: int, start: int = 0) -> Iterator[str]:
    """`text` from character `start` on, in consecutive pieces of at most `size` characters (at
    least half that, but the last), each cut before a space that stands between two non-spaces.
    The byte-level BPE pre-tokenizer splits there anyway (" word" starts a token), so the pieces'
    tokens are the whole text's; a stretch of `size` with no such space (one endless word) is cut
    at `size`. Where a piece ends depends only on where it starts, so the pieces from the end of
    one are the same wherever the text was first started."""
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + size // 2, cut)
        if cut <= start:
            cut = start + size
        yield text[start:cut]
        start = cut
    yield text[start:]


def long_text_runs(text: str, tokenizer: Tokenizer, start: int = 0) -> Iterator[tuple[np.ndarray, int]]:
    """The token ids of a text too long to tokenize in one call, from character `start` on: a run
    of PIECES_PER_CALL pieces (`text_pieces`, about a million characters) at a time, each with the
    character where the next run starts (len(text) after the last).

    One tokenizer call holds an object per token (its string, offsets, ids), a hundred times the
    text's size, so the text goes in pieces, and a run's ids are one int64 array.
    """
    pieces = text_pieces(text, LONG_TEXT_CHARACTERS, start)
    while batch := list(itertools.islice(pieces, PIECES_PER_CALL)):
        start += sum(map(len, batch))
        yield np.fromiter(itertools.chain.from_iterable(tokenizer.encode_batch(batch)), dtype=np.int64), start


def is_long_text(document: Document) -> bool:
    """Whether the document is text too long to tokenize in one call (see `long_text_runs`)."""
    return document.text is not None and len(document.text) > LONG_TEXT_CHARACTERS


def long_document_runs(document: Document, tokenizer: Tokenizer, start: int = 0) -> Iterator[tuple[np.ndarray, int]]:
    """A long document's ids from character `start` on, a run at a time as `long_text_runs` gives
    its text's, with the BOS a pretrained folder's tokenizer puts before a document's first run and
    EOS after its last, as `encode_documents` gives them; each with the character the next run starts at."""
    text = document.text
    for ids, end in long_text_runs(text, tokenizer, start):
        before = tokenizer.bos_ids if start == 0 and document.starts_document else ()
        after = (tokenizer.eos_id,) if end >= len(text) and document.ends_document else ()
        if before or after:
            ids = np.concatenate([np.asarray(before, dtype=np.int64), ids, np.asarray(after, dtype=np.int64)])
        yield ids, end
        start = end


def encode_long_text(document: Document, tokenizer: Tokenizer) -> np.ndarray:
    """A long document's ids (`long_document_runs`) in one array. It is allocated for the most
    tokens the text can have (one per UTF-8 byte); only the pages written become memory, so the
    ids cost what they hold. (For a document of any length, read its runs as they come instead:
    `document_runs`.)
    """
    text = document.text
    size = sum(len(text[start:start + LONG_TEXT_CHARACTERS].encode("utf-8")) for start in range(0, len(text), LONG_TEXT_CHARACTERS))
    ids = np.empty(len(tokenizer.bos_ids) + size + 1, dtype=np.int64)
    filled = 0
    for run, _ in long_document_runs(document, tokenizer):
        ids[filled:filled + len(run)] = run
        filled += len(run)
    return ids[:filled]


def encode_documents(documents: Sequence[Document], tokenizer: Tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each document as (token ids, assistant mask): the one path from a document to tokens,
    shared by training streams and token caches.

    Plain text is encoded in one batch (fast, in parallel), chat records through the chat
    template, and cached documents are already ids. The mask is True on every token of plain
    text and, in a conversation, on what the assistant says (its content and end of turn). EOS
    ends each text (mask True: the model learns where text ends), after the BOS a pretrained
    folder's tokenizer puts before it; a conversation ends as its chat template ends it (ChatML
    with <|endoftext|>; a pretrained template's rendering is the whole document).
    """
    texts = [document.text for document in documents if document.text is not None and not is_long_text(document)]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    results = []
    for document in documents:
        if document.tokens is not None:
            ids, mask = document.tokens, document.assistant_mask
        elif is_long_text(document):  # its end-of-text is written in place: appending would copy every id
            ids = encode_long_text(document, tokenizer)
            results.append((ids, np.ones(len(ids), dtype=bool)))
            continue
        elif document.text is not None:
            ids = np.asarray([*(tokenizer.bos_ids if document.starts_document else ()), *next(encoded)], dtype=np.int64)
            mask = np.ones(len(ids), dtype=bool)
            end = (tokenizer.eos_id,)
        else:
            chat_ids, assistant = tokenizer.render_chat(document.conversations)
            ids, mask = np.asarray(chat_ids, dtype=np.int64), np.asarray(assistant, dtype=bool)
            end = tokenizer.chat_template.document_end
        if document.ends_document and end:
            ids, mask = np.append(ids, end), np.append(mask, [True] * len(end))
        results.append((ids, mask))
    return results


def document_runs(documents: Sequence[Document], tokenizer: Tokenizer) -> Iterator[tuple[Document, np.ndarray, np.ndarray, bool]]:
    """`encode_documents`' (ids, mask) of each document, a long one's a run at a time
    (`long_document_runs`, every token a target), each with whether it is its document's last:
    whatever a document's length, the ids held at once are one run's. For what reads every token
    once (a token cache, counting a document's tokens); training keeps its place inside a long
    document instead (`minigpt.data.LongDocument`)."""
    encoded = iter(encode_documents([document for document in documents if not is_long_text(document)], tokenizer))
    for document in documents:
        if is_long_text(document):
            for ids, end in long_document_runs(document, tokenizer):
                yield document, ids, np.ones(len(ids), dtype=bool), end >= len(document.text)
        else:
            yield document, *next(encoded), True


def document_batches(reader: DocumentReader, max_documents: int) -> Iterator[list[Document]]:
    """The reader's documents in batches of at most `max_documents`, each ended too once it holds
    TOKENIZE_BATCH_CHARACTERS of text: long documents are not gathered by the hundred."""
    while True:
        batch, characters = [], 0
        while len(batch) < max_documents and characters < TOKENIZE_BATCH_CHARACTERS and (document := reader.next_document()) is not None:
            batch.append(document)
            characters += len(document.text) if document.text is not None else 0
        if not batch:
            return
        yield batch
