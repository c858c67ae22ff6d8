"""Throughput and memory of the data pipeline on a large generated JSONL file.

    python benchmarks/data_throughput.py [--size-mb 300] [--workdir DIR] [--json out.json]

Writes a JSONL file of the requested size (documents drawn from the built-in corpus, so the text
is real English), trains a BPE tokenizer on a sample, then measures in the same process:
    baseline   `tokenizer.encode_batch` over the whole file read line by line (what tokenizing costs)
    pipeline   `TokenBlockStream` over the same file (reading, JSON, tokenizing, packing, shuffling, batching)
and prints tokens per second of each, their ratio, and the process's resident memory (RSS) at each
quarter of the file, which should stay flat however large the file is.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.corpus import builtin_corpus  # noqa: E402
from minigpt.data import TokenBlockStream  # noqa: E402
from minigpt.tokenizer import load_tokenizer, train_bpe_tokenizer  # noqa: E402


def write_corpus(path: Path, size_bytes: int) -> int:
    """Write documents until the file reaches size_bytes; return the number of documents."""
    count = 0
    with open(path, "w", encoding="utf-8") as file:
        written = 0
        for document in cycle(builtin_corpus()):
            line = json.dumps({"text": document, "id": count}) + "\n"
            file.write(line)
            written += len(line)
            count += 1
            if written >= size_bytes:
                return count
    return count


def baseline_tokens_per_second(path: Path, tokenizer, batch_size: int = 64) -> tuple[float, int]:
    start, tokens, batch = time.perf_counter(), 0, []
    with open(path, encoding="utf-8") as file:
        for line in file:
            batch.append(json.loads(line)["text"])
            if len(batch) == batch_size:
                tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
                batch = []
    if batch:
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=300)
    parser.add_argument("--workdir", help="where to write the generated file (default: a temporary directory)")
    parser.add_argument("--tokenizer", help="an existing tokenizer.json (default: train a 6,400-token BPE on a sample)")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the figures to this file")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=arguments.workdir) as workdir:
        path = Path(workdir) / "corpus.jsonl"
        documents = write_corpus(path, int(arguments.size_mb * 1e6))
        size = path.stat().st_size
        print(f"file: {size / 1e6:,.0f} MB, {documents:,} documents")
        if arguments.tokenizer:
            tokenizer = load_tokenizer(arguments.tokenizer)
        else:
            tokenizer = train_bpe_tokenizer(islice(builtin_corpus(), 400), vocab_size=6400, show_progress=False)

        process = psutil.Process()
        baseline, baseline_tokens = baseline_tokens_per_second(path, tokenizer)
        stream = TokenBlockStream([path], tokenizer, arguments.block_size, arguments.batch_size, shuffle_buffer=1000, loop=False)
        start = time.perf_counter()
        tokens = 0
        memory_at_quarter: list[float] = []
        for inputs, _ in stream:
            tokens += inputs.numel()
            while len(memory_at_quarter) < 4 and stream.reader.offset >= size * (len(memory_at_quarter) + 1) / 4 - 1:
                memory_at_quarter.append(process.memory_info().rss / 1e6)
        while len(memory_at_quarter) < 4:
            memory_at_quarter.append(process.memory_info().rss / 1e6)
        pipeline = tokens / (time.perf_counter() - start)

    print(f"{'measure':<34} | {'value':>14}")
    print(f"{'encode_batch alone (tokens/s)':<34} | {baseline:>14,.0f}")
    print(f"{'full pipeline (tokens/s)':<34} | {pipeline:>14,.0f}")
    print(f"{'pipeline / encode_batch':<34} | {pipeline / baseline:>14.2f}")
    print(f"{'tokens (baseline, pipeline)':<34} | {baseline_tokens:>7,} {tokens:>7,}")
    for quarter, rss in enumerate(memory_at_quarter, start=1):
        print(f"{f'RSS at {25 * quarter}% of the file (MB)':<34} | {rss:>14,.0f}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({
            "file_megabytes": size / 1e6, "documents": documents, "encode_batch_tokens_per_second": baseline,
            "pipeline_tokens_per_second": pipeline, "ratio": pipeline / baseline, "rss_megabytes_by_quarter": memory_at_quarter,
        }, indent=2))


if __name__ == "__main__":
    main()
