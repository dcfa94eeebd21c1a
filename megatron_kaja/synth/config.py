"""Settings of a synthetic-data run (`tools/generate_sft_data.py --help` shows them as flags)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

from megatron_kaja.inference import backend_names
from megatron_kaja.synth.quality import QualityConfig
from megatron_kaja.synth.templates import KINDS, TemplatePair


@dataclass(frozen=True)
class SeedFile:
    """A seed-question file and the template pair its samples use (`safety` / `helpful`)."""

    path: str
    kind: str

    @classmethod
    def parse(cls, spec: str) -> SeedFile:
        """`ac.jsonl:safety` -> SeedFile("ac.jsonl", "safety")."""
        path, sep, kind = spec.rpartition(":")
        if not sep or not path or kind not in KINDS:
            raise ValueError(f"--seeds takes PATH:KIND with KIND in {KINDS}, got {spec!r}")
        return cls(path, kind)


@dataclass
class SynthConfig:
    """One generation run. Exactly one of `samples_per_seed` / `target_count` is set.

    `target_count` runs rounds over all seeds (sample 0 of every seed, then sample 1, ...)
    until that many pairs are accepted, or `max_samples_per_seed` rounds have been made
    (default: 10 x the rounds the target needs if nothing were rejected).
    """

    seeds: list[SeedFile]
    out: str
    model: str
    samples_per_seed: int | None = None
    target_count: int | None = None
    max_samples_per_seed: int | None = None
    backend: str = "openai"
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = 64
    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0
    max_attempts: int = 5
    timeout_s: float = 300.0  # per network read
    request_timeout_s: float = 600.0  # per request, all attempts included
    templates: dict[str, str] = field(default_factory=dict)  # kind -> YAML file
    decontaminate: list[str] = field(default_factory=list)  # evaluation JSONL files
    decontaminate_ngram: int = 8
    decontaminate_threshold: float = 0.5
    near_duplicate_threshold: float = 0.8
    quality: QualityConfig = field(default_factory=QualityConfig)
    progress: bool = True
    summary_interval_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("--seeds: give at least one PATH:KIND")
        if (self.samples_per_seed is None) == (self.target_count is None):
            raise ValueError("give exactly one of --samples-per-seed and --target-count")
        for name in ("samples_per_seed", "target_count", "max_samples_per_seed"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.backend not in backend_names():
            raise ValueError(f"--backend must be one of {backend_names()}, got {self.backend!r}")
        if not self.model:
            raise ValueError("--model is required (served model name, or a checkpoint path)")
        if self.backend == "openai" and not self.base_url:
            raise ValueError("--base-url is required with --backend openai")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("--timeout and --request-timeout must be > 0 seconds")
        if self.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("--temperature must be >= 0 and --top-p in (0, 1]")
        if self.api_key_env and self.api_key_env not in os.environ:
            raise ValueError(f"--api-key-env: environment variable {self.api_key_env} is not set")

    @property
    def api_key(self) -> str:
        # vllm serve accepts any key unless started with --api-key.
        return os.environ[self.api_key_env] if self.api_key_env else "EMPTY"

    def generation_fingerprint(self, pair: TemplatePair) -> str:
        """Everything that decides what the teacher writes for a sample, hashed: part of
        each sample's id, so that a rerun with other settings never skips new work."""
        settings = [
            self.model,
            self.temperature,
            self.top_p,
            self.max_tokens,
            self.seed,
            pair.question,
            pair.answer,
        ]
        return hashlib.sha256(json.dumps(settings, ensure_ascii=False).encode()).hexdigest()
