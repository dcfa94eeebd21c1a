"""The megatron-core CPU bridge: device mapping, RNG streams, and a no-op on CUDA machines."""

import pytest
import torch

from megatron_kaja.parallel import cpu_bridge
from tests.helpers import REPO, run_torchrun


@pytest.fixture
def bridge():
    """The plain bridge (strict devices has its own tests), the former state restored after."""
    was_active, was_strict = cpu_bridge.is_active(), cpu_bridge.is_strict()
    cpu_bridge.deactivate()
    assert cpu_bridge.activate(strict=False)
    yield
    cpu_bridge.deactivate()
    if was_active:
        cpu_bridge.activate(strict=was_strict)


def test_cuda_devices_map_to_cpu(bridge):
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(1, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda:0").device.type == "cpu"
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"  # megatron's dtype checks
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # megatron-core's RoPE under context parallelism pins its chunk index on the host.
    pinned = torch.tensor([0, 3], device="cpu", pin_memory=True).cuda(non_blocking=True)
    assert pinned.tolist() == [0, 3]
    torch.cuda.synchronize()


def test_cuda_generator_is_a_cpu_generator(bridge):
    # GRPO's per-completion generators live on compute_device(), "cuda" under the bridge.
    generator = torch.Generator(device="cuda").manual_seed(5)
    expected = torch.rand(3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(3, generator=generator, device="cuda"), expected)
    assert isinstance(torch.Generator(), torch.Generator)


def test_rng_tracker_streams_are_reproducible_and_isolated(bridge):
    from megatron.core.tensor_parallel import random as mpu_random

    tracker = mpu_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    torch.manual_seed(0)
    with tracker.fork():
        first = torch.rand(4)
    outside = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(4), outside)  # forking left the default stream untouched
    tracker.reset()
    tracker.add("model-parallel-rng", 123)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)
    with pytest.raises(ValueError):
        tracker.add("other", 123)  # seeds must be distinct


def test_deactivate_restores_torch_cuda(bridge):
    cpu_bridge.deactivate()
    assert not cpu_bridge.is_active()
    with pytest.raises((RuntimeError, AssertionError)):
        torch.empty(1, device="cuda")
    assert cpu_bridge.activate()


def test_noop_when_cuda_is_available(monkeypatch):
    if cpu_bridge.is_active():
        cpu_bridge.deactivate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = torch.cuda.current_device
    assert cpu_bridge.activate() is False
    assert not cpu_bridge.is_active()
    assert torch.cuda.current_device is original


@pytest.mark.slow
def test_tp_dropout_recompute_optimizer_and_dist_checkpoint(tmp_path):
    """TP=2 under torchrun: dropout + activation recompute replay the same masks, the megatron
    optimizer steps, and a dist checkpoint saved at TP=2 reloads bitwise."""
    out = run_torchrun(REPO / "tests" / "parallel" / "bridge_worker.py", 2, str(tmp_path))
    assert "bridge worker ok" in out
