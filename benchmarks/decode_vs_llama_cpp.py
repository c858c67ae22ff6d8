"""Decoding speed: MiniGPT's engine against llama.cpp running the same weights exported to GGUF f32.

    python benchmarks/decode_vs_llama_cpp.py [--shapes small medium qwen3] [--new-tokens 128 512]
        [--rows 1 8] [--prompt-tokens 64] [--variants eager compiled bfloat16 compiled-bfloat16]
        [--baseline /work/main]
        [--threads N] [--repeats 3] [--json out.json]

Each shape is a randomly initialised model with a 6,400-token byte-level BPE vocabulary (trained
on the built-in corpus): the `small` and `medium` presets, and `qwen3`, a Qwen3-shaped model
(q/k norms, head_dim 128 with 8 query and 4 key/value heads, tied embeddings) built by
transformers from a config, saved as a Hugging Face folder and loaded by MiniGPT as a user's
pretrained folder would be. The same weights are exported with MiniGPT's own GGUF exporter (f32)
for llama.cpp. Every run decodes `rows` random prompts of --prompt-tokens tokens greedily, with no
stop ids, so every row makes exactly `new tokens`; tokens/s is new tokens over the whole run's
time (prefill included), as a user calling generate sees it.

Contestants, alternated run by run so machine load hits all alike (median of --repeats):
    llama.cpp   llama-cpp-python's `Llama` (skipped if not installed), f32 weights and KV cache,
                --threads threads; greedy by the argmax of each step's logits. Several rows run
                one after another (its `Llama` class decodes one sequence).
    eager       MiniGPT's Engine as generate/chat/serve/eval use it: the rows decoded as one batch.
    compiled    Engine(compile=True): the decoding step through torch.compile, on a CPU with the
                weights frozen into C++ matrix kernels (minigpt.engine.CPU_DECODE_COMPILATION).
                The compilation is done in a warm-up run first and not timed; it is quoted separately.
    bfloat16    the eager engine on a copy of the model in bfloat16 (only where the CPU has
                AVX512-BF16 or AMX); its tokens are compared with llama.cpp's float32 ones.
    compiled-bfloat16  both: the compiled step over the bfloat16 copy (half the bytes to read per
                token, where one row's decoding is bound by memory bandwidth).
    baseline    with --baseline PATH, the eager engine of another MiniGPT checkout (e.g. main
                before this change), run from that checkout's code on the same weights.

MiniGPT's contestants each run in a worker process of their own (the baseline's with its own
code), so no contestant's threads or compiled kernels sit in another's process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VOCAB_SIZE = 6400
SHAPES = ("small", "medium", "qwen3")


# ---------------------------------------------------------------- MiniGPT's side: a worker process


def worker(source: str) -> None:
    """Serve timing requests on stdin/stdout (one JSON object per line), with MiniGPT imported from `source`."""
    sys.path.insert(0, source)
    from minigpt.config import ModelConfig
    from minigpt.engine import Engine, Request, SamplingConfig
    from minigpt.model import GPT

    model = None
    for line in sys.stdin:
        request = json.loads(line)
        if request["do"] == "load":
            torch.set_num_threads(request["threads"])
            saved = torch.load(request["weights"])
            model = GPT(ModelConfig(**saved["config"]))
            model.load_state_dict(saved["state"])
            model = model.to(getattr(torch, request["dtype"])).eval()
            answer = {"ok": True}
        else:
            sampling = SamplingConfig(max_new_tokens=request["new_tokens"], temperature=0)
            options = {"compile": True} if request["compile"] else {}
            start = time.perf_counter()
            tokens: dict[int, list[int]] = {}
            for event in Engine(model, **options).generate([Request(prompt, sampling) for prompt in request["prompts"]]):
                tokens.setdefault(event.row, []).append(event.token)
            answer = {"seconds": time.perf_counter() - start, "tokens": [tokens[row] for row in sorted(tokens)]}
        print(json.dumps(answer), flush=True)


class Worker:
    """A MiniGPT contestant in its own process."""

    def __init__(self, source: Path, weights: Path, threads: int, dtype: str = "float32", compile: bool = False):
        environment = {**os.environ, "PYTHONPATH": str(source)}
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", str(source)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=environment, cwd=source)
        self.compile = compile
        self.ask({"do": "load", "weights": str(weights), "threads": threads, "dtype": dtype})

    def ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"a MiniGPT worker died (exit {self.process.wait()})")
        return json.loads(answer)

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        answer = self.ask({"do": "decode", "prompts": prompts, "new_tokens": new_tokens, "compile": self.compile})
        return answer["seconds"], answer["tokens"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


# ---------------------------------------------------------------- llama.cpp's side


class LlamaCpp:
    """The GGUF file in llama.cpp, f32 KV cache, greedy."""

    def __init__(self, gguf: Path, context: int, threads: int):
        import llama_cpp

        self.model = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=context, n_threads=threads,
                                     n_threads_batch=threads, verbose=False,
                                     type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)

    def last_logits(self) -> np.ndarray:
        """The logits llama.cpp computed for the last token fed (llama_get_logits; `Llama.scores` holds
        them only with logits_all, which would also compute every prompt position's)."""
        return np.ctypeslib.as_array(self.model._ctx.get_logits(), shape=(self.model.n_vocab(),))

    def decode(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
        produced = []
        start = time.perf_counter()
        for prompt in prompts:  # one sequence at a time
            self.model.reset()
            self.model.eval(prompt)
            tokens = []
            for _ in range(new_tokens):
                tokens.append(int(np.argmax(self.last_logits())))
                self.model.eval([tokens[-1]])
            produced.append(tokens)
        return time.perf_counter() - start, produced

    def close(self) -> None:
        self.model.close()


# ---------------------------------------------------------------- the models


def build_tokenizer():
    from minigpt.corpus import builtin_documents
    from minigpt.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(islice(builtin_documents(), 2000), vocab_size=VOCAB_SIZE, show_progress=False)


def build_model(shape: str, tokenizer, block_size: int, work: Path):
    """The shape's random model as MiniGPT holds it."""
    from minigpt.config import preset_config
    from minigpt.model import GPT

    torch.manual_seed(0)
    if shape != "qwen3":
        config = preset_config(shape).model
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size, block_size=max(config.block_size, block_size))
        return GPT(config).eval()
    import transformers

    from minigpt.model_folder import load

    config = transformers.Qwen3Config(
        vocab_size=tokenizer.vocab_size, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=max(block_size, 1024), tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=0, pad_token_id=3,
    )
    folder = work / "qwen3"
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return load(folder).model


def cpu_description() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        name = "unknown CPU"
    return f"{name}, {os.cpu_count()} logical CPUs, load average {' '.join(f'{value:.2f}' for value in os.getloadavg())}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", "--presets", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=["eager", "compiled", "compiled-bfloat16"],
                        choices=["eager", "compiled", "bfloat16", "compiled-bfloat16"])
    parser.add_argument("--baseline", type=Path, help="another MiniGPT checkout whose eager engine runs too (e.g. main)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every contestant")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        worker(arguments.worker)
        return 0
    counts = {"--new-tokens": min(arguments.new_tokens), "--rows": min(arguments.rows), "--prompt-tokens": arguments.prompt_tokens,
              "--threads": arguments.threads, "--repeats": arguments.repeats}
    if too_few := [flag for flag, count in counts.items() if count < 1]:
        parser.error(f"{too_few[0]} takes counts of 1 or more")
    if arguments.baseline and not (arguments.baseline / "minigpt").is_dir():
        parser.error(f"--baseline {arguments.baseline} is not a MiniGPT checkout (it has no minigpt/ folder)")

    from minigpt.gguf_file import GGUF_FILE_NAME, export_gguf
    from minigpt.runtime import cpu_has_fast_bfloat16

    has_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    variants = [name for name in arguments.variants if "bfloat16" not in name or cpu_has_fast_bfloat16()]
    print(f"CPU: {cpu_description()}; {arguments.threads} threads each; torch {torch.__version__}")
    if not has_llama_cpp:
        print("llama_cpp is not importable: llama.cpp is skipped (pip install llama-cpp-python compiles it, about 15 minutes)")
    if variants != arguments.variants:
        print("no AVX512-BF16 or AMX on this CPU: the bfloat16 variants are skipped")
    print(f"greedy, {arguments.prompt_tokens}-token prompts; tokens/s = new tokens / whole run; median of {arguments.repeats}, alternated")
    tokenizer = build_tokenizer()
    longest = arguments.prompt_tokens + max(arguments.new_tokens)
    results = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for shape in arguments.shapes:
            model = build_model(shape, tokenizer, longest, work)
            weights = work / f"{shape}.pt"
            torch.save({"config": dataclasses.asdict(model.config), "state": model.state_dict()}, weights)
            contestants = {}
            if has_llama_cpp:
                export_gguf(model, tokenizer, work / f"{shape}-gguf", "f32")
                contestants["llama.cpp"] = LlamaCpp(work / f"{shape}-gguf" / GGUF_FILE_NAME, longest, arguments.threads)
            for name in variants:
                contestants[name] = Worker(ROOT, weights, arguments.threads, "bfloat16" if "bfloat16" in name else "float32",
                                           compile=name.startswith("compiled"))
            if arguments.baseline:
                contestants["baseline"] = Worker(arguments.baseline.resolve(), weights, arguments.threads)
            print(f"\n{shape}: {model.num_parameters() / 1e6:.1f}M parameters")
            reference = "llama.cpp" if has_llama_cpp else "eager"
            print(f"{'rows':>4} {'new':>5} | " + " | ".join(f"{name:>17}" for name in contestants) + f" | each / {reference}")
            for rows in arguments.rows:
                generator = torch.Generator().manual_seed(rows)
                prompts = [torch.randint(4, VOCAB_SIZE, (arguments.prompt_tokens,), generator=generator).tolist() for _ in range(rows)]
                for new_tokens in arguments.new_tokens:
                    warm_up = {}
                    for name, contestant in contestants.items():  # kernels warmed, compilation done, not timed
                        warm_up[name], _ = contestant.decode(prompts, new_tokens)
                    speeds: dict[str, list[float]] = {name: [] for name in contestants}
                    tokens = {}
                    for _ in range(arguments.repeats):
                        for name, contestant in contestants.items():
                            seconds, tokens[name] = contestant.decode(prompts, new_tokens)
                            speeds[name].append(rows * new_tokens / seconds)
                    median = {name: statistics.median(values) for name, values in speeds.items()}
                    ratios = {name: value / median[reference] for name, value in median.items() if name != reference}
                    agreement = {name: float(np.mean(np.array(tokens[name]) == np.array(tokens[next(iter(tokens))])))
                                 for name in tokens}
                    print(f"{rows:>4} {new_tokens:>5} | " + " | ".join(f"{median[name]:>13,.1f} t/s" for name in contestants)
                          + " | " + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items()))
                    compiled = [f"{name} {seconds:.0f} s" for name, seconds in warm_up.items() if name.startswith("compiled")]
                    if compiled:
                        print(f"{'':>10}   first run, compilation included: " + ", ".join(compiled))
                    differing = [f"{name} {share:.1%}" for name, share in agreement.items() if share < 1]
                    if differing:
                        print(f"{'':>10}   tokens equal to {next(iter(tokens))}'s: " + ", ".join(differing))
                    results.append({"shape": shape, "parameters": model.num_parameters(), "rows": rows, "new_tokens": new_tokens,
                                    "tokens_per_second": median, f"over_{reference}": ratios, "token_agreement": agreement,
                                    "first_run_seconds": warm_up})
            for contestant in contestants.values():
                contestant.close()
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({"cpu": cpu_description(), "threads": arguments.threads, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
