"""Content-addressed, atomic on-disk cache of tokenized data.

Where: ``--cache_dir`` if given, else ``$EASYSFT_DATA_CACHE``, else ``~/.cache/easysft/data``.

One entry = one folder ``<root>/<key>/`` where ``key`` hashes everything that can change the result (see
``dataset.cache_key_parts``: data bytes or dataset fingerprints, the tokenizer's content, the template, the
length flags, data_split, eval_fraction, seed, row limits, multi_turn, strict, and :data:`CACHE_FORMAT`).
Inside, per split, three raw arrays hold the samples compactly (``{split}_ids.bin``, ``{split}_offsets.bin``,
``{split}_mask.bin``: see :mod:`easysft.data.samples`), plus ``report.json`` and ``meta.json`` (written last).
They are written chunk by chunk (:class:`EntryWriter`) and read back as memory maps (:class:`SampleView`), so
neither preparing nor training holds the whole data set in private memory, and the ranks of one machine share
one copy in the page cache. Entries are written into a temporary folder in the same root and renamed into
place, so a crash never leaves an entry that loads; a folder that fails to load is treated as missing and
rebuilt. ``meta.json`` also holds a checksum of every ``.bin`` file (hashed while the writer appends, so it costs
no extra read); :func:`load_entry` reads the files back in blocks and checks them before training, so an entry
changed after it was written (a file overwritten in place, even at the same size) is rebuilt, with a note.

Distributed runs: only the main rank builds; the others call :func:`wait_for_entry`, which polls the file
system (no collectives) until the entry appears, rank 0 leaves a failure note (``<key>.failed``), or the
timeout passes (``$EASYSFT_DATA_WAIT_S``, default 3600 s).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass

from easysft.data.samples import CHECKSUM, SampleView, SplitWriter, new_digest
from easysft.errors import DataError
from easysft.files import sweep_stale_temporaries, terminate_raises

# Bump when adapters, tokenization or the stored format change what an entry holds.
# 2: raw .bin arrays written in chunks, read as memory maps; 3: a conversation is one sample; 4: meta.json holds a
# checksum of every .bin file (older entries have none, and are rebuilt).
CACHE_FORMAT = 4
CHECK_BLOCK_BYTES = 1 << 22  # files are read back in blocks of this size to check their checksums
DEFAULT_WAIT_S = 3600.0
# A failure note older than this (before the waiter started) belongs to an earlier run and is ignored.
FAILURE_NOTE_GRACE_S = 120.0


@dataclass
class CacheEntry:
    train: SampleView
    eval: SampleView
    report: dict
    path: str


def cache_root(cache_dir: str | None = None) -> str:
    """The cache folder: the --cache_dir flag, else $EASYSFT_DATA_CACHE, else ~/.cache/easysft/data."""
    root = cache_dir or os.environ.get("EASYSFT_DATA_CACHE") or os.path.join("~", ".cache", "easysft", "data")
    return os.path.abspath(os.path.expanduser(root))


def make_key(parts: dict) -> str:
    """A short stable hash of a JSON-able dict (keys sorted, so order never matters)."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: vocabulary/merges/normalizer, special tokens, chat template."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())  # the full tokenizer.json: model, normalizer, post-processor
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    extra = {
        "special": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------
# Writing and reading entries


class EntryWriter:
    """Writes one entry into a temporary folder: ``writer.splits["train"].append(...)``, then :meth:`commit`.

    Use it as a context manager: leaving the block without a commit (an error, a full disk, Ctrl-C, SIGTERM)
    removes the temporary folder, so nothing half-written is ever found. Temporary folders of processes that died
    before their clean-up (SIGKILL, power loss) are swept when the next writer starts.
    """

    def __init__(self, root: str, key: str):
        self.root, self.key = root, key
        os.makedirs(root, exist_ok=True)
        sweep_stale_temporaries(root)
        self._signals = contextlib.ExitStack()
        self.tmp = os.path.join(root, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.makedirs(self.tmp)
        self.splits = {split: SplitWriter(self.tmp, split) for split in ("train", "eval")}
        self.path: str | None = None

    def commit(self, report: dict, meta: dict) -> str:
        """Close the arrays, write report.json and meta.json (last), rename into place; return the folder."""
        checksums: dict[str, str] = {}
        for writer in self.splits.values():
            writer.close()
            checksums.update(writer.checksums())
        with open(os.path.join(self.tmp, "report.json"), "w", encoding="utf-8") as handle:
            json.dump(report, handle, ensure_ascii=False)
        # meta.json last: its presence in a renamed folder means every other file was fully written.
        with open(os.path.join(self.tmp, "meta.json"), "w", encoding="utf-8") as handle:
            json.dump({"format": CACHE_FORMAT, "key": self.key, **meta,
                       "checksums": {"algorithm": CHECKSUM, "files": checksums}}, handle, default=str)
        final = os.path.join(self.root, self.key)
        if os.path.isdir(final) and load_entry(self.root, self.key, quiet=True) is None:
            shutil.rmtree(final, ignore_errors=True)  # a broken leftover (copied or hand-edited): replace it
        try:
            os.rename(self.tmp, final)
        except OSError:
            if load_entry(self.root, self.key, quiet=True) is None:
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)  # another process finished the same entry first
        clear_failure(self.root, self.key)
        self.path = final
        return final

    def __enter__(self) -> EntryWriter:
        self._signals.enter_context(terminate_raises())  # SIGTERM unwinds through __exit__ below
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.path is None:
                for writer in self.splits.values():
                    _close_quietly(writer)
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            self._signals.close()


def _close_quietly(writer: SplitWriter) -> None:
    """Close a split's files when the entry is abandoned. Closing flushes the buffers, which raises again on a
    full disk; each failed close still closes its own file, so retrying closes the rest (an open file would keep
    its blocks on the disk after the folder is removed)."""
    for _ in range(4):
        try:
            writer.close()
            return
        except OSError:
            continue


def save_entry(root: str, key: str, train: list[dict], evals: list[dict], report: dict, meta: dict) -> str:
    """Write an entry of sample dicts atomically (temp folder + rename); return its folder."""
    with EntryWriter(root, key) as writer:
        writer.splits["train"].append_samples(train)
        writer.splits["eval"].append_samples(evals)
        return writer.commit(report, meta)


def load_entry(root: str, key: str, *, verify: bool = True, quiet: bool = False) -> CacheEntry | None:
    """The entry for ``key``, or None when it is missing, unreadable or changed since it was written (it is then
    rebuilt). ``verify``: check every .bin file against the checksums in meta.json (read in blocks: memory stays
    bounded); a mismatch prints one ``easysft: note:`` line unless ``quiet``."""
    folder = os.path.join(root, key)
    try:
        with open(os.path.join(folder, "meta.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return None
        checksums = meta.get("checksums")
        if (not isinstance(checksums, dict) or checksums.get("algorithm") != CHECKSUM
                or not isinstance(checksums.get("files"), dict)):
            return None
        with open(os.path.join(folder, "report.json"), encoding="utf-8") as handle:
            report = json.load(handle)
        if verify:
            changed = _changed_files(folder, checksums["files"])
            if changed:
                if not quiet:
                    print(f"easysft: note: the data cache entry {folder} does not match its checksums "
                          f"({', '.join(changed)} changed after it was written); rebuilding it.",
                          file=sys.stderr, flush=True)
                return None
        return CacheEntry(SampleView.open(folder, "train"), SampleView.open(folder, "eval"), report, folder)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _changed_files(folder: str, expected: dict) -> list[str]:
    """The names of the entry's .bin files whose bytes do not hash to ``expected`` (missing ones included)."""
    names = sorted({n for n in os.listdir(folder) if n.endswith(".bin")} | set(expected))
    changed = []
    for name in names:
        digest = new_digest()
        try:
            with open(os.path.join(folder, name), "rb") as handle:
                for block in iter(lambda h=handle: h.read(CHECK_BLOCK_BYTES), b""):
                    digest.update(block)
        except OSError:
            changed.append(name)
            continue
        if digest.hexdigest() != expected.get(name):
            changed.append(name)
    return changed


# ------------------------------------------------------------------------------------------------------
# Waiting on the main rank


def _failure_path(root: str, key: str) -> str:
    return os.path.join(root, f"{key}.failed")


def write_failure(root: str, key: str, message: str) -> None:
    """Leave a note so waiting ranks fail at once with rank 0's message instead of timing out."""
    try:
        os.makedirs(root, exist_ok=True)
        with open(_failure_path(root, key), "w", encoding="utf-8") as handle:
            handle.write(message)
    except OSError:
        pass  # best effort: the waiters still time out with a clear message


def clear_failure(root: str, key: str) -> None:
    try:
        os.remove(_failure_path(root, key))
    except FileNotFoundError:
        pass


def wait_for_entry(root: str, key: str, *, timeout_s: float | None = None, poll_s: float = 1.0) -> CacheEntry:
    """Poll until the main rank's entry for ``key`` loads; DataError on rank 0's failure note or timeout."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("EASYSFT_DATA_WAIT_S", DEFAULT_WAIT_S))
    started = time.time()
    while True:
        entry = load_entry(root, key, quiet=True)
        if entry is not None:
            return entry
        note = _failure_path(root, key)
        try:
            if os.path.getmtime(note) >= started - FAILURE_NOTE_GRACE_S:
                with open(note, encoding="utf-8") as handle:
                    raise DataError(f"the main rank failed to prepare the data: {handle.read().strip()}")
        except OSError:
            pass
        if time.time() - started >= timeout_s:
            raise DataError(
                f"waited {timeout_s:.0f} s for the main rank to write the tokenized data to {os.path.join(root, key)}; "
                "give every rank a shared --cache_dir (all ranks must see the same folder), run `easysft prepare` "
                "with the same flags first, or raise $EASYSFT_DATA_WAIT_S."
            )
        time.sleep(poll_s)
