"""A DPO step against an SFT step, and MiniGPT's DPO against TRL's DPOTrainer, on one model shape.

    python benchmarks/dpo_vs_trl.py [--steps 20] [--rounds 2] [--batch-size 8] [--threads 1]

The model: 4 layers of width 128 (4 heads, 2 key/value heads), a 128-token window and a 512-token
BPE vocabulary, random weights, float32, eager. The pairs: the built-in preference set's
(`minigpt.preference_corpus`) whose two replies fit the window. Every measurement runs in a
fresh process of its own (so one's freed memory cannot hide the other's peak), with glibc
giving every tensor over 64 KB its own mapping (peak RSS = peak live memory), and the kinds
alternate round by round because timings on a shared machine drift. Reported per kind, the
median over rounds:

    sft / dpo  one optimizer step of MiniGPT (forward, backward, AdamW) on the same batch of
               pairs: SFT on the chosen replies (batch-size rows), DPO on both replies (twice
               the rows); the ms per step, the peak RSS over the model's, and their ratio
    minigpt    `minigpt train --stage dpo` for --steps steps (the reference log-probabilities
               computed before the loop, not timed)
    trl        TRL's DPOTrainer on the same weights (exported as a Hugging Face Llama folder)
               and pairs, with precompute_ref_log_probs (the same one pass before training,
               not timed), dropout off, the same batch, learning rate and beta (pure DPO: MiniGPT
               with --rpo-alpha 0, TRL's default sigmoid loss)
    for both:  pairs and tokens (of both replies, prompt included, padding excluded) per
               second of the training loop, the process's peak RSS, and the loss of step 1,
               which must be ln 2 = 0.693147 in both

Needs TRL (`pip install -c constraints.txt trl`, the bench extra); without it only the first
comparison runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.config import RunConfig, apply_overrides, preset_config  # noqa: E402
from minigpt.corpus import builtin_documents  # noqa: E402
from minigpt.metrics import read_metrics  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.model_folder import load_language_model, save_model_directory  # noqa: E402
from minigpt.objective import LanguageModelObjective, Preference  # noqa: E402
from minigpt.optim import build_optimizer  # noqa: E402
from minigpt.preference_corpus import builtin_preference_pairs  # noqa: E402
from minigpt.preference_data import PreferenceBatches, encode_pairs  # noqa: E402
from minigpt.run import prepare_run  # noqa: E402
from minigpt.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402

WORKER_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}
SHAPE = {"model.block_size": 128, "model.n_layer": 4, "model.n_head": 4, "model.n_kv_head": 2, "model.n_embd": 128, "model.dropout": 0.0}
LEARNING_RATE, BETA = 1e-4, 0.1
STEP_KINDS, RUN_KINDS = ("sft", "dpo"), ("minigpt", "trl")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def prepare(directory: Path, pairs_wanted: int) -> None:
    """The model folder, its Hugging Face export and the pairs file, written once."""
    from minigpt.export import export_hf

    texts = []
    for document in builtin_documents():
        texts.append(document)
        if sum(map(len, texts)) > 300_000:
            break
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512, show_progress=False)
    config = apply_overrides(RunConfig(), {**SHAPE, "model.vocab_size": tokenizer.vocab_size, "train.stage": "sft"})
    torch.manual_seed(0)
    model = GPT(config.model)
    save_model_directory(directory / "model", model, config, tokenizer)
    export_hf(model, tokenizer, directory / "hf")
    train, _ = builtin_preference_pairs()
    fitting = [pair for pair in train
               if all(len(tokenizer.render_chat(pair.conversation(reply))[0]) <= config.model.block_size for reply in (pair.chosen, pair.rejected))]
    with open(directory / "pairs.jsonl", "w", encoding="utf-8") as file:
        for pair in fitting[:pairs_wanted]:
            file.write(json.dumps({"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.chosen}],
                                   "rejected": [{"role": "assistant", "content": pair.rejected}]}) + "\n")


def measure_step(kind: str, directory: Path, steps: int, batch_size: int) -> dict:
    """SFT or DPO optimizer steps of MiniGPT on one fixed batch of pairs."""
    loaded = load_language_model(directory / "model")
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    from minigpt.preference_data import read_preference_pairs

    stream = PreferenceBatches(encode_pairs(read_preference_pairs([directory / "pairs.jsonl"]), tokenizer, 128), batch_size,
                               tokenizer.pad_id, loop=False)
    stream.encoded.reference[:] = 0.0  # the loss's value does not matter here, only its cost
    inputs, targets, reference = next(iter(stream))
    if kind == "sft":
        objective, batch = LanguageModelObjective(tokenizer), (inputs[:, 0].contiguous(), targets[:, 0].contiguous())
    else:
        objective, batch = Preference(BETA), (inputs, targets, reference)
    train = dataclasses.replace(RunConfig().train, learning_rate=LEARNING_RATE)
    optimizer = build_optimizer(model, train, "cpu")
    model_rss = peak_rss_mb()
    times = []
    for _ in range(steps + 1):  # the first step allocates gradients and AdamW's state: not timed
        start = time.perf_counter()
        (objective.loss(model, batch) / objective.weight(batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"kind": kind, "ms_per_step": 1000 * statistics.median(times[1:]), "over_model_mb": peak_rss_mb() - model_rss}


def tokens_per_pair(directory: Path) -> float:
    """Tokens of both replies of a pair, prompt included, as the chat template renders them (the mean over the pairs)."""
    from minigpt.preference_data import read_preference_pairs

    tokenizer = load_tokenizer(directory / "model" / "tokenizer.json")
    encoded = encode_pairs(read_preference_pairs([directory / "pairs.jsonl"]), tokenizer, 128)
    return sum(len(reply.ids) for reply in (*encoded.chosen, *encoded.rejected)) / len(encoded)


def measure_minigpt(directory: Path, steps: int, batch_size: int) -> dict:
    config = apply_overrides(preset_config("tiny"), {
        "train.stage": "dpo", "train.init_from": str(directory / "model"), "train.data_files": [str(directory / "pairs.jsonl")],
        "train.output_dir": str(directory / "runs"), "train.run_name": f"minigpt-{os.getpid()}", "train.max_steps": steps,
        "train.batch_size": batch_size, "train.learning_rate": LEARNING_RATE, "train.warmup_steps": 0, "train.lr_scheduler": "constant",
        "train.dpo_beta": BETA, "train.rpo_alpha": 0.0, "train.val_fraction": 0.0, "train.log_steps": 1, "train.save_steps": 10**6, "train.dtype": "float32",
        "train.num_threads": torch.get_num_threads(), "train.disable_monitoring": True, "train.weight_decay": 0.0,
    })
    config = dataclasses.replace(config, model=load_language_model(directory / "model").config.model)
    trainer = prepare_run(config, show_progress=False)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    first = read_metrics(trainer.run_dir / "metrics.jsonl")[0]
    return {"seconds": seconds, "pairs": steps * batch_size, "first_loss": first["dpo_loss"], "peak_rss_mb": peak_rss_mb()}


def measure_trl(directory: Path, steps: int, batch_size: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(directory / "hf", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory / "hf")
    arguments = DPOConfig(
        output_dir=str(directory / "trl" / str(os.getpid())), max_steps=steps, per_device_train_batch_size=batch_size,
        learning_rate=LEARNING_RATE, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=BETA,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", precompute_ref_log_probs=True, max_length=129,
        disable_dropout=True, dataloader_num_workers=0, seed=0, bf16=False,
    )
    trainer = DPOTrainer(model=model, args=arguments, train_dataset=Dataset.from_list(records), processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    first = next(row for row in trainer.state.log_history if "loss" in row)
    return {"seconds": seconds, "pairs": steps * batch_size, "first_loss": first["loss"], "peak_rss_mb": peak_rss_mb()}


def run_worker(kind: str, directory: Path, arguments: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--directory", str(directory), "--steps", str(arguments.steps),
               "--batch-size", str(arguments.batch_size), "--threads", str(arguments.threads)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **WORKER_ENVIRONMENT}).stdout
    return json.loads(output.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=STEP_KINDS + RUN_KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    if arguments.worker:
        directory = Path(arguments.directory)
        if arguments.worker in STEP_KINDS:
            result = measure_step(arguments.worker, directory, arguments.steps, arguments.batch_size)
        else:
            result = (measure_minigpt if arguments.worker == "minigpt" else measure_trl)(directory, arguments.steps, arguments.batch_size)
        print(json.dumps(result))
        return
    try:
        import trl
        kinds = STEP_KINDS + RUN_KINDS
    except ImportError:
        trl, kinds = None, STEP_KINDS
        print("TRL is not installed: comparing the DPO step with the SFT step only.")
    with tempfile.TemporaryDirectory() as temporary:
        directory = Path(temporary)
        prepare(directory, pairs_wanted=arguments.steps * arguments.batch_size)
        results: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for _ in range(arguments.rounds):
            for kind in kinds:
                results[kind].append(run_worker(kind, directory, arguments))
        tokens = tokens_per_pair(directory)
    median = {kind: {key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "kind"} for kind, runs in results.items()}
    print(f"4 layers x 128 wide, 128-token window, batch {arguments.batch_size} pairs, float32 eager, {arguments.threads} thread(s), "
          f"{arguments.rounds} alternating rounds (medians)")
    for kind in STEP_KINDS:
        print(f"  {kind} step: {median[kind]['ms_per_step']:7.1f} ms   peak RSS over the model {median[kind]['over_model_mb']:6.1f} MB")
    print(f"  dpo / sft:  {median['dpo']['ms_per_step'] / median['sft']['ms_per_step']:.2f}x time   "
          f"{median['dpo']['over_model_mb'] / max(median['sft']['over_model_mb'], 1e-9):.2f}x memory")
    if trl is None:
        return
    print(f"  {arguments.steps} DPO steps (TRL {trl.__version__}):")
    for kind in RUN_KINDS:
        values = median[kind]
        print(f"  {kind:>8}: {values['pairs'] / values['seconds']:7.1f} pairs/s   {tokens * values['pairs'] / values['seconds']:8.0f} tokens/s   "
              f"peak RSS {values['peak_rss_mb']:6.0f} MB   step-1 loss {values['first_loss']:.6f}")


if __name__ == "__main__":
    main()
