"""torchrun worker: several training runs in one launch (each launch costs seconds of import).

argv[1]: JSON list of {"entry": "sft" | "grpo" | "dpo", "argv": [...flags]}.
"""

import json
import sys

from megatron.core import parallel_state

from megatron_kaja.parallel.distributed import destroy_model_parallel
from megatron_kaja.preference.trainer import DPOConfig, train_dpo
from megatron_kaja.rl.run_config import GRPORunConfig
from megatron_kaja.rl.trainer import train_grpo
from megatron_kaja.training.config import SFTConfig, load_config
from megatron_kaja.training.sft import train

ENTRIES = {
    "sft": (train, SFTConfig),
    "grpo": (train_grpo, GRPORunConfig),
    "dpo": (train_dpo, DPOConfig),
}


def main(runs_json: str) -> None:
    for run in json.loads(runs_json):
        entry, model = ENTRIES[run["entry"]]
        entry(load_config(run["argv"], model))
        parallel_state.destroy_model_parallel()
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
