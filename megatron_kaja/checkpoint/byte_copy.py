"""Conversion as byte copies between files, without the bytes passing through Python.

An llm-jp-3 checkpoint holds the same bytes in its HF and its torch_dist form, in another
order: megatron's fused QKV is whole rows of q, k and v regrouped by KV head, fc1 is gate's
rows then up's, the vocabulary is padded with zero rows. When the dtype does not change, a
converted tensor is therefore a list of byte ranges of the source files, and the kernel can
copy them file to file (`copy_file_range`): no read into user memory, no page faults on fresh
tensors, no write from user memory. On a 2-core machine that is what brings a conversion
close to a `cp` of the same bytes.

The ranges are not written out by hand beside the key map: `row_sources` runs the key map's
own transform (`TensorMapping.global_from_hf` / `hf_from_global`) on tensors of row numbers,
so the byte plan is whatever the key map does to real tensors, row for row.
"""

from __future__ import annotations

import bisect
import errno
import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megatron_kaja.checkpoint import CheckpointError


@dataclass(frozen=True)
class StoredTensor:
    """A tensor stored as raw contiguous bytes at `offset` of the file `path`."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one element of a 1-D tensor)."""
        n = self.dtype.itemsize
        for dim in self.shape[1:]:
            n *= dim
        return n


@dataclass(frozen=True)
class ByteSource:
    """`length` bytes at `offset` of `path`; `path` None stands for zeros (padding)."""

    path: Path | None
    offset: int
    length: int


def row_sources(
    transform: Callable[[list[torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]],
    sources: Sequence[StoredTensor],
) -> list[list[ByteSource]] | None:
    """The bytes of each output of `transform(sources)` as ranges of the sources' files.

    `transform` is run on tensors of row numbers shaped like the sources with every trailing
    dimension 1; a transform that moves whole rows (reshapes, splits and concatenations
    along leading dimensions, zero padding) maps them to where each output row comes from.
    None when it does not (an output row is not one source row) or the sources' rows differ
    in size or dtype: the caller converts that tensor the ordinary way.
    """
    if not sources or len({(s.row_bytes, s.dtype) for s in sources}) != 1:
        return None
    row_bytes = sources[0].row_bytes
    ids, starts, first = [], [], 1  # row id 0 stands for a zero row
    for source in sources:
        rows = source.shape[0]
        shape = (rows, *([1] * (len(source.shape) - 1)))
        ids.append(torch.arange(first, first + rows, dtype=torch.int64).reshape(shape))
        starts.append(first)
        first += rows
    result = transform(ids)
    outputs = result if isinstance(result, tuple) else (result,)
    plans = []
    for out in outputs:
        if out.dim() == 0 or out.numel() != out.shape[0]:
            return None
        rows = out.reshape(-1).numpy()  # numpy: no thread-pool start-up per small op
        if len(rows) == 0:
            plans.append([])
            continue
        prev, cur = rows[:-1], rows[1:]
        # a row continues the run before it when it is the next row of the same source (a
        # run never crosses from one source into the next), or both are zero rows
        continues = ((cur == prev + 1) & (prev > 0) & ~np.isin(cur, starts)) | (
            (cur == 0) & (prev == 0)
        )
        bounds = [0, *(np.flatnonzero(~continues) + 1).tolist(), len(rows)]
        firsts = rows[bounds[:-1]].tolist()
        plans.append(
            [
                _run_bytes(row_id, end - begin, sources, starts, row_bytes)
                for row_id, begin, end in zip(firsts, bounds[:-1], bounds[1:], strict=True)
            ]
        )
    return plans


def _run_bytes(
    row_id: int, rows: int, sources: Sequence[StoredTensor], starts: list[int], row_bytes: int
) -> ByteSource:
    if row_id == 0:
        return ByteSource(None, 0, rows * row_bytes)
    index = bisect.bisect_right(starts, row_id) - 1
    source = sources[index]
    return ByteSource(
        source.path, source.offset + (row_id - starts[index]) * row_bytes, rows * row_bytes
    )


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
_ZEROS = bytes(1 << 20)


def copy_sources(dst_fd: int, dst_offset: int, sources: Sequence[ByteSource]) -> int:
    """Copy `sources` back to back into `dst_fd` at `dst_offset` (the file position is not
    used or moved); returns the bytes written."""
    written = 0
    fds: dict[Path, int] = {}
    try:
        for source in sources:
            at = dst_offset + written
            if source.path is None:
                for start in range(0, source.length, len(_ZEROS)):
                    n = min(len(_ZEROS), source.length - start)
                    os.pwrite(dst_fd, memoryview(_ZEROS)[:n], at + start)
            else:
                if source.path not in fds:
                    fds[source.path] = os.open(source.path, os.O_RDONLY)
                _copy_range(fds[source.path], source.offset, dst_fd, at, source.length)
            written += source.length
    finally:
        for fd in fds.values():
            os.close(fd)
    return written


def _copy_range(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, length: int) -> None:
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(
                src_fd, dst_fd, length - done, src_offset + done, dst_offset + done
            )
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            n = _copy_through_memory(
                src_fd, src_offset + done, dst_fd, dst_offset + done, length - done
            )
        if n == 0:
            raise CheckpointError(f"source file ended {length - done} bytes early")
        done += n


def _copy_through_memory(src_fd: int, src_offset: int, dst_fd: int, dst_offset: int, n: int):
    """The fallback where the kernel cannot copy between the two files (another filesystem
    on an old kernel): pread + pwrite, 64 MiB at a time."""
    data = os.pread(src_fd, min(n, 64 << 20), src_offset)
    if data:
        os.pwrite(dst_fd, data, dst_offset)
    return len(data)


class FileWindow(io.RawIOBase):
    """A read-only, seekable view of `length` bytes at `offset` of an open binary file, so a
    DCP item (a whole `torch.save` archive inside a `.distcp` file) can be opened alone."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._offset, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._length - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._offset + self._pos)
        got = self._f.readinto(view[:n])
        self._pos += got
        return got


def torch_save_data_offset(path: Path, offset: int, length: int) -> tuple[int, torch.Tensor]:
    """Where the one storage of the `torch.save` archive at `offset` of `path` keeps its bytes
    (an absolute file offset), and the archive's tensor without its data (shape, strides,
    dtype: `torch.load(weights_only=True)` under `skip_data` reads no storage bytes)."""
    with open(path, "rb") as f:
        try:
            archive = torch._C.PyTorchFileReader(FileWindow(f, offset, length))
            records = [r for r in archive.get_all_records() if r.startswith("data/")]
            data_at = offset + archive.get_record_offset(records[0]) if len(records) == 1 else 0
            with torch.serialization.skip_data():
                tensor = torch.load(FileWindow(f, offset, length), weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: unreadable item at byte {offset} ({str(exc).splitlines()[0]})"
            ) from None
    if len(records) != 1 or not isinstance(tensor, torch.Tensor):
        raise CheckpointError(f"{path}: the item at byte {offset} is not one tensor")
    return data_at, tensor


def _sync_file_range():
    """libc's `sync_file_range` (Linux), or None."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing `length` bytes at `offset` of `fd` to disk, without
    waiting. Left alone, the copied bytes stay dirty in the page cache until the final
    `fsync` / `sync` writes them all at once, after the copying; started as each tensor is
    copied, the disk writes overlap the remaining copies. A hint: no-op where unavailable."""
    if _SYNC_FILE_RANGE is not None and length > 0:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
