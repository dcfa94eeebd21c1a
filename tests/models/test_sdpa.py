"""The SDPA spec equals megatron-core's local spec: state-dict keys, logits and gradients on
packed rows (MHA and GQA), and at TP=2; its attention stays inside each packed sample."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.helpers import REPO, run_torchrun

ROWS, SEQ = 2, 24
# Two rows of 24 tokens: samples of 5, 8, 11 | 7, 13 and 4 tokens of padding (its own segment,
# as the packer emits it).
CU_SEQLENS = (0, 5, 13, 24, 31, 44, 48)


def packed_batch(vocab_size: int):
    """(tokens, position_ids, cu_seqlens) of two packed rows, the same on every process, on
    the compute device (as the SFT loop feeds them)."""
    from megatron_kaja.parallel.distributed import compute_device

    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab_size, (ROWS, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(ROWS, SEQ)
    cu_seqlens = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    return tuple(t.to(compute_device()) for t in (tokens, positions, cu_seqlens))


def loss_of_logits(logits: torch.Tensor) -> torch.Tensor:
    """A loss that weighs every logit differently, so every gradient entry is exercised."""
    generator = torch.Generator().manual_seed(11)
    weights = torch.randn(logits.shape, generator=generator).to(logits.device)
    return (logits * weights).sum() / logits.numel()


def _arch(kind: str):
    from megatron_kaja.models.llama.config import LlamaArch

    groups = {"mha": 4, "gqa": 2}[kind]
    return LlamaArch(
        hidden_size=64,
        ffn_hidden_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=groups,
        vocab_size=100,
    )


def _pair(arch, **config):
    """A local-spec model and an SDPA-spec model with the same weights."""
    from megatron_kaja.models.llama.model import build_gpt_model

    torch.manual_seed(0)
    local = build_gpt_model(arch, transformer_impl="local", **config)
    sdpa = build_gpt_model(arch, transformer_impl="sdpa", **config)
    sdpa.load_state_dict(local.state_dict(), strict=True)
    return local, sdpa


def _forward_backward(model, attention_mask=None, packed=None):
    tokens, positions, _ = packed_batch(model.vocab_size)
    model.zero_grad(set_to_none=True)
    logits = model(tokens, positions, attention_mask, packed_seq_params=packed)
    loss_of_logits(logits).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return logits.detach(), grads


def test_spec_is_the_local_spec_with_sdpa_core_attention():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_kaja.models.llama.model import layer_spec
    from megatron_kaja.models.llama.norm import RMSNorm, with_rmsnorm
    from megatron_kaja.models.llama.sdpa import SDPAttention

    local, sdpa = layer_spec("local"), layer_spec("sdpa")
    assert sdpa.submodules.self_attention.submodules.core_attention is SDPAttention
    swapped_back = dataclasses.replace(
        sdpa.submodules.self_attention.submodules,
        core_attention=local.submodules.self_attention.submodules.core_attention,
    )
    assert swapped_back == local.submodules.self_attention.submodules
    assert dataclasses.replace(sdpa.submodules, self_attention=None) == dataclasses.replace(
        local.submodules, self_attention=None
    )
    # megatron-core's local spec with our sequence-parallel-capable RMSNorm; its own spec is
    # left as it was
    megatron_local = get_gpt_layer_local_spec(normalization="RMSNorm")
    assert local == with_rmsnorm(megatron_local)
    assert megatron_local.submodules.input_layernorm is not RMSNorm


@pytest.mark.parametrize(
    ("cuda", "has_te", "expected"),
    [
        (False, False, "local"),
        (False, True, "local"),
        (True, False, "sdpa"),
        (True, True, "transformer_engine"),
    ],
)
def test_default_transformer_impl(monkeypatch, cuda, has_te, expected):
    from megatron_kaja.models.llama import model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(model, "is_available", lambda name: has_te and name == "transformer_engine")
    assert model.default_transformer_impl() == expected


def test_state_dict_keys_and_shapes_equal_local(megatron_world):
    local, sdpa = _pair(_arch("gqa"))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items() if v is not None}  # noqa: E731
    assert shapes(sdpa) == shapes(local)
    assert sdpa.sharded_state_dict().keys() == local.sharded_state_dict().keys()


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_packed_rows_logits_and_grads_equal_local(megatron_world, kind):
    from megatron_kaja.data import build_attention_mask
    from megatron_kaja.models.llama.sdpa import packed_seq_params

    local, sdpa = _pair(_arch(kind))
    _, _, cu_seqlens = packed_batch(local.vocab_size)
    mask = build_attention_mask(cu_seqlens, ROWS, SEQ)
    ref_logits, ref_grads = _forward_backward(local, attention_mask=mask)
    assert ref_logits.abs().max() > 0.1  # compared numbers are not all near zero
    for inputs in (
        {"packed": packed_seq_params(cu_seqlens, SEQ)},  # what SFT passes
        {"attention_mask": mask},  # megatron's bool mask, inverted for SDPA
    ):
        logits, grads = _forward_backward(sdpa, **inputs)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name, grad in grads.items():
            assert grad.abs().max() > 0, name
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_no_mask_is_causal_attention(megatron_world):
    from megatron.core.transformer.utils import get_default_causal_mask

    local, sdpa = _pair(_arch("gqa"))
    causal = get_default_causal_mask(SEQ).view(1, 1, SEQ, SEQ)
    ref_logits, _ = _forward_backward(local, attention_mask=causal)
    logits, _ = _forward_backward(sdpa)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)


def test_left_padded_rows_stay_finite_and_equal_local(megatron_world):
    """The sampler's mask hides left padding: padding queries attend nothing at all."""
    from megatron_kaja.rl.sampler import causal_padding_mask

    local, sdpa = _pair(_arch("gqa"))
    valid = torch.ones(ROWS, SEQ, dtype=torch.bool, device=packed_batch(100)[0].device)
    valid[0, :6] = False  # row 0: a prompt left-padded by 6
    mask = causal_padding_mask(valid)
    ref_logits, _ = _forward_backward(local, attention_mask=mask)
    logits, grads = _forward_backward(sdpa, attention_mask=mask)
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[valid], ref_logits[valid], rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name


def test_no_attention_across_packed_samples(megatron_world):
    """Changing one sample's tokens changes no other sample's logits."""
    from megatron_kaja.models.llama.sdpa import packed_seq_params

    _, sdpa = _pair(_arch("gqa"))
    tokens, positions, cu_seqlens = packed_batch(sdpa.vocab_size)
    packed = packed_seq_params(cu_seqlens, SEQ)
    changed = tokens.clone()
    changed[0, 5:13] = (changed[0, 5:13] + 1) % sdpa.vocab_size  # the second sample of row 0
    with torch.no_grad():
        before = sdpa(tokens, positions, None, packed_seq_params=packed)
        after = sdpa(changed, positions, None, packed_seq_params=packed)
    differs = (before - after).abs().amax(dim=-1) > 0  # [b, s]
    expected = torch.zeros(ROWS, SEQ, dtype=torch.bool)
    expected[0, 5:13] = True
    assert torch.equal(differs.cpu(), expected)


def test_dropout_uses_the_tensor_parallel_rng_stream_and_replays_under_recompute(megatron_world):
    from megatron.core import tensor_parallel

    from megatron_kaja.data import build_attention_mask

    arch = _arch("gqa")
    mask = build_attention_mask(packed_batch(arch.vocab_size)[2], ROWS, SEQ)
    _, plain = _pair(arch, attention_dropout=0.5)
    _, recomputed = _pair(arch, attention_dropout=0.5, recompute_granularity="full")
    results = []
    for model in (plain, recomputed, plain):
        tensor_parallel.model_parallel_cuda_manual_seed(3)
        default_stream = torch.get_rng_state()
        results.append(_forward_backward(model, attention_mask=mask))
        # the draws came from the tracker's stream, not the default generator
        assert torch.equal(torch.get_rng_state(), default_stream)
    (logits, grads), (logits_rc, grads_rc), (logits_again, _) = results
    torch.testing.assert_close(logits_again, logits, rtol=0, atol=0)
    torch.testing.assert_close(logits_rc, logits, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_rc[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    plain.eval()
    with torch.no_grad():
        tokens, positions, _ = packed_batch(plain.vocab_size)
        no_dropout = plain(tokens, positions, mask)
    assert (no_dropout - logits).abs().max() > 1e-3  # dropout did act in training


@pytest.mark.slow
def test_tp2_equals_tp1(megatron_world, tiny_hf_dir, tiny_hf_gqa_dir, tmp_path):
    """Converted tiny checkpoints (MHA, GQA): the SDPA spec at TP=2 (torchrun) gives the TP=1
    local spec's logits and attention-projection gradients."""
    from megatron_kaja.checkpoint.convert import hf_to_mcore, open_mcore_checkpoint
    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.data import build_attention_mask
    from megatron_kaja.models.llama.model import build_gpt_model

    cases = []
    for name, hf_dir in {"mha": tiny_hf_dir, "gqa": tiny_hf_gqa_dir}.items():
        hf_to_mcore(hf_dir, tmp_path / name, progress=False)
        cases.append({"name": name, "mcore": str(tmp_path / name)})
    run_torchrun(
        REPO / "tests" / "models" / "sdpa_worker.py",
        2,
        json.dumps({"cases": cases, "out": str(tmp_path)}),
    )
    for case in cases:
        arch = open_mcore_checkpoint(case["mcore"]).arch
        local = build_gpt_model(arch, transformer_impl="local")
        load_mcore_weights(local, case["mcore"], "local")
        tokens, positions, cu_seqlens = packed_batch(arch.vocab_size)
        mask = build_attention_mask(cu_seqlens, *tokens.shape)
        logits = local(tokens, positions, mask)[..., : arch.vocab_size]
        loss_of_logits(logits).backward()
        tp2 = torch.load(tmp_path / f"{case['name']}.pt")
        torch.testing.assert_close(tp2["logits"], logits.detach().cpu(), rtol=1e-5, atol=1e-5)
        assert len(tp2["grads"]) == 2 * arch.num_layers
        params = dict(local.named_parameters())
        for name, grad in tp2["grads"].items():
            torch.testing.assert_close(
                grad, params[name].grad.cpu(), rtol=1e-4, atol=1e-6, msg=name
            )


@pytest.mark.parametrize(
    ("dtype", "dropout", "usable"),
    [(torch.bfloat16, 0.0, True), (torch.float16, 0.0, True), (torch.float32, 0.0, False),
     (torch.bfloat16, 0.1, False)],
)  # fmt: skip
def test_varlen_flash_is_used_only_where_flash_runs(monkeypatch, dtype, dropout, usable):
    # Flash attention takes fp16 / bf16 only: an fp32 GPU run (the GPU check's CP and scale
    # comparisons) must take the masked kernel.
    from megatron_kaja.models.llama import sdpa as sdpa_module

    monkeypatch.setattr(sdpa_module, "varlen_attn", lambda *a, **k: None)
    query = type("CudaQuery", (), {"is_cuda": True, "dtype": dtype})()
    assert sdpa_module.SDPAttention._varlen_usable(query, dropout) is usable


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_gpu_varlen_flash_path_equals_local_bf16(megatron_world, kind):
    """On CUDA, packed rows go through torch's varlen flash kernel; bf16 tolerance."""
    from megatron_kaja.data import build_attention_mask
    from megatron_kaja.models.llama import sdpa as sdpa_module
    from megatron_kaja.models.llama.sdpa import packed_seq_params

    assert sdpa_module.varlen_attn is not None, "this torch has no varlen_attn"
    local, sdpa = _pair(_arch(kind), bf16=True)
    tokens, positions, cu_seqlens = packed_batch(local.vocab_size)
    mask = build_attention_mask(cu_seqlens, ROWS, SEQ)
    with torch.no_grad():
        ref = local(tokens, positions, mask).float()
        got = sdpa(tokens, positions, None, packed_seq_params=packed_seq_params(cu_seqlens, SEQ))
    torch.testing.assert_close(got.float(), ref, rtol=2e-2, atol=2e-2)
