#!/usr/bin/env python
"""The whole pipeline on one CPU box, on tiny models it builds: the CPU demo of megatron_kaja.

    python examples/tiny/run_demo.py [--out runs/demo] [--fast]

Stages (each runs the project's real entry point, as a user would):
  1. a tiny llm-jp-3-shaped tokenizer and model (the "instruct" model to tune)
  2. synthetic SFT data: tools/generate_sft_data.py with the seed's prompts, the tiny model
     as an in-process (hf) teacher
  3. SFT: tools/convert_checkpoint.py hf-to-mcore, then torchrun pretrain_sft.py at TP=2
  4. GRPO: torchrun train_grpo.py from the SFT checkpoint (rule reward: refusal-with-reason)
  5. conversion of the SFT and GRPO checkpoints back to HF
  6. tools/merge_models.py: linear merge of the SFT and GRPO models
  7. tools/evaluate.py on the base, SFT, GRPO and merged models, then a comparison report

A random tiny model is neither a good teacher nor a real judge: the demo shows the pipeline
working end to end (files, formats, parallel training, resumable stages), not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"


class Demo:
    def __init__(self, out: Path, fast: bool):
        self.out = out
        self.fast = fast
        self.started = time.perf_counter()
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.env.pop("CUDA_VISIBLE_DEVICES", None)
        self.log_dir = out / "logs"

    def stage(self, n: int, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"\n[{n}/7 | {elapsed:5.0f}s] {text}", flush=True)

    def run(self, name: str, *cmd: str) -> None:
        """Run a stage's command; its output goes to logs/NAME.log (shown on failure)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "w", encoding="utf-8") as f:
            proc = subprocess.run(cmd, cwd=REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            print(log.read_text(encoding="utf-8")[-6000:], file=sys.stderr)
            raise SystemExit(f"stage {name} failed ({proc.returncode}); log: {log}")
        print(f"  done ({name}; log {log.relative_to(self.out)})")

    def torchrun(self, name: str, script: str, nproc: int, *args: str) -> None:
        self.run(
            name,
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", script, *args,
        )  # fmt: skip

    def tool(self, name: str, script: str, *args: str) -> None:
        self.run(name, sys.executable, str(REPO / script), *args)


def last_metrics(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [m for m in lines if "loss" in m][-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where everything goes (replaced)")
    parser.add_argument("--fast", action="store_true", help="fewer steps (CI smoke run)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    demo = Demo(out, args.fast)
    sft_steps, grpo_steps = (6, 2) if args.fast else (40, 6)
    base, tok = out / "models" / "base_hf", out / "models" / "tokenizer"

    demo.stage(1, "tiny llm-jp-3-shaped tokenizer and model")
    from megatron_kaja.tiny import build_tiny_hf_model, build_tiny_tokenizer

    build_tiny_tokenizer(tok)
    build_tiny_hf_model(base, "gqa", seed=0, tokenizer_dir=tok)
    print(f"  {base}: LlamaForCausalLM, hidden 64, 4 layers, GQA 4/2 heads")

    demo.stage(2, "synthetic SFT data: the seed's question/answer prompts, hf teacher")
    synth = out / "data" / "synthetic.jsonl"
    synth.parent.mkdir(parents=True)
    demo.tool(
        "generate_sft_data", "tools/generate_sft_data.py",
        "--seeds", f"{DATA / 'seeds_safety.jsonl'}:safety",
        f"{DATA / 'seeds_helpful.jsonl'}:helpful",
        "--samples-per-seed", "1", "--backend", "hf", "--model", str(base),
        "--max-tokens", "32", "--temperature", "1.0", "--seed", "0", "--out", str(synth),
        "--no-progress",
    )  # fmt: skip
    summary = json.loads(synth.with_suffix(".summary.json").read_text())
    rejected = {k: v for k, v in (summary.get("rejected") or {}).items() if v}
    print(f"  teacher requests {summary.get('requests')}, accepted {summary.get('accepted')}, "
          f"rejected {rejected}")  # fmt: skip
    print("  (a random tiny teacher rarely writes the Q:/A: form; the SFT set adds the demo's")
    print("   own pairs, data/sft_seed_pairs.jsonl, so that training has data)")
    train_files = [str(DATA / "sft_seed_pairs.jsonl"), "1.0"]
    if synth.exists() and synth.stat().st_size:
        train_files += [str(synth), "1.0"]

    demo.stage(3, f"SFT: HF -> megatron-core, then pretrain_sft.py at TP=2 ({sft_steps} steps)")
    mc_base = out / "models" / "base_mcore"
    demo.tool("convert_base", "tools/convert_checkpoint.py", "hf-to-mcore", "--hf-dir", str(base),
              "--out", str(mc_base), "--target-tensor-parallel-size", "2")  # fmt: skip
    sft = out / "runs" / "sft"
    demo.torchrun(
        "pretrain_sft", "pretrain_sft.py", 2,
        "--load", str(mc_base), "--tokenizer", str(tok), "--train-data", *train_files,
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", str(sft_steps), "--lr", "2e-3", "--min-lr", "2e-5",
        "--tensor-model-parallel-size", "2", "--save", str(sft), "--save-interval", str(sft_steps),
        "--data-cache-dir", str(out / "cache"),
    )  # fmt: skip
    first = json.loads((sft / "metrics.jsonl").read_text().splitlines()[0])
    print(f"  loss {first['loss']:.3f} -> {last_metrics(sft / 'metrics.jsonl')['loss']:.3f}")

    demo.stage(4, f"GRPO from the SFT checkpoint ({grpo_steps} steps, rule reward)")
    print("  reward: refusal_with_reason (a rule), not an LLM judge, in this CPU demo")
    grpo = out / "runs" / "grpo"
    demo.torchrun(
        "train_grpo", "train_grpo.py", 2,
        "--load", str(sft), "--tokenizer", str(tok),
        "--prompts", f"{DATA / 'seeds_safety.jsonl'}:safety",
        "--reward", "refusal_with_reason", "--num-generations", "4", "--max-new-tokens", "24",
        "--micro-batch-size", "8", "--global-batch-size", "16", "--train-iters", str(grpo_steps),
        "--lr", "1e-4", "--tensor-model-parallel-size", "2", "--save", str(grpo),
    )  # fmt: skip
    m = last_metrics(grpo / "metrics.jsonl")
    print(f"  last step: reward {m['reward_mean']:.3f}, kl {m['kl']:.4f}, loss {m['loss']:.4f}")

    demo.stage(5, "SFT and GRPO checkpoints -> HF")
    hf = {"base": base}
    for name, run in (("sft", sft), ("grpo", grpo)):
        latest = (run / "latest_checkpointed_iteration.txt").read_text().strip()
        hf[name] = out / "models" / f"{name}_hf"
        demo.tool(f"convert_{name}", "tools/convert_checkpoint.py", "mcore-to-hf",
                  "--mcore-dir", str(run / f"iter_{int(latest):07d}"), "--out", str(hf[name]),
                  "--hf-template", str(base))  # fmt: skip

    demo.stage(6, "merge: linear 0.5 / 0.5 of the SFT and GRPO models")
    hf["merged"] = out / "models" / "merged_hf"
    demo.tool("merge", "tools/merge_models.py", "--method", "linear",
              "--models", str(hf["sft"]), str(hf["grpo"]), "--weights", "0.5", "0.5",
              "--out", str(hf["merged"]), "--no-progress")  # fmt: skip

    demo.stage(7, "evaluate base / SFT / GRPO / merged, then compare")
    print("  judge: the tiny base model through the hf backend (a stand-in: scores are not")
    print("  meaningful; on a cluster use --judge-backend openai with Llama-3-ELYZA-JP-8B-AWQ)")
    runs = []
    for name, model in hf.items():
        runs.append(out / "eval" / name)
        demo.tool(
            f"evaluate_{name}", "tools/evaluate.py", "--model", str(model),
            "--dataset", f"safety={DATA / 'eval_safety.jsonl'}",
            "--dataset", f"borderline={DATA / 'eval_borderline.jsonl'}",
            "--dataset", f"helpful={DATA / 'eval_helpful.jsonl'}",
            "--max-new-tokens", "24", "--judge-backend", "hf", "--judge-model", str(base),
            "--out", str(runs[-1]),
        )  # fmt: skip
    compare = out / "eval" / "compare"
    demo.tool("compare", "tools/evaluate.py", "--compare", *map(str, runs), "--out", str(compare))

    print(f"\ndone in {time.perf_counter() - demo.started:.0f}s")
    print(f"  report:      {compare / 'compare.md'} (chart: compare.png)")
    print(f"  checkpoints: {out / 'runs'} (megatron), {out / 'models'} (HF)")
    print(f"  logs:        {demo.log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
