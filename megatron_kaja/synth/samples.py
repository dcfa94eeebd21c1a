"""Seed questions and the samples made from them, each with a stable id."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from megatron_kaja.eval.records import load_records
from megatron_kaja.synth.config import SeedFile


@dataclass(frozen=True)
class SeedQuestion:
    """One seed record: where it is from and its question text."""

    kind: str
    source: str  # the seed file's name
    seed_id: str
    text: str


@dataclass(frozen=True)
class Sample:
    """Sample `index` of a seed question: one new question and its answer to be made."""

    id: str
    seed: SeedQuestion
    index: int

    @property
    def request_seed(self) -> int:
        """A sampling seed per sample (31 bits, what vLLM and OpenAI accept), from the id."""
        return int(self.id[:8], 16) & 0x7FFFFFFF


def load_seed_questions(seed_files: list[SeedFile]) -> list[SeedQuestion]:
    """Every seed record of every file, validated before any request is made.

    AnswerCarefully / llm-jp-instructions (`ID`, `text`) and ELYZA-tasks-100 (`input`)
    schemas; a malformed line or a missing field is an error naming the file and line.
    """
    seeds = []
    for seed_file in seed_files:
        # The evaluation reader knows these schemas and reports file:line errors.
        records = load_records(seed_file.path, seed_file.kind, with_predictions=False)
        source = Path(seed_file.path).name
        for record in records:
            if not record.question.strip():
                raise ValueError(f"{seed_file.path}: record {record.id!r} has an empty question")
            seeds.append(SeedQuestion(seed_file.kind, source, record.id, record.question))
    return seeds


def sample_id(fingerprint: str, seed: SeedQuestion, index: int) -> str:
    """sha256 over (generation settings, seed record, sample index): the same seed, index and
    settings give the same id in every run, which is how a rerun knows what is done."""
    key = json.dumps([fingerprint, seed.source, seed.seed_id, seed.text, index], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def iter_samples(
    seeds: list[SeedQuestion], fingerprints: dict[str, str], rounds: int, done: set[str]
) -> Iterator[Sample]:
    """Samples in rounds (index 0 of every seed, then index 1, ...), skipping `done` ids, so
    that a target count stopped early still covers all seeds evenly."""
    for index in range(rounds):
        for seed in seeds:
            sid = sample_id(fingerprints[seed.kind], seed, index)
            if sid not in done:
                yield Sample(sid, seed, index)
