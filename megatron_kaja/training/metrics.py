"""Training metrics: a JSONL file, a human log line, TensorBoard and W&B where configured.

MFU (model FLOPs utilization) uses the PaLM paper's count (Chowdhery et al. 2022, App. B):
training FLOPs per token = 6 N + 12 L H s, with N the parameters that take part in matrix
multiplications (all but the input embedding), L layers, H = heads x head_dim and s the
sequence length; MFU = tokens/s x FLOPs per token / (devices x peak FLOP/s per device).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from megatron_kaja.models.llama.config import LlamaArch

logger = logging.getLogger("megatron_kaja.train")

# Dense bf16 peak (TFLOP/s) of common accelerators, for MFU when --peak-tflops is not given.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def matmul_params(arch: LlamaArch) -> int:
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    attn = (
        h * (arch.num_attention_heads + 2 * arch.num_query_groups) * d
        + arch.num_attention_heads * d * h
    )
    return arch.num_layers * (attn + 3 * h * f) + arch.vocab_size * h


def training_flops_per_token(arch: LlamaArch, seq_length: int) -> float:
    """6N + 12 L H s (PaLM's model FLOPs per token, forward + backward)."""
    heads_dim = arch.num_attention_heads * arch.head_dim
    return 6.0 * matmul_params(arch) + 12.0 * arch.num_layers * heads_dim * seq_length


def default_peak_tflops() -> float | None:
    """The bf16 peak of this machine's GPU if it is a known one (None on CPU)."""
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop the records of steps after `last_step` from a metrics JSONL file, and a torn
    last line; atomically (a temporary file renamed over it). Returns the lines dropped.

    A run resumed from the checkpoint of step N redoes steps N+1...: their first records
    would otherwise stay in the file beside the new ones. Lines without a step are kept."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                step = json.loads(line).get("step")
            except (ValueError, AttributeError):
                dropped += 1  # a line torn by a kill, or not a record
                continue
            if isinstance(step, int) and step > last_step:
                dropped += 1
                continue
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Writes one JSON line per logged step (and mirrors to TensorBoard / W&B) on one rank.

    `resume_from_step`: the step the run starts after (the loaded checkpoint's, 0 for a new
    run). Records of later steps already in the file (and TensorBoard events) are dropped
    first, so that every step appears once in a resumed run's metrics."""

    def __init__(
        self,
        metrics_file: Path | None,
        *,
        enabled: bool,
        tensorboard_dir: Path | None = None,
        wandb_project: str | None = None,
        wandb_name: str | None = None,
        run_config: dict | None = None,
        resume_from_step: int | None = None,
    ):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if metrics_file is not None:
            Path(metrics_file).parent.mkdir(parents=True, exist_ok=True)
            if resume_from_step is not None:
                dropped = truncate_metrics(Path(metrics_file), resume_from_step)
                if dropped:
                    logger.info(
                        "%s: dropped %d records after step %d (redone by this run)",
                        metrics_file, dropped, resume_from_step,
                    )  # fmt: skip
            self._file = open(metrics_file, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("--tensorboard-dir needs `pip install tensorboard`") from exc
            # purge_step hides the events a resumed run writes again.
            purge = resume_from_step + 1 if resume_from_step else None
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge)
        if wandb_project is not None:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("--wandb-project needs `pip install wandb`") from exc
            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=run_config)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()
        step = record.get("step")
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"}
        if self._tb is not None:
            for key, value in numbers.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Throughput:
    """Tokens/s and ETA over the steps since the last report."""

    def __init__(self, total_steps: int, start_step: int):
        self.total_steps = total_steps
        self.started = time.perf_counter()
        self.start_step = start_step
        self.last_time = self.started
        self.last_step = start_step

    def report(self, step: int, tokens_per_step: int) -> dict:
        now = time.perf_counter()
        steps = max(step - self.last_step, 1)
        seconds = max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, step
        elapsed = now - self.started
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        return {
            "tokens_per_s": tokens_per_step * steps / seconds,
            "step_time_s": seconds / steps,
            "elapsed_s": elapsed,
            "eta_s": eta,
        }


def format_log_line(record: dict) -> str:
    parts = [f"step {record['step']}/{record['train_iters']}", f"loss {record['loss']:.4f}"]
    parts.append(f"lr {record['lr']:.3e}")
    parts.append(f"grad_norm {record['grad_norm']:.3f}")
    parts.append(f"tok/s {record['tokens_per_s']:.0f}")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"elapsed {record['elapsed_s']:.0f}s ETA {record['eta_s']:.0f}s")
    return " | ".join(parts)
