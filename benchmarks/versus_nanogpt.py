"""MiniGPT against nanoGPT on the same CPU, at the same shapes, the two programs taking turns.

    python benchmarks/versus_nanogpt.py --nanogpt PATH --data tinyshakespeare.txt [--shapes baby nanogpt-10.7M]
        [--minigpt eager-float32 compiled-float32 compiled-auto] [--rounds 3] [--iters 30] [--warmup 5] [--num-threads N]

PATH is your own checkout of https://github.com/karpathy/nanoGPT; it is run in place and never
copied, and nothing is written into it. Both programs train on Tiny Shakespeare (--data), in
characters, with nanoGPT's data layout (train.bin, val.bin and meta.pkl, written here into a
temporary directory from the first 90% and the last 10% of the file, as nanoGPT's
data/shakespeare_char/prepare.py does) and MiniGPT's (train.txt and val.txt, the same split).

The shapes are the two of nanoGPT's README: its CPU "baby GPT" (4 layers, 4 heads, width 128,
block 64, batch 12, the recipe it gives for a MacBook) and config/train_shakespeare_char.py's
10.7M-parameter model (6 layers, 6 heads, width 384, block 256) at batch 16. Same shape means
layers, heads, width, block and batch; the blocks themselves differ (nanoGPT: GPT-2's LayerNorm,
GELU MLP and learned positions; MiniGPT: RMSNorm, SwiGLU, rotary positions), as does the
vocabulary by MiniGPT's 4 special tokens. Dropout is off in both.

Each round runs nanoGPT once and then each --minigpt variant once, for --iters iterations each;
a program's figure for the round is the median time per iteration after --warmup iterations
(nanoGPT's own "time ...ms" log lines; MiniGPT's step_ms in metrics.jsonl, both the wall time of
a whole optimizer step, data included). The table shows the median over the rounds, tokens per
second (batch x block / time), the ratio to nanoGPT (above 1: faster than nanoGPT) and the model
FLOPs utilisation: each program's training FLOPs per token (6 per matrix weight, plus attention's
scores, as GPT.flops_per_token counts them; nanoGPT's model counted the same way) times its tokens
per second, over this CPU's float32 peak: the fastest of a second's worth of 1024 x 1024 float32
matrix multiplies, timed one by one in this process with the same threads before each round, and
the fastest round's in the table (other work on the machine only ever slows a multiply down, and
a short one often runs between interruptions; an average over a busy second would understate the
peak and overstate the MFU).

Two columns bound what any speed-up can reach: "floor" is each program's FLOPs per iteration at
that peak (100% MFU), the shortest iteration this CPU allows for the work, and "ceiling" is
nanoGPT's measured time over that floor. Where nanoGPT itself runs at a high MFU, the ceiling is
low: on a 2-core AMD EPYC (AVX-512, float32 peak about 200 GFLOP/s) nanoGPT's baby GPT took 38.6
ms per iteration in an idle sitting (51% MFU) and MiniGPT's floor is 21.0 ms, a ceiling of 1.84x.
1.5x (25.7 ms) would need 82% MFU over MiniGPT's whole step, while its 86 matrix multiplies alone
take 24 ms of its 37.6 (profiled, compiled float32, at 85% of the peak): under 2 ms would be left
for attention, norms, rotary, SwiGLU, the loss and the optimizer, which take 14 ms.

nanoGPT runs as its README says for a CPU: --device=cpu --compile=False, in float32 (it has no
CPU autocast). The MiniGPT variants: eager-float32 and compiled-float32 (the same precision as
nanoGPT, without and with --enable-compile), eager-auto and compiled-auto (--dtype auto: bfloat16
autocast where this CPU multiplies it fast, float32 elsewhere). By default every CPU runs the
float32 ones, so the float32 path is measured even where auto picks bfloat16. Both programs get
the same --num-threads (default: the physical cores).
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minigpt.config import ModelConfig  # noqa: E402
from minigpt.metrics import read_metrics  # noqa: E402
from minigpt.model import GPT  # noqa: E402
from minigpt.runtime import available_cpu_cores  # noqa: E402


@dataclass(frozen=True)
class Shape:
    description: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int


SHAPES = {
    "baby": Shape("nanoGPT's CPU baby GPT", n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "nanogpt-10.7M": Shape("train_shakespeare_char.py's model, batch 16", n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
}
MINIGPT_VARIANTS = {  # name: (--dtype, --enable-compile)
    "eager-float32": ("float32", False),
    "compiled-float32": ("float32", True),
    "eager-auto": ("auto", False),
    "compiled-auto": ("auto", True),
}
DEFAULT_VARIANTS = ["eager-float32", "compiled-float32", "compiled-auto"]
PEAK_MATRIX_SIZE = 1024  # float32: 2.1 GFLOP a multiply, large enough for the cores' peak, short enough to run uninterrupted
NANOGPT_ITERATION = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", re.MULTILINE)


def write_nanogpt_data(text: str, directory: Path) -> int:
    """nanoGPT's shakespeare_char files for `text`: train.bin and val.bin (uint16 character ids of
    the first 90% and the last 10%) and meta.pkl (the vocabulary). Returns the vocabulary size."""
    characters = sorted(set(text))
    to_id = {character: index for index, character in enumerate(characters)}
    split = int(len(text) * 0.9)
    directory.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.bin", text[:split]), ("val.bin", text[split:])):
        np.array([to_id[character] for character in part], dtype=np.uint16).tofile(directory / name)
    meta = {"vocab_size": len(characters), "itos": dict(enumerate(characters)), "stoi": to_id}
    (directory / "meta.pkl").write_bytes(pickle.dumps(meta))
    return len(characters)


def write_minigpt_data(text: str, directory: Path) -> tuple[Path, Path]:
    """The same split as plain text files for MiniGPT."""
    split = int(len(text) * 0.9)
    train, val = directory / "train.txt", directory / "val.txt"
    train.write_text(text[:split], encoding="utf-8")
    val.write_text(text[split:], encoding="utf-8")
    return train, val


def nanogpt_iteration_ms(log: str, warmup: int) -> list[float]:
    """The per-iteration times nanoGPT's train.py printed ("iter N: loss L, time Tms, ..."), from iteration `warmup` on."""
    return [float(milliseconds) for iteration, milliseconds in NANOGPT_ITERATION.findall(log) if int(iteration) >= warmup]


def float32_peak_flops(size: int = PEAK_MATRIX_SIZE, seconds: float = 1.0) -> float:
    """FLOP/s of the fastest of `seconds`' worth of size x size float32 matrix multiplies (2 size^3 FLOPs each)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    fastest, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        began = time.perf_counter()
        a @ b
        fastest = min(fastest, time.perf_counter() - began)
    return 2 * size**3 / fastest


def minigpt_flops_per_token(shape: Shape, vocabulary: int) -> int:
    """Training FLOPs per token of MiniGPT at `shape` (GPT.flops_per_token), its vocabulary being
    the characters plus its 4 special tokens. Laid out on the meta device: counted, never allocated."""
    config = ModelConfig(n_layer=shape.n_layer, n_head=shape.n_head, n_kv_head=shape.n_head, n_embd=shape.n_embd,
                         block_size=shape.block_size, vocab_size=vocabulary + 4, dropout=0.0)
    with torch.device("meta"):
        return GPT(config).flops_per_token()


def nanogpt_flops_per_token(shape: Shape, vocabulary: int) -> int:
    """The same count for nanoGPT's model: per layer 4 n_embd^2 attention weights (q, k, v and the
    output projection) and 8 n_embd^2 MLP weights (4x wide), the output head (vocabulary x n_embd),
    6 FLOPs per weight, plus attention's scores, 12 x layers x block x n_embd."""
    width = shape.n_embd
    matrix_weights = shape.n_layer * 12 * width * width + vocabulary * width
    return 6 * matrix_weights + 12 * shape.n_layer * shape.block_size * width


def run_nanogpt(checkout: Path, workdir: Path, shape: Shape, iterations: int, threads: int) -> str:
    """One nanoGPT training run in `workdir`, which holds data/shakespeare_char/ and a link to the
    checkout's configurator.py (train.py reads both relative to the working directory); its output."""
    command = [
        sys.executable, str(checkout / "train.py"), str(checkout / "config" / "train_shakespeare_char.py"),
        "--device=cpu", "--compile=False", "--dtype=float32", "--dropout=0.0", f"--out_dir={workdir / 'nanogpt-out'}",
        f"--n_layer={shape.n_layer}", f"--n_head={shape.n_head}", f"--n_embd={shape.n_embd}",
        f"--block_size={shape.block_size}", f"--batch_size={shape.batch_size}", f"--max_iters={iterations}",
        f"--lr_decay_iters={iterations}", "--log_interval=1", "--eval_interval=1000000", "--eval_iters=1",
        "--always_save_checkpoint=False", "--wandb_log=False",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"nanoGPT failed (status {result.returncode}): {result.stderr.strip()[-2000:]}")
    return result.stdout


def run_minigpt(workdir: Path, train: Path, val: Path, shape: Shape, variant: str, iterations: int, threads: int,
                round_number: int) -> list[float]:
    """One `minigpt train` run at `shape`; the step_ms of every step, from metrics.jsonl."""
    dtype, compiled = MINIGPT_VARIANTS[variant]
    name = f"{variant}-{shape.n_layer}x{shape.n_embd}-round{round_number}"
    command = [
        sys.executable, str(REPO / "scripts" / "train.py"), "--config", "tiny", "--data-files", str(train),
        "--val-data-files", str(val), "--tokenizer-type", "char", "--output-dir", str(workdir / "minigpt-runs"),
        "--run-name", name, "--set", f"model.n_layer={shape.n_layer}", "--set", f"model.n_head={shape.n_head}",
        "--set", f"model.n_kv_head={shape.n_head}", "--set", f"model.n_embd={shape.n_embd}", "--set", "model.dropout=0.0",
        "--block-size", str(shape.block_size), "--batch-size", str(shape.batch_size), "--max-steps", str(iterations),
        "--log-steps", "1", "--eval-steps", "1000000", "--save-steps", "1000000", "--eval-batches", "1",
        "--sample-tokens", "0", "--dtype", dtype, "--num-threads", str(threads),
        *(["--enable-compile"] if compiled else []),
    ]
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"MiniGPT ({variant}) failed (status {result.returncode}): {result.stderr.strip()[-2000:]}")
    rows = read_metrics(workdir / "minigpt-runs" / name / "metrics.jsonl")
    return [row["step_ms"] for row in rows if row.get("type") == "train"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def checkout_version(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return f"commit {result.stdout.strip()}" if result.returncode == 0 else "not a git checkout"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nanogpt", type=Path, required=True, help="your local nanoGPT checkout (holding train.py)")
    parser.add_argument("--data", type=Path, required=True, help="Tiny Shakespeare as one text file (tinyshakespeare.txt)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--minigpt", nargs="+", choices=list(MINIGPT_VARIANTS), default=DEFAULT_VARIANTS,
                        help=f"MiniGPT variants to run (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--rounds", type=int, default=3, help="times each program runs, taking turns (default: 3)")
    parser.add_argument("--iters", type=int, default=30, help="iterations per run (default: 30)")
    parser.add_argument("--warmup", type=int, default=5, help="first iterations of each run left out of its median (default: 5)")
    parser.add_argument("--num-threads", type=int, default=0, help="CPU threads for both programs (default: the physical cores)")
    arguments = parser.parse_args()
    checkout = arguments.nanogpt.resolve()
    for name in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"):
        if not (checkout / name).is_file():
            parser.error(f"{checkout} is not a nanoGPT checkout: it has no {name}")
    if not arguments.data.is_file():
        parser.error(f"--data {arguments.data} does not exist")
    if arguments.iters <= arguments.warmup or arguments.rounds < 1:
        parser.error("--iters must be above --warmup, and --rounds at least 1")
    threads = arguments.num_threads or available_cpu_cores()
    torch.set_num_threads(threads)  # for the peak's matrix multiply, as the programs run
    text = arguments.data.read_text(encoding="utf-8")

    print(f"CPU: {cpu_model()}; {threads} threads; torch {torch.__version__}; nanoGPT {checkout} ({checkout_version(checkout)})")
    print(f"{arguments.rounds} round(s) of {arguments.iters} iterations per program, the first {arguments.warmup} of each run "
          "left out; figures are medians. Timings vary 20-40% on a shared machine: compare only figures of one sitting.")
    with tempfile.TemporaryDirectory(prefix="versus-nanogpt-") as temporary:
        workdir = Path(temporary)
        vocabulary = write_nanogpt_data(text, workdir / "data" / "shakespeare_char")
        (workdir / "configurator.py").symlink_to(checkout / "configurator.py")  # train.py reads it from the working directory
        train, val = write_minigpt_data(text, workdir)
        print(f"Tiny Shakespeare: {len(text):,} characters, a vocabulary of {vocabulary}")
        for shape_name in arguments.shapes:
            shape = SHAPES[shape_name]
            programs = ["nanoGPT"] + [f"MiniGPT {variant}" for variant in arguments.minigpt]
            medians: dict[str, list[float]] = {program: [] for program in programs}
            peaks: list[float] = []
            for round_number in range(1, arguments.rounds + 1):
                peaks.append(float32_peak_flops())
                times = nanogpt_iteration_ms(run_nanogpt(checkout, workdir, shape, arguments.iters, threads), arguments.warmup)
                medians["nanoGPT"].append(statistics.median(times))
                for variant in arguments.minigpt:
                    steps = run_minigpt(workdir, train, val, shape, variant, arguments.iters, threads, round_number)
                    medians[f"MiniGPT {variant}"].append(statistics.median(steps[arguments.warmup:]))
                print(f"  {shape_name} round {round_number}: float32 peak {peaks[-1] / 1e9:.1f} GFLOP/s, "
                      + ", ".join(f"{program} {values[-1]:.1f} ms" for program, values in medians.items())
                      + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
            tokens, peak = shape.batch_size * shape.block_size, max(peaks)
            flops = {"nanoGPT": nanogpt_flops_per_token(shape, vocabulary)}
            flops.update(dict.fromkeys(programs[1:], minigpt_flops_per_token(shape, vocabulary)))
            print(f"\n{shape_name}: {shape.description} ({shape.n_layer} layers, {shape.n_head} heads, width {shape.n_embd}, "
                  f"block {shape.block_size}, batch {shape.batch_size}: {tokens:,} tokens per iteration); "
                  f"float32 peak {peak / 1e9:.1f} GFLOP/s")
            print(f"  {'program':<26} {'ms/iter':>9} {'tokens/s':>10} {'vs nanoGPT':>11} {'MFU':>6} {'floor ms':>9} {'ceiling':>8}")
            reference = statistics.median(medians["nanoGPT"])
            for program in programs:
                milliseconds = statistics.median(medians[program])
                tokens_per_second = 1000 * tokens / milliseconds
                floor = 1000 * flops[program] * tokens / peak  # the iteration's FLOPs at the peak: no step can be shorter
                print(f"  {program:<26} {milliseconds:>9.1f} {tokens_per_second:>10,.0f} {reference / milliseconds:>10.2f}x "
                      f"{flops[program] * tokens_per_second / peak:>6.1%} {floor:>9.1f} {reference / floor:>7.2f}x")
            print("  floor: the iteration's FLOPs at this CPU's float32 peak (100% MFU); ceiling: nanoGPT's time over that floor,\n"
                  "  the most any program doing that many FLOPs could be faster than nanoGPT here.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
