"""Judgements keyed by everything that determines them, kept in memory and optionally in
an append-only JSONL file (a killed run loses at most the line being written)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def judgement_key(judge_id: str, mode: str, messages: list[dict[str, str]]) -> str:
    """sha256 over (judge model, reading mode, rendered messages): the rendered messages
    hold the rubric, question, reference, answer and axis, so equal keys mean equal work."""
    payload = json.dumps([judge_id, mode, messages], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class JudgeCache:
    """Readable judgements by key. Unreadable ones are never stored: a later run retries."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._entries: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            self._entries.update(read_jsonl_tolerant(self.path, key="key"))

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> dict | None:
        return self._entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        self._entries[key] = entry
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, **entry}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


def read_jsonl_tolerant(path: Path, key: str) -> dict[str, dict]:
    """Records of an append-only JSONL file by `key`. A torn last line (the process was
    killed while writing it) is dropped; a bad line elsewhere is corruption and raises."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: dict[str, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({exc})") from exc
        out[record[key]] = record
    return out
