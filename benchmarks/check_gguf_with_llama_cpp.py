"""MiniGPT's GGUF files in llama.cpp itself: how far llama.cpp's logits are from MiniGPT's, per outtype.

    python benchmarks/check_gguf_with_llama_cpp.py [--steps 40] [--threads 1]

Needs llama-cpp-python (`pip install llama-cpp-python`, which compiles llama.cpp: about ten
minutes on 2 cores), so it is a check to run by hand, not a test. It trains the `tiny` preset's
shape for a few dozen AdamW steps (float32, rope_theta 500: a freshly initialised model or the
default theta would hide permutation and rotary mistakes), exports it as GGUF in f32, f16 and
q8_0, runs the same tokens through llama.cpp and prints, per outtype, the largest difference
between llama.cpp's logits and MiniGPT's and how often their top token agrees; with the f32
file it also compares tokenization on awkward texts. llama.cpp keeps its KV cache in float32
here (its default is float16), so that the f32 file shows the export's own error.

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


def llama_cpp_run(gguf_path: str, ids: list[int], threads: int, repack: bool) -> dict:
    """The --worker side: llama.cpp's logits for `ids` and its tokenization of TRICKY_TEXTS."""
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
    model = llama_cpp.Llama(model_path=gguf_path, n_ctx=len(ids), logits_all=True, n_threads=threads, verbose=False,
                            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    model.eval(ids)
    return {
        "logits": np.asarray(model.scores[: len(ids)]).tolist(),
        "tokens": [model.tokenize(text.encode(), add_bos=False, special=True) for text in TRICKY_TEXTS],
    }


def run_in_llama_cpp(gguf_path: Path, ids: list[int], threads: int, repack: bool, work: Path) -> dict | str:
    """llama_cpp_run in a fresh process: its result, or a sentence saying how the process died."""
    request, answer = work / "request.json", work / "answer.json"
    request.write_text(json.dumps({"gguf": str(gguf_path), "ids": ids, "threads": threads, "repack": repack}))
    answer.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, __file__, "--worker", str(request), str(answer)], capture_output=True, text=True)
    if result.returncode < 0:
        return f"llama.cpp crashed ({signal.Signals(-result.returncode).name})"
    if result.returncode != 0:
        return f"llama.cpp failed (exit {result.returncode}): {result.stderr.strip().splitlines()[-1:]}"
    return json.loads(answer.read_text())


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
    parser.add_argument("--worker", nargs=2, metavar=("REQUEST", "ANSWER"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        request = json.loads(Path(arguments.worker[0]).read_text())
        answer = llama_cpp_run(request["gguf"], request["ids"], request["threads"], request["repack"])
        Path(arguments.worker[1]).write_text(json.dumps(answer))
        return 0
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_cpp is not importable here; install llama-cpp-python to run this check.", file=sys.stderr)
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
            result = run_in_llama_cpp(work / outtype / GGUF_FILE_NAME, ids, arguments.threads, True, work)
            how = "default buffers"
            if isinstance(result, str):
                print(f"{outtype:5} {result}; again with extra buffer types off (--no-repack)")
                result, how = run_in_llama_cpp(work / outtype / GGUF_FILE_NAME, ids, arguments.threads, False, work), "--no-repack"
            if isinstance(result, str):
                print(f"{outtype:5} {result}")
                continue
            theirs = np.asarray(result["logits"])
            agree = (theirs.argmax(-1) == ours.argmax(-1)).mean()
            print(f"{outtype:5} {size / 1e6:6.2f} MB  max |llama.cpp - MiniGPT| {np.abs(theirs - ours).max():.2e}  "
                  f"top token agrees {agree:.0%}  ({how})")
            if outtype == "f32":
                same = [tokens == tokenizer.encode(text) for tokens, text in zip(result["tokens"], TRICKY_TEXTS)]
                print(f"      tokenization equal to MiniGPT's on {sum(same)} of {len(same)} awkward texts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
