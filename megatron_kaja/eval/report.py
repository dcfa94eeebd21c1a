"""report.json, report.md and a PNG chart for one evaluation run, and side-by-side
comparisons of several runs (`--compare`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

# Metric keys that are numbers with intervals, in table order; the rest are counts/names.
_SKIP = {"rubric", "n", "judged", "missing"}


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _metric_names(datasets: dict) -> dict[str, list[str]]:
    return {
        kind: [k for k, v in d.items() if k not in _SKIP and isinstance(v, dict)]
        for kind, d in datasets.items()
    }


def _fmt(metric: dict) -> str:
    if metric["value"] is None:
        return "n/a"
    ci = metric["ci95"]
    return f"{metric['value']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown_report(report: dict) -> str:
    """The tables of one run: one per dataset, value with its 95% bootstrap interval."""
    lines = ["# Evaluation report", ""]
    judge = report.get("judge", {})
    if judge:
        lines += [
            f"Judge: `{judge.get('backend')}` `{judge.get('model')}`, mode `{judge.get('mode')}`",
            "",
        ]
    for kind, names in _metric_names(report["datasets"]).items():
        d = report["datasets"][kind]
        lines += [
            f"## {kind} (rubric `{d['rubric']}`)",
            "",
            f"{d['n']} samples, {d['judged']} judged, {d['missing']} missing judgements.",
            "",
            "| metric | value [95% CI] |",
            "|---|---|",
        ]
        lines += [f"| {name} | {_fmt(d[name])} |" for name in names]
        lines.append("")
    return "\n".join(lines)


def _bar_chart(path: Path, groups: list[str], series: dict[str, list[dict | None]], title: str):
    """Grouped bars with CI error bars: rates (%) and scores (1-5) in two panels, so neither
    scale flattens the other."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [
        ("rates (%)", [i for i, g in enumerate(groups) if g.endswith("_rate")]),
        ("scores", [i for i, g in enumerate(groups) if not g.endswith("_rate")]),
    ]
    panels = [(name, idx) for name, idx in panels if idx]
    per_group = 0.35 * max(1, len(series)) + 0.4
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(min(18.0, 2.5 + per_group * len(groups)), 4.5),
        gridspec_kw={"width_ratios": [len(idx) for _, idx in panels]},
        squeeze=False,
    )
    width = 0.8 / max(1, len(series))
    for ax, (panel, idx) in zip(axes[0], panels, strict=True):
        x = np.arange(len(idx))
        for i, (label, metrics) in enumerate(series.items()):
            chosen = [metrics[j] for j in idx]
            values = [m["value"] if m and m["value"] is not None else 0.0 for m in chosen]
            low = [m["value"] - m["ci95"][0] if m and m["ci95"] else 0.0 for m in chosen]
            high = [m["ci95"][1] - m["value"] if m and m["ci95"] else 0.0 for m in chosen]
            ax.bar(x + i * width, values, width, yerr=[low, high], capsize=3, label=label)
        ax.set_xticks(
            x + width * (len(series) - 1) / 2, [groups[j] for j in idx], rotation=25, ha="right"
        )
        ax.set_title(panel)
        ax.set_ylim(0, 100 if panel.startswith("rates") else 5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncols=len(series))
    fig.suptitle(title, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, report: dict) -> None:
    """Write report.json, report.md and report.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, ensure_ascii=False, indent=2))
    atomic_write_text(out_dir / "report.md", markdown_report(report))
    groups, metrics = [], []
    for kind, names in _metric_names(report["datasets"]).items():
        for name in names:
            groups.append(f"{kind}/{name}")
            metrics.append(report["datasets"][kind][name])
    _bar_chart(out_dir / "report.png", groups, {"this run": metrics}, "evaluation")


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path) -> dict:
    """Put the reports of several runs side by side: compare.json, compare.md, compare.png."""
    reports = {}
    for run in map(Path, run_dirs):
        path = run / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"--compare: {path} not found (is {run} an evaluation output?)")
        reports[run.name] = json.loads(path.read_text(encoding="utf-8"))
    rows: list[tuple[str, str]] = []
    for report in reports.values():
        for kind, names in _metric_names(report["datasets"]).items():
            rows += [(kind, n) for n in names if (kind, n) not in rows]

    def cell(report, kind, name):
        return report["datasets"].get(kind, {}).get(name)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = {
        f"{kind}/{name}": {run: cell(r, kind, name) for run, r in reports.items()}
        for kind, name in rows
    }
    atomic_write_text(out_dir / "compare.json", json.dumps(table, ensure_ascii=False, indent=2))
    header = "| metric | " + " | ".join(reports) + " |"
    lines = ["# Comparison", "", header, "|---" * (len(reports) + 1) + "|"]
    for key, by_run in table.items():
        cells = [_fmt(m) if m else "-" for m in by_run.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    atomic_write_text(out_dir / "compare.md", "\n".join(lines) + "\n")
    series = {run: [table[k][run] for k in table] for run in reports}
    _bar_chart(out_dir / "compare.png", list(table), series, "comparison")
    return table
