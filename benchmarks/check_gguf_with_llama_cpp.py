"""MiniGPT's GGUF files in llama.cpp itself: logits per outtype, and each family's greedy tokens.

    python benchmarks/check_gguf_with_llama_cpp.py [--steps 40] [--threads 1] [--new-tokens 24]

Needs llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp: about ten
minutes on 2 cores), so it is a check to run by hand, not a test. It trains the `tiny` preset's
shape for a few dozen AdamW steps (float32, rope_theta 500: a freshly initialised model or the
default theta would hide permutation and rotary mistakes), exports it as GGUF in f32, f16 and
q8_0, runs the same tokens through llama.cpp and prints, per outtype, the largest difference
between llama.cpp's logits and MiniGPT's and how often their top token agrees; with the f32
file it also compares tokenization on awkward texts. llama.cpp keeps its KV cache in float32
here (its default is float16), so that the f32 file shows the export's own error.

Then, for each pretrained family (llama with Llama 3 rope scaling and an untied head, qwen2 with
biases, qwen3 with q/k norms and head_dim != width / heads, gemma3 with sandwich norms, (1 + w)
norms and a 4-token sliding window), a tiny random transformers model is saved as a Hugging Face
folder, loaded by MiniGPT, exported as f32 and q8_0 GGUF, and llama.cpp's greedy continuation of
a prompt (longer than Gemma's window) is compared token for token with MiniGPT's. Norm gains and
biases are randomised (at 1 and 0 a missing (1 + w) or bias would not show).

Each file runs in its own process, so a crash inside llama.cpp is reported instead of ending the
check. On CPUs with AMX-INT8 (Xeon Sapphire Rapids and newer) llama.cpp repacks quantized
weights for its AMX kernels, and llama-cpp-python 0.3.36 was seen to segfault there in the first
decode of *every* quantized file: q8_0 and q4_0, widths 64 to 2048, and equally a q8_0 file made
by llama.cpp's own quantizer from our f32 file, whose tensors are byte-identical to our q8_0
export. A crashed file is therefore run again with llama.cpp's extra buffer types off
(`use_extra_bufts = false`, the command line's `--no-repack` / `-nr`): the same file through the
plain CPU kernels.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRICKY_TEXTS = ["Hello, world!", "   leading spaces", "emoji 😀👍🏽 中文 日本語", "e\u0301 n\u0303", "a\r\nb\n\n\tc",
                "<|im_start|>user\nhi<|im_end|>\n"]


def llama_cpp_run(gguf_path: str, ids: list[int], threads: int, repack: bool, new_tokens: int) -> dict:
    """The --worker side: llama.cpp's logits for `ids`, its tokenization of TRICKY_TEXTS, and its
    greedy continuation of `ids` by `new_tokens` tokens."""
    import llama_cpp
    import llama_cpp.llama

    if not repack:
        # llama-cpp-python 0.3 has no argument for use_extra_bufts; its Llama class starts from
        # llama_model_default_params(), so the flag is cleared on what that function returns.
        default_params = llama_cpp.llama.llama_cpp.llama_model_default_params

        def without_extra_buffers():
            params = default_params()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama.llama_cpp.llama_model_default_params = without_extra_buffers
    model = llama_cpp.Llama(model_path=gguf_path, n_ctx=len(ids) + new_tokens, logits_all=True, n_threads=threads, verbose=False,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    model.eval(ids)
    logits = np.asarray(model.scores[: len(ids)]).tolist()
    greedy = []
    for _ in range(new_tokens):  # argmax of the last position, fed back: greedy decoding with no sampler in between
        greedy.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([greedy[-1]])
    return {"logits": logits, "greedy": greedy,
            "tokens": [model.tokenize(text.encode(), add_bos=False, special=True) for text in TRICKY_TEXTS]}


def run_in_llama_cpp(gguf_path: Path, ids: list[int], threads: int, repack: bool, work: Path, new_tokens: int = 0) -> dict | str:
    """llama_cpp_run in a fresh process: its result, or a sentence saying how the process died."""
    request, answer = work / "request.json", work / "answer.json"
    request.write_text(json.dumps({"gguf": str(gguf_path), "ids": ids, "threads": threads, "repack": repack, "new_tokens": new_tokens}))
    answer.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, __file__, "--worker", str(request), str(answer)], capture_output=True, text=True)
    if result.returncode < 0:
        return f"llama.cpp crashed ({signal.Signals(-result.returncode).name})"
    if result.returncode != 0:
        return f"llama.cpp failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}"
    return json.loads(answer.read_text())


def run_with_fallback(gguf_path: Path, ids: list[int], threads: int, work: Path, label: str, new_tokens: int = 0) -> tuple[dict | None, str]:
    """llama.cpp's answer for the file, run again with --no-repack if llama.cpp crashed (see above)."""
    result = run_in_llama_cpp(gguf_path, ids, threads, True, work, new_tokens)
    how = "default buffers"
    if isinstance(result, str):
        print(f"{label} {result}; again with extra buffer types off (--no-repack)")
        result, how = run_in_llama_cpp(gguf_path, ids, threads, False, work, new_tokens), "--no-repack"
    if isinstance(result, str):
        print(f"{label} {result}")
        return None, how
    return result, how


# Tiny shapes of each family, as transformers configs (llama.cpp's gemma3 layout: every 6th layer
# global, here none of 2; query_pre_attn_scalar = head_dim, as llama.cpp assumes).
FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                                        layer_types=["sliding_attention", "sliding_attention"])),
}


def family_folder(family: str, tokenizer, folder: Path) -> Path:
    """A Hugging Face folder holding a tiny random model of `family` and MiniGPT's tokenizer."""
    import torch
    import transformers

    class_name, settings = FAMILY_CONFIGS[family]
    torch.manual_seed(0)
    config = getattr(transformers, class_name)(**{
        "vocab_size": tokenizer.vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 0,
        "pad_token_id": 3, **settings,
    })
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.2)
    model.save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def minigpt_greedy(model, ids: list[int], new_tokens: int) -> list[int]:
    """MiniGPT's greedy continuation: the argmax of the last position, appended, `new_tokens` times."""
    import torch

    sequence = list(ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            sequence.append(int(model(torch.tensor([sequence]))[0][0, -1].argmax()))
    return sequence[len(ids):]


def check_families(tokenizer, text: str, threads: int, new_tokens: int, work: Path) -> None:
    import torch

    from minigpt.gguf_file import GGUF_FILE_NAME, export_gguf
    from minigpt.model_folder import load

    ids = tokenizer.encode(text)[:24]
    print(f"\nfamilies: greedy continuation of {len(ids)} prompt tokens by {new_tokens}, llama.cpp vs MiniGPT")
    for family in FAMILY_CONFIGS:
        loaded = load(family_folder(family, tokenizer, work / family))
        ours = minigpt_greedy(loaded.model, ids, new_tokens)
        with torch.no_grad():
            our_logits = loaded.model(torch.tensor([ids]))[0][0].numpy()
        for outtype in ("f32", "q8_0"):
            output = work / f"{family}-{outtype}"
            export_gguf(loaded.model, loaded.tokenizer, output, outtype)
            result, how = run_with_fallback(output / GGUF_FILE_NAME, ids, threads, work, f"{family:6} {outtype:5}", new_tokens)
            if result is None:
                continue
            same = sum(a == b for a, b in zip(result["greedy"], ours))
            first = next((i for i, (a, b) in enumerate(zip(result["greedy"], ours)) if a != b), None)
            verdict = "equal" if first is None else f"differ from token {first}"
            difference = np.abs(np.asarray(result["logits"]) - our_logits).max()
            print(f"{family:6} {outtype:5} greedy tokens {verdict} ({same}/{new_tokens} agree), "
                  f"prompt logits max |llama.cpp - MiniGPT| {difference:.2e}  ({how})")


def trained_tiny_model(steps: int):
    """The tiny preset's shape with rope_theta 500 and a 512-token BPE tokenizer, trained `steps` steps."""
    import torch

    from minigpt.config import ModelConfig
    from minigpt.corpus import builtin_documents
    from minigpt.model import GPT
    from minigpt.tokenizer import train_bpe_tokenizer

    documents = list(islice(builtin_documents(), 300))
    tokenizer = train_bpe_tokenizer(documents, vocab_size=512, show_progress=False)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, rope_theta=500.0))
    data = torch.tensor(tokenizer.encode(" ".join(documents[:40])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,))
        batch = torch.stack([data[start : start + 65] for start in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"tiny model trained {steps} steps, last loss {loss.item():.2f}")
    return model.eval(), tokenizer, " ".join(documents[40:42])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="AdamW steps of the tiny model before export")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp's threads")
    parser.add_argument("--new-tokens", type=int, default=24, help="greedy tokens compared per family")
    parser.add_argument("--worker", nargs=2, metavar=("REQUEST", "ANSWER"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        request = json.loads(Path(arguments.worker[0]).read_text())
        answer = llama_cpp_run(request["gguf"], request["ids"], request["threads"], request["repack"], request["new_tokens"])
        Path(arguments.worker[1]).write_text(json.dumps(answer))
        return 0
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable here, so llama.cpp cannot be asked: install llama-cpp-python "
              "(pip install llama-cpp-python, which compiles llama.cpp, about ten minutes) to run this check.", file=sys.stderr)
        return 2

    import torch

    from minigpt.gguf_file import GGUF_FILE_NAME, GGUF_OUTTYPES, export_gguf

    model, tokenizer, text = trained_tiny_model(arguments.steps)
    ids = tokenizer.encode(text)[: model.config.block_size]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].numpy()
    print(f"{len(ids)} tokens; MiniGPT's logits span [{ours.min():.2f}, {ours.max():.2f}]")
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for outtype in GGUF_OUTTYPES:
            export_gguf(model, tokenizer, work / outtype, outtype)
            size = (work / outtype / GGUF_FILE_NAME).stat().st_size
            result, how = run_with_fallback(work / outtype / GGUF_FILE_NAME, ids, arguments.threads, work, f"{outtype:5}")
            if result is None:
                continue
            theirs = np.asarray(result["logits"])
            agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
            print(f"{outtype:5} {size / 1e6:6.2f} MB  max |llama.cpp - MiniGPT| {np.abs(theirs - ours).max():.2e}  "
                  f"top token agrees {agree:.0%}  ({how})")
            if outtype == "f32":
                same = [tokens == tokenizer.encode(text) for tokens, text in zip(result["tokens"], TRICKY_TEXTS)]
                print(f"      tokenization equal to MiniGPT's on {sum(same)} of {len(same)} awkward texts")
        check_families(tokenizer, text, arguments.threads, arguments.new_tokens, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
