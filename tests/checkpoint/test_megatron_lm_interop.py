"""Megatron-LM interop both ways.

Ours -> Megatron-LM: our outputs are read back through megatron-core's own loaders
(`dist_checkpointing.load`, `load_common_state_dict`, `torch.load(weights_only=True)`) and
carry every `args` field Megatron-LM reads (`MEGATRON_LM_ARGS_READ`).
Megatron-LM -> ours: a run saved at TP=2 x PP=2 in Megatron-LM's layout, with its args
(pickled enums), optimizer, scheduler, rerun and RNG state (`megatron_lm_writer.py`), is read
bitwise by the converter, the trainers' `--load`, `checkpoint.verify` and the merge tool.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_kaja.checkpoint.convert import hf_to_mcore, mcore_to_hf, open_mcore_checkpoint
from megatron_kaja.checkpoint.hf import HFCheckpointReader
from megatron_kaja.checkpoint.megatron_args import MEGATRON_LM_ARGS_READ
from megatron_kaja.models.llama.config import LlamaArch
from tests.checkpoint.test_convert import assert_same_tensors
from tests.helpers import REPO, run_torchrun

FORMATS = ("legacy", "torch_dist")


def _load_only(path):
    """The settings `resolve_model_source` reads, for a run that only names --load."""
    return SimpleNamespace(load=path, save=None, auto_resume=True, overwrite=False)


@pytest.fixture(scope="module")
def megatron_lm_runs(tiny_hf_dir, tmp_path_factory):
    """{format: Megatron-LM run folder} of the tiny HF model, saved at TP=2 x PP=2."""
    root = tmp_path_factory.mktemp("megatron_lm")
    hf_to_mcore(tiny_hf_dir, root / "ours", progress=False)
    writer = REPO / "tests" / "checkpoint" / "megatron_lm_writer.py"
    run_torchrun(writer, 4, str(tiny_hf_dir), str(root / "ours"), str(root / "out"))
    return {fmt: root / "out" / fmt for fmt in FORMATS}


# ---- ours -> Megatron-LM ---------------------------------------------------------------


def _assert_megatron_lm_args(args, arch: LlamaArch, fmt: str) -> None:
    assert isinstance(args, argparse.Namespace)
    missing = [name for name in MEGATRON_LM_ARGS_READ if not hasattr(args, name)]
    assert not missing, missing
    assert args.layernorm_epsilon == arch.norm_epsilon  # the name 0.16.1 reads
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.ckpt_format == fmt
    assert args.seq_length == args.encoder_seq_length == arch.max_position_embeddings
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.padded_vocab_size == 512 and args.vocab_size == arch.vocab_size == 509
    assert (args.num_query_groups, args.kv_channels) == (arch.num_query_groups, arch.head_dim)
    assert args.normalization == "RMSNorm" and args.swiglu and not args.add_bias_linear


def test_torch_dist_output_loads_in_megatron_core(tiny_hf_dir, tmp_path, megatron_world):
    from megatron.core import dist_checkpointing

    from megatron_kaja.checkpoint.loading import load_weights_from_reader
    from megatron_kaja.models.llama.model import build_gpt_model

    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    out = tmp_path / "mc"
    hf_to_mcore(tiny_hf_dir, out, tensor_parallel_size=2, pipeline_parallel_size=2, progress=False)
    # Megatron-LM's read_metadata / get_checkpoint_name / check_is_distributed_checkpoint
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    ckpt = out / "iter_0000000"
    assert dist_checkpointing.check_is_distributed_checkpoint(str(ckpt))
    common = dist_checkpointing.load_common_state_dict(str(ckpt))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 0
    assert common["num_floating_point_operations_so_far"] == 0
    _assert_megatron_lm_args(common["args"], arch, "torch_dist")
    # megatron-core's own resharding load (saved for TP=2 x PP=2, loaded at TP=1)
    model = build_gpt_model(arch)
    loaded = dist_checkpointing.load(model.sharded_state_dict(), str(ckpt))
    reference = build_gpt_model(arch)
    load_weights_from_reader(reference, open_mcore_checkpoint(out))
    for key, tensor in reference.state_dict().items():
        if not key.endswith("_extra_state"):
            assert torch.equal(loaded[key], tensor), key


def test_legacy_output_carries_megatron_lm_args(tiny_hf_dir, tmp_path):
    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    out = tmp_path / "mc"
    hf_to_mcore(
        tiny_hf_dir,
        out,
        fmt="legacy",
        tensor_parallel_size=2,
        pipeline_parallel_size=2,
        progress=False,
    )
    files = sorted(out.glob("iter_0000000/mp_rank_*/model_optim_rng.pt"))
    assert len(files) == 4
    import megatron.core  # noqa: F401  (registers its allowlist, as in a Megatron-LM process)

    for path in files:
        state = torch.load(path, weights_only=True)  # as Megatron-LM loads a legacy file
        assert state["checkpoint_version"] == 3.0 and state["iteration"] == 0
        _assert_megatron_lm_args(state["args"], arch, "torch")


# ---- Megatron-LM -> ours ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_converter_reads_megatron_lm_runs_bitwise(megatron_lm_runs, tiny_hf_dir, tmp_path, fmt):
    run = megatron_lm_runs[fmt]
    # A fresh interpreter, as a user runs it: megatron's enums are not pre-registered there.
    tool = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), "mcore-to-hf"]
    for name, source in (("run", run), ("iter", run / "iter_0000007")):
        out = tmp_path / name
        proc = subprocess.run(
            [*tool, "--mcore-dir", str(source), "--out", str(out), "--hf-template",
             str(tiny_hf_dir)],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert_same_tensors(tiny_hf_dir, out)
    # Without a template the architecture is the checkpoint's args; Megatron-LM stores no
    # unpadded vocabulary, so the padded rows stay (as an llm-jp-3 HF config counts them).
    mcore_to_hf(run, tmp_path / "no_template", progress=False)
    config = json.loads((tmp_path / "no_template" / "config.json").read_text())
    assert config["vocab_size"] == 512
    got, want = HFCheckpointReader(tmp_path / "no_template"), HFCheckpointReader(tiny_hf_dir)
    assert torch.equal(got.get("lm_head.weight")[:509], want.get("lm_head.weight"))
    assert torch.equal(got.get("model.layers.3.mlp.up_proj.weight"),
                       want.get("model.layers.3.mlp.up_proj.weight"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_trainers_load_megatron_lm_runs_as_weights(
    megatron_lm_runs, tiny_hf_dir, tmp_path, megatron_world, fmt
):
    """`--load` of a Megatron-LM run starts from its weights (its --finetune): no resume."""
    from megatron_kaja.checkpoint.loading import load_mcore_weights
    from megatron_kaja.models.llama.model import build_gpt_model
    from megatron_kaja.training.loop import resolve_model_source

    source = resolve_model_source(_load_only(megatron_lm_runs[fmt]), "sft")
    arch, padded, weights = source.arch, source.padded_vocab, source.weights
    assert source.resume_from is None and padded == 512
    assert arch.num_layers == LlamaArch.from_hf_config(tiny_hf_dir).num_layers
    model = build_gpt_model(arch)
    load_mcore_weights(model, weights)
    ours = tmp_path / "ours"
    hf_to_mcore(tiny_hf_dir, ours, progress=False)
    reference = build_gpt_model(LlamaArch.from_hf_config(tiny_hf_dir))
    load_mcore_weights(reference, ours)
    for key, tensor in reference.state_dict().items():
        if not key.endswith("_extra_state"):
            assert torch.equal(model.state_dict()[key], tensor), key


@pytest.mark.slow
def test_verify_and_merge_accept_megatron_lm_runs(megatron_lm_runs, tiny_hf_dir, tmp_path):
    from megatron_kaja.merge.sources import open_tensor_source

    for fmt, run in megatron_lm_runs.items():
        source = open_tensor_source(run, tiny_hf_dir)
        hf = HFCheckpointReader(tiny_hf_dir)
        for key in sorted(hf.keys()):
            assert torch.equal(source.get(key), hf.get(key)), (fmt, key)
    cases = [
        {"hf": str(tiny_hf_dir), "mcore": str(run), "tp": 1, "pp": 1, "name": fmt}
        for fmt, run in megatron_lm_runs.items()
    ]
    out = tmp_path / "verify.jsonl"
    run_torchrun("-m", 1, "megatron_kaja.checkpoint.verify", "--cases", json.dumps(cases),
                 "--out", str(out))  # fmt: skip
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["name"] for r in results) == sorted(FORMATS)
    assert all(r["max_abs_diff"] < 1e-4 for r in results), results
