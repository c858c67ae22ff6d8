"""What a user does with a pretrained folder of each family (issue #27), through the commands:
LoRA SFT on the folder's own chat template, the merged export equal to base + adapter, chat
stopping at the folder's end-of-turn tokens, and the sequence length a fine-tuning run picks."""

import json
import logging
import shutil

import pytest
import torch

from conftest import run_in_process
from minigpt.config import RunConfig
from minigpt.model_folder import FolderKind, load
from minigpt.run import FINE_TUNING_BLOCK_SIZE, configure
from minigpt.tokenizer import PretrainedTokenizer

transformers = pytest.importorskip("transformers")

FAMILY_NAMES = ["llama", "qwen2", "qwen3", "gemma3"]
CHATS = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": f"What is {n} plus {n}?"},
          {"role": "assistant", "content": f"{n} plus {n} is {2 * n}."}] for n in range(12)]


@pytest.fixture(scope="module")
def lora_runs(family_folders, tmp_path_factory) -> dict[str, tuple]:
    """{family: (the LoRA run's final_model/, what `train` printed)}: 3 steps of SFT with rank-4
    adapters on each family folder, on chats rendered by the folder's template (replies only in the loss)."""
    root = tmp_path_factory.mktemp("family-sft")
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    runs = {}
    for family in FAMILY_NAMES:
        result = run_in_process("train", "--stage", "sft", "--init-from", str(family_folders[family]), "--lora-rank", "4",
                                "--data-files", str(data), "--block-size", "128", "--batch-size", "2", "--max-steps", "3",
                                "--eval-steps", "3", "--learning-rate", "0.02", "--dtype", "float32", "--output-dir", "runs",
                                "--run-name", family, cwd=root)
        assert result.returncode == 0, result.stderr
        runs[family] = (root / "runs" / family / "final_model", result.stdout + result.stderr)
    return runs


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_sft_on_each_family_trains_with_its_template_and_merges_to_base_plus_adapter(lora_runs, family_folders, family, tmp_path):
    final, printed = lora_runs[family]
    assert "LoRA rank 4" in printed
    adapted = load(final, merge_adapter=False)
    assert adapted.kind is FolderKind.LORA_ADAPTER and adapted.model.config.family == family
    folder_tokenizer = load(family_folders[family]).tokenizer
    assert isinstance(adapted.tokenizer, PretrainedTokenizer) and adapted.tokenizer.definition() == folder_tokenizer.definition()
    ids = torch.tensor([adapted.tokenizer.render_chat(CHATS[0])[0]])
    base = transformers.AutoModelForCausalLM.from_pretrained(family_folders[family], dtype=torch.float32).eval()
    with torch.no_grad():
        ours = adapted.model(ids)[0]
        assert (ours - base(ids).logits).abs().max() > 1e-3  # three steps moved the adapters off zero
    assert run_in_process("export", str(final), "--merge", "--format", "hf", "--output", str(tmp_path / "merged"), cwd=tmp_path).returncode == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert type(merged).__name__ == type(base).__name__
    with torch.no_grad():
        assert (merged(ids).logits - ours).abs().max().item() < 1e-4
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "merged" / name).read_bytes() == (family_folders[family] / name).read_bytes(), name


def test_chat_stops_at_the_folders_end_of_turn_tokens(family_folders, tmp_path):
    """Llama 3's generation_config lists <|end_of_text|> beside the tokenizer's EOS <|eot_id|>.
    With the output rows of that token and of the greedy first reply token swapped, the model's
    first reply token is <|end_of_text|>: chat stops there and prints an empty reply."""
    folder = shutil.copytree(family_folders["llama"], tmp_path / "llama")

    def reply() -> str:
        result = run_in_process("chat", str(folder), "--prompt", "Hello there", "--max-new-tokens", "6", "--temperature", "0",
                                cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    loaded = load(folder)
    stop = loaded.tokenizer.backend.token_to_id("<|end_of_text|>")
    assert stop in loaded.tokenizer.stop_ids(chat=True) and stop != loaded.tokenizer.eos_id
    prompt = torch.tensor([loaded.tokenizer.chat_prompt([{"role": "user", "content": "Hello there"}])])
    with torch.no_grad():
        first = loaded.model(prompt)[0][0, -1].argmax().item()
    assert first not in loaded.tokenizer.stop_ids(chat=True) and reply() != ""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        head = model.lm_head.weight
        head[[first, stop]] = head[[stop, first]]
    model.save_pretrained(folder)
    assert reply() == ""


def test_a_fine_tuning_run_trains_on_512_token_sequences_unless_told(family_folders, tmp_path, caplog):
    """A pretrained folder's max_position_embeddings (here 32k) is how far it can read, not a
    length to fine-tune at: the run takes FINE_TUNING_BLOCK_SIZE tokens and says so; --block-size
    wins; a folder whose context is shorter keeps its own."""
    folder = shutil.copytree(family_folders["qwen2"], tmp_path / "qwen2-32k")
    settings = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "max_position_embeddings": 32768}))
    start = {"train.stage": "sft", "train.init_from": str(folder)}
    with caplog.at_level(logging.INFO, logger="minigpt.run"):
        assert configure(RunConfig(), start, {}, "test").model.block_size == FINE_TUNING_BLOCK_SIZE == 512
    assert "Training on sequences of 512 tokens (the model reads up to 32768); --block-size changes it." in caplog.messages
    assert configure(RunConfig(), {**start, "model.block_size": 4096}, {}, "test").model.block_size == 4096
    short = {**start, "train.init_from": str(family_folders["qwen2"])}  # max_position_embeddings 128
    assert configure(RunConfig(), short, {}, "test").model.block_size == 128
