"""The packed dataset: rows reproduce the unpacked samples; cache; mixing; over-long samples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import megatron_kaja.data.cache as cache_module
from megatron_kaja.data import (
    ChatRenderer,
    DataSource,
    SFTDataConfig,
    build_attention_mask,
    build_sft_dataset,
    collate_packed_rows,
    load_conversations,
    mix_samples,
    mixture_counts,
)
from tests.data.conftest import chat_records, qa_records, write_jsonl


@pytest.fixture()
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "safety.jsonl", qa_records(40))
    b = write_jsonl(tmp_path / "chat.jsonl", chat_records(20))
    # Weights are shares of the mix: 2:1 matches the sizes, so each sample is used once.
    return [DataSource(path=str(a), weight=2.0), DataSource(path=str(b), weight=1.0)]


def unpacked_samples(sources, tokenizer):
    renderer = ChatRenderer(tokenizer)
    return [
        [renderer.tokenize(messages) for messages in load_conversations(source)]
        for source in sources
    ]


def test_packed_rows_equal_unpacked_samples(two_sources, llmjp_tokenizer, tmp_path):
    config = SFTDataConfig(sources=two_sources, seq_length=256, cache_dir=tmp_path / "cache")
    dataset = build_sft_dataset(config, llmjp_tokenizer)
    expected = unpacked_samples(two_sources, llmjp_tokenizer)
    seen = []
    for row in range(len(dataset)):
        item = dataset[row]
        cu = item["cu_seqlens"].tolist()
        assert cu[0] == 0 and cu[-1] == 256
        segments = list(itertools.pairwise(cu))
        samples = dataset.plan.row_samples(row).tolist()
        for packed, (start, end) in zip(samples, segments, strict=False):
            sample = expected[dataset.source_ids[packed]][dataset.sample_ids[packed]]
            ids, mask = sample.input_ids, sample.assistant_mask
            assert end - start == len(ids) - 1
            assert item["tokens"][start:end].tolist() == ids[:-1].tolist()
            assert item["labels"][start:end].tolist() == ids[1:].tolist()
            assert item["loss_mask"][start:end].tolist() == mask[1:].tolist()
            assert item["position_ids"][start:end].tolist() == list(range(end - start))
            seen.append((int(dataset.source_ids[packed]), int(dataset.sample_ids[packed])))
        if len(segments) > len(samples):  # trailing padding: its own segment, no loss
            start, end = segments[-1]
            assert (item["tokens"][start:] == llmjp_tokenizer.pad_token_id).all()
            assert item["loss_mask"][start:].sum() == 0
            assert item["position_ids"][start:].tolist() == list(range(end - start))
    assert sorted(seen) == sorted([(0, i) for i in range(40)] + [(1, i) for i in range(20)])
    stats = dataset.stats
    assert (stats.num_samples, stats.truncated, stats.dropped) == (60, 0, 0)
    assert stats.num_rows == len(dataset)
    assert stats.num_tokens == sum(len(s.input_ids) - 1 for src in expected for s in src)


def test_collate_and_attention_mask(two_sources, llmjp_tokenizer, tmp_path):
    config = SFTDataConfig(sources=two_sources, seq_length=192, cache_dir=tmp_path / "cache")
    dataset = build_sft_dataset(config, llmjp_tokenizer)
    rows = [dataset[0], dataset[1]]
    with pytest.raises(IndexError, match="out of range"):
        dataset[len(dataset)]
    batch = collate_packed_rows(rows)
    assert batch["tokens"].shape == (2, 192) and batch["tokens"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32
    expected_cu = rows[0]["cu_seqlens"].tolist() + [c + 192 for c in rows[1]["cu_seqlens"][1:]]
    assert batch["cu_seqlens"].tolist() == expected_cu
    assert batch["cu_seqlens"].dtype == torch.int32
    assert int(batch["max_seqlen"]) == max(np.diff(expected_cu))
    mask = build_attention_mask(batch["cu_seqlens"], 2, 192)
    assert mask.shape == (2, 1, 192, 192) and mask.dtype == torch.bool
    for r, row in enumerate(rows):
        segment = np.searchsorted(row["cu_seqlens"], np.arange(192), side="right")
        for i in (0, 5, 100, 191):
            allowed = [j for j in range(192) if j <= i and segment[j] == segment[i]]
            assert (~mask[r, 0, i]).nonzero().flatten().tolist() == allowed


def test_cache_is_reused(two_sources, llmjp_tokenizer, tmp_path, monkeypatch):
    config = SFTDataConfig(sources=two_sources, seq_length=128, cache_dir=tmp_path / "cache")
    first = build_sft_dataset(config, llmjp_tokenizer)
    assert len(list((tmp_path / "cache").iterdir())) == 2

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("tokenized again despite a cache hit")

    monkeypatch.setattr(cache_module, "tokenize_conversations", must_not_tokenize)
    monkeypatch.setattr(cache_module, "load_conversations", must_not_tokenize)
    second = build_sft_dataset(config.model_copy(update={"seq_length": 256}), llmjp_tokenizer)
    assert isinstance(second.stores[0].tokens, np.memmap)
    assert np.array_equal(first.stores[1].tokens, second.stores[1].tokens)
    # Editing a file changes its key: that one source is tokenized again.
    write_jsonl(tmp_path / "chat.jsonl", chat_records(21))
    with pytest.raises(AssertionError, match="tokenized again"):
        build_sft_dataset(config, llmjp_tokenizer)


def test_cache_key_depends_on_template(two_sources, llmjp_tokenizer, chatml_tokenizer, tmp_path):
    for tokenizer in (llmjp_tokenizer, chatml_tokenizer):
        config = SFTDataConfig(sources=two_sources, seq_length=128, cache_dir=tmp_path / "c")
        build_sft_dataset(config, tokenizer)
    assert len(list((tmp_path / "c").iterdir())) == 4


def test_parallel_tokenization_equals_serial(llmjp_tokenizer, tmp_path):
    conversations = load_conversations(
        DataSource(path=str(write_jsonl(tmp_path / "a.jsonl", qa_records(1100))))
    )
    renderer = ChatRenderer(llmjp_tokenizer)
    where = [f"a.jsonl:{i + 1}" for i in range(len(conversations))]
    serial = cache_module.tokenize_conversations(conversations, where, renderer, num_workers=1)
    parallel = cache_module.tokenize_conversations(conversations, where, renderer, num_workers=2)
    for field in ("tokens", "assistant_mask", "offsets"):
        assert np.array_equal(getattr(serial, field), getattr(parallel, field))


def test_bad_file_fails_before_any_tokenization(two_sources, llmjp_tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "質問です", "output": "答えです"}\n{"text": "質問"}\n')
    sources = [*two_sources, DataSource(path=str(bad))]
    config = SFTDataConfig(sources=sources, seq_length=128, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: field 'output' is missing"):
        build_sft_dataset(config, llmjp_tokenizer)
    assert not (tmp_path / "cache").exists()


def test_mixing_weights_and_determinism():
    assert mixture_counts([100, 50], [0.7, 0.3], 150).tolist() == [105, 45]
    assert mixture_counts([10, 10, 10], [1, 1, 1], 10).tolist() == [4, 3, 3]
    sources, samples = mix_samples([100, 50], [0.7, 0.3], seed=5)
    again = mix_samples([100, 50], [0.7, 0.3], seed=5)
    assert np.array_equal(samples, again[1]) and np.array_equal(sources, again[0])
    a = samples[sources == 0]
    assert len(a) == 105 and sorted(set(a.tolist())) == list(range(100))  # up-sampled
    b = samples[sources == 1]
    assert len(b) == 45 and len(set(b.tolist())) == 45  # down-sampled, no repeats
    other = mix_samples([100, 50], [0.7, 0.3], seed=6)[1]
    assert not np.array_equal(samples, other)


def test_overlong_samples_truncated_or_dropped(llmjp_tokenizer, tmp_path):
    long_answer = {"text": "日本の首都はどこですか。", "output": "日本の首都は東京です。" * 60}
    long_prompt = {"text": "日本の首都はどこですか。" * 60, "output": "東京です。"}
    path = write_jsonl(tmp_path / "a.jsonl", [*qa_records(6), long_answer, long_prompt])
    base = SFTDataConfig(
        sources=[DataSource(path=str(path))], seq_length=160, cache_dir=tmp_path / "cache"
    )
    truncated = build_sft_dataset(base, llmjp_tokenizer)
    # The long answer is cut (and kept); the long prompt loses its whole answer: dropped.
    assert (truncated.stats.truncated, truncated.stats.dropped) == (1, 1)
    assert truncated.stats.num_samples == 7
    dropped = build_sft_dataset(base.model_copy(update={"overlong": "drop"}), llmjp_tokenizer)
    assert (dropped.stats.truncated, dropped.stats.dropped) == (0, 2)
    for dataset in (truncated, dropped):
        for row in range(len(dataset)):
            item = dataset[row]
            assert item["tokens"].shape == (160,)
            assert np.diff(item["cu_seqlens"]).max() <= 160
