"""SFT data: readers, chat-template rendering with loss masks, packing, cache, sampler.

The trainer's entry points are `SFTDataConfig` + `build_sft_dataset` (packed rows),
`PackedRowSampler` (which rows each data-parallel rank trains on, resumable),
`collate_packed_rows` and `build_attention_mask`.
"""

from megatron_kaja.data.batch import build_attention_mask, collate_packed_rows
from megatron_kaja.data.cache import TokenizedSamples, tokenize_sources
from megatron_kaja.data.chat import ChatRenderer, build_loss_mask, load_chat_template
from megatron_kaja.data.dataset import (
    PackedSFTDataset,
    PackingStats,
    SFTDataConfig,
    build_sft_dataset,
)
from megatron_kaja.data.mixing import mix_samples, mixture_counts
from megatron_kaja.data.packing import PackingPlan, fit_to_seq_length, pack_sequences
from megatron_kaja.data.readers import load_conversations, read_records
from megatron_kaja.data.records import DataFormatError, normalize_record
from megatron_kaja.data.sampler import PackedRowSampler
from megatron_kaja.data.sources import (
    DataSource,
    data_sources_from_config,
    load_data_sources_yaml,
    parse_weighted_paths,
)

__all__ = [
    "ChatRenderer",
    "DataFormatError",
    "DataSource",
    "PackedRowSampler",
    "PackedSFTDataset",
    "PackingPlan",
    "PackingStats",
    "SFTDataConfig",
    "TokenizedSamples",
    "build_attention_mask",
    "build_loss_mask",
    "build_sft_dataset",
    "collate_packed_rows",
    "data_sources_from_config",
    "fit_to_seq_length",
    "load_chat_template",
    "load_conversations",
    "load_data_sources_yaml",
    "mix_samples",
    "mixture_counts",
    "normalize_record",
    "pack_sequences",
    "parse_weighted_paths",
    "read_records",
    "tokenize_sources",
]
