#!/usr/bin/env python
"""GRPO with an LLM-judge reward on megatron-core.

    torchrun --nproc-per-node 8 train_grpo.py --load runs/sft --tokenizer HF \\
        --prompts ac.jsonl:safety borderline.jsonl:helpful elyza.jsonl:helpful \\
        --reward judge --judge-backend openai --judge-base-url http://judge:8000/v1 \\
        --judge-model Llama-3-ELYZA-JP-8B-AWQ --save runs/grpo

Flags: `python train_grpo.py --help`; see docs/grpo.md.
"""

import sys

from megatron_kaja.rl.trainer import main

if __name__ == "__main__":
    sys.exit(main())
