"""The LLM judge: rubric + generation backend -> scores, with retries, dedup and caching.

Two ways to read a score (`JudgeConfig.mode`):
- `choice`: the judge may only answer one of the score strings; the judgement keeps the
  judge's probability of every score (`choice_logprobs` from the `hf` backend, or the first
  position's `top_logprobs` from vLLM) and its expected score. One generated token. A
  backend that returns no log-probabilities leaves only the chosen string: that reading is
  marked `method="choice"` and counted in the report, never passed off as a distribution.
- `free_text`: the judge writes freely and `parse_score` reads its final verdict, after
  blanking anything the judge copied verbatim from the answer (`mask_quoted`): a score
  forged in the answer and quoted by the judge is not the judge's score.
An output that cannot be read is asked again (sampling, so that the retry can differ), and
after `max_attempts` reported as `None` with the final reason `unreadable`, never counted as
any score. A request that failed (the backend's own retries spent) is reported as `None` with
its error at once and has no final reason: a rerun asks again.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from megatron_kaja.inference import GenerationBackend, GenerationRequest, GenerationResult
from megatron_kaja.judge.cache import JudgeCache, judgement_key
from megatron_kaja.judge.rubric import JudgeMode, Rubric
from megatron_kaja.judge.scores import mask_quoted, parse_score, score_distribution

logger = logging.getLogger(__name__)


@dataclass
class JudgeConfig:
    """How the judge asks and reads."""

    mode: JudgeMode = "choice"
    max_attempts: int = 3
    top_logprobs: int = 20  # vLLM's default cap on --max-logprobs is 20
    free_text_max_tokens: int = 1024
    retry_temperature: float = 0.7
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("choice", "free_text"):
            raise ValueError(f"judge mode must be 'choice' or 'free_text', got {self.mode!r}")
        if self.max_attempts < 1:
            raise ValueError("judge max_attempts must be >= 1")


@dataclass
class JudgeSample:
    """What one judgement is about. `rubric` names a rubric known to the `LLMJudge`."""

    rubric: str
    input_text: str
    pred: str
    output_text: str = ""
    eval_aspect: str = ""


@dataclass
class Judgement:
    """The judge's verdict on one sample. `score` is on the rubric's scale (the primary axis
    for multi-axis rubrics), `normalized` in [0, 1]; both None when it could not be read."""

    score: float | None
    normalized: float | None
    axes: dict[str, float | None] = field(default_factory=dict)
    method: str | None = None  # "expected" | "choice" (no log-probs) | "parsed"
    # P(score) of the primary judgement, keys are the scores as strings (JSON object keys).
    probs: dict[str, float] | None = None
    attempts: int = 0
    completion_tokens: int = 0
    raw: list[str] = field(default_factory=list)
    error: str | None = None
    # Why a judgement without a score is final ("unreadable"); None with a score, and None
    # when the request failed (a rerun retries it).
    reason: str | None = None


def _from_distribution(probs: dict[int, float], method: str) -> dict:
    return {
        "score": sum(s * p for s, p in probs.items()),
        "probs": {str(s): p for s, p in probs.items()},
        "method": method,
    }


def read_score(
    result: GenerationResult, rubric: Rubric, mode: JudgeMode, quoted: str = ""
) -> dict | None:
    """Score one backend result, or None when it is unreadable. `quoted` is the answer
    under judgement: in free text, what the judge copied from it is not read."""
    if not result.ok:
        return None
    scores = rubric.scale.scores
    if mode == "choice":
        if result.choice_logprobs:
            # Exact: softmax over the choices' own log-probabilities.
            top = max(result.choice_logprobs.values())
            weights = {int(c): math.exp(lp - top) for c, lp in result.choice_logprobs.items()}
            total = sum(weights.values())
            return _from_distribution({s: w / total for s, w in weights.items()}, "expected")
        if result.top_logprobs:
            probs = score_distribution(result.top_logprobs[0], scores)
            if probs is not None:
                return _from_distribution(probs, "expected")
        # Constrained text without usable log-probs: the chosen score alone, marked so that
        # the report counts it (rates then read it as certain).
        value = parse_score(result.text, scores)
        return None if value is None else _from_distribution({value: 1.0}, "choice")
    value = parse_score(mask_quoted(result.text, quoted), scores)
    return None if value is None else _from_distribution({value: 1.0}, "parsed")


class LLMJudge:
    """Judges samples with `backend` under named `rubrics`."""

    def __init__(
        self,
        backend: GenerationBackend,
        rubrics: dict[str, Rubric],
        config: JudgeConfig | None = None,
        cache: JudgeCache | None = None,
    ) -> None:
        self.backend = backend
        self.rubrics = rubrics
        self.config = config or JudgeConfig()
        self.cache = cache if cache is not None else JudgeCache()
        config_ = getattr(backend, "config", None)
        self.judge_id = f"{backend.name}:{getattr(config_, 'model', '')}"

    def _request(self, messages, rubric: Rubric, attempt: int) -> GenerationRequest:
        cfg = self.config
        # Retries sample: a greedy judge would repeat the unreadable output word for word.
        temperature = 0.0 if attempt == 1 else cfg.retry_temperature
        if cfg.mode == "choice":
            return GenerationRequest(
                messages=messages,
                max_tokens=4,
                temperature=temperature,
                seed=cfg.seed + attempt,
                choices=rubric.choices,
                top_logprobs=cfg.top_logprobs,
            )
        return GenerationRequest(
            messages=messages,
            max_tokens=cfg.free_text_max_tokens,
            temperature=temperature,
            seed=cfg.seed + attempt,
        )

    def judge(self, samples: list[JudgeSample]) -> list[Judgement]:
        """One `Judgement` per sample, in order. Raises before any request when a sample
        names an unknown rubric or lacks a field its rubric needs."""
        units = []  # (sample index, axis, key, messages, rubric)
        for i, sample in enumerate(samples):
            if sample.rubric not in self.rubrics:
                raise KeyError(
                    f"sample {i}: unknown rubric {sample.rubric!r}; have {sorted(self.rubrics)}"
                )
            rubric = self.rubrics[sample.rubric]
            fields = {
                "input_text": sample.input_text,
                "output_text": sample.output_text,
                "pred": sample.pred,
                "eval_aspect": sample.eval_aspect,
            }
            for axis in rubric.axis_names():
                try:
                    messages = rubric.render(fields, self.config.mode, axis)
                except KeyError as exc:
                    raise KeyError(f"sample {i}: {exc.args[0]}") from exc
                key = judgement_key(self.judge_id, self.config.mode, messages)
                units.append((i, axis, key, messages, rubric, sample.pred))

        # Identical requests (same rubric, question, reference, answer, axis) run once.
        pending = {key: (messages, rubric, pred) for _, _, key, messages, rubric, pred in units}
        pending = {k: v for k, v in pending.items() if self.cache.get(k) is None}
        trace: dict[str, dict] = {
            k: {"attempts": 0, "raw": [], "tokens": 0, "error": None} for k in pending
        }
        for attempt in range(1, self.config.max_attempts + 1):
            if not pending:
                break
            keys = list(pending)
            requests = [self._request(pending[k][0], pending[k][1], attempt) for k in keys]
            for key, result in zip(keys, self.backend.generate(requests), strict=True):
                t = trace[key]
                t["attempts"] = attempt
                t["tokens"] += result.completion_tokens
                t["raw"].append(result.text if result.ok else f"<error: {result.error}>")
                t["error"] = result.error
                read = read_score(result, pending[key][1], self.config.mode, pending[key][2])
                if read is not None:
                    self.cache.put(key, {**read, "raw": result.text, "attempts": attempt})
                    del pending[key]
                elif not result.ok:
                    # The backend already retried it within its deadline; asking again
                    # would multiply that deadline by our attempts (re-asking is for
                    # outputs that could not be read).
                    del pending[key]

        without_logprobs = sum(
            1 for key in trace if (self.cache.get(key) or {}).get("method") == "choice"
        )
        if without_logprobs:
            logger.warning(
                "judge: %d choice-mode judgements came without log-probabilities; their "
                "scores are the chosen strings (counted as choice_without_logprobs)",
                without_logprobs,
            )
        by_sample: dict[int, dict[str | None, tuple[str, dict | None]]] = {}
        for i, axis, key, *_ in units:
            by_sample.setdefault(i, {})[axis] = (key, self.cache.get(key))
        return [self._assemble(samples[i], by_sample[i], trace) for i in range(len(samples))]

    def _assemble(self, sample: JudgeSample, axes: dict, trace: dict) -> Judgement:
        rubric = self.rubrics[sample.rubric]
        axis_scores = {a: (e["score"] if e else None) for a, (_, e) in axes.items()}
        primary = rubric.primary_axis if rubric.axes else None
        score = axis_scores[primary]
        keys = [k for k, _ in axes.values()]
        fresh = [trace[k] for k in keys if k in trace]
        entries = [e for _, e in axes.values() if e]
        methods = {e["method"] for e in entries}
        # "choice" (no log-probs) in any axis marks the whole judgement.
        method = "choice" if "choice" in methods else (methods.pop() if len(methods) == 1 else None)
        # The error of a request that failed for good, on any axis: the sample is not final
        # (a rerun asks the failed axes again; the readable ones come from the cache).
        failed = [trace[k] for k, e in axes.values() if e is None and k in trace]
        error = next((t["error"] for t in failed if t["error"]), None)
        primary_entry = axes[primary][1]
        return Judgement(
            score=score,
            normalized=None if score is None else rubric.normalize(score),
            axes={a: s for a, s in axis_scores.items() if a is not None},
            method=method,
            probs=primary_entry.get("probs") if primary_entry else None,
            attempts=max((t["attempts"] for t in fresh), default=0),
            completion_tokens=sum(t["tokens"] for t in fresh),
            raw=[r for t in fresh for r in t["raw"]] or [e["raw"] for e in entries],
            error=error,
            # The judge answered every time and never readably: asking again costs the same
            # and reads the same, so this is final. A failed request is not.
            reason="unreadable" if score is None and error is None else None,
        )
