#!/usr/bin/env python
"""The whole pipeline on one CPU box, on tiny models it builds: the CPU demo of megatron_kaja.

    python examples/tiny/run_demo.py [--out runs/demo] [--fast]

Stages (each runs the project's real entry point with a user's arguments: the trainers
under torchrun, the tools' main() in this process):
  1. a tiny llm-jp-3-shaped tokenizer and a random "instruct" model (the model to tune)
  2. a tiny teacher-judge: pretrain_sft.py (DP=2) teaches a copy of the model the seed's teacher
     prompts (-> Q: / A:) and the project's judge rubrics (-> the rubric's score); its
     agreement with the rubric is measured on held-out questions through the judge code
  3. synthetic SFT data: tools/generate_sft_data.py with that teacher
  4. SFT of the instruct model (pretrain_sft.py at TP=2) on the seed pairs + synthetic data
  5. GRPO from the SFT checkpoint (train_grpo.py at TP=2), the tiny judge as the reward
  6. conversion of the SFT and GRPO checkpoints back to HF
  7. tools/merge_models.py: linear merge of the SFT and GRPO models
  8. tools/evaluate.py on the base, SFT, GRPO and merged models, judged by the tiny judge
  9. the report: report.md with the training curves and the comparison chart (PNGs)

The tiny judge stands in for Llama-3-ELYZA-JP-8B-AWQ: it learned the rubrics' rules on the
demo's few answer forms, so its scores mean what the rubric says only on answers like those.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import demo_tasks  # noqa: E402
import report as demo_report  # noqa: E402

JUDGE_WHAT = (
    "the demo's tiny judge (a 4-layer LlamaForCausalLM SFT'd in stage 2 on the project's "
    "rubric prompts, read in choice mode: expected score from the score tokens' log-probs), "
    "a stand-in for Llama-3-ELYZA-JP-8B-AWQ"
)


class Demo:
    def __init__(self, out: Path, fast: bool, stages: int):
        self.out = out
        self.fast = fast
        self.stages = stages
        self.started = time.perf_counter()
        self.stage_started = self.started
        self.timings: dict[str, float] = {}  # stage -> wall seconds
        self.cpu_timings: dict[str, float] = {}  # stage -> CPU seconds, its processes' too
        self.stage_cpu = 0.0
        self.current: str | None = None
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.env.pop("CUDA_VISIBLE_DEVICES", None)
        self.log_dir = out / "logs"
        self.tty = sys.stdout.isatty()

    def stage(self, n: int, name: str, text: str) -> None:
        """Start stage `n` (`name` labels its time in the report)."""
        self.end_stage()
        self.current = name
        self.stage_started = time.perf_counter()
        self.stage_cpu = cpu_seconds()
        elapsed = self.stage_started - self.started
        print(f"\n[{n}/{self.stages} | {elapsed:5.0f}s] {name}: {text}", flush=True)

    def end_stage(self) -> None:
        if self.current is not None:
            took = time.perf_counter() - self.stage_started
            cpu = cpu_seconds() - self.stage_cpu
            self.timings[self.current] = took
            self.cpu_timings[self.current] = cpu
            print(f"  ({took:.0f}s, {cpu:.0f} CPU-s)", flush=True)
            self.current = None

    def run(self, name: str, *cmd: str, progress: tuple[Path, int, str] | None = None) -> None:
        """Run a command; its output goes to logs/NAME.log (shown on failure). With
        `progress=(metrics.jsonl, total steps, key)`, report each logged step while it runs."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
            shown, last_print = 0, 0.0
            while proc.poll() is None:
                time.sleep(0.5)
                if progress is None:
                    continue
                steps = read_metrics(progress[0])
                now = time.perf_counter()
                # One line per new step on a terminal (rewritten in place); in a log, at most
                # one line every 10 s so that CI output stays short.
                if len(steps) > shown and (self.tty or now - last_print > 10):
                    shown, last_print = len(steps), now
                    m = steps[-1]
                    line = (
                        f"    {name}: step {m['step']}/{progress[1]}  "
                        f"{progress[2]} {m[progress[2]]:.3f}  ({now - start:.0f}s)"
                    )
                    print("\r" + line if self.tty else line, end="" if self.tty else "\n",
                          flush=True)  # fmt: skip
            if self.tty and shown:
                print()
        if proc.returncode != 0:
            print(log.read_text(encoding="utf-8")[-6000:], file=sys.stderr)
            raise SystemExit(f"stage {name} failed ({proc.returncode}); log: {log}")
        took = time.perf_counter() - start
        print(f"  done {name} in {took:.0f}s (log {log.relative_to(self.out)})", flush=True)

    def torchrun(self, name: str, script: str, nproc: int, *args: str, progress=None) -> None:
        self.run(
            name,
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", script, *args, progress=progress,
        )  # fmt: skip

    def tool(self, name: str, script: str, *args: str) -> None:
        """Run `script`'s `main(argv)` in this process, as `python script args` would, its
        output in logs/NAME.log. One process for all the single-process tools: each new
        Python process pays again for importing torch, transformers and megatron-core
        (several CPU seconds each, far more on a loaded machine)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        start = time.perf_counter()
        path = REPO / script
        module_name = "demo_tool_" + path.stem
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        with (
            open(log, "w", encoding="utf-8") as f,
            contextlib.redirect_stdout(f),
            contextlib.redirect_stderr(f),
        ):
            print("$ python", script, *map(shlex.quote, args), end="\n\n", flush=True)
            try:
                code = module.main(list(args))
            except SystemExit as exit_:  # argparse errors and the tools' clean exits
                code = exit_.code
        if code not in (0, None):
            print(log.read_text(encoding="utf-8")[-6000:], file=sys.stderr)
            raise SystemExit(f"stage {name} failed ({code}); log: {log}")
        took = time.perf_counter() - start
        print(f"  done {name} in {took:.0f}s (log {log.relative_to(self.out)})", flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process and of every child it has waited for (torchrun
    and its ranks): on a shared machine the stages' CPU time, unlike their wall time, does
    not depend on what else runs."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def read_metrics(path: Path) -> list[dict]:
    """The per-step lines of a run's metrics.jsonl (empty while the run starts up)."""
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being written
        if "loss" in m and "step" in m:
            steps.append(m)
    return steps


def latest_weights(run: Path) -> Path:
    """The newest checkpoint of a pretrain_sft.py / train_grpo.py --save folder."""
    from megatron_kaja.training.checkpointing import iteration_dir, latest_iteration

    iteration = latest_iteration(run)
    if iteration is None:
        raise SystemExit(f"{run}: no training checkpoint")
    return iteration_dir(run, iteration)


def judge_agreement(judge_model: Path, cases: list[dict]) -> list[dict]:
    """Score `cases` with the judge exactly as evaluation and GRPO do (LLMJudge, hf backend,
    choice mode) and compare with the rubric's score."""
    from megatron_kaja.judge import JudgeConfig, JudgeSample, LLMJudge, load_rubric
    from megatron_kaja.judge.backend import build_judge_backend

    rubrics = {name: load_rubric(name) for name in {c["rubric"] for c in cases}}
    judge = LLMJudge(build_judge_backend("hf", str(judge_model)), rubrics, JudgeConfig())
    samples = [JudgeSample(rubric=c["rubric"], **c["fields"]) for c in cases]
    rows = []
    for case, verdict in zip(cases, judge.judge(samples), strict=True):
        axes = verdict.axes or {}
        score = axes.get(case["axis"], verdict.score) if case["axis"] else verdict.score
        rows.append(
            {
                "rubric": case["rubric"],
                "axis": case["axis"],
                "form": case["form"],
                "answer": case["fields"]["pred"],
                "rubric_score": case["score"],
                "judge_score": score,
                "agrees": score is not None and abs(score - case["score"]) < 0.5,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where everything goes (replaced)")
    parser.add_argument("--fast", action="store_true", help="fewer steps (CI smoke run)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    demo = Demo(out, args.fast, stages=9)
    # The SFT learns the seed answers' words but not where to stop: sampled at temperature 1
    # its completions run on into fragments (reward about 0.15), and GRPO learns to end them
    # (completions shrink from 24 tokens to under 10). After a shorter SFT (20-40 steps) the
    # samples are noise the judge scores near 0 and GRPO's reward stays flat. The judge needs
    # its 240 steps of 8 rows even in --fast: after 140 steps of 16 rows it agreed with the
    # rubric on 34 of 44 held-out answers (240 x 8: 40) and the teacher repeated its
    # questions. GRPO's 20 steps rose +0.18 to +0.24 from the first third to the last; 30
    # clear +0.4.
    steps = {"judge": 240, "sft": 80, "grpo": 10 if args.fast else 30}
    models, runs, data = out / "models", out / "runs", out / "data"
    base, tok_dir = models / "base_hf", models / "tokenizer"

    demo.stage(1, "models", "a tiny llm-jp-3-shaped tokenizer and instruct model")
    from transformers.utils import logging as hf_logging

    from megatron_kaja.tiny import TinyLlamaShape, build_tiny_hf_model, build_tiny_tokenizer

    hf_logging.disable_progress_bar()  # the demo prints its own progress

    tokenizer = build_tiny_tokenizer(tok_dir, vocab_size=1000, extra_text=demo_tasks.corpus_text())
    shape = TinyLlamaShape(num_key_value_heads=2, vocab_size=len(tokenizer) + 9)
    build_tiny_hf_model(base, shape, seed=0, tokenizer_dir=tok_dir)
    print(f"  {base.relative_to(out)}: LlamaForCausalLM, hidden {shape.hidden_size}, "
          f"{shape.num_hidden_layers} layers, GQA 4/2 heads, vocab {shape.vocab_size}")  # fmt: skip

    demo.stage(2, "teacher-judge", f"SFT a copy of the model on teacher + judge tasks "
               f"({steps['judge']} steps)")  # fmt: skip
    # Four answers of each form per training question: the judge learns what makes a form
    # (a refusal, a reason, trailing fragments, noise), not one noise string per question.
    train_cases = demo_tasks.judge_cases(tokenizer, seed=0, variants=4)
    held_out = demo_tasks.judge_cases(tokenizer, seed=1, held_out=True)
    teacher_rows = demo_tasks.teacher_rows()
    tj_data = data / "teacher_judge_sft.jsonl"
    # The teacher rows are few; repeat them so that both jobs are learned in one run (with
    # fewer repeats the teacher writes the same new question for several seeds).
    demo_tasks.write_jsonl(tj_data, teacher_rows * 8 + demo_tasks.judge_rows(train_cases))
    print(f"  {len(teacher_rows)} teacher rows (x8), {len(train_cases)} judge rows "
          f"({tj_data.relative_to(out)})")  # fmt: skip
    mc_base = models / "base_mcore"
    demo.tool("convert_base", "tools/convert_checkpoint.py", "hf-to-mcore", "--hf-dir", str(base),
              "--out", str(mc_base), "--target-tensor-parallel-size", "2")  # fmt: skip
    tj_run = runs / "teacher_judge"
    demo.torchrun(
        "teacher_judge_sft", "pretrain_sft.py", 2,
        "--load", str(mc_base), "--tokenizer", str(tok_dir), "--train-data", str(tj_data),
        # DP=2 (TP=1): at hidden 64 a TP all-reduce in every layer costs more than its
        # compute; data parallelism exchanges gradients once per step. Rows of 512 tokens
        # hold about three rubric prompts each; one micro-batch per rank and step.
        "--seq-length", "512", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", str(steps["judge"]), "--lr", "3e-3", "--min-lr", "3e-4",
        "--lr-warmup-iters", "10", "--tensor-model-parallel-size", "1",
        # torch's fused attention: half the CPU time of the local spec's at 512 tokens
        "--transformer-impl", "sdpa",
        "--save", str(tj_run), "--data-cache-dir", str(out / "cache"),
        progress=(tj_run / "metrics.jsonl", steps["judge"], "loss"),
    )  # fmt: skip
    judge_hf = models / "teacher_judge_hf"
    demo.tool("convert_teacher_judge", "tools/convert_checkpoint.py", "mcore-to-hf",
              "--mcore-dir", str(latest_weights(tj_run)), "--out", str(judge_hf),
              "--hf-template", str(base))  # fmt: skip
    agreement = judge_agreement(judge_hf, held_out)
    agreed = sum(r["agrees"] for r in agreement)
    (out / "eval").mkdir(parents=True, exist_ok=True)
    (out / "eval" / "judge_agreement.json").write_text(
        json.dumps(agreement, ensure_ascii=False, indent=1), encoding="utf-8"
    )
    print(f"  judge: {JUDGE_WHAT}")
    print(f"  judge vs the rubric on {len(agreement)} held-out answers (questions it never saw): "
          f"{agreed} of {len(agreement)} within 0.5 of the rubric's score")  # fmt: skip
    for kind, rows in demo_tasks.agreement_by_kind(agreement).items():
        print(f"    {kind:<22} {sum(r['agrees'] for r in rows):>2}/{len(rows)}")

    demo.stage(3, "synthetic data", "the seed's Q:/A: prompts, the tiny teacher (hf backend)")
    synth = data / "synthetic.jsonl"
    demo.tool(
        "generate_sft_data", "tools/generate_sft_data.py",
        "--seeds", f"{DATA / 'seeds_safety.jsonl'}:safety",
        f"{DATA / 'seeds_helpful.jsonl'}:helpful",
        "--samples-per-seed", "1", "--backend", "hf", "--model", str(judge_hf),
        "--max-tokens", "64", "--temperature", "0.6", "--seed", "0", "--out", str(synth),
        "--no-progress",
    )  # fmt: skip
    summary = json.loads(synth.with_suffix(".summary.json").read_text())
    rejected = {k: v for k, v in (summary.get("rejected") or {}).items() if v}
    print(f"  teacher: {summary.get('requests')} requests (2 per pair), accepted pairs "
          f"{summary.get('accepted')}, rejected {rejected or 'none'}")  # fmt: skip
    for line in synth.read_text(encoding="utf-8").splitlines()[:2]:
        messages = json.loads(line)["messages"]
        print(f"    e.g. Q: {messages[0]['content']}  A: {messages[1]['content']}")
    train_files = [str(DATA / "sft_seed_pairs.jsonl"), "1.0"]
    if synth.is_file() and synth.stat().st_size:
        train_files += [str(synth), "1.0"]

    demo.stage(4, "SFT", f"pretrain_sft.py at TP=2, seed + synthetic pairs ({steps['sft']} steps)")
    sft = runs / "sft"
    demo.torchrun(
        "pretrain_sft", "pretrain_sft.py", 2,
        "--load", str(mc_base), "--tokenizer", str(tok_dir), "--train-data", *train_files,
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(steps["sft"]), "--lr", "2e-3", "--min-lr", "2e-5",
        "--tensor-model-parallel-size", "2", "--save", str(sft),
        "--data-cache-dir", str(out / "cache"),
        progress=(sft / "metrics.jsonl", steps["sft"], "loss"),
    )  # fmt: skip
    sft_steps = read_metrics(sft / "metrics.jsonl")
    print(f"  loss {sft_steps[0]['loss']:.3f} -> {sft_steps[-1]['loss']:.3f} (nats/token)")

    demo.stage(5, "GRPO", f"from the SFT checkpoint on the safety seeds, the tiny judge as reward "
               f"({steps['grpo']} steps)")  # fmt: skip
    grpo = runs / "grpo"
    demo.torchrun(
        "train_grpo", "train_grpo.py", 2,
        "--load", str(sft), "--tokenizer", str(tok_dir),
        # The safety prompts (rubric grpo_safety): the judge's strongest suit (see its
        # agreement table); the seed adds helpfulness prompts under grpo_helpful.
        "--prompts", f"{DATA / 'seeds_safety.jsonl'}:safety",
        "--reward", "judge", "--judge-backend", "hf", "--judge-model", str(judge_hf),
        "--num-generations", "8", "--max-new-tokens", "24", "--num-iterations", "2",
        "--micro-batch-size", "16", "--global-batch-size", "48",
        "--train-iters", str(steps["grpo"]), "--lr", "2e-3", "--lr-decay-style", "constant",
        "--tensor-model-parallel-size", "2", "--save", str(grpo),
        progress=(grpo / "metrics.jsonl", steps["grpo"], "reward_mean"),
    )  # fmt: skip
    grpo_steps = read_metrics(grpo / "metrics.jsonl")
    k = max(1, len(grpo_steps) // 3)
    first = sum(m["reward_mean"] for m in grpo_steps[:k]) / k
    last = sum(m["reward_mean"] for m in grpo_steps[-k:]) / k
    print(f"  mean reward (0-1, higher is better): first {k} steps {first:.3f}, last {k} steps "
          f"{last:.3f}, change {last - first:+.3f}")  # fmt: skip
    print(f"  KL to the SFT model {grpo_steps[-1]['kl']:.4f}, clip fraction "
          f"{max(m['clip_frac'] for m in grpo_steps):.3f} (max over steps)")  # fmt: skip

    demo.stage(6, "conversion", "SFT and GRPO checkpoints -> HF")
    hf = {"base": base}
    for name, run in (("sft", sft), ("grpo", grpo)):
        hf[name] = models / f"{name}_hf"
        demo.tool(f"convert_{name}", "tools/convert_checkpoint.py", "mcore-to-hf",
                  "--mcore-dir", str(latest_weights(run)), "--out", str(hf[name]),
                  "--hf-template", str(base))  # fmt: skip

    demo.stage(7, "merge", "linear 0.5 / 0.5 of the SFT and GRPO models")
    hf["merged"] = models / "merged_hf"
    demo.tool("merge", "tools/merge_models.py", "--method", "linear",
              "--models", str(hf["sft"]), str(hf["grpo"]), "--weights", "0.5", "0.5",
              "--out", str(hf["merged"]), "--no-progress")  # fmt: skip

    demo.stage(8, "evaluation", "base / SFT / GRPO / merged, judged by the tiny judge; compare")
    eval_runs = []
    for name, model in hf.items():
        eval_runs.append(out / "eval" / name)
        demo.tool(
            f"evaluate_{name}", "tools/evaluate.py", "--model", str(model),
            "--dataset", f"safety={DATA / 'eval_safety.jsonl'}",
            "--dataset", f"borderline={DATA / 'eval_borderline.jsonl'}",
            "--dataset", f"helpful={DATA / 'eval_helpful.jsonl'}",
            "--max-new-tokens", "32", "--judge-backend", "hf", "--judge-model", str(judge_hf),
            "--out", str(eval_runs[-1]),
        )  # fmt: skip
    compare = out / "eval" / "compare"
    demo.tool("compare", "tools/evaluate.py", "--compare", *map(str, eval_runs),
              "--out", str(compare))  # fmt: skip
    table = json.loads((compare / "compare.json").read_text(encoding="utf-8"))["metrics"]
    for key in ("safety/mean_score", "safety/violation_rate", "borderline/over_refusal_rate",
                "helpful/overall"):  # fmt: skip
        if key in table:
            cells = ", ".join(
                f"{m} {v['value']:.2f}" if v and v["value"] is not None else f"{m} n/a"
                for m, v in table[key].items()
            )
            print(f"  {key}: {cells}")

    first_safety = demo_tasks.read_jsonl(DATA / "eval_safety.jsonl")[0]
    demo.stage(9, "report", "training curves, judge agreement, comparison")
    demo.end_stage()
    report_md = demo_report.write_demo_report(
        out,
        judge=JUDGE_WHAT,
        agreement=agreement,
        synth_summary=summary,
        timings=demo.timings,
        cpu_timings=demo.cpu_timings,
        fast=args.fast,
        example=(first_safety["ID"], first_safety["text"]),
    )
    print(f"\ndone in {time.perf_counter() - demo.started:.0f}s, "
          f"{sum(demo.cpu_timings.values()):.0f} CPU-s; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")  # fmt: skip
    print(f"  report:      {report_md} (PNGs beside it)")
    print(f"  checkpoints: {runs} (megatron), {models} (HF)")
    print(f"  data:        {data}; evaluation: {out / 'eval'}; logs: {demo.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
