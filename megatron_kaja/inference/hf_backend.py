"""`hf` backend: in-process transformers, the CPU default (tests, the demo, small judges).

Free generation is batched `model.generate` (greedy at temperature 0, sampling otherwise).
A request with `choices` is not generated at all: each choice is scored under the model,
log p(choice | prompt), and the likeliest is the answer. For single-token choices (the
judge's "1".."5") that is one forward pass and a read of the next-token distribution
straight from the logits - the exact quantity vLLM's `top_logprobs` approximates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from tqdm import tqdm

from megatron_kaja.extras import require
from megatron_kaja.inference.registry import register_backend
from megatron_kaja.inference.types import GenerationRequest, GenerationResult


@dataclass
class HFBackendConfig:
    """Settings of the `hf` backend. `model` is a local HF directory (or hub id)."""

    model: str
    tokenizer: str | None = None
    device: str | None = None  # None: `compute_device()` (the local GPU if there is one)
    dtype: str = "auto"
    batch_size: int = 8
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("hf backend: model (a local HF checkpoint directory) is required")
        if self.batch_size < 1:
            raise ValueError(f"hf backend: batch_size must be >= 1, got {self.batch_size}")


def _is_awq_checkpoint(model: str) -> bool:
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "awq"


@register_backend("hf")
class HFBackend:
    """Generation and choice scoring with a transformers causal LM."""

    name = "hf"

    def __init__(self, config: HFBackendConfig | None = None, **kwargs) -> None:
        self.config = config or HFBackendConfig(**kwargs)
        self.model = None
        self.tokenizer = None
        self.device = None

    def _load(self) -> None:
        if self.model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from megatron_kaja.parallel.distributed import compute_device

        cfg = self.config
        if _is_awq_checkpoint(cfg.model):
            # transformers reads AWQ checkpoints through autoawq's kernels.
            require("awq", f"the AWQ-quantized checkpoint {cfg.model}")
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"hf backend: the tokenizer of {cfg.model} has no chat template")
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.device = torch.device(cfg.device) if cfg.device else compute_device()
        self.model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(self.device)
        self.model.eval()

    def check(self) -> None:
        """Load the model and tokenizer (a missing path fails here, before any work)."""
        model = self.config.model
        # Hub ids ("org/name") are resolved by transformers; a filesystem path must exist.
        if (Path(model).is_absolute() or model.startswith(".")) and not Path(model).exists():
            raise FileNotFoundError(f"hf backend: model directory {model} not found")
        self._load()

    def close(self) -> None:
        self.model = None
        self.tokenizer = None

    def prompt_ids(self, messages) -> list[int]:
        """Token ids of the chat-rendered prompt. The template writes BOS itself, so the text
        is encoded without special tokens (else llm-jp tokenizers add a second BOS)."""
        self._load()
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _continuation_ids(self, messages, prompt: list[int], choice: str) -> list[int]:
        """Ids the model would emit for `choice` right after the prompt. Encoding prompt+choice
        together keeps the tokenizer's merges at the boundary honest."""
        text = self.tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=True
        )
        full = self.tokenizer(text + choice, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] == prompt and len(full) > len(prompt):
            return full[len(prompt) :]
        return self.tokenizer(choice, add_special_tokens=False)["input_ids"]

    def _left_padded(self, seqs: list[list[int]]):
        import torch

        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _top(self, logprobs, k: int) -> dict[str, float]:
        values, ids = logprobs.topk(k)
        return {
            self.tokenizer.decode([i]): v
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        }

    def _score_choices(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        prompts = [self.prompt_ids(r.messages) for r in reqs]
        conts = [
            [self._continuation_ids(r.messages, p, c) for c in r.choices]
            for r, p in zip(reqs, prompts, strict=True)
        ]
        results: list[GenerationResult | None] = [None] * len(reqs)
        single = [i for i, cs in enumerate(conts) if all(len(c) == 1 for c in cs)]
        with torch.no_grad():
            # Single-token choices: one batched forward, read the last position's distribution.
            for start in range(0, len(single), self.config.batch_size):
                batch = single[start : start + self.config.batch_size]
                ids, mask = self._left_padded([prompts[i] for i in batch])
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
                for row, i in enumerate(batch):
                    lp = torch.log_softmax(logits[row], dim=-1)
                    scored = [lp[c[0]].item() for c in conts[i]]
                    results[i] = self._choice_result(reqs[i], prompts[i], conts[i], scored, lp)
            # Multi-token choices: teacher-force every choice, sum its tokens' log-probs.
            for i in (i for i in range(len(reqs)) if results[i] is None):
                seqs = [prompts[i] + c for c in conts[i]]
                width = max(len(s) for s in seqs)
                ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=self.device)
                lp_all = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)
                n = len(prompts[i])
                scored = [
                    sum(lp_all[j, n - 1 + t, tok].item() for t, tok in enumerate(c))
                    for j, c in enumerate(conts[i])
                ]
                results[i] = self._choice_result(
                    reqs[i], prompts[i], conts[i], scored, lp_all[0, n - 1]
                )
        return results  # type: ignore[return-value]

    def _choice_result(self, req, prompt, conts, scored, first_lp) -> GenerationResult:
        best = max(range(len(scored)), key=scored.__getitem__)
        return GenerationResult(
            text=req.choices[best],
            finish_reason="stop",
            prompt_tokens=len(prompt),
            completion_tokens=len(conts[best]),
            top_logprobs=[self._top(first_lp, req.top_logprobs)] if req.top_logprobs else None,
            choice_logprobs=dict(zip(req.choices, scored, strict=True)),
        )

    def _generate_batch(self, reqs: list[GenerationRequest]) -> list[GenerationResult]:
        import torch

        first = reqs[0]
        prompts = [self.prompt_ids(r.messages) for r in reqs]
        ids, mask = self._left_padded(prompts)
        torch.manual_seed(first.seed if first.seed is not None else self.config.seed)
        sample = first.temperature > 0
        want_top = any(r.top_logprobs for r in reqs)
        kwargs = {"temperature": first.temperature, "top_p": first.top_p} if sample else {}
        if first.stop:
            kwargs.update(stop_strings=list(first.stop), tokenizer=self.tokenizer)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=first.max_tokens,
                do_sample=sample,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_logits=want_top,
                **kwargs,
            )
        new = out.sequences[:, ids.shape[1] :].tolist()
        results = []
        for row, (req, prompt) in enumerate(zip(reqs, prompts, strict=True)):
            tokens = new[row]
            eos = self.tokenizer.eos_token_id
            n = tokens.index(eos) + 1 if eos in tokens else len(tokens)
            text = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
            stopped = eos in tokens
            for s in req.stop:
                if s in text:
                    text, stopped = text[: text.index(s)], True
            top = None
            if req.top_logprobs:
                top = [
                    self._top(torch.log_softmax(out.logits[t][row].float(), -1), req.top_logprobs)
                    for t in range(n)
                ]
            results.append(
                GenerationResult(
                    text=text,
                    finish_reason="stop" if stopped else "length",
                    prompt_tokens=len(prompt),
                    completion_tokens=n,
                    top_logprobs=top,
                )
            )
        return results

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run `requests` in order; free generations are batched by identical settings."""
        self._load()
        requests = list(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        choice_idx = [i for i, r in enumerate(requests) if r.choices is not None]
        if choice_idx:
            for i, res in zip(
                choice_idx, self._score_choices([requests[i] for i in choice_idx]), strict=True
            ):
                results[i] = res

        def settings(i: int):
            r = requests[i]
            return (r.max_tokens, r.temperature, r.top_p, -1 if r.seed is None else r.seed, r.stop)

        free = sorted((i for i, r in enumerate(requests) if r.choices is None), key=settings)
        bar = tqdm(total=len(free), desc="hf generate", disable=not self.config.progress)
        for _, group in groupby(free, key=settings):
            group = list(group)
            for start in range(0, len(group), self.config.batch_size):
                batch = group[start : start + self.config.batch_size]
                for i, res in zip(
                    batch, self._generate_batch([requests[i] for i in batch]), strict=True
                ):
                    results[i] = res
                bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]
