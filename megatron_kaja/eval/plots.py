"""Charts of evaluation results: per-metric bars, the safety / over-refusal trade-off, and
metrics over training steps. Every axis has a unit and says whether higher or lower is
better; every point or bar is labelled with the model's name."""

from __future__ import annotations

from pathlib import Path

from megatron_kaja.eval.metrics import metric_info


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    return plt


def metric_label(kind: str, name: str) -> str:
    info = metric_info(name)
    arrow = "↓" if info.better == "lower is better" else "↑"
    return f"{kind}/{name} ({info.unit}, {arrow} {info.better})"


def bar_chart(path: Path, groups: list[tuple[str, str]], series: dict[str, list], title: str):
    """Grouped bars with CI error bars: rates (%) and scores in two panels, so neither scale
    flattens the other. `groups` are (kind, metric); `series` maps a model name to its
    metric dicts in the order of `groups`."""
    import numpy as np

    plt = _pyplot()
    panels = [
        ("rates (%)", [i for i, g in enumerate(groups) if metric_info(g[1]).unit == "%"]),
        (
            "scores",
            [i for i, g in enumerate(groups) if metric_info(g[1]).unit != "%"],
        ),
    ]
    panels = [(name, idx) for name, idx in panels if idx]
    per_group = 0.35 * max(1, len(series)) + 0.5
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(min(20.0, 3.0 + per_group * len(groups)), 5.5),
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
            x + width * (len(series) - 1) / 2,
            [metric_label(*groups[j]).replace(" (", "\n(") for j in idx],
            rotation=30,
            ha="right",
            fontsize=7,
        )
        ax.set_ylabel("rate (%)" if panel.startswith("rates") else "score (judge scale)")
        ax.set_title(panel)
        if panel.startswith("rates"):
            ax.set_ylim(0, 100)
        else:
            ax.set_ylim(0, 5.2)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper right", ncols=min(4, len(series)), fontsize=8)
    fig.suptitle(title, x=0.02, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _metric(report: dict, kind: str, name: str) -> dict | None:
    m = report.get("datasets", {}).get(kind, {}).get(name)
    return m if m and m.get("value") is not None else None


def _err(m: dict | None) -> list[float]:
    if not m or not m.get("ci95"):
        return [0.0, 0.0]
    return [m["value"] - m["ci95"][0], m["ci95"][1] - m["value"]]


def tradeoff_chart(
    path: Path, reports: dict[str, dict], title: str = "", connect: bool = False
) -> bool:
    """Safety violation rate against borderline over-refusal rate, one point per model with
    95% CI whiskers on both axes, and helpfulness (overall) beside it; `connect` joins the
    points in order (checkpoints of one run). Returns False (and draws nothing) when no
    model has both a safety and a borderline result."""
    points = {
        name: (
            _metric(r, "borderline", "over_refusal_rate"),
            _metric(r, "safety", "violation_rate"),
        )
        for name, r in reports.items()
    }
    points = {n: p for n, p in points.items() if p[0] and p[1]}
    if not points:
        return False
    plt = _pyplot()
    helpful = {n: _metric(r, "helpful", "overall") for n, r in reports.items()}
    helpful = {n: m for n, m in helpful.items() if m}
    fig, axes = plt.subplots(
        1,
        2 if helpful else 1,
        figsize=(12 if helpful else 7, 5.5),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 2] if helpful else [1]},
    )
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    if connect and len(points) > 1:
        xs = [p[0]["value"] for p in points.values()]
        ys = [p[1]["value"] for p in points.values()]
        ax.plot(xs, ys, color="0.6", linewidth=1, zorder=0)
    for i, (name, (refusal, violation)) in enumerate(points.items()):
        color = colors[i % len(colors)]
        ax.errorbar(
            refusal["value"],
            violation["value"],
            xerr=[[e] for e in _err(refusal)],
            yerr=[[e] for e in _err(violation)],
            fmt="o",
            capsize=4,
            color=color,
            label=name,
        )
        # Alternate label offsets so that close points keep readable names.
        ax.annotate(
            name,
            (refusal["value"], violation["value"]),
            textcoords="offset points",
            xytext=(6, 8 if i % 2 == 0 else -14),
            fontsize=8,
            color=color,
        )
    ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("borderline over-refusal rate (%, lower is better)")
    ax.set_ylabel("safety violation rate (%, lower is better)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.set_title("safety vs over-refusal (best: bottom left); whiskers: 95% CI", fontsize=9)
    if helpful:
        hx = axes[0][1]
        names = list(helpful)
        hx.bar(
            range(len(names)),
            [helpful[n]["value"] for n in names],
            yerr=[[_err(helpful[n])[0] for n in names], [_err(helpful[n])[1] for n in names]],
            capsize=4,
            color=[colors[list(reports).index(n) % len(colors)] for n in names],
        )
        hx.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        hx.set_ylabel("helpfulness overall (score 1-5, higher is better)")
        hx.set_ylim(0, 5.2)
        hx.set_title("helpfulness; bars: 95% CI", fontsize=9)
    if title:
        fig.suptitle(title, x=0.02, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93 if title else 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# (kind, metric) drawn over training steps, and the panel each goes to.
CURVE_METRICS = (
    ("safety", "violation_rate"),
    ("borderline", "over_refusal_rate"),
    ("safety", "acceptable_rate"),
    ("helpful", "overall"),
    ("safety", "mean_score"),
)


def curve_chart(path: Path, steps: dict[int, dict], run_name: str) -> bool:
    """Metrics of every checkpoint of a run over training steps, with 95% CI bands: rates
    (%) on the left, scores on the right. False when there is nothing to draw."""
    plt = _pyplot()
    panels = {"%": [], "score": []}
    for kind, name in CURVE_METRICS:
        xs = [s for s in sorted(steps) if _metric(steps[s], kind, name)]
        if xs:
            panels["%" if metric_info(name).unit == "%" else "score"].append((kind, name, xs))
    panels = {unit: rows for unit, rows in panels.items() if rows}
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False)
    for ax, (unit, rows) in zip(axes[0], panels.items(), strict=True):
        for kind, name, xs in rows:
            ms = [_metric(steps[s], kind, name) for s in xs]
            values = [m["value"] for m in ms]
            lo = [m["ci95"][0] if m["ci95"] else m["value"] for m in ms]
            hi = [m["ci95"][1] if m["ci95"] else m["value"] for m in ms]
            better = metric_info(name).better
            line = ax.plot(xs, values, marker="o", label=f"{kind} {name} ({better})")[0]
            ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        ax.set_xlabel("training step of the checkpoint")
        ax.set_ylabel("rate (%)" if unit == "%" else "score (judge scale)")
        ax.set_ylim(*((-2, 102) if unit == "%" else (0, 5.2)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{run_name}: evaluation of each checkpoint; bands: 95% bootstrap CI",
        x=0.02,
        ha="left",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
