"""An evaluation run: answers (generated or read) -> judge -> metrics -> report.

Everything that can be wrong with the input is checked before the first answer is
generated: dataset files and kinds, rubrics or protocol files, the output folder's
manifest (a folder made from another model, data set, judge or protocol is refused), a
reachable judge, the answer model. Each sample's prediction and judgement are appended to
`OUT/<kind>/*.jsonl` as soon as they exist, so a killed run resumes where it stopped. A
judgement is done when it has a score or a final reason (`unreadable`, `api_error`): one
left without either (the judge server failed) is asked again by the next run.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from megatron_kaja.eval.manifest import build_manifest, check_manifest
from megatron_kaja.eval.metrics import dataset_metrics
from megatron_kaja.eval.protocols import build_protocol, protocol_names
from megatron_kaja.eval.records import EvalRecord, load_records
from megatron_kaja.eval.report import write_report
from megatron_kaja.inference import GenerationRequest, build_backend
from megatron_kaja.judge import JudgeCache
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
    judge_mode: Literal["choice", "free_text"] | None = None  # None: the protocol's default
    judge_concurrency: int = 32
    judge_max_attempts: int | None = None  # None: the protocol's default (3; llm-jp-judge 4)
    protocol: str = "megatron-kaja"
    llm_jp_judge: str | None = None  # llm-jp-judge checkout or package folder
    name: str | None = None  # the model's name in reports and charts
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
        if self.protocol not in protocol_names():
            raise ValueError(f"--protocol {self.protocol!r}: choose one of {protocol_names()}")
        if self.protocol == "llm-jp-judge":
            if self.judge_mode == "choice":
                raise ValueError("--protocol llm-jp-judge judges in free text: drop --judge-mode")
            if self.rubrics:
                raise ValueError("--protocol llm-jp-judge uses its own prompt files: drop --rubric")
        if self.judge_mode is None:
            self.judge_mode = "free_text" if self.protocol == "llm-jp-judge" else "choice"
        if self.name is None:
            source = self.model if self.datasets else self.out_dir
            self.name = Path(source).name or str(source)


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


def _done(judgement: dict | None) -> bool:
    """A judgement is final with a score or a recorded reason, and no request of it (an
    axis, a second question) failed without one; anything else is judged again."""
    if judgement is None:
        return False
    if judgement.get("reason") is not None:
        return True
    return judgement.get("score") is not None and not judgement.get("error")


def run_evaluation(cfg: EvalConfig) -> dict:
    """Run the evaluation described by `cfg`; returns the report (also written to disk)."""
    # 1. Validate everything before compute.
    data: dict[str, list[EvalRecord]] = {}
    for kind, path in cfg.datasets.items():
        data[kind] = load_records(path, kind, with_predictions=False)
    for kind, path in cfg.predictions.items():
        data[kind] = load_records(path, kind, with_predictions=True)
    protocol = build_protocol(
        cfg.protocol,
        kinds=list(data),
        rubrics=cfg.rubrics,
        mode=cfg.judge_mode,
        max_attempts=cfg.judge_max_attempts,
        root=cfg.llm_jp_judge,
        seed=cfg.seed,
    )
    out = Path(cfg.out_dir)
    check_manifest(out, build_manifest(cfg, protocol.describe()))
    judge_backend = _judge_backend(cfg)
    judge_backend.check()
    generator = None
    if cfg.datasets:
        generator = build_backend(cfg.gen_backend, model=cfg.model)
        generator.check()
    protocol.start(judge_backend, JudgeCache(out / "judge_cache.jsonl"))

    # 2. Per dataset, chunk by chunk: answer, persist, judge, persist.
    datasets_report = {}
    for kind, records in data.items():
        (out / kind).mkdir(exist_ok=True)
        pred_path, judge_path = out / kind / "predictions.jsonl", out / kind / "judgements.jsonl"
        predictions = {r.id: r.prediction for r in records if r.prediction is not None}
        predictions.update({i: rec["prediction"] for i, rec in _load_done(pred_path).items()})
        judged = _load_done(judge_path)
        todo = [r for r in records if not _done(judged.get(r.id))]
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
            verdicts = protocol.judge(kind, chunk, [predictions[r.id] for r in chunk])
            new_judged = [{"id": r.id, **asdict(j)} for r, j in zip(chunk, verdicts, strict=True)]
            _append(judge_path, new_judged)
            judged.update({rec["id"]: rec for rec in new_judged})
            bar.update(len(chunk))
        bar.close()
        per_sample = [judged[r.id] for r in records]
        datasets_report[kind] = dataset_metrics(
            protocol.metric_spec(kind), per_sample, cfg.bootstrap_samples, cfg.seed
        )

    # 3. Report.
    report = {
        "name": cfg.name,
        "model": cfg.model,
        "judge": {"backend": cfg.judge_backend, "model": cfg.judge_model, "mode": cfg.judge_mode},
        "protocol": protocol.describe(),
        "datasets": datasets_report,
    }
    write_report(out, report)
    return report


def _answer_request(cfg: EvalConfig, record: EvalRecord) -> GenerationRequest:
    messages = [{"role": "user", "content": record.question}]
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    return GenerationRequest(messages=messages, max_tokens=cfg.gen_max_tokens, seed=cfg.seed)
