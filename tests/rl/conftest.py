"""In-process megatron-core (a world of one, TP=1) and the tiny model converted for it."""

from __future__ import annotations

import pytest

from megatron_kaja.checkpoint.convert import hf_to_mcore


@pytest.fixture(scope="session")
def tiny_mcore_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rl") / "mcore"
    hf_to_mcore(tiny_hf_dir, out, progress=False)
    return out


@pytest.fixture(scope="session")
def megatron_world():
    """megatron's parallel state for one process (gloo on CPU), torn down at the end."""
    from megatron.core import parallel_state

    from megatron_kaja.parallel.distributed import destroy_model_parallel, initialize_model_parallel

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    initialize_model_parallel(1, 1, seed=1234)
    yield
    destroy_model_parallel()


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
