"""When a training loop saves and stops: --save-interval, --exit-interval, SIGTERM, the end."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable

import torch
import torch.distributed as dist

from megatron_kaja.parallel.distributed import compute_device

logger = logging.getLogger("megatron_kaja.train")


class RunControl:
    """Shared by the SFT and GRPO loops.

    SIGTERM (cluster preemption) only raises a flag; at the end of the step every rank
    learns whether any rank got it, the run saves and the loop stops. `--exit-interval`
    does the same at multiples of N, and the last step always saves. A SIGTERM sent to
    `torchrun` itself reaches the workers' whole process groups; the checkpoint writer's
    results-queue process is shielded from it (`checkpointing`), and torchrun waits its
    `--shutdown-timeout` (30 s by default) before SIGKILL: a save that takes longer is cut,
    the previous checkpoint staying intact. Rank 0 logs which checkpoint was saved.
    """

    def __init__(
        self,
        *,
        train_iters: int,
        save: Callable[[int], None] | None,
        save_interval: int | None,
        exit_interval: int | None,
        handle_sigterm: bool = True,
    ):
        self.train_iters = train_iters
        self._save = save
        self.save_interval = save_interval
        self.exit_interval = exit_interval
        self.sigterm = False
        if handle_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.sigterm = True

    def _sigterm_on_any_rank(self) -> bool:
        flag = torch.tensor([int(self.sigterm)], device=compute_device())  # NCCL: on the device
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def after_step(self, iteration: int) -> bool:
        """Save if due; True when the loop must stop after `iteration`."""
        saved = False
        if self._save and self.save_interval and iteration % self.save_interval == 0:
            self._save(iteration)
            saved = True
        last = iteration >= self.train_iters
        sigterm = self._sigterm_on_any_rank()
        early = sigterm or (self.exit_interval is not None and iteration % self.exit_interval == 0)
        if (last or early) and self._save and not saved:
            if sigterm:
                self._log(f"SIGTERM received: saving iteration {iteration} before stopping")
            self._save(iteration)  # a failure raises, naming the checkpoint left intact
            saved = True
        if sigterm:
            self._log(
                f"SIGTERM received: stopped after iteration {iteration}, "
                + ("saved" if saved else "not saved (no --save)")
            )
        return last or early

    @staticmethod
    def _log(message: str) -> None:
        if dist.get_rank() == 0:
            logger.warning(message)
