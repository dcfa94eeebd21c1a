"""Evaluation: answers -> LLM judge -> llm-jp-judge-style metrics, reports and charts."""

from megatron_kaja.eval.metrics import bootstrap_ci, dataset_metrics
from megatron_kaja.eval.records import KINDS, EvalRecord, load_records
from megatron_kaja.eval.report import compare_runs, write_report
from megatron_kaja.eval.runner import EvalConfig, run_evaluation

__all__ = [
    "KINDS",
    "EvalConfig",
    "EvalRecord",
    "bootstrap_ci",
    "compare_runs",
    "dataset_metrics",
    "load_records",
    "run_evaluation",
    "write_report",
]
