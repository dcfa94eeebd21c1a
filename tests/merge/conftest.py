"""Tiny llm-jp-shaped models to merge: the session's `tiny_hf_dir` as the base and two
more models of the same shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_kaja.tiny import build_tiny_hf_model


@pytest.fixture(scope="session")
def merge_models(tmp_path_factory, tiny_hf_dir, tiny_tokenizer_dir) -> dict[str, Path]:
    """base (the session's tiny MHA model) and `a`, `b`: same shape, other seeds."""
    root = tmp_path_factory.mktemp("merge_inputs")
    models = {"base": Path(tiny_hf_dir)}
    for name, seed in (("a", 11), ("b", 12)):
        build_tiny_hf_model(root / name, "mha", seed=seed, tokenizer_dir=tiny_tokenizer_dir)
        models[name] = root / name
    return models
