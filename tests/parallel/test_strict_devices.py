"""Strict devices: the CPU bridge raises where a GPU run would fail, and nowhere else.

Each rule has a minimal reproduction of a bug a GPU run would hit; the project's own code for
the same step passes."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

from megatron_kaja.parallel import cpu_bridge
from megatron_kaja.parallel.cpu_bridge import StrictDeviceError, home_of
from megatron_kaja.parallel.distributed import compute_device


@pytest.fixture(scope="module")
def strict(megatron_world):
    """The bridge in strict devices mode for this module, restored to its former mode after."""
    was_strict = cpu_bridge.is_strict()
    cpu_bridge.deactivate()
    assert cpu_bridge.activate(strict=True) and cpu_bridge.is_strict()
    yield
    cpu_bridge.deactivate()
    cpu_bridge.activate(strict=was_strict)


def host_tensors(tmp_path):
    """A host tensor from each origin a GPU run leaves on the host."""
    torch.save(torch.zeros(2), tmp_path / "t.pt")
    return {
        "factory without a device": torch.zeros(2),
        "torch.tensor(values)": torch.tensor([0.0, 0.0]),
        "torch.from_numpy": torch.from_numpy(np.zeros(2, dtype=np.float32)),
        ".cpu()": torch.zeros(2, device=compute_device()).cpu(),
        "torch.load": torch.load(tmp_path / "t.pt"),
    }


def test_marks_follow_factories_moves_and_ops(strict):
    host, device = torch.zeros(3), torch.zeros(3, device="cuda")
    assert (home_of(host), home_of(device)) == ("host", "device")
    assert device.device == torch.device("cuda", 0)  # so `device=x.device` follows x
    assert home_of(torch.ones(2, device=device.device)) == "device"
    assert home_of(device * 2 + torch.tensor(1.0)) == "device"  # host 0-dim is fine
    assert home_of(host.to(compute_device())) == "device" and home_of(host) == "host"
    assert home_of(device.to("cpu")) == "host" and home_of(device) == "device"
    module = torch.nn.Linear(2, 2).to(compute_device())
    assert home_of(module.weight) == "device"
    module(torch.ones(1, 2, device="cuda")).sum().backward()
    assert home_of(module.weight.grad) == "device"


HOST_ORIGINS = ["factory without a device", "torch.tensor(values)", "torch.from_numpy", ".cpu()"]


@pytest.mark.parametrize("origin", [*HOST_ORIGINS, "torch.load"])
def test_host_tensor_in_nccl_collective_raises(strict, tmp_path, origin):
    """`training/control.py`'s SIGTERM flag and `training/sft.py`'s loss totals were host
    tensors all-reduced on groups that are NCCL on a GPU."""
    from megatron.core import parallel_state as ps

    tensor = host_tensors(tmp_path)[origin]
    with pytest.raises(StrictDeviceError, match=r"all_reduce.*test_strict_devices.py:\d+"):
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    with pytest.raises(StrictDeviceError, match="broadcast"):
        dist.broadcast(tensor, src=0, group=ps.get_data_parallel_group())
    with pytest.raises(StrictDeviceError, match="all_gather"):
        dist.all_gather([torch.empty_like(tensor)], tensor.to(compute_device()))
    device = torch.zeros(2, device=compute_device())
    dist.all_reduce(device, group=ps.get_pipeline_model_parallel_group())


def test_gloo_groups_and_unknown_tensors_do_not_raise(strict):
    gloo = dist.new_group(ranks=[0], backend="gloo")
    dist.all_reduce(torch.zeros(2), group=gloo)  # megatron's gloo groups take host tensors
    cpu_bridge.deactivate()
    unknown = torch.zeros(2)  # made where the bridge did not see it
    cpu_bridge.activate(strict=True)
    assert home_of(unknown) is None
    dist.all_reduce(unknown)
    assert home_of(unknown + torch.zeros(2, device="cuda")) == "device"


def test_run_control_and_sft_totals_use_the_device(strict):
    from megatron_kaja.training.control import RunControl

    control = RunControl(
        train_iters=2, save=None, save_interval=None, exit_interval=None, handle_sigterm=False
    )
    assert control.after_step(1) is False and control.after_step(2) is True


def test_generator_of_another_device_raises(strict):
    """`rl/sampler.py` drew with a CPU generator (made in `rl/trainer.py`) for device scores."""
    scores = torch.zeros(2, 5, device=compute_device())
    with pytest.raises(StrictDeviceError, match="host generator draws for a device tensor"):
        torch.rand((2, 5), generator=torch.Generator().manual_seed(0), device=scores.device)
    device_generator = torch.Generator(device=compute_device()).manual_seed(0)
    assert device_generator.device.type == "cuda"
    assert home_of(torch.rand((2, 5), generator=device_generator, device=scores.device)) == "device"
    with pytest.raises(StrictDeviceError, match="device generator draws for a host tensor"):
        torch.randint(0, 9, (1,), generator=device_generator)
    with pytest.raises(StrictDeviceError, match="host generator"):
        torch.multinomial(scores.softmax(-1), 1, generator=torch.Generator())


def test_sampler_draws_with_a_device_generator(strict):
    from megatron_kaja.rl.sampler import SamplingParams, sample_next_token

    logits = torch.randn(2, 7, device=compute_device())
    params = SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.9)
    generator = torch.Generator(device=compute_device()).manual_seed(0)
    ids, logprobs = sample_next_token(logits, params, vocab_size=7, generator=generator)
    assert home_of(ids) == "device" and home_of(logprobs) == "device"
    with pytest.raises(StrictDeviceError, match="generator"):
        sample_next_token(logits, params, vocab_size=7, generator=torch.Generator().manual_seed(0))


def test_host_device_mix_raises_but_copies_and_indexing_do_not(strict):
    """`training/sft.py` fed host batches to a device model on a machine without CUDA."""
    device = torch.zeros(4, device=compute_device())
    with pytest.raises(StrictDeviceError, match="mixes a host tensor with a device tensor"):
        device + torch.ones(4)
    with pytest.raises(StrictDeviceError, match="mixes"):
        torch.cat([device, torch.ones(4)])
    embedding = torch.nn.Embedding(8, 2).to(compute_device())
    with pytest.raises(StrictDeviceError, match="embedding"):
        embedding(torch.tensor([[1, 2]]))
    device.copy_(torch.ones(4))
    device[torch.tensor([0, 1])] = 2.0
    assert device[torch.tensor([True, False, True, False])].sum().item() == 3.0
    assert home_of(device * torch.tensor(2.0)) == "device"


def test_numpy_of_device_tensor_and_host_grad_raise(strict):
    device = torch.zeros(2, device=compute_device())
    with pytest.raises(StrictDeviceError, match="numpy"):
        device.numpy()
    with pytest.raises(StrictDeviceError, match="pin_memory"):
        device.pin_memory()
    assert device.cpu().numpy().shape == (2,)
    param = torch.nn.Parameter(torch.zeros(2, device=compute_device()))
    with pytest.raises(StrictDeviceError, match="grad"):
        param.grad = torch.ones(2)


def test_off_unless_asked(monkeypatch):
    monkeypatch.delenv(cpu_bridge.STRICT_DEVICES_ENV, raising=False)
    assert not cpu_bridge.strict_devices_requested()
    monkeypatch.setenv(cpu_bridge.STRICT_DEVICES_ENV, "1")
    assert cpu_bridge.strict_devices_requested()


NCCL_HOST_TENSOR = """
import torch, torch.distributed as dist
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29531", rank=0, world_size=1)
torch.cuda.set_device(0)
dist.all_reduce(torch.zeros(2, device="cuda"))
try:
    dist.all_reduce(torch.zeros(2))
except Exception as exc:
    print("refused:", type(exc).__name__)
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_the_rules_are_what_cuda_and_nccl_enforce():
    """On a GPU the same mistakes fail in torch itself (strict devices is not stricter), and
    what it allows runs."""
    import subprocess
    import sys

    device = torch.device("cuda")
    with pytest.raises(RuntimeError):
        torch.zeros(2, device=device) + torch.ones(2)
    with pytest.raises(RuntimeError):
        torch.rand(2, generator=torch.Generator(), device=device)
    with pytest.raises(RuntimeError):
        torch.randint(0, 9, (1,), generator=torch.Generator(device=device))
    with pytest.raises(TypeError):
        torch.zeros(2, device=device).numpy()
    allowed = torch.zeros(4, device=device) + torch.tensor(1.0)
    allowed[torch.tensor([0, 1])] = 2.0
    allowed.copy_(torch.ones(4))
    proc = subprocess.run(
        [sys.executable, "-c", NCCL_HOST_TENSOR], capture_output=True, text=True, timeout=120
    )
    assert "refused:" in proc.stdout, proc.stdout + proc.stderr[-2000:]
