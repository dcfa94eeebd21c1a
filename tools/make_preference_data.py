#!/usr/bin/env python
"""Make DPO preference pairs on-policy: sample answers, judge them, keep (best, worst).

    python tools/make_preference_data.py --config examples/llm-jp-3-13b/make_preference_data.yaml
    python tools/make_preference_data.py \\
        --prompts ac.jsonl:safety elyza.jsonl:helpful --out pairs.jsonl \\
        --backend openai --base-url http://POLICY:8000/v1 --model sft \\
        --judge-backend openai --judge-base-url http://JUDGE:8001/v1 \\
        --judge-model Llama-3-ELYZA-JP-8B-AWQ --num-samples 8 --margin 1

Rerunning the same command after a stop (even `kill -9`) continues where it stopped.
Writes OUT (pairs in TRL's schema with both scores and the judge), OUT's
`.rejected.jsonl` (prompts dropped, with the reason) and `.summary.json` beside it.
Exit codes: 0 done, 1 nothing could be judged (servers failing) or a dry run found files
missing, 2 bad settings or input.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_kaja.preference.pairs import PairConfig, make_preference_pairs, plan_pairs
from megatron_kaja.training.loop import USER_ERRORS
from megatron_kaja.training.settings import load_config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(argv, PairConfig)
        if cfg.dry_run:
            return plan_pairs(cfg)
        summary = make_preference_pairs(cfg)
    except (*USER_ERRORS, RuntimeError) as exc:  # RuntimeError: OUT is locked by another run
        logging.getLogger("megatron_kaja.pairs").error("%s", exc)
        return 2
    print(json.dumps(summary, ensure_ascii=False, indent=2))
    failed = summary["not_done_retry_next_run"]
    return 1 if failed and summary["done"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
