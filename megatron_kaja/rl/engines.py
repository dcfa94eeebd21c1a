"""Rollout engines: what samples the G completions per prompt in a GRPO step.

* `builtin`: our KV-cache sampler on the training GPTModel itself (`rl.sampler.generate`):
  tensor-parallel, no second copy of the weights, nothing to synchronize. CPU and GPU.
* `hf`: a `transformers` LlamaForCausalLM on the first rank of each tensor-parallel group,
  fed the trainer's weights after every update; its rollouts are broadcast to the group.
  Needs room for one unsharded copy of the model on that rank.
* `vllm`: a colocated vLLM engine on every rank (torchrun's ranks are vLLM's, tensor-parallel
  like the trainer through vLLM's `external_launcher`), woken for each rollout phase and put
  back to sleep (level 2: weights and KV cache released) before the update. Weights go in
  through the model's `load_weights` one layer at a time (`LLM.apply_model`).

Every engine returns the same `Generation` (left-padded prompts, right-padded responses,
the sampled tokens' log-probs under the sampling distribution); the update recomputes the
log-probs with the training model, so an engine only has to sample the right distribution.
Engines are seeded from the step's generator, so a run and its resume sample alike.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_kaja.checkpoint.convert import dtype_name
from megatron_kaja.extras import require
from megatron_kaja.models.llama.config import LlamaArch
from megatron_kaja.models.llama.export import hf_weight_groups
from megatron_kaja.parallel.distributed import tensor_parallel_group
from megatron_kaja.rl.sampler import Generation, SamplingParams, generate, left_pad

logger = logging.getLogger("megatron_kaja.grpo")


@dataclass(frozen=True)
class EngineSettings:
    """What any rollout engine may be built from (each takes the parts it needs)."""

    eos_token_id: int
    pad_token_id: int
    vocab_size: int
    tokenizer_dir: Path | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.3
    seed: int = 0
    transformer_impl: str = "local"


_ENGINES: dict[str, type] = {}


def register_rollout_engine(name: str):
    """Class decorator: make an engine selectable as `--rollout-engine NAME`; the class has a
    `build(model, arch, settings: EngineSettings)` classmethod."""

    def wrap(cls):
        cls.name = name
        _ENGINES[name] = cls
        return cls

    return wrap


def rollout_engine_names() -> tuple[str, ...]:
    """The registered engines, in registration order."""
    return tuple(_ENGINES)


def draw_seed(generator: torch.Generator | None) -> int:
    """A sampling seed taken from `generator` (identical on ranks with identical generators)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def response_mask(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """True on each row's generated tokens up to and including its first EOS."""
    is_eos = (response_ids == eos_token_id).long()
    return (is_eos.cumsum(dim=1) - is_eos) == 0


def generation_from_token_lists(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]],
    *,
    pad_token_id: int,
    device=None,
) -> Generation:
    """A `Generation` from per-row response ids and their log-probs (vLLM's output form)."""
    prompt_ids, prompt_mask = left_pad([list(p) for p in prompts], pad_token_id, device)
    width = max(1, max(len(r) for r in responses))
    ids = torch.full((len(responses), width), pad_token_id, dtype=torch.long, device=device)
    lps = torch.zeros((len(responses), width), dtype=torch.float32, device=device)
    mask = torch.zeros((len(responses), width), dtype=torch.bool, device=device)
    for row, (tokens, values) in enumerate(zip(responses, logprobs, strict=True)):
        if len(tokens) != len(values):
            raise ValueError(f"row {row}: {len(tokens)} tokens but {len(values)} log-probs")
        ids[row, : len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        lps[row, : len(tokens)] = torch.tensor(list(values), dtype=torch.float32)
        mask[row, : len(tokens)] = True
    return Generation(prompt_ids, prompt_mask, ids, mask, lps)


@register_rollout_engine("builtin")
class BuiltinEngine:
    """Samples with the training model itself (nothing to synchronize)."""

    @classmethod
    def build(cls, model, arch: LlamaArch, settings: EngineSettings) -> BuiltinEngine:
        return cls(
            model,
            eos_token_id=settings.eos_token_id,
            pad_token_id=settings.pad_token_id,
            vocab_size=settings.vocab_size,
        )

    def __init__(self, model, *, eos_token_id: int, pad_token_id: int, vocab_size: int):
        self.model = model
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.vocab_size = vocab_size

    def load_weights(self, model) -> None:
        """Nothing to do: the engine is the training model."""

    def generate(self, prompts, params: SamplingParams, generator=None) -> Generation:
        return generate(
            self.model,
            prompts,
            params,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            vocab_size=self.vocab_size,
            generator=generator,
        )

    def sleep(self) -> None:
        """Nothing to release: the KV cache lives only inside `generate`."""

    def close(self) -> None:
        self.model = None


@register_rollout_engine("hf")
class HFEngine:
    """`transformers` generation on TP rank 0 of each group, with the trainer's weights."""

    @classmethod
    def build(cls, model, arch: LlamaArch, settings: EngineSettings) -> HFEngine:
        param = next(model.parameters())
        return cls(
            arch,
            eos_token_id=settings.eos_token_id,
            pad_token_id=settings.pad_token_id,
            dtype=param.dtype,
            device=param.device,
            transformer_impl=settings.transformer_impl,
        )

    def __init__(
        self,
        arch: LlamaArch,
        *,
        eos_token_id: int,
        pad_token_id: int,
        dtype: torch.dtype,
        device: torch.device,
        transformer_impl: str = "local",
    ):
        self.arch = arch
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.device = device
        self.transformer_impl = transformer_impl
        self.group, self.tp_world, self.tp_rank = tensor_parallel_group()
        self.model = None
        if self.tp_rank == 0:
            from transformers import AutoModelForCausalLM, LlamaConfig

            config = LlamaConfig(**arch.to_hf_config(dtype_name(dtype)))
            with torch.device(device):
                self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            self.model.requires_grad_(False).eval()
        self._loaded = False

    def load_weights(self, model) -> None:
        """Copy the trainer's current weights in (a collective over the TP group)."""
        params = dict(self.model.named_parameters()) if self.model is not None else {}
        seen = 0
        for group in hf_weight_groups(model, self.arch, self.transformer_impl):
            for name, tensor in group:
                if self.model is not None:
                    params[name].copy_(tensor)
                seen += 1
        if self.model is not None and seen != len(params):
            raise RuntimeError(f"weight sync covered {seen} of {len(params)} HF tensors")
        self._loaded = True

    def _generate(self, prompts, params: SamplingParams, seed: int) -> Generation:
        from transformers import GenerationConfig

        ids, mask = left_pad(prompts, self.pad_token_id, self.device)
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=not params.greedy,
            temperature=None if params.greedy else params.temperature,
            top_p=None if params.greedy else params.top_p,
            top_k=None if params.greedy else 0,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask.long(), generation_config=config
            )
        response = out.sequences[:, ids.size(1) :]
        # The untruncated sampling distribution (as the builtin sampler records it).
        logits = torch.stack(out.logits, dim=1).float()
        temperature = 1.0 if params.greedy else params.temperature
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        picked = logprobs.gather(-1, response.unsqueeze(-1)).squeeze(-1)
        valid = response_mask(response, self.eos_token_id)
        response = torch.where(valid, response, torch.full_like(response, self.pad_token_id))
        return Generation(ids, mask, response, valid, torch.where(valid, picked, 0.0))

    def generate(self, prompts, params: SamplingParams, generator=None) -> Generation:
        if not self._loaded:
            raise RuntimeError("the hf rollout engine has no weights yet: call load_weights")
        seed = draw_seed(generator)  # every TP rank draws, keeping the generators aligned
        payload = [self._generate(prompts, params, seed) if self.tp_rank == 0 else None]
        if self.tp_world > 1:
            if payload[0] is not None:
                payload[0] = _to_device(payload[0], "cpu")
            dist.broadcast_object_list(
                payload, src=dist.get_global_rank(self.group, 0), group=self.group
            )
        return _to_device(payload[0], self.device)

    def sleep(self) -> None:
        """Nothing to release: transformers keeps no cache between calls."""

    def close(self) -> None:
        self.model = None


def _to_device(gen: Generation, device) -> Generation:
    return Generation(*(getattr(gen, f).to(device) for f in Generation.__dataclass_fields__))


@register_rollout_engine("vllm")
class VLLMEngine:
    """A colocated vLLM engine that receives the trainer's weights before each rollout."""

    @classmethod
    def build(cls, model, arch: LlamaArch, settings: EngineSettings) -> VLLMEngine:
        param = next(model.parameters())
        return cls(
            arch,
            settings.tokenizer_dir,
            eos_token_id=settings.eos_token_id,
            pad_token_id=settings.pad_token_id,
            dtype=param.dtype,
            device=param.device,
            max_model_len=settings.max_model_len,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            seed=settings.seed,
            transformer_impl=settings.transformer_impl,
        )

    def __init__(
        self,
        arch: LlamaArch,
        tokenizer_dir,
        *,
        eos_token_id: int,
        pad_token_id: int,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        gpu_memory_utilization: float,
        seed: int,
        transformer_impl: str = "local",
    ):
        from megatron_kaja.checkpoint.hf import write_hf_metadata

        self._vllm = require("vllm", "the vllm rollout engine (--rollout-engine vllm)")
        self.arch = arch
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.device = device
        self.transformer_impl = transformer_impl
        _, tp_world, _ = tensor_parallel_group()
        # vLLM reads the architecture and tokenizer from a folder; the weights come from us.
        self._folder = tempfile.mkdtemp(prefix="megatron_kaja_vllm_")
        write_hf_metadata(Path(self._folder), arch, dtype_name(dtype), Path(tokenizer_dir))
        kwargs = {}
        if dist.is_initialized() and dist.get_world_size() > 1:
            missing = [v for v in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
                       if v not in os.environ]  # fmt: skip
            if missing:
                raise RuntimeError(
                    f"--rollout-engine vllm across ranks needs torchrun's {', '.join(missing)}"
                )
            # vLLM joins torchrun's ranks (tensor-parallel groups of consecutive ranks, as
            # megatron's); in-process, so weights and requests are passed without copies.
            kwargs["distributed_executor_backend"] = "external_launcher"
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        self.llm = self._vllm.LLM(
            model=self._folder,
            tokenizer=self._folder,
            load_format="dummy",
            tensor_parallel_size=tp_world,
            dtype=dtype_name(dtype),
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=True,
            enable_prefix_caching=True,
            seed=seed,
            # log-probs of the temperature-scaled distribution, as the training forward has them
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.llm.sleep(level=2)
        self._weights_awake = False
        self._loaded = False

    def load_weights(self, model) -> None:
        """Wake the weights' memory and load the trainer's weights into it, layer by layer."""
        if not self._weights_awake:
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        for group in hf_weight_groups(model, self.arch, self.transformer_impl):
            self.llm.apply_model(lambda module, g=group: module.load_weights(g))
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._loaded = True

    def sampling_params(self, params: SamplingParams, seed: int):
        return self._vllm.SamplingParams(
            n=1,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=seed,
            logprobs=0,  # the sampled token's own log-prob
            stop_token_ids=[self.eos_token_id],
            skip_special_tokens=False,
        )

    def generate(self, prompts, params: SamplingParams, generator=None) -> Generation:
        if not self._loaded:
            raise RuntimeError("the vllm rollout engine has no weights yet: call load_weights")
        self.llm.wake_up(tags=["kv_cache"])
        base = draw_seed(generator)
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        sampling = [self.sampling_params(params, base + i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        responses, logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            responses.append(tokens)
            logprobs.append(
                [position[token].logprob for token, position in
                 zip(tokens, completion.logprobs, strict=True)]
            )  # fmt: skip
        return generation_from_token_lists(
            prompts, responses, logprobs, pad_token_id=self.pad_token_id, device=self.device
        )

    def sleep(self) -> None:
        """Release the weights and the KV cache for the update (they are re-sent next step)."""
        self.llm.sleep(level=2)
        self._weights_awake = False
        self._loaded = False

    def close(self) -> None:
        self.llm = None
        shutil.rmtree(self._folder, ignore_errors=True)


def build_rollout_engine(name: str, model, arch: LlamaArch, settings: EngineSettings):
    """The `--rollout-engine` for this rank; its weights arrive with `load_weights(model)`."""
    if name not in _ENGINES:
        raise ValueError(
            f"unknown rollout engine {name!r} (use one of {', '.join(rollout_engine_names())})"
        )
    return _ENGINES[name].build(model, arch, settings)
