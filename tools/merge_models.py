"""Merge HF or Megatron checkpoints (linear, slerp, task_arithmetic, ties, dare_*).

    python tools/merge_models.py --config merge.yaml --out MERGED [--evaluate EVAL_ARGS...]
    python tools/merge_models.py --method ties --base BASE --models A B --weights 0.5 0.5 \\
        --density 0.5 --out MERGED

Everything after `--evaluate` is passed to `tools/evaluate.py --model MERGED`.
"""

from __future__ import annotations

import argparse
import sys

from megatron_kaja.merge import MergeInputError, load_merge_config, merge_method_names, run_merge
from megatron_kaja.merge.config import merge_config_from_flags
from megatron_kaja.merge.evaluation import check_evaluate_tool, evaluate_merged
from megatron_kaja.recipe import dry_run_result, report_files


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", help="mergekit-like YAML recipe (instead of the flags below)")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty)")
    p.add_argument("--method", choices=merge_method_names())
    p.add_argument("--base", help="base model folder (slerp, task_arithmetic, ties, dare_*)")
    p.add_argument("--models", nargs="+", help="model folders to merge (HF or Megatron)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per --models entry")
    p.add_argument("--density", type=float, help="fraction of each task vector kept")
    p.add_argument("--t", type=float, help="slerp: 0 gives the base, 1 the other model")
    p.add_argument("--lambda", dest="lambda_", type=float, help="scale of the merged delta")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the DARE drop masks")
    p.add_argument("--out-dtype", choices=["float32", "float16", "bfloat16", "float64"])
    p.add_argument(
        "--hf-template",
        help="HF folder whose config.json describes Megatron inputs without megatron_kaja.json",
    )
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="validate the recipe, list inputs, exit")
    p.add_argument("--allow-missing-files", action="store_true", help="dry run: list, not fail")
    p.add_argument(
        "--evaluate",
        nargs=argparse.REMAINDER,
        help="run tools/evaluate.py --model OUT with the remaining arguments",
    )
    args = p.parse_args(argv)
    if (args.config is None) == (args.method is None):
        p.error("give either --config or --method (with --models)")
    if args.method is not None and not args.models:
        p.error("--method needs --models")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.evaluate is not None:
            check_evaluate_tool()
        if args.config is not None:
            config = load_merge_config(args.config)
            for field in ("out_dtype", "hf_template"):
                if getattr(args, field):
                    config = config.model_copy(update={field: getattr(args, field)})
        else:
            config = merge_config_from_flags(
                args.method,
                args.models,
                base=args.base,
                weights=args.weights,
                density=args.density,
                t=args.t,
                normalize=args.normalize,
                lambda_=args.lambda_,
                seed=args.seed,
                out_dtype=args.out_dtype,
                hf_template=args.hf_template,
            )
        if args.dry_run:
            print(f"dry run: tools/merge_models.py ({config.merge_method}, nothing is written)")
            inputs = [("base_model", config.base_model)]
            inputs += [("models[].model", m.model) for m in config.models]
            return dry_run_result(report_files(inputs), args.allow_missing_files)
        run_merge(config, args.out, args.max_shard_size, progress=not args.no_progress)
    except (MergeInputError, ValueError, FileNotFoundError) as exc:
        print(f"merge_models: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged model written to {args.out}")
    if args.evaluate is not None:
        return evaluate_merged(args.out, args.evaluate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
