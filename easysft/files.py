"""Atomic file writes: the ONE place easysft writes a file that must never be seen half-written.

Every writer follows the same protocol: write into a hidden temporary file in the target's own folder
(``.NAME.tmp-PID``; same file system, so the rename is atomic), flush and fsync it, then ``os.replace`` it over
the target. A crash at any moment leaves either the old file or the new one, never a torn one, and the
temporaries are recognisable (:func:`is_temporary`) so checkpoint listings and cleanups can skip them.

A full disk and SIGTERM are failures like any other: :func:`disk_full_reason` recognises the first whatever the
library raised, :func:`terminate_raises` turns the second into an exception so clean-ups run, and
:func:`sweep_stale_temporaries` removes what a process that died anyway (SIGKILL) left, at the next start.

Bottom layer: imports nothing from easysft.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import threading
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
        with terminate_raises(), open(tmp, mode, encoding=None if binary else encoding,
                                      newline=None if binary else newline) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def read_utf8(path: str | Path, error: type[Exception], *, shown: str | None = None, fix: str = "re-save the "
              "file as UTF-8") -> str:
    """The whole file as text (a UTF-8 BOM removed), or ``error`` with one line: ``{shown}: cannot read the file
    (...)`` or ``{shown}:{line}: not UTF-8 text (bad byte at offset N); {fix}``. ``shown`` defaults to the path
    (a flag name can go in front of it)."""
    shown = shown or str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise error(f"{shown}: cannot read the file ({exc.strerror}).") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{shown}:{line}: not UTF-8 text (bad byte at offset {exc.start}); {fix}.") from None
    return text[1:] if text.startswith("\ufeff") else text


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


# ------------------------------------------------------------------------------------------------------
# A full disk, SIGTERM, and the temporaries they leave behind

# ENOSPC / EDQUOT as errno, and the texts of libraries that lose the errno: safetensors (Rust "os error 28"),
# torch.save ("unexpected pos": the zip writer wrote less than asked), numpy.tofile ("N requested and M written").
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|os error (?:28|122)\b|"
                             r"unexpected pos \d+ vs \d+|\d+ requested and \d+ written", re.IGNORECASE)


def disk_full_reason(exc: BaseException | None) -> str | None:
    """A short reason ("No space left on device") when ``exc``, or an exception it was raised from, is a write
    that failed because the disk (or the quota) is full, whatever its class; None otherwise."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return os.strerror(exc.errno)
        match = _DISK_FULL_TEXT.search(str(exc))
        if match:
            text = match.group(0).lower()
            return os.strerror(errno.EDQUOT) if "quota" in text or "122" in text else os.strerror(errno.ENOSPC)
        exc = exc.__cause__ or exc.__context__
    return None


class Terminated(SystemExit):
    """SIGTERM while a temporary file was open: raised so that the clean-up runs, then the exit status is the
    one of a process killed by SIGTERM (128 + 15)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` instead of killing the process at once, so the
    ``except``/``finally`` clauses that remove temporaries run (SIGINT already raises KeyboardInterrupt).

    Only from the main thread, and only where SIGTERM has its default action: a handler installed by someone
    else (the training loop's StopSignals) is left alone. Nests. A forked child inheriting the handler dies the
    default way."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    owner = os.getpid()

    def handle(signum, frame):
        if os.getpid() != owner:  # a forked worker: behave as if nothing was installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM during the clean-up kills at once
        raise Terminated()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


# The temporaries easysft makes, each naming the pid of the process writing it:
# ".NAME.tmp-PID" (temporary_path), ".model-tmp-PID-XXXX" (models/save.py), ".tmp-KEY-PID-UUID" (data cache),
# ".easysft-write-test-PID" (config/paths.py's probe).
_TEMPORARY_PID = (re.compile(r"^\..+\.tmp-(\d+)$"), re.compile(r"^\.model-tmp-(\d+)-"),
                  re.compile(r"^\.tmp-[0-9a-f]+-(\d+)-[0-9a-f]+$"), re.compile(r"^\.easysft-write-test-(\d+)$"))


def temporary_owner(name: str) -> int | None:
    """The pid that made the temporary file or folder ``name``; None for any other name."""
    for pattern in _TEMPORARY_PID:
        match = pattern.match(name)
        if match:
            return int(match.group(1))
    return None


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temporaries(folder: str | Path, *, only: str | None = None) -> list[Path]:
    """Remove the temporaries in ``folder`` left by processes that are gone (killed, or out of disk before
    their clean-up ran); ``only``: just those of one target file name. Returns what was removed. Never raises:
    a sweep must not be the reason a command fails."""
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        pid = temporary_owner(name)
        if pid is None or pid_alive(pid):
            continue
        if only is not None and not name.startswith(f".{only}.tmp-"):
            continue
        path = Path(folder) / name
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed
