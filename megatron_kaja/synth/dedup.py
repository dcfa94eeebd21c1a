"""Exact and near-duplicate questions, and overlap with evaluation questions.

Texts are compared after `normalize_text` (NFKC, lower case, no spaces, punctuation or
symbols), as character n-grams: Japanese has no spaces to split words on, and character
shingles are the usual unit for it.

Near duplicates use MinHash + LSH banding (Broder 1997; Leskovec et al., "Mining of Massive
Datasets", ch. 3): each question gets `num_perm` min-hashes of its shingles; two questions
whose signatures agree on a whole band of `rows` hashes become candidates, and a candidate
is a duplicate when the share of agreeing hashes (an unbiased estimate of the Jaccard
similarity of the shingle sets) reaches the threshold. 64 hashes in 16 bands of 4 make
pairs at Jaccard 0.8 candidates with probability 1 - (1 - 0.8^4)^16 > 0.9998, while the
signatures take 256 bytes per question (60 MB at 240k).
"""

from __future__ import annotations

import hashlib
import unicodedata
import zlib
from collections import Counter, defaultdict

import numpy as np


def normalize_text(text: str) -> str:
    """NFKC, lower case, without whitespace, punctuation and symbols (categories Z, P, S, C)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(c for c in text if unicodedata.category(c)[0] in "LNM")


def char_ngrams(text: str, n: int) -> set[str]:
    """The set of `n`-character substrings; a text shorter than `n` is its own single gram."""
    if len(text) <= n:
        return {text} if text else set()
    return {text[i : i + n] for i in range(len(text) - n + 1)}


class MinHasher:
    """MinHash signatures: hash i of a shingle is splitmix64(crc32(shingle) XOR key_i), a
    strong 64-bit mixer, so that every one of the `num_perm` hashes orders the shingles
    independently (a linear (a x + b) mod p over 32-bit inputs barely wraps and keeps the
    inputs' order, which makes the smallest CRC win in every hash). Fixed keys: the same
    signatures in every process."""

    def __init__(self, num_perm: int = 64, ngram: int = 3, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.keys = rng.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64)
        self.ngram = ngram

    @staticmethod
    def _splitmix64(z: np.ndarray) -> np.ndarray:
        # Steele et al., "Fast splittable pseudorandom number generators" (2014), finalizer;
        # uint64 arithmetic wraps modulo 2^64 as the algorithm intends.
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def signature(self, normalized: str) -> np.ndarray:
        shingles = char_ngrams(normalized, self.ngram) or {""}
        x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64)
        hashed = self._splitmix64(x[:, None] ^ self.keys[None, :])
        # The low 32 bits of the minimum: collisions at 2^-32 do not move a Jaccard estimate.
        return (hashed.min(axis=0) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


class QuestionDeduplicator:
    """Remembers accepted questions; `check_and_add` rejects exact and near repeats."""

    def __init__(
        self, threshold: float = 0.8, num_perm: int = 64, bands: int = 16, ngram: int = 3
    ) -> None:
        if num_perm % bands:
            raise ValueError(f"dedup: num_perm ({num_perm}) must be a multiple of bands ({bands})")
        if not 0 < threshold <= 1:
            raise ValueError(
                f"dedup: the near-duplicate threshold must be in (0, 1], got {threshold}"
            )
        self.threshold = threshold
        self.rows = num_perm // bands
        self.bands = bands
        self.hasher = MinHasher(num_perm, ngram)
        self._exact: set[bytes] = set()
        self._signatures: list[np.ndarray] = []
        self._buckets: list[dict[bytes, list[int]]] = [defaultdict(list) for _ in range(bands)]

    def __len__(self) -> int:
        return len(self._signatures)

    def check_and_add(self, question: str) -> str | None:
        """None (and remember `question`) when new; else "duplicate" or "near_duplicate"."""
        normalized = normalize_text(question)
        digest = hashlib.blake2b(normalized.encode(), digest_size=16).digest()
        if digest in self._exact:
            return "duplicate"
        signature = self.hasher.signature(normalized)
        keys = [signature[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(self.bands)]
        candidates = {j for band, key in enumerate(keys) for j in self._buckets[band].get(key, ())}
        for j in candidates:
            if np.mean(self._signatures[j] == signature) >= self.threshold:
                return "near_duplicate"
        index = len(self._signatures)
        self._exact.add(digest)
        self._signatures.append(signature)
        for band, key in enumerate(keys):
            self._buckets[band][key].append(index)
        return None


class EvalOverlapIndex:
    """Character n-grams of evaluation questions, to keep them out of training data.

    A generated question is contaminated when, for some evaluation question, the n-grams
    they share cover at least `threshold` of the shorter one's n-grams (the overlap
    coefficient): this catches a copied test question, and one with text added around it.
    """

    def __init__(self, questions: list[str], ngram: int = 8, threshold: float = 0.5) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"decontamination threshold must be in (0, 1], got {threshold}")
        self.ngram = ngram
        self.threshold = threshold
        self._sizes: list[int] = []
        self._postings: dict[str, list[int]] = defaultdict(list)
        for question in questions:
            grams = char_ngrams(normalize_text(question), ngram)
            for gram in grams:
                self._postings[gram].append(len(self._sizes))
            self._sizes.append(len(grams))

    def __len__(self) -> int:
        return len(self._sizes)

    def overlap(self, question: str) -> float:
        """The largest overlap coefficient of `question` with any evaluation question."""
        grams = char_ngrams(normalize_text(question), self.ngram)
        shared = Counter(i for gram in grams for i in self._postings.get(gram, ()))
        return max(
            (count / min(len(grams), self._sizes[i]) for i, count in shared.items()), default=0.0
        )

    def is_contaminated(self, question: str) -> bool:
        return self.overlap(question) >= self.threshold
