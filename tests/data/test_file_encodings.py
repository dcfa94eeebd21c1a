"""Data files that are not UTF-8: every reader of users' files names the file, the line and
the encoding (a UTF-8 byte-order mark is read past, as JSON readers may do)."""

from __future__ import annotations

import codecs
import json

import pytest

from megatron_kaja.data import DataFormatError, DataSource, load_conversations
from megatron_kaja.eval.records import load_records

ROWS = [{"ID": "a", "text": "日本の首都は?", "output": "東京です。"}] * 2
TEXT = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS)


def read_sft(path):
    return load_conversations(DataSource(path=str(path)))


def read_eval(path):
    return load_records(path, "helpful", with_predictions=False)


def read_eval_unique(path):
    path.write_bytes(path.read_bytes().replace(b'"a"', b'"b"', 1))
    return read_eval(path)


READERS = {"sft": read_sft, "eval_or_seeds": read_eval_unique}


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize(
    ("encoded", "message"),
    [
        (TEXT.encode("cp932"), r":1: not UTF-8 \(byte 0x93 at byte 22 of the line\); it decodes "
         r"as cp932 \(Shift_JIS\); save the file as UTF-8"),
        (TEXT.encode("euc_jp"), r":1: not UTF-8 .*it decodes as euc_jp \(EUC-JP\)"),
        (TEXT.encode("utf-16"), r":1: the file is UTF-16 LE \(it starts with a UTF-16 LE "
         r"byte-order mark\); save it as UTF-8"),
        (TEXT.encode("utf-32"), r":1: the file is UTF-32 LE"),
        (TEXT.encode("utf-8") + "x".encode("latin-1") + "é\n".encode("latin-1"),
         r":3: not UTF-8 \(byte 0xe9 at byte 2 of the line\)"),
    ],
    ids=["shift_jis", "euc_jp", "utf16", "utf32", "latin1_line3"],
)  # fmt: skip
def test_non_utf8_file_names_file_line_and_encoding(tmp_path, reader, encoded, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(encoded)
    with pytest.raises(ValueError, match=r"data\.jsonl" + message):
        READERS[reader](path)


def test_utf8_bom_is_read_past(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + TEXT.encode())
    assert read_sft(path)[0][0]["content"] == "日本の首都は?"
    json_file = tmp_path / "data.json"
    json_file.write_bytes(codecs.BOM_UTF8 + json.dumps(ROWS, ensure_ascii=False).encode())
    assert len(read_sft(json_file)) == 2
    path.write_bytes(codecs.BOM_UTF8 + TEXT.replace('"a"', '"b"', 1).encode())
    assert read_eval(path)[0].question == "日本の首都は?"


def test_sft_reader_raises_its_data_error(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(json.dumps(ROWS, ensure_ascii=False).encode("cp932"))
    with pytest.raises(DataFormatError, match=r"data\.json:1: not UTF-8"):
        read_sft(path)
