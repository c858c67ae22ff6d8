"""Chat fine-tuning data: every record format, .json arrays, bad records, and the built-in SFT set."""

import json

import pytest

from minigpt.errors import UserInputError
from minigpt.sft_corpus import BUILTIN_SFT, builtin_sft_conversations, builtin_sft_fingerprint
from minigpt.sources import DataReport, DocumentReader, parse_record, resolve_data_files, sources_fingerprint
from minigpt.tokenizer import load_tokenizer

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def read_all(path, report=None):
    reader = DocumentReader([path], "text", report)
    documents = []
    while (document := reader.next_document()) is not None:
        documents.append(document)
    return documents


def test_conversations_and_messages_read_alike():
    assert parse_record({"conversations": CHAT}).conversations == CHAT
    assert parse_record({"messages": CHAT}).conversations == CHAT


def test_a_system_field_becomes_the_first_turn():
    document = parse_record({"system": "Be brief.", "messages": CHAT})
    assert document.conversations == [{"role": "system", "content": "Be brief."}, *CHAT]


def test_instruction_records_become_a_user_and_an_assistant_turn():
    with_input = parse_record({"instruction": "Translate to French.", "input": "cat", "output": "chat"})
    assert with_input.conversations == [
        {"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"},
    ]
    without_input = parse_record({"instruction": "Say hi.", "input": "  ", "output": "hi", "system": "Be kind."})
    assert without_input.conversations == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"},
    ]
    assert parse_record({"instruction": "Say hi.", "output": "hi"}).conversations[0]["content"] == "Say hi."


@pytest.mark.parametrize("record, reason", [
    ({"messages": []}, "'messages' is an empty list"),
    ({"messages": "hi"}, "'messages' is not a list of turns"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "turn 1 of 'messages' is not an object with a 'role'"),
    ({"conversations": [{"role": "user", "content": None}]}, "turn 1 of 'conversations'"),
    ({"instruction": "x", "output": 3}, "field 'output' of the instruction record is not a string"),
    ({"instruction": "x"}, "field 'output' of the instruction record is not a string"),
    ({"system": 1, "messages": CHAT}, "field 'system' is not a string"),
    ({"prompt": "x"}, "no string field 'text'"),
    ([1, 2], "not a JSON object"),
])
def test_bad_records_say_why(record, reason):
    assert reason in parse_record(record)


def test_jsonl_bad_records_are_skipped_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "chat.jsonl"
    lines = [{"messages": CHAT}, {"instruction": "a", "output": "b"}, {"messages": []}, {"conversations": CHAT}]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report = DataReport()
    assert len(read_all(path, report)) == 3
    assert report.bad_lines == 1 and f"{path}:3: 'messages' is an empty list" in caplog.text


def test_json_array_files_are_read_with_item_numbers(tmp_path, caplog):
    path = tmp_path / "chat.json"
    records = [{"messages": CHAT}, {"instruction": "a", "input": "b", "output": "c"}, "oops", {"text": "plain"}]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).encode())  # a byte-order mark is fine
    assert resolve_data_files([str(tmp_path)]) == [path]
    report = DataReport()
    documents = read_all(path, report)
    assert [document.conversations for document in documents[:1]] == [CHAT] and documents[2].text == "plain"
    assert report.bad_lines == 1 and f"{path}:item 3: not a JSON object" in caplog.text


def test_a_json_reader_resumes_at_its_item(tmp_path):
    path = tmp_path / "chat.json"
    path.write_text(json.dumps([{"text": str(number)} for number in range(5)]))
    reader = DocumentReader([path], "text")
    reader.next_document(), reader.next_document()
    resumed = DocumentReader([path], "text")
    resumed.seek(reader.position())
    assert resumed.next_document().text == "2"


@pytest.mark.parametrize("content, message", [
    ('{"messages": []}', "does not hold a JSON array of records"),
    ("[{]", "is not valid JSON"),
])
def test_a_json_file_that_is_not_an_array_of_records_is_refused(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserInputError, match=message):
        read_all(path)


def test_a_json_file_of_bad_records_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(UserInputError, match="Every item of .*bad.json is bad"):
        read_all(path)


def test_builtin_sft_set_is_large_deterministic_and_valid(tokenizer_file):
    conversations = builtin_sft_conversations()
    assert len(conversations) >= 2000
    builtin_sft_conversations.cache_clear()
    builtin_sft_fingerprint.cache_clear()
    assert builtin_sft_conversations() == conversations  # generated again from scratch: the same
    assert len(builtin_sft_fingerprint()) == 12 and sources_fingerprint([BUILTIN_SFT])[0][1] == builtin_sft_fingerprint()
    multi_turn = sum(sum(turn["role"] == "user" for turn in record["conversations"]) > 1 for record in conversations)
    with_system = sum(record["conversations"][0]["role"] == "system" for record in conversations)
    assert multi_turn / len(conversations) > 0.1 and with_system > 0
    tokenizer = load_tokenizer(tokenizer_file)
    for record in conversations:
        assert parse_record(record).conversations == record["conversations"]  # valid as a data record
        ids, mask = tokenizer.render_chat(record["conversations"])
        assert any(mask) and len(ids) == len(mask)


def test_builtin_sft_is_a_data_source():
    assert resolve_data_files([BUILTIN_SFT]) == [BUILTIN_SFT]
    reader = DocumentReader([BUILTIN_SFT], "text")
    first = reader.next_document()
    assert first.conversations == builtin_sft_conversations()[0]["conversations"]
    resumed = DocumentReader([BUILTIN_SFT], "text")
    resumed.seek(reader.position())
    assert resumed.next_document().conversations == builtin_sft_conversations()[1]["conversations"]
