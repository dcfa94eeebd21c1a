"""The packed SFT dataset: sources -> validated, tokenized (cached), mixed, packed rows.

Row layout (seq_length S). Each sample of n tokens fills n-1 positions: its tokens[:-1] as
inputs and tokens[1:] as labels, so no label ever crosses into the next sample, and its
EOS (the last label) is learned. `position_ids` restart at 0 per sample; `cu_seqlens` holds
the sample boundaries and always ends at S (trailing padding is one segment of its own,
with zero loss mask, so that the THD path covers every position).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from megatron_kaja.data.cache import TokenizedSamples, default_cache_dir, tokenize_sources
from megatron_kaja.data.chat import ChatRenderer, load_chat_template
from megatron_kaja.data.mixing import mix_samples
from megatron_kaja.data.packing import (
    OverlongPolicy,
    PackingPlan,
    fit_to_seq_length,
    pack_sequences,
)
from megatron_kaja.data.sources import DataSource


class SFTDataConfig(BaseModel):
    """Everything that decides the packed rows. Validated before any file is read."""

    model_config = ConfigDict(extra="forbid")

    sources: list[DataSource] = Field(min_length=1)
    seq_length: int = Field(gt=1)
    overlong: OverlongPolicy = "truncate"
    chat_template: Path | None = None  # a jinja file overriding the tokenizer's template
    cache_dir: Path = Field(default_factory=default_cache_dir)
    num_workers: int = Field(default=1, ge=1)  # tokenization processes
    seed: int = 1234  # mixing seed
    num_samples: int | None = Field(default=None, gt=0)  # mixed-set size; default: all
    pad_token_id: int | None = None  # default: the tokenizer's pad id, else its EOS id


@dataclass(frozen=True)
class PackingStats:
    """What packing did, for the log: utilization = 1 - padding fraction."""

    num_samples: int
    num_rows: int
    num_tokens: int
    utilization: float
    truncated: int
    dropped: int


class PackedSFTDataset:
    """Map-style dataset of packed rows (`len`, `[row]` -> dict of numpy arrays)."""

    def __init__(
        self,
        stores: list[TokenizedSamples],
        source_ids: np.ndarray,
        sample_ids: np.ndarray,
        positions: np.ndarray,
        plan: PackingPlan,
        pad_token_id: int,
        stats: PackingStats,
    ):
        self.stores = stores
        self.source_ids = source_ids  # per packed sample: which store
        self.sample_ids = sample_ids  # per packed sample: index in that store
        self.positions = positions  # per packed sample: row positions it fills (n-1, capped)
        self.plan = plan
        self.seq_length = plan.seq_length
        self.pad_token_id = pad_token_id
        self.stats = stats

    def __len__(self) -> int:
        return self.plan.num_rows

    def __getitem__(self, row: int) -> dict[str, np.ndarray]:
        """One packed row: tokens, labels (int64), loss_mask (float32), position_ids
        (int64), all [S]; cu_seqlens (int32 [segments + 1], 0 ... S)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} packed rows")
        s = self.seq_length
        tokens = np.full(s, self.pad_token_id, dtype=np.int64)
        labels = np.full(s, self.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        cu_seqlens = [0]
        at = 0
        for packed in self.plan.row_samples(row).tolist():
            store = self.stores[self.source_ids[packed]]
            start = int(store.offsets[self.sample_ids[packed]])
            n = int(self.positions[packed])
            ids = store.tokens[start : start + n + 1]
            tokens[at : at + n] = ids[:-1]
            labels[at : at + n] = ids[1:]
            loss_mask[at : at + n] = store.assistant_mask[start + 1 : start + n + 1]
            position_ids[at : at + n] = np.arange(n)
            at += n
            cu_seqlens.append(at)
        if at < s:
            position_ids[at:] = np.arange(s - at)
            cu_seqlens.append(s)
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": position_ids,
            "cu_seqlens": np.asarray(cu_seqlens, dtype=np.int32),
        }


def build_sft_dataset(config: SFTDataConfig, tokenizer) -> PackedSFTDataset:
    """Read, validate, tokenize (cached), mix and pack `config.sources` with `tokenizer`."""
    template = load_chat_template(config.chat_template) if config.chat_template else None
    renderer = ChatRenderer(tokenizer, template)
    stores = tokenize_sources(config.sources, renderer, config.cache_dir, config.num_workers)
    source_ids, sample_ids = mix_samples(
        [len(store) for store in stores],
        [source.weight for source in config.sources],
        config.seed,
        config.num_samples,
    )
    first_sample = np.cumsum([0] + [len(store) for store in stores])
    all_lengths = np.concatenate([store.lengths for store in stores])
    positions = all_lengths[first_sample[source_ids] + sample_ids] - 1
    fitted = fit_to_seq_length(positions, config.seq_length, config.overlong)
    kept = fitted.kept[_keeps_a_loss_token(stores, source_ids, sample_ids, fitted)]
    truncated = int((positions[kept] > config.seq_length).sum())
    dropped = len(positions) - len(kept)
    positions = np.minimum(positions[kept], config.seq_length)
    source_ids, sample_ids = source_ids[kept], sample_ids[kept]
    plan = pack_sequences(positions, config.seq_length)
    pad = config.pad_token_id
    if pad is None:
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
    stats = PackingStats(
        num_samples=len(kept),
        num_rows=plan.num_rows,
        num_tokens=int(positions.sum()),
        utilization=plan.utilization(positions),
        truncated=truncated,
        dropped=dropped,
    )
    return PackedSFTDataset(stores, source_ids, sample_ids, positions, plan, pad, stats)


def _keeps_a_loss_token(stores, source_ids, sample_ids, fitted) -> np.ndarray:
    """For each sample in `fitted.kept`: does a learned token survive truncation? Only a
    truncated sample can lose all of them (a long prompt cut before the answer)."""
    keep = np.ones(len(fitted.kept), dtype=bool)
    for i in np.flatnonzero(fitted.lengths < fitted.original_lengths).tolist():
        packed = fitted.kept[i]
        store = stores[source_ids[packed]]
        start = int(store.offsets[sample_ids[packed]])
        keep[i] = store.assistant_mask[start + 1 : start + fitted.lengths[i] + 1].any()
    return keep
