"""Evaluation: answers -> LLM judge -> metrics (rates from the judge's distribution),
reports, paired comparisons and charts; this project's protocol or llm-jp-judge's."""

from megatron_kaja.eval.checkpoints import evaluate_checkpoints
from megatron_kaja.eval.compare import compare_runs
from megatron_kaja.eval.metrics import METRICS, MetricSpec, bootstrap_ci, dataset_metrics
from megatron_kaja.eval.protocols import build_protocol, protocol_names
from megatron_kaja.eval.records import KINDS, EvalRecord, load_records
from megatron_kaja.eval.report import write_report
from megatron_kaja.eval.runner import EvalConfig, run_evaluation

__all__ = [
    "KINDS",
    "METRICS",
    "EvalConfig",
    "EvalRecord",
    "MetricSpec",
    "bootstrap_ci",
    "build_protocol",
    "compare_runs",
    "dataset_metrics",
    "evaluate_checkpoints",
    "load_records",
    "protocol_names",
    "run_evaluation",
    "write_report",
]
