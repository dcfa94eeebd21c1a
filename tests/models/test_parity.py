"""Converted checkpoints, loaded at TP x PP in {1,2} x {1,2}, reproduce HF logits (fp32)."""

import json

import pytest

from megatron_kaja.checkpoint.convert import hf_to_mcore
from tests.helpers import run_torchrun

TOLERANCE = 1e-5


def _cases(tmp_path, hf_dirs, layouts, formats=("torch_dist", "legacy")):
    cases = []
    for shape, hf_dir in hf_dirs.items():
        for fmt in formats:
            for tp, pp in layouts:
                out = tmp_path / f"{shape}-{fmt}-tp{tp}pp{pp}"
                hf_to_mcore(
                    hf_dir,
                    out,
                    fmt=fmt,
                    tensor_parallel_size=tp,
                    pipeline_parallel_size=pp,
                    progress=False,
                )
                cases.append(dict(hf=str(hf_dir), mcore=str(out), tp=tp, pp=pp, name=out.name))
    return cases


def _run(cases, nproc, tmp_path):
    out = tmp_path / f"results-{nproc}.jsonl"
    run_torchrun(
        "-m",
        nproc,
        "megatron_kaja.checkpoint.verify",
        "--cases",
        json.dumps(cases),
        "--out",
        str(out),
    )
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["name"] for r in results) == sorted(c["name"] for c in cases)
    for r in results:
        assert r["max_abs_diff"] <= TOLERANCE, r
        assert r["logit_scale"] > 0.5  # the comparison is not between near-zero logits
    return results


@pytest.mark.slow
def test_parity_tp_pp_1_and_2(tiny_hf_dir, tiny_hf_gqa_dir, tmp_path):
    hf_dirs = {"mha": tiny_hf_dir, "gqa": tiny_hf_gqa_dir}
    cases = _cases(tmp_path, hf_dirs, [(1, 1), (2, 1), (1, 2)])
    # Resharding on load: saved at TP=2 (legacy) / TP=1 (torch_dist), loaded at other layouts.
    by_name = {c["name"]: c for c in cases}
    cases.append({**by_name["gqa-legacy-tp2pp1"], "tp": 1, "pp": 2, "name": "gqa-legacy-21-as-12"})
    cases.append({**by_name["mha-torch_dist-tp1pp1"], "tp": 2, "pp": 1, "name": "mha-td-11-as-21"})
    _run(cases, 2, tmp_path)


@pytest.mark.slow
def test_parity_tp2_pp2(tiny_hf_dir, tiny_hf_gqa_dir, tmp_path):
    hf_dirs = {"mha": tiny_hf_dir, "gqa": tiny_hf_gqa_dir}
    _run(_cases(tmp_path, hf_dirs, [(2, 2)]), 4, tmp_path)
