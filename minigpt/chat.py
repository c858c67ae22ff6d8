"""A conversation with a chat-tuned model: the history, fitting it into the window, streamed replies.

Each turn, the whole conversation so far is rendered with the model's chat template (ChatML,
`<|im_start|>role\\ncontent<|im_end|>\\n`, for MiniGPT's models; a pretrained folder's own Jinja
template otherwise: minigpt/chat_template.py) followed by the header of the assistant's reply, and
the model writes until it produces an end-of-turn token (`Tokenizer.stop_ids(chat=True)`). The
model sees at most block_size tokens, so when the conversation grows past that the oldest
exchanges are dropped (the system prompt is kept), with a notice on stderr.

`minigpt chat` (minigpt/cli/chat.py) wraps a session in a terminal loop; the notebook's ChatBox
(minigpt/notebook.py) wraps one in widgets. Both stream the reply to stdout as it is sampled.
The decoding itself is the engine's (minigpt/engine.py, through minigpt.generation.stream_text);
the session only decides what to ask it and prints what comes back.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

from minigpt.engine import Engine, Request
from minigpt.errors import UserInputError
from minigpt.generation import SamplingConfig, stream_text
from minigpt.model import GPT
from minigpt.tokenizer import Tokenizer


def notice(text: str) -> None:
    """A message about the session, on stderr: stdout carries only the conversation."""
    print(text, file=sys.stderr, flush=True)


class ChatSession:
    """A conversation with a model: the history, and how it is cut down to fit the model's window.

    `sampling` may be replaced between replies (the notebook's sliders do); the caller's object is
    never changed: the chat stop ids (`Tokenizer.stop_ids(chat=True)`) are added to a copy at
    each reply. `stop_strings` end a reply before any of them, as a stop id would.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, sampling: SamplingConfig, system: str = "",
                 stop_strings: Sequence[str] = (), use_kv_cache: bool = True):
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling
        self.stop_strings, self.use_kv_cache = tuple(stop_strings), use_kv_cache
        self.system_turns = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []  # user and assistant turns, oldest first

    @property
    def prompt_limit(self) -> int:
        """The prompt leaves room for a reply of max_new_tokens, but never more than half the window."""
        window = self.model.config.block_size
        return window - min(self.sampling.max_new_tokens, window // 2)

    def reset(self) -> None:
        """Forget the conversation; the system prompt stays."""
        self.history.clear()

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt for the reply to `message`; drops the oldest exchanges while it is too long."""
        turns = self.history + [{"role": "user", "content": message}]
        limit, dropped = self.prompt_limit, 0
        while len(ids := self.tokenizer.chat_prompt(self.system_turns + turns)) > limit:
            if len(turns) == 1:
                raise UserInputError(
                    f"The message is {len(ids)} tokens with the system prompt; this model's window leaves room for "
                    f"{limit}: write a shorter one (or lower --max-new-tokens)."
                )
            turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
            dropped += 1
        if dropped:
            self.history = turns[:-1]
            notice(f"(the conversation outgrew the {self.model.config.block_size}-token window: "
                   f"dropped its {dropped} oldest exchange{'' if dropped == 1 else 's'})")
        return ids

    def reply(self, message: str) -> str:
        """Stream the model's answer to `message` to stdout and add both to the history."""
        ids = self.prompt_ids(message)
        sampling = dataclasses.replace(self.sampling, stop_ids=self.tokenizer.stop_ids(chat=True))
        # A fresh engine per reply: one interrupted by Ctrl-C leaves nothing half-done behind.
        engine = Engine(self.model, self.use_kv_cache)
        answer = ""
        for piece in stream_text(engine, self.tokenizer, [Request(ids, sampling)], self.stop_strings):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            answer += piece.text
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer
