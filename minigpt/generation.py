"""Generating text: prompts in, text out, on top of the decoding engine.

The layers, from the bottom:
    minigpt/engine.py      token ids in, token ids out: a batch of rows decoded together with a
                           KV cache, each row with its own sampling settings, seed and stop ids
    Tokenizer.incremental_decoder
                           token ids in, text pieces out: never half a UTF-8 character, and
                           nothing from a stop string on
    this module            the two together: `stream_text` yields each prompt's text as it comes,
                           `generate` returns one prompt's token ids
    printing               the callers: `minigpt generate`, `ChatSession.reply`, the notebook's
                           ChatBox write the pieces where they belong

The sampling knobs (temperature, top-k, top-p, repetition penalty) are described on
`SamplingConfig`, and `next_token_distribution` shows what they do to one row's logits; both
live in minigpt/engine.py and are imported here, where most code looks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from minigpt.engine import Engine, FinishReason, Request, SamplingConfig, TokenEvent, next_token_distribution
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer

# What MiniGPT samples with where neither the user nor the model (a pretrained folder's
# generation_config.json: `Tokenizer.sampling_defaults`) says otherwise.
DEFAULT_SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.0}

__all__ = ["SamplingConfig", "next_token_distribution", "generate", "TextPiece", "RowText", "stream_text", "complete"]


def generate(model: GPT, prompt_ids: Sequence[int], sampling: SamplingConfig, use_kv_cache: bool = True) -> list[int]:
    """The ids one prompt generates (prompt and stop id excluded), decoded by an engine of its own.

    `use_kv_cache=False` recomputes the whole context at every step: slower, the same tokens.
    """
    events = Engine(model, use_kv_cache).generate([Request(prompt_ids, sampling)])
    return [event.token for event in events if event.token is not None]


@dataclass(frozen=True)
class TextPiece:
    """Some text of request `index`; on the request's last piece `finish` says why it ended:
    "stop" (a stop id or stop string) or "length" (max_new_tokens, or the model's window)."""

    index: int
    text: str
    finish: FinishReason | None = None


class RowText:
    """The text of one engine row: its events in, pieces of text out, and how the row ended.

    A stop string ends a row as a stop id does: the text ends before it, and the row is
    cancelled on the engine (it has said all it will). `stream_text` and the server's batcher
    (minigpt/batcher.py) turn events into text through it.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str] = ()):
        self.decoder = tokenizer.incremental_decoder(stop_strings)

    def take(self, event: TokenEvent, engine: Engine) -> tuple[str, FinishReason | None]:
        """The text `event` adds (maybe ""), and why the row ended if this was its last event."""
        piece = self.decoder.add(event.token) if event.token is not None else ""
        finish = event.finish
        if self.decoder.stopped and finish is None:  # a stop string
            engine.cancel(event.row)
            finish = "stop"
        if finish is not None:
            piece += self.decoder.finish()
        return piece, finish

    def cut(self) -> str:
        """The row is ended from outside (a server shutting down): the text still held back."""
        return self.decoder.finish()


def stream_text(
    engine: Engine, tokenizer: Tokenizer, requests: Sequence[Request], stop_strings: Sequence[str] = ()
) -> Iterator[TextPiece]:
    """Decode `requests` together on `engine` and yield their text in request order.

    Request 0's text comes piece by piece as it is sampled; the later requests decode alongside,
    and what one made while the earlier ones ran comes out at once when its turn comes, then
    live. Printing the pieces one after another therefore reads like decoding them one after
    another, only sooner. Each request ends with exactly one piece whose `finish` is set.

    A stop string ends a request as a stop id does: the text ends before it, and the engine's
    row is cancelled. Rows of other callers sharing the engine are stepped but not reported.
    """
    texts = [RowText(tokenizer, stop_strings) for _ in requests]
    row_ids = [engine.add(request) for request in requests]
    index_of_row = {row: index for index, row in enumerate(row_ids)}
    waiting: list[list[str]] = [[] for _ in requests]  # text made, not yet yielded
    finished: list[FinishReason | None] = [None] * len(requests)
    shown = 0  # requests before this one are fully yielded
    try:
        while shown < len(requests):
            for event in engine.step():
                index = index_of_row.get(event.row)
                if index is None:
                    continue
                piece, finish = texts[index].take(event, engine)
                finished[index] = finish
                waiting[index].append(piece)
            while shown < len(requests):  # yield in order: the first unfinished request holds the rest back
                text, waiting[shown] = "".join(waiting[shown]), []
                if finished[shown] is None:
                    if text:
                        yield TextPiece(shown, text)
                    break
                yield TextPiece(shown, text, finished[shown])
                shown += 1
    except GeneratorExit:  # the caller stopped reading: free the rows it will never read
        for row, finish in zip(row_ids, finished):
            if finish is None:
                engine.cancel(row)
        raise


def complete(model: GPT, tokenizer: Tokenizer, prompt_ids: Sequence[int], sampling: SamplingConfig,
             stop_strings: Sequence[str] = ()) -> str:
    """The whole text one prompt generates."""
    return "".join(piece.text for piece in stream_text(Engine(model), tokenizer, [Request(prompt_ids, sampling)], stop_strings))
