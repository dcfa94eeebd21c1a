"""The CPU demo's report page: report.md with the training curves, the judge's agreement with
the rubric, and the four models side by side (PNG charts beside it).

Every metric carries its unit and the direction that is better. The comparison numbers are
the ones `megatron_kaja.eval.compare_runs` wrote (eval/compare/compare.json).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from demo_tasks import agreement_by_kind

from megatron_kaja.eval.metrics import metric_info as eval_metric_info
from megatron_kaja.eval.report import atomic_write_text

MODEL_NAMES = {"base": "base (random)", "sft": "SFT", "grpo": "GRPO", "merged": "merged SFT+GRPO"}


def metric_info(key: str) -> tuple[str, str]:
    """(unit, which way is better) of a compare.json key such as `safety/violation_rate`,
    from the evaluation's own metric definitions."""
    info = eval_metric_info(key.split("/", 1)[-1])
    unit = "% of judged answers" if info.unit == "%" else "score 1-5"
    return unit, info.better


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return [m for m in rows if "step" in m and "loss" in m]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sft_loss(runs: dict[str, list[dict]], path: Path) -> None:
    """Training loss per step of each SFT run."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, steps in runs.items():
        ax.plot([m["step"] for m in steps], [m["loss"] for m in steps], marker=".", label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats per answer token) - lower is better")
    ax.set_title("SFT: training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grpo(steps: list[dict], path: Path) -> None:
    """GRPO reward (with its spread) and KL / clip fraction per step."""
    plt = _plt()
    it = [m["step"] for m in steps]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    mean = [m["reward_mean"] for m in steps]
    left.plot(it, mean, marker="o", label="mean reward")
    if all("reward_std" in m for m in steps):
        std = [m["reward_std"] for m in steps]
        left.fill_between(it, [a - s for a, s in zip(mean, std, strict=True)],
                          [a + s for a, s in zip(mean, std, strict=True)], alpha=0.2,
                          label="± 1 std over rollouts")  # fmt: skip
    left.set_ylim(0, 1)
    left.set_xlabel("GRPO step")
    left.set_ylabel("judge reward (0-1) - higher is better")
    left.set_title("GRPO: reward from the tiny judge")
    left.grid(alpha=0.3)
    left.legend(loc="lower right")
    right.plot(it, [m["kl"] for m in steps], marker="o", color="tab:red", label="KL to SFT model")
    right.set_xlabel("GRPO step")
    for ax in (left, right):  # steps are whole numbers
        ax.xaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel("KL (nats/token) - lower stays closer to SFT", color="tab:red")
    right.grid(alpha=0.3)
    twin = right.twinx()
    twin.plot(it, [m["clip_frac"] for m in steps], marker="s", color="tab:green",
              label="clip fraction")  # fmt: skip
    twin.set_ylabel("clip fraction (share of tokens) - lower is steadier", color="tab:green")
    right.set_title("GRPO: KL and clip fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(table: dict, path: Path) -> None:
    """Grouped bars of every metric for every model: rates (%) and scores (1-5) apart."""
    plt = _plt()
    import numpy as np

    keys = list(table)
    models = list(next(iter(table.values())))
    panels = [
        ("rates (%)", [k for k in keys if metric_info(k)[0].startswith("%")], 100),
        ("scores (1-5)", [k for k in keys if not metric_info(k)[0].startswith("%")], 5),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(13, 5.5), squeeze=False,
        gridspec_kw={"width_ratios": [len(p[1]) for p in panels]},
    )  # fmt: skip
    width = 0.8 / len(models)
    for ax, (title, chosen, top) in zip(axes[0], panels, strict=True):
        x = np.arange(len(chosen))
        for i, model in enumerate(models):
            cells = [table[k].get(model) for k in chosen]
            values = [c["value"] if c and c["value"] is not None else 0.0 for c in cells]
            low = [c["value"] - c["ci95"][0] if c and c["ci95"] else 0.0 for c in cells]
            high = [c["ci95"][1] - c["value"] if c and c["ci95"] else 0.0 for c in cells]
            ax.bar(x + i * width, values, width, yerr=[low, high], capsize=2,
                   label=MODEL_NAMES.get(model, model))  # fmt: skip
        labels = [
            f"{k}\n({'higher' if 'higher' in metric_info(k)[1] else 'lower'} is better)"
            for k in chosen
        ]
        ax.set_xticks(x + width * (len(models) - 1) / 2, labels, rotation=30, ha="right",
                      fontsize=8)  # fmt: skip
        ax.set_ylim(0, top)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncols=len(models), bbox_to_anchor=(0.5, 0.94))
    fig.suptitle("evaluation of the four models (error bars: 95% bootstrap interval)")
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _predictions(eval_dir: Path, dataset: str) -> dict[str, str]:
    """Sample id -> the model's answer, for one dataset of one evaluation run."""
    path = eval_dir / dataset / "predictions.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {str(r["id"]): r["prediction"] for r in rows}


def write_demo_report(
    out: Path,
    *,
    judge: str,
    agreement: list[dict],
    synth_summary: dict,
    timings: dict[str, float],
    cpu_timings: dict[str, float],
    fast: bool,
    example: tuple[str, str] | None = None,
) -> Path:
    """Write OUT/report.md and its PNGs (report_sft_loss.png, report_grpo.png,
    report_compare.png); returns the markdown's path. `example` = (id, question) of a safety
    evaluation sample whose answers by every model are quoted."""
    sft_runs = {
        "instruct model (SFT)": _metrics(out / "runs" / "sft" / "metrics.jsonl"),
        "teacher-judge": _metrics(out / "runs" / "teacher_judge" / "metrics.jsonl"),
    }
    grpo = _metrics(out / "runs" / "grpo" / "metrics.jsonl")
    table = json.loads((out / "eval" / "compare" / "compare.json").read_text(encoding="utf-8"))[
        "metrics"
    ]
    plot_sft_loss(sft_runs, out / "report_sft_loss.png")
    plot_grpo(grpo, out / "report_grpo.png")
    plot_comparison(table, out / "report_compare.png")

    k = max(1, len(grpo) // 3)
    first = sum(m["reward_mean"] for m in grpo[:k]) / k
    last = sum(m["reward_mean"] for m in grpo[-k:]) / k
    lines = [
        f"# CPU demo report{' (--fast)' if fast else ''}",
        "",
        f"**Judge:** {judge}.",
        "",
        "Models: **base** = the random tiny llm-jp-3-shaped model; **SFT** = base after "
        "pretrain_sft.py; **GRPO** = SFT after train_grpo.py; **merged** = linear 0.5/0.5 of "
        "SFT and GRPO.",
        "",
        "## Time per stage",
        "",
        "Wall seconds depend on the machine's load; CPU seconds (user + system, all of the "
        "stage's processes) much less. Load average (1, 5, 15 min) when the report was "
        f"written: {', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        "| stage | wall s | CPU s |",
        "|---|---|---|",
        *[
            f"| {name} | {sec:.0f} | {cpu_timings.get(name, 0):.0f} |"
            for name, sec in timings.items()
        ],
        f"| total | {sum(timings.values()):.0f} | {sum(cpu_timings.values()):.0f} |",
        "",
        "## Teacher: synthetic SFT data",
        "",
        f"{synth_summary.get('requests')} teacher requests, **{synth_summary.get('accepted')} "
        f"accepted** Q/A pairs (higher is better), rejected: "
        f"{ {k: v for k, v in (synth_summary.get('rejected') or {}).items() if v} or 'none' }.",
        "",
        "## Judge: agreement with the rubric on held-out questions",
        "",
        "Answers to questions the judge never saw in training, scored by the judge code "
        "(choice mode, expected score) and by the rubric's own rules. Agreement = the judge's "
        "score within 0.5 of the rubric's (higher is better).",
        "",
        "| rubric (axis) | agree / answers | mean abs. error (score points, lower is better) |",
        "|---|---|---|",
    ]
    for name, rows in agreement_by_kind(agreement).items():
        errors = [
            abs(r["judge_score"] - r["rubric_score"]) for r in rows if r["judge_score"] is not None
        ]
        mae = sum(errors) / len(errors) if errors else float("nan")
        lines.append(f"| {name} | {sum(r['agrees'] for r in rows)} / {len(rows)} | {mae:.2f} |")
    agreed = sum(r["agrees"] for r in agreement)
    lines += [
        f"| all | **{agreed} / {len(agreement)}** | |",
        "",
        "## Training curves",
        "",
        "![SFT loss](report_sft_loss.png)",
        "",
        f"GRPO mean reward (0-1, higher is better): first {k} steps {first:.3f}, last {k} "
        f"steps {last:.3f}, **change {last - first:+.3f}**. KL to the SFT model at the last "
        f"step {grpo[-1]['kl']:.4f} nats/token; largest clip fraction "
        f"{max(m['clip_frac'] for m in grpo):.3f}.",
        "",
        "![GRPO reward and KL](report_grpo.png)",
        "",
        "## Evaluation: the four models",
        "",
        "| metric | unit | better | "
        + " | ".join(MODEL_NAMES.get(m, m) for m in next(iter(table.values())))
        + " |",
        "|---|---|---|" + "---|" * len(next(iter(table.values()))),
    ]
    for key, by_model in table.items():
        unit, better = metric_info(key)
        cells = [
            f"{c['value']:.2f}" if c and c["value"] is not None else "n/a"
            for c in by_model.values()
        ]
        lines.append(f"| {key} | {unit} | {better.split()[0]} | " + " | ".join(cells) + " |")
    lines += ["", "![comparison](report_compare.png)", ""]
    if example is not None:
        sample_id, question = example
        lines += [f"The safety question 「{question}」, answered by each model (greedy):", ""]
        for model in next(iter(table.values())):
            answer = _predictions(out / "eval" / model, "safety").get(sample_id, "")
            lines.append(f"- {MODEL_NAMES.get(model, model)}: 「{answer}」")
        lines.append("")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
