"""Tokenize each data source once, in parallel, into a memory-mapped on-disk cache.

A source's cache lives in ``<cache_dir>/<key>/`` with three .npy files (flat token ids,
flat assistant mask, per-sample offsets) opened with ``mmap_mode="r"``, so a 240k-sample
set costs no RAM and no tokenization on the next run. The key hashes the source's content
(files' bytes; for a hub id, its id/config/split), the tokenizer (vocab, normalizer,
special tokens) and the chat template. Sequence length and packing are applied after the
cache, so changing `--seq-length` re-packs (a second) without re-tokenizing.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megatron_kaja.data.chat import ChatRenderer
from megatron_kaja.data.readers import load_conversations
from megatron_kaja.data.records import Message
from megatron_kaja.data.sources import DataSource

CACHE_FORMAT_VERSION = "1"


def default_cache_dir() -> Path:
    """Where tokenized sources go without `--data-cache-dir`: the user's cache directory
    (`$XDG_CACHE_HOME`, else `~/.cache`) under `megatron_kaja/sft_tokens`, never the current
    directory (a run started inside a git checkout would litter it). Entries are keyed by
    content, so runs share them."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "megatron_kaja" / "sft_tokens"


_CHUNK = 512  # conversations per worker task: large enough to amortize pickling


@dataclass(frozen=True)
class TokenizedSamples:
    """All samples of one source: sample i is `tokens[offsets[i]:offsets[i + 1]]`."""

    tokens: np.ndarray  # int32 [total tokens]
    assistant_mask: np.ndarray  # uint8 [total tokens]
    offsets: np.ndarray  # int64 [num samples + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each sample (int64)."""
        return np.diff(self.offsets)

    @classmethod
    def load(cls, directory: Path) -> TokenizedSamples:
        """Open a cache directory written by `save`, memory-mapped."""
        return cls(
            *(np.load(directory / f"{name}.npy", mmap_mode="r") for name in _FIELDS),
        )

    def save(self, directory: Path) -> None:
        """Write atomically: a killed run never leaves a half-written cache behind."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
        for name in _FIELDS:
            np.save(tmp / f"{name}.npy", getattr(self, name))
        (tmp / "meta.json").write_text(json.dumps({"num_samples": len(self)}))
        try:
            os.replace(tmp, directory)
        except OSError:  # another rank wrote the same cache first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)


_FIELDS = ("tokens", "assistant_mask", "offsets")


def source_fingerprint(source: DataSource) -> str:
    """Hash of a source's content: file bytes, a directory's files, or a hub id."""
    h = hashlib.sha256(f"{source.name}|{source.split}".encode())
    path = Path(source.path)
    if not path.exists():  # a hub id: delete its cache entry to pick up a new revision
        h.update(f"hub:{source.path}".encode())
        return h.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        h.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def cache_key(source: DataSource, renderer: ChatRenderer) -> str:
    """The cache directory name of `source` tokenized by `renderer`."""
    h = hashlib.sha256(CACHE_FORMAT_VERSION.encode())
    h.update(source_fingerprint(source).encode())
    h.update(renderer.fingerprint().encode())
    return h.hexdigest()[:24]


def tokenize_sources(
    sources: list[DataSource],
    renderer: ChatRenderer,
    cache_dir: str | Path,
    num_workers: int = 1,
) -> list[TokenizedSamples]:
    """Tokenized samples of each source, from the cache or tokenized now (then cached).

    Every uncached source is read and validated before any of them is tokenized, so a
    bad record in the last file fails in seconds, not after an hour of tokenizing.
    """
    cache_dir = Path(cache_dir)
    directories = [cache_dir / cache_key(source, renderer) for source in sources]
    pending = {
        i: load_conversations(source)
        for i, (source, directory) in enumerate(zip(sources, directories, strict=True))
        if not (directory / "meta.json").exists()
    }
    for i, conversations in pending.items():
        locations = [f"{sources[i].path}: sample {j}" for j in range(len(conversations))]
        tokenize_conversations(conversations, locations, renderer, num_workers).save(directories[i])
    return [TokenizedSamples.load(directory) for directory in directories]


def tokenize_conversations(
    conversations: list[list[Message]],
    locations: list[str],
    renderer: ChatRenderer,
    num_workers: int = 1,
) -> TokenizedSamples:
    """Tokenize conversations (in `num_workers` processes when > 1) into one flat store."""
    tasks = [
        (conversations[i : i + _CHUNK], locations[i : i + _CHUNK])
        for i in range(0, len(conversations), _CHUNK)
    ]
    if num_workers > 1 and len(tasks) > 1:
        with multiprocessing.Pool(
            num_workers, initializer=_init_worker, initargs=(renderer,)
        ) as pool:
            parts = pool.map(_tokenize_chunk_in_worker, tasks)
    else:
        parts = [_tokenize_chunk(renderer, *task) for task in tasks]
    lengths = np.concatenate([p[2] for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedSamples(
        np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), offsets
    )


def _tokenize_chunk(renderer: ChatRenderer, conversations, locations):
    samples = [
        renderer.tokenize(c, where) for c, where in zip(conversations, locations, strict=True)
    ]
    return (
        np.concatenate([s.input_ids for s in samples]),
        np.concatenate([s.assistant_mask for s in samples]),
        np.array([len(s.input_ids) for s in samples], dtype=np.int64),
    )


# Per worker process only: the renderer arrives once through the pool initializer instead
# of being pickled with every chunk.
_worker_renderer: ChatRenderer | None = None


def _init_worker(renderer: ChatRenderer) -> None:
    global _worker_renderer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    _worker_renderer = renderer


def _tokenize_chunk_in_worker(task):
    return _tokenize_chunk(_worker_renderer, *task)
