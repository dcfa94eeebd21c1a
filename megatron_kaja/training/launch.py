"""Launch facts shared by the trainers: the expected world, the architecture preset, and the
`--dry-run` that checks a whole run (files, tokenizer, layout, memory) without a GPU.

A dry run never initializes torch.distributed: the world size comes from `--world-size`,
`--nnodes` x `--nproc-per-node`, or the torchrun / SLURM environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from megatron_kaja.models.llama.config import PRESETS, LlamaArch, check_parallel_layout
from megatron_kaja.training.errors import ConfigError
from megatron_kaja.training.memory import GIB, MemoryEstimate


class LaunchSettings(BaseModel):
    """launch and dry run"""

    dry_run: bool = Field(
        default=False,
        description="check everything, print layout + memory, exit; no GPU needed",
    )
    allow_missing_files: bool = Field(
        default=False, description="dry run: list files absent here instead of failing"
    )
    model_preset: str | None = Field(
        default=None,
        description=f"architecture when --load is not on this machine ({', '.join(PRESETS)})",
    )
    world_size: int | None = Field(default=None, gt=0, description="expected number of processes")
    nnodes: int | None = Field(default=None, gt=0, description="expected nodes")
    nproc_per_node: int | None = Field(default=None, gt=0, description="processes per node")
    gpu_memory_gb: float = Field(default=80.0, gt=0, description="dry run: memory per GPU, GiB")

    @model_validator(mode="after")
    def _launch_consistent(self):
        if self.model_preset is not None and self.model_preset not in PRESETS:
            raise ValueError(
                f"--model-preset {self.model_preset!r} is unknown; use one of {sorted(PRESETS)}"
            )
        if self.allow_missing_files and not self.dry_run:
            raise ValueError("--allow-missing-files only applies to --dry-run")
        if (self.nnodes is None) != (self.nproc_per_node is None):
            raise ValueError("give --nnodes and --nproc-per-node together")
        if self.world_size and self.nnodes and self.world_size != self.nnodes * self.nproc_per_node:
            raise ValueError(
                f"--world-size {self.world_size} != --nnodes {self.nnodes} x "
                f"--nproc-per-node {self.nproc_per_node}"
            )
        return self

    def expected_world_size(self) -> int | None:
        if self.world_size:
            return self.world_size
        if self.nnodes:
            return self.nnodes * self.nproc_per_node
        return None

    def check_launched_world(self, world_size: int) -> None:
        """In a real run: the launched world must be the one the flags planned for."""
        expected = self.expected_world_size()
        if expected is not None and expected != world_size:
            raise ConfigError(
                f"launched with {world_size} processes, but --world-size / --nnodes x "
                f"--nproc-per-node say {expected}"
            )

    def check_preset(self, arch: LlamaArch, source: str) -> None:
        """In any run: a `--model-preset` must describe the checkpoint actually loaded."""
        if self.model_preset is None:
            return
        preset = PRESETS[self.model_preset]
        fields = ("hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads")
        fields += ("num_query_groups", "vocab_size")
        wrong = [f for f in fields if getattr(preset, f) != getattr(arch, f)]
        if wrong:
            raise ConfigError(
                f"--model-preset {self.model_preset} does not match {source}: "
                + ", ".join(f"{f} {getattr(preset, f)} vs {getattr(arch, f)}" for f in wrong)
            )


def world_size_for_plan(
    settings: LaunchSettings, environ: Mapping[str, str] | None = None
) -> tuple[int, str]:
    """(world size, where it came from): flags, then torchrun's / SLURM's environment."""
    environ = os.environ if environ is None else environ
    if settings.world_size:
        return settings.world_size, "--world-size"
    if settings.nnodes:
        return settings.nnodes * settings.nproc_per_node, (
            f"--nnodes {settings.nnodes} x --nproc-per-node {settings.nproc_per_node}"
        )
    if "WORLD_SIZE" in environ:
        return int(environ["WORLD_SIZE"]), "WORLD_SIZE (torchrun)"
    if "SLURM_NTASKS" in environ:
        return int(environ["SLURM_NTASKS"]), "SLURM_NTASKS"
    if "SLURM_JOB_NUM_NODES" in environ and "SLURM_GPUS_ON_NODE" in environ:
        nodes, gpus = int(environ["SLURM_JOB_NUM_NODES"]), int(environ["SLURM_GPUS_ON_NODE"])
        return nodes * gpus, "SLURM_JOB_NUM_NODES x SLURM_GPUS_ON_NODE"
    return 1, "default (give --world-size or --nnodes/--nproc-per-node)"


def resolve_architecture(load: Path | None, settings: LaunchSettings) -> tuple[LlamaArch, str]:
    """The architecture of `--load` when it is on this machine (a converted checkpoint, a
    training run or an HF folder), else of `--model-preset`; they must agree when both are."""
    from megatron_kaja.checkpoint import CheckpointError
    from megatron_kaja.checkpoint.convert import open_mcore_checkpoint
    from megatron_kaja.training import checkpointing

    if load is not None and Path(load).exists():
        load = Path(load)
        try:
            latest = checkpointing.latest_iteration(load)
            if latest is not None:
                arch = open_mcore_checkpoint(checkpointing.iteration_dir(load, latest)).arch
                source = f"training run {load} (iteration {latest})"
            elif (load / "config.json").is_file() and not (load / "megatron_kaja.json").is_file():
                arch, source = LlamaArch.from_hf_config(load), f"HF config {load / 'config.json'}"
            else:
                arch, source = open_mcore_checkpoint(load).arch, f"checkpoint {load}"
        except CheckpointError as exc:
            raise ConfigError(f"--load {load}: {exc}") from None
        settings.check_preset(arch, source)
        return arch, source
    if settings.model_preset is not None:
        where = f"; --load {load} is not on this machine" if load is not None else ""
        return PRESETS[settings.model_preset], f"preset {settings.model_preset}{where}"
    raise ConfigError(
        f"--load {load} is not on this machine: give --model-preset "
        f"({', '.join(sorted(PRESETS))}) to plan the run from the architecture"
    )


class DryRunReport:
    """Collects what a dry run found; missing files fail it unless allowed."""

    def __init__(self, title: str, settings: LaunchSettings):
        self.lines = [f"dry run: {title} (no GPU, no torch.distributed)"]
        self.settings = settings
        self.missing: list[str] = []

    def add(self, line: str) -> None:
        self.lines.append(line)

    def check_files(self, entries: list[tuple[str, str | Path | None]]) -> None:
        """`(flag, path)` pairs; hub ids count as missing (they cannot be checked offline)."""
        self.add("files:")
        for flag, path in entries:
            if path is None:
                continue
            found = Path(path).exists()
            self.add(f"  {flag} {path}: {'found' if found else 'NOT ON THIS MACHINE'}")
            if not found:
                self.missing.append(f"{flag} {path}")

    def check_data(self, flag: str, path: str | Path, read) -> None:
        """Read a data file on this machine through the run's own reader and validators
        (`read()` returns its record count): a malformed record fails the dry run with the
        error the run would stop on, naming file, line and field."""
        if not Path(path).exists():
            return  # reported by check_files
        try:
            count = read()
        except ValueError as exc:  # DataFormatError and the readers' own errors
            raise ConfigError(str(exc)) from None
        self.add(f"  {flag} {path}: {count} records, all valid")

    def check_tokenizer(self, path: Path, arch: LlamaArch) -> None:
        """Load a local tokenizer and check it fits the model's vocabulary."""
        if not Path(path).exists():
            return
        from transformers import AutoTokenizer

        try:
            size = len(AutoTokenizer.from_pretrained(path))
        except Exception as exc:  # any loading failure is a configuration error here
            raise ConfigError(f"--tokenizer {path}: cannot be loaded ({exc})") from None
        if size > arch.vocab_size:
            raise ConfigError(f"--tokenizer has {size} tokens, the model only {arch.vocab_size}")
        self.add(f"tokenizer: {size} tokens (model vocabulary {arch.vocab_size})")

    def check_layout(self, arch: LlamaArch, tp: int, pp: int, settings=None) -> None:
        """The TP x PP split of `arch`, with the uneven / virtual pipeline of `settings`."""
        try:
            check_parallel_layout(
                arch,
                tp,
                pp,
                first_stage_layers=getattr(settings, "decoder_first_pipeline_num_layers", None),
                last_stage_layers=getattr(settings, "decoder_last_pipeline_num_layers", None),
                virtual_stages=settings.virtual_pipeline_size(arch) if settings else None,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def recommend(self, arch: LlamaArch, layout) -> None:
        """Add the layout the memory estimator recommends for this world, micro-batch,
        length and optimizer (`memory.recommend_layout`)."""
        from dataclasses import asdict

        from megatron_kaja.training.memory import recommend_layout

        kept = ("micro_batch_size", "seq_length", "distributed_optimizer", "optimizer", "bf16")
        fixed = {k: v for k, v in asdict(layout).items() if k in kept}
        global_batch = layout.micro_batch_size * layout.num_micro_batches * layout.data_parallel
        found = recommend_layout(
            arch,
            layout.world_size,
            self.settings.gpu_memory_gb,
            gpus_per_node=min(8, self.settings.nproc_per_node or 8),
            global_batch_size=global_batch,
            flash_attention=layout.flash_attention,
            fp8=layout.fp8,
            **fixed,
        )
        if found is None:
            self.add(f"recommended layout: none fits {self.settings.gpu_memory_gb:g} GiB")
            return
        best, estimate = found
        self.add(f"recommended layout: {describe_layout(best)} ({estimate.total / GIB:.1f} GiB)")

    def finish(self, estimate: MemoryEstimate) -> int:
        """Print the report; 0 when everything checks out, 1 when it cannot run as planned."""
        gb = self.settings.gpu_memory_gb
        self.add(estimate.format(gb))
        problems = []
        if self.missing and not self.settings.allow_missing_files:
            problems.append(
                "missing: " + ", ".join(self.missing) + " (--allow-missing-files to plan anyway)"
            )
        if not estimate.fits(gb):
            problems.append(f"the estimate does not fit in --gpu-memory-gb {gb:g}")
        self.add("result: " + ("; ".join(problems) if problems else "OK"))
        print("\n".join(self.lines))
        return 1 if problems else 0


def describe_arch(arch: LlamaArch, source: str) -> str:
    return (
        f"model: {source}: hidden {arch.hidden_size}, ffn {arch.ffn_hidden_size}, "
        f"{arch.num_layers} layers, {arch.num_attention_heads} heads / "
        f"{arch.num_query_groups} KV groups, vocab {arch.vocab_size}"
    )


def describe_layout(layout) -> str:
    """A `TrainingLayout` as the flags that give it."""
    parts = [f"TP={layout.tensor_parallel}", f"PP={layout.pipeline_parallel}"]
    if layout.virtual_stages:
        parts.append(f"x {layout.virtual_stages} virtual stages")
    parts.append(f"DP={layout.data_parallel}")
    if layout.sequence_parallel:
        parts.append("--sequence-parallel")
    if layout.recompute == "full":
        parts.append(f"--recompute-granularity full --recompute-method {layout.recompute_method}")
        if layout.recompute_num_layers:
            parts.append(f"--recompute-num-layers {layout.recompute_num_layers}")
    elif layout.recompute == "selective":
        parts.append("--recompute-granularity selective")
    return " ".join(parts)


def describe_optimizer(cfg) -> str:
    """The optimizer and precision in a dry run's layout line."""
    if cfg.optimizer != "adam":
        kind = f"{cfg.optimizer} optimizer (bitsandbytes, replicated)"
    else:
        kind = f"{'distributed' if cfg.use_distributed_optimizer else 'replicated'} optimizer"
    return f"{kind}; {'bf16' if cfg.bf16 else 'fp32'}"


def start_plan(cfg, title: str) -> tuple[DryRunReport, LlamaArch, int]:
    """The dry-run steps every trainer shares: architecture, world and layout.

    Returns the report (with the model and world lines), the architecture and the
    data-parallel size; the batch layout is checked by the settings' one rule."""
    report = DryRunReport(title, cfg)
    arch, source = resolve_architecture(cfg.load, cfg)
    report.add(describe_arch(arch, source))
    world, world_source = world_size_for_plan(cfg)
    report.check_layout(arch, cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg)
    dp = cfg.check_world(world)
    report.add(f"world: {world} processes ({world_source})")
    return report, arch, dp


def plan_layout(cfg, data_parallel: int, seq_length: int, num_micro_batches: int, arch: LlamaArch):
    """The memory estimate's view of a run: its split, micro-batches, recompute, optimizer
    and scale settings."""
    from megatron_kaja.training.memory import TrainingLayout

    return TrainingLayout(
        tensor_parallel=cfg.tensor_model_parallel_size,
        pipeline_parallel=cfg.pipeline_model_parallel_size,
        data_parallel=data_parallel,
        micro_batch_size=cfg.micro_batch_size,
        seq_length=seq_length,
        num_micro_batches=num_micro_batches,
        recompute=cfg.recompute_granularity or "none",
        recompute_method=cfg.recompute_method or "uniform",
        recompute_num_layers=cfg.recompute_num_layers or None,
        sequence_parallel=cfg.sequence_parallel and cfg.tensor_model_parallel_size > 1,
        context_parallel=cfg.context_parallel_size,
        virtual_stages=cfg.virtual_pipeline_size(arch),
        first_stage_layers=cfg.decoder_first_pipeline_num_layers,
        last_stage_layers=cfg.decoder_last_pipeline_num_layers,
        distributed_optimizer=cfg.use_distributed_optimizer,
        optimizer=cfg.optimizer,
        bf16=cfg.bf16,
        fp8=cfg.fp8_format is not None,
        flash_attention=cfg.transformer_impl != "local",
    )
