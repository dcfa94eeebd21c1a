#!/usr/bin/env python
"""Evaluate safety / over-refusal / helpfulness with an LLM judge (llm-jp-judge style).

    python tools/evaluate.py --model HF_DIR --dataset safety=ac_test.jsonl \\
        --dataset borderline=bl.jsonl --dataset helpful=inst.jsonl \\
        --judge-backend openai --judge-base-url URL --judge-model NAME --out DIR
    python tools/evaluate.py --predictions safety=preds.jsonl --judge-backend hf \\
        --judge-model JUDGE_DIR --out DIR
    python tools/evaluate.py --compare DIR_BASE DIR_SFT DIR_GRPO --out DIR_CMP
    python tools/evaluate.py --checkpoints runs/grpo --hf-template HF_BASE \\
        --dataset safety=ac_test.jsonl --dataset borderline=bl.jsonl ... --out DIR_CURVE
    add --protocol llm-jp-judge --llm-jp-judge PATH for llm-jp-judge's prompts and rules
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_kaja.eval import (
    KINDS,
    EvalConfig,
    compare_runs,
    evaluate_checkpoints,
    load_records,
    protocol_names,
    run_evaluation,
)
from megatron_kaja.inference.health import ServerFailingError
from megatron_kaja.recipe import (
    add_recipe_arguments,
    check_data_files,
    dry_run_result,
    expand_config,
    report_files,
)


def _kind_path(value: str) -> tuple[str, str]:
    kind, sep, path = value.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected KIND=FILE with KIND in {KINDS}, got {value!r}")
    if kind not in KINDS:
        raise argparse.ArgumentTypeError(f"unknown dataset kind {kind!r}; choose one of {KINDS}")
    return kind, path


def _count(path: str, kind: str, with_predictions: bool) -> int:
    return len(load_records(path, kind, with_predictions=with_predictions))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_recipe_arguments(p)
    p.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    p.add_argument(
        "--compare", nargs="+", metavar="RUN_DIR", help="paired comparison of finished runs"
    )
    p.add_argument(
        "--checkpoints",
        metavar="RUN_DIR",
        help="evaluate every iter_XXXXXXX checkpoint of a training run (needs --hf-template)",
    )
    p.add_argument("--hf-template", help="HF folder whose config and tokenizer the checkpoints use")
    p.add_argument("--name", help="the model's name in reports and charts (default: its folder)")
    data = p.add_argument_group("answers")
    data.add_argument(
        "--dataset", type=_kind_path, action="append", default=[], metavar="KIND=FILE"
    )
    data.add_argument(
        "--predictions", type=_kind_path, action="append", default=[], metavar="KIND=FILE"
    )
    data.add_argument("--model", help="HF checkpoint that answers --dataset questions")
    data.add_argument("--gen-backend", choices=("hf", "vllm"), default="hf")
    data.add_argument("--max-new-tokens", type=int, default=512)
    data.add_argument("--batch-size", type=int, default=8)
    data.add_argument("--system-prompt", default=None, help="prepend a system message")
    judge = p.add_argument_group("judge")
    judge.add_argument("--judge-backend", choices=("openai", "vllm", "hf"), default="hf")
    judge.add_argument("--judge-model", help="served model name (openai) or checkpoint path")
    judge.add_argument("--judge-base-url", help="e.g. http://localhost:8000/v1 (openai backend)")
    judge.add_argument("--judge-api-key", default="EMPTY")
    judge.add_argument(
        "--protocol",
        choices=protocol_names(),
        default="megatron-kaja",
        help="megatron-kaja: our rubrics; llm-jp-judge: its prompt files and scoring rules",
    )
    judge.add_argument(
        "--llm-jp-judge", metavar="PATH", help="llm-jp-judge checkout (default: installed package)"
    )
    judge.add_argument(
        "--judge-mode", choices=("choice", "free_text"), help="default: choice (our protocol)"
    )
    judge.add_argument("--judge-concurrency", type=int, default=32)
    judge.add_argument(
        "--judge-max-attempts", type=int, help="default: 3 (llm-jp-judge: its max_retries + 1 = 4)"
    )
    judge.add_argument(
        "--request-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="most seconds one judge request may take, retries included (openai backend)",
    )
    judge.add_argument(
        "--choice-param",
        choices=("structured_outputs", "guided_choice"),
        default="structured_outputs",
        help="how vLLM is told the score choices (guided_choice for vLLM < 0.12)",
    )
    judge.add_argument(
        "--rubric", type=_kind_path, action="append", default=[], metavar="KIND=YAML"
    )
    p.add_argument("--bootstrap-samples", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=32, help="samples per persisted step")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(expand_config(sys.argv[1:] if argv is None else list(argv)))


def main(argv=None) -> int:
    try:
        return _main(argv)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input (a flag, a file, an --out folder made from something else): one line.
        print(f"evaluate.py: error: {exc}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    args = parse_args(argv)
    for flag in ("dataset", "predictions", "rubric"):
        kinds = [kind for kind, _ in getattr(args, flag)]
        if len(kinds) != len(set(kinds)):
            raise SystemExit(f"--{flag}: each kind may be given once, got {kinds}")
    if args.compare:
        compare_runs(args.compare, args.out, args.bootstrap_samples, args.seed)
        print(f"wrote {args.out}/compare.md, compare.json, compare.png, tradeoff.png")
        return 0
    if args.checkpoints:
        if not args.hf_template:
            raise SystemExit("--checkpoints needs --hf-template (the HF folder of the run's model)")
        if args.predictions or args.model:
            raise SystemExit(
                "--checkpoints generates answers: use --dataset, not --predictions/--model"
            )
        args.model = args.checkpoints  # validated per step; the config needs a model
    cfg = EvalConfig(
        out_dir=args.out,
        datasets=dict(args.dataset),
        predictions=dict(args.predictions),
        model=args.model,
        gen_backend=args.gen_backend,
        gen_max_tokens=args.max_new_tokens,
        gen_batch_size=args.batch_size,
        system_prompt=args.system_prompt,
        judge_backend=args.judge_backend,
        judge_model=args.judge_model,
        judge_base_url=args.judge_base_url,
        judge_api_key=args.judge_api_key,
        judge_mode=args.judge_mode,
        judge_concurrency=args.judge_concurrency,
        judge_max_attempts=args.judge_max_attempts,
        protocol=args.protocol,
        llm_jp_judge=args.llm_jp_judge,
        name=args.name,
        judge_request_timeout_s=args.request_timeout,
        choice_param=args.choice_param,
        rubrics=dict(args.rubric),
        chunk_size=args.chunk_size,
        bootstrap_samples=args.bootstrap_samples,
        seed=args.seed,
    )
    if args.dry_run:
        print("dry run: tools/evaluate.py (no model is loaded, the judge is not contacted)")
        print(f"answers: {cfg.gen_backend} {cfg.model}; judge: {cfg.judge_backend} "
              f"{cfg.judge_model} at {cfg.judge_base_url} ({cfg.judge_mode})")  # fmt: skip
        missing = report_files(
            [("--model", cfg.model)]
            + [(f"--dataset {k}=", path) for k, path in cfg.datasets.items()]
            + [(f"--predictions {k}=", path) for k, path in cfg.predictions.items()]
        )
        error = check_data_files(
            [(f"--dataset {k}=", p, partial(_count, p, k, False)) for k, p in cfg.datasets.items()]
            + [(f"--predictions {k}=", p, partial(_count, p, k, True))
               for k, p in cfg.predictions.items()]
        )  # fmt: skip
        if error:
            print(f"result: {error}")
            return 2
        return dry_run_result(missing, args.allow_missing_files)
    try:
        if args.checkpoints:
            reports = evaluate_checkpoints(cfg, args.checkpoints, args.hf_template)
            print(
                f"evaluated steps {sorted(reports)}; wrote {args.out}/curve.md, curve.png, "
                "tradeoff.png"
            )
            return 0
        report = run_evaluation(cfg)
    except ServerFailingError as exc:
        print(f"error: the judge server is failing: {exc}", file=sys.stderr)
        return 1
    for kind, metrics in report["datasets"].items():
        print(
            kind,
            {k: v["value"] for k, v in metrics.items() if isinstance(v, dict) and "value" in v},
        )
    print(f"wrote {args.out}/report.json, report.md, report.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
