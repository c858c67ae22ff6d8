"""`minigpt report`: the report card of a pretrain -> SFT chain, and a comparison of runs; and a
model chat-tuned on facts scoring high on questions about them (slow)."""

import json

import pytest

from conftest import run_in_process

FACTS = [("What colour is the zorbel?", "The zorbel is blue."), ("Where does the quintar live?", "The quintar lives in caves."),
         ("What does the mimble eat?", "The mimble eats apples."), ("How many legs has the vost?", "The vost has six legs.")]


def tiny(*extra: str) -> list[str]:
    return ["--config", "tiny", "--output-dir", "runs", "--dtype", "float32", "--sample-tokens", "4", *extra]


@pytest.fixture(scope="module")
def chain(tmp_path_factory, corpus_jsonl, tokenizer_file):
    """A 2-step pretraining run, a 2-step SFT run started from it (with --report), and an eval of each."""
    root = tmp_path_factory.mktemp("chain")
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}) + "\n"
                             for question, answer in FACTS))
    questions = root / "facts_questions.jsonl"
    answers = [answer for _, answer in FACTS]
    questions.write_text("".join(json.dumps({"question": question, "choices": answers, "answer": index}) + "\n"
                                 for index, (question, _) in enumerate(FACTS)))
    pretrain = run_in_process("train", *tiny("--data-files", str(corpus_jsonl), "--tokenizer", str(tokenizer_file), "--run-name", "pre",
                                             "--max-steps", "2", "--eval-steps", "1", "--eval-batches", "1", "--log-steps", "1", "--val-fraction", "0.1"), cwd=root)
    assert pretrain.returncode == 0, pretrain.stderr
    evaluation = run_in_process("eval", "runs/pre", "--data-files", str(questions), cwd=root)
    assert evaluation.returncode == 0, evaluation.stderr
    sft = run_in_process("train", *tiny("--stage", "sft", "--init-from", "runs/pre/final_model", "--data-files", str(facts),
                                        "--run-name", "sft", "--max-steps", "2", "--log-steps", "1", "--val-fraction", "0", "--report"), cwd=root)
    assert sft.returncode == 0, sft.stderr
    return root, questions, facts


def test_the_report_of_a_pretrain_sft_chain_names_both_stages_and_embeds_their_plots(chain):
    root, _, _ = chain
    run = root / "runs" / "sft"
    markdown, page = (run / "report.md").read_text(), (run / "report.html").read_text()  # written by train --report
    assert "Stages: pretrain (pre) -> sft (sft)" in markdown
    assert "## 1. pretrain: pre" in markdown and "## 2. sft: sft" in markdown
    assert "--stage sft --init-from runs/pre/final_model" in markdown and "--run-name pre" in markdown  # each run's command line
    assert "torch" in markdown and "cpu" in markdown  # the environment
    assert "| questions" not in markdown and "| facts_questions | 4 |" in markdown  # the pretrained run's eval_results.json
    assert "best validation loss" in markdown and "bits/byte" in markdown
    # Markdown links each run's curves; the HTML carries both images inside itself.
    assert "![training curves of pre](../pre/plots/report_curves.png)" in markdown
    assert (root / "runs" / "pre" / "plots" / "report_curves.png").is_file() and (run / "plots" / "report_curves.png").is_file()
    assert page.count("src='data:image/png;base64,") == 2 and "<h2>2. sft: sft</h2>" in page

    # Again, from elsewhere: the relative --init-from is found from where the run was started.
    again = run_in_process("report", str(run), cwd=root.parent)
    assert again.returncode == 0 and "report.html" in again.stdout
    assert (run / "report.md").read_text() == markdown  # the same files from the same run


def test_report_compares_runs_side_by_side(chain):
    root, _, _ = chain
    result = run_in_process("report", "runs/pre", "runs/sft", "--output", ".", cwd=root)
    assert result.returncode == 0, result.stderr
    markdown = (root / "comparison.md").read_text()
    assert "|  | pre | sft |" in markdown and "| stage | pretrain (from scratch) | sft (from runs/pre/final_model) |" in markdown
    assert (root / "comparison_curves.png").is_file() and "data:image/png;base64," in (root / "comparison.html").read_text()
    refused = run_in_process("report", str(root), cwd=root)
    assert refused.returncode == 2 and "not a run directory" in refused.stderr


@pytest.mark.slow
def test_a_model_chat_tuned_on_facts_scores_high_on_questions_about_them(chain):
    root, questions, facts = chain
    sft = run_in_process("train", *tiny("--stage", "sft", "--init-from", "runs/pre/final_model", "--data-files", str(facts),
                                        "--run-name", "facts", "--max-steps", "150", "--learning-rate", "3e-3", "--batch-size", "4",
                                        "--val-fraction", "0"), cwd=root)
    assert sft.returncode == 0, sft.stderr
    tuned = json.loads(run_in_process("eval", "runs/facts", "--data-files", str(questions), "--json", cwd=root).stdout)
    before = json.loads(run_in_process("eval", "runs/pre", "--data-files", str(questions), "--json", cwd=root).stdout)
    assert tuned["format"] == "chat" and before["format"] == "plain"
    assert tuned["tasks"]["facts_questions"]["accuracy"] == 1.0 and tuned["score"] > before["score"]
