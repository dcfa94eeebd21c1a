#!/usr/bin/env python
"""Make SFT data with a teacher LLM from seed questions (the seed write-up's step 1).

    python tools/generate_sft_data.py \\
        --seeds ac.jsonl:safety borderline.jsonl:helpful instructions.jsonl:helpful \\
        --target-count 240000 \\
        --backend openai --base-url http://HOST:8000/v1 --model calm3-22b-chat \\
        --concurrency 64 --temperature 0.7 --top-p 0.95 --max-tokens 1024 --seed 0 \\
        --decontaminate ac_test.jsonl ichikara_test.jsonl --out sft.jsonl

Rerunning the same command after a stop (even `kill -9`) continues where it stopped.
Writes OUT (accepted pairs), OUT's `.rejected.jsonl` (rejections with reasons) and
`.summary.json` (counts, tokens, time) beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_kaja.eval.records import load_records
from megatron_kaja.inference import backend_names
from megatron_kaja.inference.health import ServerFailingError
from megatron_kaja.recipe import (
    add_recipe_arguments,
    check_data_files,
    dry_run_result,
    expand_config,
    report_files,
)
from megatron_kaja.synth import QualityConfig, SeedFile, SynthConfig, run_synthesis
from megatron_kaja.synth.samples import load_seed_questions
from megatron_kaja.synth.templates import KINDS


def _seed_file(value: str) -> SeedFile:
    try:
        return SeedFile.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _kind_file(value: str) -> tuple[str, str]:
    kind, sep, path = value.partition("=")
    if not sep or kind not in KINDS or not path:
        raise argparse.ArgumentTypeError(f"expected KIND=FILE with KIND in {KINDS}, got {value!r}")
    return kind, path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_recipe_arguments(p)
    p.add_argument("--seeds", nargs="+", type=_seed_file, required=True, metavar="PATH:KIND")
    p.add_argument("--out", required=True, help="output JSONL (resumed if it exists)")
    count = p.add_mutually_exclusive_group(required=True)
    count.add_argument("--samples-per-seed", type=int, metavar="N")
    count.add_argument("--target-count", type=int, metavar="N", help="accepted pairs to make")
    p.add_argument(
        "--max-samples-per-seed",
        type=int,
        help="with --target-count: give up after this many samples per seed "
        "(default 10x what the target needs)",
    )
    teacher = p.add_argument_group("teacher")
    teacher.add_argument("--backend", choices=backend_names(), default="openai")
    teacher.add_argument("--model", required=True, help="served model name, or checkpoint path")
    teacher.add_argument("--base-url", help="e.g. http://localhost:8000/v1 (openai backend)")
    teacher.add_argument("--api-key-env", metavar="VAR", help="read the API key from $VAR")
    teacher.add_argument("--concurrency", type=int, default=64, help="requests in flight / batch")
    teacher.add_argument("--temperature", type=float, default=0.7)
    teacher.add_argument("--top-p", type=float, default=0.95)
    teacher.add_argument("--max-tokens", type=int, default=1024)
    teacher.add_argument("--seed", type=int, default=0)
    teacher.add_argument("--max-attempts", type=int, default=5, help="per request (openai)")
    teacher.add_argument("--timeout", type=float, default=300.0, help="seconds per network read")
    teacher.add_argument(
        "--request-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="most seconds one request may take, retries included (openai)",
    )
    teacher.add_argument(
        "--template", type=_kind_file, action="append", default=[], metavar="KIND=YAML"
    )
    quality = p.add_argument_group("quality")
    quality.add_argument("--decontaminate", nargs="+", default=[], metavar="EVAL_JSONL")
    quality.add_argument("--decontaminate-ngram", type=int, default=8, help="characters")
    quality.add_argument("--decontaminate-threshold", type=float, default=0.5)
    quality.add_argument("--near-duplicate-threshold", type=float, default=0.8)
    defaults = QualityConfig()
    for name in ("min_question_chars", "max_question_chars", "min_answer_chars"):
        quality.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    quality.add_argument("--max-answer-chars", type=int, default=defaults.max_answer_chars)
    quality.add_argument("--min-japanese-ratio", type=float, default=defaults.min_japanese_ratio)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(expand_config(sys.argv[1:] if argv is None else list(argv)))


def main(argv=None) -> int:
    args = parse_args(argv)
    kinds = [kind for kind, _ in args.template]
    if len(kinds) != len(set(kinds)):
        raise SystemExit(f"--template: each kind may be given once, got {kinds}")
    quality = QualityConfig(
        min_question_chars=args.min_question_chars,
        max_question_chars=args.max_question_chars,
        min_answer_chars=args.min_answer_chars,
        max_answer_chars=args.max_answer_chars,
        min_japanese_ratio=args.min_japanese_ratio,
    )
    cfg = SynthConfig(
        seeds=args.seeds,
        out=args.out,
        model=args.model,
        samples_per_seed=args.samples_per_seed,
        target_count=args.target_count,
        max_samples_per_seed=args.max_samples_per_seed,
        backend=args.backend,
        base_url=args.base_url,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        max_attempts=args.max_attempts,
        timeout_s=args.timeout,
        request_timeout_s=args.request_timeout,
        templates=dict(args.template),
        decontaminate=args.decontaminate,
        decontaminate_ngram=args.decontaminate_ngram,
        decontaminate_threshold=args.decontaminate_threshold,
        near_duplicate_threshold=args.near_duplicate_threshold,
        quality=quality,
        progress=not args.no_progress,
    )
    if args.dry_run:
        print("dry run: tools/generate_sft_data.py (no request is sent)")
        count = f"target {cfg.target_count}" if cfg.target_count else f"{cfg.samples_per_seed}/seed"
        print(f"teacher: {cfg.backend} {cfg.model} at {cfg.base_url}; {count} pairs; "
              f"concurrency {cfg.concurrency}; T={cfg.temperature} top-p {cfg.top_p}")  # fmt: skip
        missing = report_files(
            [("--seeds", s.path) for s in cfg.seeds]
            + [("--template", path) for path in cfg.templates.values()]
            + [("--decontaminate", path) for path in cfg.decontaminate]
        )
        error = check_data_files(
            [("--seeds", s.path, partial(lambda s: len(load_seed_questions([s])), s))
             for s in cfg.seeds]
            + [("--decontaminate", p, partial(lambda p: len(load_records(p, "helpful", False)), p))
               for p in cfg.decontaminate]
        )  # fmt: skip
        if error:
            print(f"result: {error}")
            return 2
        return dry_run_result(missing, args.allow_missing_files)
    try:
        summary = run_synthesis(cfg)
    except ServerFailingError as exc:
        print(f"error: the teacher server is failing: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({k: summary[k] for k in ("accepted", "rejected_total", "requests")}))
    this_run = summary["this_run"]
    if this_run["failed"]:
        print(
            f"{this_run['failed']} samples failed (last error: {this_run['last_error']}); "
            "rerun the same command to retry them",
            file=sys.stderr,
        )
    # Nothing came of this run and requests failed: a scheduler must see that as a failure.
    if this_run["failed"] and not this_run["accepted"]:
        print("error: no pair was accepted in this run and requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
