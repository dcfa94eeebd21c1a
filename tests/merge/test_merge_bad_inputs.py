"""Bad inputs fail before anything is written, naming the field, tensor or file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from merge_testing import write_altered_copy
from safetensors.torch import load_file, save_file

import megatron_kaja.merge.methods as methods_module
from megatron_kaja.merge import MergeConfig, MergeInputError, load_merge_config, run_merge
from megatron_kaja.merge.methods import get_merge_method
from megatron_kaja.merge.methods.ties import ties


def ties_config(base, *models) -> MergeConfig:
    return MergeConfig(
        merge_method="ties",
        base_model=str(base),
        models=[{"model": str(m)} for m in models],
        parameters={"weight": 0.5, "density": 0.5},
    )


def assert_nothing_written(tmp_path, out) -> None:
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}.tmp-*")), "temp folder left behind"


def test_architecture_mismatch_names_field_and_file(tmp_path, merge_models, tiny_hf_gqa_dir):
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=r"num_key_value_heads.*config\.json"):
        run_merge(ties_config(merge_models["base"], tiny_hf_gqa_dir), out, progress=False)
    assert_nothing_written(tmp_path, out)


def test_missing_tensor_names_tensor_and_model(tmp_path, merge_models):
    dropped = "model.layers.2.mlp.down_proj.weight"
    broken = write_altered_copy(
        merge_models["a"], tmp_path / "broken", lambda n, t: None if n == dropped else t
    )
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=rf"missing tensor: {dropped}.*{broken}"):
        run_merge(ties_config(merge_models["base"], broken), out, progress=False)
    assert_nothing_written(tmp_path, out)


def test_unexpected_tensor_is_refused(tmp_path, merge_models):
    extra = write_altered_copy(merge_models["a"], tmp_path / "extra")
    tensors = load_file(extra / "model.safetensors")
    tensors["model.extra_head.weight"] = torch.zeros(2, 2)
    save_file(tensors, extra / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MergeInputError, match=r"unexpected tensor: model\.extra_head\.weight"):
        run_merge(ties_config(merge_models["base"], extra), tmp_path / "out", progress=False)


def test_shape_mismatch_names_tensor_and_files(tmp_path, merge_models):
    name = "model.layers.1.self_attn.o_proj.weight"
    broken = write_altered_copy(
        merge_models["a"], tmp_path / "broken", lambda n, t: t[:-1] if n == name else t
    )
    out = tmp_path / "out"
    expected = rf"shape mismatch: tensor {name}.*model\.safetensors"
    with pytest.raises(MergeInputError, match=expected):
        run_merge(ties_config(merge_models["base"], broken), out, progress=False)
    assert_nothing_written(tmp_path, out)


def test_tokenizer_mismatch_names_file(tmp_path, merge_models):
    other = write_altered_copy(merge_models["a"], tmp_path / "other_tok")
    tok = json.loads((other / "tokenizer.json").read_text(encoding="utf-8"))
    # Same number of pieces (so every shape still matches), one piece changed.
    tok["model"]["vocab"][100][0] = "別の語"
    (other / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=r"tokenizer mismatch: .*other_tok/tokenizer\.json"):
        run_merge(ties_config(merge_models["base"], other), out, progress=False)
    assert_nothing_written(tmp_path, out)


def test_missing_model_folder(tmp_path, merge_models):
    with pytest.raises(MergeInputError, match=r"nowhere: model folder does not exist"):
        run_merge(ties_config(merge_models["base"], tmp_path / "nowhere"), tmp_path / "out")


def test_non_empty_output_is_refused(tmp_path, merge_models):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(MergeInputError, match="output exists"):
        run_merge(ties_config(merge_models["base"], merge_models["a"]), out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"


def test_failure_mid_merge_leaves_no_output(tmp_path, merge_models, monkeypatch):
    calls = []

    def fail_on_fifth(inputs):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk full")
        return ties(inputs)

    method = dataclasses.replace(get_merge_method("ties"), fn=fail_on_fifth)
    monkeypatch.setitem(methods_module._METHODS, "ties", method)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        run_merge(ties_config(merge_models["base"], merge_models["a"]), out, progress=False)
    assert len(calls) == 5
    assert_nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"merge_method": "tie", "models": [{"model": "a"}]}, "merge_method"),
        (
            {"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}]},
            r"models\[0\]\.parameters\.weight: required",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "a", "parameters": {"weight": 1, "densty": 0.5}}],
            },
            r"models\[0\]\.parameters\.densty: not a per-model parameter",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 1}}]},
            "base_model: method 'ties' needs a base model",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "b"}, {"model": "c"}],
                "parameters": {"t": 0.5},
            },
            "models: method 'slerp' merges exactly 2 models",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": "a"}],
                "parameters": {"weight": 1, "t": 0.5},
            },
            r"parameters\.t: not a parameter of 'linear'",
        ),
        (
            {"merge_method": "slerp", "base_model": "a", "models": [{"model": "b"}]},
            "parameters.t: required by 'slerp'",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "out_dtype": "fp8"},
            "out_dtype",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "parameters": {"weight": 1}},
            None,
        ),
    ],
)
def test_config_errors_name_the_field(tmp_path, raw, field):
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    if field is None:
        assert load_merge_config(recipe).merge_method == "linear"
        return
    with pytest.raises(ValueError, match=field):
        load_merge_config(recipe)


def test_filter_that_matches_nothing_fails_before_writing(tmp_path, merge_models):
    config = MergeConfig(
        merge_method="linear",
        models=[{"model": str(merge_models["a"])}, {"model": str(merge_models["b"])}],
        parameters={"weight": [{"filter": "mlp", "value": 0.5}]},
    )
    out = tmp_path / "out"
    with pytest.raises(MergeInputError, match=r"parameter weight has no value for tensor"):
        run_merge(config, out, progress=False)
    assert_nothing_written(tmp_path, out)
