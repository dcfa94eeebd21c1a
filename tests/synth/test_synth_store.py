"""The append-only output: torn last lines are cut, corruption and second writers refused."""

import json

import pytest

from megatron_kaja.synth import SynthStore, sidecar_paths


def test_sidecar_names(tmp_path):
    assert sidecar_paths(tmp_path / "sft.jsonl") == (
        tmp_path / "sft.rejected.jsonl",
        tmp_path / "sft.summary.json",
    )


def test_torn_last_line_is_cut_and_ids_are_done(tmp_path):
    out = tmp_path / "sft.jsonl"
    store = SynthStore(out)
    store.append_accepted({"id": "a", "question": "質問", "answer": "回答"})
    store.append_rejected({"id": "b", "reason": "question_no_form"})
    store.close()
    whole = out.read_bytes()
    with out.open("ab") as f:
        f.write('{"id": "c", "question": "途中'.encode())  # what a kill mid-write leaves
    store = SynthStore(out)
    assert store.repaired_bytes > 0 and out.read_bytes() == whole
    assert store.done_ids == {"a", "b"} and store.accepted_count == 1
    assert store.rejected_counts == {"question_no_form": 1}
    store.append_accepted({"id": "c", "question": "質問2", "answer": "回答2"})
    store.close()
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a", "c"]


def test_corruption_inside_the_file_is_an_error(tmp_path):
    out = tmp_path / "sft.jsonl"
    out.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"sft.jsonl:2: not valid JSON"):
        SynthStore(out)
    out.write_text('{"id": "a"}\n{"id": "a"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="repeats id 'a'"):
        SynthStore(out)


def test_second_writer_is_refused(tmp_path):
    store = SynthStore(tmp_path / "sft.jsonl")
    with pytest.raises(RuntimeError, match="another running generator"):
        SynthStore(tmp_path / "sft.jsonl")
    store.close()
    SynthStore(tmp_path / "sft.jsonl").close()  # free again once closed
