"""Converter: bitwise round trips and one clear error per kind of bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf
from megatron_kaja.checkpoint.hf import CheckpointError, HFCheckpointReader
from megatron_kaja.models.llama.config import ArchitectureError
from tests.helpers import REPO


def assert_same_tensors(dir_a, dir_b):
    a, b = HFCheckpointReader(dir_a), HFCheckpointReader(dir_b)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in sorted(a.keys()):
        ta, tb = a.get(key), b.get(key)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), key


@pytest.mark.parametrize("fmt", ["torch_dist", "legacy"])
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_round_trip_tp2_pp2_is_bitwise(tiny_hf_gqa_dir, tmp_path, fmt, impl):
    mc, back = tmp_path / "mc", tmp_path / "hf"
    meta = hf_to_mcore(
        tiny_hf_gqa_dir,
        mc,
        fmt=fmt,
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        transformer_impl=impl,
        progress=False,
    )
    assert meta.padded_vocab_size == 512  # 509 padded to a multiple of 128 x TP
    mcore_to_hf(mc, back, hf_template=tiny_hf_gqa_dir, max_shard_size="100KB", progress=False)
    assert_same_tensors(tiny_hf_gqa_dir, back)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert (back / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(back)
    assert model.config.vocab_size == 509  # padding removed


def test_legacy_layout_matches_megatron_lm(tiny_hf_dir, tmp_path):
    mc = tmp_path / "mc"
    hf_to_mcore(
        tiny_hf_dir,
        mc,
        fmt="legacy",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        progress=False,
    )
    assert (mc / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    names = sorted(p.name for p in (mc / "iter_0000000").iterdir())
    assert names == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    ckpt = torch.load(mc / "iter_0000000/mp_rank_01_001/model_optim_rng.pt", weights_only=False)
    model = ckpt["model"]
    # Stage 1 of 2 holds layers 2-3 under local numbers 0-1, and the output layer.
    assert "decoder.layers.1.mlp.linear_fc1.weight" in model
    assert "decoder.layers.2.mlp.linear_fc1.weight" not in model
    assert model["output_layer.weight"].shape == (256, 64)  # TP half of the padded vocab
    assert model["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (96, 64)
    assert ckpt["args"].tensor_model_parallel_size == 2


def test_hf_dtype_is_kept_and_selectable(tiny_hf_dir, tmp_path):
    hf_to_mcore(tiny_hf_dir, tmp_path / "mc", dtype="bfloat16", progress=False)
    mcore_to_hf(tmp_path / "mc", tmp_path / "hf", hf_template=tiny_hf_dir, progress=False)
    reader = HFCheckpointReader(tmp_path / "hf")
    assert reader.get("lm_head.weight").dtype == torch.bfloat16
    expected = HFCheckpointReader(tiny_hf_dir).get("lm_head.weight").to(torch.bfloat16)
    assert torch.equal(reader.get("lm_head.weight"), expected)


def test_cli_round_trip(tiny_hf_dir, tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    subprocess.run(
        [*tool, "hf-to-mcore", "--hf-dir", str(tiny_hf_dir), "--out", str(tmp_path / "mc"),
         "--target-tensor-parallel-size", "2"],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    subprocess.run(
        [*tool, "mcore-to-hf", "--mcore-dir", str(tmp_path / "mc"), "--out", str(tmp_path / "hf"),
         "--hf-template", str(tiny_hf_dir)],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    assert_same_tensors(tiny_hf_dir, tmp_path / "hf")


# ---- bad input: one clear error, nothing written --------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _convert_fails(hf_dir, out, match, **kwargs):
    with pytest.raises((CheckpointError, ArchitectureError, ValueError, FileExistsError)) as info:
        hf_to_mcore(hf_dir, out, progress=False, **kwargs)
    assert match in str(info.value), str(info.value)
    return info.value


def test_missing_folder_and_files(tiny_hf_dir, tmp_path):
    _convert_fails(tmp_path / "nope", tmp_path / "out", "does not exist")
    broken = _copy(tiny_hf_dir, tmp_path / "noconfig")
    (broken / "config.json").unlink()
    _convert_fails(broken, tmp_path / "out", "no config.json")
    broken = _copy(tiny_hf_dir, tmp_path / "noshard")
    next(broken.glob("model-00002-*.safetensors")).unlink()
    _convert_fails(broken, tmp_path / "out", "shard model-00002")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_named(tiny_hf_dir, tmp_path):
    broken = _copy(tiny_hf_dir, tmp_path / "mixtral")
    config = json.loads((broken / "config.json").read_text())
    config.update(architectures=["MixtralForCausalLM"], model_type="mixtral")
    (broken / "config.json").write_text(json.dumps(config))
    _convert_fails(broken, tmp_path / "out", "'MixtralForCausalLM' is not supported")


def test_heads_and_layers_must_divide(tiny_hf_gqa_dir, tmp_path):
    _convert_fails(tiny_hf_gqa_dir, tmp_path / "o", "num_key_value_heads 2", tensor_parallel_size=4)
    _convert_fails(tiny_hf_gqa_dir, tmp_path / "o", "num_hidden_layers 4", pipeline_parallel_size=3)
    assert not (tmp_path / "o").exists()


def _rewrite_tensors(src, dst, edit):
    from safetensors.torch import load_file, save_file

    dst = _copy(src, dst)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        edit(tensors)
        save_file(tensors, shard, metadata={"format": "pt"})
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    weight_map = {}
    for shard in dst.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            weight_map.update(dict.fromkeys(f.keys(), shard.name))
    index["weight_map"] = weight_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def test_missing_unexpected_and_misshapen_tensors(tiny_hf_dir, tmp_path):
    def drop(t):
        t.pop("model.layers.1.mlp.up_proj.weight", None)

    def extra(t):
        if "model.norm.weight" in t:
            t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    def reshape(t):
        if "model.layers.2.self_attn.k_proj.weight" in t:
            t["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(32, 64)

    bad = _rewrite_tensors(tiny_hf_dir, tmp_path / "drop", drop)
    _convert_fails(bad, tmp_path / "o", "missing tensors: model.layers.1.mlp.up_proj.weight")
    bad = _rewrite_tensors(tiny_hf_dir, tmp_path / "extra", extra)
    _convert_fails(
        bad, tmp_path / "o", "unexpected tensors: model.layers.0.self_attn.q_norm.weight"
    )
    bad = _rewrite_tensors(tiny_hf_dir, tmp_path / "shape", reshape)
    _convert_fails(
        bad,
        tmp_path / "o",
        "model.layers.2.self_attn.k_proj.weight has shape (32, 64), expected (64, 64)",
    )
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    _convert_fails(tiny_hf_dir, out, "already exists")
    assert (out / "keep.txt").read_text() == "x"


def test_failed_conversion_leaves_no_destination(tiny_hf_dir, tmp_path, monkeypatch):
    from megatron_kaja.checkpoint import convert

    def explode(*args, **kwargs):
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(convert, "write_torch_dist", explode)
    with pytest.raises(RuntimeError):
        hf_to_mcore(tiny_hf_dir, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor the temp folder


def test_mcore_to_hf_bad_inputs(tiny_hf_dir, tmp_path):
    with pytest.raises(CheckpointError, match="neither a torch_dist"):
        (tmp_path / "empty").mkdir()
        mcore_to_hf(tmp_path / "empty", tmp_path / "o", progress=False)
    mc = tmp_path / "mc"
    hf_to_mcore(tiny_hf_dir, mc, fmt="legacy", tensor_parallel_size=2, progress=False)
    (mc / "megatron_kaja.json").unlink()
    # Without megatron_kaja.json the Megatron-LM args in the rank files describe the model;
    # a checkpoint without either needs the template.
    no_args = _copy(mc, tmp_path / "no_args")
    for path in no_args.glob("iter_0000000/mp_rank_*/model_optim_rng.pt"):
        state = torch.load(path, weights_only=False)
        del state["args"]
        torch.save(state, path)
    with pytest.raises(CheckpointError, match="pass --hf-template"):
        mcore_to_hf(no_args, tmp_path / "o", progress=False)
    shutil.rmtree(mc / "iter_0000000" / "mp_rank_01")
    with pytest.raises(CheckpointError, match="rank folders missing: mp_rank_01"):
        mcore_to_hf(mc, tmp_path / "o", hf_template=tiny_hf_dir, progress=False)
    assert not (tmp_path / "o").exists()
