"""The tiny model converted for in-process megatron-core (megatron_world: tests/conftest)."""

from __future__ import annotations

import pytest

from megatron_kaja.checkpoint.convert import hf_to_mcore


@pytest.fixture(scope="session")
def tiny_mcore_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "mcore"
    hf_to_mcore(tiny_hf_dir, out, progress=False)
    return out


@pytest.fixture
def tiny_policy(megatron_world, tiny_hf_dir, tiny_mcore_dir):
    """A fresh GPTModel with the tiny checkpoint's weights, and its architecture."""
    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.models.llama.model import build_gpt_model

    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    model = build_gpt_model(arch)
    load_mcore_weights(model, tiny_mcore_dir)
    return model, arch
