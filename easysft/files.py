"""Atomic file writes: the ONE place easysft writes a file that must never be seen half-written.

Every writer follows the same protocol: write into a hidden temporary file in the target's own folder
(``.NAME.tmp-PID``; same file system, so the rename is atomic), flush and fsync it, then ``os.replace`` it over
the target. A crash at any moment leaves either the old file or the new one, never a torn one, and the
temporaries are recognisable (:func:`is_temporary`) so checkpoint listings and cleanups can skip them.

Bottom layer: imports nothing from easysft.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temporary_path(path: str | Path) -> Path:
    """The hidden temporary file next to ``path`` that an atomic write of ``path`` goes through."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(name: str) -> bool:
    """True for a file name made by :func:`temporary_path` (an atomic write in flight or interrupted)."""
    return name.startswith(".") and ".tmp" in name


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                newline: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit fsync it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. ``mode`` is ``"w"`` or
    ``"wb"`` (``encoding`` is ignored for binary writes). The parent folder must exist.
    """
    path = Path(path)
    tmp = temporary_path(path)
    binary = "b" in mode
    try:
        with open(tmp, mode, encoding=None if binary else encoding, newline=None if binary else newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any, *, allow_nan: bool = True) -> None:
    """``data`` as indented UTF-8 JSON (non-ASCII kept as is, trailing newline), written atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, allow_nan=allow_nan)
        handle.write("\n")


def write_text_atomic(path: str | Path, text: str) -> None:
    """``text`` as UTF-8, written atomically."""
    with atomic_open(path) as handle:
        handle.write(text)


def fsync_file(path: str | Path) -> None:
    """Flush a file that another library wrote (safetensors, torch.save) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fsync_file(path)
