#!/usr/bin/env python
"""Full-parameter SFT of llm-jp-3 on megatron-core.

    torchrun --nproc-per-node 8 pretrain_sft.py --config examples/llm-jp-3-13b/sft.yaml
    torchrun --nproc-per-node 2 pretrain_sft.py --load MC --tokenizer HF --train-data sft.jsonl \\
        --tensor-model-parallel-size 2 --seq-length 4096 --save runs/sft

Flags are Megatron-LM's names (`python pretrain_sft.py --help`); see docs/sft.md.
"""

import sys

from megatron_kaja.training.sft import main

if __name__ == "__main__":
    sys.exit(main())
