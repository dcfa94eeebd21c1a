"""Same recipe, same tiny models: mergekit and we must produce the same tensors.

Skipped when mergekit is not installed (it is in the `test` extra). DARE is left out on
purpose: its drop masks come from each tool's own random stream, so only their
statistics can agree (see test_merge_methods.py for DARE's own tests).
"""

from __future__ import annotations

import pytest
import torch
from merge_testing import load_tensors

from megatron_kaja.merge import MergeConfig, run_merge

pytest.importorskip("mergekit")


def recipes(m: dict) -> dict[str, dict]:
    base, a, b = str(m["base"]), str(m["a"]), str(m["b"])
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": a, "parameters": {"weight": 0.6}},
                {"model": b, "parameters": {"weight": [0.1, 0.5, 0.9]}},
            ],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": base,
            "models": [{"model": base}, {"model": a}],
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]},
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6}},
                {"model": b, "parameters": {"weight": -0.4}},
            ],
            "parameters": {"lambda": 0.8},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": b, "parameters": {"weight": 0.4, "density": [0.3, 0.9]}},
            ],
            "parameters": {"normalize": True},
        },
        "ties_bf16_out": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 1.0}},
                {"model": b, "parameters": {"weight": 1.0}},
            ],
            "parameters": {"density": [{"filter": "mlp", "value": 0.2}, {"value": 0.7}]},
            "out_dtype": "bfloat16",
        },
    }


@pytest.mark.parametrize("name", ["linear", "slerp", "task_arithmetic", "ties", "ties_bf16_out"])
def test_every_tensor_matches_mergekit(tmp_path, merge_models, monkeypatch, name):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # inputs are local folders; never look online
    raw = recipes(merge_models)[name]
    mergekit_run_merge(
        MergeConfiguration.model_validate(raw), str(tmp_path / "mergekit"), MergeOptions()
    )
    run_merge(MergeConfig.model_validate(raw), tmp_path / "ours", progress=False)
    theirs, ours = load_tensors(tmp_path / "mergekit"), load_tensors(tmp_path / "ours")
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        # Same formulas in float32; only summation order may differ in the last bit.
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-6, msg=key)
