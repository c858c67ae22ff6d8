"""Draw the figures the tutorial chapters show, from the library's own code.

    python tutorials/figures/make_figures.py            # all figures, into tutorials/figures/
    python tutorials/figures/make_figures.py lr_schedule block_shapes   # only these

Each figure is computed from MiniGPT itself: the schedule from `learning_rate_at`, the loss
curves by `minigpt.plots` from a real run, attention and sampling from a model trained the way
chapter 7 trains it, the tokenizer's compression from `train_bpe_tokenizer`, token sizes from
`token_byte_lengths`, a batch from `TokenBlockStream`, the FLOPs from each preset's matrices, the debugging drills and
the classifier's confusion matrices and the DPO curves from real runs' metrics.jsonl, the chat mask from
`render_chat`, the export map from `tensor_table` and `permute_for_gguf`, the DDP gradients from
chapter 14's batch, continuous batching from an `Engine`. So when the library changes, running
this again keeps the pictures true. The runs go in a temporary directory; only the PNGs are kept.
Seeds are fixed, so a second run draws the same figures (the drills at learning rate 5 excepted:
that run is chaotic, and the last bits of rounding differ between CPUs). Several minutes on a
2-core CPU, most of them in the training runs; name figures to redraw only those.

The labels are in English: one PNG serves both editions, and each Chinese chapter's caption and
prose say in Chinese what it shows. Chinese labels would need a CJK font on every machine that
redraws them (the figures would silently change with the fonts installed) and a second set of PNGs.
The tests read this file to check that every figure a chapter shows is drawn here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import tempfile
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from minigpt.config import ModelConfig, TrainConfig, apply_overrides, preset_config
from minigpt.corpus import builtin_documents
from minigpt.data import TokenBlockStream
from minigpt.engine import Engine, Request
from minigpt.families import tensor_table
from minigpt.generation import SamplingConfig, next_token_distribution
from minigpt.gguf_file import permute_for_gguf
from minigpt.loss import IGNORE_INDEX
from minigpt.metrics import read_metrics
from minigpt.model import GPT, apply_rotary
from minigpt.optim import learning_rate_at
from minigpt.plots import draw_confusion_matrix
from minigpt.run import prepare_run
from minigpt.tokenizer import train_bpe_tokenizer, train_char_tokenizer

HERE = Path(__file__).resolve().parent
SENTENCE = "The function returns a list of the items in the sequence."


def save(figure: Figure, name: str) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(HERE / f"{name}.png", dpi=100)
    print(f"wrote {HERE / name}.png")


def train_tiny(workdir: Path, name: str, **overrides):
    """The `tiny` preset on the built-in corpus, as chapters 6 and 7 train it."""
    settings = {"train.tokenizer_samples": 300, "train.sample_tokens": 0, "train.output_dir": str(workdir), "train.run_name": name,
                "train.dtype": "float32"}
    trainer = prepare_run(apply_overrides(preset_config("tiny"), {**settings, **overrides}), show_progress=False)
    trainer.train()
    return trainer


def lr_schedule(workdir: Path) -> None:
    """Chapter 5's schedule: 20 warmup steps to 3e-3, then a half cosine to 3e-4 at step 300."""
    train = TrainConfig(learning_rate=3e-3, min_learning_rate=3e-4, warmup_steps=20, max_steps=300)
    steps = list(range(train.max_steps))
    figure = Figure(figsize=(7, 3.2))
    axes = figure.add_subplot()
    axes.plot(steps, [learning_rate_at(step, train) for step in steps], color="tab:blue")
    axes.axvline(train.warmup_steps, color="grey", linestyle=":", linewidth=1)
    axes.annotate("end of warmup", (train.warmup_steps, 1e-3), xytext=(40, 8e-4), arrowprops={"arrowstyle": "->"})
    axes.axhline(train.min_learning_rate, color="grey", linestyle="--", linewidth=1)
    axes.text(200, train.min_learning_rate + 1e-4, "floor: min_learning_rate")
    axes.set(xlabel="step", ylabel="learning rate", title="Warmup, then cosine decay (chapter 5)")
    figure.tight_layout()
    save(figure, "lr_schedule")


def loss_curves(workdir: Path) -> None:
    """Chapter 6's first run, 600 steps of `tiny` at 3e-3: the plot the library itself draws."""
    trainer = train_tiny(workdir, "lr-3e-3", **{"train.max_steps": 600, "train.save_steps": 600, "train.eval_steps": 100,
                                                 "train.log_steps": 20, "train.plot_loss": True})
    shutil.copyfile(trainer.run_dir / "plots" / "loss_curve_latest.png", HERE / "loss_curve.png")
    print(f"wrote {HERE / 'loss_curve.png'}")


def writer_figures(workdir: Path) -> None:
    """Chapter 7's model (`tiny`, 400 steps): its attention weights (chapter 3) and its sampling distributions (chapter 7)."""
    trainer = train_tiny(workdir, "writer", **{"train.max_steps": 400, "train.eval_steps": 400, "train.save_steps": 400})
    model, tokenizer = trainer.model.eval(), trainer.tokenizer
    attention_heads(model, tokenizer)
    sampling_temperatures(model, tokenizer)


def attention_heads(model, tokenizer) -> None:
    """The first layer's attention weights on one sentence, computed by hand and checked against the layer."""
    ids = torch.tensor([[tokenizer.eos_id] + tokenizer.encode(SENTENCE)])
    labels = ["<eos>"] + [tokenizer.decode([index]) for index in ids[0, 1:].tolist()]
    block, time = model.blocks[0], ids.size(1)
    attention, config = block.attention, model.config
    cos, sin = model.rotary(torch.arange(time), "full_attention")
    with torch.no_grad():
        x = block.attention_norm(model.token_embedding(ids))
        q = attention.q_proj(x).view(1, time, config.n_head, config.head_dim).transpose(1, 2)
        k = attention.k_proj(x).view(1, time, config.kv_heads, config.head_dim).transpose(1, 2)
        v = attention.v_proj(x).view(1, time, config.kv_heads, config.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        group = config.n_head // config.kv_heads  # query heads per key/value head
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        mask = torch.ones(time, time, dtype=torch.bool).tril()
        weights = torch.softmax((q @ k.transpose(-2, -1) / math.sqrt(config.head_dim)).masked_fill(~mask, float("-inf")), dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(1, time, -1)
        assert torch.allclose(attention.o_proj(mixed), attention(x, cos, sin), atol=1e-5)  # the weights drawn are the layer's
    figure = Figure(figsize=(12, 4.2))
    for head in range(config.n_head):
        axes = figure.add_subplot(1, config.n_head, head + 1)
        axes.imshow(weights[0, head].numpy(), cmap="Blues", vmin=0, vmax=1)
        axes.set_xticks(range(time), labels, rotation=90, fontsize=7)
        axes.set_yticks(range(time), labels if head == 0 else [], fontsize=7)
        axes.set_title(f"layer 0, head {head}", fontsize=9)
    figure.suptitle("Attention weights of a trained tiny model: row = query token, column = key token", fontsize=10)
    figure.tight_layout()
    save(figure, "attention_heads")


def sampling_temperatures(model, tokenizer) -> None:
    """Chapter 7's next-token distribution after "The", at three temperatures and under top-k and top-p."""
    prompt = torch.tensor([tokenizer.eos_id] + tokenizer.encode("The"))
    with torch.no_grad():
        logits = model(prompt.view(1, -1))[0][0, -1]
    order = torch.argsort(logits, descending=True)[:20]
    names = [repr(tokenizer.decode([index]))[1:-1] or "?" for index in order.tolist()]
    settings = [("temperature 0.5", {"temperature": 0.5}), ("temperature 1", {}), ("temperature 2", {"temperature": 2.0}),
                ("top-k 10", {"top_k": 10}), ("top-p 0.5", {"top_p": 0.5})]
    figure = Figure(figsize=(12, 6))
    for panel, (title, options) in enumerate(settings):
        distribution = next_token_distribution(logits, prompt, SamplingConfig(**options))
        axes = figure.add_subplot(2, 3, panel + 1)
        axes.bar(range(len(order)), distribution[order].numpy(), color="tab:blue")
        axes.set_xticks(range(len(order)), names, rotation=90, fontsize=7)
        axes.set_ylim(0, 0.55)
        kept = int((distribution > 0).sum())
        axes.set_title(f"{title}: {kept} tokens possible", fontsize=9)
    figure.suptitle('Next-token probabilities after "The": the 20 most likely tokens of 512', fontsize=10)
    figure.tight_layout()
    save(figure, "sampling_distributions")


def block_shapes(workdir: Path) -> None:
    """The path of a batch through the model, with each tensor's shape, for chapter 4's configuration."""
    config = ModelConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_kv_head=2, n_embd=128)
    B, T, C, H, KV, D = 2, config.block_size, config.n_embd, config.n_head, config.kv_heads, config.head_dim
    steps = [
        ("token ids", f"({B}, {T})", "white"),
        ("token embedding", f"({B}, {T}, {C})", "#dbe9f6"),
        ("RMSNorm", f"({B}, {T}, {C})", "#f6e7d8"),
        ("attention", f"q ({B}, {H}, {T}, {D}), k and v ({B}, {KV}, {T}, {D})", "#f6e7d8"),
        ("x + attention(...)", f"({B}, {T}, {C})", "#e3f1df"),
        ("RMSNorm", f"({B}, {T}, {C})", "#f6e7d8"),
        ("SwiGLU: silu(gate) * up", f"({B}, {T}, {config.hidden_dim})", "#f6e7d8"),
        ("x + mlp(...)", f"({B}, {T}, {C})", "#e3f1df"),
        ("final RMSNorm", f"({B}, {T}, {C})", "#dbe9f6"),
        ("output head (tied)", f"logits ({B}, {T}, {config.vocab_size})", "#dbe9f6"),
    ]
    figure = Figure(figsize=(7, 7.5))
    axes = figure.add_subplot()
    axes.set_xlim(0, 10)
    axes.set_ylim(-0.5, len(steps))
    axes.axis("off")
    for row, (name, shape, color) in enumerate(steps):
        y = len(steps) - 1 - row
        axes.add_patch(FancyBboxPatch((1, y - 0.3), 8, 0.6, boxstyle="round,pad=0.05", facecolor=color, edgecolor="black"))
        axes.text(1.3, y, name, va="center", fontsize=10, weight="bold")
        axes.text(8.7, y, shape, va="center", ha="right", fontsize=9, family="monospace")
        if row:
            axes.annotate("", (5, y + 0.35), (5, y + 0.65), arrowprops={"arrowstyle": "->"})
    top, bottom = len(steps) - 3, len(steps) - 8  # the block: from the first RMSNorm to the second residual
    axes.add_patch(FancyBboxPatch((0.5, bottom - 0.45), 9, top - bottom + 0.9, boxstyle="round,pad=0.05", fill=False,
                                  linestyle="--", edgecolor="grey"))
    axes.text(0.2, (top + bottom) / 2, f"block, × {config.n_layer}", rotation=90, va="center", color="grey")
    axes.set_title(f"One batch through the GPT of chapter 4 (batch {B}, block {T}, width {C}, {H} heads of {D})", fontsize=10)
    figure.tight_layout()
    save(figure, "block_shapes")


def qk_norm_layers(workdir: Path) -> None:
    """Chapter 17's tiny Qwen3 (weights drawn afresh, as there), loaded by minigpt.families: the largest
    difference from transformers after each layer, as loaded and with the qk_norm switch off."""
    import transformers  # the export extra, as in chapter 17; the other figures need only the core

    from minigpt.families import load_model

    torch.manual_seed(0)
    qwen = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})).eval()
    with torch.no_grad():
        for parameter in qwen.parameters():
            parameter.normal_(1.0, 0.3) if parameter.dim() == 1 else parameter.normal_(0.0, 0.1)
    qwen.save_pretrained(workdir / "qwen3-tiny")
    loaded = load_model(workdir / "qwen3-tiny")
    no_qk_norm = GPT(dataclasses.replace(loaded.config, qk_norm=False)).eval()
    no_qk_norm.load_state_dict({name: tensor for name, tensor in loaded.state_dict().items() if name in no_qk_norm.state_dict()})
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))

    def layer_outputs(model, blocks) -> list[torch.Tensor]:
        outputs = []
        hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
                 for block in blocks]
        with torch.no_grad():
            model(ids)
        for hook in hooks:
            hook.remove()
        return outputs

    reference = layer_outputs(qwen, qwen.model.layers)
    figure = Figure(figsize=(7, 3.4))
    axes = figure.add_subplot()
    for label, model, color in (("as loaded", loaded, "tab:blue"), ("qk_norm off", no_qk_norm, "tab:red")):
        errors = [float((ours - theirs).abs().max()) for ours, theirs in zip(layer_outputs(model, model.blocks), reference)]
        axes.plot(range(len(errors)), errors, marker="o", color=color, label=label)
    axes.set_yscale("log")
    axes.set_xticks(range(len(reference)))
    axes.set(xlabel="layer", ylabel="largest |MiniGPT - transformers|", title="A tiny Qwen3 in MiniGPT's model, layer by layer")
    axes.legend()
    figure.tight_layout()
    save(figure, "qk_norm_layers")


def tokenizer_compression(workdir: Path) -> None:
    """Chapter 1: bytes of text per token as BPE learns more merges, on English it was trained on
    and on the chapter's Chinese sentence, which no merge covers."""
    documents = list(islice(builtin_documents(), 500))
    training, held_out = documents[:400], "".join(documents[400:])
    chinese = "循环按照元素在序列中出现的顺序依次遍历序列中的每一项。"
    sizes = [300, 500, 1000, 2000, 4000]
    rates = {"English, held-out documents": [], "Chinese, the chapter's sentence": []}
    for size in sizes:
        bpe = train_bpe_tokenizer(training, vocab_size=size, show_progress=False)
        for (name, values), text in zip(rates.items(), (held_out, chinese)):
            values.append(len(text.encode("utf-8")) / len(bpe.encode(text)))
    assert all(rate == 1.0 for rate in rates["Chinese, the chapter's sentence"])  # three raw bytes a character, always
    figure = Figure(figsize=(7, 3.4))
    axes = figure.add_subplot()
    for (name, values), color in zip(rates.items(), ("tab:blue", "tab:red")):
        axes.plot(sizes, values, marker="o", color=color, label=name)
    axes.set_xscale("log")
    axes.minorticks_off()
    axes.set_xticks(sizes, [f"{size:,}" for size in sizes])
    axes.set(xlabel="vocabulary size (256 bytes + 4 special tokens + the merges)", ylabel="bytes of text per token",
             title="BPE trained on 400 English documents: what each token carries (chapter 1)")
    axes.legend()
    figure.tight_layout()
    save(figure, "tokenizer_compression")


def packed_batches(workdir: Path) -> None:
    """Chapter 2's corpus packed into blocks by TokenBlockStream, in file order and through a shuffle buffer:
    each cell is a token, coloured by the document it comes from, black where an end-of-text token sits."""
    rng = random.Random(0)  # chapter 2's corpus, written the same way
    words = "model token attention layer batch loss gradient step learn predict sequence data".split()
    texts = [f"Note {index}: " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "." for index in range(2000)]
    corpus = workdir / "notes.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    tokenizer = train_bpe_tokenizer(texts, vocab_size=300, show_progress=False)
    block_size, rows = 32, 8
    stream, documents = [], []  # every token of the corpus in file order, and the document each belongs to
    for number, text in enumerate(texts):
        ids = tokenizer.encode(text) + [tokenizer.eos_id]
        stream += ids
        documents += [number] * len(ids)
    starts = {tuple(stream[start : start + block_size]): start for start in range(0, len(stream) - block_size, block_size)}
    figure = Figure(figsize=(10, 5.2))
    panels = (("in file order", {}), ("through a shuffle buffer of 256 blocks (seed 1)", {"shuffle_buffer": 256, "seed": 1}))
    for panel, (title, options) in enumerate(panels):
        inputs, _ = next(iter(TokenBlockStream([str(corpus)], tokenizer, block_size=block_size, batch_size=rows, loop=False, **options)))
        origin = [starts[tuple(row.tolist())] for row in inputs]  # where in the stream each block was cut (asserts it was)
        owner = np.array([documents[start : start + block_size] for start in origin], dtype=float)
        eos = inputs.numpy() == tokenizer.eos_id
        axes = figure.add_subplot(1, 2, panel + 1)
        axes.imshow(np.ma.masked_where(eos, owner % 10), cmap="tab10", vmin=0, vmax=9, aspect="auto")
        axes.imshow(np.ma.masked_where(~eos, eos), cmap="gray_r", vmin=0, vmax=1, aspect="auto")
        for row in range(rows):
            axes.text(-0.8, row, f"doc {int(owner[row, 0])}", ha="right", va="center", fontsize=8)
        axes.set_yticks([])
        axes.set_xlabel("position in the block (32 tokens)")
        axes.set_title(title, fontsize=10)
    figure.suptitle("One batch of 8 blocks: colour = the document a token comes from, black = the end-of-text token", fontsize=10)
    figure.tight_layout()
    save(figure, "packed_batches")


def token_sizes(workdir: Path) -> None:
    """Chapter 8's two tokenizers on its validation text: how many bytes of text each token stands for
    (`token_byte_lengths`), the reason a loss per token does not compare them and bits per byte does."""
    documents = list(islice(builtin_documents(), 330))
    validation = "".join(documents[300:])
    tokenizers = {"BPE, 512 tokens": train_bpe_tokenizer(documents[:300], vocab_size=512, show_progress=False),
                  "characters": train_char_tokenizer(documents[:300], show_progress=False)}
    figure = Figure(figsize=(7, 3.4))
    axes = figure.add_subplot()
    sizes, widest = {}, 8  # tokens of 8 bytes or more share the last bar
    for name, tokenizer in tokenizers.items():
        lengths = np.array(tokenizer.token_byte_lengths())[tokenizer.encode(validation)]
        assert lengths.sum() == len(validation.encode("utf-8"))  # every byte of the text, once
        sizes[name] = lengths
    bins = np.arange(1, widest + 2) - 0.5
    for (name, lengths), color in zip(sizes.items(), ("tab:blue", "tab:orange")):
        axes.hist(np.minimum(lengths, widest), bins=bins, weights=np.full(len(lengths), 1 / len(lengths)), color=color, alpha=0.6,
                  label=f"{name}: {len(lengths):,} tokens, {lengths.mean():.2f} bytes each on average")
    axes.set_xticks(range(1, widest + 1), [*map(str, range(1, widest)), f"{widest}+"])
    axes.set(xlabel="bytes of text one token stands for", ylabel="share of the tokens",
             title=f"The same {len(validation.encode('utf-8')):,} bytes of validation text, two tokenizers (chapter 8)")
    axes.title.set_fontsize(10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    save(figure, "token_sizes")


def flops_per_token(workdir: Path) -> None:
    """Chapter 9: where a training step's multiplies go, per preset, from each model's own matrices."""
    names, parts = ["tiny", "small", "medium", "large"], {}
    for name in names:
        preset = preset_config(name)
        with torch.device("meta"):  # shapes only, no memory
            model = GPT(dataclasses.replace(preset.model, vocab_size=preset.train.tokenizer_vocab_size))
        config = model.config
        linear = {module_name: module.weight.numel() for module_name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        shares = {
            "attention projections (q, k, v, o)": 6 * sum(n for key, n in linear.items() if ".attention." in key),
            "attention scores (q·k, weights·v)": 12 * config.n_layer * config.block_size * config.n_head * config.head_dim,
            "feed-forward (SwiGLU)": 6 * sum(n for key, n in linear.items() if ".mlp." in key),
            "output head": 6 * sum(n for key, n in linear.items() if not key.startswith("blocks.")),
        }
        assert sum(shares.values()) == model.flops_per_token()  # the parts add up to the library's count
        parts[name] = (shares, model.flops_per_token())
    figure = Figure(figsize=(8, 4.4))
    axes = figure.add_subplot()
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:grey"]
    for row, name in enumerate(names):
        shares, total = parts[name]
        left = 0.0
        for (part, flops), color in zip(shares.items(), colors):
            axes.barh(row, flops / total, left=left, color=color, label=part if row == 0 else None)
            left += flops / total
        axes.text(1.01, row, f"{total / 1e6:,.1f} MFLOPs/token", va="center", fontsize=8)
    axes.set_yticks(range(len(names)), names)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.25)
    axes.set(xlabel="share of the training FLOPs of one token (forward + backward)",
             title="Where a step's multiplies go, preset by preset (chapter 9)")
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.45, -0.2), ncol=2)
    figure.tight_layout()
    save(figure, "flops_per_token")


def learning_rate_drills(workdir: Path) -> None:
    """Chapter 10's drills: the same tiny run at a sane learning rate, at 5 with clipping off, and at 1e-6,
    with the anomalies the monitor wrote into metrics.jsonl."""
    runs = [("3e-3", " (the preset's)", {"train.learning_rate": 3e-3}),
            ("5", ", clipping off", {"train.learning_rate": 5.0, "train.min_learning_rate": 5.0, "train.grad_clip": 0.0}),
            ("1e-6", "", {"train.learning_rate": 1e-6, "train.min_learning_rate": 1e-7})]
    figure = Figure(figsize=(10, 3.8))
    loss_axes, norm_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    findings = []
    for (rate, note, settings), color in zip(runs, ("tab:blue", "tab:red", "tab:grey")):
        trainer = train_tiny(workdir, f"drill-{color}", **{"train.max_steps": 70, "train.warmup_steps": 0, "train.log_steps": 1,
                                                           "train.eval_steps": 1000, "train.save_steps": 1000, **settings})
        rows = read_metrics(trainer.run_dir / "metrics.jsonl")
        train = [row for row in rows if row["type"] == "train"]
        steps = [row["step"] for row in train]
        loss_axes.plot(steps, [row["loss"] for row in train], color=color, label=f"learning rate {rate}{note}")
        norm_axes.plot(steps, [row["grad_norm"] for row in train], color=color)
        loss_at = {row["step"]: row["loss"] for row in train}
        # throughput_drop and memory_pressure left out: they say how busy the machine was, not how the run went
        anomalies = [row for row in rows if row["type"] == "anomaly" and row["step"] in loss_at
                     and row["kind"] not in ("throughput_drop", "memory_pressure")]
        loss_axes.plot([row["step"] for row in anomalies], [loss_at[row["step"]] for row in anomalies], "x", color="black")
        found = {}
        for anomaly in anomalies:
            found.setdefault(anomaly["kind"], []).append(str(anomaly["step"]))
        if found:
            findings.append((f"learning rate {rate}: " + "; ".join(f"{kind} at step {', '.join(at)}" for kind, at in found.items()), color))
    for line, (text, color) in enumerate(findings):  # in the empty band between the runs' losses
        loss_axes.text(0.03, 0.45 - 0.07 * line, text, transform=loss_axes.transAxes, fontsize=7, color=color)
    loss_axes.set_yscale("log")
    loss_axes.set(xlabel="step", ylabel="training loss (log scale)", title="Loss; × = an anomaly the monitor reported")
    loss_axes.legend(fontsize=8)
    norm_axes.set_yscale("log")
    norm_axes.set(xlabel="step", ylabel="gradient norm (log scale)", title="Gradient norm")
    figure.tight_layout()
    save(figure, "learning_rate_drills")


def conversation_mask(workdir: Path) -> None:
    """Chapter 11: the tokens of one ChatML conversation, and which of them the model learns to predict."""
    tokenizer = train_bpe_tokenizer(islice(builtin_documents(), 300), vocab_size=512, show_progress=False)
    conversation = [{"role": "system", "content": "You answer in one sentence."},
                    {"role": "user", "content": "What does len do?"},
                    {"role": "assistant", "content": "It returns the number of items."}]
    ids, mask = tokenizer.render_chat(conversation)
    pieces = [tokenizer.decode([token]) for token in ids]
    figure = Figure(figsize=(8, 3.6))
    axes = figure.add_subplot()
    axes.axis("off")
    x, y, line_height = 0.0, 0.0, 1.0
    for piece, learned in zip(pieces, mask):
        shown = piece.replace("\n", "\\n")
        width = 0.12 * len(shown) + 0.15
        if x + width > 12:
            x, y = 0.0, y - line_height
        axes.add_patch(FancyBboxPatch((x, y - 0.3), width - 0.05, 0.6, boxstyle="round,pad=0.02",
                                      facecolor="#9ecae1" if learned else "#eeeeee", edgecolor="grey", linewidth=0.5))
        axes.text(x + (width - 0.05) / 2, y, shown, ha="center", va="center", fontsize=8, family="monospace")
        x += width
        if piece.endswith("\n"):
            x, y = 0.0, y - line_height
    axes.set_xlim(-0.2, 12.2)
    axes.set_ylim(y - 1.8, 0.6)
    axes.add_patch(FancyBboxPatch((0, y - 1.0), 0.4, 0.4, facecolor="#9ecae1", edgecolor="grey", boxstyle="round,pad=0.02"))
    axes.text(0.55, y - 0.8, f"mask True: a target the loss counts ({sum(mask)} of {len(ids)} tokens)", va="center", fontsize=9)
    axes.add_patch(FancyBboxPatch((0, y - 1.6), 0.4, 0.4, facecolor="#eeeeee", edgecolor="grey", boxstyle="round,pad=0.02"))
    axes.text(0.55, y - 1.4, "mask False: context only, its label becomes -100", va="center", fontsize=9)
    axes.set_title("A conversation rendered by Tokenizer.render_chat: one box per token (chapter 11)", fontsize=10)
    figure.tight_layout()
    save(figure, "conversation_mask")


def classifier_confusion(workdir: Path) -> None:
    """Chapter 12's exercise 1: the skewed sentiment set trained without and with balanced class weights,
    the confusion matrices of each run's first and last evaluation, from its metrics.jsonl."""
    from minigpt.cli import train_classifier

    nouns = ["soup", "match", "hotel", "trip", "bread", "team", "beach", "train", "dinner", "goal", "room", "view"]
    records = []
    for number in range(300):
        positive = number % 10 != 0
        topic_words = " ".join(nouns[(number * k + k) % 12] for k in (1, 3, 5, 7))
        records.append({"text": f"{topic_words} {'good' if positive else 'bad'} {number}",
                        "sentiment_labels": "positive" if positive else "negative"})
    data = workdir / "skewed.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    figure = Figure(figsize=(8, 7))
    for run, weights in enumerate(("none", "balanced")):
        assert train_classifier.main([
            "--data-files", str(data), "--val-fraction", "0.3", "--run-name", f"skewed-{weights}", "--max-steps", "60",
            "--eval-steps", "10", "--save-steps", "60", "--learning-rate", "0.003", "--class-weights", weights, "--pooling", "mean",
            "--block-size", "32", "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=2",
            "--vocab-size", "300", "--batch-size", "16", "--lm-loss-weight", "0", "--max-time", "0", "--dtype", "float32",
            "--disable-monitoring", "--output-dir", str(workdir)]) == 0
        evaluations = [row for row in read_metrics(workdir / f"skewed-{weights}" / "metrics.jsonl") if row["type"] == "eval"]
        for column, row in enumerate((evaluations[0], evaluations[-1])):
            axes = figure.add_subplot(2, 2, 2 * run + column + 1)
            draw_confusion_matrix(axes, row["tasks"]["sentiment"]["confusion"], ["negative", "positive"],
                                  f"class weights {weights}, step {row['step']}:\naccuracy {row['sentiment_accuracy']:.2f}, "
                                  f"macro-F1 {row['sentiment_f1_macro']:.2f}")
            axes.title.set_fontsize(9)
    figure.suptitle("90% positive reviews, the first and last evaluation of each run\n(row = the truth, shade = share of the row)",
                    fontsize=10)
    figure.tight_layout()
    save(figure, "classifier_confusion")


def export_tensor_map(workdir: Path) -> None:
    """Chapter 13: one layer's tensors under MiniGPT's, Hugging Face's and GGUF's names (minigpt.families.tensor_table),
    and the row order permute_for_gguf gives q (one head of 16 rows shown)."""
    config = ModelConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    rows = [row for row in tensor_table(config) if not row.minigpt.startswith("blocks.1.")]
    figure = Figure(figsize=(12, 3.8))
    axes = figure.add_axes((0.01, 0.02, 0.72, 0.9))
    axes.axis("off")
    cells = [[row.minigpt, row.hf, row.gguf + ("  (rows permuted)" if row.gguf.endswith(("attn_q.weight", "attn_k.weight")) else ""),
              " × ".join(map(str, row.shape))] for row in rows]
    table = axes.table(cellText=cells, colLabels=["MiniGPT", "Hugging Face (safetensors)", "GGUF (llama.cpp)", "shape"],
                       loc="upper center", cellLoc="left", colLoc="left", colWidths=[0.3, 0.36, 0.26, 0.08])
    table.auto_set_font_size(False)
    table.set_fontsize(7.5)
    table.scale(1, 1.5)
    for (row, column), cell in table.get_celld().items():
        if row == 0:
            cell.set_facecolor("#dddddd")
        elif "permuted" in cells[row - 1][2]:
            cell.set_facecolor("#fde0c5")
    axes.set_title(f"Every tensor of the chapter-13 model but layer 1's ({config.n_layer} layers, {config.n_head} query heads, "
                   f"{config.kv_heads} key/value heads of {config.head_dim})", fontsize=9)
    order = permute_for_gguf(torch.arange(config.n_embd, dtype=torch.float32).view(-1, 1), heads=config.n_head).flatten()
    head = config.head_dim
    permutation_axes = figure.add_axes((0.79, 0.14, 0.19, 0.74))
    permutation_axes.plot(order[:head].numpy(), range(head), marker="o", markersize=3, color="tab:orange")
    permutation_axes.set(xlabel="row in MiniGPT / Hugging Face", ylabel="row in GGUF", title="q's rows, head 0")
    permutation_axes.invert_yaxis()
    permutation_axes.title.set_fontsize(9)
    save(figure, "export_tensor_map")


def ddp_gradients(workdir: Path) -> None:
    """Chapter 14: its batch split over two processes. What all_reduce adds up, against one process on the whole
    batch, when each process divides by the whole batch's count and when it takes its own mean (the mean of means)."""
    shape = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
    tokens = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    targets[:2, :2] = IGNORE_INDEX
    targets[2:, :14] = IGNORE_INDEX
    torch.manual_seed(0)
    model = GPT(shape)

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return torch.cat([parameter.grad.flatten() for parameter in model.parameters()])

    alone = gradient(model(inputs, targets)[1])
    shards = list(zip(inputs.chunk(2), targets.chunk(2)))
    counts = [int((shard_targets != IGNORE_INDEX).sum()) for _, shard_targets in shards]
    total = sum(counts)
    right = sum(gradient(model(x, y, loss_reduction="sum")[1] / total) for x, y in shards)  # what all_reduce sums
    mean_of_means = sum(gradient(model(x, y, loss_reduction="sum")[1] / count / 2) for (x, y), count in zip(shards, counts))
    assert torch.allclose(right, alone, atol=1e-6) and counts == [28, 4]
    figure = Figure(figsize=(10, 4))
    weights_axes, gradient_axes = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    positions = np.arange(total)
    rank = np.array([0] * counts[0] + [1] * counts[1])
    weights_axes.bar(positions, np.full(total, 1 / total), color="tab:blue", alpha=0.5, label="divided by the whole count: 1/32 each")
    weights_axes.step(positions, np.where(rank == 0, 1 / (2 * counts[0]), 1 / (2 * counts[1])), where="mid", color="tab:red",
                      label="mean of the two means: 1/56 and 1/8")
    weights_axes.axvline(counts[0] - 0.5, color="grey", linestyle=":")
    weights_axes.text(counts[0] / 2, 0.115, f"rank 0: {counts[0]} targets", ha="center", fontsize=8)
    weights_axes.text(counts[0] + counts[1] / 2, 0.13, f"rank 1:\n{counts[1]}", ha="center", fontsize=8)
    weights_axes.set(xlabel="the batch's 32 counted targets", ylabel="weight in the step's loss", ylim=(0, 0.15),
                     title="What each target weighs")
    weights_axes.legend(fontsize=8, loc="center left")
    limit = float(alone.abs().max()) * 1.1
    gradient_axes.plot([-limit, limit], [-limit, limit], color="grey", linewidth=0.8)
    gradient_axes.scatter(alone, mean_of_means, s=4, color="tab:red", label="mean of means")
    gradient_axes.scatter(alone, right, s=4, color="tab:blue", label="divided by the whole count")
    gradient_axes.set(xlabel="gradient entry, one process on the whole batch", ylabel="sum of the two processes' gradients",
                      title=f"All {len(alone):,} gradient entries after all_reduce")
    gradient_axes.legend(fontsize=8)
    figure.suptitle("Chapter 14's batch over two processes: 28 counted targets on rank 0, 4 on rank 1", fontsize=10)
    figure.tight_layout()
    save(figure, "ddp_gradients")


def continuous_batching(workdir: Path) -> None:
    """Chapter 15: six requests arriving over time on one Engine, admitted between steps up to 3 rows, as the Batcher does.
    Greedy decoding and no stop ids, so each request makes exactly its max_new_tokens."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=64, block_size=64, n_layer=1, n_head=2, n_embd=32)).eval()
    engine, max_rows = Engine(model), 3
    arrivals = [(0, 14), (0, 6), (2, 9), (4, 12), (5, 4), (9, 8)]  # (step it arrives at, tokens it asks for)
    queue, started, running, done, steps = [], {}, {}, {}, 0
    while len(done) < len(arrivals):
        queue += [request for request, (arrival, _) in enumerate(arrivals) if arrival == steps]
        while queue and len(engine.rows) + len(engine.pending) < max_rows:  # between two steps: let the queue in
            request = queue.pop(0)
            row = engine.add(Request([0], SamplingConfig(max_new_tokens=arrivals[request][1], temperature=0)))
            running[row], started[request] = request, steps
        for event in engine.step():
            if event.finish:
                done[running.pop(event.row)] = steps + 1
        steps += 1
    figure = Figure(figsize=(9, 3.6))
    axes = figure.add_subplot()
    for request, (arrival, tokens) in enumerate(arrivals):
        if started[request] > arrival:
            axes.barh(request, started[request] - arrival, left=arrival, color="#eeeeee", edgecolor="grey", hatch="//")
        axes.barh(request, done[request] - started[request], left=started[request], color="tab:blue")
        assert done[request] - started[request] == tokens  # one token a step, never paused
        axes.text(done[request] + 0.2, request, f"{tokens} tokens", va="center", fontsize=8)
    axes.set_yticks(range(len(arrivals)), [f"request {request} (arrives at step {arrival})" for request, (arrival, _) in enumerate(arrivals)],
                    fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0, steps + 4)
    axes.set(xlabel="engine step", title=f"Continuous batching, at most {max_rows} rows: blue = decoding, hatched = waiting in the queue")
    axes.title.set_fontsize(10)
    figure.tight_layout()
    save(figure, "continuous_batching")


def preference_curves(workdir: Path) -> None:
    """Chapter 16's second failure: pure DPO (--rpo-alpha 0, the stage's recipe otherwise) on the built-in preference set,
    from a tiny chat model (pretrained, then chat-tuned on the built-in chat set); the run's own --plot-loss figure."""
    from minigpt.cli import train

    base = train_tiny(workdir, "base", **{"train.max_steps": 300, "train.eval_steps": 1000, "train.save_steps": 1000})
    common = ["--output-dir", str(workdir), "--dtype", "float32", "--save-steps", "1000", "--max-time", "0"]
    assert train.main(["--stage", "sft", "--init-from", str(base.run_dir / "final_model"), "--run-name", "chat",
                       "--max-steps", "300", "--eval-steps", "1000", "--sample-tokens", "0", *common]) == 0
    assert train.main(["--stage", "dpo", "--init-from", str(workdir / "chat" / "final_model"), "--run-name", "pure-dpo",
                       "--rpo-alpha", "0", "--max-steps", "150", "--plot-loss", *common]) == 0
    shutil.copyfile(workdir / "pure-dpo" / "plots" / "preference_curves_latest.png", HERE / "preference_curves.png")
    print(f"wrote {HERE / 'preference_curves.png'}")


# ------------------------------------------------------------------------------------------------
# Chapters 18-21 (backpropagation, initialisation, memory, LoRA): each figure recomputes what its
# chapter computes, on the same tiny tensors, from the library's own modules.


def finite_differences(workdir: Path) -> None:
    """Chapter 18: the largest gap between autograd's gradient of RMSNorm and a central finite
    difference, against the step h, in float32 and float64."""
    from minigpt.model import RMSNorm

    steps = [10.0 ** -(power / 2) for power in range(2, 25)]
    figure = Figure(figsize=(7, 3.4))
    axes = figure.add_subplot()
    for dtype, color in ((torch.float32, "tab:red"), (torch.float64, "tab:blue")):
        generator = torch.Generator().manual_seed(0)
        x, gain, upstream = (torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in ((3, 8), (8,), (3, 8)))
        norm = RMSNorm(8, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(gain)
        x.requires_grad_(True)
        (norm(x) * upstream).sum().backward()
        errors = []
        for h in steps:
            nudges = torch.eye(x.numel(), dtype=dtype).view(-1, 3, 8) * h
            with torch.no_grad():
                slopes = ((norm(x + nudges) - norm(x - nudges)) * upstream).sum((-2, -1)) / (2 * h)
            errors.append(float((slopes.view_as(x) - x.grad).abs().max()))
        axes.loglog(steps, errors, marker="o", markersize=3, color=color, label=str(dtype).replace("torch.", ""))
    axes.invert_xaxis()
    axes.set(xlabel="step h (smaller to the right)", ylabel="largest |finite difference - autograd|",
             title="Checking RMSNorm's gradient by finite differences (chapter 18)")
    axes.legend()
    figure.tight_layout()
    save(figure, "finite_differences")


def initialisation_statistics(workdir: Path) -> None:
    """Chapter 19: per layer of a 4-layer, width-64 GPT, the residual stream's root mean square, the
    mean largest attention weight (rows from position 8 on) and the SwiGLU gate input's root mean
    square, for the library's initialisation and for every matrix drawn with a spread of 1."""
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(1))
    panels = {"residual stream (RMS)": {}, "largest attention weight": {}, "gate input (RMS)": {}}
    for init in ("library", "std 1"):
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=512, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=64))
        if init == "std 1":
            with torch.no_grad():
                for parameter in model.parameters():
                    if parameter.dim() == 2:
                        parameter.normal_(0.0, 1.0)
        streams, received, gates = [], [], []
        for block in model.blocks:
            block.register_forward_hook(lambda module, args, out: streams.append(out))
            block.attention.register_forward_hook(lambda module, args, out: received.append(args))
            block.mlp.gate_proj.register_forward_hook(lambda module, args, out: gates.append(out))
        peaks = []
        with torch.no_grad():
            model(tokens)
            for block, (x, cos, sin) in zip(model.blocks, (args[:3] for args in received)):
                attention, (batch, time, _) = block.attention, x.shape
                q = attention.q_proj(x).view(batch, time, attention.n_head, attention.head_dim).transpose(1, 2)
                k = attention.k_proj(x).view(batch, time, attention.n_kv_head, attention.head_dim).transpose(1, 2)
                q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin).repeat_interleave(attention.n_head // attention.n_kv_head, 1)
                scores = (q @ k.transpose(-2, -1) / math.sqrt(attention.head_dim)).masked_fill(
                    ~torch.ones(time, time).tril().bool(), float("-inf"))
                peaks.append(float(torch.softmax(scores, -1).amax(-1)[..., 8:].mean()))
        panels["residual stream (RMS)"][init] = [float(s.pow(2).mean().sqrt()) for s in streams]
        panels["largest attention weight"][init] = peaks
        panels["gate input (RMS)"][init] = [float(g.pow(2).mean().sqrt()) for g in gates]
    figure = Figure(figsize=(9, 3.2))
    for index, (title, lines) in enumerate(panels.items(), start=1):
        axes = figure.add_subplot(1, 3, index)
        for init, color in (("library", "tab:blue"), ("std 1", "tab:red")):
            axes.plot(range(1, 5), lines[init], marker="o", color=color, label=init)
        if "RMS" in title:
            axes.set_yscale("log")
        else:
            axes.set_ylim(0, 1.05)
        axes.set(xlabel="layer", title=title)
        axes.set_xticks(range(1, 5))
    axes.legend()
    figure.suptitle("A GPT at birth: the library's initialisation against a spread of 1 (chapter 19)", fontsize=10)
    figure.tight_layout()
    save(figure, "initialisation_statistics")


def memory_breakdown(workdir: Path) -> None:
    """Chapter 20: minigpt.memory's estimate for tiny, small and medium at their preset
    micro-batches (float32, CPU), term by term, with and without gradient checkpointing."""
    from minigpt.memory import estimate_memory

    figure = Figure(figsize=(9, 3.6))
    terms = (("weights", "tab:blue"), ("gradients", "tab:cyan"), ("optimizer state", "tab:green"), ("activations", "tab:orange"),
             ("loss backward", "tab:red"))
    for index, preset in enumerate(("tiny", "small", "medium"), start=1):
        config = preset_config(preset)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=config.train.tokenizer_vocab_size))
        with torch.device("meta"):
            model = GPT(config.model)
        estimate = estimate_memory(model, config, config.train.batch_size, torch.float32, torch.device("cpu"))
        axes = figure.add_subplot(1, 3, index)
        for column, checkpointing in enumerate((False, True)):
            values = {"weights": estimate.weights, "gradients": estimate.gradients, "optimizer state": estimate.optimizer_state,
                      "activations": estimate.activations_checkpointed if checkpointing else estimate.activations,
                      "loss backward": estimate.loss_gradients}
            bottom = 0.0
            for name, color in terms:
                axes.bar(column, values[name] / 1e6, bottom=bottom, color=color, label=name if column == 0 else None)
                bottom += values[name] / 1e6
        axes.set_xticks([0, 1], ["as is", "checkpointing"])
        axes.set(ylabel="MB" if index == 1 else None,
                 title=f"{preset}: {config.train.batch_size} x {config.model.block_size} tokens", )
    axes.legend(fontsize=8)
    figure.suptitle("What a training step holds, float32 (chapter 20; the process and the heap's slack left out)", fontsize=10)
    figure.tight_layout()
    save(figure, "memory_breakdown")


def lora_decomposition(workdir: Path) -> None:
    """Chapter 21: the shapes of a LoRA layer, and the size of the output's change after one AdamW
    step against the rank, for the scales alpha, alpha / r and alpha / sqrt(r)."""
    import torch.nn as nn

    from minigpt.lora import LoRALinear

    figure = Figure(figsize=(10, 3.8))
    axes = figure.add_subplot(1, 2, 1)
    axes.set_xlim(0, 10)
    axes.set_ylim(0, 6)
    axes.axis("off")
    rank = 4
    for x, y, width, height, color, name, shape in ((0.3, 1.2, 4.0, 4.0, "#dddddd", "W", "64 x 64, frozen: 4,096"),
                                                    (5.4, 1.2, 0.6, 4.0, "#f6c89f", "B", "64 x 4: 256"),
                                                    (6.6, 4.7, 3.2, 0.5, "#9fc5f6", "A", "4 x 64: 256")):
        axes.add_patch(FancyBboxPatch((x, y), width, height, boxstyle="square,pad=0", facecolor=color, edgecolor="black"))
        axes.text(x + width / 2, y + height / 2, name, ha="center", va="center", fontsize=11, weight="bold")
        axes.text(x + width / 2, y - 0.3, shape, ha="center", va="center", fontsize=8)
    axes.text(4.85, 3.2, "+", fontsize=16, ha="center", va="center")
    axes.text(6.3, 4.95, "x", fontsize=12, ha="center", va="center")
    axes.text(5, 0.3, f"y = W x + (alpha / r) B (A x): {rank * (64 + 64):,} trainable at r = {rank}", ha="center", fontsize=9)
    axes.set_title("A LoRA layer (B starts at zero)", fontsize=10)

    def first_step_change(rank: int, scale: float) -> float:  # as chapter 21 measures it
        torch.manual_seed(0)
        adapter = LoRALinear(nn.Linear(64, 64, bias=False), rank=rank, alpha=16.0, dropout=0.0)
        adapter.scale = scale
        inputs, targets = torch.randn(32, 64), torch.randn(32, 64)
        with torch.no_grad():
            before = adapter(inputs)
        optimizer = torch.optim.AdamW([adapter.lora_A.weight, adapter.lora_B.weight], lr=1e-3, weight_decay=0.0)
        ((adapter(inputs) - targets) ** 2).mean().backward()
        optimizer.step()
        with torch.no_grad():
            return float((adapter(inputs) - before).pow(2).mean().sqrt())

    ranks = [1, 2, 4, 8, 16, 32, 64]
    axes = figure.add_subplot(1, 2, 2)
    for name, scale, color in (("alpha", lambda r: 16.0, "tab:red"), ("alpha / r", lambda r: 16.0 / r, "tab:blue"),
                               ("alpha / sqrt(r)", lambda r: 16.0 / math.sqrt(r), "tab:green")):
        axes.loglog(ranks, [first_step_change(r, scale(r)) for r in ranks], marker="o", color=color, label=f"scale = {name}")
    axes.set(xlabel="rank r", ylabel="RMS change of the output", title="After one AdamW step (alpha 16, lr 1e-3)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    save(figure, "lora_decomposition")


FIGURES = {"lr_schedule": lr_schedule, "loss_curves": loss_curves, "writer": writer_figures, "block_shapes": block_shapes,
           "qk_norm_layers": qk_norm_layers, "tokenizer_compression": tokenizer_compression, "packed_batches": packed_batches,
           "token_sizes": token_sizes, "flops_per_token": flops_per_token, "learning_rate_drills": learning_rate_drills, "conversation_mask": conversation_mask,
           "classifier_confusion": classifier_confusion, "export_tensor_map": export_tensor_map, "ddp_gradients": ddp_gradients,
           "continuous_batching": continuous_batching, "preference_curves": preference_curves,
           "finite_differences": finite_differences, "initialisation_statistics": initialisation_statistics,
           "memory_breakdown": memory_breakdown, "lora_decomposition": lora_decomposition}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        for name in names or FIGURES:
            FIGURES[name](Path(workdir))


if __name__ == "__main__":
    main(sys.argv[1:])
