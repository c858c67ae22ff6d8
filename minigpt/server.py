"""`minigpt serve`: the OpenAI HTTP API and a chat page, in front of the batcher.

The routes (OpenAI's shapes, so the `openai` client, editors and chat front-ends work unchanged):

    GET  /                       the chat page (minigpt/web/chat.html: one file, no CDN)
    GET  /health                 {"status": "ok", "running": N, "waiting": M}
    GET  /v1/models              the one model, named by --served-model-name
    POST /v1/chat/completions    messages in, the assistant's reply out (the chat template's prompt)
    POST /v1/completions         plain text in, its continuation out (with `logprobs` and `echo`)
    POST /v1/classify            a classifier's labels, as `minigpt classify` gives them

A generation is a `Job` on the `Batcher` (minigpt/batcher.py), which decodes every request in
flight together on one engine thread. The thread hands each piece of text to the request's
asyncio queue (`loop.call_soon_threadsafe`); the request either gathers the pieces into one
JSON answer or sends each as a server-sent event as it comes:

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"content": "Hel"}, ...}], ...}

    data: [DONE]

A client that goes away cancels its job, so its row leaves the batch at the next step.

Every mistake a client can make is answered in OpenAI's error JSON,
`{"error": {"message", "type", "param", "code"}}`, with one sentence saying what is wrong:
400 (bad JSON, a wrong type or value, a prompt that does not fit), 401 (API key), 404 (unknown
model or route), 413 (body too large), 429 with Retry-After (queue full), 503 (shutting down).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt.batcher import Batcher, Job, Piece, QueueFull, ShuttingDown
from minigpt.classification import classify
from minigpt.engine import SamplingConfig
from minigpt.errors import UserInputError
from minigpt.evaluation import TokenLogprob, token_logprobs
from minigpt.labelled_data import LabelledRecord
from minigpt.model_folder import LoadedModel
from minigpt.tokenizer import Tokenizer

DISCONNECT_CHECK_SECONDS = 0.5  # how often a request waiting for a whole answer checks that its client is still there

@dataclass
class ServeSettings:
    """What `minigpt serve`'s flags set (see its --help)."""

    model_name: str
    max_batch_size: int = 8  # rows decoded together
    max_queue: int = 64  # requests waiting for a row; one more gets 429
    max_tokens_limit: int = 1024  # the most tokens one request may ask for
    max_body_bytes: int = 1_000_000  # a larger request body gets 413
    api_key: str | None = None  # when set, every /v1 route wants "Authorization: Bearer KEY"
    cors_origins: list[str] = field(default_factory=list)
    shutdown_timeout: float = 10.0  # seconds in-flight requests may run on after Ctrl-C or SIGTERM
    use_kv_cache: bool = True
    classify_batch_size: int = 32


class APIError(Exception):
    """An answer in OpenAI's error JSON: HTTP `status`, one sentence, and what it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def create_app(loaded: LoadedModel, settings: ServeSettings) -> FastAPI:
    """The server's application for one loaded model (a language model or a classifier)."""
    batcher = None if loaded.is_classifier else Batcher(
        loaded.model, loaded.tokenizer, settings.max_batch_size, settings.max_queue, settings.use_kv_cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if batcher is not None:  # the server has stopped: end what is left and stop the thread
            batcher.close()

    app = FastAPI(title="MiniGPT", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batcher, app.state.settings = batcher, settings
    app.state.shutting_down = False
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    created = int(time.time())
    window = loaded.model.config.block_size

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(UserInputError)
    async def user_error(request: Request, error: UserInputError) -> JSONResponse:
        return APIError(400, str(error)).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {error.detail}."
        return APIError(error.status_code, message, code="not_found" if error.status_code == 404 else None).response()

    def check_access(request: Request) -> None:
        """Every /v1 route: 503 once shutting down, 401 without the API key (when one is set)."""
        if app.state.shutting_down:
            raise APIError(503, "The server is shutting down; send the request again once it is back.",
                           kind="server_error", code="shutting_down")
        if settings.api_key is not None:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            # compare_digest takes as long whatever the key, so timing cannot reveal how much of it matched.
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
                raise APIError(401, "This server wants an API key: send the header 'Authorization: Bearer KEY'.",
                               code="invalid_api_key")

    def model_card() -> dict:
        # max_model_len (as vLLM names it): the window, prompt and reply together.
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "minigpt", "max_model_len": window}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("minigpt").joinpath("web/chat.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        counts = batcher.counts if batcher is not None else {"running": 0, "waiting": 0}
        status = "shutting_down" if app.state.shutting_down else "ok"
        return {"status": status, "model": settings.model_name, **counts}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_access(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict:
        check_access(request)
        check_model_name(name, settings.model_name, required=True)
        return model_card()

    async def generation_request(request: Request, route: str) -> tuple[dict, Batcher]:
        """What every generating route checks first: the key, the body, the model's name, and that
        this server holds a language model; the body and the generator that will run the job."""
        check_access(request)
        body = await read_body(request, settings.max_body_bytes)
        check_model_name(body.get("model"), settings.model_name, required=True)
        return body, language_model(batcher, route)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body, generator = await generation_request(request, "/v1/chat/completions")
        messages = read_messages(body)
        refuse_unsupported(body, chat=True)
        prompt_ids = loaded.tokenizer.chat_prompt(messages)
        sampling, stops = read_sampling(body, len(prompt_ids), window, settings.max_tokens_limit,
                                        loaded.tokenizer.stop_ids(chat=True), "messages")
        queue, deliver = piece_queue()
        job, reply = Job(prompt_ids, sampling, deliver, stops), Reply(settings.model_name, True, len(prompt_ids), body)
        submit(generator, job)
        if body.get("stream"):
            return stream_response(generator, job, queue, reply)
        text, finish = await gathered(request, generator, job, queue)
        return reply.whole(text, finish, len(job.token_ids))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body, generator = await generation_request(request, "/v1/completions")
        prompt_ids = read_prompt(body, loaded)
        refuse_unsupported(body, chat=False)
        echo, top = body.get("echo") is True, read_logprobs(body)
        sampling, stops = read_sampling(body, len(prompt_ids), window, settings.max_tokens_limit,
                                        loaded.tokenizer.stop_ids(chat=False), "prompt")
        queue, deliver = piece_queue()
        job, reply = Job(prompt_ids, sampling, deliver, stops), Reply(settings.model_name, False, len(prompt_ids), body)
        if sampling.max_new_tokens == 0:  # echo with max_tokens 0: score the prompt, generate nothing
            text, finish = "", "length"
        else:
            submit(generator, job)
            if body.get("stream"):
                return stream_response(generator, job, queue, reply)
            text, finish = await gathered(request, generator, job, queue)
        if echo:
            prompt = body["prompt"]
            text = (prompt if isinstance(prompt, str) else prompt[0] if isinstance(prompt[0], str)
                    else loaded.tokenizer.decode(prompt_ids)) + text
        logprobs = None
        if top is not None:  # one forward pass over prompt and reply, beside the batch (the model is only read)
            scored = await run_in_threadpool(token_logprobs, loaded.model, list(prompt_ids) + job.token_ids, top)
            logprobs = logprobs_json(scored if echo else scored[len(prompt_ids):], loaded.tokenizer)
        return reply.whole(text, finish, len(job.token_ids), logprobs)

    def submit(generator: Batcher, job: Job) -> None:
        """Hand the job to the batcher, or say why it cannot take it (429, 503)."""
        try:
            generator.submit(job)
        except QueueFull:
            raise APIError(429, f"The server is busy: a full batch decodes and {settings.max_queue} requests already wait; "
                                "try again shortly.",
                           kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise APIError(503, "The server is shutting down; send the request again once it is back.",
                           kind="server_error", code="shutting_down") from None

    @app.post("/v1/classify")
    async def classify_texts(request: Request) -> dict:
        check_access(request)
        body = await read_body(request, settings.max_body_bytes)
        check_model_name(body.get("model"), settings.model_name, required=False)
        if not loaded.is_classifier:
            raise APIError(400, f"{settings.model_name} is a language model, not a classifier: "
                                "use /v1/chat/completions or /v1/completions.", code="wrong_model_kind")
        texts = body.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
            raise APIError(400, "'input' must be a text or a non-empty list of texts.", param="input")
        records = [LabelledRecord(text, {}, f"input[{index}]") for index, text in enumerate(texts)]
        async with classify_lock:  # one forward pass at a time on the model
            classified = await run_in_threadpool(classify, loaded.model, loaded.tokenizer, loaded.config.train.label_maps,
                                                 records, settings.classify_batch_size)
        tokens = sum(min(len(loaded.tokenizer.encode(text)), window) for text in texts)
        return {"id": f"clf-{uuid.uuid4().hex}", "object": "classification", "created": int(time.time()),
                "model": settings.model_name,
                "data": [{"index": index, **prediction} for index, prediction in enumerate(classified.predictions)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    classify_lock = asyncio.Lock()
    return app


def begin_shutdown(app: FastAPI) -> None:
    """Ctrl-C or SIGTERM: refuse new requests (503) and give the running ones --shutdown-timeout
    seconds to finish; the batcher then ends them, each with finish reason "length"."""
    app.state.shutting_down = True
    if app.state.batcher is not None:
        app.state.batcher.begin_shutdown(app.state.settings.shutdown_timeout)


# ----------------------------------------------------------------------------- reading requests


async def read_body(request: Request, limit: int) -> dict:
    """The request's JSON object; 413 past `limit` bytes (told by Content-Length, or counted as it comes)."""
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes (--max-body-bytes).",
                         code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise too_large
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"The request body is not valid JSON ({error}).", code="invalid_json") from None
    except RecursionError:  # [[[[...]]]] deeper than Python's recursion limit
        raise APIError(400, "The request body's JSON is nested too deeply to read.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:  # JSON may escape half of a UTF-16 pair ("\\ud800"), which is no character: no tokenizer can read it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "The request body holds a lone surrogate escape (such as \\ud800), which is no character; "
                            "send valid Unicode text.", code="invalid_json") from None
    return body


def check_model_name(name: Any, served: str, required: bool) -> None:
    if name is None and not required:
        return
    if not isinstance(name, str):
        raise APIError(400, f"'model' must be the name of the served model ('{served}').", param="model")
    if name != served:
        raise APIError(404, f"The model '{name}' does not exist here; this server serves '{served}'.",
                       param="model", code="model_not_found")


def language_model(batcher: Batcher | None, route: str) -> Batcher:
    if batcher is None:
        raise APIError(400, f"This server's model is a classifier: {route} needs a language model; use /v1/classify.",
                       code="wrong_model_kind")
    return batcher


def read_messages(body: dict) -> list[dict]:
    """`messages` as turns for the chat template: string content, or OpenAI's list of text parts joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {'role', 'content'} objects.", param="messages")
    turns = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{param} must be an object with 'role' and 'content'.", param=param)
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{param}.role must be 'system', 'user' or 'assistant', got {role!r}.", param=f"{param}.role")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise APIError(400, f"{param}.content may hold only text parts; this model reads text.",
                               param=f"{param}.content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise APIError(400, f"{param}.content must be a string.", param=f"{param}.content")
        turns.append({"role": role, "content": content})
    return turns


def read_prompt(body: dict, loaded: LoadedModel) -> list[int]:
    """`prompt`'s token ids: a text (read as plain text: special tokens written in it stay text),
    a one-text list, or a list of token ids. An empty prompt starts from <|endoftext|>."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return loaded.tokenizer.encode_text(prompt) or [loaded.tokenizer.eos_id]
    vocabulary = loaded.tokenizer.vocab_size
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocabulary
                                                   for i in prompt):
        return prompt
    raise APIError(400, f"'prompt' must be a text, or a list of token ids below {vocabulary}; "
                        "this server takes one prompt per request.", param="prompt")


def refuse_unsupported(body: dict, chat: bool) -> None:
    """Fields this server does not implement are refused when they ask for something, never ignored."""
    n = body.get("n", 1)
    if n != 1 or isinstance(n, bool):
        raise APIError(400, f"'n' must be 1 here (one choice per request), got {n!r}.", param="n")
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value != 0):
            raise APIError(400, f"'{name}' is not implemented here; leave it out (or 0), or use 'repetition_penalty'.",
                           param=name)
    if chat and body.get("logprobs"):
        raise APIError(400, "'logprobs' is not implemented for chat completions here; leave it out.", param="logprobs")
    if not chat:
        if body.get("suffix"):
            raise APIError(400, "'suffix' is not implemented here; leave it out.", param="suffix")
        for name in ("logprobs", "echo"):
            if body.get(name) not in (None, False) and body.get("stream"):
                raise APIError(400, f"'{name}' is not implemented with 'stream' here; ask without streaming.", param=name)
        if body.get("best_of") not in (None, 1):
            raise APIError(400, "'best_of' must be 1 here (one choice per request).", param="best_of")
    for name in ("tools", "functions", "response_format", "logit_bias"):
        if body.get(name):
            raise APIError(400, f"'{name}' is not implemented here; leave it out.", param=name)


def read_logprobs(body: dict) -> int | None:
    """Completions' `logprobs`: None (not asked), or how many alternatives to list per token (0-20)."""
    value = body.get("logprobs")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 20:
        raise APIError(400, f"'logprobs' must be an integer in 0-20 (alternatives listed per token), got {value!r}.",
                       param="logprobs")
    return value


def logprobs_json(scored: list[TokenLogprob], tokenizer: Tokenizer) -> dict:
    """Completions' `logprobs` object: each token's text, log-probability, likeliest alternatives, and
    where its text starts in the returned text. A token holding only part of a UTF-8 character has
    no text of its own: it is written "token_id:N" (as vLLM does), so alternatives never collide."""

    def text(token: int) -> str:
        decoded = tokenizer.decode([token])
        return f"token_id:{token}" if "\ufffd" in decoded else decoded

    texts = [text(entry.token) for entry in scored]
    lengths = [0 if piece.startswith("token_id:") else len(piece) for piece in texts]
    return {"tokens": texts, "token_logprobs": [entry.logprob for entry in scored],
            "top_logprobs": [None if entry.logprob is None else {text(token): value for token, value in entry.top}
                             for entry in scored],
            "text_offset": [sum(lengths[:index]) for index in range(len(texts))]}


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value > high or value < low or (low_open and value == low):
        span = f"{'(' if low_open else '['}{low}, {high}]"
        raise APIError(400, f"'{name}' must be a number in {span}, got {value!r}.", param=name)
    return float(value)


def _integer(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise APIError(400, f"'{name}' must be an integer of at least {low}, got {value!r}.", param=name)
    return value


def read_sampling(body: dict, prompt_tokens: int, window: int, max_tokens_limit: int,
                  stop_ids: tuple[int, ...], prompt_param: str) -> tuple[SamplingConfig, list[str]]:
    """The sampling settings and stop strings a request asks for, checked against the limits."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name, 0 if body.get("echo") is True else 1)  # 0: only the prompt's logprobs
    room = window - prompt_tokens
    if room < 1:
        raise APIError(400, f"The prompt is {prompt_tokens} tokens; this model's window is {window}, so it reads at most "
                            f"{window - 1}: shorten the prompt.", param=prompt_param, code="context_length_exceeded")
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise APIError(400, f"'{name}' is {max_tokens}; this server allows at most {max_tokens_limit} (--max-tokens-limit).",
                       param=name)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"The prompt is {prompt_tokens} tokens and '{name}' asks for {max_tokens}: together "
                            f"{prompt_tokens + max_tokens}, past this model's window of {window}; ask for at most {room}.",
                       param=name, code="context_length_exceeded")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty text or a list of up to 4 non-empty texts.", param="stop")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise APIError(400, f"'seed' must be an integer, got {seed!r}.", param="seed")
    for flag in ("stream", "echo"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise APIError(400, f"'{flag}' must be true or false.", param=flag)
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}.", param="stream_options")
    sampling = SamplingConfig(
        max_new_tokens=max_tokens if max_tokens is not None else min(max_tokens_limit, room),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0) or 0,
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        seed=seed if seed is None else seed % 2**63,
        stop_ids=stop_ids,
    )
    return sampling, stops


# ----------------------------------------------------------------------------- answering


class Reply:
    """The OpenAI shapes of one answer: whole (`whole`) or as stream chunks (`chunk`)."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int, body: dict):
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def whole(self, text: str, finish: str, completion_tokens: int, logprobs: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion", "created": self.created,
                "model": self.model, "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> str:
        """One server-sent event: `data: <json>` and a blank line."""
        data = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            data["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

    def text_choice(self, text: str | None, finish: str | None = None, role: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _error_event(message: str) -> str:
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'param': None, 'code': None}})}\n\n"


async def stream_events(batcher: Batcher, job: Job, queue: asyncio.Queue, reply: Reply) -> AsyncIterator[str]:
    """The job's pieces as server-sent events; the job is cancelled if the client goes away
    (Starlette then cancels this generator, and `finally` runs)."""
    try:
        if reply.chat:
            yield reply.chunk([reply.text_choice("", role=True)])
        while True:
            piece: Piece = await queue.get()
            if piece.error is not None:
                yield _error_event(piece.error)
                break
            if piece.text:
                yield reply.chunk([reply.text_choice(piece.text)])
            if piece.finish is not None:
                yield reply.chunk([reply.text_choice(None if reply.chat else "", piece.finish)])
                if reply.include_usage:
                    yield reply.chunk([], reply.usage(len(job.token_ids)))
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished:
            batcher.cancel(job)


def piece_queue() -> tuple[asyncio.Queue, Callable[[Piece], None]]:
    """A queue in this event loop, and the callback through which the batcher's thread fills it."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    return queue, lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece)


def stream_response(batcher: Batcher, job: Job, queue: asyncio.Queue, reply: Reply) -> StreamingResponse:
    return StreamingResponse(stream_events(batcher, job, queue, reply), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def gathered(request: Request, batcher: Batcher, job: Job, queue: asyncio.Queue) -> tuple[str, str]:
    """The job's whole text and finish reason. Every half second, pieces coming or not, check
    that the client is still there: one that left cancels the job, freeing its row."""
    text, checked = [], time.monotonic()
    try:
        while True:
            try:
                piece: Piece | None = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_SECONDS)
            except asyncio.TimeoutError:
                piece = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_SECONDS:
                checked = time.monotonic()
                if await request.is_disconnected():
                    batcher.cancel(job)
                    raise APIError(499, "The client closed the connection.", code="client_closed")
            if piece is None:
                continue
            if piece.error is not None:
                raise APIError(500, piece.error, kind="server_error")
            text.append(piece.text)
            if piece.finish is not None:
                return "".join(text), piece.finish
    finally:
        if not job.finished:
            batcher.cancel(job)


# ----------------------------------------------------------------------------- running it


class ServerThread:
    """The app served by uvicorn in a background thread, on a free loopback port: for tests,
    benchmarks and notebooks (`minigpt serve` runs uvicorn in the main thread, which receives
    Ctrl-C and SIGTERM). `with ServerThread(app) as server:` ... `server.url` ... stops it; in a
    notebook, `server = ServerThread(app).start()` and later `server.stop()`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind((host, port))
        self.socket.listen(2048)
        self.url = f"http://{host}:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exception: object) -> None:
        self.stop()

    def start(self) -> ServerThread:
        """Start serving; return once the server accepts connections."""
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread ended before it started (its error is printed above)")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving (the app's batcher stops with it) and wait for the thread to end."""
        self.server.should_exit = True
        self.thread.join()
        self.socket.close()
