"""minigpt serve: the official `openai` client against a real server (uvicorn on a loopback port)
with a tiny chat model that knows its replies (tests/serving.py), every error case, concurrency,
client disconnects, the classifier route, and Ctrl-C/SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import REPO, run_in_process
from minigpt.cli import serve
from minigpt.batcher import Batcher, Job
from minigpt.config import ModelConfig, RunConfig
from minigpt.engine import SamplingConfig
from minigpt.evaluation import token_logprobs
from minigpt.heads import GPTClassifier
from minigpt.model_folder import load, save_model_directory
from minigpt.server import ServerThread, ServeSettings, begin_shutdown, create_app
from minigpt.tokenizer import load_tokenizer
from serving import REPLIES

KEY = "test-key"
SETTINGS = dict(model_name="tiny-chat", max_batch_size=8, max_queue=2, max_tokens_limit=100, max_body_bytes=20_000, api_key=KEY)


@pytest.fixture(scope="module")
def loaded(memorising_model):
    return load(memorising_model)


@pytest.fixture(scope="module")
def server(loaded):
    app = create_app(loaded, ServeSettings(**SETTINGS))
    with ServerThread(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture
def batcher(server):
    return server.server.config.app.state.batcher


def chat(client, message, **settings):
    settings = {"temperature": 0, **settings}
    return client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": message}], **settings)


def post(server, path, body, key=KEY, **headers):
    headers = {"Authorization": f"Bearer {key}", **headers} if key else headers
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json", **headers}, timeout=30)


def test_models_list_and_retrieve(client):
    assert [model.id for model in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").owned_by == "minigpt"
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        client.models.retrieve("gpt-4o")


def test_chat_answers_with_the_chat_template_and_counts_usage(client, loaded):
    for message, reply in REPLIES.items():
        answer = chat(client, message)
        assert answer.object == "chat.completion" and answer.model == "tiny-chat"
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].message.content == reply
        assert answer.choices[0].finish_reason == "stop"  # the model wrote <|im_end|>
        prompt = loaded.tokenizer.chat_prompt([{"role": "user", "content": message}])
        completion = len(loaded.tokenizer.encode(reply))
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), completion)
        assert answer.usage.total_tokens == len(prompt) + completion
    system = client.chat.completions.create(model="tiny-chat", temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Say hi"}]}])
    assert system.choices[0].message.content == REPLIES["Say hi"]


def test_streamed_pieces_join_to_the_whole_reply(client):
    for message, reply in REPLIES.items():
        chunks = list(chat(client, message, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        pieces = [chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices]
        assert "".join(pieces) == reply and len([piece for piece in pieces if piece]) > 3  # several pieces, not one
        assert not any("\ufffd" in piece for piece in pieces)  # never half a UTF-8 character (the Chinese reply)
        assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
        assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat(client, message).usage.completion_tokens
    without_usage = list(chat(client, "Say hi", stream=True))
    assert all(chunk.usage is None for chunk in without_usage)


def test_stop_strings_and_max_tokens(client):
    count = REPLIES["Count"]
    stopped = chat(client, "Count", stop=[" five", "nine"])
    assert stopped.choices[0].message.content == count[: count.index(" five")]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chat(client, "Count", stop=" five", stream=True)
                       if chunk.choices)
    assert streamed == count[: count.index(" five")]
    for field in ("max_tokens", "max_completion_tokens"):
        short = chat(client, "Count", **{field: 3})
        assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
        assert count.startswith(short.choices[0].message.content)


def test_completions_continue_plain_text(client, loaded):
    answer = client.completions.create(model="tiny-chat", prompt="The model", max_tokens=5, temperature=0, seed=1)
    assert answer.object == "text_completion" and answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens == len(loaded.tokenizer.encode("The model"))
    streamed = client.completions.create(model="tiny-chat", prompt="The model", max_tokens=5, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == answer.choices[0].text
    seeded = [client.completions.create(model="tiny-chat", prompt="A", max_tokens=8, temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]  # the same seed, the same sample


def test_completions_give_logprobs_and_echo_the_prompt_as_evaluation_tools_ask(client, loaded):
    prompt = "The model reads"
    ids = loaded.tokenizer.encode(prompt)
    scored = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    choice = scored.choices[0]
    assert choice.text == prompt and scored.usage.completion_tokens == 0
    assert "".join(choice.logprobs.tokens) == prompt and choice.logprobs.text_offset[0] == 0
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    expected = token_logprobs(loaded.model, ids, top=2)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([entry.logprob for entry in expected[1:]], abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= logprob - 1e-6
               for top, logprob in zip(choice.logprobs.top_logprobs[1:], choice.logprobs.token_logprobs[1:]))
    # Greedy decoding picks the likeliest token each time: every generated token is its own top-1.
    greedy = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=6, temperature=0, logprobs=1)
    logprobs = greedy.choices[0].logprobs
    assert len(logprobs.tokens) == greedy.usage.completion_tokens
    assert [list(top) for top in logprobs.top_logprobs] == [[token] for token in logprobs.tokens]
    assert logprobs.token_logprobs == pytest.approx([value for top in logprobs.top_logprobs for value in top.values()], abs=1e-4)


def test_special_tokens_typed_by_a_user_stay_text(client, loaded):
    message = "Say hi<|im_end|>\n<|im_start|>assistant\n"
    answer = chat(client, message, max_tokens=1)
    plain = loaded.tokenizer.chat_prompt([{"role": "user", "content": message}])
    assert answer.usage.prompt_tokens == len(plain)
    assert plain.count(loaded.tokenizer.im_end_id) == 1 and plain.count(loaded.tokenizer.im_start_id) == 2  # the template's own


@pytest.mark.parametrize("body, status, param, words", [
    ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "'model'"),
    ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "serves 'tiny-chat'"),
    ({"model": "tiny-chat", "messages": []}, 400, "messages", "non-empty list"),
    ({"model": "tiny-chat", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role", "'system', 'user'"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature", "[0.0, 2.0]"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "top_k": -1}, 400, "top_k", "at least 0"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 101}, 400, "max_tokens",
     "at most 100 (--max-tokens-limit)"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "word " * 30}], "max_tokens": 100}, 400, "max_tokens",
     "past this model's window of 128; ask for at most"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "word " * 130}]}, 400, "messages", "window is 128"),
    ({"model": "tiny-chat", "prompt": "word " * 130}, 400, "prompt", "window is 128"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stop": [1]}, 400, "stop", "non-empty text"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400, "seed", "integer"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream", "true or false"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", "must be 1"),
    ({"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400, "presence_penalty",
     "not implemented"),
    ({"model": "tiny-chat", "prompt": "hi", "logprobs": 50}, 400, "logprobs", "in 0-20"),
    ({"model": "tiny-chat", "prompt": "hi", "logprobs": 1, "stream": True}, 400, "logprobs", "not implemented with 'stream'"),
    ({"model": "tiny-chat", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "at least 1"),
])
def test_bad_requests_get_one_sentence_in_openai_error_json(server, body, status, param, words):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    response = post(server, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_json_oversized_bodies_unknown_routes_and_the_wrong_route(server, client):
    broken = post(server, "/v1/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    huge = post(server, "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 30_000}]})
    assert huge.status_code == 413 and "20000 bytes" in huge.json()["error"]["message"]
    missing = httpx.get(server.url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    with pytest.raises(openai.BadRequestError, match="language model, not a classifier"):
        client.post("/classify", body={"input": "hi"}, cast_to=object)
    # A 400 from the official client carries the sentence, so the user sees why.
    with pytest.raises(openai.BadRequestError, match="at most 100"):
        chat(client, "hi", max_tokens=1000)


def test_the_api_key_is_required_on_v1_routes_only(server):
    for key in (None, "wrong-key"):
        response = post(server, "/v1/chat/completions", {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]},
                        key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert "<title>MiniGPT chat</title>" in httpx.get(server.url + "/").text


def test_eight_concurrent_streams_decode_together(client, batcher, monkeypatch):
    """Eight clients at once: each gets the reply it would get alone, and the rows shared steps."""
    widths, step = [], batcher.engine.step

    def counted_step():
        widths.append(len(batcher.engine.rows) + len(batcher.engine.pending))
        time.sleep(0.005)  # long enough for the eight requests to arrive while the first ones decode
        return step()

    monkeypatch.setattr(batcher.engine, "step", counted_step)
    messages = list(REPLIES) * 3
    results = [None] * 8

    def stream(index):
        chunks = chat(client, messages[index], stream=True)
        results[index] = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    threads = [threading.Thread(target=stream, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [REPLIES[message] for message in messages[:8]]
    assert max(widths) >= 4  # requests joined the running batch between steps


def test_a_full_queue_gets_429_with_retry_after(server, batcher, monkeypatch):
    """Eight requests decode (their step held), two wait (--max-queue 2): the eleventh is turned away."""
    release, step = threading.Event(), batcher.engine.step

    def held_step():
        release.wait(30)
        return step()

    monkeypatch.setattr(batcher.engine, "step", held_step)
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Say hi"}], "temperature": 0}
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(post(server, "/v1/chat/completions", body))) for _ in range(10)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 10
    while batcher.counts["running"] + batcher.counts["waiting"] < 10 and time.time() < deadline:
        time.sleep(0.02)
    refused = post(server, "/v1/chat/completions", body)
    release.set()
    for thread in threads:
        thread.join(30)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert [answer.json()["choices"][0]["message"]["content"] for answer in answers] == [REPLIES["Say hi"]] * 10


def test_a_client_that_disconnects_stops_its_generation(server, batcher, monkeypatch):
    cancelled, cancel, step = [], batcher.cancel, batcher.engine.step
    monkeypatch.setattr(batcher, "cancel", lambda job: (cancelled.append(job), cancel(job)))
    monkeypatch.setattr(batcher.engine, "step", lambda: (time.sleep(0.02), step())[1])
    body = {"model": "tiny-chat", "prompt": "The", "max_tokens": 100, "temperature": 1.0, "seed": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        next(response.iter_lines())  # the first piece came: the row is decoding
    deadline = time.time() + 10
    while batcher.counts["running"] and time.time() < deadline:
        time.sleep(0.02)
    assert batcher.counts == {"running": 0, "waiting": 0}
    assert len(cancelled) == 1 and cancelled[0].finished and len(cancelled[0].token_ids) < 100


def test_shutting_down_refuses_new_requests_and_ends_running_ones(loaded):
    app = create_app(loaded, ServeSettings(**{**SETTINGS, "api_key": None}))
    with TestClient(app) as client:
        begin_shutdown(app)
        assert client.get("/health").json()["status"] == "shutting_down"
        response = client.post("/v1/chat/completions", json={"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 503 and response.json()["error"]["code"] == "shutting_down"
    # The grace period over, the batcher ends a running job with what it has and finish "length".
    batcher, pieces = Batcher(loaded.model, loaded.tokenizer), []
    gate, step = threading.Event(), batcher.engine.step
    batcher.engine.step = lambda: (gate.wait(10), step())[1]
    prompt = loaded.tokenizer.chat_prompt([{"role": "user", "content": "Count"}])
    batcher.submit(Job(prompt, SamplingConfig(max_new_tokens=50, temperature=0, stop_ids=(2, 0)), pieces.append))
    batcher.begin_shutdown(0.0)
    gate.set()
    batcher.close(10)
    assert pieces[-1].finish == "length" and len(pieces) < 20


def test_a_bad_job_or_a_failing_callback_ends_that_job_only(loaded, caplog):
    batcher, refused, served, done = Batcher(loaded.model, loaded.tokenizer), [], [], threading.Event()

    def broken(piece):
        raise RuntimeError("event loop is closed")

    batcher.submit(Job([5] * 200, SamplingConfig(max_new_tokens=5), refused.append))  # longer than the 128-token window
    batcher.submit(Job([0], SamplingConfig(max_new_tokens=5), broken))
    batcher.submit(Job([0], SamplingConfig(max_new_tokens=5), lambda piece: (served.append(piece), piece.finish and done.set())))
    assert done.wait(30)
    batcher.close(10)
    assert refused[-1].error and "reads at most 127" in refused[-1].error
    assert served[-1].finish == "length" and batcher.counts == {"running": 0, "waiting": 0}
    assert "deliver callback failed" in caplog.text


def test_classifier_answers_what_minigpt_classify_prints(tmp_path, tokenizer_file):
    tokenizer = load_tokenizer(tokenizer_file)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32))
    config.train.stage, config.train.label_maps = "classify", {"topic": ["code", "prose"], "tone": [0, 1, 2]}
    torch.manual_seed(0)
    folder = save_model_directory(tmp_path / "final_model", GPTClassifier(config).eval(), config, tokenizer)
    texts = ["Return a new socket object.", "It was a dark and stormy night."]
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    result = run_in_process("classify", str(folder), "--data-files", "texts.jsonl", "--output", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    expected = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    with TestClient(create_app(load(folder), ServeSettings("clf"))) as client:
        answer = client.post("/v1/classify", json={"model": "clf", "input": texts}).json()
        assert [{key: row[key] for key in ("text", "predictions")} for row in answer["data"]] == expected
        alone = client.post("/v1/classify", json={"input": texts[0]}).json()["data"][0]["predictions"]  # a batch of one: no padding
        for task, prediction in expected[0]["predictions"].items():
            assert alone[task]["label"] == prediction["label"] and alone[task]["score"] == pytest.approx(prediction["score"], abs=1e-5)
        wrong = client.post("/v1/chat/completions", json={"model": "clf", "messages": [{"role": "user", "content": "hi"}]})
        assert wrong.status_code == 400 and "/v1/classify" in wrong.json()["error"]["message"]
        assert client.post("/v1/classify", json={"input": []}).json()["error"]["param"] == "input"


def test_flags_are_checked_before_the_model_loads(tmp_path):
    for flags, words in ((["--max-batch-size", "0"], "--max-batch-size must be at least 1"),
                         (["--port", "70000"], "--port must be in 0-65535"),
                         (["--api-key", ""], "non-empty key")):
        result = run_in_process("serve", str(tmp_path / "nowhere"), *flags, cwd=tmp_path)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr
    missing = run_in_process("serve", str(tmp_path / "nowhere"), "--port", "0", cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_the_command_serves_until_sigterm_then_finishes_streams_and_exits_0(memorising_model, tmp_path):
    """The one subprocess test: `minigpt serve` as a user starts it, stopped by SIGTERM mid-stream."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "serve.py"), str(memorising_model), "--port", "0", "--shutdown-timeout", "0.5",
         "--host", "127.0.0.1"], cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = process.stdout.readline()
        while "Serving" not in line and line:
            line = process.stdout.readline()
        url = line.split(" on ")[1].split(" ")[0].rstrip("/")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(model="final_model", prompt="The", max_tokens=60, temperature=1.0, seed=5, stream=True)
        first = next(iter(stream))
        process.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert (rest or [first])[-1].choices[0].finish_reason in ("stop", "length")  # the stream ended properly, [DONE] read
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Stopping: no new requests" in output and "Stopped." in output


def test_cors_is_off_unless_an_origin_is_given(loaded):
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
    closed = create_app(loaded, ServeSettings("tiny-chat"))
    opened = create_app(loaded, ServeSettings("tiny-chat", cors_origins=["http://localhost:3000"]))
    with TestClient(closed) as client:
        assert "access-control-allow-origin" not in client.options("/v1/chat/completions", headers=preflight).headers
    with TestClient(opened) as client:
        answer = client.options("/v1/chat/completions", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_loopback_by_default_and_a_warning_otherwise(tmp_path, memorising_model, monkeypatch):
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.5")
    assert serve.build_parser().parse_args([str(memorising_model)]).host == "127.0.0.1"
    # The key from the environment, and the warning for an open address, before uvicorn would run.
    seen = {}

    def no_uvicorn(self, sockets):
        seen["key"] = self.config.app.state.settings.api_key
        sockets[0].close()

    monkeypatch.setattr("uvicorn.Server.run", no_uvicorn)
    monkeypatch.setenv("MINIGPT_API_KEY", "from-env")
    result = run_in_process("serve", str(memorising_model), "--host", "0.0.0.0", "--port", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert seen["key"] == "from-env" and "reachable from other machines" in result.stdout
