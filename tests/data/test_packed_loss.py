"""Packed == unpacked: the loss `transformers` computes on a packed row with our per-sample
attention mask equals the sum of the per-sample losses of the samples inside it."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from megatron_kaja.data import (
    ChatRenderer,
    DataSource,
    SFTDataConfig,
    build_attention_mask,
    build_sft_dataset,
    collate_packed_rows,
)
from tests.data.conftest import chat_records, qa_records, write_jsonl


def summed_token_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
    losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return (losses * mask).sum()


def test_packed_row_loss_equals_sum_of_sample_losses(tiny_hf_dir, llmjp_tokenizer, tmp_path):
    model = LlamaForCausalLM.from_pretrained(tiny_hf_dir, attn_implementation="eager").eval()
    path = write_jsonl(tmp_path / "a.jsonl", qa_records(6) + chat_records(4))
    config = SFTDataConfig(
        sources=[DataSource(path=str(path))], seq_length=256, cache_dir=tmp_path / "cache"
    )
    dataset = build_sft_dataset(config, llmjp_tokenizer)
    renderer = ChatRenderer(llmjp_tokenizer)
    rows = sorted(range(len(dataset)), key=lambda r: -len(dataset.plan.row_samples(r)))[:2]
    assert len(dataset.plan.row_samples(rows[0])) >= 2  # a row that really packs samples
    batch = collate_packed_rows([dataset[r] for r in rows])
    masked_out = build_attention_mask(batch["cu_seqlens"], len(rows), 256)
    with torch.no_grad():
        # HF takes a custom 4D mask as an additive float mask (0 = attend, min = blocked).
        additive = torch.zeros(masked_out.shape).masked_fill(masked_out, torch.finfo().min)
        logits = model(
            input_ids=batch["tokens"],
            attention_mask=additive,
            position_ids=batch["position_ids"],
        ).logits
        # Attention across a sample boundary would change these numbers: packing without
        # the mask must not match.
        leaky = model(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    conversations = [
        [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": r["output"]}]
        for r in qa_records(6)
    ] + [r["messages"] for r in chat_records(4)]
    for b, row in enumerate(rows):
        packed = summed_token_loss(logits[b], batch["labels"][b], batch["loss_mask"][b])
        unpacked = torch.zeros(())
        for sample in dataset.plan.row_samples(row).tolist():
            tokenized = renderer.tokenize(conversations[dataset.sample_ids[sample]])
            ids = torch.from_numpy(tokenized.input_ids).long()
            with torch.no_grad():
                alone = model(input_ids=ids[None, :-1]).logits[0]
            mask = torch.from_numpy(tokenized.assistant_mask[1:]).float()
            unpacked += summed_token_loss(alone, ids[1:], mask)
        torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-4)
        leaked = summed_token_loss(leaky[b], batch["labels"][b], batch["loss_mask"][b])
        assert not torch.allclose(leaked, unpacked, rtol=1e-4)
