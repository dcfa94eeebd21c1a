"""Readers for SFT data: JSONL / JSON / Parquet files and HF `datasets` (local or hub).

Each reader yields `(location, record)` pairs; `load_conversations` normalizes and validates
all of them up front, so a bad record stops the run before any tokenization.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megatron_kaja.data.records import DataFormatError, Message, normalize_record
from megatron_kaja.data.sources import DataSource
from megatron_kaja.text_files import iter_text_lines

JSONL_SUFFIXES = (".jsonl", ".ndjson")
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet")


def read_records(source: DataSource) -> Iterator[tuple[str, Any]]:
    """Yield `(location, raw record)` for every record of `source`, in file order."""
    path = Path(source.path)
    if not path.exists() and (path.suffix in FILE_SUFFIXES or "/" not in source.path):
        raise DataFormatError(f"{path}: no such file")
    if path.is_file():
        if path.suffix in JSONL_SUFFIXES:
            yield from _read_jsonl(path)
        elif path.suffix == ".json":
            yield from _read_json(path)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path)
        else:
            raise DataFormatError(
                f"{path}: unsupported file type '{path.suffix}'; use .jsonl, .json, .parquet "
                "or an HF datasets directory / hub id"
            )
    else:
        yield from _read_hf_dataset(source)


def load_conversations(source: DataSource) -> list[list[Message]]:
    """Read and validate every record of `source` as a list of chat messages."""
    conversations = [normalize_record(rec, where) for where, rec in read_records(source)]
    if not conversations:
        raise DataFormatError(f"{source.path}: no records")
    return conversations


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    for lineno, line in iter_text_lines(path, DataFormatError):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(
                f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        yield f"{path}:{lineno}", record


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads("".join(line for _, line in iter_text_lines(path, DataFormatError)))
    except json.JSONDecodeError as exc:
        raise DataFormatError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: a .json file must hold a list of records")
    for i, record in enumerate(data):
        yield f"{path}: record {i}", record


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    for i, record in enumerate(table.to_pylist()):
        yield f"{path}: row {i}", record


def _read_hf_dataset(source: DataSource) -> Iterator[tuple[str, Any]]:
    """A `save_to_disk` directory, a directory of data files, or a hub id."""
    import datasets

    path = Path(source.path)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        dataset = datasets.load_from_disk(str(path))
    else:  # a directory of data files, or a hub id ("owner/name")
        dataset = datasets.load_dataset(source.path, source.name, split=source.split)
    if isinstance(dataset, datasets.DatasetDict):
        if source.split not in dataset:
            raise DataFormatError(
                f"{source.path}: split '{source.split}' not found; has {sorted(dataset)}"
            )
        dataset = dataset[source.split]
    for i, record in enumerate(dataset):
        yield f"{source.path}[{source.split}]: row {i}", record
