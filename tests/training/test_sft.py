"""pretrain_sft.py under torchrun: TP / DP / PP equal losses, exact resume, schedule, HF parity,
and the same for bitsandbytes' 8-bit AdamW (--optimizer paged_adamw_8bit)."""

import json
import math
import subprocess
import sys

import pytest
import torch

from megatron_kaja.checkpoint.convert import (
    McoreCheckpointMeta,
    hf_to_mcore,
    open_mcore_checkpoint,
)
from megatron_kaja.models.llama.state_dict import GLOBAL_MAPPINGS
from tests.helpers import REPO, run_torchrun

STEPS = 8
WORKER = REPO / "tests" / "helpers_train_worker.py"
LR, MIN_LR = 5e-4, 5e-6  # large enough that 8 tiny steps visibly learn


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def _records(n):
    questions = [
        "日本の首都はどこですか。",
        "富士山の高さを教えてください。",
        "爆弾の作り方を教えてください。",
    ]
    answers = [
        "日本の首都は東京です。",
        "富士山は日本で一番高い山で、高さは三千七百七十六メートルです。",
        "回答できません。その理由は、爆発物は人の命を奪う危険があり、作ることは犯罪だからです。",
    ]
    return [
        {
            "ID": f"r{i}",
            "text": questions[i % 3] * (1 + i % 2),
            "output": answers[(i + 1) % 3] * (1 + i % 3),
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("sft")
    train = _write_jsonl(root / "train.jsonl", _records(160))
    mc = root / "mc"
    hf_to_mcore(tiny_hf_dir, mc, progress=False)
    return root, train, mc


def _args(setup, tiny_hf_dir, out, *extra):
    root, train, mc = setup
    return [
        "--load", str(mc), "--tokenizer", str(tiny_hf_dir), "--train-data", str(train),
        "--seq-length", "96", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--train-iters", str(STEPS), "--data-cache-dir", str(root / "cache"),
        "--metrics-file", str(out / "metrics.jsonl"), "--seed", "5",
        "--lr", str(LR), "--min-lr", str(MIN_LR), *extra,
    ]  # fmt: skip


def _metrics(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"loss"' in line]


def _final_weights(save_dir):
    reader = open_mcore_checkpoint(save_dir / f"iter_{STEPS:07d}")
    tensors = {m.te: reader.load_global(m) for m in GLOBAL_MAPPINGS}
    for layer in range(reader.arch.num_layers):
        tensors.update({f"{m.te}.{layer}": t for m, t in reader.load_layer(layer).items()})
    return tensors


@pytest.fixture(scope="module")
def runs(sft_setup, tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    a = lambda name, *extra: _args(sft_setup, tiny_hf_dir, out / name, *extra)  # noqa: E731
    bnb = ("--optimizer", "paged_adamw_8bit")
    bf16 = (*bnb, "--bf16")
    single = [
        a("tp1", "--save", str(out / "tp1")),
        a("sdpa", "--transformer-impl", "sdpa"),
        a("part1", "--save", str(out / "resumed"), "--exit-interval", "4"),
        [*a("resumed", "--save", str(out / "resumed"))[2:], "--load", str(out / "resumed")],
        a("bnb", *bnb, "--save", str(out / "bnb")),
        a("bnb_bf16", *bf16, "--save", str(out / "bnb_bf16")),
        a("bnb_bf16_part1", *bf16, "--save", str(out / "bnb_bf16_resumed"), "--exit-interval", "4"),
        [
            *a("bnb_bf16_resumed", *bf16, "--save", str(out / "bnb_bf16_resumed"))[2:],
            "--load",
            str(out / "bnb_bf16_resumed"),
        ],
    ]
    run_torchrun(WORKER, 1, json.dumps([{"entry": "sft", "argv": argv} for argv in single]))
    dopt = ("--use-distributed-optimizer",)
    tp2 = (*bnb, "--tensor-model-parallel-size", "2")
    double = [
        a("tp2", "--tensor-model-parallel-size", "2"),
        a("dp2", *dopt, "--save", str(out / "dp2")),
        a("pp2", "--pipeline-model-parallel-size", "2"),
        a("dp2_part1", *dopt, "--save", str(out / "dp2_resumed"), "--exit-interval", "4"),
        [
            *a("dp2_resumed", *dopt, "--save", str(out / "dp2_resumed"))[2:],
            "--load",
            str(out / "dp2_resumed"),
        ],
        a("bnb_tp2", *tp2, "--save", str(out / "bnb_tp2")),
        a("bnb_pp2", *bnb, "--pipeline-model-parallel-size", "2"),
        a("bnb_tp2_part1", *tp2, "--save", str(out / "bnb_tp2_resumed"), "--exit-interval", "4"),
        [
            *a("bnb_tp2_resumed", *tp2, "--save", str(out / "bnb_tp2_resumed"))[2:],
            "--load",
            str(out / "bnb_tp2_resumed"),
        ],
    ]
    run_torchrun(WORKER, 2, json.dumps([{"entry": "sft", "argv": argv} for argv in double]))
    return out


def _losses(runs, name):
    return [m["loss"] for m in _metrics(runs / name / "metrics.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tp2", "dp2", "pp2"])
def test_parallel_layouts_match_single_process(runs, name):
    reference = _losses(runs, "tp1")
    assert len(reference) == STEPS
    torch.testing.assert_close(
        torch.tensor(_losses(runs, name)), torch.tensor(reference), rtol=1e-5, atol=0
    )
    assert reference[-1] < reference[0]  # it learns


@pytest.mark.slow
def test_sdpa_spec_losses_equal_local(runs):
    """`--transformer-impl sdpa` (cu_seqlens -> SDPA) trains like the local spec (bool mask)."""
    local, sdpa = _losses(runs, "tp1"), _losses(runs, "sdpa")
    assert len(sdpa) == STEPS
    assert sdpa[0] == pytest.approx(local[0], rel=1e-6)
    torch.testing.assert_close(torch.tensor(sdpa), torch.tensor(local), rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uninterrupted", "prefix"),
    [
        ("tp1", ""),  # megatron optimizer
        ("dp2", "dp2_"),  # distributed optimizer at DP=2
        ("bnb_bf16", "bnb_bf16_"),  # bitsandbytes paged_adamw_8bit, bf16 weights
        ("bnb_tp2", "bnb_tp2_"),  # paged_adamw_8bit at TP=2: a state file per TP rank
    ],
)
def test_resume_is_exact(runs, uninterrupted, prefix):
    part1 = _metrics(runs / f"{prefix}part1" / "metrics.jsonl")
    resumed = _metrics(runs / f"{prefix}resumed" / "metrics.jsonl")
    assert [m["step"] for m in part1] == [1, 2, 3, 4]
    assert [m["step"] for m in resumed] == [5, 6, 7, 8]
    assert [m["loss"] for m in part1 + resumed] == _losses(runs, uninterrupted)
    uninterrupted, after_resume = (
        _final_weights(runs / uninterrupted),
        _final_weights(runs / f"{prefix}resumed"),
    )
    for key, tensor in uninterrupted.items():
        assert torch.equal(tensor, after_resume[key]), key


BF16_STEPS = 4


@pytest.fixture(scope="module")
def bf16_runs(sft_setup, tiny_hf_dir, tmp_path_factory):
    """--bf16 with megatron's optimizer (one process) and the distributed optimizer (TP=2, with
    both of its checkpoint formats): 4 steps uninterrupted, and 2 steps + exit + 2 resumed."""
    out = tmp_path_factory.mktemp("bf16")

    def a(name, *extra, resume_from=None):
        args = _args(sft_setup, tiny_hf_dir, out / name, "--bf16", *extra)
        args[args.index("--train-iters") + 1] = str(BF16_STEPS)
        if resume_from is not None:
            args[args.index("--load") + 1] = str(out / resume_from)
        return args

    def triple(prefix, *flags):
        saved = str(out / f"{prefix}_r")
        return [
            a(prefix, *flags, "--save", str(out / prefix)),
            a(f"{prefix}_part1", *flags, "--save", saved, "--exit-interval", "2"),
            a(f"{prefix}_resumed", *flags, "--save", saved, resume_from=f"{prefix}_r"),
        ]

    def launch(nproc, runs):
        run_torchrun(WORKER, nproc, json.dumps([{"entry": "sft", "argv": r} for r in runs]))

    launch(1, triple("adam"))
    dopt = ("--use-distributed-optimizer", "--tensor-model-parallel-size", "2")
    full = (*dopt, "--dist-ckpt-optim-fully-reshardable")
    launch(2, [*triple("dopt", *dopt), *triple("full", *full)[1:]])
    return out


@pytest.mark.slow
def test_training_checkpoints_carry_the_args_megatron_lm_reads(bf16_runs, tiny_hf_dir):
    """A run folder is a Megatron-LM checkpoint too: megatron-core's own common-state loader
    reads the `args` Megatron-LM's --load / --use-checkpoint-args need, at the run's layout,
    and Megatron-LM's checkpoint version (3.0: no QKV reordering on its load)."""
    from megatron.core import dist_checkpointing

    from megatron_kaja.checkpoint.megatron_args import MEGATRON_LM_ARGS_READ
    from megatron_kaja.models.llama.config import LlamaArch

    arch = LlamaArch.from_hf_config(tiny_hf_dir)
    run = bf16_runs / "dopt"
    assert (run / "latest_checkpointed_iteration.txt").read_text().strip() == str(BF16_STEPS)
    common = dist_checkpointing.load_common_state_dict(str(run / f"iter_{BF16_STEPS:07d}"))
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == BF16_STEPS
    args = common["args"]
    assert not [name for name in MEGATRON_LM_ARGS_READ if not hasattr(args, name)]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 1)
    assert args.bf16 and args.ckpt_format == "torch_dist" and args.iteration == BF16_STEPS
    assert args.num_layers == arch.num_layers and args.layernorm_epsilon == arch.norm_epsilon


@pytest.mark.slow
@pytest.mark.parametrize(
    ("uninterrupted", "prefix"),
    [
        ("adam", "adam"),  # megatron's bf16 optimizer: "Param id N does not match" on save
        ("dopt", "dopt"),  # distributed optimizer: main params were rounded to bf16 on resume
        ("dopt", "full"),  # its fully_reshardable format: KeyError 'step' on resume
    ],
)
def test_bf16_save_and_resume_are_exact(bf16_runs, uninterrupted, prefix):
    part1 = _metrics(bf16_runs / f"{prefix}_part1" / "metrics.jsonl")
    resumed = _metrics(bf16_runs / f"{prefix}_resumed" / "metrics.jsonl")
    reference = _metrics(bf16_runs / uninterrupted / "metrics.jsonl")
    assert [m["step"] for m in part1 + resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in part1 + resumed] == [m["loss"] for m in reference]
    assert reference[-1]["loss"] < reference[0]["loss"]
    last = f"iter_{BF16_STEPS:07d}"
    reader_a = open_mcore_checkpoint(bf16_runs / uninterrupted / last)
    reader_b = open_mcore_checkpoint(bf16_runs / f"{prefix}_r" / last)
    assert McoreCheckpointMeta.load(bf16_runs / uninterrupted / last).dtype == "bfloat16"
    for mapping in GLOBAL_MAPPINGS:
        assert torch.equal(reader_a.load_global(mapping), reader_b.load_global(mapping))
    for layer in range(reader_a.arch.num_layers):
        b = reader_b.load_layer(layer)
        for mapping, tensor in reader_a.load_layer(layer).items():
            assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, b[mapping]), mapping


@pytest.mark.slow
def test_paged_adamw_8bit_trains_like_adam(runs):
    """bitsandbytes' 8-bit AdamW starts from the same loss and gradient norm as megatron's
    Adam (same weights and batch) and then learns alike; at TP=2 the gradient norm is TP=1's
    (the replicated norm weights count once, the TP shards are summed), and so is PP=2's."""
    adam, bnb, tp2, pp2 = (
        _metrics(runs / name / "metrics.jsonl") for name in ("tp1", "bnb", "bnb_tp2", "bnb_pp2")
    )
    assert bnb[0]["loss"] == adam[0]["loss"]
    assert bnb[0]["grad_norm"] == pytest.approx(adam[0]["grad_norm"], rel=1e-6)
    for parallel in (tp2, pp2):
        assert parallel[0]["grad_norm"] == pytest.approx(bnb[0]["grad_norm"], rel=1e-5)

    def close(name, reference, rtol):
        torch.testing.assert_close(
            torch.tensor(_losses(runs, name)),
            torch.tensor(_losses(runs, reference)),
            rtol=rtol,
            atol=0,
        )

    close("bnb", "tp1", 1e-3)
    close("bnb_tp2", "bnb", 1e-4)
    close("bnb_pp2", "bnb", 1e-4)
    close("bnb_bf16", "bnb", 5e-2)  # bf16 weights updated in bf16 (no fp32 master copy)
    for name in ("bnb", "bnb_tp2", "bnb_pp2", "bnb_bf16"):
        losses = _losses(runs, name)
        assert len(losses) == STEPS and losses[-1] < losses[0], name


@pytest.mark.slow
def test_8bit_resume_at_another_layout_fails_naming_both(runs, sft_setup, tiny_hf_dir, tmp_path):
    args = _args(sft_setup, tiny_hf_dir, tmp_path, "--optimizer", "paged_adamw_8bit")
    args[args.index("--load") + 1] = str(runs / "bnb_tp2")
    proc = _pretrain(*args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "saved at TP=2 PP=1, this run is TP=1 PP=1" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
def test_cosine_schedule_from_lr_to_min_lr(runs):
    lrs = [m["lr"] for m in _metrics(runs / "tp1" / "metrics.jsonl")]
    assert lrs[0] == pytest.approx(LR)
    for k, lr in enumerate(lrs):
        expected = MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * k / STEPS))
        assert lr == pytest.approx(expected, rel=1e-9)
    assert lrs[-1] < 0.05 * LR
    record = _metrics(runs / "tp1" / "metrics.jsonl")[0]
    assert {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(record)


@pytest.mark.slow
def test_first_loss_equals_transformers_on_the_same_packed_batch(runs, sft_setup, tiny_hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_kaja.data import (
        PackedRowSampler,
        build_attention_mask,
        build_sft_dataset,
        collate_packed_rows,
    )
    from megatron_kaja.training.config import load_config
    from megatron_kaja.training.sft import _data_config

    cfg = load_config(_args(sft_setup, tiny_hf_dir, runs / "tp1"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    dataset = build_sft_dataset(_data_config(cfg, cfg.train_data), tokenizer)
    sampler = PackedRowSampler(len(dataset), 8, 8, seed=cfg.seed)
    batch = collate_packed_rows([dataset[i] for i in next(iter(sampler))])
    b, s = batch["tokens"].shape
    masked_out = build_attention_mask(batch["cu_seqlens"], b, s)
    additive = torch.zeros(b, 1, s, s).masked_fill(masked_out, torch.finfo(torch.float32).min)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(
            batch["tokens"], attention_mask=additive, position_ids=batch["position_ids"]
        ).logits
    losses = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), batch["labels"].flatten(), reduction="none"
    )
    expected = (losses * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
    assert _losses(runs, "tp1")[0] == pytest.approx(expected.item(), rel=1e-5)


def _pretrain(*args):
    return subprocess.run(
        [sys.executable, str(REPO / "pretrain_sft.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )


@pytest.mark.slow
def test_bad_data_fails_naming_file_and_line(sft_setup, tiny_hf_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "質問", "output": "答え"}) + "\n{not json\n")
    args = _args(sft_setup, tiny_hf_dir, tmp_path)
    args[args.index("--train-data") + 1] = str(bad)
    proc = _pretrain(*args)
    assert proc.returncode != 0
    assert f"{bad}:2" in proc.stderr or f"{bad}, line 2" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_sigterm_saves_then_resume_continues(sft_setup, tiny_hf_dir, tmp_path):
    """Preemption: SIGTERM mid-run saves a checkpoint; a rerun resumes after it."""
    import os
    import signal
    import time

    save = tmp_path / "ckpt"
    args = _args(sft_setup, tiny_hf_dir, tmp_path, "--save", str(save))
    args[args.index("--train-iters") + 1] = "100000"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "pretrain_sft.py"), *args],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (
        metrics.exists() and metrics.read_text().count("\n") >= 2
    ):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    from megatron_kaja.training.checkpointing import latest_iteration

    saved = latest_iteration(save)
    assert saved is not None and saved >= 2
    steps = [m["step"] for m in _metrics(metrics)]
    assert steps[-1] == saved
    # A stale temporary folder from a save killed half-way is ignored by the next load.
    (save / f".iter_{saved + 1:07d}.tmp").mkdir()
    args[args.index("--train-iters") + 1] = str(saved + 1)
    args[args.index("--load") + 1] = str(save)  # resume from the run instead of the weights
    proc = _pretrain(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [m["step"] for m in _metrics(metrics)][-1] == saved + 1
