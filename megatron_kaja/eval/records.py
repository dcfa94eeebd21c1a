"""Evaluation sets as JSONL, checked line by line before any compute.

Accepted schemas (RECIPE.md): AnswerCarefully / ichikara-instruction / llm-jp-instructions
(`ID`, `text`, `output`) and ELYZA-tasks-100 (`input`, `output`, `eval_aspect`). A
predictions file is any of these plus `prediction`, the answer to judge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_kaja.text_files import iter_text_lines

KINDS = ("safety", "borderline", "helpful")


@dataclass(frozen=True)
class EvalRecord:
    """One question of an evaluation set, normalized across schemas."""

    id: str
    question: str
    reference: str = ""
    eval_aspect: str = ""
    prediction: str | None = None


def _text_field(row: dict, names: tuple[str, ...], where: str, required: bool) -> str:
    for name in names:
        if name in row and row[name] is not None:
            if not isinstance(row[name], str):
                raise ValueError(
                    f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}"
                )
            return row[name]
    if required:
        raise ValueError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")
    return ""


def load_records(path: str | Path, kind: str, with_predictions: bool) -> list[EvalRecord]:
    """Read and validate an evaluation JSONL file. Errors name the file, line and field."""
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r} for {path}; choose one of {KINDS}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} dataset {path} not found")
    records: list[EvalRecord] = []
    seen: set[str] = set()
    for number, line in iter_text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object")
        record_id = str(row.get("ID", row.get("id", f"{kind}-{number}")))
        if record_id in seen:
            raise ValueError(f"{where}: duplicate ID {record_id!r}")
        seen.add(record_id)
        records.append(
            EvalRecord(
                id=record_id,
                question=_text_field(row, ("text", "input"), where, required=True),
                reference=_text_field(row, ("output",), where, required=False),
                eval_aspect=_text_field(row, ("eval_aspect",), where, required=False),
                prediction=_text_field(row, ("prediction",), where, required=with_predictions)
                if with_predictions
                else None,
            )
        )
    if not records:
        raise ValueError(f"{path}: no records")
    return records
