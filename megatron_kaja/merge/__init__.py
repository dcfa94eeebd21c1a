"""Model merging: methods registered by name, streaming tensor I/O, mergekit-like recipes.

Entry points: `load_merge_config` (YAML -> `MergeConfig`), `run_merge` (write the merged
checkpoint), `open_tensor_source` / `register_source_format` (input formats).
"""

from megatron_kaja.merge.config import MergeConfig, load_merge_config
from megatron_kaja.merge.methods import get_merge_method, merge_method_names
from megatron_kaja.merge.run import MergeInputError, plan_merge, run_merge
from megatron_kaja.merge.sources import (
    MEGATRON_SOURCE_FORMAT,
    HFSafetensorsSource,
    MegatronSource,
    TensorSource,
    open_tensor_source,
    register_source_format,
)

__all__ = [
    "MEGATRON_SOURCE_FORMAT",
    "HFSafetensorsSource",
    "MegatronSource",
    "MergeConfig",
    "MergeInputError",
    "TensorSource",
    "get_merge_method",
    "load_merge_config",
    "merge_method_names",
    "open_tensor_source",
    "plan_merge",
    "register_source_format",
    "run_merge",
]
