"""torchrun worker for test_cpu_bridge: megatron-core features that need the CPU bridge."""

import os
import sys

import torch
import torch.distributed as dist

from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.model import build_gpt_model
from megatron_kaja.parallel.distributed import (
    compute_device,
    destroy_model_parallel,
    initialize_model_parallel,
)

ARCH = LlamaArch(
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=2,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=300,
    max_position_embeddings=64,
)


def grads_after_step(recompute, seed=11):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_gpt_model(
        ARCH,
        hidden_dropout=0.2,
        attention_dropout=0.2,
        recompute_granularity="full" if recompute else None,
    )
    tokens = torch.randint(0, ARCH.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    tokens = tokens.to(compute_device())
    positions = torch.arange(32, device=compute_device()).unsqueeze(0).expand(2, 32)
    loss = model(tokens, positions, None, labels=tokens).float().mean()
    loss.backward()
    return model, loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def main(tmp):
    initialize_model_parallel(tensor_parallel_size=2, seed=11)
    # Dropout masks drawn in the forward must be replayed exactly in the recomputed forward.
    _, loss_plain, grads_plain = grads_after_step(recompute=False)
    model, loss_re, grads_re = grads_after_step(recompute=True)
    assert abs(loss_plain - loss_re) < 1e-6, (loss_plain, loss_re)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_re[name], grad, rtol=1e-5, atol=1e-6, msg=name)

    # megatron's DDP wrapper (grad buffers) + megatron optimizer with grad clipping.
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build_gpt_model(ARCH)
    ddp = DistributedDataParallel(
        config=model.config,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True),
        module=model,
    )
    config = OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, bf16=False)
    optimizer = get_megatron_optimizer(config, [ddp])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tokens = torch.randint(0, ARCH.vocab_size, (2, 32), generator=torch.Generator().manual_seed(5))
    tokens = tokens.to(compute_device())
    positions = torch.arange(32, device=compute_device()).unsqueeze(0).expand(2, 32)
    optimizer.zero_grad()
    ddp(tokens, positions, None, labels=tokens).float().mean().backward()
    ddp.finish_grad_sync()
    success, grad_norm, _ = optimizer.step()
    assert success and grad_norm > 0
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())

    from megatron.core import dist_checkpointing

    ckpt = f"{tmp}/ckpt"
    if dist.get_rank() == 0:
        os.makedirs(ckpt)
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    fresh = build_gpt_model(ARCH)
    fresh.load_state_dict(dist_checkpointing.load(fresh.sharded_state_dict(), ckpt))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name
    dist.barrier()
    if dist.get_rank() == 0:
        print("bridge worker ok")
    destroy_model_parallel()


if __name__ == "__main__":
    main(sys.argv[1])
