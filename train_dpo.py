#!/usr/bin/env python
"""DPO (or IPO) of llm-jp-3 on megatron-core, from preference pairs and a frozen reference.

    torchrun --nproc-per-node 8 train_dpo.py --config examples/llm-jp-3-13b/dpo.yaml
    torchrun --nproc-per-node 2 train_dpo.py --load runs/sft --tokenizer HF \\
        --train-data pairs.jsonl --beta 0.1 --loss-type sigmoid --save runs/dpo

Flags: `python train_dpo.py --help`; see docs/dpo.md.
"""

import sys

from megatron_kaja.preference.trainer import main

if __name__ == "__main__":
    sys.exit(main())
