"""The run skeleton every trainer shares: world, model source, training stack, resume, metrics,
run control, logging, and one `main()` that maps errors to exit codes.

A trainer (`SFTTrainer`, `GRPOTrainer`, `DPOTrainer`) contributes what is its own: its
settings class, its data (read before any compute), its step, and the state it checkpoints
beside the model and optimizer. Everything else happens here, in this order:

    world -> batch layout -> extras -> tokenizer -> model source (resume?) -> trainer data
    -> model + DDP + optimizer + schedule -> resume or load weights -> trainer start
    -> metrics writer -> steps until the end, --exit-interval or SIGTERM (saving as due)

Errors of a setting or an input (`USER_ERRORS`) end the run with exit code 2 on every rank and
one line naming the flag or file:line, printed by rank 0 only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import torch.distributed as dist

from megatron_kaja.checkpoint import CheckpointError
from megatron_kaja.data.records import DataFormatError
from megatron_kaja.extras import MissingExtraError, require
from megatron_kaja.models.llama.config import LlamaArch, training_vocab_size
from megatron_kaja.parallel.distributed import (
    ParallelLayout,
    initialize_model_parallel,
    set_virtual_pipeline_size,
)
from megatron_kaja.training import checkpointing
from megatron_kaja.training.control import RunControl
from megatron_kaja.training.errors import ConfigError
from megatron_kaja.training.metrics import MetricsWriter
from megatron_kaja.training.scale import check_scale_extras
from megatron_kaja.training.settings import RunSettings, load_config
from megatron_kaja.training.setup import TrainingStack, build_training_stack

logger = logging.getLogger("megatron_kaja.train")

# A bad setting or input: exit 2 with the error's one line (no traceback).
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    DataFormatError,
    MissingExtraError,
    CheckpointError,
)


def is_reporting_rank() -> bool:
    """Rank 0 prints a run's errors, once for the whole world."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def rank0_first(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0, then on the others (they reuse rank 0's tokenization cache).

    A bad input that rank 0 finds is handed to the other ranks, which raise it too instead of
    waiting: every rank then exits 2 and rank 0 alone names the problem.
    """
    if dist.get_rank() == 0:
        try:
            result, failure = fn(), None
        except USER_ERRORS as exc:
            result, failure = None, exc
        dist.broadcast_object_list([failure], src=0)
        if failure is not None:
            raise failure
        return result
    payload = [None]
    dist.broadcast_object_list(payload, src=0)
    if payload[0] is not None:
        raise payload[0]
    return fn()


def device_batch(batch: dict) -> dict:
    """A micro-batch's tensors on this rank's compute device."""
    import torch

    from megatron_kaja.parallel.distributed import compute_device

    device = compute_device()
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()
    }


@dataclass
class ModelSource:
    """Where a run starts: the architecture, the checkpoint's padded vocabulary, the weights,
    and the run folder to resume from (None: start from the weights)."""

    arch: LlamaArch
    padded_vocab: int | None
    weights: Path
    resume_from: Path | None


def resolve_model_source(cfg: RunSettings, run_kind: str) -> ModelSource:
    """Find where a run of `run_kind` starts.

    - `--save` already holds a checkpoint of this run kind (a requeued job repeating its
      command, `--load` and `--save` often being the same folder): resume from it, unless
      `--no-auto-resume`; any checkpoint there that this run would not resume is refused
      unless `--overwrite`.
    - otherwise `--load` may be a converted checkpoint (weights), a training run of the same
      kind (resumed: weights, optimizer, schedule, data position, RNG) or a run of the other
      kind (its latest weights: GRPO starts from an SFT run's folder).
    """
    from megatron_kaja.checkpoint.convert import open_mcore_checkpoint

    if cfg.load is None:
        raise ConfigError("--load is required: training starts from a converted checkpoint")
    try:
        saved = checkpointing.latest_checkpoint(cfg.save) if cfg.save is not None else None
    except CheckpointError as exc:
        raise ConfigError(f"--save {cfg.save}: {exc}") from None
    resume_from = None
    if saved is not None and saved[1] == run_kind and cfg.auto_resume:
        resume_from = Path(cfg.save)
    elif saved is not None and not cfg.overwrite:
        hint = "" if saved[1] != run_kind else "drop --no-auto-resume to resume it, "
        raise ConfigError(
            f"--save {cfg.save} already holds a checkpoint (iteration {saved[0]} of a "
            f"{saved[1]} run): {hint}choose another --save, or pass --overwrite to replace it"
        )
    try:
        found = checkpointing.latest_checkpoint(cfg.load)
        if resume_from is None and found is not None and found[1] == run_kind:
            resume_from = Path(cfg.load)
        if resume_from is not None:
            weights = checkpointing.iteration_dir(
                resume_from, checkpointing.latest_iteration(resume_from)
            )
        else:
            weights = checkpointing.iteration_dir(cfg.load, found[0]) if found else Path(cfg.load)
        reader = open_mcore_checkpoint(weights)
    except CheckpointError as exc:
        raise ConfigError(f"--load {cfg.load}: {exc}") from None
    return ModelSource(reader.arch, reader.padded_vocab, Path(weights), resume_from)


@dataclass
class Run:
    """What the skeleton hands a trainer: its settings and the world it runs in."""

    cfg: Any  # the trainer's settings (a RunSettings)
    layout: ParallelLayout
    tokenizer: Any
    source: ModelSource
    train_iters: int = 0
    start: int = 0  # steps already done (a resumed run)
    stack: TrainingStack | None = None
    writer: MetricsWriter | None = None
    is_writer: bool = False  # this rank writes metrics and logs the run

    @property
    def arch(self) -> LlamaArch:
        return self.source.arch

    @property
    def padded_vocab(self) -> int:
        return training_vocab_size(
            self.arch, self.source.padded_vocab, self.cfg.tensor_model_parallel_size
        )


def data_sampler(run: Run, size: int, global_batch: int | None = None):
    """The resumable sampler of `size` rows (or pairs) in global batches (default
    `--global-batch-size`) split over this run's data-parallel ranks."""
    from megatron_kaja.data import PackedRowSampler

    cfg = run.cfg
    return PackedRowSampler(
        size,
        cfg.micro_batch_size,
        global_batch or cfg.global_batch_size,
        run.layout.dp_rank,
        run.layout.data_parallel_size,
        seed=cfg.seed,
    )


def validation_sampler(run: Run, size: int, items: str):
    """(sampler, global batches to evaluate, micro-batches per rank) over `size` held-out
    `items`: batches of at most `--global-batch-size`, `--eval-iters` of them at most."""
    cfg = run.cfg
    unit = cfg.micro_batch_size * run.layout.data_parallel_size
    batch = min(cfg.global_batch_size, size // unit * unit)
    if batch == 0:
        raise ConfigError(f"--valid-data holds {size} {items}, fewer than {unit}")
    sampler = data_sampler(run, size, batch)
    return sampler, min(cfg.eval_iters, sampler.global_batches_per_epoch), batch // unit


class Trainer:
    """What a trainer contributes to the skeleton. Override what differs."""

    run_kind: ClassVar[str]  # marks its checkpoints: a run resumes only its own kind
    settings: ClassVar[type[RunSettings]]
    # Per-token loss sums (megatron divides by the global token count) or a loss the step
    # normalizes itself (gradients averaged over data-parallel ranks): see build_training_stack.
    per_token_loss: ClassVar[bool] = True
    logger: ClassVar[logging.Logger] = logger

    def check_extras(self, cfg) -> None:
        """Optional packages this run needs, imported before any compute."""

    def prepare(self, run: Run) -> int:
        """Read and check the data (errors name file:line, before compute); the number of
        steps of the run."""
        raise NotImplementedError

    def start(self, run: Run, resumed: dict | None) -> None:
        """After the weights are in place: `resumed` is the checkpoint's common state (its
        `sampler` entry holds what `checkpoint_state` saved) or None on a fresh start."""

    def run_config(self, run: Run) -> dict:
        """The settings saved in checkpoints and given to W&B."""
        return run.cfg.model_dump(mode="json")

    def checkpoint_state(self) -> dict:
        """This trainer's own state saved beside the model (e.g. its data position)."""
        return {}

    def step(self, run: Run, iteration: int, log: bool) -> list[dict]:
        """Train step `iteration + 1`; the metric records to write (when `log`, or extra
        records such as a validation loss)."""
        raise NotImplementedError

    def log_line(self, record: dict) -> str:
        """The human log line of a record."""
        return " | ".join(f"{k} {v}" for k, v in record.items())

    def describe(self, run: Run) -> str | None:
        """One line about the run for the log at its start."""
        return None

    def close(self) -> None:
        """Release what the trainer holds (engines, reference models)."""

    def plan(self, cfg) -> int:
        """`--dry-run`: check the run without a GPU; 0 when it can run as planned."""
        raise NotImplementedError


def run_training(cfg: RunSettings, trainer: Trainer) -> dict:
    """Run `trainer` as configured; returns the last metrics record written."""
    from transformers import AutoTokenizer

    if cfg.optimizer != "adam":
        require("bitsandbytes", f"--optimizer {cfg.optimizer}")  # before any compute
    check_scale_extras(cfg)  # transformer-engine for --fp8-format
    trainer.check_extras(cfg)
    layout = initialize_model_parallel(
        cfg.tensor_model_parallel_size,
        cfg.pipeline_model_parallel_size,
        seed=cfg.seed,
        context_parallel_size=cfg.context_parallel_size,
    )
    cfg.check_launched_world(layout.world_size)
    cfg.check_world(layout.world_size)
    source = resolve_model_source(cfg, trainer.run_kind)
    cfg.check_preset(source.arch, f"--load {cfg.load}")
    # Model chunks per pipeline stage follow from the layer count, known only now.
    set_virtual_pipeline_size(cfg.virtual_pipeline_size(source.arch))
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if len(tokenizer) > source.arch.vocab_size:
        raise ConfigError(
            f"--tokenizer has {len(tokenizer)} tokens, the model only {source.arch.vocab_size}"
        )
    # One metrics writer rule for every trainer: the global last rank is on the last pipeline
    # stage, which holds the loss.
    run = Run(
        cfg, layout, tokenizer, source, is_writer=dist.get_rank() == dist.get_world_size() - 1
    )
    run.train_iters = trainer.prepare(run)
    run.stack = build_training_stack(
        run.arch,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_iters=cfg.lr_warmup_iters,
        lr_decay_style=cfg.lr_decay_style,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=cfg.bf16,
        optimizer=cfg.optimizer,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        train_iters=run.train_iters,
        **cfg.scale_build_settings(),
        transformer_impl=cfg.transformer_impl,
        padded_vocab_size=run.padded_vocab,
        per_token_loss=trainer.per_token_loss,
    )
    resumed = None
    if source.resume_from is not None:
        resumed = checkpointing.load_checkpoint(source.resume_from, run.stack, trainer.run_kind)
        run.start = resumed["iteration"]
        if run.is_writer:
            trainer.logger.info(
                "resuming the %s run in %s at iteration %d%s",
                trainer.run_kind, source.resume_from, run.start,
                " (--no-auto-resume to start afresh)" if source.resume_from == cfg.save else "",
            )  # fmt: skip
    else:
        from megatron_kaja.checkpoint.loading import load_mcore_weights

        load_mcore_weights(run.stack.model_chunks, source.weights, run.stack.transformer_impl)
    trainer.start(run, resumed)
    run_config = trainer.run_config(run)
    checkpointing.remove_stale_temporaries(cfg.save)  # of saves that did not finish
    run.writer = MetricsWriter(
        cfg.metrics_file,
        enabled=run.is_writer,
        tensorboard_dir=cfg.tensorboard_dir,
        wandb_project=cfg.wandb_project,
        wandb_name=cfg.wandb_exp_name,
        run_config=run_config,
        resume_from_step=run.start,  # steps logged after the checkpoint appear once
    )
    description = trainer.describe(run)
    if run.is_writer and description:
        trainer.logger.info("%s", description)

    def save(iteration: int) -> None:
        checkpointing.save_checkpoint(
            cfg.save,
            iteration,
            run.stack,
            arch=run.arch,
            sampler_state=trainer.checkpoint_state(),
            config=run_config,
            run_kind=trainer.run_kind,
            optimizer_fully_reshardable=cfg.dist_ckpt_optim_fully_reshardable,
        )

    control = RunControl(
        train_iters=run.train_iters,
        save=save if cfg.save else None,
        save_interval=cfg.save_interval,
        exit_interval=cfg.exit_interval,
        handle_sigterm=cfg.exit_signal_handler,
    )
    last: dict = {}
    iteration = run.start
    while iteration < run.train_iters:
        log = (iteration + 1) % cfg.log_interval == 0 or iteration + 1 == run.train_iters
        for record in trainer.step(run, iteration, log):
            run.writer.log(record)
            if run.is_writer:
                trainer.logger.info("%s", trainer.log_line(record))
            last = record
        iteration += 1
        if control.after_step(iteration):
            if run.is_writer and iteration < run.train_iters:
                trainer.logger.info(
                    "exiting at iteration %d (SIGTERM or --exit-interval)", iteration
                )
            break
    trainer.close()
    run.writer.close()
    return last


def _leave_together(code: int) -> None:
    """Under torchrun, every rank exits with `code`, not only the first to leave.

    The launcher stops the ranks still running when one exits (they would report SIGTERM):
    the ranks meet, leave at once, and one stopped during its exit still exits `code`.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(code))
    if dist.get_backend() == "gloo":  # NCCL has no barrier with a timeout
        # a rank that did not meet the error times the barrier out: leave anyway
        with contextlib.suppress(RuntimeError):
            dist.monitored_barrier(timeout=timedelta(seconds=60))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(trainer: Trainer, argv: list[str] | None = None) -> int:
    """The entry point of a trainer's script: 0 when done, 1 when a dry run finds the plan
    cannot run or a checkpoint save fails (one line naming the cause and the checkpoint still
    intact), 2 for a bad setting or input (one line from rank 0, no traceback)."""
    from megatron_kaja.parallel.distributed import destroy_model_parallel

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("megatron.core").setLevel(logging.WARNING)  # its INFO dumps every bucket
    try:
        cfg = load_config(argv, trainer.settings)
        if cfg.dry_run:
            return trainer.plan(cfg)
        run_training(cfg, trainer)
    except USER_ERRORS as exc:
        if is_reporting_rank():
            trainer.logger.error("%s", exc)
        _leave_together(2)
        return 2
    except checkpointing.CheckpointSaveError as exc:  # names the cause and what is intact
        if is_reporting_rank():
            trainer.logger.error("%s", exc)
        _leave_together(1)
        return 1
    finally:
        if dist.is_initialized():
            destroy_model_parallel()
    return 0
