"""A synthetic-data run: seed question -> teacher writes a question -> checks -> teacher
answers it -> checks -> one JSONL record, appended as soon as the sample is done.

Each sample's two steps are one generator (`sample_flow`) that yields a request and receives
its result; the drivers in `drivers.py` advance many of them, as results arrive (`openai`)
or in lockstep batches (`hf`, `vllm`). All bookkeeping happens in `SynthRun.record`, in one
thread, so the dedup index and the files need no locks.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass

from tqdm import tqdm

from megatron_kaja.eval.records import load_records
from megatron_kaja.inference import GenerationRequest, GenerationResult
from megatron_kaja.inference.models import build_model_backend
from megatron_kaja.synth.config import SynthConfig
from megatron_kaja.synth.dedup import EvalOverlapIndex, QuestionDeduplicator
from megatron_kaja.synth.drivers import drive_async, drive_batched
from megatron_kaja.synth.quality import REJECTION_REASONS, check_answer, check_question
from megatron_kaja.synth.samples import Sample, iter_samples, load_seed_questions
from megatron_kaja.synth.store import SynthStore
from megatron_kaja.synth.templates import load_templates

REJECTED_TEXT_CHARS = 2000  # the teacher output kept in the rejection journal, for inspection


@dataclass
class Outcome:
    """How one sample ended: `accepted` (record), `rejected` (reason) or `failed` (a request
    failed after all retries; not journaled, so a rerun tries again)."""

    sample: Sample
    status: str
    record: dict | None = None
    reason: str | None = None
    question: str | None = None
    text: str | None = None


Flow = Generator[GenerationRequest, GenerationResult, Outcome]


class SynthRun:
    """Everything one run holds: config, templates, filters, the store and the counters."""

    def __init__(self, cfg: SynthConfig) -> None:
        self.cfg = cfg
        # Check every input before the first request: seeds, templates, evaluation sets.
        self.templates = load_templates(cfg.templates)
        self.seeds = load_seed_questions(cfg.seeds)
        # Evaluation sets in any of the schemas the evaluation reads (the kind only names ids).
        eval_questions = [
            r.question
            for path in cfg.decontaminate
            for r in load_records(path, "helpful", with_predictions=False)
        ]
        self.overlap = (
            EvalOverlapIndex(eval_questions, cfg.decontaminate_ngram, cfg.decontaminate_threshold)
            if eval_questions
            else None
        )
        self.fingerprints = {
            kind: cfg.generation_fingerprint(pair) for kind, pair in self.templates.items()
        }
        self.dedup = QuestionDeduplicator(cfg.near_duplicate_threshold)
        self.stats: Counter = Counter()
        self.last_error: str | None = None
        # Set by `open`:
        self.store: SynthStore | None = None
        self.bar: tqdm | None = None
        self._previous_totals: dict = {}
        self._resumed_with = 0
        self._start = self._last_summary = time.monotonic()

    # -- one sample ---------------------------------------------------------------------
    def request(self, sample: Sample, prompt: str) -> GenerationRequest:
        # Per-sample seeds make a rerun of a sample reproducible on vLLM; the `hf` backend
        # batches only requests with equal settings, so there its config seed is used.
        seed = None if self.cfg.backend == "hf" else sample.request_seed
        return GenerationRequest(
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.cfg.max_tokens,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            seed=seed,
        )

    def sample_flow(self, sample: Sample) -> Flow:
        """The two teacher steps of `sample` and every check between them."""
        pair = self.templates[sample.seed.kind]
        result = yield self.request(sample, pair.question_prompt(sample.seed.text))
        self._count(result)
        if not result.ok:
            return Outcome(sample, "failed", reason=result.error)
        question, reason = check_question(result, self.cfg.quality)
        if question is not None:
            if self.overlap is not None and self.overlap.is_contaminated(question):
                reason = "question_contaminated"
            else:  # claims the question: a later equal one is the duplicate
                repeat = self.dedup.check_and_add(question)
                reason = f"question_{repeat}" if repeat else None
        if reason:
            return Outcome(sample, "rejected", reason=reason, question=question, text=result.text)
        result = yield self.request(sample, pair.answer_prompt(question))
        self._count(result)
        if not result.ok:
            return Outcome(sample, "failed", reason=result.error, question=question)
        answer, reason = check_answer(result, sample.seed.kind, self.cfg.quality)
        if reason:
            return Outcome(sample, "rejected", reason=reason, question=question, text=result.text)
        seed = sample.seed
        record = {
            "id": sample.id,
            "kind": seed.kind,
            "source": seed.source,
            "seed_id": seed.seed_id,
            "question": question,
            "answer": answer,
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            "teacher": self.cfg.model,
        }
        return Outcome(sample, "accepted", record=record)

    def _count(self, result: GenerationResult) -> None:
        self.stats["requests"] += 1
        self.stats["retries"] += result.attempts - 1
        self.stats["prompt_tokens"] += result.prompt_tokens
        self.stats["completion_tokens"] += result.completion_tokens

    # -- bookkeeping --------------------------------------------------------------------
    def record(self, outcome: Outcome) -> None:
        """Write a finished sample and update counters, progress and (every few s) the summary."""
        sample = outcome.sample
        if outcome.status == "accepted":
            self.store.append_accepted(outcome.record)
        elif outcome.status == "rejected":
            self.store.append_rejected(
                {
                    "id": sample.id,
                    "kind": sample.seed.kind,
                    "source": sample.seed.source,
                    "seed_id": sample.seed.seed_id,
                    "index": sample.index,
                    "reason": outcome.reason,
                    "question": outcome.question,
                    "text": (outcome.text or "")[:REJECTED_TEXT_CHARS],
                }
            )
        else:
            self.last_error = outcome.reason
        self.stats[outcome.status] += 1
        if self.cfg.target_count is None or outcome.status == "accepted":
            self.bar.update(1)
        now = time.monotonic()
        if now - self._last_summary >= self.cfg.summary_interval_s:
            self._last_summary = now
            self.bar.set_postfix(
                accepted=self.stats["accepted"],
                rejected=self.stats["rejected"],
                failed=self.stats["failed"],
                refresh=False,
            )
            self.store.write_summary(self.summary())

    def admit(self, in_flight: int) -> bool:
        """May another sample start? With a target, only while all that are in flight could
        be accepted without passing it: the output never holds more than the target."""
        target = self.cfg.target_count
        return target is None or self.store.accepted_count + in_flight < target

    def summary(self) -> dict:
        """Counts over all runs into this output, plus this run's own figures."""
        seconds = time.monotonic() - self._start
        this_run = {k: self.stats[k] for k in ("accepted", "rejected", "failed")}
        this_run.update(
            requests=self.stats["requests"],
            retries=self.stats["retries"],
            prompt_tokens=self.stats["prompt_tokens"],
            completion_tokens=self.stats["completion_tokens"],
            seconds=round(seconds, 3),
            requests_per_s=round(self.stats["requests"] / seconds, 2) if seconds else 0.0,
            resumed_with_accepted=self._resumed_with,
            repaired_torn_bytes=self.store.repaired_bytes,
            last_error=self.last_error,
        )
        before = self._previous_totals
        return {
            "out": str(self.store.out),
            "teacher": self.cfg.model,
            "backend": self.cfg.backend,
            "accepted": self.store.accepted_count,
            "rejected": {r: self.store.rejected_counts.get(r, 0) for r in REJECTION_REASONS},
            "rejected_total": sum(self.store.rejected_counts.values()),
            "requests": before.get("requests", 0) + self.stats["requests"],
            "tokens": {
                "prompt": before.get("prompt_tokens", 0) + self.stats["prompt_tokens"],
                "completion": before.get("completion_tokens", 0) + self.stats["completion_tokens"],
            },
            "seconds": round(before.get("seconds", 0.0) + seconds, 3),
            "this_run": this_run,
        }

    def rounds(self) -> int:
        """Samples per seed to make (with a target: at most this many)."""
        cfg = self.cfg
        if cfg.samples_per_seed is not None:
            return cfg.samples_per_seed
        return cfg.max_samples_per_seed or 10 * math.ceil(cfg.target_count / len(self.seeds))

    def samples(self) -> Iterator[Sample]:
        """Samples not done yet, in rounds over the seeds."""
        return iter_samples(self.seeds, self.fingerprints, self.rounds(), self.store.done_ids)

    def open(self) -> None:
        """Open the output (repairing a torn tail), rebuild the dedup index from it, and start
        the progress bar and the clock."""
        cfg = self.cfg
        self.store = SynthStore(cfg.out)
        for record in self.store.previous_accepted:
            self.dedup.check_and_add(record["question"])
        for entry in self.store.previous_rejected:
            # Questions rejected only at the answer step were claimed in the dedup index.
            if entry.get("question") and entry["reason"].startswith("answer_"):
                self.dedup.check_and_add(entry["question"])
        self.store.previous_accepted = self.store.previous_rejected = []  # free the memory
        previous = self.store.previous_summary() or {}
        self._previous_totals = {
            "requests": previous.get("requests", 0),
            "prompt_tokens": previous.get("tokens", {}).get("prompt", 0),
            "completion_tokens": previous.get("tokens", {}).get("completion", 0),
            "seconds": previous.get("seconds", 0.0),
        }
        self._resumed_with = self.store.accepted_count
        if cfg.target_count is not None:  # counts accepted pairs
            total, done, unit = cfg.target_count, self.store.accepted_count, "pair"
        else:  # counts finished samples
            total, done, unit = len(self.seeds) * self.rounds(), len(self.store.done_ids), "sample"
        self.bar = tqdm(
            total=total,
            initial=min(done, total),
            unit=unit,
            desc="synth",
            smoothing=0.05,  # a steady rate and ETA over a run of hours
            disable=not cfg.progress,
        )
        self._start = self._last_summary = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.store is not None:
            self.store.close()


def run_synthesis(cfg: SynthConfig) -> dict:
    """Run (or resume) generation into `cfg.out`; return the summary written beside it."""
    run = SynthRun(cfg)  # seeds, templates and eval sets are checked here, before any request
    backend = _build_teacher(cfg)
    backend.check()
    run.open()
    try:
        if hasattr(backend, "session"):  # results as they arrive
            drive_async(run, backend, cfg.concurrency)
        else:  # offline engines: lockstep batches
            drive_batched(run, backend, cfg.concurrency)
        summary = run.summary()
        run.store.write_summary(summary)
        return summary
    finally:
        run.close()
        backend.close()


def _build_teacher(cfg: SynthConfig):
    options = {"timeout_s": cfg.timeout_s, "max_attempts": cfg.max_attempts}
    return build_model_backend(
        cfg.backend,
        cfg.model,
        base_url=cfg.base_url,
        api_key=cfg.api_key,
        concurrency=cfg.concurrency,
        seed=None if cfg.backend == "openai" else cfg.seed,
        **(options if cfg.backend == "openai" else {}),
    )
