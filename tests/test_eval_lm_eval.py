"""`minigpt eval` against lm-evaluation-harness: the same records, the same accuracy.

lm-eval's Hugging Face backend runs on the `hf` export of a tiny model, with a local multiple-choice
task over the records MiniGPT scores (its `json` loader reads the file: nothing is downloaded).
The `eval` extra installs lm-eval; CI installs it, and runs this in the slow stage.
"""

import json

import pytest
import torch

from conftest import run_in_process
from minigpt.config import ModelConfig, RunConfig
from minigpt.export import export_hf
from minigpt.model import GPT
from minigpt.model_folder import save_model_directory
from minigpt.tokenizer import EOS_TOKEN, load_tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow

RECORDS = [
    {"question": "Which module reads JSON?", "choices": ["json", "socket", "math", "the tarfile module"], "answer": 0},
    {"question": "What does len return?", "choices": ["the number of items", "a list", "nothing at all"], "answer": 0},
    {"question": "Which keyword defines a function?", "choices": ["def", "class", "lambda"], "answer": 0},
    {"question": "What is the value of True and False?", "choices": ["True", "False"], "answer": 1},
    {"question": "Which built-in sorts a list?", "choices": ["sorted", "reversed", "enumerate", "zip"], "answer": 0},
    {"question": "Which module handles regular expressions?", "choices": ["os", "re", "sys"], "answer": 1},
]


def test_minigpt_eval_and_lm_eval_agree_on_a_local_multiple_choice_task(tokenizer_file, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tokenizer = load_tokenizer(tokenizer_file)
    config = RunConfig(model=ModelConfig(vocab_size=tokenizer.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32))
    torch.manual_seed(3)
    model = GPT(config.model).eval()
    with torch.no_grad():  # a sharper random model than the 0.02 initialisation: its choices differ
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    folder = save_model_directory(tmp_path / "model", model, config, tokenizer)
    export_hf(model, tokenizer, tmp_path / "hf")
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))

    # The plain format: <|endoftext|> (MiniGPT's document start), the question, " " + the choice.
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "minigpt_records.yaml").write_text(
        "task: minigpt_records\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        f"doc_to_text: \"{EOS_TOKEN}{{{{question}}}}\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    harness = simple_evaluate(model=HFLM(pretrained=str(tmp_path / "hf"), dtype="float32", batch_size=4, device="cpu"),
                              tasks=["minigpt_records"], task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    theirs = harness["results"]["minigpt_records"]

    result = run_in_process("eval", str(folder), "--data-files", str(data), "--format", "plain", "--json",
                            "--log-samples", "samples.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)["tasks"]["records"]
    assert ours["accuracy"] == theirs["acc,none"] and ours["accuracy_norm"] == theirs["acc_norm,none"]
    # Not only the accuracies: every choice's log-probability.
    their_scores = {sample["doc"]["question"]: [response[0][0] for response in sample["resps"]]
                    for sample in harness["samples"]["minigpt_records"]}
    for line in (tmp_path / "samples.jsonl").read_text().splitlines():
        sample = json.loads(line)
        assert sample["log_probabilities"] == pytest.approx(their_scores[sample["question"]], abs=1e-3)
    picks = {tuple(json.loads(line)["log_probabilities"]) for line in (tmp_path / "samples.jsonl").read_text().splitlines()}
    assert len(picks) == len(RECORDS)
