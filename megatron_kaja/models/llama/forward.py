"""Forward passes of a (tensor- and pipeline-parallel) GPTModel for evaluation and tests."""

from __future__ import annotations

import torch


def causal_position_ids(tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    return torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)


@torch.no_grad()
def forward_logits(
    model,
    tokens: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor | None:
    """Full-vocabulary logits `[b, s, vocab]` of `tokens`, on the last pipeline stage.

    Runs megatron-core's forward-only pipeline schedule (so PP > 1 works), gathers the
    vocab-parallel logits across tensor-parallel ranks and drops Megatron's vocab padding
    when `vocab_size` is given. Other stages return None.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if position_ids is None:
        position_ids = causal_position_ids(tokens)
    b, s = tokens.shape

    def forward_step(data_iterator, stage):
        output = stage(tokens, position_ids, attention_mask)

        def collect(output_tensor):
            return output_tensor.new_zeros(()), {"logits": output_tensor}

        return output, collect

    was_training = model.training
    model.eval()
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter([None]),
            model=[model],
            num_microbatches=1,
            seq_length=s,
            micro_batch_size=b,
            forward_only=True,
        )
    finally:
        model.train(was_training)
    if not ps.is_pipeline_last_stage():
        return None
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(outputs[0]["logits"])
    return logits[..., :vocab_size] if vocab_size is not None else logits


def mask_vocab_padding(vocab_parallel_logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of Megatron's padded vocabulary rows (ids >= `vocab_size`) to -inf.

    The padding rows of a converted model are zeros, so their logits are 0, not -inf: left
    in, they add `exp(0)` terms to every softmax (the loss and sampling then differ from the
    HF model's). Works on this TP rank's vocabulary shard.
    """
    from megatron.core import parallel_state as ps

    shard = vocab_parallel_logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * shard
    if start + shard <= vocab_size:
        return vocab_parallel_logits
    keep = torch.arange(start, start + shard, device=vocab_parallel_logits.device) < vocab_size
    return vocab_parallel_logits.masked_fill(~keep, float("-inf"))


def token_losses(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, vocab_size: int):
    """Per-token cross entropy `[b, s]` over the real vocabulary, from vocab-parallel logits."""
    from megatron.core import tensor_parallel

    logits = mask_vocab_padding(vocab_parallel_logits.float(), vocab_size)
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)
