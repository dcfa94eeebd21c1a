"""File-to-file conversion: the byte plan equals the key map's own tensor transforms."""

import errno
import os

import pytest
import torch

from megatron_kaja.checkpoint.byte_copy import StoredTensor, copy_sources, row_sources
from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_kaja.checkpoint.hf import HFCheckpointReader
from megatron_kaja.checkpoint.torch_dist import TorchDistReader
from megatron_kaja.models.llama.config import padded_vocab_size
from megatron_kaja.models.llama.state_dict import EMBEDDING, LAYER_MAPPINGS, hf_keys
from tests.checkpoint.test_convert import assert_same_tensors


def _copied(path, sources, shape, dtype):
    """The tensor that `copy_sources` writes into a fresh file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        n = copy_sources(fd, 0, sources)
    finally:
        os.close(fd)
    data = bytearray(path.read_bytes())
    assert n == len(data)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


@pytest.mark.parametrize("mapping", [*LAYER_MAPPINGS, EMBEDDING], ids=lambda m: m.local)
def test_byte_plan_equals_the_key_map_both_ways(tiny_hf_gqa_dir, tmp_path, mapping):
    reader = HFCheckpointReader(tiny_hf_gqa_dir)
    arch = reader.arch
    assert arch.num_query_groups < arch.num_attention_heads  # QKV regrouping is exercised
    padded = padded_vocab_size(arch.vocab_size, 2, 128)
    layer = None if mapping is EMBEDDING else 1
    keys = hf_keys(mapping, layer)
    expected = mapping.global_from_hf(arch, [reader.get(k) for k in keys], padded)

    stored = [reader.stored(k) for k in keys]
    (plan,) = row_sources(lambda ts: mapping.global_from_hf(arch, ts, padded), stored)
    built = _copied(tmp_path / "global.bin", plan, expected.shape, expected.dtype)
    assert torch.equal(built, expected)

    # back: the global tensor as stored raw in a file -> the HF tensors
    (tmp_path / "raw.bin").write_bytes(expected.contiguous().view(-1).view(torch.uint8).numpy())
    raw = StoredTensor(tmp_path / "raw.bin", 0, tuple(expected.shape), expected.dtype)
    plans = row_sources(lambda ts: mapping.hf_from_global(arch, ts[0]), [raw])
    assert len(plans) == len(keys)
    for key, plan in zip(keys, plans, strict=True):
        want = reader.get(key)
        assert torch.equal(_copied(tmp_path / "hf.bin", plan, want.shape, want.dtype), want)


def test_byte_plan_refuses_a_transform_that_mixes_within_rows(tmp_path):
    source = StoredTensor(tmp_path / "x", 0, (4, 3), torch.float32)
    assert row_sources(lambda ts: ts[0].t().contiguous(), [source]) is None
    assert row_sources(lambda ts: ts[0].reshape(2, 2), [source]) is None
    mixed = [source, StoredTensor(tmp_path / "y", 0, (4, 3), torch.bfloat16)]
    assert row_sources(lambda ts: torch.cat(ts), mixed) is None


def test_runs_do_not_cross_from_one_source_file_into_the_next(tmp_path):
    a = StoredTensor(tmp_path / "a", 100, (2, 4), torch.float16)
    b = StoredTensor(tmp_path / "b", 0, (3, 4), torch.float16)
    (plan,) = row_sources(lambda ts: torch.cat([*ts, ts[0].new_zeros(1, 1)]), [a, b])
    assert [(s.path, s.offset, s.length) for s in plan] == [
        (tmp_path / "a", 100, 16),
        (tmp_path / "b", 0, 24),
        (None, 0, 8),
    ]


def test_copy_without_kernel_support(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.write_bytes(bytes(range(256)) * 4096)

    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    plan = [row_sources(lambda ts: ts[0], [StoredTensor(src, 3, (1000, 7), torch.uint8)])]
    copied = _copied(tmp_path / "dst", plan[0][0], (1000, 7), torch.uint8)
    assert copied.numpy().tobytes() == src.read_bytes()[3 : 3 + 7000]


def test_conversion_copies_files_without_building_tensors(tiny_hf_gqa_dir, tmp_path, monkeypatch):
    """Same dtype: neither direction reads a tensor into memory; a dtype change still
    converts (through tensors)."""

    def no_tensors(*args, **kwargs):
        raise AssertionError("a tensor was built where bytes could be copied")

    with monkeypatch.context() as patch:
        patch.setattr(HFCheckpointReader, "get", no_tensors)
        patch.setattr(TorchDistReader, "load_layer", no_tensors)
        patch.setattr(TorchDistReader, "load_global", no_tensors)
        hf_to_mcore(tiny_hf_gqa_dir, tmp_path / "mc", progress=False)
        mcore_to_hf(tmp_path / "mc", tmp_path / "hf", progress=False)
    assert_same_tensors(tiny_hf_gqa_dir, tmp_path / "hf")

    hf_to_mcore(tiny_hf_gqa_dir, tmp_path / "mc16", dtype="float16", progress=False)
    mcore_to_hf(tmp_path / "mc16", tmp_path / "hf32", dtype="float32", progress=False)
    reader, back = HFCheckpointReader(tiny_hf_gqa_dir), HFCheckpointReader(tmp_path / "hf32")
    for key in list(reader.keys()):
        assert torch.equal(back.get(key), reader.get(key).to(torch.float16).float()), key
