"""Readers and record shapes: every accepted format, and bad input named by file/line/field."""

from __future__ import annotations

import json

import pytest

from megatron_kaja.data import (
    DataFormatError,
    DataSource,
    data_sources_from_config,
    load_conversations,
    load_data_sources_yaml,
    normalize_record,
    parse_weighted_paths,
)
from tests.data.conftest import chat_records, qa_records, write_jsonl


@pytest.mark.parametrize("shape", ["text", "input", "qa"])
def test_pair_shapes_become_one_turn(shape):
    record = qa_records(1, shape)[0]
    messages = normalize_record(record, "x.jsonl:1")
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert messages[0]["content"] == qa_records(1, "text")[0]["text"]
    assert messages[1]["content"] == qa_records(1, "text")[0]["output"]


def test_messages_shape_keeps_turns():
    record = chat_records(4)[3]  # system + 1 turn
    assert normalize_record(record, "x") == record["messages"]


def test_jsonl_json_parquet_and_hf_directory_read_the_same(tmp_path):
    import datasets

    records = qa_records(7) + chat_records(3)
    expected = [normalize_record(r, "") for r in records]
    jsonl = write_jsonl(tmp_path / "a.jsonl", records)
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    pairs = qa_records(7, "input")
    datasets.Dataset.from_list(pairs).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "b_disk"))
    assert load_conversations(DataSource(path=str(jsonl))) == expected
    assert load_conversations(DataSource(path=str(tmp_path / "a.json"))) == expected
    pair_expected = [normalize_record(r, "") for r in pairs]
    assert load_conversations(DataSource(path=str(tmp_path / "b.parquet"))) == pair_expected
    assert load_conversations(DataSource(path=str(tmp_path / "b_disk"))) == pair_expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "質問", "output": "答え"', r"bad\.jsonl:3: malformed JSON"),
        ('{"text": "質問です"}', r"bad\.jsonl:3: field 'output' is missing"),
        ('{"text": "質問です", "output": "  "}', r"bad\.jsonl:3: field 'output' is empty"),
        ('{"prompt": "質問", "completion": "答え"}', r"bad\.jsonl:3: unknown record shape"),
        ('{"question": "質問", "answer": 5}', r"bad\.jsonl:3: field 'answer' must be a string"),
        (
            '{"messages": [{"role": "user", "content": "質問"}]}',
            r"bad\.jsonl:3: field 'messages' must end with an assistant turn",
        ),
        (
            '{"messages": [{"role": "user", "content": "質問"}, {"role": "bot", "content": "x"}]}',
            r"bad\.jsonl:3: field 'messages\[1\]'\.role is 'bot'",
        ),
        (
            '{"messages": [{"role": "user", "content": "質問"}, '
            '{"role": "assistant", "content": ""}]}',
            r"bad\.jsonl:3: field 'messages\[1\]'\.content is empty",
        ),
        (
            '{"messages": [{"role": "system", "content": "s"}, '
            '{"role": "assistant", "content": "答え"}]}',
            r"bad\.jsonl:3: field 'messages\[1\]' is an assistant turn that does not follow",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(tmp_path, line, message):
    good = [json.dumps(r, ensure_ascii=False) for r in qa_records(2)]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([*good, line, good[0]]) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=message):
        load_conversations(DataSource(path=str(path)))


def test_bad_record_in_json_and_parquet_names_the_row(tmp_path):
    import datasets

    records = [*qa_records(3), {"text": "質問です", "output": ""}]
    (tmp_path / "a.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"a\.json: record 3: field 'output' is empty"):
        load_conversations(DataSource(path=str(tmp_path / "a.json")))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(DataFormatError, match=r"a\.parquet: row 3: field 'output' is empty"):
        load_conversations(DataSource(path=str(tmp_path / "a.parquet")))
    (tmp_path / "a.csv").write_text("text,output\n")
    with pytest.raises(DataFormatError, match=r"unsupported file type '\.csv'"):
        load_conversations(DataSource(path=str(tmp_path / "a.csv")))
    with pytest.raises(DataFormatError, match=r"missing\.jsonl: no such file"):
        load_conversations(DataSource(path=str(tmp_path / "missing.jsonl")))


def test_parse_weighted_paths_and_yaml(tmp_path):
    sources = parse_weighted_paths("a.jsonl 0.7 b.jsonl 0.3")
    assert [(s.path, s.weight) for s in sources] == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert parse_weighted_paths(["only.jsonl"]) == [DataSource(path="only.jsonl")]
    with pytest.raises(ValueError, match=r"the weight after 'a\.jsonl' must be a number"):
        parse_weighted_paths(["a.jsonl", "b.jsonl", "c.jsonl", "0.5"])
    with pytest.raises(ValueError, match="PATH WEIGHT"):
        parse_weighted_paths(["a.jsonl", "0.5", "b.jsonl"])
    (tmp_path / "recipe.yaml").write_text(
        "train_data:\n"
        "  - {path: a.jsonl, weight: 0.7}\n"
        "  - {path: llm-jp/AnswerCarefully, name: v2.0, split: test, weight: 0.3}\n"
        "valid_data: c.jsonl 1.0\n"
    )
    train = load_data_sources_yaml(tmp_path / "recipe.yaml")
    assert train[1] == DataSource(
        path="llm-jp/AnswerCarefully", name="v2.0", split="test", weight=0.3
    )
    assert load_data_sources_yaml(tmp_path / "recipe.yaml", "valid_data") == [
        DataSource(path="c.jsonl", weight=1.0)
    ]
    with pytest.raises(ValueError, match="greater than 0"):
        data_sources_from_config([{"path": "a.jsonl", "weight": 0}])
