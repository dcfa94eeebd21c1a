"""The memory estimator: hand-computed bytes for a small layout, and the properties that
must hold for any model (TP shards weights, the distributed optimizer shards its states over
DP, recompute lowers activations, the first pipeline stage holds the most micro-batches)."""

import pytest

from megatron_kaja.models.llama.config import PRESETS, LlamaArch
from megatron_kaja.training.memory import (
    TrainingLayout,
    estimate_grpo_memory,
    estimate_memory,
    estimate_stage,
    layer_activation_bytes,
    layer_params,
    stage_params,
)

SMALL = LlamaArch(
    hidden_size=64,
    ffn_hidden_size=128,
    num_layers=4,
    num_attention_heads=4,
    num_query_groups=2,
    vocab_size=256,
    head_dim=16,
)
LAYOUT = TrainingLayout(
    tensor_parallel=2,
    pipeline_parallel=2,
    data_parallel=2,
    micro_batch_size=2,
    seq_length=8,
    num_micro_batches=4,
    distributed_optimizer=True,
)
L13B = PRESETS["llm-jp-3-13b"]


def test_small_layout_by_hand():
    # One layer on a TP rank: (qkv 64*(4+2*2)*16 + proj 64*64 + fc1/fc2 3*64*128) / 2 + norms 2*64
    assert stage_params(SMALL, LAYOUT, 0) == 2 * 18560 + 256 * 64 // 2
    assert stage_params(SMALL, LAYOUT, 1) == 2 * 18560 + 256 * 64 // 2 + 64
    # s*b = 16 tokens: 8 sbh outside TP + (Q 2sbh + K,V 4sb*gd + O 2sbh + 8sbf + lse 4sba) / 2
    assert layer_activation_bytes(SMALL, LAYOUT) == 8192 + (2048 + 2048 + 2048 + 16384 + 256) // 2
    first = estimate_stage(SMALL, LAYOUT, 0)
    assert (first.weights, first.gradients, first.optimizer) == (90624, 181248, 271872)
    assert first.activations == 2 * 2 * 19584  # 2 micro-batches in flight x 2 layers
    last = estimate_stage(SMALL, LAYOUT, 1)
    # 1 micro-batch x 2 layers + final norm / output layer inputs + fp32 softmax 4 s b V / t
    assert last.activations == 2 * 19584 + 2 * 2048 + 4 * 16 * 256 // 2
    worst = estimate_memory(SMALL, LAYOUT)
    assert worst.stage == 0 and worst.total == 90624 + 181248 + 271872 + 78336


def test_megatron_bytes_per_parameter():
    """Megatron-LM's distrib_optimizer.md: bf16 params + fp32 grads = 18 B/param, or
    6 + 12/d with the distributed optimizer; fp32 = 16, or 8 + 8/d."""
    for bf16, replicated, sharded in ((True, 18, 6 + 12 / 4), (False, 16, 8 + 8 / 4)):
        base = TrainingLayout(data_parallel=4, bf16=bf16)
        plain = estimate_stage(L13B, base, 0)
        dist = estimate_stage(L13B, TrainingLayout(data_parallel=4, bf16=bf16,
                                                   distributed_optimizer=True), 0)  # fmt: skip
        static = plain.weights + plain.gradients + plain.optimizer
        assert static == replicated * plain.params
        assert dist.weights + dist.gradients + dist.optimizer == pytest.approx(
            sharded * plain.params, abs=4
        )


def test_8bit_optimizer_bytes_per_parameter():
    """bitsandbytes' 8-bit AdamW: two uint8 moments + an fp32 absmax per 256 values each, no
    master copy (the replicated optimizer whatever DP); bf16 adds the step's gradient copies."""
    for bf16, weights_and_grads, step_copies in ((True, 2 + 4, 2), (False, 4 + 4, 0)):
        layout = TrainingLayout(data_parallel=4, bf16=bf16, optimizer="paged_adamw_8bit")
        est = estimate_stage(L13B, layout, 0)
        static = est.weights + est.gradients + est.optimizer
        expected = weights_and_grads + 2 + 8 / 256 + step_copies
        assert static / est.params == pytest.approx(expected, rel=1e-6)


def test_tensor_parallel_halves_the_weights():
    one = stage_params(L13B, TrainingLayout(tensor_parallel=1), 0)
    two = stage_params(L13B, TrainingLayout(tensor_parallel=2), 0)
    replicated_norms = 2 * L13B.hidden_size * L13B.num_layers + L13B.hidden_size
    assert 2 * two - one == replicated_norms


def test_distributed_optimizer_divides_states_by_data_parallel():
    for dp in (1, 2, 4, 8):
        plain = estimate_stage(L13B, TrainingLayout(data_parallel=dp), 0).optimizer
        dist = TrainingLayout(data_parallel=dp, distributed_optimizer=True)
        assert estimate_stage(L13B, dist, 0).optimizer == -(-plain // dp)


@pytest.mark.parametrize("flash", [True, False])
def test_recompute_lowers_activations(flash):
    def act(recompute):
        layout = TrainingLayout(tensor_parallel=2, micro_batch_size=4, recompute=recompute,
                                flash_attention=flash)  # fmt: skip
        return estimate_memory(L13B, layout).activations

    assert act("full") < act("selective") < act("none")


def test_unfused_attention_keeps_the_quadratic_scores():
    fused = layer_activation_bytes(L13B, TrainingLayout(seq_length=4096))
    unfused = layer_activation_bytes(L13B, TrainingLayout(seq_length=4096, flash_attention=False))
    a, s = L13B.num_attention_heads, 4096
    assert unfused - fused == 2 * a * s * s - 4 * s * a  # probs replace the fp32 statistics


def test_sequence_parallel_and_tensor_parallel_split_activations():
    plain = layer_activation_bytes(L13B, TrainingLayout(tensor_parallel=1))
    sp = layer_activation_bytes(L13B, TrainingLayout(tensor_parallel=4, sequence_parallel=True))
    assert sp == plain // 4


def test_first_pipeline_stage_holds_the_most_micro_batches():
    layout = TrainingLayout(pipeline_parallel=4, num_micro_batches=8)
    acts = [estimate_stage(L13B, layout, i).activations for i in range(4)]
    assert acts[0] > acts[1] > acts[2]
    # Fewer micro-batches than stages: no more in flight than exist.
    few = TrainingLayout(pipeline_parallel=4, num_micro_batches=1)
    assert estimate_stage(L13B, few, 0).activations == estimate_stage(L13B, few, 1).activations


def test_grpo_peak_takes_the_larger_phase():
    layout = TrainingLayout(tensor_parallel=2, data_parallel=4, micro_batch_size=8,
                            seq_length=1024, num_micro_batches=16)  # fmt: skip
    est = estimate_grpo_memory(L13B, layout, rollout_sequences=128, prompt_length=512,
                               max_new_tokens=512, reference_model=True)  # fmt: skip
    kv = est.other_phase["rollout KV cache"]
    assert kv == 128 * 1024 * (2 * 40 * 40 * 128 * 2) // 2
    assert est.extra["reference model"] == est.weights
    static = est.weights + est.gradients + est.optimizer + est.extra["reference model"]
    assert est.total == static + max(kv, est.activations)


def test_grpo_rollout_engines_hold_different_memory():
    layout = TrainingLayout(tensor_parallel=4, data_parallel=2, micro_batch_size=8,
                            seq_length=1024, num_micro_batches=8)  # fmt: skip
    common = dict(rollout_sequences=64, prompt_length=512, max_new_tokens=512,
                  reference_model=False)  # fmt: skip
    builtin = estimate_grpo_memory(L13B, layout, **common)
    hf = estimate_grpo_memory(L13B, layout, rollout_engine="hf", **common)
    vllm = estimate_grpo_memory(L13B, layout, rollout_engine="vllm", vllm_bytes=40 * 2**30,
                                **common)  # fmt: skip
    # hf: an unsharded bf16 copy of the whole model all along, and an unsharded KV cache.
    copy = hf.extra["hf rollout engine weights (TP rank 0)"]
    assert copy == pytest.approx(13.7e9 * 2, rel=0.03)
    assert hf.other_phase["rollout KV cache"] == 4 * builtin.other_phase["rollout KV cache"]
    # vllm: its share of the GPU, released (sleep level 2) before the update.
    assert vllm.other_phase == {"vLLM engine": 40 * 2**30}
    assert vllm.total == builtin.total - max(
        builtin.activations, builtin.other_phase["rollout KV cache"]
    ) + max(builtin.activations, 40 * 2**30)


def test_layout_that_cannot_split_is_refused():
    with pytest.raises(ValueError, match="num_hidden_layers 40 is not divisible"):
        estimate_memory(L13B, TrainingLayout(pipeline_parallel=3))


# The scale settings: each shrinks (or grows) the activation term exactly as its formula says
# (module docstring of memory.py; Korthikanti et al. 2022 Sec. 4).
def _sbh(layout):
    return layout.seq_length * layout.micro_batch_size * L13B.hidden_size


def test_sequence_parallel_divides_the_terms_outside_tensor_parallel():
    base = TrainingLayout(tensor_parallel=2, micro_batch_size=4)
    sp = TrainingLayout(tensor_parallel=2, micro_batch_size=4, sequence_parallel=True)
    outside = 8 * _sbh(base)  # two norm inputs + the QKV and fc1 inputs, 2 B each
    assert layer_activation_bytes(L13B, base) - layer_activation_bytes(L13B, sp) == outside // 2
    # Full recompute keeps the layer input only, which sequence parallelism splits too.
    full, full_sp = (TrainingLayout(tensor_parallel=2, recompute="full", sequence_parallel=x)
                     for x in (False, True))  # fmt: skip
    assert layer_activation_bytes(L13B, full) == 2 * layer_activation_bytes(L13B, full_sp)


def test_context_parallel_splits_the_sequence_and_shards_optimizer_states():
    cp = TrainingLayout(seq_length=8192, context_parallel=2, data_parallel=2,
                        distributed_optimizer=True)  # fmt: skip
    half = TrainingLayout(seq_length=4096, data_parallel=2, distributed_optimizer=True)
    # Everything but attention as a run of s / CP tokens; attention over the gathered K and
    # V (full row of S = 8192, expanded to a heads) instead of the rank's own (s = 4096, g
    # groups), and the CP mask as a bf16 bias of s x S per rank.
    a, g, d, s, S = L13B.num_attention_heads, L13B.num_query_groups, L13B.head_dim, 4096, 8192
    gathered = 4 * S * a * d - 4 * s * g * d + 2 * s * S
    assert layer_activation_bytes(L13B, cp) == layer_activation_bytes(L13B, half) + gathered
    # Selective recompute keeps the core attention's inputs only: the rank's own K and V.
    selective = {"recompute": "selective"}
    assert layer_activation_bytes(L13B, cp, "selective") == layer_activation_bytes(
        L13B, TrainingLayout(seq_length=4096, **selective), "selective"
    )
    assert cp.world_size == 4
    plain = estimate_stage(L13B, TrainingLayout(), 0).optimizer
    assert estimate_stage(L13B, cp, 0).optimizer == -(-plain // 4)  # over DP x CP
    with pytest.raises(ValueError, match="context-parallel-size 2"):
        estimate_memory(L13B, TrainingLayout(seq_length=4098, context_parallel=2))


def test_interleaved_pipeline_first_stage_holds_l_times_one_plus_p_minus_1_over_pv():
    p, v = 4, 2
    common = dict(pipeline_parallel=p, num_micro_batches=16)
    plain = TrainingLayout(**common)
    interleaved = TrainingLayout(virtual_stages=v, **common)
    per_layer = layer_activation_bytes(L13B, plain)
    stage_layers = L13B.num_layers // p
    # 1F1B: p micro-batches of the stage's L/p layers = L layers' worth.
    assert estimate_stage(L13B, plain, 0).activations == p * stage_layers * per_layer
    # Interleaved: L (1 + (p - 1) / (p v)) layers' worth: 40 * (1 + 3/8) = 55.
    layers = L13B.num_layers * (1 + (p - 1) / (p * v))
    assert estimate_stage(L13B, interleaved, 0).activations == layers * per_layer
    # The last stage keeps the output layer's inputs as well; its chunks: (v - 1) p + 1.
    last = estimate_stage(L13B, interleaved, p - 1).activations
    assert (
        last - estimate_stage(L13B, plain, p - 1).activations
        == (((v - 1) * p + 1) * stage_layers // v - stage_layers) * per_layer
    )
    with pytest.raises(ValueError, match="virtual stages"):
        estimate_memory(L13B, TrainingLayout(pipeline_parallel=4, virtual_stages=3))


def test_recompute_methods_keep_what_their_formulas_say():
    def acts(**kw):
        return estimate_stage(L13B, TrainingLayout(micro_batch_size=1, **kw), 0).activations

    layer = layer_activation_bytes(L13B, TrainingLayout(micro_batch_size=1))
    kept_input = 2 * _sbh(TrainingLayout(micro_batch_size=1))
    softmax = acts() - 40 * layer  # the last stage's output-layer inputs (PP=1)
    # uniform, groups of N: ceil(40 / N) inputs + N layers rebuilt at once.
    for n in (1, 3, 8):
        got = acts(recompute="full", recompute_num_layers=n)
        assert got - softmax == -(-40 // n) * kept_input + n * layer
    # block, the first N layers: N inputs + (40 - N) whole layers + one layer rebuilt.
    for n in (1, 10, 40):
        got = acts(recompute="full", recompute_method="block", recompute_num_layers=n)
        assert got - softmax == n * kept_input + (40 - n) * layer + layer
    # block over every layer is uniform with groups of one.
    assert acts(recompute="full", recompute_method="block") == acts(recompute="full")
    # selective drops only the core attention's statistics (flash) from each layer.
    s, a = 4096, L13B.num_attention_heads
    assert acts() - acts(recompute="selective") == 40 * 4 * s * a


def test_fp8_keeps_one_byte_gemm_inputs_and_weight_copies():
    bf16 = TrainingLayout(tensor_parallel=2)
    fp8 = TrainingLayout(tensor_parallel=2, fp8=True)
    s, h, f = 4096, L13B.hidden_size, L13B.ffn_hidden_size
    ad = L13B.num_attention_heads * L13B.head_dim
    saved = 2 * s * h + (s * ad + s * f) // 2  # QKV + fc1 inputs; linear_proj + fc2 inputs / t
    assert layer_activation_bytes(L13B, bf16) - layer_activation_bytes(L13B, fp8) == saved
    est = estimate_stage(L13B, fp8, 0)
    matrices = (layer_params(L13B, 2) - 2 * h) * 40
    assert est.extra["fp8 weight copies"] == 2 * matrices


def test_uneven_pipeline_stages_hold_their_own_layers():
    layout = TrainingLayout(pipeline_parallel=4, first_stage_layers=7, last_stage_layers=9)
    per_layer = layer_params(L13B)
    counts = [7, 12, 12, 9]  # (40 - 7 - 9) / 2 in the middle
    for stage, count in enumerate(counts):
        embeddings = stage_params(L13B, layout, stage) - count * per_layer
        assert embeddings in (0, 99584 * L13B.hidden_size, 99584 * L13B.hidden_size + 5120)
    with pytest.raises(ValueError, match="cannot share evenly"):
        estimate_memory(L13B, TrainingLayout(pipeline_parallel=4, first_stage_layers=5))
