#!/usr/bin/env python
"""Convert llm-jp-3 checkpoints between Hugging Face and megatron-core layouts.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir HF --out MC \\
        [--format torch_dist|legacy] [--target-tensor-parallel-size N] \\
        [--target-pipeline-parallel-size M] [--transformer-impl local|sdpa|transformer_engine]
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir MC --out HF2 [--hf-template HF]
"""

from __future__ import annotations

import argparse
import gc
import sys

# Importing torch creates a few hundred thousand long-lived objects, and the cyclic garbage
# collector rescans them over and over while they are made: about 0.4 s of a 2-core
# machine's start-up. It runs again once the imports are done, without rescanning them.
gc.disable()

from megatron_kaja.checkpoint.convert import DTYPES, FORMATS, hf_to_mcore, mcore_to_hf  # noqa: E402
from megatron_kaja.checkpoint.hf import CheckpointError  # noqa: E402
from megatron_kaja.models.llama.config import ArchitectureError  # noqa: E402
from megatron_kaja.models.llama.model import TRANSFORMER_IMPLS  # noqa: E402

gc.freeze()  # the imported modules: never scanned again
gc.enable()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF folder -> megatron checkpoint")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--out", required=True)
    to_mcore.add_argument("--format", choices=FORMATS, default="torch_dist")
    to_mcore.add_argument("--target-tensor-parallel-size", type=int, default=1)
    to_mcore.add_argument("--target-pipeline-parallel-size", type=int, default=1)
    to_mcore.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default="local")
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_mcore.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    to_hf = sub.add_parser("mcore-to-hf", help="megatron checkpoint -> HF folder")
    to_hf.add_argument("--mcore-dir", required=True)
    to_hf.add_argument("--out", required=True)
    to_hf.add_argument("--hf-template", help="HF folder whose config and tokenizer to copy")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), help="default: the checkpoint's")
    to_hf.add_argument("--max-shard-size", default="5GB")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.direction == "hf-to-mcore":
            meta = hf_to_mcore(
                args.hf_dir,
                args.out,
                fmt=args.format,
                tensor_parallel_size=args.target_tensor_parallel_size,
                pipeline_parallel_size=args.target_pipeline_parallel_size,
                transformer_impl=args.transformer_impl,
                dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            )
            print(
                f"wrote {meta.format} checkpoint to {args.out} "
                f"(TP={meta.tensor_parallel_size}, PP={meta.pipeline_parallel_size}, "
                f"{meta.dtype}, padded vocab {meta.padded_vocab_size})"
            )
        else:
            mcore_to_hf(
                args.mcore_dir,
                args.out,
                hf_template=args.hf_template,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
            )
            print(f"wrote HF checkpoint to {args.out}")
    except (
        CheckpointError,
        ArchitectureError,
        FileExistsError,
        FileNotFoundError,
        ValueError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
