#!/usr/bin/env python
"""CPU demo: a tiny llm-jp-3-shaped model, HF -> Megatron (TP=2) -> HF, with logits compared.

    python examples/tiny/run_demo.py [--out runs/demo]

1. builds a tiny tokenizer (llm-jp special tokens and chat template) and a tiny
   `LlamaForCausalLM` with llm-jp-3's architecture choices;
2. converts it to a megatron-core torch_dist checkpoint (vocab padded for TP=2);
3. loads that checkpoint into megatron-core's GPTModel at TP=2 under torchrun (2 CPU
   processes, gloo) and compares the logits with transformers';
4. converts back to HF and checks that every tensor and the logits are identical.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_kaja.checkpoint.hf import HFCheckpointReader
from megatron_kaja.tiny import build_tiny_hf_model, build_tiny_tokenizer


def step(n: int, text: str) -> None:
    print(f"\n[{n}/4] {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo", help="where to write (replaced)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    hf_dir, mc_dir, back_dir = out / "hf", out / "mcore_tp2", out / "hf_roundtrip"

    step(1, "building a tiny llm-jp-3-shaped tokenizer and model")
    build_tiny_tokenizer(out / "tokenizer")
    build_tiny_hf_model(hf_dir, "gqa", tokenizer_dir=out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    print(f"  {hf_dir}: LlamaForCausalLM, 4 layers, GQA 4/2 heads, vocab {len(tok)}")

    step(2, "HF -> megatron-core torch_dist (padded for TP=2)")
    meta = hf_to_mcore(hf_dir, mc_dir, tensor_parallel_size=2)
    print(f"  {mc_dir}: vocab {meta.arch['vocab_size']} padded to {meta.padded_vocab_size}")

    step(3, "megatron-core GPTModel at TP=2 (torchrun, 2 CPU processes) vs transformers")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "megatron_kaja.checkpoint.verify", "--hf", str(hf_dir), "--mcore", str(mc_dir),
           "--tp", "2"]  # fmt: skip
    run = subprocess.run(
        cmd, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", **_env()}
    )
    if run.returncode != 0:
        print(run.stdout, run.stderr[-4000:], file=sys.stderr)
        return 1
    print("  " + run.stdout.strip().splitlines()[-1])

    step(4, "megatron-core -> HF, compared with the original")
    mcore_to_hf(mc_dir, back_dir, hf_template=hf_dir)
    original, roundtrip = HFCheckpointReader(hf_dir), HFCheckpointReader(back_dir)
    equal = all(torch.equal(original.get(k), roundtrip.get(k)) for k in sorted(original.keys()))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "日本の首都はどこですか。"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(hf_dir)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(back_dir)(ids).logits
    print(f"  every tensor bitwise equal: {equal}")
    diff = (a - b).abs().max().item()
    print(f"  max |logit diff| original vs round trip on a chat prompt: {diff:.1e}")
    print(f"\ndone: checkpoints under {out}")
    return 0 if equal and torch.equal(a, b) else 1


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}


if __name__ == "__main__":
    sys.exit(main())
