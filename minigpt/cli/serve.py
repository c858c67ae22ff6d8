"""`minigpt serve MODEL`: an OpenAI-compatible server and a chat page for one model.

The HTTP side is minigpt/server.py, the batching minigpt/batcher.py; this module checks the
flags, loads the model, opens the socket and runs uvicorn until Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Iterator

from minigpt.cli.common import ArgumentParser, add_shared_arguments, program_name, run_command
from minigpt.errors import UserInputError
from minigpt.model_folder import load
from minigpt.runtime import select_device

log = logging.getLogger("minigpt.serve")


def build_parser() -> ArgumentParser:
    prog = program_name("serve")
    parser = ArgumentParser(
        prog=prog, description=(
            "Serve a model over HTTP: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models;\n"
            "/v1/classify for a classifier) and a chat page at /. Requests in flight decode together in one\n"
            "batch. Ctrl-C or SIGTERM stops taking requests, lets running ones finish for --shutdown-timeout\n"
            "seconds, and exits."),
        epilog=(f"examples:\n  {prog} checkpoints/RUN/final_model\n"
                f"  {prog} checkpoints/RUN --port 8080 --api-key SECRET --max-batch-size 16\n"
                "then open http://127.0.0.1:8000/ or point an OpenAI client at http://127.0.0.1:8000/v1"),
    )
    add_shared_arguments(parser, "model")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8000, help="the port (default: 8000; 0 picks a free one)")
    parser.add_argument("--served-model-name", metavar="NAME",
                        help="the model's name in the API, which requests must give as 'model' (default: the folder's name)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 route (default: $MINIGPT_API_KEY, which other "
                             "users cannot read in `ps` as they can a flag; none if unset)")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="let web pages from ORIGIN (e.g. http://localhost:3000) call the API; repeatable (default: none)")
    parser.add_argument("--max-batch-size", type=int, default=8, metavar="N", help="requests decoded together (default: 8)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests that may wait for a place in the batch; more get 429 (default: 64)")
    parser.add_argument("--max-tokens-limit", type=int, default=1024, metavar="N",
                        help="the most tokens one request may generate (default: 1024)")
    parser.add_argument("--max-body-bytes", type=int, default=1_000_000, metavar="N",
                        help="a larger request body gets 413 (default: 1000000)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on Ctrl-C or SIGTERM, how long running requests may go on before they are ended (default: 10)")
    parser.add_argument("--kv-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse each token's keys and values (--no-kv-cache recomputes the context every token; for comparison)")
    add_shared_arguments(parser, "device")
    return parser


def check_arguments(arguments: argparse.Namespace) -> None:
    for name in ("max_batch_size", "max_tokens_limit", "max_body_bytes"):
        if getattr(arguments, name) < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(arguments, name)}.")
    if arguments.max_queue < 0:
        raise UserInputError(f"--max-queue must not be negative, got {arguments.max_queue}.")
    if arguments.shutdown_timeout < 0:
        raise UserInputError(f"--shutdown-timeout must not be negative, got {arguments.shutdown_timeout}.")
    if not 0 <= arguments.port <= 65535:
        raise UserInputError(f"--port must be in 0-65535, got {arguments.port}.")
    if arguments.api_key == "":
        raise UserInputError("--api-key needs a non-empty key.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_socket(host: str, port: int) -> socket.socket:
    """The listening socket, opened here so a port in use is one sentence, not a traceback."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as error:
        raise UserInputError(f"Cannot listen on {host}:{port} ({error.strerror or error}); "
                             "choose another --port (or --host).") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@run_command
def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    check_arguments(arguments)
    try:
        import uvicorn

        from minigpt.server import ServeSettings, begin_shutdown, create_app
    except ImportError as error:
        raise UserInputError(f"minigpt serve needs FastAPI and uvicorn ({error}): pip install 'minigpt[serve]'.") from None
    api_key = arguments.api_key if arguments.api_key is not None else os.environ.get("MINIGPT_API_KEY") or None
    name = arguments.served_model_name or Path(arguments.model).resolve().name
    sock = open_socket(arguments.host, arguments.port)
    loaded = load(arguments.model, select_device(arguments.device))
    settings = ServeSettings(
        model_name=name, max_batch_size=arguments.max_batch_size, max_queue=arguments.max_queue,
        max_tokens_limit=arguments.max_tokens_limit, max_body_bytes=arguments.max_body_bytes, api_key=api_key,
        cors_origins=arguments.cors_origin, shutdown_timeout=arguments.shutdown_timeout, use_kv_cache=arguments.kv_cache,
    )
    app = create_app(loaded, settings)

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            """Ctrl-C and SIGTERM start the graceful stop; uvicorn's own version would raise the
            signal again once stopped, ending the process with it instead of exit status 0."""
            previous = {number: signal.signal(number, self.handle_exit) for number in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for number, handler in previous.items():
                    signal.signal(number, handler)

        def handle_exit(self, sig: int, frame: object) -> None:
            if not app.state.shutting_down:
                log.info(f"Stopping: no new requests; running ones have {settings.shutdown_timeout:g} s to finish "
                         "(press Ctrl-C again to stop at once).")
                begin_shutdown(app)
            super().handle_exit(sig, frame)

    # uvicorn's own backstop comes after the batcher has ended every job at --shutdown-timeout.
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=settings.shutdown_timeout + 5)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if not is_loopback(arguments.host):
        log.warning(f"warning: listening on {arguments.host}, reachable from other machines"
                    f"{'' if api_key else ' with no API key (set --api-key)'}.")
    kind = "classifier" if loaded.is_classifier else "language model"
    log.info(f"Serving {name} ({kind}) on http://{shown}:{port}/ : the chat page at /, the OpenAI API at /v1 "
             f"{'(API key required)' if api_key else ''}".rstrip())
    Server(config).run(sockets=[sock])
    log.info("Stopped.")
    return 0
