"""Our HF -> megatron-core mapping equals mbridge's, an independent implementation, tensor
for tensor (names, QKV grouping by KV head, fc1 = gate|up) on a tiny GQA Llama.

mbridge maps transformer-engine names of one TP rank; at TP=1 that is our global tensor.
It builds its models on CUDA, so its per-tensor mapping is called directly.
"""

from __future__ import annotations

import pytest
import torch

from megatron_kaja.checkpoint.convert import hf_to_mcore, open_mcore_checkpoint
from megatron_kaja.checkpoint.hf import HFCheckpointReader
from megatron_kaja.models.llama.state_dict import (
    GLOBAL_MAPPINGS,
    LAYER_MAPPINGS,
    hf_keys,
    layer_key,
)

mbridge = pytest.importorskip("mbridge")


def test_hf_to_mcore_equals_mbridge(tiny_hf_gqa_dir, tmp_path, megatron_world):
    hf_to_mcore(tiny_hf_gqa_dir, tmp_path / "mc", progress=False)
    ours = open_mcore_checkpoint(tmp_path / "mc")
    hf = HFCheckpointReader(tiny_hf_gqa_dir)
    bridge = mbridge.AutoBridge.from_pretrained(str(tiny_hf_gqa_dir), dtype=torch.float32)

    def theirs(name: str, expected_hf_names: tuple[str, ...]) -> torch.Tensor:
        names = bridge._weight_name_mapping_mcore_to_hf(name)
        assert tuple(names) == expected_hf_names, name
        return bridge._weight_to_mcore_format(name, [hf.get(k) for k in names])

    vocab = ours.arch.vocab_size
    for mapping in GLOBAL_MAPPINGS:
        tensor = theirs(mapping.te, hf_keys(mapping))
        assert torch.equal(ours.load_global(mapping)[:vocab], tensor[:vocab]), mapping.te
    assert ours.arch.num_query_groups < ours.arch.num_attention_heads  # GQA grouping checked
    for layer in range(ours.arch.num_layers):
        loaded = ours.load_layer(layer)
        for mapping in LAYER_MAPPINGS:
            name = layer_key(mapping, layer, "transformer_engine")
            assert torch.equal(loaded[mapping], theirs(name, hf_keys(mapping, layer))), name
