"""The DPO trainer of `train_dpo.py`: preference pairs -> reference and policy log-probs through
megatron-core's schedule -> preference loss -> optimizer, on the run skeleton
(`training/loop.py`: world, stack, checkpoints, metrics, run control).

The loss of a global batch of P pairs is the mean over its pairs (`--loss-type`), plus
`--sft-loss-weight` x the token-mean NLL of the chosen answers (RPO-style mixing, as
NeMo-Aligner's `sft_loss_weight` and TRL's `sft` loss term). Megatron's per-token loss
mode does the averaging: each micro-batch returns its pairs' summed loss and its pair count,
and megatron divides the summed gradients by the pairs of the whole global batch (over
micro-batches and data-parallel ranks); the NLL term is scaled by P / T (T: chosen tokens of
the global batch), so the result does not depend on the DP x accumulation split.

Log-probs are summed per answer through the batch's `sequence_ids` (`preference/data.py`),
so a row may hold one answer or, with `--packing`, several: the micro-batch still holds
`--micro-batch-size` pairs, and a global batch `--global-batch-size` pairs.

Under context parallelism (`--context-parallel-size`, sdpa) each CP rank holds its zigzag
chunks of the rows (`parallel/context_parallel.py`), sums its own tokens' log-probs per
answer, and the CP group adds the parts up; every CP rank then computes the same loss of the
whole pairs and backpropagates it through its own tokens (the reduce's backward is the
identity), so the ranks' gradients, summed by DDP over DP x CP, make the full gradient once.
Megatron also sums the reported pair count over DP x CP: only CP rank 0 reports its pairs.
The logged numbers are summed over DP ranks only (each CP rank holds the same).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from megatron_kaja.data import parse_weighted_paths
from megatron_kaja.models.llama.attention import AttentionBackend, attention_backend
from megatron_kaja.models.llama.forward import token_losses
from megatron_kaja.parallel.context_parallel import sum_over_context_parallel
from megatron_kaja.parallel.distributed import compute_device
from megatron_kaja.preference.data import build_preference_dataset, collate_pairs, count_pairs
from megatron_kaja.preference.losses import (
    AnswerLogps,
    preference_loss,
    preference_loss_names,
    reward_stats,
)
from megatron_kaja.training.loop import (
    Run,
    Trainer,
    data_sampler,
    device_batch,
    rank0_first,
    run_training,
    validation_sampler,
)
from megatron_kaja.training.loop import main as run_main
from megatron_kaja.training.metrics import Throughput
from megatron_kaja.training.settings import RowSettings

logger = logging.getLogger("megatron_kaja.dpo")

# What a micro-batch's loss function sums, in this order (the last stage's numbers).
STATS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "sft_nll",
    "pairs",
)


class DPOConfig(RowSettings):
    """Every setting of a `train_dpo.py` run (field names are the flags without dashes)."""

    SECTION: ClassVar[str] = "DPO: data and loss"
    # A pair is two rows: batch sizes count pairs.
    DEFAULTS: ClassVar[dict] = {
        "lr": 1e-6,
        "min_lr": 0.0,
        "micro_batch_size": 2,
        "global_batch_size": 64,
    }

    # DPO: data
    train_data: list[str] = Field(
        min_length=1,
        description="preference pairs (prompt, chosen, rejected), optionally weighted: "
        "PATH [W PATH W ...]",
    )
    valid_data: list[str] | None = Field(
        default=None, description="held-out pairs: loss, reward accuracy and margin"
    )
    chat_template: Path | None = Field(
        default=None, description="jinja chat template (default: the tokenizer's)"
    )
    seq_length: int = Field(
        default=4096, gt=1, description="tokens per answer row (longer pairs are dropped)"
    )
    eval_interval: int | None = Field(
        default=None, gt=0, description="validation every N steps (needs --valid-data)"
    )
    eval_iters: int = Field(default=10, gt=0, description="global batches per validation")
    # DPO: the loss
    ref_load: Path | None = Field(
        default=None, description="the frozen reference (default: the weights the run starts from)"
    )
    loss_type: Literal[preference_loss_names()] = Field(  # type: ignore[valid-type]
        default="sigmoid", description="sigmoid (DPO) or ipo"
    )
    beta: float = Field(default=0.1, gt=0, description="strength of the pull to the reference")
    label_smoothing: float = Field(
        default=0.0, ge=0, lt=0.5, description="sigmoid: probability that a pair's label is wrong"
    )
    sft_loss_weight: float = Field(
        default=0.0, ge=0, description="weight of the chosen answers' token-mean NLL"
    )
    packing: bool = Field(
        default=False,
        description="pack the answers of a micro-batch's pairs into as few rows of "
        "--seq-length as hold them (each answer its own attention segment; the same "
        "numbers as one answer per row)",
    )

    @model_validator(mode="after")
    def _dpo_consistent(self) -> DPOConfig:
        if self.eval_interval is not None and not self.valid_data:
            raise ValueError("--eval-interval needs --valid-data")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("--label-smoothing applies to --loss-type sigmoid only")
        if self.packing and self.fp8_format is not None:
            # FP8 scales come from each tensor's amax over the whole micro-batch, padding
            # included: packing changes them, and with them every answer's numbers.
            raise ValueError("--packing is not exact with --fp8-format (scales span rows)")
        return self


def _sum_over(totals: torch.Tensor, *groups) -> torch.Tensor:
    """`totals` summed over the ranks of each group, on the device the collectives use (NCCL
    reduces device tensors only), returned on the host."""
    totals = totals.to(compute_device())
    for group in groups:
        dist.all_reduce(totals, group=group)
    return totals.cpu()


def per_answer_sums(values: torch.Tensor, sequence_ids: torch.Tensor, answers: int):
    """`values` ([b, s]) summed per answer ([answers]; positions of answer -1 are padding).

    A masked sum rather than `index_add`: CUDA's `index_add` adds in a random order
    (atomics), which would break bitwise-equal resumes on a GPU."""
    numbers = torch.arange(answers, device=values.device)
    own = sequence_ids.reshape(1, -1) == numbers[:, None]
    return torch.where(own, values.reshape(1, -1), 0.0).sum(dim=1)


def _answer_logps(vocab_size: int, cp_group, batch: dict, fed: dict, output_tensor):
    """Per-answer summed log-probs and token counts of the answer tokens (chosen answers,
    then rejected ones) of the whole rows. The per-token tensors are those fed to the model
    (`fed`: this CP rank's chunks under context parallelism), whose parts the CP group adds
    up."""
    labels = fed["labels"]
    nll = token_losses(output_tensor, labels, vocab_size).view(labels.shape)
    mask, ids, answers = fed["loss_mask"], fed["sequence_ids"], 2 * batch["pairs"]
    sums = torch.stack(
        [per_answer_sums(-nll * mask, ids, answers), per_answer_sums(mask, ids, answers)]
    )
    sums = sum_over_context_parallel(sums, cp_group)
    return sums[0], sums[1]


def _reference_loss_func(vocab_size: int, cp_group, batch: dict, fed: dict, output_tensor):
    logps, _ = _answer_logps(vocab_size, cp_group, batch, fed, output_tensor)
    one = torch.ones((), dtype=torch.int, device=output_tensor.device)
    return output_tensor.sum() * 0.0, one, {"logps": logps.detach()}


def _policy_loss_func(
    vocab_size: int,
    cp_group,
    cfg: DPOConfig,
    nll_scale: float,
    reports_pairs: bool,
    batch: dict,
    fed: dict,
    output_tensor,
):
    """Pairs' summed loss and their count (megatron divides by the global batch's pairs,
    summed over DP x CP: `reports_pairs` on one CP rank of each DP rank only)."""
    logps, tokens = _answer_logps(vocab_size, cp_group, batch, fed, output_tensor)
    m = batch["pairs"]
    ref = batch["ref_logps"]
    pairs = AnswerLogps(logps[:m], logps[m:], ref[:m], ref[m:], tokens[:m], tokens[m:])
    loss = preference_loss(cfg.loss_type)(pairs, cfg.beta, cfg.label_smoothing).sum()
    chosen_nll = -logps[:m].sum()
    if cfg.sft_loss_weight:
        loss = loss + cfg.sft_loss_weight * nll_scale * chosen_nll
    stats = reward_stats(pairs, cfg.beta)
    stats.update(loss=loss.detach(), sft_nll=chosen_nll.detach(), pairs=torch.tensor(float(m)))
    row = torch.stack([stats[k].double().cpu().reshape(()) for k in STATS])
    counted = torch.tensor(m if reports_pairs else 0, dtype=torch.int, device=loss.device)
    return loss, counted, {"stats": row}


def _forward_step(attention: AttentionBackend, loss_func, data_iterator, model):
    batch = next(data_iterator)
    output, fed = attention.forward(model, batch)
    return output, partial(loss_func, batch, fed)


def _schedule(chunks, micro_batches, attention, seq_length: int, forward_only: bool, loss_func):
    """megatron-core's forward(/backward) schedule over the micro-batches through a model's
    chunks (one, or one per virtual stage: each reads every micro-batch); the loss
    function's reduced dicts (on the last pipeline stage, else an empty list)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq, mbs = attention.schedule_shape(seq_length, micro_batches[0]["tokens"].shape[0])
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, attention, loss_func),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=list(chunks),
        num_microbatches=len(micro_batches),
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
    )


class DPOTrainer(Trainer):
    """`train_dpo.py`: a frozen reference, preference pairs, the `--loss-type` loss."""

    run_kind = "dpo"
    settings = DPOConfig
    per_token_loss = True  # "tokens" are pairs here: see the module docstring
    logger = logger

    def prepare(self, run: Run) -> int:
        cfg = run.cfg

        def read(paths):
            return build_preference_dataset(
                parse_weighted_paths(paths), run.tokenizer, cfg.seq_length, cfg.seed,
                cfg.chat_template,
            )  # fmt: skip

        self.train_set = rank0_first(lambda: read(cfg.train_data))
        self.valid_set = rank0_first(lambda: read(cfg.valid_data)) if cfg.valid_data else None
        self.dp = run.layout.data_parallel_size
        self.sampler = data_sampler(run, len(self.train_set))
        return cfg.train_iters or cfg.train_epochs * self.sampler.global_batches_per_epoch

    def start(self, run: Run, resumed: dict | None) -> None:
        from megatron_kaja.checkpoint.loading import load_mcore_weights
        from megatron_kaja.models.llama.model import build_model_chunks

        cfg = run.cfg
        self.ref_source = cfg.ref_load or run.source.weights
        if resumed is not None:
            self.sampler.load_state_dict(resumed["sampler"])
            saved = resumed["config"]
            self.ref_source = cfg.ref_load or saved.get("ref_load") or saved["load"]
        # The reference is the policy's own architecture, layer spec and pipeline split
        # (chunks under an interleaved pipeline, uneven stages), frozen.
        self.ref_chunks = build_model_chunks(
            run.arch,
            transformer_impl=run.stack.transformer_impl,
            bf16=cfg.bf16,
            vocab_size_override=run.padded_vocab,
            first_stage_layers=cfg.decoder_first_pipeline_num_layers,
            last_stage_layers=cfg.decoder_last_pipeline_num_layers,
        )
        load_mcore_weights(self.ref_chunks, self.ref_source, run.stack.transformer_impl)
        for chunk in self.ref_chunks:
            chunk.requires_grad_(False).eval()
        self.attention = attention_backend(run.stack.transformer_impl)
        self.sampler_iter = iter(self.sampler)
        self.throughput = Throughput(run.train_iters, run.start)

    def run_config(self, run: Run) -> dict:
        return {**run.cfg.model_dump(mode="json"), "ref_load": str(self.ref_source)}

    def checkpoint_state(self) -> dict:
        return self.sampler.state_dict()

    def describe(self, run: Run) -> str:
        cfg, stats = run.cfg, self.train_set.stats
        return (
            f"data: {stats.num_pairs} pairs ({stats.dropped_overlong} longer than "
            f"--seq-length {cfg.seq_length} dropped); {run.train_iters} iterations, "
            f"{cfg.gradient_accumulation_steps(self.dp)} micro-batches of "
            f"{cfg.micro_batch_size} pairs per DP rank per step"
            f"{' (answers packed into rows)' if cfg.packing else ''}, DP={self.dp} "
            f"TP={cfg.tensor_model_parallel_size} PP={cfg.pipeline_model_parallel_size}"
            f"{f' CP={cfg.context_parallel_size}' if cfg.context_parallel_size > 1 else ''}; "
            f"{cfg.loss_type} loss, beta {cfg.beta}, reference {self.ref_source}"
        )

    def global_batch(self, run: Run, micro_batches: list[dict], forward_only: bool) -> dict:
        """Reference log-probs (once per batch, no gradients), then the policy's loss (and
        gradients unless `forward_only`); the batch's sums of `STATS` on every rank."""
        from megatron.core import parallel_state as ps

        cfg = run.cfg
        micro_batches = [device_batch(mb) for mb in micro_batches]
        vocab, cp_group = run.arch.vocab_size, ps.get_context_parallel_group()
        with torch.no_grad():
            refs = _schedule(
                self.ref_chunks, micro_batches, self.attention, cfg.seq_length, True,
                partial(_reference_loss_func, vocab, cp_group),
            )  # fmt: skip
        last_stage = ps.is_pipeline_last_stage()
        if last_stage:  # only the last stage computes log-probs, and needs them
            for mb, ref in zip(micro_batches, refs, strict=True):
                mb["ref_logps"] = ref["logps"]
        # The NLL term's normalizer: the chosen-answer tokens of the whole global batch (and
        # its pairs and rows, for the record).
        counts = torch.zeros(3, dtype=torch.float64)
        for mb in micro_batches:
            ids = mb["sequence_ids"]
            chosen = (mb["loss_mask"] * ((ids >= 0) & (ids < mb["pairs"]))).sum().item()
            counts += torch.tensor(
                [chosen, mb["pairs"], mb["tokens"].shape[0]], dtype=torch.float64
            )
        counts = _sum_over(counts, ps.get_data_parallel_group())
        nll_scale = float(counts[1] / counts[0].clamp(min=1.0))
        stack = run.stack
        if forward_only:
            stack.set_train(False)
        outputs = _schedule(
            stack.ddp_chunks, micro_batches, self.attention, cfg.seq_length, forward_only,
            partial(
                _policy_loss_func, vocab, cp_group, cfg, nll_scale,
                ps.get_context_parallel_rank() == 0,
            ),
        )  # fmt: skip
        stack.set_train(True)
        totals = torch.zeros(len(STATS), dtype=torch.float64)
        if last_stage:
            for out in outputs:
                totals += out["stats"]
        # Over data-parallel ranks, then the last stage's numbers to every stage.
        totals = _sum_over(
            totals, ps.get_data_parallel_group(), ps.get_pipeline_model_parallel_group()
        )
        sums = dict(zip(STATS, totals.tolist(), strict=True))
        pairs = max(sums.pop("pairs"), 1.0)
        record = {k: v / pairs for k, v in sums.items() if k != "sft_nll"}
        record["sft_nll"] = sums["sft_nll"] / max(float(counts[0]), 1.0)
        record["rows"] = int(counts[2])
        return record

    def _micro_batches(self, run: Run, dataset, sampler_iter, count: int) -> list[dict]:
        """`count` micro-batches of `--micro-batch-size` pairs each (their rows packed with
        `--packing`)."""
        cfg = run.cfg
        pairs = [next(sampler_iter) for _ in range(count)]
        rows = [dataset.pair_rows(indices, cfg.packing) for indices in pairs]
        if cfg.packing and cfg.pipeline_model_parallel_size > 1:
            # Pipeline stages exchange activations of one shape per step: packed
            # micro-batches are evened out to the most rows with rows of padding.
            most = max(len(r) for r in rows)
            rows = [r + [dataset.padding_row()] * (most - len(r)) for r in rows]
        return [collate_pairs(r, len(p)) for r, p in zip(rows, pairs, strict=True)]

    def step(self, run: Run, iteration: int, log: bool) -> list[dict]:
        cfg, stack = run.cfg, run.stack
        records = []
        if self.valid_set is not None and cfg.eval_interval and iteration == 0:
            records.append({"step": 0, **self.evaluate(run)})  # the reference's own numbers
        lr = stack.optimizer.param_groups[0]["lr"]
        stack.zero_grad_buffers()
        stack.optimizer.zero_grad()
        count = cfg.gradient_accumulation_steps(self.dp)
        record = self.global_batch(
            run, self._micro_batches(run, self.train_set, self.sampler_iter, count), False
        )
        rows = record.pop("rows")
        success, grad_norm, _ = stack.optimizer.step()
        stack.scheduler.step(increment=1)
        step = iteration + 1
        if log:
            speed = self.throughput.report(step, rows * cfg.seq_length)
            records.append(
                {
                    "step": step,
                    "train_iters": run.train_iters,
                    **record,
                    "rows": rows,
                    "lr": lr,
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "skipped": not success,
                    **speed,
                }
            )
        if self.valid_set is not None and cfg.eval_interval and step % cfg.eval_interval == 0:
            records.append({"step": step, **self.evaluate(run)})
        return records

    def evaluate(self, run: Run) -> dict:
        """Loss, reward accuracy and margin over up to `eval_iters` held-out global batches."""
        sampler, steps, per_rank = validation_sampler(run, len(self.valid_set), "pairs")
        it = iter(sampler)
        totals: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(steps):
                record = self.global_batch(
                    run, self._micro_batches(run, self.valid_set, it, per_rank), True
                )
                for key, value in record.items():
                    totals[key] = totals.get(key, 0.0) + value / steps
        return {
            "valid_loss": totals["loss"],
            "valid_accuracy": totals["rewards/accuracies"],
            "valid_margin": totals["rewards/margins"],
        }

    def log_line(self, record: dict) -> str:
        if "valid_loss" in record:
            return (
                f"step {record['step']} | valid loss {record['valid_loss']:.4f} | accuracy "
                f"{record['valid_accuracy']:.3f} | margin {record['valid_margin']:.4f}"
            )
        return (
            f"step {record['step']}/{record['train_iters']} | loss {record['loss']:.4f} | "
            f"accuracy {record['rewards/accuracies']:.3f} | margin "
            f"{record['rewards/margins']:.4f} | chosen {record['rewards/chosen']:.4f} | "
            f"rejected {record['rewards/rejected']:.4f} | lr {record['lr']:.3e} | grad_norm "
            f"{record['grad_norm']:.3f} | tok/s {record['tokens_per_s']:.0f}"
        )

    def close(self) -> None:
        self.ref_chunks = None

    def plan(self, cfg: DPOConfig) -> int:
        """`train_dpo.py --dry-run`: the run checked as configured; layout and memory of the
        policy (trained) and the reference (frozen weights only)."""
        from megatron_kaja.training.launch import describe_optimizer, plan_layout, start_plan
        from megatron_kaja.training.memory import estimate_memory, stage_params

        report, arch, dp = start_plan(cfg, "train_dpo.py")
        accumulation = cfg.gradient_accumulation_steps(dp)
        report.add(
            f"layout: TP={cfg.tensor_model_parallel_size} x PP="
            f"{cfg.pipeline_model_parallel_size} x DP={dp}"
            f"{f' x CP={cfg.context_parallel_size}' if cfg.context_parallel_size > 1 else ''}"
            f"; micro-batch {cfg.micro_batch_size} "
            f"pairs (= {'at most ' if cfg.packing else ''}{2 * cfg.micro_batch_size} rows "
            f"of {cfg.seq_length} tokens{', packed' if cfg.packing else ''}) x "
            f"{accumulation} accumulation steps x DP {dp} = global batch "
            f"{cfg.global_batch_size} pairs; {describe_optimizer(cfg)}; reference model: "
            f"{cfg.ref_load or 'the starting weights'}"
        )
        data = [s.path for s in parse_weighted_paths(cfg.train_data)]
        data += [s.path for s in parse_weighted_paths(cfg.valid_data or [])]
        report.check_files(
            [("--load", cfg.load), ("--ref-load", cfg.ref_load), ("--tokenizer", cfg.tokenizer)]
            + [("--train-data/--valid-data", p) for p in data]
            + [("--chat-template", cfg.chat_template)]
        )
        report.check_tokenizer(cfg.tokenizer, arch)
        report.add("data:")
        for source in parse_weighted_paths(cfg.train_data + (cfg.valid_data or [])):
            report.check_data(
                "--train-data/--valid-data", source.path, lambda s=source: count_pairs(s)
            )
        # rows of a micro-batch: each pair's chosen and rejected answer
        layout = replace(
            plan_layout(cfg, dp, cfg.seq_length, accumulation, arch),
            micro_batch_size=2 * cfg.micro_batch_size,
        )
        estimate = estimate_memory(arch, layout)
        weight_bytes = 2 if cfg.bf16 else 4
        estimate.extra["reference model"] = (
            stage_params(arch, layout, estimate.stage) * weight_bytes
        )
        return report.finish(estimate)


def train_dpo(cfg: DPOConfig) -> dict:
    """Run DPO as configured; returns the last logged metrics."""
    return run_training(cfg, DPOTrainer())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `train_dpo.py`."""
    return run_main(DPOTrainer(), argv)
