"""`--optimizer adamw_8bit / paged_adamw_8bit`: bitsandbytes' 8-bit AdamW behind the part of
megatron's optimizer interface that the trainers, the lr schedule and checkpointing use.

The seed's GRPO ran HF Trainer with `optim="paged_adamw_8bit"`. Its two Adam moments are
block-wise quantized to 8 bits (Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization": uint8 codes on a dynamic map with one fp32 absmax per 256 values), i.e. about
2 B/param instead of megatron's 12 (fp32 master + two fp32 moments); the paged variant keeps
them in CUDA unified memory, which the driver pages to the host under memory pressure.

Megatron DDP stays in place: it reduces the gradients over data-parallel ranks into fp32
`main_grad` buffers. The step clips those in fp32 with megatron's model-parallel gradient
norm, hands them to bitsandbytes as `param.grad` in the parameter's dtype, and
bitsandbytes updates the parameters in place in their own dtype (bf16 under `--bf16`, as the
seed's HF Trainer did: there is no fp32 master copy). Every data-parallel rank then holds
the same, unsharded state, so `--use-distributed-optimizer` does not apply.
"""

from __future__ import annotations

import math

import torch

from megatron_kaja.extras import require

# --optimizer value -> bitsandbytes class. Both keep the same per-parameter state (step,
# state1/state2, qmap1/qmap2, absmax1/absmax2; fp32 moments for tensors under 4096 values).
BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The trainable parameters in two groups, as megatron-core builds them by default: no
    weight decay for biases and 1-D parameters (the RMSNorm weights), decay for the rest.
    `OptimizerParamScheduler` sets each group's `weight_decay` to its value x `wd_mult`."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    groups = [
        {"params": decay, "wd_mult": 1.0, "weight_decay": weight_decay},
        {"params": no_decay, "wd_mult": 0.0, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


class Bnb8bitOptimizer:
    """A bitsandbytes 8-bit AdamW over a megatron-DDP-wrapped model (module docstring).

    `tp_group` decides which replicated parameters (norm weights) count once in the gradient
    norm; `grad_stats_group` (the model-parallel group, TP x PP) sums the norm over the
    ranks that hold different parameters, as megatron's non-distributed optimizer does.
    """

    def __init__(
        self,
        kind: str,
        model: torch.nn.Module,
        *,
        lr: float,
        weight_decay: float,
        betas: tuple[float, float],
        eps: float,
        clip_grad: float,
        tp_group,
        grad_stats_group,
    ):
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
        from megatron.core.transformer.module import param_is_not_shared

        bnb = require("bitsandbytes", f"--optimizer {kind}")
        self.optimizer = getattr(bnb.optim, BNB_OPTIMIZERS[kind])(
            weight_decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps
        )
        self.clip_grad = clip_grad
        self.grad_stats_group = grad_stats_group
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.norm_params = [
            p
            for p in self.params
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p, tp_group)
        ]

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Drop the `param.grad`s handed to bitsandbytes; megatron DDP zeroes the `main_grad`
        buffers (`ddp.zero_grad_buffer()`)."""
        for param in self.params:
            param.grad = None

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """megatron's `grad_scale_func`: bf16 and fp32 train without loss scaling."""
        return loss

    @torch.no_grad()
    def step(self) -> tuple[bool, float, None]:
        """Clip, update; returns (updated, gradient norm before clipping, None) like megatron's
        optimizer (which also returns None for the zero count unless asked to count them).

        A non-finite norm skips the update: one NaN in a block would poison its absmax, and
        with it the 8-bit codes of all 256 values, for the rest of the run.
        """
        from megatron.core.optimizer.clip_grads import get_grad_norm_fp32

        grad_norm = get_grad_norm_fp32(
            [p.main_grad for p in self.norm_params], grad_stats_parallel_group=self.grad_stats_group
        )
        if not math.isfinite(grad_norm):
            return False, grad_norm, None
        # The scaling of megatron's clip_grad_by_total_norm_fp32 (and torch's clip_grad_norm_):
        # by clip / (norm + 1e-6) when below 1. Done here on the fp32 main grads because that
        # helper scales `param.grad`, which under --bf16 is the bf16 copy made below.
        if self.clip_grad > 0:
            clip_coeff = self.clip_grad / (grad_norm + 1.0e-6)
            if clip_coeff < 1.0:
                for param in self.params:
                    param.main_grad.mul_(clip_coeff)
        for param in self.params:
            param.grad = param.main_grad.to(param.dtype)  # the buffer itself when fp32
        self.optimizer.step()
        self.zero_grad()  # free the bf16 copies before the next forward
        return True, grad_norm, None

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by the same kind at the same TP x PP rank.

        bitsandbytes' loader moves the moments onto the parameter's device as ordinary
        tensors; the paged optimizer gets its paged buffers back (on CUDA, for tensors of 1e5
        values or more), so a resumed run pages its states like a fresh one.
        """
        self.optimizer.load_state_dict(state_dict)
        if not self.optimizer.is_paged:
            return
        for param, state in self.optimizer.state.items():
            for key in ("state1", "state2"):
                if key in state:
                    buffer = self.optimizer.get_state_buffer(param, dtype=state[key].dtype)
                    state[key] = buffer.copy_(state[key])
