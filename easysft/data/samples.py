"""Tokenized samples on disk: written in chunks, read back through memory maps.

One split of a cache entry is three raw little-endian files (no header; the dtype is part of the cache format):

- ``{split}_ids.bin``      int32, every sample's ``input_ids`` concatenated;
- ``{split}_offsets.bin``  int64, ``num_samples + 1`` values; sample ``i`` is ``ids[offsets[i]:offsets[i + 1]]``;
- ``{split}_mask.bin``     uint8, 1 where the token is supervised (its label is the token), 0 where it is -100.

:class:`SplitWriter` appends chunk after chunk (memory bounded by one chunk, whatever the number of rows) and
:class:`SampleView` reads the files with ``np.memmap``: every process that opens the same entry shares one copy
in the page cache, and a sample costs private memory only while a batch holds it. A view behaves like the
``list[dict]`` it replaced: ``len``, indexing (``{"input_ids": [...], "labels": [...]}``, lists of ints),
iteration, ``==`` against another view or a list; :attr:`SampleView.lengths` gives every sample's length at once.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence

import numpy as np

from easysft.data.tokenize import IGNORE_INDEX

IDS_DTYPE = np.dtype("<i4")
OFFSETS_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")


def split_files(folder: str, split: str) -> dict[str, str]:
    return {part: os.path.join(folder, f"{split}_{part}.bin") for part in ("ids", "offsets", "mask")}


CHECKSUM = "blake2b"  # the digest of every .bin file, stored in the entry's meta.json (see easysft.data.cache)


def new_digest():
    return hashlib.blake2b(digest_size=32)


class _DigestFile:
    """A binary file opened for writing that hashes what is written to it (no second read for the checksum)."""

    def __init__(self, path: str):
        self.name = path
        self._handle = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self.digest = new_digest()

    def write(self, data: bytes) -> None:
        self._handle.write(data)
        self.digest.update(data)

    def close(self) -> None:
        self._handle.close()


class SplitWriter:
    """Append samples (as arrays) to one split's files; :meth:`close` writes the offsets' last chunk."""

    def __init__(self, folder: str, split: str):
        files = split_files(folder, split)
        self._names = {part: os.path.basename(path) for part, path in files.items()}
        # Closed in close(); they live across many appends. Each hashes its bytes as they are written.
        self._ids = _DigestFile(files["ids"])
        self._mask = _DigestFile(files["mask"])
        self._offsets = _DigestFile(files["offsets"])
        self._offsets.write(np.zeros(1, OFFSETS_DTYPE).tobytes())
        self.num_tokens = 0
        self.num_samples = 0

    def append(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        """``ids``/``mask``: the tokens of ``len(lengths)`` consecutive samples, concatenated."""
        if len(lengths) == 0:
            return
        self._ids.write(np.ascontiguousarray(ids, IDS_DTYPE).tobytes())
        self._mask.write(np.ascontiguousarray(mask, MASK_DTYPE).tobytes())
        ends = self.num_tokens + np.cumsum(lengths, dtype=np.int64)
        self._offsets.write(ends.astype(OFFSETS_DTYPE).tobytes())
        self.num_tokens = int(ends[-1])
        self.num_samples += len(lengths)

    def append_samples(self, samples: Sequence[dict]) -> None:
        """Append sample dicts (``input_ids``/``labels`` lists); a supervised label must equal its token."""
        if not samples:
            return
        ids = np.fromiter((t for s in samples for t in s["input_ids"]), dtype=np.int64)
        labels = np.fromiter((t for s in samples for t in s["labels"]), dtype=np.int64, count=len(ids))
        mask = labels != IGNORE_INDEX
        # Invariant (docs/ARCHITECTURE.md rule 1): a supervised label is the token itself, so a mask is enough.
        assert np.array_equal(labels[mask], ids[mask]), "supervised labels must equal their input ids"
        self.append(ids, mask, np.array([len(s["input_ids"]) for s in samples], dtype=np.int64))

    def close(self) -> None:
        for handle in (self._ids, self._mask, self._offsets):
            handle.close()

    def checksums(self) -> dict[str, str]:
        """``{file name: hex digest}`` of the bytes written so far (complete once the writer is closed)."""
        handles = {"ids": self._ids, "offsets": self._offsets, "mask": self._mask}
        return {self._names[part]: handle.digest.hexdigest() for part, handle in handles.items()}


def _map(path: str, dtype: np.dtype) -> np.ndarray:
    size = os.path.getsize(path)
    if size % dtype.itemsize:
        raise ValueError(f"{path}: size {size} is not a multiple of {dtype.itemsize}")
    if size == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class SampleView(Sequence):
    """Read-only, memory-mapped samples of one split (see the module docstring)."""

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, mask: np.ndarray, mask_path: str | None = None):
        if len(offsets) < 1 or len(ids) != len(mask) or int(offsets[-1]) != len(ids):
            raise ValueError("sample arrays of inconsistent lengths")
        self._ids, self._offsets, self._mask = ids, offsets, mask
        self._mask_path = mask_path  # the file behind ``mask`` (read in blocks by supervised_counts)

    @classmethod
    def open(cls, folder: str, split: str) -> SampleView:
        files = split_files(folder, split)
        return cls(_map(files["ids"], IDS_DTYPE), _map(files["offsets"], OFFSETS_DTYPE),
                   _map(files["mask"], MASK_DTYPE), mask_path=files["mask"])

    @classmethod
    def from_samples(cls, samples: Sequence[dict]) -> SampleView:
        """An in-memory view of sample dicts (tests, small data)."""
        lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.array([t for s in samples for t in s["input_ids"]], dtype=np.int32)
        mask = np.array([t != IGNORE_INDEX for s in samples for t in s["labels"]], dtype=np.uint8)
        return cls(ids, offsets, mask)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range ({len(self)} samples)")
        start, stop = int(self._offsets[index]), int(self._offsets[index + 1])
        ids = np.asarray(self._ids[start:stop], dtype=np.int64)
        labels = np.where(self._mask[start:stop].astype(bool), ids, IGNORE_INDEX)
        return {"input_ids": ids.tolist(), "labels": labels.tolist()}

    def __iter__(self) -> Iterator[dict]:
        return (self[i] for i in range(len(self)))

    @property
    def lengths(self) -> np.ndarray:
        """Every sample's token count (int64, a fresh array of ``len(self)`` values)."""
        return np.diff(np.asarray(self._offsets))

    def supervised_counts(self, block_tokens: int = 1 << 22) -> np.ndarray:
        """Every sample's supervised token count (int64, ``len(self)`` values).

        A file-backed view reads its mask file in blocks of about ``block_tokens`` tokens with plain reads, not
        through the memory map: pages read through a map stay in this process's resident memory, so counting a
        million-sample split that way would add the whole mask (one byte per token) to the training run's peak.
        """
        offsets = np.asarray(self._offsets)
        if self._mask_path is None:
            return _span_sums(np.asarray(self._mask), offsets, 0)
        counts = np.zeros(len(self), np.int64)
        first = 0
        with open(self._mask_path, "rb") as handle:
            while first < len(self):
                # Samples first..last-1 span at most block_tokens tokens (always at least one sample).
                last = max(first + 1, int(np.searchsorted(offsets, offsets[first] + block_tokens, "right")) - 1)
                start, stop = int(offsets[first]), int(offsets[last])
                handle.seek(start)
                block = np.frombuffer(handle.read(stop - start), dtype=MASK_DTYPE)
                counts[first:last] = _span_sums(block, offsets[first:last + 1], start)
                first = last
        return counts

    def __eq__(self, other) -> bool:
        if isinstance(other, SampleView):
            return (np.array_equal(self._offsets, other._offsets) and np.array_equal(self._ids, other._ids)
                    and np.array_equal(self._mask, other._mask))
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence semantics, like a list

    def __repr__(self) -> str:
        return f"SampleView({len(self)} samples, {len(self._ids)} tokens)"


def _span_sums(mask: np.ndarray, offsets: np.ndarray, base: int) -> np.ndarray:
    """Sum of ``mask`` over each span ``offsets[i] - base : offsets[i + 1] - base`` (empty spans give 0)."""
    running = np.zeros(len(mask) + 1, np.int64)
    np.cumsum(mask, dtype=np.int64, out=running[1:])
    return running[offsets[1:] - base] - running[offsets[:-1] - base]


def supervised_counts(samples: Sequence[dict]) -> Sequence[int]:
    """Supervised token count of every sample: from the mask of a :class:`SampleView` (bounded memory, see
    :meth:`SampleView.supervised_counts`), counted for a list."""
    if isinstance(samples, SampleView):
        return samples.supervised_counts()
    return [sum(1 for label in s["labels"] if label != IGNORE_INDEX) for s in samples]


def sample_lengths(samples: Sequence[dict]) -> Sequence[int]:
    """Token count of every sample: read from the offsets of a :class:`SampleView`, counted for a list."""
    if isinstance(samples, SampleView):
        return samples.lengths
    return [len(s["input_ids"]) for s in samples]
