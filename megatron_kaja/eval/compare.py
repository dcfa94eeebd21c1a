"""Paired comparison of evaluation runs on the same items (`--compare`), and the
safety / over-refusal trade-off picture.

Each run after the first is compared with the first (the baseline) on the items both
judged: the difference of each metric (run - baseline) with a paired bootstrap interval
(items resampled jointly, so the item-to-item spread cancels), and for rates McNemar's exact
test on the answers' most-likely-score reading (discordant pairs b, c; two-sided binomial
p with n = b + c, p = 1/2). A difference is significant at 95% when its interval excludes 0.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from megatron_kaja.eval.metrics import MetricSpec, metric_info, per_sample_values
from megatron_kaja.eval.plots import bar_chart, tradeoff_chart
from megatron_kaja.eval.report import atomic_write_text, fmt_metric, metric_names
from megatron_kaja.judge.cache import read_jsonl_tolerant


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, samples: int, seed: int
) -> list[float] | None:
    """95% percentile interval of mean(b - a) with items resampled jointly."""
    if len(a) == 0:
        return None
    diff = b - a
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(samples, len(diff)))
    stats = diff[idx].mean(axis=1)
    return [float(np.percentile(stats, 2.5)), float(np.percentile(stats, 97.5))]


def load_run(run: Path) -> dict:
    """A finished run: its report, and per kind the per-sample metric values by item id."""
    path = run / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"--compare: {path} not found (is {run} an evaluation output?)")
    report = json.loads(path.read_text(encoding="utf-8"))
    values = {}
    for kind, d in report["datasets"].items():
        judged = run / kind / "judgements.jsonl"
        if "spec" in d and judged.is_file():
            spec = MetricSpec.from_dict(d["spec"])
            values[kind] = per_sample_values(spec, read_jsonl_tolerant(judged, key="id"))
    return {"dir": run, "report": report, "values": values}


def paired_difference(base: dict, other: dict, kind: str, metric: str, samples: int, seed: int):
    """The paired comparison of one metric, or None when the runs share no judged item."""
    a_vals = base["values"].get(kind, {}).get(metric, {})
    b_vals = other["values"].get(kind, {}).get(metric, {})
    ids = sorted(set(a_vals) & set(b_vals))
    if not ids:
        return None
    a = np.array([a_vals[i] for i in ids])
    b = np.array([b_vals[i] for i in ids])
    ci = paired_bootstrap_ci(a, b, samples, seed)
    out = {
        "n_paired": len(ids),
        "diff": float((b - a).mean()),
        "ci95": ci,
        "significant": bool(ci[0] > 0 or ci[1] < 0),
    }
    if metric_info(metric).unit == "%":
        binary = metric if metric.endswith("_mode") else f"{metric}_mode"
        a_bin = base["values"][kind].get(binary, {})
        b_bin = other["values"][kind].get(binary, {})
        common = [i for i in ids if i in a_bin and i in b_bin]
        worse = sum(a_bin[i] < 50 <= b_bin[i] for i in common)  # 0 in baseline, 1 in run
        better = sum(b_bin[i] < 50 <= a_bin[i] for i in common)
        out["mcnemar"] = {
            "b": better,
            "c": worse,
            "p": mcnemar_exact(better, worse),
            "reading": binary,
        }
    return out


def _names(runs: list[dict]) -> list[str]:
    # A run is named by its folder (eval/base, eval/sft, ...), as the user laid them out.
    names = []
    for run in runs:
        name = run["dir"].name
        names.append(name if name not in names else str(run["dir"]))
    return names


def _identity(report: dict) -> tuple:
    protocol = report.get("protocol") or {}
    judge = report.get("judge") or {}
    return (protocol.get("name"), judge.get("model"), judge.get("mode"))


def compare_runs(
    run_dirs: list[str | Path], out_dir: str | Path, bootstrap_samples: int = 1000, seed: int = 0
) -> dict:
    """Compare finished runs: compare.json, compare.md, compare.png and tradeoff.png.

    Returns {"runs", "metrics": {kind/metric: {run: metric}}, "paired": [...]}."""
    runs = [load_run(Path(r)) for r in run_dirs]
    names = _names(runs)
    rows: list[tuple[str, str]] = []
    for run in runs:
        for kind, metric_list in metric_names(run["report"]["datasets"]).items():
            rows += [(kind, m) for m in metric_list if (kind, m) not in rows]
    table = {
        f"{kind}/{m}": {
            name: run["report"]["datasets"].get(kind, {}).get(m)
            for name, run in zip(names, runs, strict=True)
        }
        for kind, m in rows
    }
    paired = []
    for name, run in zip(names[1:], runs[1:], strict=True):
        for kind, m in rows:
            found = paired_difference(runs[0], run, kind, m, bootstrap_samples, seed)
            if found is not None:
                paired.append({"run": name, "baseline": names[0], "metric": f"{kind}/{m}", **found})
    identities = {_identity(r["report"]) for r in runs}
    warning = None
    if len(identities) > 1:
        warning = (
            "the runs were judged differently (protocol, judge model, mode: "
            + "; ".join(map(str, sorted(identities, key=str)))
            + "): their differences mix model and judging"
        )
        print(f"warning: --compare: {warning}", file=sys.stderr)
    result = {
        "runs": {n: str(r["dir"]) for n, r in zip(names, runs, strict=True)},
        "metrics": table,
        "paired": paired,
        "warning": warning,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "compare.json", json.dumps(result, ensure_ascii=False, indent=2))
    atomic_write_text(out_dir / "compare.md", _markdown(names, table, paired, warning))
    series = {n: [table[f"{k}/{m}"][n] for k, m in rows] for n in names}
    bar_chart(out_dir / "compare.png", rows, series, "comparison; bars: 95% bootstrap CI")
    tradeoff_chart(
        out_dir / "tradeoff.png", {n: r["report"] for n, r in zip(names, runs, strict=True)}
    )
    return result


def _markdown(names, table, paired, warning) -> str:
    lines = ["# Comparison", ""]
    if warning:
        lines += [f"**Warning:** {warning}.", ""]
    lines += [
        "## Metrics",
        "",
        "| metric | " + " | ".join(names) + " | unit | direction |",
        "|---" * (len(names) + 3) + "|",
    ]
    for key, by_run in table.items():
        info = metric_info(key.split("/", 1)[1])
        cells = [fmt_metric(m) if m else "-" for m in by_run.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {info.unit} | {info.better} |")
    if paired:
        lines += [
            "",
            f"## Paired differences (run - {names[0]}, on the items both judged)",
            "",
            "A difference is significant at 95% when its paired bootstrap interval excludes 0. "
            "For rates, McNemar's exact test on the most-likely-score reading is shown beside it "
            "(b: items counted in the rate for the baseline only, c: for the run only).",
            "",
            "| run | metric | n | difference [95% CI] | McNemar p (b, c) | significant at 95% |",
            "|---|---|---|---|---|---|",
        ]
        for row in paired:
            ci = row["ci95"]
            mc = row.get("mcnemar")
            mc_txt = f"{mc['p']:.3g} ({mc['b']}, {mc['c']})" if mc else "-"
            lines.append(
                f"| {row['run']} | {row['metric']} | {row['n_paired']} | "
                f"{row['diff']:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}] | {mc_txt} | "
                f"{'yes' if row['significant'] else 'no'} |"
            )
        significant = [
            f"{r['run']} {r['metric']} ({r['diff']:+.2f})" for r in paired if r["significant"]
        ]
        lines += [
            "",
            "Significant at 95%: " + (", ".join(significant) if significant else "none") + ".",
        ]
    return "\n".join(lines) + "\n"
