"""Fuzzed input (hypothesis): whatever bytes a JSONL file or a configuration file holds, reading it
never ends in a traceback. Every good record is read, every bad line is reported with file:line,
or the file is refused in one sentence (UserInputError).

Pretraining text records and chat records are covered; classification records do not exist yet
and get the same property test when they arrive.
"""

import json
import logging

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minigpt.config import load_config, validate
from minigpt.errors import UserInputError
from minigpt.sources import DataReport, DocumentReader
from minigpt.chat_template import CHAT_ROLES

SMALL = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DEEP = 100_000  # nesting deeper than Python's recursion limit

good_text = st.text(max_size=200)  # hypothesis leaves out lone surrogates here: these are real text
good_records = st.one_of(
    good_text.map(lambda text: {"text": text}),
    st.lists(st.tuples(st.sampled_from(CHAT_ROLES), good_text), min_size=1, max_size=4).map(
        lambda turns: {"conversations": [{"role": role, "content": content} for role, content in turns]}),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=10,
)
# Lines that are bad by construction, each for a different reason.
bad_lines = st.one_of(
    st.binary(max_size=100).map(lambda data: data.replace(b"\n", b"") + b"\xff"),  # never valid UTF-8
    json_values.filter(lambda value: not isinstance(value, dict)).map(lambda value: json.dumps(value).encode()),
    st.dictionaries(st.text(max_size=8).filter(lambda key: key not in ("text", "conversations")), json_values, max_size=3)
    .map(lambda value: json.dumps(value).encode()),
    json_values.filter(lambda value: not isinstance(value, (str, list))).map(lambda value: json.dumps({"text": value}).encode()),
    st.sampled_from([
        b'{"text": "\\ud800 lone surrogate"}', b'{"text": NaN}', b'{"text": Infinity}', b'{"conversations": []}',
        b'{"conversations": [{"role": "wizard", "content": "hi"}]}', b'{"conversations": [{"role": "user", "content": 5}]}',
        b"[" * DEEP + b"]" * DEEP, b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}", b"{broken",
    ]),
)


def read_all(path):
    report = DataReport()
    reader = DocumentReader([path], "text", report)
    documents = []
    while (document := reader.next_document()) is not None:
        documents.append({"text": document.text} if document.text is not None else {"conversations": document.conversations})
    return documents, report


@SMALL
@given(good=st.lists(good_records, max_size=30), bad=st.lists(bad_lines, max_size=8), seed=st.randoms())
def test_jsonl_reader_reads_every_good_record_and_reports_every_bad_line(tmp_path_factory, good, bad, seed):
    lines = [(json.dumps(record).encode(), record) for record in good] + [(line, None) for line in bad]
    seed.shuffle(lines)
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in lines) + b"\n")
    try:
        documents, report = read_all(path)
    except UserInputError as error:  # refused: mostly or only bad lines
        assert "data.jsonl" in str(error) and "\n" not in str(error)
        return
    assert documents == [record for _, record in lines if record is not None]
    bad_numbers = [number for number, (_, record) in enumerate(lines, start=1) if record is None]
    assert report.bad_lines == len(bad_numbers)
    assert [example.split(": ")[0] for example in report.examples] == [f"{path}:{number}" for number in bad_numbers]


@SMALL
@given(data=st.binary(max_size=300))
def test_jsonl_reader_survives_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "random.jsonl"
    path.write_bytes(data)
    try:
        read_all(path)
    except UserInputError:
        pass


def test_a_huge_line_is_read_whole(tmp_path, caplog):
    path = tmp_path / "huge.jsonl"
    text = "word " * 1_000_000  # a 5 MB line
    path.write_text(json.dumps({"text": text}) + "\n" + "{bad\n" + json.dumps({"text": "after"}) + "\n")
    with caplog.at_level(logging.WARNING):
        documents, report = read_all(path)
    assert documents == [{"text": text}, {"text": "after"}] and report.examples == [f"{path}:2: not valid JSON (Expecting property name enclosed in double quotes)"]


settings_tables = st.dictionaries(st.sampled_from(["model", "train", "preset", "extra"]), json_values, max_size=3)
known_settings = st.fixed_dictionaries({}, optional={
    "model": st.dictionaries(st.sampled_from(["n_layer", "n_head", "n_embd", "dropout", "block_size"]), json_values, max_size=3),
    "train": st.dictionaries(st.sampled_from(["max_steps", "learning_rate", "data_files", "plot_loss", "dtype"]), json_values, max_size=3),
})


@SMALL
@given(content=st.one_of(
    st.binary(max_size=200),
    st.one_of(json_values, settings_tables, known_settings).map(lambda value: json.dumps(value).encode()),
    st.just(b"[" * DEEP + b"]" * DEEP),
), suffix=st.sampled_from([".json", ".toml"]))
def test_the_config_loader_never_raises_anything_but_one_sentence(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("fuzz") / f"config{suffix}"
    path.write_bytes(content)
    try:
        validate(load_config(str(path)))
    except UserInputError as error:
        assert "\n" not in str(error).strip()
