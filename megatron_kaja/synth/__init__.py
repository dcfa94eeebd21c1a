"""Synthetic SFT data with a teacher LLM (the seed's step 1): from seed questions, the
teacher writes a similar question (`Q:`) and answers it (`A:`); outputs are checked,
deduplicated, kept apart from evaluation questions, and appended to a resumable JSONL.

    summary = run_synthesis(SynthConfig(seeds=[SeedFile("ac.jsonl", "safety")], out="sft.jsonl",
                                        model="calm3-22b-chat", base_url="http://host:8000/v1",
                                        samples_per_seed=4))
"""

from megatron_kaja.synth.config import SeedFile, SynthConfig
from megatron_kaja.synth.dedup import EvalOverlapIndex, QuestionDeduplicator, normalize_text
from megatron_kaja.synth.pipeline import SynthRun, run_synthesis
from megatron_kaja.synth.quality import (
    REJECTION_REASONS,
    QualityConfig,
    check_answer,
    check_question,
)
from megatron_kaja.synth.store import SynthStore, sidecar_paths
from megatron_kaja.synth.templates import TemplatePair, load_template_pair, load_templates

__all__ = [
    "REJECTION_REASONS",
    "EvalOverlapIndex",
    "QualityConfig",
    "QuestionDeduplicator",
    "SeedFile",
    "SynthConfig",
    "SynthRun",
    "SynthStore",
    "TemplatePair",
    "check_answer",
    "check_question",
    "load_template_pair",
    "load_templates",
    "normalize_text",
    "run_synthesis",
    "sidecar_paths",
]
