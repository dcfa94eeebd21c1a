"""An evaluation run: answers (generated or read) -> judge -> metrics -> report.

Everything that can be wrong with the input is checked before the first answer is
generated: dataset files and kinds, rubrics, a reachable judge, the answer model. Each
sample's prediction and judgement are appended to `OUT/<kind>/*.jsonl` as soon as they
exist, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from megatron_kaja.eval.metrics import dataset_metrics
from megatron_kaja.eval.records import EvalRecord, load_records
from megatron_kaja.eval.report import atomic_write_text, write_report
from megatron_kaja.inference import GenerationRequest, build_backend
from megatron_kaja.judge import (
    EVAL_RUBRIC_BY_KIND,
    JudgeCache,
    JudgeConfig,
    JudgeSample,
    LLMJudge,
    load_rubric,
)
from megatron_kaja.judge.backend import build_judge_backend
from megatron_kaja.judge.cache import read_jsonl_tolerant


@dataclass
class EvalConfig:
    """One evaluation run (see `tools/evaluate.py --help` for the flags)."""

    out_dir: str
    datasets: dict[str, str] = field(default_factory=dict)  # kind -> JSONL, answers generated
    predictions: dict[str, str] = field(default_factory=dict)  # kind -> JSONL with `prediction`
    model: str | None = None
    gen_backend: Literal["hf", "vllm"] = "hf"
    gen_max_tokens: int = 512
    gen_batch_size: int = 8
    system_prompt: str | None = None
    judge_backend: Literal["openai", "vllm", "hf"] = "hf"
    judge_model: str | None = None
    judge_base_url: str | None = None
    judge_api_key: str = "EMPTY"
    judge_mode: Literal["choice", "free_text"] = "choice"
    judge_concurrency: int = 32
    judge_max_attempts: int = 3
    judge_request_timeout_s: float = 300.0  # one judge request, retries included
    choice_param: Literal["structured_outputs", "guided_choice"] = "structured_outputs"
    rubrics: dict[str, str] = field(default_factory=dict)  # kind -> rubric name or YAML
    chunk_size: int = 32
    bootstrap_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.datasets and not self.predictions:
            raise ValueError("give at least one --dataset KIND=FILE or --predictions KIND=FILE")
        both = set(self.datasets) & set(self.predictions)
        if both:
            raise ValueError(f"kind(s) {sorted(both)} given both as --dataset and --predictions")
        if self.datasets and not self.model:
            raise ValueError("--dataset needs --model (the model whose answers are evaluated)")
        if self.judge_request_timeout_s <= 0:
            raise ValueError("--request-timeout must be > 0 seconds")
        if not self.judge_model:
            raise ValueError("--judge-model is required (a served model name or a checkpoint)")
        if self.judge_backend == "openai" and not self.judge_base_url:
            raise ValueError(
                "--judge-backend openai needs --judge-base-url (e.g. http://host:8000/v1)"
            )

    def judge_fingerprint(self) -> dict:
        """What makes two runs' judgements comparable; a resumed run must match it."""
        keys = ("judge_backend", "judge_model", "judge_mode", "rubrics")
        return {k: getattr(self, k) for k in keys}


def _judge_backend(cfg: EvalConfig):
    return build_judge_backend(
        cfg.judge_backend,
        cfg.judge_model,
        base_url=cfg.judge_base_url,
        api_key=cfg.judge_api_key,
        concurrency=cfg.judge_concurrency,
        choice_param=cfg.choice_param,
        batch_size=cfg.gen_batch_size,
        request_timeout_s=cfg.judge_request_timeout_s,
    )


def _append(path: Path, records: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _load_done(path: Path) -> dict[str, dict]:
    return read_jsonl_tolerant(path, key="id") if path.is_file() else {}


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run the evaluation described by `cfg`; returns the report (also written to disk)."""
    # 1. Validate everything before compute.
    data: dict[str, list[EvalRecord]] = {}
    for kind, path in cfg.datasets.items():
        data[kind] = load_records(path, kind, with_predictions=False)
    for kind, path in cfg.predictions.items():
        data[kind] = load_records(path, kind, with_predictions=True)
    rubrics = {kind: load_rubric(cfg.rubrics.get(kind, EVAL_RUBRIC_BY_KIND[kind])) for kind in data}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint_path = out / "judge.json"
    if fingerprint_path.is_file():
        previous = json.loads(fingerprint_path.read_text(encoding="utf-8"))
        if previous != cfg.judge_fingerprint():
            raise ValueError(
                f"{out} holds judgements made with {previous}; this run uses "
                f"{cfg.judge_fingerprint()}. Use another --out."
            )
    judge_backend = _judge_backend(cfg)
    judge_backend.check()
    generator = None
    if cfg.datasets:
        generator = build_backend(cfg.gen_backend, model=cfg.model)
        generator.check()
    atomic_write_text(fingerprint_path, json.dumps(cfg.judge_fingerprint(), ensure_ascii=False))
    judge = LLMJudge(
        judge_backend,
        {rubric.name: rubric for rubric in rubrics.values()},
        JudgeConfig(mode=cfg.judge_mode, max_attempts=cfg.judge_max_attempts, seed=cfg.seed),
        cache=JudgeCache(out / "judge_cache.jsonl"),
    )

    # 2. Per dataset, chunk by chunk: answer, persist, judge, persist.
    datasets_report = {}
    for kind, records in data.items():
        (out / kind).mkdir(exist_ok=True)
        pred_path, judge_path = out / kind / "predictions.jsonl", out / kind / "judgements.jsonl"
        predictions = {r.id: r.prediction for r in records if r.prediction is not None}
        predictions.update({i: rec["prediction"] for i, rec in _load_done(pred_path).items()})
        judged = _load_done(judge_path)
        todo = [r for r in records if r.id not in judged]
        bar = tqdm(total=len(records), initial=len(records) - len(todo), desc=f"evaluate {kind}")
        for start in range(0, len(todo), cfg.chunk_size):
            chunk = todo[start : start + cfg.chunk_size]
            need = [r for r in chunk if r.id not in predictions]
            if need:
                results = generator.generate([_answer_request(cfg, r) for r in need])
                new = [
                    {"id": r.id, "prediction": res.text or ""}
                    for r, res in zip(need, results, strict=True)
                ]
                _append(pred_path, new)
                predictions.update({rec["id"]: rec["prediction"] for rec in new})
            samples = [
                JudgeSample(
                    rubric=rubrics[kind].name,
                    input_text=r.question,
                    pred=predictions[r.id],
                    output_text=r.reference,
                    eval_aspect=r.eval_aspect,
                )
                for r in chunk
            ]
            new_judged = [
                {"id": r.id, **asdict(j)} for r, j in zip(chunk, judge.judge(samples), strict=True)
            ]
            _append(judge_path, new_judged)
            judged.update({rec["id"]: rec for rec in new_judged})
            bar.update(len(chunk))
        bar.close()
        per_sample = [judged[r.id] for r in records]
        datasets_report[kind] = dataset_metrics(
            rubrics[kind], per_sample, cfg.bootstrap_samples, cfg.seed
        )

    # 3. Report.
    report = {
        "judge": {"backend": cfg.judge_backend, "model": cfg.judge_model, "mode": cfg.judge_mode},
        "model": cfg.model,
        "datasets": datasets_report,
    }
    write_report(out, report)
    return report


def _answer_request(cfg: EvalConfig, record: EvalRecord) -> GenerationRequest:
    messages = [{"role": "user", "content": record.question}]
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return GenerationRequest(messages=messages, max_tokens=cfg.gen_max_tokens, seed=cfg.seed)
