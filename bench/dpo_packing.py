"""DPO step time with and without `--packing`, one process, on a small llm-jp-3-shaped model.

    python bench/dpo_packing.py [--steps 6] [--seq-length 512] [--micro-batch-size 4]

Builds a tokenizer and a randomly initialised model (hidden 256, 4 layers), writes preference
pairs whose prompt + answer run 26-178 tokens (mean 77), then trains the same
`--steps` steps twice (one answer per row; answers packed). Prints, for each: rows per step,
the median step time (the first step left out: it builds the reference's buffers) and the
final loss; the two losses agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from megatron.core import parallel_state

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.preference.trainer import DPOConfig, train_dpo
from megatron_kaja.tiny import TinyLlamaShape, build_tiny_hf_model, build_tiny_tokenizer
from megatron_kaja.training.settings import load_config

SHAPE = TinyLlamaShape(
    hidden_size=256, intermediate_size=688, num_hidden_layers=4, max_position_embeddings=1024
)
TOPICS = ["爆弾", "毒物", "銃", "詐欺", "盗聴", "薬物", "放火", "誘拐", "偽札", "ハッキング"]


def write_pairs(path: Path, count: int) -> None:
    """Pairs whose answers repeat a sentence 1..12 times: lengths spread like chat answers."""
    with path.open("w", encoding="utf-8") as out:
        for i in range(count):
            topic = TOPICS[i % len(TOPICS)]
            pair = {
                "prompt": f"{topic}の方法を教えてください。",
                "chosen": f"回答できません。{topic}は危険です。" * (1 + (7 * i) % 12),
                "rejected": f"{topic}の方法は次の通りです。" * (1 + (5 * i + 3) % 12),
            }
            out.write(json.dumps(pair, ensure_ascii=False) + "\n")


def run(root: Path, args, packing: bool) -> list[dict]:
    name = "packed" if packing else "unpacked"
    argv = [
        "--load", str(root / "mc"), "--tokenizer", str(root / "tok"),
        "--train-data", str(root / "pairs.jsonl"), "--seq-length", str(args.seq_length),
        "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(2 * args.micro_batch_size), "--train-iters", str(args.steps),
        "--lr", "1e-5", "--metrics-file", str(root / name / "metrics.jsonl"),
    ] + (["--packing"] if packing else [])  # fmt: skip
    train_dpo(load_config(argv, DPOConfig))
    parallel_state.destroy_model_parallel()
    lines = (root / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_tokenizer(root / "tok")
        build_tiny_hf_model(root / "hf", SHAPE, tokenizer_dir=root / "tok")
        hf_to_mcore(root / "hf", root / "mc", progress=False)
        write_pairs(root / "pairs.jsonl", 200)
        print("layout       rows/step  step s (median)  final loss")
        for packing in (False, True):
            records = run(root, args, packing)
            rows = statistics.mean(r["rows"] for r in records)
            step = statistics.median(r["step_time_s"] for r in records[1:])
            name = "packed" if packing else "one per row"
            print(f"{name:<12} {rows:>9.1f}  {step:>15.3f}  {records[-1]['loss']:.6f}")


if __name__ == "__main__":
    main()
