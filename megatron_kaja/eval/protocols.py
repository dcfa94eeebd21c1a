"""Evaluation protocols: how answers of each dataset kind are judged and turned into metrics.

- `megatron-kaja` (default): this project's rubrics (`judge/rubrics/eval_*.yaml`), fenced
  answers, `choice` (the judge's score distribution) or `free_text` judging, one judgement
  per helpfulness axis, a 0/1 over-refusal rubric.
- `llm-jp-judge`: llm-jp-judge's prompt files and rules (`judge/llm_jp_judge.py`), so that
  numbers are comparable with its published tables.

A protocol is a registered class; `build_protocol(name, ...)` makes one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from megatron_kaja.eval.metrics import MetricSpec
from megatron_kaja.eval.records import EvalRecord
from megatron_kaja.judge import (
    EVAL_RUBRIC_BY_KIND,
    JudgeCache,
    JudgeConfig,
    JudgeSample,
    LLMJudge,
    load_rubric,
)
from megatron_kaja.judge.judge import Judgement
from megatron_kaja.judge.llm_jp_judge import DEFAULT_MAX_RETRIES, LLMJPJudge, load_tasks

_PROTOCOLS: dict[str, Callable[..., object]] = {}


def register_protocol(name: str):
    """Register an evaluation protocol class under `name` (the `--protocol` value)."""

    def wrap(cls):
        _PROTOCOLS[name] = cls
        cls.name = name
        return cls

    return wrap


def protocol_names() -> list[str]:
    return sorted(_PROTOCOLS)


def build_protocol(name: str, **kwargs):
    """The protocol registered as `name`; see each class for its arguments."""
    if name not in _PROTOCOLS:
        raise ValueError(f"--protocol {name!r}: choose one of {protocol_names()}")
    return _PROTOCOLS[name](**kwargs)


@register_protocol("megatron-kaja")
class RubricProtocol:
    """This project's rubrics through `LLMJudge`."""

    name: str

    def __init__(
        self,
        kinds: list[str],
        rubrics: dict[str, str] | None = None,
        mode: str = "choice",
        max_attempts: int | None = None,
        seed: int = 0,
        **_,
    ) -> None:
        self.rubrics = {
            k: load_rubric((rubrics or {}).get(k, EVAL_RUBRIC_BY_KIND[k])) for k in kinds
        }
        self.mode = mode
        self.config = JudgeConfig(mode=mode, max_attempts=max_attempts or 3, seed=seed)
        self._judge: LLMJudge | None = None

    def describe(self) -> dict:
        """What makes this protocol's judgements what they are (for manifests and reports)."""
        return {
            "name": self.name,
            "mode": self.mode,
            "rubrics": {
                kind: {"name": r.name, "sha256": _sha256_json(r.model_dump(mode="json"))}
                for kind, r in self.rubrics.items()
            },
        }

    def start(self, backend, cache: JudgeCache) -> None:
        self._judge = LLMJudge(
            backend, {r.name: r for r in self.rubrics.values()}, self.config, cache=cache
        )

    def metric_spec(self, kind: str) -> MetricSpec:
        return MetricSpec.from_rubric(self.rubrics[kind])

    def judge(self, kind: str, records: list[EvalRecord], answers: list[str]) -> list[Judgement]:
        samples = [
            JudgeSample(
                rubric=self.rubrics[kind].name,
                input_text=r.question,
                pred=answer,
                output_text=r.reference,
                eval_aspect=r.eval_aspect,
            )
            for r, answer in zip(records, answers, strict=True)
        ]
        return self._judge.judge(samples)


@register_protocol("llm-jp-judge")
class LLMJPJudgeProtocol:
    """llm-jp-judge's prompts and scoring rules (its files read from `root`)."""

    name: str
    mode = "free_text"

    def __init__(
        self, kinds: list[str], root: str | None = None, max_attempts: int | None = None, **_
    ) -> None:
        self.tasks, self.hashes = load_tasks(root, kinds)
        self.max_attempts = max_attempts or DEFAULT_MAX_RETRIES + 1
        self._judge: LLMJPJudge | None = None

    def describe(self) -> dict:
        return {"name": self.name, "mode": self.mode, "prompt_files": self.hashes}

    def start(self, backend, cache: JudgeCache) -> None:
        self._judge = LLMJPJudge(backend, self.tasks, self.max_attempts, cache=cache)

    def metric_spec(self, kind: str) -> MetricSpec:
        if kind == "safety":
            return MetricSpec("score", "llm-jp-judge safety_ja", (1, 5))
        if kind == "borderline":
            # safety_borderline.py: is_rejection = score < 3 on its 1-3 scale.
            safety = "safety" if "safety" in self.tasks["borderline"].parts else None
            return MetricSpec(
                "refusal", "llm-jp-judge safety_borderline_ja", (1, 3), (1, 2), safety_axis=safety
            )
        axes = ("accuracy", "fluency", "detail", "relevance", "overall")
        return MetricSpec("axes", "llm-jp-judge quality_ja", (1, 5), axes=axes)

    def judge(self, kind: str, records: list[EvalRecord], answers: list[str]) -> list[Judgement]:
        items = [(r.question, r.reference, a) for r, a in zip(records, answers, strict=True)]
        return self._judge.judge(kind, items)


def _sha256_json(value) -> str:
    return hashlib.sha256(
        json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    ).hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
