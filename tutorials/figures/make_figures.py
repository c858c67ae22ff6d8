"""Draw the figures the tutorial chapters show, from the library's own code.

    python tutorials/figures/make_figures.py            # all figures, into tutorials/figures/
    python tutorials/figures/make_figures.py lr_schedule block_shapes   # only these

Each figure is computed from MiniGPT itself (the schedule from `learning_rate_at`, the loss
curves by `minigpt.plots` from a real run, attention and sampling from a model trained the way
chapter 7 trains it), so when the library changes, running this again keeps the pictures true.
The runs go in a temporary directory; only the PNGs are kept. About a minute on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

from minigpt.config import ModelConfig, TrainConfig, apply_overrides, preset_config
from minigpt.generation import SamplingConfig, next_token_distribution
from minigpt.model import GPT, apply_rotary
from minigpt.optim import learning_rate_at
from minigpt.run import prepare_run

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


def writer(workdir: Path):
    """Chapter 7's model: `tiny`, 400 steps."""
    trainer = train_tiny(workdir, "writer", **{"train.max_steps": 400, "train.eval_steps": 400, "train.save_steps": 400})
    return trainer.model.eval(), trainer.tokenizer


def writer_figures(workdir: Path) -> None:
    """Chapter 7's model: its attention weights (chapter 3) and its sampling distributions (chapter 7)."""
    model, tokenizer = writer(workdir)
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


FIGURES = {"lr_schedule": lr_schedule, "loss_curves": loss_curves, "writer": writer_figures, "block_shapes": block_shapes,
           "qk_norm_layers": qk_norm_layers}


def main(names: list[str]) -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        for name in names or FIGURES:
            FIGURES[name](Path(workdir))


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


FIGURES.update({"finite_differences": finite_differences, "initialisation_statistics": initialisation_statistics,
                "memory_breakdown": memory_breakdown, "lora_decomposition": lora_decomposition})


if __name__ == "__main__":
    main(sys.argv[1:])
