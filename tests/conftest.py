"""Shared tiny fixtures, built once per test session (see megatron_kaja/tiny.py)."""

from __future__ import annotations

import os

# The suite runs the CPU bridge in strict devices mode (raise where a GPU run would fail).
# Set before any test imports the bridge; torchrun workers inherit it through the
# environment. `MEGATRON_KAJA_STRICT_DEVICES=0 python -m pytest` runs without it.
os.environ.setdefault("MEGATRON_KAJA_STRICT_DEVICES", "1")

import pytest
import torch

from megatron_kaja.extras import KNOWN_HARMLESS_WARNINGS
from megatron_kaja.tiny import build_tiny_hf_model, build_tiny_tokenizer


def pytest_configure(config):
    # The same third-party warnings the package filters at import (pytest restores the
    # filters after collection, so they must be pytest's own as well).
    for message, category in KNOWN_HARMLESS_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny MHA llm-jp-3-shaped HF checkpoint (like 13b), with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny_hf_mha")
    build_tiny_hf_model(path, "mha", seed=0, tokenizer_dir=tiny_tokenizer_dir)
    return path


@pytest.fixture(scope="session")
def tiny_hf_gqa_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny GQA llm-jp-3-shaped HF checkpoint (like 172b), with the tiny tokenizer."""
    path = tmp_path_factory.mktemp("tiny_hf_gqa")
    build_tiny_hf_model(path, "gqa", seed=1, tokenizer_dir=tiny_tokenizer_dir)
    return path


@pytest.fixture(scope="module")
def megatron_world():
    """megatron's parallel state for this process (a world of one, TP=1), torn down after the
    module (kept when a module's own setup already made one)."""
    from megatron.core import parallel_state

    from megatron_kaja.parallel.distributed import destroy_model_parallel, initialize_model_parallel

    if parallel_state.model_parallel_is_initialized():
        yield
        return
    initialize_model_parallel(1, 1, seed=1234)
    yield
    destroy_model_parallel()
