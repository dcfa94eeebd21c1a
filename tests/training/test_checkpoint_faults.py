"""A checkpoint save that fails (a full disk): the error names the cause, the folder and the
checkpoint still intact; the next start removes the unfinished temporary folder."""

from __future__ import annotations

import errno

import pytest

from megatron_kaja.training import checkpointing


def _save(stack, arch, root, iteration):
    return checkpointing.save_checkpoint(
        root, iteration, stack, arch=arch, sampler_state={}, config={}, run_kind="sft"
    )


def test_disk_full_names_the_path_keeps_the_previous_and_is_cleaned(
    megatron_world, tiny_hf_dir, tmp_path, monkeypatch
):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.training.setup import build_training_stack

    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    stack = build_training_stack(arch, lr=1e-3, min_lr=0.0, train_iters=4)
    root = tmp_path / "run"
    _save(stack, arch, root, 2)

    def full_disk(*args, **kwargs):  # runs in megatron-core's forked writer process
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)
    with pytest.raises(checkpointing.CheckpointSaveError) as failure:
        _save(stack, arch, root, 4)
    message = str(failure.value)
    assert message.startswith(
        f"saving iteration 4 to {root}/.iter_0000004.tmp failed: no space left on device ("
    )
    assert f"the previous checkpoint {root}/iter_0000002 is intact" in message
    assert checkpointing.latest_iteration(root) == 2
    assert (root / ".iter_0000004.tmp").is_dir()

    assert checkpointing.remove_stale_temporaries(root) == [root / ".iter_0000004.tmp"]
    assert sorted(p.name for p in root.iterdir()) == [
        "iter_0000002",
        "latest_checkpointed_iteration.txt",
    ]


def test_a_failed_save_ends_the_run_with_exit_1_and_its_message(monkeypatch, caplog):
    """The trainers' entry point turns a failed save into one line and exit code 1 (not a
    traceback on every rank)."""
    from types import SimpleNamespace

    from megatron_kaja.training import loop
    from megatron_kaja.training.sft import SFTTrainer

    message = "saving iteration 4 to run/.iter_0000004.tmp failed: no space left on device"

    def fail(cfg, trainer):
        raise checkpointing.CheckpointSaveError(message)

    monkeypatch.setattr(loop, "load_config", lambda argv, settings: SimpleNamespace(dry_run=False))
    monkeypatch.setattr(loop, "run_training", fail)
    assert loop.main(SFTTrainer(), []) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [message]
