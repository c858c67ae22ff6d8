"""`minigpt chat MODEL`: talk to a chat-tuned model in the terminal, reply streamed.

The conversation itself (the chat template, the stop tokens, dropping the oldest exchanges once
it outgrows the model's window) is `minigpt.chat.ChatSession`; this module is the terminal loop.

    /reset   forget the conversation (the system prompt stays)
    /exit    leave (so does Ctrl-D); Ctrl-C stops a reply that runs on
With --prompt the command answers that one message, prints only the reply, and exits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minigpt.chat import ChatSession, notice
from minigpt.checkpoint import resolve_model_directory
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.cli.sampling import add_sampling_flags, sampling_from_arguments
from minigpt.errors import UserInputError
from minigpt.lora import find_adapter, load_model_for_inference
from minigpt.runtime import select_device

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
    session = ChatSession(model, tokenizer, sampling, arguments.system, arguments.stop, arguments.kv_cache)
    if arguments.prompt is not None:
        session.reply(arguments.prompt)
    else:
        interactive(session)
    return 0
