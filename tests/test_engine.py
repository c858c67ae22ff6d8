"""The decoding engine and the incremental detokenizer: batching changes the cost, never the tokens or the text."""

import contextlib
import copy
import dataclasses
import logging
from typing import Iterator

import pytest
import torch

import minigpt.engine as engine_module
from minigpt.config import ModelConfig
from minigpt.engine import BatchSampling, Engine, Request, SamplingConfig, next_token_distribution, next_token_probabilities
from minigpt.errors import UserInputError
from minigpt.generation import stream_text
from minigpt.model import GPT
from minigpt.tokenizer import SPECIAL_TOKENS, train_bpe_tokenizer

GREEDY = SamplingConfig(max_new_tokens=12, temperature=0)
SAMPLED = SamplingConfig(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=11)


@pytest.fixture(scope="module")
def model() -> GPT:
    """A tiny random model whose weights are large enough that greedy decoding does not just repeat
    the last token (at the usual 0.02 init a tied embedding makes every token predict itself)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.25)
    return model.eval()


def prompts(*lengths: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(4, 96, (length,), generator=generator).tolist() for length in lengths]


def run(engine: Engine, requests: list[Request]) -> tuple[list[list[int]], list[str]]:
    """Each request's tokens and finish reason, in request order."""
    tokens: dict[int, list[int]] = {}
    finishes: dict[int, str] = {}
    rows = [engine.add(request) for request in requests]
    while engine.has_work:
        for event in engine.step():
            if event.token is not None:
                tokens.setdefault(event.row, []).append(event.token)
            if event.finish:
                finishes[event.row] = event.finish
    return [tokens.get(row, []) for row in rows], [finishes[row] for row in rows]


def alone(model: GPT, request: Request, use_kv_cache: bool = True) -> list[int]:
    return run(Engine(model, use_kv_cache), [request])[0][0]


def test_batched_greedy_equals_one_at_a_time_and_no_cache(model):
    requests = [Request(prompt, dataclasses.replace(GREEDY, max_new_tokens=new))
                for prompt, new in zip(prompts(3, 17, 8, 1), (12, 5, 20, 9))]
    batched, finishes = run(Engine(model), requests)
    assert batched == [alone(model, request) for request in requests]
    assert batched == run(Engine(model, use_kv_cache=False), requests)[0]
    assert [len(tokens) for tokens in batched] == [12, 5, 20, 9] and finishes == ["length"] * 4
    assert len({token for tokens in batched for token in tokens}) > 12  # not a model that repeats one token


def test_cached_logits_equal_a_full_recompute(model):
    """Each step's logits for every row (of different lengths) equal the whole sequence's last logits."""
    requests = [Request(prompt, GREEDY) for prompt in prompts(5, 11, 2)]
    engine = Engine(model)
    for request in requests:
        engine.add(request)
    seen_logits = []
    original = engine._sample_and_finish
    engine._sample_and_finish = lambda logits: (seen_logits.append(logits.clone()), original(logits))[1]
    contexts = [list(request.prompt_ids) for request in requests]
    for _ in range(6):
        events = engine.step()
        with torch.no_grad():
            for row, context in enumerate(contexts):
                full = model(torch.tensor([context]))[0][0, -1]
                torch.testing.assert_close(seen_logits[-1][row], full, atol=1e-4, rtol=1e-4)
                assert full.argmax().item() == events[row].token
        for event in events:
            contexts[event.row].append(event.token)


def test_seeded_rows_sample_the_same_alone_and_in_a_batch(model):
    requests = [Request(prompt, dataclasses.replace(SAMPLED, seed=seed))
                for prompt, seed in zip(prompts(4, 9, 6), (1, 2, 3))]
    requests.append(Request(prompts(7)[0], dataclasses.replace(GREEDY, max_new_tokens=5)))  # a greedy neighbour
    batched, _ = run(Engine(model), requests)
    assert batched == [alone(model, request) for request in requests]
    assert batched[0] != alone(model, Request(requests[0].prompt_ids, dataclasses.replace(SAMPLED, seed=99)))
    unseeded = Request(requests[0].prompt_ids, dataclasses.replace(SAMPLED, seed=None))
    torch.manual_seed(5)
    first = alone(model, unseeded)
    torch.manual_seed(5)
    assert alone(model, unseeded) == first  # no seed: drawn from torch's global generator


def test_an_all_greedy_batch_takes_the_argmax_the_sampling_path_takes(model):
    """With every row greedy the engine skips the distribution and takes the (penalised) argmax;
    beside a sampled row the same greedy rows go through the distribution: the same tokens."""
    greedy = [Request(prompt, dataclasses.replace(GREEDY, repetition_penalty=penalty))
              for prompt, penalty in zip(prompts(6, 2), (1.8, 1.0))]
    all_greedy, _ = run(Engine(model), greedy)
    with_a_sampled_row, _ = run(Engine(model), greedy + [Request(prompts(4)[0], SAMPLED)])
    assert all_greedy == with_a_sampled_row[:2]
    assert all_greedy[0] != alone(model, Request(greedy[0].prompt_ids, GREEDY))  # the penalty counts


@pytest.mark.slow  # compiles the decoding step (a minute or more on 2 cores)
def test_the_compiled_step_decodes_the_eager_tokens():
    """Engine(compile=True) against the eager engine: rows of different lengths, rows that stop or
    run out while others go on, a row joining mid-way, and a Gemma 3-style sliding-window layer."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=96, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.25)
    model.eval()
    requests = [Request(prompt, dataclasses.replace(GREEDY, max_new_tokens=new))
                for prompt, new in zip(prompts(3, 17, 8), (12, 5, 20))]
    stop = alone(model, requests[0])[6]
    requests.append(Request(requests[0].prompt_ids, dataclasses.replace(SAMPLED, stop_ids=(stop,))))

    def staggered(engine: Engine) -> dict[int, list[int | None]]:
        got: dict[int, list[int | None]] = {}
        for request in requests[:3]:
            engine.add(request)
        for step in range(40):
            if step == 2:
                engine.add(requests[3])  # joins a running batch
            for event in engine.step():
                got.setdefault(event.row, []).append(event.token)
        return got

    assert staggered(Engine(model, compile=True)) == staggered(Engine(model))
    with torch.no_grad():  # the CPU's compiled step holds the weights as constants: a change must reach it
        model.lm_head.weight.mul_(-1.0)
    assert staggered(Engine(model, compile=True)) == staggered(Engine(model))


@contextlib.contextmanager
def compilations_counted(failing: bool = False) -> Iterator[list]:
    """torch.compile replaced by a recorder: each function compiled is listed, and the "compiled"
    function is the eager one (or, with `failing`, one that raises as a missing C compiler would):
    what the engine does around the compiler, without waiting for it."""
    compiled = []

    def recorder(function, **options):
        compiled.append(function)
        if not failing:
            return function

        def broken(*arguments):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return broken

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine_module.torch, "compile", recorder)
        yield compiled


def test_a_compiled_engine_compiles_once_per_model_and_again_when_its_weights_change(model, caplog):
    """Engines over one model share its compiled step (a chat's engine per reply compiles nothing
    new); a weight changed in place (a frozen step would keep the old one) means a new compilation;
    a compiler that fails is said once, and the step runs eagerly with the same tokens."""
    fresh = copy.deepcopy(model)
    requests = [Request(prompt, GREEDY) for prompt in prompts(5, 9)]
    eager, _ = run(Engine(fresh), requests)
    with compilations_counted() as compiled:
        assert run(Engine(fresh, compile=True), requests)[0] == eager
        assert run(Engine(fresh, compile=True), requests)[0] == eager
        assert len(compiled) == 1
        with torch.no_grad():
            fresh.lm_head.weight.mul_(-1.0)
        resets = []
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(engine_module.torch.compiler, "reset", lambda: resets.append(True))
            assert run(Engine(fresh, compile=True), requests)[0] == run(Engine(fresh), requests)[0] != eager
        assert len(compiled) == 2 and resets == [True]  # the old graphs (frozen weights) are forgotten first
    with compilations_counted(failing=True) as compiled, caplog.at_level("WARNING", "minigpt.engine"):
        other = copy.deepcopy(model)
        engine = Engine(other, compile=True)
        assert run(engine, requests)[0] == eager
        assert run(Engine(other, compile=True), requests)[0] == eager
    assert len(compiled) == 1
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == [
        "torch.compile failed (InvalidCxxCompiler: No working C++ compiler found); decoding without compilation."]


def test_stop_ids_and_max_tokens_per_row(model):
    prompt_a, prompt_b = prompts(6, 3)
    free_a = alone(model, Request(prompt_a, GREEDY))
    stop = free_a[4]
    requests = [Request(prompt_a, dataclasses.replace(GREEDY, stop_ids=(stop,))),
                Request(prompt_b, dataclasses.replace(GREEDY, max_new_tokens=3))]
    tokens, finishes = run(Engine(model), requests)
    assert tokens[0] == free_a[: free_a.index(stop)] and finishes[0] == "stop"  # the stop id is not returned
    assert tokens[1] == alone(model, Request(prompt_b, GREEDY))[:3] and finishes[1] == "length"


def test_rows_join_and_leave_a_running_batch(model):
    first, second, third = [Request(prompt, GREEDY) for prompt in prompts(5, 9, 2)]
    engine = Engine(model)
    row_first, row_second = engine.add(first), engine.add(second)
    got: dict[int, list[int]] = {}
    for step in range(12):
        if step == 3:
            row_third = engine.add(third)  # joins rows that are 3 tokens in
        if step == 5:
            assert engine.cancel(row_second) and not engine.cancel(row_second)
        for event in engine.step():
            assert event.row != row_second or step < 5  # a cancelled row says nothing more
            got.setdefault(event.row, []).append(event.token)
    assert got[row_first] == alone(model, first)
    assert got[row_second] == alone(model, second)[:5]
    assert got[row_third] == alone(model, third)[:9]
    while engine.has_work:
        for event in engine.step():
            got[event.row].append(event.token)
    assert got[row_third] == alone(model, third) and not engine.rows and engine.cache is None


def test_the_cache_holds_prompt_plus_new_tokens_not_the_window(model):
    engine = Engine(model)
    engine.add(Request(prompts(10)[0], dataclasses.replace(GREEDY, max_new_tokens=6)))
    engine.add(Request(prompts(4)[0], dataclasses.replace(GREEDY, max_new_tokens=20)))
    engine.step()
    assert engine.cache.capacity == 24 < model.config.block_size  # the widest row: 4 + 20
    for _ in range(6):
        engine.step()  # the first row finishes after 6 tokens; the second still needs 24
    assert len(engine.rows) == 1 and engine.cache.capacity == 24 and engine.cache.keys[0].size(0) == 1


def test_the_window_bounds_a_row(model):
    window = model.config.block_size
    tokens, finishes = run(Engine(model), [Request(prompts(window - 5)[0], dataclasses.replace(GREEDY, max_new_tokens=50))])
    assert len(tokens[0]) == 5 and finishes == ["length"]  # cut where the window ends
    with pytest.raises(UserInputError, match=f"reads at most {window - 1}"):
        Engine(model).add(Request(prompts(window)[0], GREEDY))
    with pytest.raises(UserInputError, match="at least one prompt token"):
        Engine(model).add(Request([], GREEDY))


def test_batched_distribution_equals_the_one_row_rules():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    settings = [SamplingConfig(top_k=5), SamplingConfig(top_p=0.7, temperature=0.5),
                SamplingConfig(temperature=0, repetition_penalty=10.0), SamplingConfig(repetition_penalty=1.5, top_k=0)]
    contexts = [torch.tensor([1, 2]), torch.tensor([3]), logits[2].topk(1).indices, torch.tensor([0, 7, 9])]
    seen = torch.zeros(4, 50, dtype=torch.bool)
    for row, context in enumerate(contexts):
        seen[row, context] = True
    batched = next_token_probabilities(logits, seen, BatchSampling(settings, 50, torch.device("cpu")))
    for row in range(4):
        torch.testing.assert_close(batched[row], next_token_distribution(logits[row], contexts[row], settings[row]))
    assert (batched[0] > 0).sum() == 5 and batched[2].max() == 1.0 and batched[2].argmax() != logits[2].argmax()


# ------------------------------------------------------------------------------------- text


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is its own token, so "中" is three tokens."""
    return train_bpe_tokenizer(["abc"], vocab_size=256 + len(SPECIAL_TOKENS), show_progress=False)


def test_the_incremental_decoder_never_splits_a_character(byte_tokenizer):
    text = "中文 é 🎉!"
    ids = byte_tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    decoder = byte_tokenizer.incremental_decoder()
    pieces = [decoder.add(token) for token in ids] + [decoder.finish()]
    assert "".join(pieces) == text and decoder.text == text
    assert all("\ufffd" not in piece for piece in pieces)
    assert pieces[:3] == ["", "", "中"]  # held back until the character's third byte


def test_the_incremental_decoder_stops_before_a_stop_string_split_across_tokens(byte_tokenizer):
    decoder = byte_tokenizer.incremental_decoder(["STOP", "é!"])
    pieces = [decoder.add(token) for token in byte_tokenizer.encode("ab STbb ST")]
    assert "".join(pieces) == "ab STbb " and decoder.held == "ST"  # "ST" may still become "STOP"
    assert decoder.add(byte_tokenizer.encode("O")[0]) == "" and not decoder.stopped
    assert decoder.add(byte_tokenizer.encode("P")[0]) == "" and decoder.stopped
    assert decoder.add(byte_tokenizer.encode("x")[0]) == "" and decoder.finish() == "" and decoder.text == "ab STbb "
    multibyte = byte_tokenizer.incremental_decoder(["é!"])  # a stop string that starts inside a character's bytes
    assert "".join(multibyte.add(token) for token in byte_tokenizer.encode("caféé!tail")) + multibyte.finish() == "café"
    unfinished = byte_tokenizer.incremental_decoder(["STOP"])
    assert "".join(unfinished.add(token) for token in byte_tokenizer.encode("the ST")) == "the "
    assert unfinished.finish() == "ST"  # no more tokens: a partial stop string is text after all


def test_stream_text_yields_requests_in_order_and_applies_stop_strings(model, byte_tokenizer):
    requests = [Request(prompt, dataclasses.replace(GREEDY, max_new_tokens=new)) for prompt, new in zip(prompts(3, 6), (4, 10))]
    expected = [byte_tokenizer.decode(alone(model, request)) for request in requests]
    pieces = list(stream_text(Engine(model), byte_tokenizer, requests))
    assert [piece.index for piece in pieces] == sorted(piece.index for piece in pieces)  # request 0 first, then 1
    assert ["".join(p.text for p in pieces if p.index == i) for i in (0, 1)] == expected
    assert [(p.index, p.finish) for p in pieces if p.finish] == [(0, "length"), (1, "length")]
    stop = expected[1][2:4]
    engine = Engine(model)
    stopped = list(stream_text(engine, byte_tokenizer, requests[1:], stop_strings=[stop]))
    assert "".join(p.text for p in stopped) == expected[1][: expected[1].index(stop)] and stopped[-1].finish == "stop"
    assert not engine.has_work  # the row was cancelled at the stop string


def test_generate_command_decodes_several_prompts_together_and_prints_them_in_order(tmp_path, tokenizer_file, capsys):
    from minigpt.model_folder import save_model_directory
    from minigpt.cli import generate as generate_command
    from minigpt.config import RunConfig
    from minigpt.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_file)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32))
    torch.manual_seed(0)
    directory = save_model_directory(tmp_path / "final_model", GPT(config.model).eval(), config, tokenizer)
    flags = [str(directory), "--max-new-tokens", "8", "--seed", "3"]

    def printed(*arguments: str) -> str:
        assert generate_command.main([*flags, *arguments]) == 0
        return capsys.readouterr().out

    together = printed("--prompt", "The", "--prompt", "def f")
    assert together == printed("--prompt", "The") + printed("--prompt", "def f")  # batched = one after another
    assert together == printed("--prompt", "The", "--prompt", "def f", "--no-kv-cache")
    with compilations_counted() as compiled:
        assert together == printed("--prompt", "The", "--prompt", "def f", "--compile")
    assert compiled == [engine_module.decode_logits]  # the flag reached the engine: one step compiled
    assert generate_command.main([*flags, "--compile", "--no-kv-cache"]) == 2
    assert capsys.readouterr().err == "error: --compile compiles the KV-cache decoding step: drop --no-kv-cache to use it.\n"
    first = together.splitlines()[0][len("The"):]
    stop = first.strip()[:2]
    if stop:  # the text ends before a --stop string
        assert printed("--prompt", "The", "--stop", stop) == "The" + first[: first.index(stop)] + "\n"
