"""torchrun worker: several `pretrain_sft.py` runs in one launch (one launch costs seconds)."""

import json
import sys

from megatron.core import parallel_state

from megatron_kaja.parallel.distributed import destroy_model_parallel
from megatron_kaja.training.config import load_config
from megatron_kaja.training.sft import train


def main(runs_json: str) -> None:
    for argv in json.loads(runs_json):
        train(load_config(argv))
        parallel_state.destroy_model_parallel()
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
