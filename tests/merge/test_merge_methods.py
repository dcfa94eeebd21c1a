"""Each merge method on tiny models against a reference computed directly in the test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from merge_testing import load_tensors, write_altered_copy

from megatron_kaja.merge import MergeConfig, run_merge
from megatron_kaja.merge.methods.task_vectors import (
    kth_largest,
    kth_largest_by_bisection,
    trim_to_density,
)

NUM_LAYERS = 4  # megatron_kaja.tiny's default shape


def gradient_value(values, name: str) -> float:
    """Reference for a per-layer gradient: np.interp over evenly spaced anchors."""
    if not isinstance(values, list):
        return values
    if ".layers." not in name:
        return values[0]
    layer = int(name.split(".layers.")[1].split(".")[0])
    anchors = np.linspace(0.0, 1.0, len(values))
    return float(np.interp(layer / (NUM_LAYERS - 1), anchors, values))


def merge(tmp_path, raw: dict, name: str = "out") -> dict[str, torch.Tensor]:
    out = run_merge(MergeConfig.model_validate(raw), tmp_path / name, progress=False)
    return load_tensors(out)


def assert_all_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key, rtol=1e-5, atol=1e-6)


def test_linear_weighted_mean_with_gradient(tmp_path, merge_models):
    a, b = load_tensors(merge_models["a"]), load_tensors(merge_models["b"])
    wb = [0.1, 0.9]
    got = merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(merge_models["a"]), "parameters": {"weight": 0.7}},
                {"model": str(merge_models["b"]), "parameters": {"weight": wb}},
            ],
        },
    )
    expected = {}
    for k in a:
        w = gradient_value(wb, k)
        expected[k] = (0.7 * a[k] + w * b[k]) / (0.7 + w)
    assert_all_close(got, expected)


def test_linear_without_normalization(tmp_path, merge_models):
    a, b = load_tensors(merge_models["a"]), load_tensors(merge_models["b"])
    got = merge(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(merge_models["a"])}, {"model": str(merge_models["b"])}],
            "parameters": {"weight": 0.5, "normalize": False},
        },
    )
    assert_all_close(got, {k: 0.5 * a[k] + 0.5 * b[k] for k in a})


def reference_slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double().flatten(), v1.double().flatten()
    cos = float(torch.dot(a / a.norm(), b / b.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * v0.double() + t * v1.double()).float()
    theta = math.acos(cos)
    out = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    return out.view_as(v0).float()


def test_slerp_with_filter_and_gradient(tmp_path, merge_models):
    base, a = load_tensors(merge_models["base"]), load_tensors(merge_models["a"])
    t_setting = [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]
    got = merge(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(merge_models["base"]),
            "models": [{"model": str(merge_models["base"])}, {"model": str(merge_models["a"])}],
            "parameters": {"t": t_setting},
        },
    )
    expected = {}
    for k in base:
        t = gradient_value([0.0, 0.5, 1.0], k) if "self_attn" in k else 0.3
        expected[k] = reference_slerp(t, base[k], a[k])
    assert_all_close(got, expected)
    # t=0 on layer 0's attention gives the base exactly, t=1 on the last layer the other.
    q0, q3 = "model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"
    torch.testing.assert_close(got[q0], base[q0])
    torch.testing.assert_close(got[q3], a[q3])


def test_slerp_falls_back_to_lerp_for_parallel_tensors(tmp_path, merge_models):
    doubled = write_altered_copy(merge_models["base"], tmp_path / "doubled", lambda n, x: 2 * x)
    base = load_tensors(merge_models["base"])
    got = merge(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(merge_models["base"]),
            "models": [{"model": str(doubled)}],
            "parameters": {"t": 0.25},
        },
    )
    # Parallel vectors: sin(theta) = 0, so the result is the lerp 1.25 * base, not NaN.
    assert_all_close(got, {k: 1.25 * v for k, v in base.items()})


def test_task_arithmetic(tmp_path, merge_models):
    base, a, b = (load_tensors(merge_models[m]) for m in ("base", "a", "b"))
    got = merge(
        tmp_path,
        {
            "merge_method": "task_arithmetic",
            "base_model": str(merge_models["base"]),
            "models": [
                {"model": str(merge_models["a"]), "parameters": {"weight": 0.6}},
                {"model": str(merge_models["b"]), "parameters": {"weight": -0.4}},
            ],
            "parameters": {"lambda": 0.8},
        },
    )
    expected = {k: base[k] + 0.8 * (0.6 * (a[k] - base[k]) - 0.4 * (b[k] - base[k])) for k in base}
    assert_all_close(got, expected)


def reference_ties(base, models, weights, densities, normalize=True):
    """TIES written out with a full sort (topk) and stacked tensors (Yadav et al. 2023)."""
    deltas = []
    for m, w, d in zip(models, weights, densities, strict=True):
        delta = (m - base).flatten()
        k = max(1, int(d * delta.numel()))
        keep = torch.zeros_like(delta, dtype=torch.bool)
        keep[torch.topk(delta.abs(), k).indices] = True
        deltas.append(w * torch.where(keep, delta, 0.0))
    stacked = torch.stack(deltas)
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stacked) == sign
    num = (stacked * agree).sum(0)
    den = (torch.tensor(weights)[:, None] * agree).sum(0)
    den[den == 0] = 1
    mixed = num / den if normalize else num
    return base + mixed.view_as(base)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties(tmp_path, merge_models, normalize):
    base, a, b = (load_tensors(merge_models[m]) for m in ("base", "a", "b"))
    density_b = [0.3, 0.9]
    got = merge(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(merge_models["base"]),
            "models": [
                {"model": str(merge_models["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": str(merge_models["b"]), "parameters": {"weight": 0.4}},
            ],
            "parameters": {"density": density_b, "normalize": normalize},
        },
    )
    expected = {
        k: reference_ties(
            base[k], [a[k], b[k]], [0.6, 0.4], [0.5, gradient_value(density_b, k)], normalize
        )
        for k in base
    }
    assert_all_close(got, expected)


def test_ties_trims_to_density(tmp_path, merge_models):
    """With one model, TIES keeps exactly int(density * n) entries of its task vector."""
    base, a = load_tensors(merge_models["base"]), load_tensors(merge_models["a"])
    got = merge(
        tmp_path,
        {
            "merge_method": "ties",
            "base_model": str(merge_models["base"]),
            "models": [{"model": str(merge_models["a"])}],
            "parameters": {"weight": 1.0, "density": 0.25},
        },
    )
    for k in base:
        changed = int((got[k] != base[k]).sum())
        assert changed == max(1, int(0.25 * base[k].numel())), k
        kept = got[k] != base[k]
        torch.testing.assert_close(got[k][kept], a[k][kept])


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_drops_and_rescales(tmp_path, merge_models, method):
    """Each entry of the merged delta is 0 or w * delta / density (Yu et al. 2023, eq. 2),
    and about `density` of them survive."""
    base, a = load_tensors(merge_models["base"]), load_tensors(merge_models["a"])
    got = merge(
        tmp_path,
        {
            "merge_method": method,
            "base_model": str(merge_models["base"]),
            "models": [{"model": str(merge_models["a"])}],
            "parameters": {"weight": 0.8, "density": 0.3},
        },
    )
    kept_total, numel = 0, 0
    for k in base:
        delta = got[k] - base[k]
        kept = delta != 0
        scaled = 0.8 * (a[k] - base[k]) / 0.3
        torch.testing.assert_close(delta[kept], scaled[kept], rtol=1e-4, atol=1e-6)
        kept_total += int(kept.sum())
        numel += delta.numel()
    assert abs(kept_total / numel - 0.3) < 0.01


def dare_raw(merge_models, seed: int) -> dict:
    return {
        "merge_method": "dare_ties",
        "base_model": str(merge_models["base"]),
        "models": [
            {"model": str(merge_models["a"]), "parameters": {"weight": 0.5, "density": 0.4}},
            {"model": str(merge_models["b"]), "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "seed": seed,
    }


def test_dare_is_deterministic_for_a_seed(tmp_path, merge_models):
    first = merge(tmp_path, dare_raw(merge_models, seed=7), "first")
    again = merge(tmp_path, dare_raw(merge_models, seed=7), "again")
    other = merge(tmp_path, dare_raw(merge_models, seed=8), "other")
    for k in first:
        assert torch.equal(first[k], again[k]), k
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_dare_with_density_one_is_task_arithmetic(tmp_path, merge_models):
    base, a, b = (load_tensors(merge_models[m]) for m in ("base", "a", "b"))
    raw = dare_raw(merge_models, seed=0)
    raw["merge_method"] = "dare_linear"
    for entry in raw["models"]:
        entry["parameters"]["density"] = 1.0
    got = merge(tmp_path, raw)
    expected = {k: base[k] + 0.5 * (a[k] - base[k]) + 0.5 * (b[k] - base[k]) for k in base}
    assert_all_close(got, expected)


@pytest.mark.parametrize("select", [kth_largest, kth_largest_by_bisection])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kth_largest_matches_a_full_sort(select, dtype):
    gen = torch.Generator().manual_seed(0)
    # Above the direct-selection size, and rounded to bf16 so that many magnitudes tie,
    # as in real bf16 checkpoints.
    n = (1 << 20) + 4001
    values = torch.randn(n, generator=gen).to(torch.bfloat16).to(dtype).abs()
    ordered = torch.sort(values, descending=True).values
    for k in (1, 7, n // 3, n // 2, n - 5, n):
        assert select(values, k) == ordered[k - 1], k


def test_trim_keeps_exactly_k_when_magnitudes_tie():
    delta = torch.tensor([[0.5, -0.5, 0.25], [0.5, -1.0, 0.0]])
    trimmed = trim_to_density(delta.clone(), density=0.5)  # k = 3: -1.0 and two of the 0.5s
    assert int((trimmed != 0).sum()) == 3
    assert trimmed[1, 1] == -1.0
    # Ties at the threshold are kept in index order.
    torch.testing.assert_close(trimmed, torch.tensor([[0.5, -0.5, 0.0], [0.0, -1.0, 0.0]]))
