"""Chat templates: how a conversation becomes the token ids a chat model reads and writes.

A conversation is a list of turns `{"role": "system" | "user" | "assistant", "content": str}`.
Every tokenizer has one chat template, and every command goes through its three answers:

    render(conversation)  the token ids of a whole conversation, and a mask that is True on what
                          the assistant says: its replies and the end-of-turn token(s) after each
                          (supervised fine-tuning computes the loss only there)
    prompt(conversation)  the conversation so far followed by the header of the assistant's reply:
                          what generation starts from
    stop_ids              the token ids that end the assistant's turn

Two kinds:

    ChatML         MiniGPT's own models: `<|im_start|>role\\ncontent<|im_end|>\\n`, built token by
                   token, so the mask is exact by construction.
    JinjaTemplate  a pretrained model's own template (its folder's chat_template.jinja or
                   tokenizer_config.json's "chat_template"), rendered as `transformers`'
                   `apply_chat_template` renders it: Jinja2's sandbox, the same helpers, the same
                   whitespace settings. For ordinary text the ids are exactly apply_chat_template's.
    NoChatTemplate a pretrained folder that has none (a base model): chats are refused.

Where a message's content looks like a special token ("<|im_end|>" typed by a user), both encode
it as plain text: only the special tokens the template writes itself are special. Plain
`transformers` (`apply_chat_template` with its default `sanitize_control_tokens=False`) would encode
it as the control token, letting a user close their own turn and write the assistant's. So
MiniGPT's ids differ from apply_chat_template's exactly on such text.

Templates are code from the internet: they run in Jinja2's `ImmutableSandboxedEnvironment`, never
a plain `Environment`, so a template cannot reach Python's internals (`__class__`, `__globals__`,
...), call unsafe methods, or change the conversation it is given; `*` and `**` are bounded, and so
are the widths a template pads or formats to, so `{{ 'a' * 10**10 }}` or `{{ 'a'|center(10**10) }}`
is refused instead of taking the machine's memory. (A sandbox bounds no loop's time: a template of
nested loops can still run long; Jinja caps each `range` at 100000.)
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Callable, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.runtime
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HuggingFaceTokenizer

from minigpt.errors import UserInputError

CHAT_ROLES = ("system", "user", "assistant")
Span = tuple[int, int]  # [start, end) character offsets in a rendered conversation


def check_turn(turn: object) -> tuple[str, str]:
    """The role and content of one turn, or a UserInputError saying what a turn must be."""
    if not isinstance(turn, dict) or turn.get("role") not in CHAT_ROLES or not isinstance(turn.get("content"), str):
        raise UserInputError(
            f"A chat turn must be an object with 'role' ({', '.join(CHAT_ROLES)}) and string 'content', got {str(turn)[:80]}."
        )
    return turn["role"], turn["content"]


class ChatTemplate(ABC):
    """What every chat template answers (see the module docstring)."""

    stop_ids: tuple[int, ...]  # a generated reply ends at any of these
    # Appended after a rendered conversation in training data: ChatML ends the document with
    # <|endoftext|>; a pretrained template's rendering is already the whole document.
    document_end: tuple[int, ...]

    @abstractmethod
    def render(self, conversation: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation, and a mask True on the assistant's replies and their end of turn."""

    @abstractmethod
    def prompt(self, conversation: Sequence[dict]) -> list[int]:
        """Token ids of the conversation so far followed by the header of the assistant's reply."""


class ChatML(ChatTemplate):
    """MiniGPT's chat format: each turn is `<|im_start|>role\\ncontent<|im_end|>\\n`."""

    def __init__(self, backend: HuggingFaceTokenizer, im_start_id: int, im_end_id: int, eos_id: int):
        self.backend, self.im_start_id, self.im_end_id = backend, im_start_id, im_end_id
        self.text_backend = reading_specials_as_text(json.loads(backend.to_str()))  # for what a message says
        # A reply ends at <|im_end|> (the turn is over), or at <|endoftext|> should the model write that instead.
        self.stop_ids = (im_end_id, eos_id)
        self.document_end = (eos_id,)

    def render(self, conversation: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """The mask covers the assistant's content and its closing <|im_end|> (so the model learns to stop)."""
        ids: list[int] = []
        mask: list[bool] = []
        newline = self._encode("\n")
        for turn in conversation:
            role, content = check_turn(turn)
            header = [self.im_start_id] + self._encode(f"{role}\n")
            body = self.text_backend.encode(content, add_special_tokens=False).ids + [self.im_end_id]
            ids += header + body + newline
            mask += [False] * len(header) + [role == "assistant"] * len(body) + [False] * len(newline)
        return ids, mask

    def prompt(self, conversation: Sequence[dict]) -> list[int]:
        ids, _ = self.render(conversation)
        return ids + [self.im_start_id] + self._encode("assistant\n")

    def _encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids


class NoChatTemplate(ChatTemplate):
    """A pretrained folder without a chat template (a base model's): chats are refused in one sentence."""

    document_end = ()

    def __init__(self, folder: str, stop_ids: Sequence[int]):
        self.folder, self.stop_ids = folder, tuple(stop_ids)

    def render(self, conversation: Sequence[dict]) -> tuple[list[int], list[bool]]:
        raise UserInputError(f"{self.folder} has no chat template (no chat_template.jinja, no 'chat_template' in "
                             "tokenizer_config.json): it is a base model; train it on plain text, or copy its instruct model's template in.")

    def prompt(self, conversation: Sequence[dict]) -> list[int]:
        return self.render(conversation)[0]


# ----------------------------------------------------------------------------- Jinja templates

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which some templates wrap around the assistant's
    text for transformers' assistant masks: here it renders its body unchanged (MiniGPT finds the
    assistant's text itself, so any template works)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        line = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(line)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise TemplateError(message)  # templates call it to refuse a conversation ("roles must alternate")


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators: tuple[str, str] | None = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON, as transformers gives them.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


MAX_REPEATED_LENGTH = 1_000_000  # the longest text or list a template may make with `*` (a prompt is far shorter)
MAX_EXPONENT = 1_000  # the largest power `**` may raise a number to
# A width of seven digits or more in a %-format or str.format spec ('%10000000000s', '{:>10000000000}')
LARGE_FORMAT_WIDTH = re.compile(r"\d{%d,}" % len(str(MAX_REPEATED_LENGTH)))


def _check_count(value: object) -> None:
    """Refuse a width or count that would pad a result past MAX_REPEATED_LENGTH."""
    if isinstance(value, int) and not isinstance(value, bool) and value > MAX_REPEATED_LENGTH:
        raise SecurityError(f"a width or count of {value} is past {MAX_REPEATED_LENGTH}")


def _check_format(text: object) -> None:
    """Refuse a format text (a template formats with its own texts) with a width past
    MAX_REPEATED_LENGTH."""
    if isinstance(text, str) and LARGE_FORMAT_WIDTH.search(text):
        raise SecurityError(f"a format with a width past {MAX_REPEATED_LENGTH} characters")


def _bounded_filter(filter_function: Callable, checks_format: bool = False) -> Callable:
    """A padding filter (center, indent) with its widths checked first, or the format filter with
    its format text checked too."""
    def bounded(value: object, *args: object, **kwargs: object) -> object:
        if checks_format:
            _check_format(value)
        for argument in (*args, *kwargs.values()):
            _check_count(argument)
        return filter_function(value, *args, **kwargs)
    return bounded


class _ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, which keeps a template from Python's internals (and says so, where
    Jinja's prints nothing), with `*`, `**` and the widths of padding and formatting bounded too:
    `{{ 'a' * 10**10 }}` or `{{ 'a'|center(10**10) }}` would otherwise ask for 10 GB before anything
    could stop it."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def unsafe_undefined(self, obj: object, attribute: str) -> jinja2.Undefined:
        # Jinja's sandbox answers `''.__class__` with an empty Undefined, which prints as nothing:
        # a template reaching for Python's internals is stopped with the reason instead.
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: object, right: object) -> object:
        if operator == "*":
            sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) and len(sequence) * count > MAX_REPEATED_LENGTH:
                raise SecurityError(f"repeating a text or list {count} times makes more than {MAX_REPEATED_LENGTH} items")
        elif operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"a power of {right} is past {MAX_EXPONENT}")
        elif operator == "%":
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def wrap_str_format(self, value: object) -> Callable[..., str] | None:
        # '{:>10000000000}'.format(x): Jinja wraps a text's format method when the template reads it
        if isinstance(getattr(value, "__self__", None), str) and getattr(value, "__name__", "") in ("format", "format_map"):
            _check_format(value.__self__)
        return super().wrap_str_format(value)

    def call(__self, __context: jinja2.runtime.Context, __obj: object, *args: object, **kwargs: object) -> object:
        # Every call a template makes with a width or count: 'a'.ljust(10**10), 'a'.zfill(...)
        for argument in (*args, *kwargs.values()):
            _check_count(argument)
        return super().call(__context, __obj, *args, **kwargs)


def compile_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it: in the immutable sandbox, blocks'
    newlines and indentation trimmed, `{% break %}`/`{% continue %}` allowed, with the helpers
    real templates call (raise_exception, strftime_now, a plain-JSON tojson)."""
    environment = _ChatTemplateSandbox(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    for name in ("center", "indent", "format"):
        environment.filters[name] = _bounded_filter(environment.filters[name], checks_format=name == "format")
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except TemplateError as error:
        raise UserInputError(f"The chat template is not valid Jinja ({error}); fix the folder's chat template.") from None


class JinjaTemplate(ChatTemplate):
    """A pretrained model's own Jinja chat template, with the tokenizer it writes tokens of.

    `special_tokens` are the names templates read (bos_token, eos_token, ...: tokenizer_config.json's
    values); `stop_ids` end a reply (generation_config.json's eos_token_id and the tokenizer's EOS).
    """

    def __init__(self, source: str, backend: HuggingFaceTokenizer, special_tokens: dict[str, str], stop_ids: Sequence[int]):
        self.source, self.template = source, compile_template(source)
        self.backend, self.special_tokens = backend, dict(special_tokens)
        self.stop_ids, self.document_end = tuple(stop_ids), ()
        self.special_ids = {index for index, token in backend.get_added_tokens_decoder().items() if token.special}
        # Copies that read special tokens in text as text: what a message's content is encoded with,
        # at the start of the text and further on (where a Metaspace tokenizer that puts "▁" before
        # the first word, as Llama 2's does, must not put one).
        self.text_backend = reading_specials_as_text(json.loads(backend.to_str()))
        self.continuation_backend = reading_specials_as_text(_without_first_word_prefix(json.loads(backend.to_str())))
        # A template that ignores add_generation_prompt (a base model's) has no reply header of its own.
        self.writes_reply_header = "add_generation_prompt" in source

    # -- rendering text

    def render_text(self, conversation: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for `conversation`: exactly what apply_chat_template(tokenize=False) returns."""
        messages = [{"role": role, "content": content} for role, content in map(check_turn, conversation)]
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt, **self.special_tokens)
        except SecurityError as error:
            raise UserInputError(f"The chat template tried something Jinja's sandbox forbids ({error}); "
                                 "MiniGPT will not run this template: use the model's original chat_template.jinja.") from None
        except TemplateError as error:
            raise UserInputError(f"The chat template refused this conversation: {error}") from None
        except Exception as error:  # noqa: BLE001 - a template is foreign code: its own bug, said in one sentence
            raise UserInputError(f"The chat template failed on this conversation ({type(error).__name__}: {error}).") from None

    def content_spans(self, conversation: Sequence[dict], text: str, add_generation_prompt: bool) -> list[Span | None]:
        """Where each message's content landed in `text` (the rendering of `conversation`).

        The conversation is rendered again with one message's content replaced by a marker, a
        string that appears nowhere else; what differs between that rendering and `text` is what
        the template made of this message's content, wherever it put it and whatever it did to
        it (trimmed it, folded it into another turn, dropped its reasoning). None where the
        template does not show the message at all.
        """
        spans: list[Span | None] = []
        for index, turn in enumerate(conversation):
            marker = _marker(turn["content"], index)
            marked = [*conversation[:index], {**turn, "content": marker}, *conversation[index + 1:]]
            with_marker = self.render_text(marked, add_generation_prompt)
            at = with_marker.find(marker)
            if at < 0:
                spans.append(None)
                continue
            before, after = with_marker[:at], with_marker[at + len(marker):]
            if text.startswith(before) and text.endswith(after) and len(before) + len(after) <= len(text):
                spans.append((len(before), len(text) - len(after)))  # the template copied the content in one place
            else:  # the content also changed text around it: the span covers everything that differs
                start = _common_prefix_length(text, with_marker)
                end = len(text) - _common_prefix_length(text[start:][::-1], with_marker[start:][::-1])
                spans.append((start, max(start, end)))
        return spans

    # -- encoding

    def encode(self, text: str, content_spans: Sequence[Span | None]) -> tuple[list[int], list[Span]]:
        """The ids of rendered `text` and each token's character span.

        The whole text is encoded as apply_chat_template encodes it. Should a special token have
        been read inside a message's content (text that looks like one), the text between the
        template's own special tokens is encoded again with special tokens read as text.
        """
        encoding = self.backend.encode(text, add_special_tokens=False)
        ids, offsets = list(encoding.ids), list(encoding.offsets)
        spans = [span for span in content_spans if span is not None]
        inside = [index for index, token in enumerate(ids) if token in self.special_ids and _overlaps(offsets[index], spans)]
        if not inside:
            return ids, offsets
        kept = [index for index, token in enumerate(ids) if token in self.special_ids and index not in inside]
        strict_ids: list[int] = []
        strict_offsets: list[Span] = []
        cursor = 0
        for index in kept + [None]:
            start, end = offsets[index] if index is not None else (len(text), len(text))
            if start > cursor:
                reader = self.text_backend if cursor == 0 else self.continuation_backend
                piece = reader.encode(text[cursor:start], add_special_tokens=False)
                strict_ids += piece.ids
                strict_offsets += [(cursor + a, cursor + b) for a, b in piece.offsets]
            if index is not None:
                strict_ids.append(ids[index])
                strict_offsets.append((start, end))
            cursor = end
        return strict_ids, strict_offsets

    # -- the interface

    def render(self, conversation: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """The mask covers, for each assistant message, the text the template made of it (its content,
        and anything the template writes between the reply header and it, such as Qwen3's
        `<think>` block), through the first stop token after it (the template's end of turn)."""
        text = self.render_text(conversation)
        spans = self.content_spans(conversation, text, add_generation_prompt=False)
        ids, offsets = self.encode(text, spans)
        mask = [False] * len(ids)
        for index, (turn, span) in enumerate(zip(conversation, spans)):
            if turn["role"] != "assistant" or span is None:
                continue
            start = self._reply_start(conversation[:index], text, span[0])
            following = [other[0] for other in spans[index + 1:] if other is not None and other[0] >= span[1]]
            limit = min(following, default=len(text))
            end = span[1]
            for token, (token_start, token_end) in zip(ids, offsets):
                if token in self.stop_ids and token_start >= span[1] and token_end <= limit:
                    end = token_end  # the end-of-turn token the template writes after the reply
                    break
            for position, (token_start, token_end) in enumerate(offsets):
                if token_end > start and token_start < end:
                    mask[position] = True
        return ids, mask

    def prompt(self, conversation: Sequence[dict]) -> list[int]:
        text = self.render_text(conversation, add_generation_prompt=True)
        ids, _ = self.encode(text, self.content_spans(conversation, text, add_generation_prompt=True))
        return ids

    def _reply_start(self, before: Sequence[dict], text: str, content_start: int) -> int:
        """Where the assistant's reply starts in `text`: after the template's generation prompt for the
        turns `before` it, when that is where the reply goes (so whatever a template writes between
        the header and the content, such as Qwen3's `<think>\\n`, is the assistant's); else at its content."""
        if not self.writes_reply_header or not before:
            return content_start
        try:
            header = self.render_text(before, add_generation_prompt=True)
        except UserInputError:  # a template may refuse a conversation cut short
            return content_start
        return len(header) if text.startswith(header) and len(header) <= content_start else content_start


def reading_specials_as_text(description: dict) -> HuggingFaceTokenizer:
    """A tokenizer built from tokenizer.json's `description` that encodes a special token written in
    a text as its characters: for what a user types (message contents, a completions prompt)."""
    backend = HuggingFaceTokenizer.from_str(json.dumps(description))
    backend.encode_special_tokens = True
    return backend


def _without_first_word_prefix(description: dict) -> dict:
    """tokenizer.json's description with a Metaspace pre-tokenizer's prepend_scheme "first" made
    "never": for text that follows a special token, which that scheme leaves unprefixed."""
    pre_tokenizer = description.get("pre_tokenizer") or {}
    for part in pre_tokenizer.get("pretokenizers") or [pre_tokenizer]:
        if part.get("type") == "Metaspace" and part.get("prepend_scheme") == "first":
            part["prepend_scheme"] = "never"
    return description


def _marker(content: str, index: int) -> str:
    """A string that is in no content: private-use characters at both ends that `content` lacks, so
    the rendering with the marker differs from the real one exactly where the content went."""
    edge = next(chr(code) for code in range(0xE000, 0xF900) if chr(code) not in content)
    return f"{edge}minigpt-message-{index}{edge}"


def _common_prefix_length(first: str, second: str) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def _overlaps(span: Span, spans: Sequence[Span]) -> bool:
    return any(span[0] < end and start < span[1] for start, end in spans)
