"""Append-only output that survives `kill -9`: accepted pairs, a journal of rejections, a summary.

`sft.jsonl` holds one record per accepted pair (what the SFT trainer reads);
`sft.rejected.jsonl` one entry per sample that finished rejected, with its reason;
`sft.summary.json` the counts. Each finished sample is one `os.write` of one whole line to
an `O_APPEND` descriptor: nothing is buffered in the process, so a killed process loses at
most the line it was writing. On open, a last line without its newline (torn by the kill)
is cut off; the ids in both files are the samples already done, skipped on a rerun.
Request failures (server down after all retries) are not journaled: a rerun tries again.
A second process writing the same output is refused (an exclusive `flock`, released by
the kernel when its holder dies, so a killed run never leaves a stale lock).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections import Counter
from pathlib import Path


def sidecar_paths(out: str | Path) -> tuple[Path, Path]:
    """(rejection journal, summary) beside the output: for `x.jsonl`, `x.rejected.jsonl` and
    `x.summary.json`."""
    out = Path(out)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    return out.with_name(f"{stem}.rejected.jsonl"), out.with_name(f"{stem}.summary.json")


def repair_torn_tail(path: Path) -> int:
    """Cut a last line that lacks its newline (a write torn by a kill); return bytes removed."""
    if not path.is_file():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline; lines are short, read the tail in blocks.
        end = size
        while end > 0:
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                keep = start + cut + 1
                break
            end = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


def read_lines(path: Path) -> list[dict]:
    """All records of a repaired JSONL file; a bad line (not torn: corrupted) names its place."""
    records = []
    if not path.is_file():
        return records
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({exc.msg}); the file is corrupted "
                    "(a torn last line is repaired on resume, a bad line elsewhere is not)"
                ) from None
    return records


class SynthStore:
    """The output files of one generation run, opened for appending."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.rejected_path, self.summary_path = sidecar_paths(self.out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.out.with_name(self.out.name + ".lock"), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(
                f"{self.out} is being written by another running generator"
            ) from None
        try:
            self._load()
        except BaseException:
            self._unlock()
            raise
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        self._out_fd = os.open(self.out, flags, 0o644)
        self._rejected_fd = os.open(self.rejected_path, flags, 0o644)

    def _load(self) -> None:
        """Repair torn tails and read what earlier runs wrote; the pipeline rebuilds its dedup
        index from `previous_*`, then drops them."""
        self.repaired_bytes = repair_torn_tail(self.out) + repair_torn_tail(self.rejected_path)
        self.previous_accepted = read_lines(self.out)
        self.previous_rejected = read_lines(self.rejected_path)
        self.accepted_count = len(self.previous_accepted)
        self.rejected_counts = Counter(entry["reason"] for entry in self.previous_rejected)
        seen: set[str] = set()
        for path, records in (
            (self.out, self.previous_accepted),
            (self.rejected_path, self.previous_rejected),
        ):
            for number, record in enumerate(records, 1):
                if record.get("id") in seen:
                    raise ValueError(f"{path}: record {number} repeats id {record.get('id')!r}")
                seen.add(record.get("id"))
        self.done_ids = seen

    def _unlock(self) -> None:
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)

    def _append(self, fd: int, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        written = os.write(fd, data)
        while written < len(data):  # a regular file takes it whole; be safe on short writes
            written += os.write(fd, data[written:])
        self.done_ids.add(record["id"])

    def append_accepted(self, record: dict) -> None:
        self._append(self._out_fd, record)
        self.accepted_count += 1

    def append_rejected(self, entry: dict) -> None:
        self._append(self._rejected_fd, entry)
        self.rejected_counts[entry["reason"]] += 1

    def sync(self) -> None:
        """Flush to disk (a kill needs no fsync, a power loss does; done with each summary)."""
        os.fsync(self._out_fd)
        os.fsync(self._rejected_fd)

    def write_summary(self, summary: dict) -> None:
        """Replace the summary atomically (temp file + rename)."""
        self.sync()
        tmp = self.summary_path.with_name(self.summary_path.name + ".tmp")
        tmp.write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.summary_path)

    def previous_summary(self) -> dict | None:
        if not self.summary_path.is_file():
            return None
        try:
            return json.loads(self.summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None

    def close(self) -> None:
        for fd in (self._out_fd, self._rejected_fd):
            os.close(fd)
        self._unlock()
