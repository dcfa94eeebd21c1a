"""Evaluate every checkpoint of a training run folder (`--checkpoints runs/grpo`) and draw
the metrics over training steps.

Each `iter_XXXXXXX/` of the run is converted to an HF folder on the fly
(`checkpoint.convert.mcore_to_hf`, tokenizer and config from `--hf-template`), evaluated
into `OUT/step_XXXXXXX/` like any model, and its HF copy deleted once the step's report
exists (a 13b copy is ~26 GB). A killed run resumes: finished steps are read back, an
unfinished one continues from its own per-sample files.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

from megatron_kaja.checkpoint.convert import detect_format, mcore_to_hf
from megatron_kaja.eval.plots import curve_chart, tradeoff_chart
from megatron_kaja.eval.report import atomic_write_text, fmt_metric, metric_names
from megatron_kaja.eval.runner import EvalConfig, run_evaluation

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def run_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """step -> checkpoint folder for every complete checkpoint of a run folder."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"--checkpoints {run_dir}: no such folder")
    steps = {}
    for child in sorted(run_dir.iterdir()):
        found = _ITER_DIR.match(child.name)
        if found and child.is_dir():
            try:
                detect_format(child)
            except ValueError:
                continue  # a save that never finished
            steps[int(found.group(1))] = child
    if not steps:
        raise ValueError(f"--checkpoints {run_dir}: no iter_XXXXXXX checkpoint folders in it")
    return steps


def evaluate_checkpoints(cfg: EvalConfig, run_dir: str | Path, hf_template: str | Path) -> dict:
    """Evaluate each checkpoint of `run_dir` with `cfg` (its `model` and `out_dir` are set
    per step); writes OUT/curve.{json,md,png} and OUT/tradeoff.png. Returns step -> report."""
    run_dir, out = Path(run_dir), Path(cfg.out_dir)
    if not Path(hf_template).is_dir():
        raise FileNotFoundError(f"--hf-template {hf_template}: no such folder")
    steps = run_checkpoints(run_dir)
    run_name = run_dir.name
    reports: dict[int, dict] = {}
    for step, ckpt in steps.items():
        step_out = out / f"step_{step:07d}"
        report_path = step_out / "report.json"
        hf_dir = out / ".hf" / f"iter_{step:07d}"
        if not report_path.is_file():
            if not (hf_dir / "config.json").is_file():
                shutil.rmtree(hf_dir, ignore_errors=True)
                mcore_to_hf(ckpt, hf_dir, hf_template=hf_template, progress=False)
            step_cfg = replace(
                cfg, out_dir=str(step_out), model=str(hf_dir), name=f"{run_name} step {step}"
            )
            run_evaluation(step_cfg)
        shutil.rmtree(hf_dir, ignore_errors=True)
        reports[step] = json.loads(report_path.read_text(encoding="utf-8"))
    write_curve(out, run_name, reports)
    return reports


def write_curve(out: Path, run_name: str, reports: dict[int, dict]) -> None:
    """curve.json (step -> metrics), curve.md (one row per step), curve.png, tradeoff.png."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {step: r["datasets"] for step, r in sorted(reports.items())}
    atomic_write_text(out / "curve.json", json.dumps(summary, ensure_ascii=False, indent=2))
    columns = []
    for r in reports.values():
        for kind, names in metric_names(r["datasets"]).items():
            columns += [(kind, n) for n in names if (kind, n) not in columns]
    lines = [
        f"# {run_name}: every checkpoint",
        "",
        "| step | " + " | ".join(f"{k}/{n}" for k, n in columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for step, r in sorted(reports.items()):
        cells = [fmt_metric(r["datasets"].get(k, {}).get(n)) for k, n in columns]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    atomic_write_text(out / "curve.md", "\n".join(lines) + "\n")
    curve_chart(out / "curve.png", dict(sorted(reports.items())), run_name)
    tradeoff_chart(
        out / "tradeoff.png",
        {f"{run_name} step {s}": r for s, r in sorted(reports.items())},
        f"{run_name}: one point per checkpoint, joined in step order",
        connect=True,
    )
