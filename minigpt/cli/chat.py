"""`minigpt chat MODEL`: talk to a chat-tuned model in the terminal, reply streamed.

The conversation itself (the chat template, the stop tokens, dropping the oldest exchanges once
it outgrows the model's window) is `minigpt.chat.ChatSession`; this module is the terminal loop.

    /reset   forget the conversation (the system prompt stays)
    /exit    leave (so does Ctrl-D); Ctrl-C stops a reply that runs on
With --prompt the command answers that one message, prints only the reply, and exits.
"""

from __future__ import annotations

import sys

from minigpt.chat import ChatSession, notice
from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.cli.sampling import add_sampling_flags, sampling_from_arguments
from minigpt.errors import UserInputError
from minigpt.model_folder import load_language_model
from minigpt.runtime import select_device
from minigpt.stages import STAGES

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
    sampling_from_arguments(arguments)  # a bad flag is refused before the model loads
    loaded = load_language_model(arguments.model, select_device(arguments.device))
    sampling = sampling_from_arguments(arguments, loaded.tokenizer.sampling_defaults)
    stage = loaded.stage  # an adapter's is its fine-tuning run's
    if not (stage in STAGES and STAGES[stage].chat):
        chat_stages = " or ".join(f"'{name}'" for name, known in STAGES.items() if known.chat)
        notice(f"warning: this model's training stage is '{stage}', not {chat_stages}: it was never chat-tuned, "
               "so expect rambling replies that may not stop.")
    session = ChatSession(loaded.model, loaded.tokenizer, sampling, arguments.system, arguments.stop, arguments.kv_cache)
    if arguments.prompt is not None:
        session.reply(arguments.prompt)
    else:
        interactive(session)
    return 0
