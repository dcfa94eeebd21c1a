"""The merged folder: sharded safetensors + index, config, tokenizer; loads in transformers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from merge_testing import load_merge_cli, load_tensors
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_kaja.checkpoint.safetensors_io import (
    SAFETENSORS_INDEX,
    ShardedSafetensorsWriter,
    TensorSpec,
)
from megatron_kaja.merge import MergeConfig, open_tensor_source, run_merge
from megatron_kaja.merge.evaluation import check_evaluate_tool, evaluate_merged

merge_cli = load_merge_cli()


def test_output_loads_in_transformers_and_matches_the_merge(tmp_path, merge_models):
    """A linear merge with all weight on `a`, written as bf16 in small shards, is `a`."""
    out = run_merge(
        MergeConfig(
            merge_method="linear",
            models=[
                {"model": str(merge_models["a"]), "parameters": {"weight": 1.0}},
                {"model": str(merge_models["b"]), "parameters": {"weight": 0.0}},
            ],
            out_dtype="bfloat16",
        ),
        tmp_path / "out",
        max_shard_size="100KB",
        progress=False,
    )
    index = json.loads((out / SAFETENSORS_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1, "expected several shards"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(merge_models["a"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("富士山は日本で一番高い山です。", return_tensors="pt").input_ids
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    # Only bf16 rounding of the weights separates the two.
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)
    for key, tensor in load_tensors(out).items():
        assert tensor.dtype == torch.bfloat16
        torch.testing.assert_close(
            tensor, load_tensors(merge_models["a"])[key].to(torch.bfloat16), rtol=0, atol=0
        )


def test_writer_round_trip_through_safetensors(tmp_path):
    tensors = {
        "x": torch.randn(3, 5),
        "y": torch.randn(7).to(torch.bfloat16),
        "z": torch.arange(6, dtype=torch.float16).view(2, 3),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, specs, max_shard_size=40)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    source = open_tensor_source(tmp_path)
    assert source.keys() == list(tensors)
    for name, tensor in tensors.items():
        assert source.shape(name) == tuple(tensor.shape)
        assert torch.equal(source.get(name), tensor)


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSpec("x", (2,), torch.float32)], 100)
    with pytest.raises(ValueError, match="writer expected x"):
        writer.write("x", torch.zeros(3))


def test_cli_with_yaml_recipe(tmp_path, merge_models):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(merge_models["base"]),
                "models": [{"model": str(merge_models["a"]), "parameters": {"weight": 0.5}}],
            }
        )
    )
    out = tmp_path / "out"
    assert merge_cli.main(["--config", str(recipe), "--out", str(out), "--no-progress"]) == 0
    base, a, got = (load_tensors(p) for p in (merge_models["base"], merge_models["a"], out))
    for key in base:
        torch.testing.assert_close(got[key], base[key] + 0.5 * (a[key] - base[key]))


def test_cli_flags_match_the_equivalent_recipe(tmp_path, merge_models):
    flags_out, recipe_out = tmp_path / "flags", tmp_path / "recipe"
    argv = ["--method", "ties", "--base", str(merge_models["base"]), "--models"]
    argv += [str(merge_models["a"]), str(merge_models["b"])]
    argv += ["--weights", "0.7", "0.3", "--density", "0.4", "--out", str(flags_out)]
    assert merge_cli.main([*argv, "--no-progress"]) == 0
    run_merge(
        MergeConfig(
            merge_method="ties",
            base_model=str(merge_models["base"]),
            models=[
                {"model": str(merge_models["a"]), "parameters": {"weight": 0.7, "density": 0.4}},
                {"model": str(merge_models["b"]), "parameters": {"weight": 0.3, "density": 0.4}},
            ],
        ),
        recipe_out,
        progress=False,
    )
    got, want = load_tensors(flags_out), load_tensors(recipe_out)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_cli_reports_bad_flags(tmp_path, merge_models, capsys):
    argv = ["--method", "linear", "--models", str(merge_models["a"]), str(merge_models["b"])]
    code = merge_cli.main([*argv, "--weights", "1", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--weights: got 1 values for 2 --models" in capsys.readouterr().err


def test_evaluate_missing_tool_fails_before_merging(tmp_path, merge_models, monkeypatch, capsys):
    absent = tmp_path / "tools" / "evaluate.py"
    monkeypatch.setattr(merge_cli, "check_evaluate_tool", lambda: check_evaluate_tool(absent))
    argv = ["--method", "linear", "--models", str(merge_models["a"]), "--weights", "1"]
    out = tmp_path / "out"
    assert merge_cli.main([*argv, "--out", str(out), "--evaluate", "--judge", "x"]) == 2
    assert f"--evaluate needs {absent}, which does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_runs_the_tool_on_the_merged_model(tmp_path):
    tool = tmp_path / "evaluate.py"
    record = tmp_path / "argv.json"
    tool.write_text(f"import json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\n")
    assert evaluate_merged(tmp_path / "merged", ["--sets", "safety"], tool=tool) == 0
    expected = ["--model", str(tmp_path / "merged"), "--sets", "safety"]
    assert json.loads(record.read_text()) == expected
