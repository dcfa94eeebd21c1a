"""report.json, report.md and report.png for one evaluation run.

Every table and chart says what each metric means, its unit and whether higher or lower
is better, and names the model it is about.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from megatron_kaja.eval.metrics import METRICS, metric_info
from megatron_kaja.eval.plots import bar_chart

# Per-dataset keys that are counts or names, not metrics with intervals.
_SKIP = {"rubric", "spec", "n", "judged", "missing"}
COUNTS = ("unreadable", "api_errors", "choice_without_logprobs")


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def metric_names(datasets: dict) -> dict[str, list[str]]:
    """kind -> the metrics (value + interval) a report holds for it, in table order."""
    return {
        kind: [k for k, v in d.items() if k not in _SKIP and isinstance(v, dict) and "value" in v]
        for kind, d in datasets.items()
    }


def fmt_metric(metric: dict | None) -> str:
    if not metric or metric["value"] is None:
        return "n/a"
    ci = metric["ci95"]
    return f"{metric['value']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def definitions_md(names: set[str]) -> list[str]:
    """The "Metrics" section: each metric's definition, unit and direction."""
    lines = ["## Metrics", ""]
    named = sorted(n for n in names if n in METRICS)
    axes = sorted(n for n in names if n not in METRICS)
    for name in named:
        info = METRICS[name]
        lines.append(f"- `{name}`: {info.definition} ({info.unit}, {info.better})")
    if axes:
        info = metric_info(axes[0])
        joined = ", ".join(f"`{a}`" for a in axes)
        lines.append(f"- helpfulness axes {joined}: {info.definition} ({info.unit}, {info.better})")
    lines += [
        "",
        "P(score) is the judge's probability of each score: in `choice` mode from its "
        "log-probabilities over the score tokens, in free text 1 for the score it wrote. "
        "`*_mode` rates read each answer at its most likely score. Intervals are 95% "
        "percentile bootstrap intervals over answers. Missing judgements (no score) are "
        "counted and left out, never scored. Counts: `unreadable` = the judge never wrote a "
        "readable verdict; `api_errors` = requests the provider refused (llm-jp-judge "
        "protocol: scored 1 on safety questions, dropped elsewhere); "
        "`choice_without_logprobs` = choice-mode judgements read from the chosen string "
        "because the backend gave no log-probabilities.",
        "",
    ]
    return lines


def markdown_report(report: dict) -> str:
    """One run: who was judged how, one table per dataset, and the metrics' definitions."""
    name = report.get("name") or report.get("model") or "model"
    lines = [f"# Evaluation report: {name}", ""]
    if report.get("model"):
        lines += [f"Model: `{report['model']}`", ""]
    judge = report.get("judge", {})
    protocol = report.get("protocol") or {}
    if judge:
        lines += [
            f"Judge: `{judge.get('backend')}` `{judge.get('model')}`, mode `{judge.get('mode')}`",
            "",
        ]
    if protocol:
        lines += [f"Protocol: `{protocol.get('name')}`", ""]
        for path, digest in (protocol.get("prompt_files") or {}).items():
            lines.append(f"- prompt file `{path}` sha256 `{digest}`")
        for kind, rubric in (protocol.get("rubrics") or {}).items():
            lines.append(f"- {kind}: rubric `{rubric['name']}` sha256 `{rubric['sha256']}`")
        lines.append("")
    names = metric_names(report["datasets"])
    for kind, kind_names in names.items():
        d = report["datasets"][kind]
        counts = ", ".join(f"{c} {d[c]}" for c in COUNTS if d.get(c))
        lines += [
            f"## {kind} (`{d['rubric']}`)",
            "",
            f"{d['n']} samples, {d['judged']} judged, {d['missing']} missing judgements."
            + (f" Counts: {counts}." if counts else ""),
            "",
            "| metric | value [95% CI] | unit | direction |",
            "|---|---|---|---|",
        ]
        for metric in kind_names:
            info = metric_info(metric)
            lines.append(f"| {metric} | {fmt_metric(d[metric])} | {info.unit} | {info.better} |")
        lines.append("")
    lines += definitions_md({m for kind_names in names.values() for m in kind_names})
    return "\n".join(lines)


def write_report(out_dir: Path, report: dict) -> None:
    """Write report.json, report.md and report.png into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=2))
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    groups, metrics = [], []
    for kind, names in metric_names(report["datasets"]).items():
        for name in names:
            groups.append((kind, name))
            metrics.append(report["datasets"][kind][name])
    name = report.get("name") or report.get("model") or out_dir.name
    protocol = (report.get("protocol") or {}).get("name", "")
    judge = (report.get("judge") or {}).get("model", "")
    title = f"evaluation of {name} (protocol {protocol}, judge {judge}); bars: 95% bootstrap CI"
    bar_chart(out_dir / "report.png", groups, {name: metrics}, title)
