"""`--optimizer adamw_8bit / paged_adamw_8bit`: the bitsandbytes wrapper in one process
against bitsandbytes used directly and torch's clipping; weight-decay groups against
megatron-core's; resume checks; the missing-package error."""

import copy
import math
import sys

import pytest
import torch

from megatron_kaja.training.bnb_optimizer import Bnb8bitOptimizer, weight_decay_groups
from megatron_kaja.training.checkpointing import check_optimizer_resumable
from megatron_kaja.training.config import ConfigError

bnb = pytest.importorskip("bitsandbytes")  # in the test extra
pytestmark = pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")

LR, WD, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-8


def _module(dtype=torch.float32) -> torch.nn.Module:
    """A matrix large enough for 8-bit states (>= 4096 values), one under it (fp32 states),
    a bias and a norm weight."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Linear(96, 64),  # 6144-value weight: 8-bit states; 64-value bias
        torch.nn.LayerNorm(64, bias=False),
        torch.nn.Linear(64, 16, bias=False),  # 1024 values: fp32 states
    )
    return module.to(dtype)


def _grads(module, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(p.shape, generator=generator) for p in module.parameters()]


def _wrapper(module, kind="paged_adamw_8bit", clip_grad=0.0) -> Bnb8bitOptimizer:
    from megatron.core import parallel_state as ps

    return Bnb8bitOptimizer(
        kind,
        module,
        lr=LR,
        weight_decay=WD,
        betas=BETAS,
        eps=EPS,
        clip_grad=clip_grad,
        tp_group=ps.get_tensor_model_parallel_group(),
        grad_stats_group=ps.get_model_parallel_group(),
    )


def _set_main_grads(module, grads) -> None:
    """What megatron DDP leaves after the backward: fp32 `main_grad`s, `grad` None."""
    for param, grad in zip(module.parameters(), grads, strict=True):
        param.main_grad = grad.clone()


def test_weight_decay_groups_exclude_norms_and_biases():
    module = _module()
    decay, no_decay = weight_decay_groups(module, WD)
    names = {id(p): n for n, p in module.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "2.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == ["0.bias", "1.weight"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (WD, 0.0)
    assert (decay["wd_mult"], no_decay["wd_mult"]) == (1.0, 0.0)


def test_weight_decay_groups_equal_megatron_optimizers(megatron_world, tiny_hf_dir):
    """On the llm-jp-shaped GPTModel, our groups are the ones megatron-core's optimizer
    builds, and the lr schedule sets their weight decay as it does megatron's."""
    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.training.setup import build_training_stack

    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    settings = {"lr": LR, "min_lr": 0.0, "train_iters": 10, "weight_decay": WD}
    adam = build_training_stack(arch, **settings)
    eight_bit = build_training_stack(arch, **settings, optimizer="adamw_8bit")

    def no_decay_names(stack):
        names = {id(p): n for n, p in stack.model.named_parameters()}
        return sorted(
            names[id(p)]
            for group in stack.optimizer.param_groups
            if group["weight_decay"] == 0.0
            for p in group["params"]
        )

    expected = no_decay_names(adam)
    assert expected and all("norm" in name for name in expected), expected
    assert no_decay_names(eight_bit) == expected
    assert {g["weight_decay"] for g in eight_bit.optimizer.param_groups} == {0.0, WD}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["adamw_8bit", "paged_adamw_8bit"])
def test_steps_equal_bitsandbytes_used_directly(megatron_world, kind, dtype):
    """Three steps from fp32 main grads equal bitsandbytes' own optimizer fed the same
    gradients as `param.grad` in the parameters' dtype, bit for bit."""
    ours, theirs = _module(dtype), _module(dtype)
    wrapper = _wrapper(ours, kind)
    decay, no_decay = weight_decay_groups(theirs, WD)
    reference_class = getattr(bnb.optim, {"adamw_8bit": "AdamW8bit"}.get(kind, "PagedAdamW8bit"))
    reference = reference_class([decay, no_decay], lr=LR, betas=BETAS, eps=EPS)
    for seed in range(3):
        grads = _grads(ours, seed)
        _set_main_grads(ours, grads)
        success, grad_norm, _ = wrapper.step()
        assert success and grad_norm > 0
        for param, grad in zip(theirs.parameters(), grads, strict=True):
            param.grad = grad.to(dtype)
        reference.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert a.dtype == dtype and torch.equal(a, b), name
        assert a.grad is None  # the copies handed to bitsandbytes are released
    state = wrapper.optimizer.state[ours[0].weight]
    assert state["state1"].dtype == torch.uint8 and state["step"] == 3


def test_clipping_equals_torch_clip_grad_norm(megatron_world):
    """The norm and the clipped gradients (and so the update) are torch's clip_grad_norm_'s."""
    ours, theirs = _module(), _module()
    wrapper = _wrapper(ours, clip_grad=1.0)
    grads = _grads(ours, seed=7, scale=3.0)
    _set_main_grads(ours, grads)
    for param, grad in zip(theirs.parameters(), grads, strict=True):
        param.grad = grad.clone()
    total = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm=1.0)
    assert total > 10.0  # the clip is active
    decay, no_decay = weight_decay_groups(theirs, WD)
    bnb.optim.PagedAdamW8bit([decay, no_decay], lr=LR, betas=BETAS, eps=EPS).step()
    _, grad_norm, _ = wrapper.step()
    assert grad_norm == pytest.approx(total.item(), rel=1e-6)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.main_grad, b.grad, rtol=1e-6, atol=0)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_non_finite_gradient_skips_the_step(megatron_world):
    module = _module()
    before = copy.deepcopy(module.state_dict())
    wrapper = _wrapper(module)
    grads = _grads(module, seed=1)
    grads[0][3, 5] = float("nan")
    _set_main_grads(module, grads)
    success, grad_norm, _ = wrapper.step()
    assert not success and math.isnan(grad_norm)
    assert not wrapper.optimizer.state  # no state was created, let alone poisoned
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_state_dict_round_trip_continues_exactly(megatron_world, tmp_path):
    """Save after two steps, load into a fresh optimizer over a copy of the weights (as a
    resume does, through torch.save / weights_only load): the next steps are identical."""
    module = _module()
    wrapper = _wrapper(module)
    for seed in range(2):
        _set_main_grads(module, _grads(module, seed))
        wrapper.step()
    torch.save(wrapper.state_dict(), tmp_path / "state.pt")
    resumed_module = copy.deepcopy(module)
    resumed = _wrapper(resumed_module)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for seed in (2, 3):
        for m, w in ((module, wrapper), (resumed_module, resumed)):
            _set_main_grads(m, _grads(m, seed))
            w.step()
    for a, b in zip(module.parameters(), resumed_module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_resume_checks_name_both_optimizers_and_layouts(tmp_path):
    def record(kind, tp=1, pp=1):
        return {"kind": kind, "tensor_parallel": tp, "pipeline_parallel": pp}

    ckpt = tmp_path / "iter_0000004"
    check_optimizer_resumable(ckpt, record("paged_adamw_8bit", 2), record("adamw_8bit", 2))
    check_optimizer_resumable(ckpt, None, record("adam", 4))  # before --optimizer: adam
    check_optimizer_resumable(ckpt, record("adam", 2), record("adam", 1))  # megatron reshards
    with pytest.raises(ConfigError, match="--optimizer paged_adamw_8bit, which --optimizer adam"):
        check_optimizer_resumable(ckpt, record("paged_adamw_8bit"), record("adam"))
    with pytest.raises(ConfigError, match="--optimizer adam, which --optimizer adamw_8bit"):
        check_optimizer_resumable(ckpt, None, record("adamw_8bit"))
    with pytest.raises(ConfigError, match="saved at TP=2 PP=1, this run is TP=1 PP=2"):
        check_optimizer_resumable(ckpt, record("adamw_8bit", 2), record("adamw_8bit", 1, 2))


def test_missing_bitsandbytes_fails_before_any_compute(monkeypatch, tmp_path):
    """Both trainers name the flag and the extra before they start torch.distributed."""
    from megatron_kaja.extras import MissingExtraError
    from megatron_kaja.rl.run_config import GRPORunConfig
    from megatron_kaja.rl.trainer import train_grpo
    from megatron_kaja.training.config import load_config
    from megatron_kaja.training.sft import train

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    flags = ["--optimizer", "paged_adamw_8bit", "--tokenizer", str(tmp_path)]
    sft = load_config([*flags, "--train-data", "a.jsonl"])
    prompts = ["--load", str(tmp_path), "--prompts", "p.jsonl:safety", "--reward", "length_penalty"]
    grpo = load_config([*flags, *prompts], GRPORunConfig)
    message = r"--optimizer paged_adamw_8bit needs the package 'bitsandbytes'.*\[bnb\]"
    for entry, cfg in ((train, sft), (train_grpo, grpo)):
        with pytest.raises(MissingExtraError, match=message):
            entry(cfg)
