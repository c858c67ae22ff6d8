"""minigpt serve under load: K clients streaming at once, batched decoding vs one request at a time.

    python benchmarks/serve_load.py [--preset small] [--clients 1 4 8] [--seconds 20] [--max-tokens 64]
                                    [--burst 100] [--threads N] [--json out.json]

Two `minigpt serve` processes run the same randomly initialised model on loopback ports: one
decodes up to 8 requests together (--max-batch-size 8), the other one at a time
(--max-batch-size 1; the rest wait in its queue). For each number of clients K, K threads of the
official `openai` client stream completions (--max-tokens each, random prompts, temperature 0.8)
back to back for --seconds, first against one server and then the other, alternating, and the
table shows requests/s, generated tokens/s (all clients together), time to the first token and
the whole request's latency (p50, p95), errors (must be 0), and each server's resident memory
before and after. The ratio is batched tokens/s over one-at-a-time tokens/s.

The last line is the queue bound at work: --burst requests sent at once to the batched server
started with --max-queue 8: 8 decode, 8 wait, and the rest are turned away at once with 429.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine_batched import cpu_model  # noqa: E402
from minigpt.config import RunConfig, preset_config  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.model_folder import save_model_directory  # noqa: E402
from minigpt.tokenizer import train_bpe_tokenizer  # noqa: E402
from minigpt.corpus import builtin_documents  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORDS = "the model reads a prompt and writes tokens one at a time while other requests share its batch".split()


def start_server(folder: Path, max_batch_size: int, max_queue: int, threads: int) -> tuple[subprocess.Popen, str]:
    """`minigpt serve` in a process of its own; returns it and its URL once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "serve.py"), str(folder), "--port", "0",
                                "--max-batch-size", str(max_batch_size), "--max-queue", str(max_queue), "--served-model-name", "bench"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if "Serving" in line:
            url = line.split(" on ")[1].split(" ")[0].rstrip("/")
            threading.Thread(target=lambda: sys.stdout.write("".join(process.stdout)), daemon=True).start()  # its later lines
            return process, url
    raise RuntimeError("the server did not start")


def rss_mib(process: subprocess.Popen) -> float:
    return psutil.Process(process.pid).memory_info().rss / 2**20


def one_request(client: openai.OpenAI, rng: random.Random, max_tokens: int) -> dict:
    """Stream one completion; its time to first token, latency, tokens, or its error."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24)))
    start = time.perf_counter()
    first, tokens = None, 0
    try:
        stream = client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.8,
                                           seed=rng.randrange(2**31), stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text and first is None:
                first = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except openai.APIError as error:
        return {"error": type(error).__name__, "message": str(error)[:300]}
    return {"first": first if first is not None else time.perf_counter() - start, "latency": time.perf_counter() - start,
            "tokens": tokens}


def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` threads sending requests back to back for `seconds`; the figures of all requests that finished."""
    deadline = time.perf_counter() + seconds
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)

    def worker(index: int) -> list[dict]:
        rng, results = random.Random(index), []
        while time.perf_counter() < deadline:
            results.append(one_request(client, rng, max_tokens))
        return results

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [result for part in pool.map(worker, range(clients)) for result in part]
    elapsed = time.perf_counter() - start
    done = [result for result in results if "error" not in result]
    if not done:
        raise RuntimeError(f"every request failed, the first with: {results[0]['message']}")
    percentile = lambda values, q: statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]  # noqa: E731
    return {"clients": clients, "requests": len(done), "errors": len(results) - len(done), "seconds": elapsed,
            "requests_per_second": len(done) / elapsed, "tokens_per_second": sum(r["tokens"] for r in done) / elapsed,
            "first_token_p50": percentile([r["first"] for r in done], 50),
            "latency_p50": percentile([r["latency"] for r in done], 50), "latency_p95": percentile([r["latency"] for r in done], 95)}


def burst(url: str, count: int, max_tokens: int) -> dict:
    """`count` requests at once: how many were served, how many turned away with 429, other errors."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(lambda index: one_request(client, random.Random(index), max_tokens), range(count)))
    refused = sum(result.get("error") == "RateLimitError" for result in results)
    served = sum("error" not in result for result in results)
    return {"requests": count, "served": served, "refused_429": refused, "other_errors": count - served - refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--burst", type=int, default=100, help="requests sent at once to the batched server (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each server (0 = torch's default)")
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        documents = [text for _, text in zip(range(200), builtin_documents())]
        tokenizer = train_bpe_tokenizer(documents, vocab_size=2048, show_progress=False)
        config = RunConfig(model=preset_config(arguments.preset).model)
        config.model.vocab_size = tokenizer.vocab_size
        torch.manual_seed(0)
        folder = save_model_directory(Path(scratch) / "final_model", GPT(config.model).eval(), config, tokenizer)
        print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}; preset {arguments.preset} "
              f"({GPT(config.model).num_parameters() / 1e6:.1f} M parameters), {arguments.max_tokens} new tokens per request, "
              f"{arguments.seconds:g} s per line")
        servers = {"batched": start_server(folder, 8, 8, arguments.threads),
                   "one at a time": start_server(folder, 1, 64, arguments.threads)}
        try:
            memory = {name: rss_mib(process) for name, (process, _) in servers.items()}
            print(f"{'clients':>7} | {'decoding':>13} | {'req/s':>6} | {'tok/s':>7} | {'TTFT p50':>8} | {'p50 s':>6} | {'p95 s':>6} | errors")
            rows = []
            for clients in arguments.clients:
                figures = {}
                for name, (_, url) in servers.items():  # alternated per line, so machine noise hits both alike
                    load(url, clients, min(2.0, arguments.seconds), arguments.max_tokens)  # warm up
                    row = {"decoding": name, **load(url, clients, arguments.seconds, arguments.max_tokens)}
                    figures[name] = row
                    rows.append(row)
                    print(f"{clients:>7} | {name:>13} | {row['requests_per_second']:>6.2f} | {row['tokens_per_second']:>7.1f} | "
                          f"{row['first_token_p50']:>8.3f} | {row['latency_p50']:>6.2f} | {row['latency_p95']:>6.2f} | {row['errors']}")
                ratio = figures["batched"]["tokens_per_second"] / figures["one at a time"]["tokens_per_second"]
                print(f"{'':>7}   batched / one at a time: {ratio:.2f}x tokens/s")
            after = {name: rss_mib(process) for name, (process, _) in servers.items()}
            for name in servers:
                print(f"server RSS ({name}): {memory[name]:.0f} MiB before, {after[name]:.0f} MiB after")
            flood = burst(servers["batched"][1], arguments.burst, arguments.max_tokens) if arguments.burst else None
            if flood:
                print(f"burst of {flood['requests']} at once (batch 8, --max-queue 8): {flood['served']} served, "
                      f"{flood['refused_429']} refused with 429, {flood['other_errors']} other errors")
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait(30)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"cpu": cpu_model(), "rows": rows, "memory_mib_before": memory,
                                                    "memory_mib_after": after, "burst": flood}, indent=2) + "\n")


if __name__ == "__main__":
    main()
