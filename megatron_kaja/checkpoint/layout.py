"""Where a megatron checkpoint's files are: Megatron-LM's run folder, or one checkpoint folder.

Megatron-LM (and this project, converter and trainers alike) writes a run folder::

    DIR/latest_checkpointed_iteration.txt      "100", or "release"
    DIR/iter_0000100/                          torch_dist: metadata.json, .metadata,
                                               *.distcp, common.pt
                                               legacy: mp_rank_TT[_PPP]/model_optim_rng.pt
    DIR/release/                               (a release checkpoint, same contents)

Readers accept the run folder, one `iter_*` / `release` folder, or a bare torch_dist folder
(the layout this project's converter wrote before it wrote run folders).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from megatron_kaja.checkpoint import CheckpointError

TRACKER_FILE = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"
_RANK_DIR = re.compile(r"mp_rank_\d+(_\d+)?$")


@dataclass(frozen=True)
class CheckpointLocation:
    """One checkpoint: the folder holding its files, its format and its iteration."""

    dir: Path
    format: str  # "torch_dist" or "legacy"
    iteration: int | None  # None: a bare folder with no tracker

    @property
    def run_dir(self) -> Path | None:
        """The run folder around `dir`, when `dir` is one of its iteration folders."""
        return self.dir.parent if self.iteration is not None else None


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def read_tracker(run_dir: Path) -> tuple[str, int] | None:
    """(folder name, iteration) named by `run_dir`'s tracker file; None without one.

    Raises CheckpointError when the tracker holds anything but an iteration or "release"
    (a truncated write, a stray edit), naming the file and what it holds.
    """
    tracker = Path(run_dir) / TRACKER_FILE
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{tracker}: unreadable tracker file ({exc})") from None
    if text == "release":
        return "release", 0
    if not text.isdigit():
        raise CheckpointError(
            f"{tracker} is corrupt: it holds {text[:40]!r} where an iteration number or "
            "'release' belongs"
        )
    return iteration_dirname(int(text)), int(text)


def write_tracker(run_dir: Path, iteration: int) -> None:
    """Point `run_dir`'s tracker at `iteration`, atomically (a rename)."""
    tmp = Path(run_dir) / f".{TRACKER_FILE}.tmp"
    tmp.write_text(f"{iteration}\n", encoding="utf-8")
    os.replace(tmp, Path(run_dir) / TRACKER_FILE)


def folder_format(path: Path) -> str | None:
    """ "torch_dist", "legacy" or None for a folder holding one checkpoint's files."""
    # megatron-core's check_is_distributed_checkpoint needs metadata.json; reading needs both
    if (path / "metadata.json").is_file() and (path / ".metadata").is_file():
        return "torch_dist"
    if path.is_dir() and any(
        _RANK_DIR.match(child.name) and (child / LEGACY_FILE).is_file() for child in path.iterdir()
    ):
        return "legacy"
    return None


def locate_checkpoint(path: str | Path) -> CheckpointLocation:
    """Find the checkpoint a user means by `path` (run folder, iteration folder, bare folder)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"megatron checkpoint folder {path} does not exist")
    tracked = read_tracker(path)
    if tracked is not None:
        name, iteration = tracked
        ckpt_dir = path / name
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"{path / TRACKER_FILE} names {name}, which is missing")
        fmt = folder_format(ckpt_dir)
        if fmt is None:
            raise CheckpointError(
                f"{ckpt_dir}: no mp_rank_*/{LEGACY_FILE} files: neither a torch_dist checkpoint "
                "(metadata.json + .metadata) nor a legacy one"
            )
        return CheckpointLocation(ckpt_dir, fmt, iteration)
    fmt = folder_format(path)
    if fmt is None:
        raise CheckpointError(
            f"{path} is neither a torch_dist checkpoint (metadata.json + .metadata) "
            f"nor a legacy one ({TRACKER_FILE} or mp_rank_*/{LEGACY_FILE})"
        )
    match = re.fullmatch(r"iter_(\d+)", path.name)
    iteration = int(match.group(1)) if match else (0 if path.name == "release" else None)
    return CheckpointLocation(path, fmt, iteration)
