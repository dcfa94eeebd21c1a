"""On-policy preference pairs from the judge (`tools/make_preference_data.py`).

For each prompt of the `PATH:KIND` files (GRPO's prompt schemas and kinds) the model answers
`--num-samples` times; the judge scores every answer with the rubric of the prompt's kind
(the GRPO reward's rubrics, against the record's reference answer); the best and the worst
answer make a pair when their scores differ by at least `--margin`. The pair is written in
TRL's preference schema (what `train_dpo.py` reads) with both scores, all scores and the
judge's identity.

Crash-safe and resumable like `generate_sft_data.py` (the same append-only store): each
prompt's outcome is one whole line, a pair in OUT or a drop with its reason in
`OUT.rejected.jsonl`; a rerun skips the prompts already there. A prompt whose answers could
not all be generated or judged (a server down after its retries) is not recorded: the next
run tries it again. Answers are seeded per (prompt, sample), so a rerun asks for the same
samples.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from megatron_kaja.data.readers import read_records
from megatron_kaja.data.records import DataFormatError
from megatron_kaja.data.sources import DataSource
from megatron_kaja.inference import GenerationRequest
from megatron_kaja.inference.models import build_model_backend
from megatron_kaja.judge.rubric import REWARD_RUBRIC_BY_KIND

logger = logging.getLogger("megatron_kaja.pairs")
BACKENDS = Literal["openai", "vllm", "hf"]


class PairSettings(BaseModel):
    """prompts, pairs and output"""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(
        min_length=1, description="prompt files PATH:KIND, KIND safety or helpful"
    )
    out: Path = Field(description="output JSONL of pairs (resumed if it exists)")
    num_samples: int = Field(default=8, ge=2, description="answers sampled per prompt")
    margin: float = Field(
        default=1.0, ge=0, description="keep (best, worst) when their scores differ by this"
    )
    max_prompts: int | None = Field(default=None, gt=0, description="stop after N prompts")
    prompts_per_batch: int = Field(
        default=8, gt=0, description="prompts whose answers are generated and judged together"
    )
    dry_run: bool = Field(
        default=False, description="check settings and prompt files, send nothing, exit"
    )
    allow_missing_files: bool = Field(
        default=False, description="dry run: list files absent here instead of failing"
    )


class GeneratorSettings(BaseModel):
    """the model that answers"""

    backend: BACKENDS = Field(default="openai", description="where the model runs")
    model: str = Field(description="served model name, or a checkpoint path (HF)")
    base_url: str | None = Field(default=None, description="OpenAI-compatible URL (openai)")
    api_key_env: str | None = Field(default=None, description="variable holding the API key")
    concurrency: int = Field(default=64, gt=0, description="requests in flight / batch size")
    temperature: float = Field(default=1.0, gt=0, description="sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="nucleus sampling mass")
    max_tokens: int = Field(default=512, gt=0, description="answer length bound")
    seed: int = Field(default=0, description="base of the per-answer sampling seeds")


class JudgeSettings(BaseModel):
    """the judge"""

    judge_backend: BACKENDS = Field(default="openai", description="where the judge runs")
    judge_model: str = Field(description="judge model name or path")
    judge_base_url: str | None = Field(default=None, description="OpenAI-compatible judge URL")
    judge_api_key_env: str | None = Field(default=None, description="variable with its key")
    judge_concurrency: int = Field(default=64, gt=0, description="judge requests in flight")
    judge_mode: Literal["choice", "free_text"] = Field(
        default="choice", description="score from the choice's log-probs, or parsed text"
    )


class PairConfig(PairSettings, GeneratorSettings, JudgeSettings):
    """Every setting of `tools/make_preference_data.py` (the flags without dashes)."""

    @model_validator(mode="after")
    def _consistent(self) -> PairConfig:
        for spec in self.prompts:
            path, _, kind = spec.rpartition(":")
            if not path or kind not in REWARD_RUBRIC_BY_KIND:
                kinds = " or ".join(sorted(REWARD_RUBRIC_BY_KIND))
                raise ValueError(f"--prompts {spec!r}: use PATH:KIND with KIND {kinds}")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("--backend openai needs --base-url (e.g. http://host:8000/v1)")
        if self.judge_backend == "openai" and not self.judge_base_url:
            raise ValueError("--judge-backend openai needs --judge-base-url")
        for flag, name in (("--api-key-env", self.api_key_env),
                           ("--judge-api-key-env", self.judge_api_key_env)):  # fmt: skip
            if name and name not in os.environ:
                raise ValueError(f"{flag}: environment variable {name} is not set")
        return self


def read_prompts(specs: list[str]) -> list[dict]:
    """The prompts of `PATH:KIND` files: id, question, kind, reference answer, aspect, source."""
    prompts, seen = [], set()
    for spec in specs:
        path, _, kind = spec.rpartition(":")
        for location, record in read_records(DataSource(path=path)):
            if not isinstance(record, dict):
                raise DataFormatError(f"{location}: a prompt record is a JSON object")
            question = record.get("text") or record.get("input") or record.get("question")
            if not isinstance(question, str) or not question.strip():
                raise DataFormatError(
                    f"{location}: field 'text' (or 'input' / 'question') is missing or empty"
                )
            reference = record.get("output") or record.get("answer") or ""
            # The id follows from what is asked and how it is judged, not from the file's
            # order: a rerun over an edited file still skips the prompts already done.
            key = f"{kind}\0{question}\0{reference}".encode()
            prompt_id = hashlib.sha256(key).hexdigest()[:20]
            if prompt_id in seen:  # the same question twice: one pair
                continue
            seen.add(prompt_id)
            prompts.append(
                {
                    "id": prompt_id,
                    "question": question,
                    "kind": kind,
                    "reference": reference,
                    "eval_aspect": record.get("eval_aspect") or "",
                    "source": location,
                }
            )
    if not prompts:
        raise DataFormatError(f"--prompts {' '.join(specs)}: no prompts")
    return prompts


def answer_seed(base: int, prompt_id: str, sample: int) -> int:
    """A sampling seed of one answer, stable across reruns."""
    digest = hashlib.sha256(f"{base}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def choose_pair(answers: list[str], scores: list[float], margin: float) -> tuple[dict | None, str]:
    """(best, worst) of the answers by score, or None and why not. Ties keep the first."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if answers[best].strip() == answers[worst].strip():
        return None, "identical answers"
    if scores[best] - scores[worst] < margin:
        return None, "score gap below margin"
    return {"best": best, "worst": worst}, "kept"


class PairMaker:
    """Generates, judges and records the pairs of one run."""

    def __init__(self, cfg: PairConfig, generator, judge) -> None:
        from megatron_kaja.synth.store import SynthStore

        self.cfg = cfg
        self.generator = generator
        self.judge = judge
        self.store = SynthStore(cfg.out)
        self.retry_later = Counter()
        self.started = time.monotonic()

    def requests(self, prompt: dict) -> list[GenerationRequest]:
        cfg = self.cfg
        messages = [{"role": "user", "content": prompt["question"]}]
        return [
            GenerationRequest(
                messages=messages,
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=answer_seed(cfg.seed, prompt["id"], j),
            )
            for j in range(cfg.num_samples)
        ]

    def run_batch(self, prompts: list[dict]) -> None:
        """Answer, judge and record a batch of prompts."""
        from megatron_kaja.judge import JudgeSample

        requests = [r for p in prompts for r in self.requests(p)]
        results = self.generator.generate(requests)
        n = self.cfg.num_samples
        answered = []
        for i, prompt in enumerate(prompts):
            outs = results[i * n : (i + 1) * n]
            if not all(r.ok and r.text and r.text.strip() for r in outs):
                self.retry_later["generation failed"] += 1
                continue
            answered.append((prompt, [r.text for r in outs]))
        samples = [
            JudgeSample(
                rubric=REWARD_RUBRIC_BY_KIND[prompt["kind"]],
                input_text=prompt["question"],
                pred=answer,
                output_text=prompt["reference"],
                eval_aspect=prompt["eval_aspect"],
            )
            for prompt, answers in answered
            for answer in answers
        ]
        judgements = self.judge.judge(samples) if samples else []
        for k, (prompt, answers) in enumerate(answered):
            scores = [j.score for j in judgements[k * n : (k + 1) * n]]
            if any(s is None for s in scores):
                self.retry_later["judge gave no score"] += 1
                continue
            self.record(prompt, answers, scores)

    def record(self, prompt: dict, answers: list[str], scores: list[float]) -> None:
        chosen, reason = choose_pair(answers, scores, self.cfg.margin)
        base = {
            "id": prompt["id"],
            "kind": prompt["kind"],
            "source": prompt["source"],
            "scores": scores,
            "judge": self.judge.judge_id,
            "rubric": REWARD_RUBRIC_BY_KIND[prompt["kind"]],
            "generator": self.cfg.model,
        }
        if chosen is None:
            self.store.append_rejected({**base, "reason": reason, "prompt": prompt["question"]})
            return
        self.store.append_accepted(
            {
                "prompt": prompt["question"],
                "chosen": answers[chosen["best"]],
                "rejected": answers[chosen["worst"]],
                "chosen_score": scores[chosen["best"]],
                "rejected_score": scores[chosen["worst"]],
                **base,
            }
        )

    def summary(self, total: int) -> dict:
        done = self.store.accepted_count + sum(self.store.rejected_counts.values())
        return {
            "prompts": total,
            "done": done,
            "pairs": self.store.accepted_count,
            "dropped": dict(self.store.rejected_counts),
            "not_done_retry_next_run": dict(self.retry_later),
            "generator": self.cfg.model,
            "judge": self.judge.judge_id,
            "num_samples": self.cfg.num_samples,
            "margin": self.cfg.margin,
            "elapsed_s": round(time.monotonic() - self.started, 1),
        }


def plan_pairs(cfg: PairConfig) -> int:
    """`--dry-run`: the settings and the prompt files (read through the same validators);
    no request is sent. 0 when the run can start, 1 when files are missing."""
    from megatron_kaja.recipe import dry_run_result, report_files

    print("dry run: tools/make_preference_data.py (no request is sent)")
    print(
        f"policy: {cfg.backend} {cfg.model} at {cfg.base_url}; {cfg.num_samples} answers per "
        f"prompt, T={cfg.temperature} top-p {cfg.top_p}, <= {cfg.max_tokens} tokens"
    )
    print(
        f"judge: {cfg.judge_backend} {cfg.judge_model} at {cfg.judge_base_url} ({cfg.judge_mode}); "
        f"rubrics {REWARD_RUBRIC_BY_KIND}; pairs kept at a score gap >= {cfg.margin}"
    )
    paths = [spec.rpartition(":")[0] for spec in cfg.prompts]
    missing = report_files([("--prompts", path) for path in paths])
    present = [spec for spec, path in zip(cfg.prompts, paths, strict=True) if Path(path).exists()]
    if present:
        print(f"prompts: {len(read_prompts(present))} (distinct) in the files found")
    return dry_run_result(missing, cfg.allow_missing_files)


def make_preference_pairs(cfg: PairConfig) -> dict:
    """Run the whole pass (resuming OUT); returns the summary (also written beside OUT)."""
    from megatron_kaja.judge import JudgeConfig, LLMJudge, load_rubric

    prompts = read_prompts(cfg.prompts)
    if cfg.max_prompts is not None:
        prompts = prompts[: cfg.max_prompts]
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    generator = build_model_backend(
        cfg.backend, cfg.model, base_url=cfg.base_url, api_key=key,
        concurrency=cfg.concurrency, seed=None if cfg.backend == "openai" else cfg.seed,
    )  # fmt: skip
    judge_key = os.environ.get(cfg.judge_api_key_env) if cfg.judge_api_key_env else None
    judge_backend = build_model_backend(
        cfg.judge_backend, cfg.judge_model, base_url=cfg.judge_base_url, api_key=judge_key,
        concurrency=cfg.judge_concurrency,
    )  # fmt: skip
    generator.check()
    judge_backend.check()
    rubrics = {name: load_rubric(name) for name in set(REWARD_RUBRIC_BY_KIND.values())}
    judge = LLMJudge(judge_backend, rubrics, JudgeConfig(mode=cfg.judge_mode))
    maker = PairMaker(cfg, generator, judge)
    try:
        todo = [p for p in prompts if p["id"] not in maker.store.done_ids]
        logger.info(
            "%d prompts, %d done before, %d to do; %d answers each", len(prompts),
            len(prompts) - len(todo), len(todo), cfg.num_samples,
        )  # fmt: skip
        for start in range(0, len(todo), cfg.prompts_per_batch):
            maker.run_batch(todo[start : start + cfg.prompts_per_batch])
            maker.store.write_summary(maker.summary(len(prompts)))
        summary = maker.summary(len(prompts))
        maker.store.write_summary(summary)
    finally:
        maker.store.close()
        generator.close()
        judge_backend.close()
    return summary
