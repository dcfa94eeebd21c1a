"""Megatron checkpoints as merge inputs: the same models as HF folders merge identically."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from merge_testing import load_merge_cli, load_tensors
from transformers import AutoModelForCausalLM

from megatron_kaja.checkpoint.convert import hf_to_mcore
from megatron_kaja.checkpoint.safetensors_io import SafetensorsFolder
from megatron_kaja.merge import MergeConfig, MergeInputError, open_tensor_source, run_merge
from megatron_kaja.merge.sources import MegatronSource

FORMATS = ("torch_dist", "legacy")
merge_cli = load_merge_cli()


@pytest.fixture(scope="module")
def megatron_models(tmp_path_factory, merge_models) -> dict[tuple[str, str], Path]:
    """(format, model) -> the merge fixture converted at TP=2, PP=2."""
    root = tmp_path_factory.mktemp("megatron_inputs")
    converted = {}
    for fmt in FORMATS:
        for name, hf_dir in merge_models.items():
            out = root / f"{name}_{fmt}"
            hf_to_mcore(
                hf_dir,
                out,
                fmt=fmt,
                tensor_parallel_size=2,
                pipeline_parallel_size=2,
                progress=False,
            )
            converted[(fmt, name)] = out
    return converted


def dare_ties(base, a, b, **extra) -> MergeConfig:
    # DARE seeds each tensor's drop mask from its name, so this also checks that every
    # Megatron tensor arrives under its HF name.
    return MergeConfig(
        merge_method="dare_ties",
        base_model=str(base),
        models=[
            {"model": str(a), "parameters": {"weight": 0.7, "density": 0.6}},
            {"model": str(b), "parameters": {"weight": [0.2, 0.9], "density": 0.4}},
        ],
        seed=3,
        **extra,
    )


def assert_identical(got_dir: Path, want_dir: Path) -> None:
    got, want = load_tensors(got_dir), load_tensors(want_dir)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        assert torch.equal(got[key], want[key]), key


@pytest.fixture(scope="module")
def hf_merge(tmp_path_factory, merge_models) -> Path:
    out = tmp_path_factory.mktemp("hf_merge") / "out"
    config = dare_ties(merge_models["base"], merge_models["a"], merge_models["b"])
    return run_merge(config, out, progress=False)


@pytest.mark.parametrize("fmt", FORMATS)
def test_megatron_inputs_merge_like_their_hf_folders(
    tmp_path, fmt, merge_models, megatron_models, hf_merge
):
    base, a, b = (megatron_models[(fmt, n)] for n in ("base", "a", "b"))
    out = run_merge(
        dare_ties(base, a, b, hf_template=str(merge_models["base"])),
        tmp_path / "out",
        max_shard_size="100KB",
        progress=False,
    )
    assert_identical(out, hf_merge)
    # The template supplies the tokenizer; the config comes from the checkpoint's arguments.
    assert (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 509  # Megatron's vocabulary padding is gone


@pytest.mark.parametrize(
    ("base", "a", "b"),
    [(None, "torch_dist", "legacy"), ("legacy", None, "torch_dist")],
    ids=["hf-base", "megatron-base"],
)
def test_mixed_hf_and_megatron_inputs(
    tmp_path, base, a, b, merge_models, megatron_models, hf_merge
):
    def path(fmt, name):
        return merge_models[name] if fmt is None else megatron_models[(fmt, name)]

    out = run_merge(
        dare_ties(path(base, "base"), path(a, "a"), path(b, "b")),
        tmp_path / "out",
        progress=False,
    )
    assert_identical(out, hf_merge)
    # The HF input's tokenizer is used even when the reference is a Megatron checkpoint.
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("fmt", FORMATS)
def test_cli_merges_a_megatron_lm_checkpoint_with_hf_template(
    tmp_path, fmt, merge_models, megatron_models, capsys
):
    """A checkpoint carrying neither megatron_kaja.json nor Megatron-LM args needs
    --hf-template, and then merges like the HF folder it came from."""
    foreign = tmp_path / "megatron_lm"
    shutil.copytree(megatron_models[(fmt, "a")], foreign)
    (foreign / "megatron_kaja.json").unlink()
    for path in [*foreign.glob("iter_*/common.pt"), *foreign.glob("iter_*/mp_rank_*/*.pt")]:
        state = torch.load(path, weights_only=False)
        del state["args"]
        torch.save(state, path)
    argv = ["--method", "linear", "--models", str(merge_models["base"]), str(foreign)]
    argv += ["--weights", "0.25", "0.75", "--no-progress"]
    assert merge_cli.main([*argv, "--out", str(tmp_path / "no_template")]) == 2
    assert "megatron_kaja.json: pass --hf-template" in capsys.readouterr().err
    assert not (tmp_path / "no_template").exists()

    template = ["--hf-template", str(merge_models["a"])]
    assert merge_cli.main([*argv, *template, "--out", str(tmp_path / "out")]) == 0
    base, a = load_tensors(merge_models["base"]), load_tensors(merge_models["a"])
    got = load_tensors(tmp_path / "out")
    for key in base:
        torch.testing.assert_close(got[key], 0.25 * base[key] + 0.75 * a[key])


@pytest.mark.parametrize("fmt", FORMATS)
def test_source_loads_each_layer_once_and_hands_out_fresh_tensors(
    fmt, merge_models, megatron_models
):
    source = open_tensor_source(megatron_models[(fmt, "a")])
    assert isinstance(source, MegatronSource)
    hf = SafetensorsFolder(merge_models["a"])
    assert sorted(source.keys()) == sorted(hf.keys())
    loads = []
    load_layer = source.reader.load_layer
    source.reader.load_layer = lambda layer: loads.append(layer) or load_layer(layer)
    for key in list(hf.keys()):  # the HF reference's order, as a mixed merge asks
        assert source.shape(key) == hf.shape(key)
        assert source.dtype(key) == hf.dtype(key)
        tensor = source.get(key)
        assert torch.equal(tensor, hf.get(key)), key
        tensor.mul_(0)  # merges work in place on what they get
    assert loads == list(range(4))
    # Asked again (another layer in between), each tensor is read anew and intact.
    for key in ("model.layers.0.input_layernorm.weight", "model.layers.0.self_attn.k_proj.weight"):
        source.get("model.layers.3.mlp.up_proj.weight")
        assert torch.equal(source.get(key), hf.get(key)), key


# ---- bad Megatron folders: a clear error, nothing written --------------------------


def assert_merge_fails(tmp_path, merge_models, broken: Path, match: str) -> None:
    # With a template, so that a folder without megatron_kaja.json reaches the reader.
    config = dare_ties(
        merge_models["base"], merge_models["a"], broken, hf_template=str(merge_models["base"])
    )
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=match):
        run_merge(config, out, progress=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "temp folder left behind"


def test_legacy_folder_without_rank_files(tmp_path, merge_models):
    broken = tmp_path / "mcore"
    (broken / "iter_0000010").mkdir(parents=True)
    (broken / "latest_checkpointed_iteration.txt").write_text("10")
    assert_merge_fails(tmp_path, merge_models, broken, r"iter_0000010: no mp_rank_\*")


def test_legacy_folder_missing_a_rank(tmp_path, merge_models, megatron_models):
    broken = tmp_path / "mcore"
    shutil.copytree(megatron_models[("legacy", "b")], broken)
    shutil.rmtree(broken / "iter_0000000" / "mp_rank_01_001")
    assert_merge_fails(tmp_path, merge_models, broken, "rank folders missing: mp_rank_01_001")


def test_torch_dist_folder_with_truncated_data(tmp_path, merge_models, megatron_models):
    broken = tmp_path / "mcore"
    shutil.copytree(megatron_models[("torch_dist", "b")], broken)
    (data,) = broken.glob("iter_0000000/*.distcp")
    data.write_bytes(data.read_bytes()[:1000])
    assert_merge_fails(tmp_path, merge_models, broken, rf"data file {data.name} is truncated")


def test_torch_dist_folder_without_its_metadata(tmp_path, merge_models, megatron_models):
    broken = tmp_path / "mcore"
    shutil.copytree(megatron_models[("torch_dist", "b")], broken)
    (broken / "iter_0000000" / ".metadata").unlink()
    assert_merge_fails(tmp_path, merge_models, broken, "neither a torch_dist checkpoint")


def test_megatron_architecture_mismatch_names_the_checkpoint(
    tmp_path, merge_models, megatron_models
):
    broken = tmp_path / "mcore"
    shutil.copytree(megatron_models[("legacy", "b")], broken)
    meta = json.loads((broken / "megatron_kaja.json").read_text())
    meta["arch"]["vocab_size"] = 500
    (broken / "megatron_kaja.json").write_text(json.dumps(meta))
    expected = (
        rf"{re.escape(str(broken))} \(Megatron checkpoint\) has vocab_size=500, "
        rf"{re.escape(str(merge_models['base']))}/config\.json has 509"
    )
    assert_merge_fails(tmp_path, merge_models, broken, expected)


def test_hf_config_without_head_dim_matches_a_megatron_input(
    tmp_path, merge_models, megatron_models
):
    """Configs saved by older transformers (llm-jp-3's releases) have no head_dim."""
    old = tmp_path / "old_config"
    shutil.copytree(merge_models["base"], old)
    config = json.loads((old / "config.json").read_text())
    del config["head_dim"]
    (old / "config.json").write_text(json.dumps(config))
    config = MergeConfig(
        merge_method="linear",
        models=[{"model": str(old)}, {"model": str(megatron_models[("torch_dist", "a")])}],
        parameters={"weight": 0.5},
    )
    run_merge(config, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
