"""`minigpt chat MODEL`: talk to a chat-tuned model in the terminal, reply streamed.

Each turn, the whole conversation so far is rendered with the chat template (ChatML:
`<|im_start|>role\\ncontent<|im_end|>\\n`) followed by the header of the assistant's reply, and
the model writes until it produces <|im_end|> (or <|endoftext|>). The model sees at most
block_size tokens, so when the conversation grows past that the oldest exchanges are dropped
(the system prompt is kept), with a notice.

    /reset   forget the conversation (the system prompt stays)
    /exit    leave (so does Ctrl-D); Ctrl-C stops a reply that runs on
With --prompt the command answers that one message, prints only the reply, and exits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minigpt.checkpoint import resolve_model_directory
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.cli.sampling import add_sampling_flags, print_streamed, sampling_from_arguments
from minigpt.errors import UserInputError
from minigpt.generation import SamplingConfig, stream_tokens
from minigpt.lora import find_adapter, load_model_for_inference
from minigpt.model import GPT
from minigpt.runtime import select_device
from minigpt.tokenizer import Tokenizer

CHAT_STAGE = "sft"  # the stage a chat-tuned model's config.json records under "train"
USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=program_name("chat"), description="Chat with a model in the terminal (/reset, /exit or Ctrl-D).")
    add_shared_arguments(parser, "model")
    parser.add_argument("--system", default="", help="the system prompt: instructions the model sees before the conversation")
    parser.add_argument("--prompt", default=None, help="answer this one message, print only the reply, and exit")
    add_sampling_flags(parser, max_new_tokens=256)
    add_shared_arguments(parser, "device")
    return parser


def training_stage(path: str | Path) -> str:
    """The stage ("pretrain", "sft", ...) recorded in the model's config.json; "pretrain" when none is.

    For an adapter directory its own config.json is read (the fine-tuning run's), else the base's.
    """
    adapter = find_adapter(path)
    if adapter is not None and (adapter / "config.json").is_file():
        home = adapter
    else:
        _, home = resolve_model_directory(path)
    return json.loads((home / "config.json").read_text()).get("train", {}).get("stage", "pretrain")


class ChatSession:
    """A conversation with a model: the history, and how it is cut down to fit the model's window."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, sampling: SamplingConfig, system: str = ""):
        self.model, self.tokenizer = model, tokenizer
        self.sampling = sampling
        self.sampling.stop_ids = (tokenizer.im_end_id, tokenizer.eos_id)
        self.system_turns = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = []  # user and assistant turns, oldest first
        # The prompt leaves room for a reply of max_new_tokens, but never more than half the window.
        self.prompt_limit = model.config.block_size - min(sampling.max_new_tokens, model.config.block_size // 2)

    def reset(self) -> None:
        self.history.clear()

    def prompt_ids(self, message: str) -> list[int]:
        """The prompt for the reply to `message`; drops the oldest exchanges while it is too long."""
        turns = self.history + [{"role": "user", "content": message}]
        dropped = 0
        while len(ids := self.tokenizer.chat_prompt(self.system_turns + turns)) > self.prompt_limit:
            if len(turns) == 1:
                raise UserInputError(
                    f"The message is {len(ids)} tokens with the system prompt; this model's window leaves room for "
                    f"{self.prompt_limit}: write a shorter one (or lower --max-new-tokens)."
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
        answer = print_streamed(self.tokenizer, stream_tokens(self.model, ids, self.sampling))
        self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer


def notice(text: str) -> None:
    """A message about the session, on stderr: stdout carries only the conversation."""
    print(text, file=sys.stderr, flush=True)


def interactive(session: ChatSession) -> None:
    """Read messages from stdin until /exit or end of input; a message too long is refused, not fatal."""
    print("Chat started: /reset forgets the conversation, /exit (or Ctrl-D) leaves.")
    while True:
        try:
            message = input(USER_PROMPT).strip()
        except EOFError:
            print()
            return
        if message == "/exit":
            return
        if message == "/reset":
            session.reset()
            print("(conversation cleared)")
            continue
        if not message:
            continue
        sys.stdout.write(ASSISTANT_PROMPT)
        try:
            session.reply(message)
        except UserInputError as error:
            notice(f"\nerror: {error}")
        except KeyboardInterrupt:  # Ctrl-C stops this reply (it is not kept), not the session
            notice("\n(reply interrupted)")


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    sampling = sampling_from_arguments(arguments)
    model, tokenizer, _ = load_model_for_inference(arguments.model, select_device(arguments.device))
    stage = training_stage(arguments.model)
    if stage != CHAT_STAGE:
        notice(f"warning: this model's training stage is '{stage}', not '{CHAT_STAGE}': it was never chat-tuned, "
               "so expect rambling replies that may not stop.")
    session = ChatSession(model, tokenizer, sampling, arguments.system)
    if arguments.prompt is not None:
        session.reply(arguments.prompt)
    else:
        interactive(session)
    return 0
