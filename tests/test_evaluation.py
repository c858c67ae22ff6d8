"""Bits per byte checked against a computation by hand that shares nothing with the library.

The hand computation takes the model's logits, a float64 log-softmax and the text's own UTF-8
bytes (`len(text.encode("utf-8"))`), never the tokenizer's byte table, on text with two-, three-
and four-byte characters, so nats per byte, bits per character or bits per token would all
differ from it.
"""

import math

import pytest
import torch

from minigpt.config import ModelConfig
from minigpt.evaluation import evaluate
from minigpt.loss import IGNORE_INDEX
from minigpt.model import GPT
from minigpt.tokenizer import load_tokenizer, train_char_tokenizer

PROMPT = "Question: what is on the menu? Answer: "  # its targets are ignored, as a chat prompt's are
ANSWER = "Crème brûlée in Zürich, 東京 ramen, and a 🍰 — naïve café food.\n"  # 1-, 2-, 3- and 4-byte characters


def hand_bits_per_byte(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], text: str) -> tuple[float, int]:
    """Summed cross-entropy of the counted targets in nats, / ln 2, / the UTF-8 bytes of `text`; and the counted targets."""
    nats, counted = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches:
            logits, _ = model(inputs)
            log_probabilities = torch.log_softmax(logits.double(), dim=-1)
            for row in range(targets.size(0)):
                for position, target in enumerate(targets[row].tolist()):
                    if target != IGNORE_INDEX:
                        nats -= log_probabilities[row, position, target].item()
                        counted += 1
    return nats / math.log(2) / len(text.encode("utf-8")), counted


@pytest.fixture(params=["bpe", "char"])
def tokenizer(request, tokenizer_file):
    if request.param == "bpe":
        return load_tokenizer(tokenizer_file)  # trained on English: the accents, kanji and emoji are single bytes
    return train_char_tokenizer([PROMPT + ANSWER], show_progress=False)


def test_bits_per_byte_is_summed_nats_over_ln2_over_the_texts_utf8_bytes(tokenizer):
    prompt_ids, answer_ids = tokenizer.encode(PROMPT), tokenizer.encode(ANSWER)
    assert tokenizer.decode(answer_ids) == ANSWER  # the counted targets stand for exactly this text
    ids = torch.tensor([tokenizer.eos_id, *prompt_ids, *answer_ids])
    inputs, targets = ids[:-1].clone(), ids[1:].clone()
    targets[: len(prompt_ids)] = IGNORE_INDEX  # the prompt's tokens: every target before the answer's first token
    half = len(targets) // 2  # two batches of one row each: the totals add up across batches
    batches = [(inputs[None, :half], targets[None, :half]), (inputs[None, half:], targets[None, half:])]

    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, block_size=len(ids), n_layer=1, n_head=2, n_embd=32))
    expected, counted = hand_bits_per_byte(model, batches, ANSWER)
    result = evaluate(model, batches, torch.tensor(tokenizer.token_byte_lengths()))

    assert result.bytes == len(ANSWER.encode("utf-8")) and result.tokens == counted == len(answer_ids)
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert result.loss == pytest.approx(expected * math.log(2) * result.bytes / counted, rel=1e-6)  # nats per counted token
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert len(ANSWER.encode("utf-8")) > len(ANSWER)  # bytes, not characters: the two differ on this text
