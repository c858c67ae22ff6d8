"""The server under fault injection: malformed and huge requests, clients that hang up, and a
burst of 100 requests against a batch of 4 and a queue of 8. Every request gets an answer (a
reply, or OpenAI's error JSON with a 4xx, 429 or 503), the engine keeps serving the others, and
nothing is logged as an error (no traceback)."""

import json
import logging
import socket
import threading
import time

import httpx
import psutil
import pytest

from minigpt.batcher import Job
from minigpt.model_folder import load
from minigpt.server import ServerThread, ServeSettings, create_app
from serving import REPLIES

SETTINGS = ServeSettings(model_name="tiny-chat", max_batch_size=4, max_queue=8, max_tokens_limit=120, max_body_bytes=50_000)
HI = [{"role": "user", "content": "Say hi"}]


class Recorded(logging.Handler):
    """Every warning or error the server logs (uvicorn's "Exception in ASGI application" with its
    traceback, the batcher's "decoding failed")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def server(memorising_model):
    app = create_app(load(memorising_model), SETTINGS)
    with ServerThread(app) as running:  # uvicorn configures its loggers here: record them after
        recorded = Recorded()
        loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "minigpt")]
        for logger in loggers:
            logger.addHandler(recorded)
        running.recorded = recorded
        yield running
        for logger in loggers:
            logger.removeHandler(recorded)


@pytest.fixture
def quiet_log(server):
    """Fails the test if the server logged a warning or an error (a traceback) while it ran."""
    server.recorded.records.clear()
    yield
    assert [record.getMessage() for record in server.recorded.records] == []


def post(server, path, content, **options):
    content = content if isinstance(content, bytes) else json.dumps(content).encode()
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=30, **options)


def assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].endswith(".") and "\n" not in error["message"] and "Traceback" not in error["message"]
    return error


def chat_body(**fields):
    return {"model": "tiny-chat", "messages": HI, **fields}


C, P = "/v1/chat/completions", "/v1/completions"
MALFORMED = [
    (C, b"", "not valid JSON"),
    (C, b"\xff\xfe{", "not valid JSON"),
    (C, b"[" * 20_000 + b"]" * 20_000, "nested"),  # deeper than Python's recursion limit, within the body limit
    (C, b'{"model": "tiny-chat", "messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", "nested"),
    (C, b"null", "JSON object"),
    (C, b'"text"', "JSON object"),
    (C, {"model": "tiny-chat"}, "'messages'"),
    (C, {"messages": HI}, "'model'"),
    (C, {"model": ["tiny-chat"], "messages": HI}, "'model'"),
    (C, {"model": "tiny-chat", "messages": "hi"}, "'messages'"),
    (C, {"model": "tiny-chat", "messages": [None]}, "messages[0]"),
    (C, {"model": "tiny-chat", "messages": [{"role": "user"}]}, "messages[0].content"),
    (C, {"model": "tiny-chat", "messages": [{"role": {"a": 1}, "content": "hi"}]}, "messages[0].role"),
    (C, {"model": "tiny-chat", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text parts"),
    # A lone surrogate is valid JSON (an escape) but no character: nothing can encode it.
    (C, b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}', "surrogate"),
    (P, b'{"model": "tiny-chat", "prompt": "abc\\udfff"}', "surrogate"),
    (C, chat_body(max_tokens=10**30), "at most 120"),
    (C, chat_body(max_tokens=1e999), "integer"),  # 1e999 is read as infinity
    (C, chat_body(max_tokens="5"), "integer"),
    (C, chat_body(max_tokens=-1), "at least 1"),
    (C, chat_body(temperature=[1]), "'temperature'"),
    (C, chat_body(top_k=0.5), "'top_k'"),
    (C, chat_body(seed="x"), "'seed'"),
    (C, chat_body(stop={"a": 1}), "'stop'"),
    (C, chat_body(stream_options=[]), "'stream_options'"),
    (C, chat_body(n=[1]), "'n'"),
    (C, chat_body(stream=1), "'stream'"),
    (C, {"model": "tiny-chat", "messages": [{"role": "user", "content": "word " * 5000}]}, "shorten the prompt"),
    (P, {"model": "tiny-chat", "prompt": "word " * 5000}, "shorten the prompt"),
    (P, {"model": "tiny-chat", "prompt": [7] * 5000}, "shorten the prompt"),
    (P, {"model": "tiny-chat", "prompt": [10**20]}, "token ids below"),
    (P, {"model": "tiny-chat", "prompt": [True]}, "token ids below"),
    (P, {"model": "tiny-chat", "prompt": {"text": "hi"}}, "'prompt'"),
    (P, {"model": "tiny-chat", "prompt": "hi", "logprobs": 2.5}, "'logprobs'"),
    (P, b'{"model": "tiny-chat", "prompt": ' + b"1" * 5000 + b"}", "not valid JSON"),  # past Python's digit limit
]


@pytest.mark.parametrize("path, body, words", MALFORMED, ids=[f"{path[4:]}-{index}" for index, (path, _, _) in enumerate(MALFORMED)])
def test_malformed_requests_get_a_400_in_openai_error_json(server, quiet_log, path, body, words):
    error = assert_openai_error(post(server, path, body), 400)
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_huge_bodies_get_413_however_they_are_sent(server, quiet_log):
    huge = json.dumps(chat_body(messages=[{"role": "user", "content": "x" * 200_000}])).encode()
    assert_openai_error(post(server, C, huge), 413)

    def chunks():  # no Content-Length: the server counts what arrives
        for start in range(0, len(huge), 10_000):
            yield huge[start:start + 10_000]

    streamed = httpx.post(server.url + C, content=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    assert_openai_error(streamed, 413)
    assert post(server, C, chat_body(temperature=0)).json()["choices"][0]["message"]["content"] == REPLIES["Say hi"]


def wait_until_idle(batcher, seconds: float = 10) -> None:
    deadline = time.time() + seconds
    while (batcher.counts["running"] or batcher.counts["waiting"] or batcher.engine.has_work) and time.time() < deadline:
        time.sleep(0.02)
    assert batcher.counts == {"running": 0, "waiting": 0} and not batcher.engine.has_work


def hang_up_once_decoding(server, batcher, monkeypatch, body: dict) -> tuple[Job, float]:
    """Send `body` over a raw socket, wait until its job has made a few tokens, close the socket:
    the job, and when the client left."""
    submitted, submit = [], batcher.submit
    monkeypatch.setattr(batcher, "submit", lambda job: (submitted.append(job), submit(job))[1])
    content = json.dumps(body).encode()
    connection = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    connection.sendall(b"POST %s HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                       % (P.encode(), len(content), content))
    deadline = time.time() + 30
    while not (submitted and len(submitted[0].token_ids) >= 3) and time.time() < deadline:
        time.sleep(0.01)
    connection.close()
    monkeypatch.setattr(batcher, "submit", submit)
    return submitted[0], time.time()


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_mid_generation_frees_its_row_while_others_are_served(server, quiet_log, monkeypatch, stream):
    """A client waiting for a whole answer, or reading a stream, leaves while its tokens keep
    coming (a piece each step, faster than the server's half-second check): its job is cancelled
    within a second, and a client that stays gets its whole reply."""
    batcher = server.server.config.app.state.batcher
    cancel, cancelled = batcher.cancel, {}
    monkeypatch.setattr(batcher, "cancel", lambda job: (cancelled.setdefault(id(job), time.time()), cancel(job)))
    # 20 ms a step: the 120 tokens take 2.4 s, longer than the check's half second on any machine
    # (the tiny model alone would finish them before a fast machine's first check).
    step = batcher.engine.step
    monkeypatch.setattr(batcher.engine, "step", lambda: (time.sleep(0.02), step())[1])
    long = {"model": "tiny-chat", "prompt": "The", "max_tokens": 120, "temperature": 1.0, "seed": 1, "stream": stream}
    job, left = hang_up_once_decoding(server, batcher, monkeypatch, long)
    stayed = post(server, C, chat_body(temperature=0))
    assert stayed.json()["choices"][0]["message"]["content"] == REPLIES["Say hi"]
    wait_until_idle(batcher)
    assert id(job) in cancelled and cancelled[id(job)] - left < 1.0 and len(job.token_ids) < 120


def run_burst(server, count: int) -> list[tuple[str, httpx.Response] | str]:
    """`count` clients at once (one connection each, a third of them streaming); each result is
    the message and its response, or what went wrong."""
    results: list = [None] * count
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)

    def client(index: int) -> None:
        message = list(REPLIES)[index % len(REPLIES)]
        body = chat_body(temperature=0, messages=[{"role": "user", "content": message}], stream=index % 3 == 0)
        try:
            with session.stream("POST", server.url + C, json=body) as response:
                response.read()
                results[index] = (message, response)
        except httpx.HTTPError as error:
            results[index] = f"{type(error).__name__}: {error}"

    # One client object shared by the threads: a client each would measure httpx's own memory.
    with httpx.Client(limits=limits, timeout=120) as session:
        threads = [threading.Thread(target=client, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
    assert not any(thread.is_alive() for thread in threads), "a request hung"
    return results


def check_burst(results) -> dict[int, int]:
    statuses: dict[int, int] = {}
    for result in results:
        assert isinstance(result, tuple), result  # no connection error, no timeout
        message, response = result
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code != 200:
            error = assert_openai_error(response, response.status_code)
            assert response.status_code in (429, 503) and error["code"] in ("queue_full", "shutting_down")
            continue
        if response.headers["content-type"].startswith("text/event-stream"):
            events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            text = "".join(json.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1])
        else:
            text = response.json()["choices"][0]["message"]["content"]
        assert text == REPLIES[message]
    return statuses


@pytest.mark.slow
def test_a_burst_of_100_requests_against_a_queue_of_8(server, quiet_log):
    """Nothing hangs, everyone gets a reply or a 429, the rows all come free, and the process's
    memory returns to its level: a second and third burst leave it where the first did."""
    batcher = server.server.config.app.state.batcher
    process = psutil.Process()
    statuses = check_burst(run_burst(server, 100))
    assert statuses.get(200, 0) >= SETTINGS.max_batch_size and statuses.get(429, 0) > 0, statuses
    wait_until_idle(batcher)
    settled = process.memory_info().rss
    for _ in range(2):
        check_burst(run_burst(server, 100))
        wait_until_idle(batcher)
    grown = process.memory_info().rss - settled
    assert grown < 30 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB over 200 more requests"
