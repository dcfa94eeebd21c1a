"""Per-GPU memory of a training layout: weights, gradients, optimizer states, activations.

Static memory follows megatron-core's mixed-precision bookkeeping (Megatron-LM's
docs/distrib_optimizer.md): bf16 weights (2 B/param) with fp32 main gradients (4 B/param,
`grad_reduce_in_fp32`) and an fp32 master copy + Adam's two moments (12 B/param), i.e.
18 B/param, or 6 + 12/DP B/param with the distributed optimizer, which shards the optimizer
states over data-parallel ranks. In fp32: 4 + 4 + 8 (moments; the weights are the master).
bitsandbytes' 8-bit AdamW (`--optimizer paged_adamw_8bit`) keeps the moments as uint8 codes
with one fp32 absmax per 256 values each (~2.03 B/param) and no master copy; under bf16 its
step also holds bf16 copies of the fp32 main gradients (2 B/param). Paged states can move to
host memory under pressure; they are counted on the GPU.

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", Sec. 4), re-derived for the llm-jp-3 (Llama) block: RMSNorm, GQA,
no biases, no dropout (llm-jp-3 trains with dropout 0, so none of the paper's dropout masks
exist) and a SwiGLU MLP. Bytes stored for the backward of one layer and one micro-batch of
b sequences of s tokens (h hidden, a heads, g KV groups, d head_dim, f ffn, t = TP), bf16:

  outside the TP regions (sharded only with sequence parallelism):
    2sbh  attention RMSNorm input      2sbh  QKV matmul input (norm output)
    2sbh  MLP RMSNorm input            2sbh  fc1 matmul input (norm output)
  inside the TP regions (divided by t):
    2sb(ad) Q after RoPE + 4sb(gd) K, V + 2sb(ad) attention output (linear_proj input)
    core attention: flash attention keeps the fp32 softmax statistics, 4sba; the unfused
      path keeps the softmax probabilities, 2as^2b, and K, V expanded to a heads, 4sb(ad)
    8sbf  SwiGLU: fc1 output (gate and up, 4sbf), silu(gate) (2sbf), silu(gate) * up
          (the fc2 input, 2sbf)

Selective recompute (the paper's Sec. 4.2: megatron recomputes the core attention) drops
the core-attention terms. Full recompute keeps only a checkpointed group's input (2sbh, /t
with sequence parallelism): `uniform` checkpoints groups of N = `--recompute-num-layers`
layers (ceil(L/N) inputs per micro-batch, and N layers' whole working set while a group is
recomputed); `block` checkpoints the first N layers of each model chunk one by one and
keeps the others' full activations. With the 1F1B pipeline schedule stage i holds
min(PP - i, micro-batches) micro-batches in flight (the paper's Sec. 4.2.3: the first
stage holds PP of them); the interleaved schedule (v model chunks of L/(PP v) layers each)
holds megatron-core's warm-up count, 2(PP - i - 1) + (v - 1) PP, plus one chunk forward,
i.e. L (1 + (PP - 1)/(PP v)) layers' worth on the first stage (Sec. 4.2.3 again). The
last stage adds the final norm and output-layer inputs (2sbh each) and the fp32 softmax
the vocab-parallel cross entropy keeps, 4sbV/t.

Sequence parallelism divides the terms outside the TP regions by t (then every term is
/t); context parallelism splits the sequence over its ranks, s -> s/cp, and shards the
distributed optimizer's states over DP x CP (megatron-core's dp-cp group). Its attention
(the sdpa backend's, `models/llama/sdpa.py`) all-gathers K and V: the kernel's inputs are
then the full row's K and V, expanded to a heads (the masked kernel takes no GQA),
4Sb(ad)/t with S = cp s the full row length, instead of the rank's 4sb(gd)/t, under the CP
mask that the memory-efficient kernel keeps as a bf16 bias of its (s x S) shape, 2bsS per
rank (not split by TP). Selective recompute keeps only the local K and V, as without CP. FP8
(transformer-engine) keeps the four GEMM inputs (QKV, linear_proj, fc1, fc2) as 1-byte
copies instead of bf16, and a cached fp8 copy of each weight matrix and its transpose
(2 B per matrix parameter). Uneven pipeline stages (`--decoder-first/last-pipeline-num-
layers`) hold their own layer counts. Overlapped gradient reduce / parameter gather and
the bucket size change no buffer: megatron-core's grad and param buffers are the same,
only when their collectives run differs.

Not counted: the CUDA context, NCCL buffers, allocator fragmentation and transient
buffers (`fits` keeps `headroom` of the device for them), and the logits' bf16 copy, which
is freed once the cross entropy has made its fp32 one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_kaja.models.llama.config import (
    LlamaArch,
    check_parallel_layout,
    padded_vocab_size,
    pipeline_stage_layers,
)

GIB = 1024**3
Recompute = Literal["none", "selective", "full"]
RecomputeMethod = Literal["uniform", "block"]


@dataclass(frozen=True)
class TrainingLayout:
    """How a run is split over GPUs and what one micro-batch is."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int = 1
    micro_batch_size: int = 1
    seq_length: int = 4096
    num_micro_batches: int = 1  # per optimizer step and DP rank (gradient accumulation)
    recompute: Recompute = "none"
    recompute_method: RecomputeMethod = "uniform"  # full recompute only
    recompute_num_layers: int | None = None  # uniform: 1; block: every layer of a chunk
    sequence_parallel: bool = False
    context_parallel: int = 1
    virtual_stages: int | None = None  # model chunks per pipeline stage (interleaved 1F1B)
    first_stage_layers: int | None = None  # --decoder-first-pipeline-num-layers
    last_stage_layers: int | None = None  # --decoder-last-pipeline-num-layers
    distributed_optimizer: bool = False
    optimizer: str = "adam"  # or an 8-bit bitsandbytes AdamW: "adamw_8bit", "paged_adamw_8bit"
    bf16: bool = True
    fp8: bool = False
    flash_attention: bool = True

    @property
    def world_size(self) -> int:
        return (
            self.tensor_parallel * self.pipeline_parallel * self.context_parallel
        ) * self.data_parallel

    @property
    def chunks(self) -> int:
        return self.virtual_stages or 1

    def stage_layers(self, arch: LlamaArch) -> list[int]:
        """Decoder layers of each pipeline stage."""
        return pipeline_stage_layers(
            arch.num_layers,
            self.pipeline_parallel,
            first_stage_layers=self.first_stage_layers,
            last_stage_layers=self.last_stage_layers,
            virtual_stages=self.virtual_stages,
        )


@dataclass
class MemoryEstimate:
    """Bytes on the GPU that needs the most (the worst pipeline stage)."""

    stage: int
    params: int  # parameters held by this GPU (a count, not bytes)
    weights: int
    gradients: int
    optimizer: int
    activations: int
    extra: dict[str, int] = field(default_factory=dict)  # held all along (a reference model)
    # Held only while the activations are not (GRPO's rollout KV cache): the peak takes the
    # larger of the two phases.
    other_phase: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        static = self.weights + self.gradients + self.optimizer + sum(self.extra.values())
        return static + max(self.activations, sum(self.other_phase.values()))

    def fits(self, gpu_memory_gb: float, headroom: float = 0.1) -> bool:
        """Whether the total stays under `gpu_memory_gb` GiB less a `headroom` fraction
        (kept for the CUDA context, NCCL buffers and allocator fragmentation)."""
        return self.total <= gpu_memory_gb * GIB * (1 - headroom)

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("gradients (fp32 main grads)", self.gradients),
            ("optimizer states", self.optimizer),
            *self.extra.items(),
            ("activations", self.activations),
            *((f"{k} (not at once with activations)", v) for k, v in self.other_phase.items()),
            ("total (peak)", self.total),
        ]

    def format(self, gpu_memory_gb: float | None = None) -> str:
        lines = [f"memory per GPU (worst pipeline stage: {self.stage}; {self.params:,} params):"]
        lines += [f"  {name:<48} {value / GIB:8.2f} GiB" for name, value in self.rows()]
        if gpu_memory_gb is not None:
            verdict = "fits" if self.fits(gpu_memory_gb) else "DOES NOT FIT"
            lines.append(f"  {verdict} in {gpu_memory_gb:g} GiB (keeping 10% headroom)")
        return "\n".join(lines)


def layer_params(arch: LlamaArch, tensor_parallel: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (the two RMSNorm weights replicated)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_query_groups
    matrices = h * (a + 2 * g) * d + a * d * h + 3 * h * f  # qkv, proj, fc1 (gate+up), fc2
    return matrices // tensor_parallel + 2 * h


def stage_params(arch: LlamaArch, layout: TrainingLayout, stage: int) -> int:
    """Parameters held by one GPU of pipeline stage `stage` (untied embeddings)."""
    t, p = layout.tensor_parallel, layout.pipeline_parallel
    vocab = padded_vocab_size(arch.vocab_size, t)
    count = layout.stage_layers(arch)[stage] * layer_params(arch, t)
    if stage == 0:
        count += vocab * arch.hidden_size // t  # word embeddings
    if stage == p - 1:
        count += vocab * arch.hidden_size // t + arch.hidden_size  # output layer + final norm
    return count


def layer_activation_bytes(
    arch: LlamaArch, layout: TrainingLayout, recompute: Recompute | None = None
) -> int:
    """Bytes one decoder layer keeps for backward, for one micro-batch (module docstring).

    With full recompute: the bytes of one checkpointed input (a group's or a layer's)."""
    recompute = layout.recompute if recompute is None else recompute
    s, b, t = (
        layout.seq_length // layout.context_parallel,
        layout.micro_batch_size,
        layout.tensor_parallel,
    )
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    a, g = arch.num_attention_heads, arch.num_query_groups
    gemm = 1 if layout.fp8 else 2  # bytes of a kept GEMM input (fp8 copies under TE's FP8)
    # attention norm input, QKV input (norm output), MLP norm input, fc1 input (norm output)
    outside_tp = 2 * s * b * h + gemm * s * b * h + 2 * s * b * h + gemm * s * b * h
    layer_input = 2 * s * b * h
    if layout.sequence_parallel:
        outside_tp //= t
        layer_input //= t
    if recompute == "full":
        return layer_input
    # Q after RoPE, K and V, linear_proj input, SwiGLU: fc1 out (4sbf), silu(gate), fc2 input
    inside_tp = 2 * s * b * a * d + 4 * s * b * g * d + gemm * s * b * a * d
    inside_tp += 4 * s * b * f + 2 * s * b * f + gemm * s * b * f
    cp_mask = 0
    if recompute != "selective":
        if layout.flash_attention:
            inside_tp += 4 * s * b * a  # fp32 log-sum-exp per row and head
        else:
            inside_tp += 2 * a * s * layout.seq_length * b  # probs over the whole sequence
            inside_tp += 4 * s * b * (a - g) * d  # K/V expanded to every head
        if layout.context_parallel > 1:
            # the gathered full-row K and V, expanded to every head, replace the rank's own;
            # the CP mask as the kernel's bf16 bias (module docstring)
            inside_tp += 4 * layout.seq_length * b * a * d - 4 * s * b * g * d
            cp_mask = 2 * b * s * layout.seq_length
    return outside_tp + inside_tp // t + cp_mask


def chunk_micro_batch_bytes(arch: LlamaArch, layout: TrainingLayout, layers: int) -> int:
    """Activation bytes one forward of a model chunk of `layers` layers keeps for backward."""
    whole = layer_activation_bytes(arch, layout, "none")
    if layout.recompute != "full":
        return layers * layer_activation_bytes(arch, layout)
    kept_input = layer_activation_bytes(arch, layout)
    n = layout.recompute_num_layers
    if layout.recompute_method == "block":
        recomputed = layers if n is None else min(n, layers)
        return recomputed * kept_input + (layers - recomputed) * whole
    return -(-layers // (n or 1)) * kept_input  # one input per group of n layers


def recompute_peak_bytes(arch: LlamaArch, layout: TrainingLayout, layers: int) -> int:
    """The working set rebuilt at once under full recompute: a uniform group of N layers, or
    one layer (block)."""
    if layout.recompute != "full":
        return 0
    group = (
        1 if layout.recompute_method == "block" else min(layout.recompute_num_layers or 1, layers)
    )
    return group * layer_activation_bytes(arch, layout, "none")


def in_flight_chunk_forwards(layout: TrainingLayout, stage: int) -> int:
    """Chunk forwards whose activations stage `stage` holds at once (module docstring)."""
    p, v, m = layout.pipeline_parallel, layout.chunks, layout.num_micro_batches
    if v == 1:
        return min(p - stage, m)
    return min(2 * (p - stage - 1) + (v - 1) * p + 1, m * v)


def stage_activation_bytes(arch: LlamaArch, layout: TrainingLayout, stage: int) -> int:
    """Activation bytes pipeline stage `stage` holds at its peak (1F1B or interleaved)."""
    s, b, t = (
        layout.seq_length // layout.context_parallel,
        layout.micro_batch_size,
        layout.tensor_parallel,
    )
    p = layout.pipeline_parallel
    chunk_layers = layout.stage_layers(arch)[stage] // layout.chunks
    total = in_flight_chunk_forwards(layout, stage) * chunk_micro_batch_bytes(
        arch, layout, chunk_layers
    )
    total += recompute_peak_bytes(arch, layout, chunk_layers)
    if stage == p - 1:
        hidden = 2 * s * b * arch.hidden_size
        if layout.sequence_parallel:
            hidden //= t
        vocab = padded_vocab_size(arch.vocab_size, t)
        total += 2 * hidden + 4 * s * b * vocab // t  # final norm + output layer inputs, softmax
    return total


def fp8_weight_copy_bytes(arch: LlamaArch, layout: TrainingLayout, stage: int) -> int:
    """transformer-engine's cached fp8 weight and transpose (1 B each per matrix parameter)."""
    if not layout.fp8:
        return 0
    norms = 2 * arch.hidden_size
    matrices = layer_params(arch, layout.tensor_parallel) - norms
    return 2 * matrices * layout.stage_layers(arch)[stage]


def estimate_stage(arch: LlamaArch, layout: TrainingLayout, stage: int) -> MemoryEstimate:
    params = stage_params(arch, layout, stage)
    weight_bytes = 2 if layout.bf16 else 4
    if layout.optimizer == "adam":
        optimizer = params * (12 if layout.bf16 else 8)  # (fp32 master +) exp_avg, exp_avg_sq
        if layout.distributed_optimizer:  # sharded over the data-parallel x context ranks
            optimizer = -(-optimizer // (layout.data_parallel * layout.context_parallel))
    else:  # two uint8 moments + their fp32 absmax per block of 256 (+ bf16 gradient copies)
        optimizer = 2 * params + 8 * -(-params // 256) + (2 * params if layout.bf16 else 0)
    extra = {}
    if layout.fp8:
        extra["fp8 weight copies"] = fp8_weight_copy_bytes(arch, layout, stage)
    return MemoryEstimate(
        stage=stage,
        params=params,
        weights=params * weight_bytes,
        gradients=params * 4,
        optimizer=optimizer,
        activations=stage_activation_bytes(arch, layout, stage),
        extra=extra,
    )


def estimate_memory(arch: LlamaArch, layout: TrainingLayout) -> MemoryEstimate:
    """The estimate of the pipeline stage that needs the most memory."""
    check_parallel_layout(
        arch,
        layout.tensor_parallel,
        layout.pipeline_parallel,
        first_stage_layers=layout.first_stage_layers,
        last_stage_layers=layout.last_stage_layers,
        virtual_stages=layout.virtual_stages,
    )
    if layout.seq_length % (layout.context_parallel * (2 if layout.context_parallel > 1 else 1)):
        raise ValueError(
            f"sequence length {layout.seq_length} is not divisible by 2 x "
            f"context-parallel-size {layout.context_parallel}"
        )
    stages = [estimate_stage(arch, layout, i) for i in range(layout.pipeline_parallel)]
    return max(stages, key=lambda e: e.total)


def kv_cache_bytes(arch: LlamaArch, sequences: int, tokens: int, tensor_parallel: int) -> int:
    """bf16 KV cache of `sequences` x `tokens` for the whole model on one TP rank."""
    per_token = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * 2
    return sequences * tokens * per_token // tensor_parallel


def estimate_grpo_memory(
    arch: LlamaArch,
    layout: TrainingLayout,
    *,
    rollout_sequences: int,
    prompt_length: int,
    max_new_tokens: int,
    reference_model: bool,
    rollout_engine: str = "builtin",
    vllm_bytes: int = 0,
) -> MemoryEstimate:
    """The GRPO step's peak: the training estimate (sequences of prompt + response), the
    frozen reference model's weights (TP-sharded, not DP-sharded), and the rollout engine.

    `rollout_sequences` are sampled at once (a rank's share, or --rollout-batch-size) before
    the update's forward, so the rollout memory and the training activations are never live
    together. `builtin` holds only its KV cache (split by TP and by pipeline stage); `hf`
    keeps an unsharded copy of the weights on TP rank 0 all along, plus an unsharded KV
    cache; `vllm` takes its
    `vllm_bytes` (--rollout-gpu-memory-utilization of the GPU) while awake and releases
    weights and cache before the update (sleep level 2).
    """
    estimate = estimate_memory(arch, layout)
    weight_bytes = 2 if layout.bf16 else 4
    if reference_model:
        estimate.extra["reference model"] = stage_params(arch, layout, 0) * weight_bytes
    tokens = prompt_length + max_new_tokens
    if rollout_engine == "vllm":
        estimate.other_phase["vLLM engine"] = vllm_bytes
    elif rollout_engine == "hf":
        whole = TrainingLayout(tensor_parallel=1, bf16=layout.bf16)
        estimate.extra["hf rollout engine weights (TP rank 0)"] = (
            stage_params(arch, whole, 0) * weight_bytes
        )
        estimate.other_phase["rollout KV cache"] = kv_cache_bytes(
            arch, rollout_sequences, tokens, 1
        )
    else:  # each pipeline stage caches its own layers
        estimate.other_phase["rollout KV cache"] = (
            kv_cache_bytes(arch, rollout_sequences, tokens, layout.tensor_parallel)
            // layout.pipeline_parallel
        )
    return estimate


# Extra compute of each recompute setting, as a fraction of a step without recompute: a
# layer's forward is ~1/3 of its forward + backward, so recomputing L' of L layers costs
# L'/(3L); selective recompute redoes only the core attention (its flash kernel's share is
# small next to the GEMMs: counted as 1%). The 1F1B pipeline idles (p - 1) / (m v) of a step
# (m micro-batches, v model chunks; Narayanan et al. 2021, Sec. 2.2).
def overhead(arch: LlamaArch, layout: TrainingLayout) -> float:
    """Extra compute time of the layout's recompute and pipeline bubble, as a fraction of a
    step (see above); tensor-parallel traffic is ranked separately."""
    bubble = (layout.pipeline_parallel - 1) / (layout.num_micro_batches * layout.chunks)
    if layout.recompute == "selective":
        return bubble + 0.01
    if layout.recompute != "full":
        return bubble
    layers = max(layout.stage_layers(arch)) // layout.chunks
    n = layout.recompute_num_layers
    recomputed = layers if layout.recompute_method == "uniform" or n is None else min(n, layers)
    return bubble + recomputed / layers / 3


def candidate_layouts(arch: LlamaArch, world_size: int, gpus_per_node: int, **fixed):
    """Layouts of `world_size` GPUs to compare: TP within a node (a divisor of
    `gpus_per_node` that splits the heads), PP a divisor of the layers (interleaved with 2 or
    4 chunks where the micro-batches allow), sequence parallelism on whenever TP > 1, every
    recompute setting (none, selective, block over 1/4, 1/2, 3/4 of a chunk's layers,
    full). `fixed` are the TrainingLayout fields the run already has (micro batch, sequence
    length, optimizer...) and `global_batch_size`, from which the micro-batches per DP rank
    follow."""
    fixed = dict(fixed)
    global_batch = fixed.pop("global_batch_size")
    micro = fixed.get("micro_batch_size", 1)
    for tp in (t for t in (1, 2, 4, 8) if t <= gpus_per_node and gpus_per_node % t == 0):
        for pp in (p for p in range(1, world_size // tp + 1) if world_size % (tp * p) == 0):
            dp = world_size // (tp * pp)
            if global_batch % (micro * dp):
                continue
            m = global_batch // (micro * dp)
            try:
                check_parallel_layout(arch, tp, pp)
            except ValueError:
                continue
            stage = arch.num_layers // pp
            chunks = [None]
            if pp > 1 and m >= pp and m % pp == 0:
                chunks += [v for v in (2, 4) if stage % v == 0]
            for v in chunks:
                layers = stage // (v or 1)
                recomputes = [("none", "uniform", None), ("selective", "uniform", None)]
                recomputes += [("full", "block", layers * q // 4) for q in (1, 2, 3)]
                recomputes.append(("full", "uniform", 1))
                for recompute, method, n in recomputes:
                    if recompute == "full" and method == "block" and not n:
                        continue
                    yield TrainingLayout(
                        tensor_parallel=tp,
                        pipeline_parallel=pp,
                        data_parallel=dp,
                        num_micro_batches=m,
                        virtual_stages=v,
                        sequence_parallel=tp > 1,
                        recompute=recompute,
                        recompute_method=method,
                        recompute_num_layers=n,
                        **fixed,
                    )


def recommend_layout(
    arch: LlamaArch,
    world_size: int,
    gpu_memory_gb: float,
    *,
    gpus_per_node: int = 8,
    **fixed,
) -> tuple[TrainingLayout, MemoryEstimate] | None:
    """The layout this estimator recommends: of those that fit `gpu_memory_gb` (with its
    headroom), the least extra compute (recompute + pipeline bubble, `overhead`) first,
    then the smallest TP (tensor-parallel traffic crosses every layer four times), then
    the fewest pipeline stages. None when nothing fits."""
    fitting = []
    for layout in candidate_layouts(arch, world_size, gpus_per_node, **fixed):
        estimate = estimate_memory(arch, layout)
        if estimate.fits(gpu_memory_gb):
            cost = round(overhead(arch, layout), 4)
            fitting.append(((cost, layout.tensor_parallel, layout.pipeline_parallel), layout))
    if not fitting:
        return None
    layout = min(fitting, key=lambda item: item[0])[1]
    return layout, estimate_memory(arch, layout)
