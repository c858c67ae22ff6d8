"""A pretrained model's whole workflow, timed: LoRA SFT, one chat reply, a q8_0 GGUF for Ollama.

    python benchmarks/pretrained_workflow.py [--steps 4] [--batch-size 4] [--block-size 0] [--rank 8] [--dtype auto] [--keep DIR]

What README "Fine-tuning a pretrained model" tells a user to run, on a folder shaped like the one
`huggingface-cli download HuggingFaceTB/SmolLM2-135M-Instruct` gives, built here without a
download: a random Llama of SmolLM2-135M's shape (30 layers of width 576, 9 heads, 3 KV heads,
MLP 1536, vocabulary 49152, tied head; float32 safetensors as transformers saves them) and a
byte-level BPE tokenizer trained here on MiniGPT's built-in documents with SmolLM2's special
tokens (<|endoftext|>, <|im_start|>, <|im_end|> at ids 0-2) and its ChatML template; the model's
vocabulary is padded past the tokenizer's to 49152, as real models' often are.

Each command runs as a user runs it (scripts/train.py, chat.py, export.py), in its own process:
printed are its wall time, its peak RSS (the process's own, from wait4) and the files it wrote,
with the CPU model. Nothing is compared: this is the "how long and how big" a user can expect.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from finetune_pretrained import cpu_model, hf_config  # noqa: E402  (benchmarks/ is on the path)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-Instruct's template: ChatML, with a default system turn when the chat has none.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_folder(folder: Path, tokenizer_vocab: int) -> None:
    """The SmolLM2-135M-shaped folder: config.json + model.safetensors by transformers, then the
    tokenizer files (after save_pretrained, which writes a generation_config.json of its own)."""
    import torch
    import transformers
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from minigpt.corpus import builtin_documents

    config = hf_config("smollm2-135m")
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 2
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=tokenizer_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[AddedToken(token, special=True, normalized=False) for token in SPECIALS],
                                  show_progress=False)
    backend.train_from_iterator(builtin_documents(), trainer=trainer)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "add_prefix_space": False, "clean_up_tokenization_spaces": False, "model_max_length": 8192}, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}, indent=2))


def chats(path: Path, count: int) -> Path:
    with open(path, "w", encoding="utf-8") as file:
        for n in range(count):
            turns = [{"role": "user", "content": f"What is {n} times three?"},
                     {"role": "assistant", "content": f"{n} times three is {3 * n}."}]
            file.write(json.dumps({"messages": turns}) + "\n")
    return path


def run(script: str, *arguments: str, cwd: Path) -> tuple[float, float, str]:
    """scripts/SCRIPT ARGUMENTS in a new process: (wall seconds, its peak RSS in MB, its output)."""
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen([sys.executable, str(REPO / "scripts" / script), *arguments], cwd=cwd,
                                   stdout=output, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise SystemExit(f"{script} failed ({process.returncode}):\n{text}")
    return seconds, usage.ru_maxrss / 1024, text


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [file for file in path.rglob("*") if file.is_file()]
    return sum(file.stat().st_size for file in files) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="LoRA SFT steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=0, help="0: the run's default for a pretrained folder")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", default="auto", help="train's --dtype (auto times float32 against bfloat16 first, on a CPU)")
    parser.add_argument("--tokenizer-vocab", type=int, default=8000, help="the tokenizer's size; the model's vocabulary stays 49152")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temporary one)")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        work = arguments.keep or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        folder = work / "SmolLM2-135M-Instruct"
        start = time.perf_counter()
        build_folder(folder, arguments.tokenizer_vocab)
        rows = [("build the folder (transformers)", time.perf_counter() - start, None, f"{size_mb(folder):.0f} MB folder")]

        data = chats(work / "chats.jsonl", 200)
        block = ["--block-size", str(arguments.block_size)] if arguments.block_size else []
        seconds, rss, text = run("train.py", "--stage", "sft", "--init-from", str(folder), "--data-files", str(data),
                                 "--lora-rank", str(arguments.rank), "--max-steps", str(arguments.steps),
                                 "--eval-steps", str(arguments.steps), "--batch-size", str(arguments.batch_size), *block,
                                 "--dtype", arguments.dtype, "--warmup-steps", "1",
                                 "--output-dir", "runs", "--run-name", "smol-sft", cwd=work)
        final = work / "runs" / "smol-sft" / "final_model"
        sequences = next((line.strip() for line in text.splitlines() if "Training on sequences" in line), "")
        rows.append((f"LoRA SFT, {arguments.steps} steps x {arguments.batch_size} rows, --dtype {arguments.dtype}", seconds, rss,
                     f"{size_mb(final):.1f} MB adapter folder"))

        seconds, rss, reply = run("chat.py", str(final), "--prompt", "What is 7 times three?", "--max-new-tokens", "32",
                                  "--seed", "0", cwd=work)
        rows.append(("chat, one reply (<= 32 tokens)", seconds, rss, f"{len(reply.strip())} characters"))

        seconds, rss, _ = run("export.py", str(final), "--merge", "--format", "gguf", "--outtype", "q8_0",
                              "--output", str(work / "gguf"), cwd=work)
        gguf = next((work / "gguf").glob("*.gguf"))
        rows.append(("export --merge --format gguf --outtype q8_0", seconds, rss, f"{size_mb(gguf):.0f} MB {gguf.name} + Modelfile"))

        print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch threads: default")
        if sequences:
            print(f"train said: {sequences}")
        print(f"{'step':<46} {'wall s':>8} {'peak RSS MB':>12}  output")
        for name, seconds, rss, output in rows:
            print(f"{name:<46} {seconds:8.1f} {'' if rss is None else f'{rss:.0f}':>12}  {output}")


if __name__ == "__main__":
    main()
