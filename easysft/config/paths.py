"""Output paths, checked the same way by every command before any long work starts.

- :func:`check_output_folder`: a folder a command writes into (train, export, prepare's ``--output_dir``): not a
  file, writable (a probe file is created and removed: this catches read-only file systems even for root), and,
  unless the command may continue or replace it, empty. One message for a used folder in every command.
- :func:`check_output_file`: a file a command writes (infer's ``--inference_output_path``): not a folder, in a
  writable folder.
- :func:`output_folder_lock`: an exclusive lock on a folder for the length of a run, so two `train` runs into one
  ``--output_dir`` cannot both write (the second fails at once with one line). ``flock`` on the folder itself:
  nothing is written into it, and the kernel drops the lock if the process dies.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

from easysft.errors import ConfigError
from easysft.files import sweep_stale_temporaries


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, flag: str, shown: str) -> None:
    """ConfigError unless a file can be created in ``folder`` (or in its nearest existing parent)."""
    target = _nearest_existing(folder)
    if not target.is_dir():
        raise ConfigError(f"{flag} {shown}: {target} is a file, so no folder can be made there; give another path.")
    probe = target / f".easysft-write-test-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as exc:
        why = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc)).lower()
        raise ConfigError(f"{flag} {shown}: cannot write in {target} ({why}); give a writable folder.") from None
    os.close(fd)
    os.remove(probe)


def is_used_folder(path: Path) -> bool:
    """A folder with anything in it."""
    return path.is_dir() and any(path.iterdir())


def check_output_folder(path: str | os.PathLike, *, flag: str = "--output_dir", may_be_used: bool = False,
                        used_hint: str = "pass --overwrite_output_dir to replace it") -> Path:
    """The folder ``path`` if a command may write into it; ConfigError naming ``flag`` otherwise."""
    shown = str(path)
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {shown} is a file; give a folder path.")
    if folder.is_dir():
        sweep_stale_temporaries(folder)  # a killed earlier command's temporaries do not make a folder "used"
    if not may_be_used and is_used_folder(folder):
        raise ConfigError(f"{flag} {shown} is not empty (another run's files?); {used_hint}.")
    check_writable(folder, flag, shown)
    return folder


def check_output_file(path: str | os.PathLike, *, flag: str, may_exist: bool = True,
                      used_hint: str = "pass --overwrite_output_dir to replace it") -> Path:
    """The file ``path`` if a command may write it (an existing file only when ``may_exist``: it is then
    replaced as a whole); ConfigError naming ``flag`` otherwise."""
    shown = str(path)
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{flag} {shown} is a folder; give a file path such as {target / 'predictions.csv'}.")
    if target.parent.is_dir():
        sweep_stale_temporaries(target.parent, only=target.name)
    if not may_exist and (target.exists() or target.is_symlink()):
        raise ConfigError(f"{flag} {shown} already exists; {used_hint}, or give another path.")
    check_writable(target.parent, flag, shown)
    return target


def check_not_read_from(output: str | os.PathLike, sources: dict[str, str | os.PathLike | None], *,
                        flag: str = "--output_dir") -> None:
    """ConfigError when the output folder is a folder that is read to build the output (``sources``: what ->
    path, e.g. the adapter's base model): writing there would replace files the result, or another model built
    on it (a sibling adapter), depends on. Symlinks and relative spellings are resolved first."""
    out = Path(output).expanduser()
    if not out.exists():
        return
    out = out.resolve()
    for what, source in sources.items():
        if source is None:
            continue
        src = Path(source).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if src == out:
            raise ConfigError(f"{flag} {output} is {what} ({source}), which this command reads; writing there "
                              "would replace files it (and anything built on it) depends on: give another folder.")


@contextlib.contextmanager
def output_folder_lock(folder: str | os.PathLike, *, flag: str = "--output_dir") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if missing); ConfigError at once if another process holds it."""
    import fcntl

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{flag} {folder} is in use by another easysft run; wait for it to finish or give "
                              "another --output_dir.") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor drops the lock
