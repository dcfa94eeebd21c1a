"""Untrusted checkpoint files: a planted pickle is refused by every entry point with one clear
line and runs nothing; corrupt trackers and safetensors files are named before converting."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf
from tests.helpers import REPO


class Payload:
    """Unpickling this runs `open(marker, "w")`: a stand-in for any code an attacker picks."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _load_only(path):
    """The settings `resolve_model_source` reads, for a run that only names --load."""
    return SimpleNamespace(load=path, save=None, auto_resume=True, overwrite=False)


@pytest.fixture(scope="module")
def clean_run(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "mc"
    hf_to_mcore(tiny_hf_dir, out, progress=False)
    return out


def _planted(clean_run, tmp_path, which: str):
    """A copy of `clean_run` whose `.metadata` or `common.pt` runs code when unpickled."""
    bad = tmp_path / f"bad_{which.strip('.').replace('.', '_')}"
    shutil.copytree(clean_run, bad)
    marker = tmp_path / f"executed_{which.strip('.')}"
    target = bad / "iter_0000000" / which
    if which == ".metadata":
        target.write_bytes(pickle.dumps(Payload(marker)))
    else:
        torch.save({"args": Payload(marker), "iteration": 0}, target)
    return bad, marker


def _run(args, **kwargs):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=600, **kwargs
    )


def _assert_refused(proc, marker, name):
    assert proc.returncode == 2, (name, proc.returncode, proc.stderr[-2000:])
    assert "refused to load" in proc.stderr, (name, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    assert not marker.exists(), f"{name} executed the planted pickle"


@pytest.mark.slow
@pytest.mark.parametrize("which", [".metadata", "common.pt"])
def test_every_entry_point_refuses_a_planted_pickle(
    clean_run, tiny_hf_dir, tmp_path, which, megatron_world
):
    bad, marker = _planted(clean_run, tmp_path, which)
    proc = _run(["tools/convert_checkpoint.py", "mcore-to-hf", "--mcore-dir", str(bad),
                 "--out", str(tmp_path / "hf")])  # fmt: skip
    _assert_refused(proc, marker, "convert_checkpoint.py mcore-to-hf")
    assert not (tmp_path / "hf").exists()

    proc = _run(["tools/merge_models.py", "--method", "linear", "--models", str(tiny_hf_dir),
                 str(bad), "--weights", "0.5", "0.5", "--out", str(tmp_path / "merged"),
                 "--no-progress"])  # fmt: skip
    _assert_refused(proc, marker, "merge_models.py")

    data = tmp_path / "sft.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    proc = _run(["pretrain_sft.py", "--tokenizer", str(tiny_hf_dir), "--train-data", str(data),
                 "--load", str(bad), "--dry-run", "--world-size", "1"])  # fmt: skip
    _assert_refused(proc, marker, "pretrain_sft.py --dry-run")

    proc = _run(["-m", "megatron_kaja.checkpoint.verify", "--hf", str(tiny_hf_dir),
                 "--mcore", str(bad)])  # fmt: skip
    _assert_refused(proc, marker, "checkpoint.verify")

    # The trainers' --load (pretrain_sft.py, train_grpo.py), and the weights loader they use
    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.models.llama.config import LlamaArch
    from megatron_kaja.models.llama.model import build_gpt_model
    from megatron_kaja.training.config import ConfigError
    from megatron_kaja.training.loop import resolve_model_source

    with pytest.raises(ConfigError, match="refused to load"):
        resolve_model_source(_load_only(bad), "sft")
    with pytest.raises(CheckpointError, match="refused to load"):
        load_mcore_weights(build_gpt_model(LlamaArch.from_hf_config(tiny_hf_dir)), bad)
    assert not marker.exists()


def test_a_planted_byte_item_is_refused(clean_run, tmp_path, megatron_world):
    """Byte items inside .distcp files (RNG state, _extra_state) are unpickled by torch's DCP
    with weights_only=False: they are vetted first too."""
    from megatron_kaja.checkpoint.safe_load import load_dcp_metadata, vet_torch_dist

    bad = tmp_path / "bad"
    shutil.copytree(clean_run, bad)
    ckpt = bad / "iter_0000000"
    metadata = load_dcp_metadata(ckpt)
    info = next(s for i, s in metadata.storage_data.items() if "_extra_state" in i.fqn)
    buffer = io.BytesIO()
    torch.save(Payload(tmp_path / "marker"), buffer)
    payload = buffer.getvalue()
    # Point the item at the payload, appended to its data file.
    path = ckpt / info.relative_path
    offset = path.stat().st_size
    with open(path, "ab") as f:
        f.write(payload)
    info.offset, info.length = offset, len(payload)
    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match="refused to load"):
        vet_torch_dist(ckpt)
    with pytest.raises(CheckpointError, match="refused to load"):
        mcore_to_hf(bad, tmp_path / "hf", progress=False)
    assert not (tmp_path / "marker").exists()


def test_corrupt_tracker_is_named(clean_run, tmp_path, tiny_hf_dir):
    from megatron_kaja.training.config import ConfigError
    from megatron_kaja.training.loop import resolve_model_source

    bad = tmp_path / "bad"
    shutil.copytree(clean_run, bad)
    (bad / "latest_checkpointed_iteration.txt").write_text("12\x00\x00garbage")
    match = r"latest_checkpointed_iteration.txt is corrupt: it holds '12\\x00\\x00garbage'"
    with pytest.raises(CheckpointError, match=match):
        mcore_to_hf(bad, tmp_path / "hf", progress=False)
    with pytest.raises(ConfigError, match=match):
        resolve_model_source(_load_only(bad), "sft")
    (bad / "latest_checkpointed_iteration.txt").write_text("5")
    with pytest.raises(CheckpointError, match="names iter_0000005, which is missing"):
        mcore_to_hf(bad, tmp_path / "hf", progress=False)


def _last_shard(hf_dir):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    return hf_dir / sorted(set(index["weight_map"].values()))[-1]


def test_truncated_or_corrupt_safetensors_is_named_before_converting(
    tiny_hf_dir, tmp_path, monkeypatch
):
    from megatron_kaja.checkpoint import convert

    def must_not_run(*args, **kwargs):
        raise AssertionError("conversion started on a broken input")

    monkeypatch.setattr(convert, "write_torch_dist", must_not_run)
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_hf_dir, truncated)
    shard = _last_shard(truncated)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: truncated: its header places"):
        hf_to_mcore(truncated, tmp_path / "o1", progress=False)

    short_header = tmp_path / "short_header"
    shutil.copytree(tiny_hf_dir, short_header)
    shard = _last_shard(short_header)
    shard.write_bytes(shard.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated or corrupt safetensors header"):
        hf_to_mcore(short_header, tmp_path / "o2", progress=False)

    garbled = tmp_path / "garbled"
    shutil.copytree(tiny_hf_dir, garbled)
    shard = _last_shard(garbled)
    raw = shard.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    name = next(k for k in header if k != "__metadata__")
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "F16"  # same length: the header's size stays, its sums do not
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    shard.write_bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :])
    with pytest.raises(CheckpointError, match=f"corrupt safetensors header: tensor {name} spans"):
        hf_to_mcore(garbled, tmp_path / "o3", progress=False)
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_safe_loads_keep_megatron_cores_allowlist(tmp_path):
    """A safe load leaves torch's allowlist as it found it: megatron-core registers its classes
    at import, and its own common-state loads need them afterwards."""
    import argparse

    import megatron.core  # noqa: F401  (registers megatron-core's safe globals)

    from megatron_kaja.checkpoint.safe_load import torch_load_safe

    before = torch.serialization.get_safe_globals()
    assert argparse.Namespace in before
    path = tmp_path / "common.pt"
    torch.save({"args": argparse.Namespace(num_layers=2)}, path)
    assert torch_load_safe(path, str(path))["args"].num_layers == 2
    assert torch.serialization.get_safe_globals() == before
