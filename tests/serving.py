"""What the server's tests share: a tiny chat model that knows its replies by heart, and a server
on a free loopback port for one test module."""

from __future__ import annotations

from pathlib import Path

import torch

from minigpt.config import ModelConfig, RunConfig
from minigpt.loss import IGNORE_INDEX
from minigpt.model import GPT
from minigpt.model_folder import save_model_directory
from minigpt.tokenizer import Tokenizer

# What the memorising model answers (at temperature 0) to each message, system prompt or not (and to
# the second message after the first exchange).
REPLIES = {
    "Say hi": "Hi! <script>document.title='x'</script> I am MiniGPT.",
    "你好": "你好！我是 MiniGPT。",
    "Count": "one two three four five six seven eight nine ten eleven twelve",
}


def memorising_chat_model(directory: Path, tokenizer: Tokenizer, steps: int = 80) -> Path:
    """A chat model overfit on `REPLIES` (a second or two on a CPU), saved as a final_model/ folder.

    A random model's text is noise; one that knows its replies lets the tests say exactly what
    must come back: whole replies, stop strings, a <script> shown as text, Chinese.
    """
    torch.manual_seed(0)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=64))
    config.train.stage = "sft"
    model = GPT(config.model)
    exchanges = [[{"role": "user", "content": message}, {"role": "assistant", "content": reply}] for message, reply in REPLIES.items()]
    conversations = [system + exchange for exchange in exchanges for system in ([], [{"role": "system", "content": "Be brief."}])]
    conversations.append(exchanges[0] + exchanges[1])  # the page's test goes on to a second message
    rows = [tokenizer.render_chat(conversation) for conversation in conversations]
    width = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), width), tokenizer.pad_id)
    targets = torch.full((len(rows), width), IGNORE_INDEX)
    for row, (ids, mask) in enumerate(rows):
        inputs[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(ids) - 1] = torch.where(torch.tensor(mask[1:]), torch.tensor(ids[1:]), IGNORE_INDEX)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_model_directory(directory, model.eval(), config, tokenizer)
