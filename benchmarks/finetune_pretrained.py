"""LoRA fine-tuning of pretrained shapes: MiniGPT against PEFT + transformers, step time and memory.

    python benchmarks/finetune_pretrained.py [--shapes smollm2-135m qwen2.5-0.5b] [--batch-size 1]
        [--seq-len 128] [--steps 3] [--rounds 1] [--rank 8] [--threads 0]

The models are random, of the real models' shapes (no download): SmolLM2-135M (a Llama: 30
layers of width 576, 49k vocabulary, tied head) and Qwen2.5-0.5B (a Qwen2: 24 layers of width 896,
q/k/v biases, 152k vocabulary, tied head). MiniGPT reads the same transformers config through
minigpt.families.model_config, so both sides build the same network.

Each side trains LoRA adapters of rank --rank on q, k, v, o, gate, up and down (alpha = 2 x rank)
with AdamW over the adapters only, on the same random tokens (batch x seq-len), with the frozen
base in one of two precisions:
    fp32   base and adapters float32, no autocast
    bf16   base weights bfloat16, adapters and AdamW state float32, the forward pass under
           torch.autocast(bfloat16) (the recipe for a frozen base on a CPU with bf16 units)
Every (shape, precision, side) runs in its own fresh process, so peak RSS is that variant's own;
within a round the sides alternate, because timings on a shared machine drift. A process builds
its model directly in the base precision (no float32 copy first), takes one untimed step (which
allocates gradients and AdamW's state) and --steps timed ones. Workers run with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the system (see lora_memory.py).

Printed per variant: tokens/s (batch x seq-len over the median step), peak RSS, and the ratios
MiniGPT / PEFT (tokens/s above 1 = MiniGPT faster; RSS below 1 = MiniGPT smaller), with the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_memory import WORKER_ENVIRONMENT, peak_rss_mb  # noqa: E402  (benchmarks/ is on the path when run as a script)

SHAPES = {
    "smollm2-135m": ("LlamaConfig", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )),
    "qwen2.5-0.5b": ("Qwen2Config", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )),
}
SIDES = ("minigpt", "peft")
PRECISIONS = ("bf16", "fp32")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def hf_config(shape: str):
    import transformers

    class_name, settings = SHAPES[shape]
    return getattr(transformers, class_name)(**settings, bos_token_id=0, eos_token_id=0)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Parameters created inside are created in `dtype` (as transformers' from_config(dtype=) does)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_minigpt(shape: str, rank: int, dtype: torch.dtype):
    """MiniGPT's model of the shape, base in `dtype`, float32 adapters; (model, loss of a batch)."""
    from minigpt.families import model_config
    from minigpt.lora import LoRAConfig, apply_lora, lora_parameters
    from minigpt.model import GPT

    config = model_config(hf_config(shape).to_dict(), shape)
    with default_dtype(dtype):
        model = GPT(config)
    apply_lora(model, LoRAConfig(rank=rank, alpha=2.0 * rank))
    for parameter in lora_parameters(model):
        parameter.data = parameter.data.float()
    model.train()
    return model, lora_parameters(model), lambda tokens: model(tokens[:, :-1], tokens[:, 1:])[1]


def build_peft(shape: str, rank: int, dtype: torch.dtype):
    """transformers' model of the shape, base in `dtype`, with PEFT's LoRA (float32 adapters)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0),
                                autocast_adapter_dtype=True)  # adapters float32 on a bfloat16 base
    model.train()
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    # labels = the next tokens, shifted by transformers itself: the same positions as MiniGPT's targets
    return model, parameters, lambda tokens: model(input_ids=tokens[:, :-1], labels=tokens[:, :-1]).loss


def measure(shape: str, side: str, precision: str, rank: int, batch_size: int, seq_len: int, steps: int) -> dict:
    """One process's measurement (the --worker side)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model, parameters, loss_of = (build_minigpt if side == "minigpt" else build_peft)(shape, rank, dtype)
    assert all(parameter.dtype == torch.float32 for parameter in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    model_rss = peak_rss_mb()
    tokens = torch.randint(0, SHAPES[shape][1]["vocab_size"], (batch_size, seq_len + 1))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    times = []
    for _ in range(steps + 1):  # the first step allocates gradients and AdamW's state: not timed
        start = time.perf_counter()
        with autocast:
            loss = loss_of(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    step = statistics.median(times[1:])
    return {"shape": shape, "side": side, "precision": precision, "tokens_per_s": batch_size * seq_len / step,
            "peak_rss_mb": peak_rss_mb(), "model_rss_mb": model_rss, "loss": loss.item()}


def cpu_model() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process (after one untimed step)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per variant; the median is reported")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0 = torch's default)")
    parser.add_argument("--worker", nargs=3, metavar=("SHAPE", "SIDE", "PRECISION"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.worker:
        shape, side, precision = arguments.worker
        print(json.dumps(measure(shape, side, precision, arguments.rank, arguments.batch_size, arguments.seq_len, arguments.steps)))
        return

    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"LoRA r={arguments.rank} on q,k,v,o,gate,up,down; batch {arguments.batch_size} x {arguments.seq_len} tokens; "
          f"{arguments.steps} timed steps per process, {arguments.rounds} round(s), sides alternating", flush=True)
    results: dict[tuple[str, str, str], list[dict]] = {}
    for round_index in range(arguments.rounds):
        for shape in arguments.shapes:
            for precision in PRECISIONS:
                for side in SIDES if round_index % 2 == 0 else reversed(SIDES):
                    command = [sys.executable, __file__, "--worker", shape, side, precision, "--rank", str(arguments.rank),
                               "--batch-size", str(arguments.batch_size), "--seq-len", str(arguments.seq_len),
                               "--steps", str(arguments.steps), "--threads", str(arguments.threads)]
                    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **WORKER_ENVIRONMENT})
                    if finished.returncode != 0:
                        raise SystemExit(f"{shape} {side} {precision} failed:\n{finished.stderr[-2000:]}")
                    run = json.loads(finished.stdout.splitlines()[-1])
                    results.setdefault((shape, precision, side), []).append(run)
                    print(f"  {shape} {precision} {side}: {run['tokens_per_s']:.1f} tokens/s, peak RSS {run['peak_rss_mb']:.0f} MB",
                          flush=True)
    print(f"\n{'shape':14} {'base':5} {'side':8} {'tokens/s':>9} {'peak RSS MB':>12} {'over model MB':>14}")
    for shape in arguments.shapes:
        for precision in PRECISIONS:
            summary = {}
            for side in SIDES:
                runs = results[(shape, precision, side)]
                speed = statistics.median(run["tokens_per_s"] for run in runs)
                peak = statistics.median(run["peak_rss_mb"] for run in runs)
                added = statistics.median(run["peak_rss_mb"] - run["model_rss_mb"] for run in runs)
                summary[side] = (speed, peak)
                print(f"{shape:14} {precision:5} {side:8} {speed:9.1f} {peak:12.0f} {added:14.0f}")
            (ours, our_peak), (theirs, their_peak) = summary["minigpt"], summary["peft"]
            print(f"{shape:14} {precision:5} {'ratio':8} {ours / theirs:8.2f}x {our_peak / their_peak:11.2f}x   (MiniGPT / PEFT)")


if __name__ == "__main__":
    main()
