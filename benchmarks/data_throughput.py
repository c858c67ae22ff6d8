"""Throughput and memory of the data pipeline on a large generated JSONL file.

    python benchmarks/data_throughput.py [--size-mb 300] [--rounds 2] [--workdir DIR] [--tokenizer FILE] [--json out.json]

Writes a JSONL file of the requested size (documents drawn from the built-in corpus, so the text
is real English), trains a BPE tokenizer on a sample, then measures in the same process:
    baseline   `tokenizer.encode_batch` over the whole file read line by line (what tokenizing costs)
    pipeline   `TokenBlockStream` over the same file (reading, JSON, tokenizing, packing, shuffling, batching)
and prints tokens per second of each, their ratio, and the process's resident memory (RSS) at each
quarter of the file, which should stay flat however large the file is.

Timings on shared machines drift by tens of percent, so the two are measured in alternating order
(baseline first in even rounds, pipeline first in odd ones) after a warm-up, and averaged.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path
from statistics import mean

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from minigpt.corpus import builtin_corpus  # noqa: E402
from minigpt.data import TokenBlockStream  # noqa: E402
from minigpt.tokenizer import Tokenizer, load_tokenizer, train_bpe_tokenizer  # noqa: E402

ENCODE_BATCH = 64  # documents per encode_batch call: the pipeline's default tokenize_batch_size


def write_corpus(path: Path, size_bytes: int) -> int:
    """Write documents until the file reaches size_bytes; return the number of documents."""
    count = written = 0
    with open(path, "w", encoding="utf-8") as file:
        for document in cycle(builtin_corpus()):
            line = json.dumps({"text": document, "id": count}) + "\n"
            file.write(line)
            written += len(line)
            count += 1
            if written >= size_bytes:
                break
    return count


def measure_baseline(path: Path, tokenizer: Tokenizer, max_documents: int = 0) -> tuple[float, int]:
    """Tokens per second of reading, parsing and encode_batch alone; and the number of tokens."""
    start, tokens, batch = time.perf_counter(), 0, []
    with open(path, encoding="utf-8") as file:
        for line in islice(file, max_documents or None):
            batch.append(json.loads(line)["text"])
            if len(batch) == ENCODE_BATCH:
                tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
                batch = []
    if batch:
        tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
    return tokens / (time.perf_counter() - start), tokens


def measure_pipeline(path: Path, tokenizer: Tokenizer, block_size: int, batch_size: int) -> tuple[float, int, list[float]]:
    """Tokens per second of the whole TokenBlockStream, the tokens it gave, and RSS (MB) at each quarter of the file."""
    size = path.stat().st_size
    process = psutil.Process()
    stream = TokenBlockStream([path], tokenizer, block_size, batch_size, shuffle_buffer=1000, loop=False)
    start, tokens = time.perf_counter(), 0
    rss_by_quarter: list[float] = []
    for inputs, _ in stream:
        tokens += inputs.numel()
        while len(rss_by_quarter) < 4 and stream.reader.offset >= size * (len(rss_by_quarter) + 1) / 4 - 1:
            rss_by_quarter.append(process.memory_info().rss / 1e6)
    seconds = time.perf_counter() - start
    rss_by_quarter += [process.memory_info().rss / 1e6] * (4 - len(rss_by_quarter))  # the shuffle buffer drains after the file ends
    return tokens / seconds, tokens, rss_by_quarter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="measure each this many times, alternating which goes first")
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

        # The BPE model caches the words it has split: warm it up so neither measure gets it for free.
        measure_baseline(path, tokenizer, max_documents=2000)
        rss_before = psutil.Process().memory_info().rss / 1e6
        baseline_runs, pipeline_runs = [], []
        for round_number in range(arguments.rounds):
            for measure in (["baseline", "pipeline"] if round_number % 2 == 0 else ["pipeline", "baseline"]):
                if measure == "baseline":
                    tokens_per_second, baseline_tokens = measure_baseline(path, tokenizer)
                    baseline_runs.append(tokens_per_second)
                else:
                    tokens_per_second, pipeline_tokens, rss_by_quarter = measure_pipeline(
                        path, tokenizer, arguments.block_size, arguments.batch_size
                    )
                    pipeline_runs.append(tokens_per_second)
                print(f"  round {round_number + 1}: {measure:<8} {tokens_per_second:>12,.0f} tokens/s")

    baseline, pipeline = mean(baseline_runs), mean(pipeline_runs)
    print(f"{'measure':<36} | {'value':>14}")
    print(f"{'encode_batch alone (tokens/s)':<36} | {baseline:>14,.0f}")
    print(f"{'full pipeline (tokens/s)':<36} | {pipeline:>14,.0f}")
    print(f"{'pipeline / encode_batch':<36} | {pipeline / baseline:>14.2f}")
    print(f"{'tokens (encode_batch, pipeline)':<36} | {baseline_tokens:>,} {pipeline_tokens:>,}")
    print(f"{'RSS before streaming (MB)':<36} | {rss_before:>14,.0f}")
    for quarter, rss in enumerate(rss_by_quarter, start=1):
        print(f"{f'RSS at {25 * quarter}% of the file (MB)':<36} | {rss:>14,.0f}")
    if arguments.json:
        Path(arguments.json).write_text(json.dumps({
            "file_megabytes": size / 1e6, "documents": documents, "rounds": arguments.rounds,
            "encode_batch_tokens_per_second": baseline, "pipeline_tokens_per_second": pipeline, "ratio": pipeline / baseline,
            "encode_batch_runs": baseline_runs, "pipeline_runs": pipeline_runs,
            "tokens": {"encode_batch": baseline_tokens, "pipeline": pipeline_tokens},
            "rss_megabytes_before": rss_before, "rss_megabytes_by_quarter": rss_by_quarter,
        }, indent=2))


if __name__ == "__main__":
    main()
