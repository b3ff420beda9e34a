"""Reading easysft output folders: which folders are runs, their status, and their metrics, from files only.

Run ids are ``"<root index>/<path relative to that root>"`` (``"0"`` for a root that is itself a run); every path
a request names goes through :func:`resolve_inside`, which refuses anything that resolves outside the roots
(``..``, absolute paths, symlinks leading out). Every file of a run that is read (train_config.json, metrics.jsonl,
eval predictions, files served by /api/file...) is opened through :func:`open_inside`: inside the run folder after
symlinks, a regular file (no FIFO, device or folder), and under a size cap.

Status (see README, Dashboard):
- ``finished``: the final model is in the folder (``config.json`` or ``adapter_config.json``, and ``easysft.json``);
- otherwise ``run_status.json`` (written by training, easysft/training/status.py) says ``preempted`` or
  ``failed``; ``running`` counts only while its process is alive (same host), else the run ``failed``;
- a folder from before ``run_status.json``: the newest checkpoint's ``trainer_state.json`` reason
  (``preempted``; ``nonfinite`` means failed), else ``running`` while ``metrics.jsonl`` changed in the last
  :data:`STALE_SECONDS`, else ``failed``.

Nothing here imports torch: listing 50 runs must stay well under a second.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from easysft.training.status import RUN_STATUS

# File names of a run folder (the writers: easysft/metrics.py, training/run.py, checkpoint/layout.py). Spelled
# here because importing easysft.checkpoint pulls in torch, which the listing must not wait for.
METRICS = "metrics.jsonl"
TRAIN_CONFIG = "train_config.json"
DATA_REPORT = "data_report.json"
EASYSFT_META = "easysft.json"
CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
PREDICTIONS = "eval_predictions"
RUN_MARKERS = (METRICS, TRAIN_CONFIG, RUN_STATUS)
NOT_RUNS = {CHECKPOINTS, PREDICTIONS, "tensorboard", ".git", "__pycache__", "node_modules", ".venv"}
STALE_SECONDS = 600
MAX_DEPTH = 6
# Size caps of what is read from a run folder (a symlink to /dev/zero or a runaway file must not exhaust memory).
MAX_JSON_BYTES = 32 << 20  # train_config.json, data_report.json, run_status.json, trainer_state.json
MAX_JSONL_BYTES = 256 << 20  # metrics.jsonl (~1M steps), eval_predictions/step-N.jsonl
_STEP_DIR = re.compile(r"^step-(\d+)$")
_PREDICTIONS_FILE = re.compile(r"^step-(\d+)\.jsonl$")


class NotFound(Exception):
    """The request names nothing that exists under the roots."""


class Forbidden(NotFound):
    """The request names a path outside the roots (``..``, an absolute path, a symlink leading out)."""


class Refused(NotFound):
    """A run's file exists but is not served or read: not a regular file, or larger than its cap (404; the
    message says which)."""


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative`` resolved; :class:`NotFound` when it escapes ``root`` (``..``, absolute, symlink)."""
    if "\x00" in relative or relative.startswith(("/", "\\")):
        raise Forbidden(relative)
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise Forbidden(relative)
    return target


class Roots:
    """The folders given with ``--runs`` (resolved) and the run folders found under them."""

    def __init__(self, folders: list[str]) -> None:
        self.paths = [Path(f).expanduser().resolve() for f in folders]

    def run_folder(self, run_id: str) -> Path:
        """The folder of ``run_id`` (a run, or NotFound)."""
        index, _, relative = run_id.partition("/")
        if not index.isdigit() or int(index) >= len(self.paths):
            raise NotFound(run_id)
        folder = resolve_inside(self.paths[int(index)], relative or ".")
        if not is_run_folder(folder):
            raise NotFound(run_id)
        return folder

    def discover(self) -> list[tuple[str, Path]]:
        """(run id, folder) of every run folder under the roots, sorted by id; a run's subfolders are not
        searched (its checkpoints are not runs)."""
        found: list[tuple[str, Path]] = []
        for index, root in enumerate(self.paths):
            stack = [(root, 0)]
            while stack:
                folder, depth = stack.pop()
                if is_run_folder(folder):
                    relative = folder.relative_to(root).as_posix()
                    found.append((f"{index}/{relative}" if relative != "." else str(index), folder))
                    continue
                if depth >= MAX_DEPTH:
                    continue
                try:
                    children = [Path(e.path) for e in os.scandir(folder)
                                if e.is_dir(follow_symlinks=False) and e.name not in NOT_RUNS]
                except OSError:
                    continue
                stack += [(child, depth + 1) for child in children]
        return sorted(found)


def is_run_folder(folder: Path) -> bool:
    try:
        return any((folder / name).is_file() for name in RUN_MARKERS)
    except OSError:  # e.g. a folder that cannot be searched (permissions): not listed, the others are
        return False


def open_inside(base: Path, relative: str, limit: int):
    """``base / relative`` opened for binary reading, only if it resolves (after symlinks) inside ``base``, is a
    regular file and holds at most ``limit`` bytes. Raises :class:`Forbidden` (leads outside), :class:`Refused`
    (a FIFO, device or folder; too large) or ``FileNotFoundError`` (missing). Every read of a run's file goes
    through here: the fixed names (train_config.json, metrics.jsonl...) as much as the paths a request names."""
    base = base.resolve()
    try:
        target = resolve_inside(base, relative)
    except Forbidden:
        raise Forbidden(f"{relative} leads outside the run folder") from None
    except RuntimeError:  # a symlink loop (Python < 3.13)
        raise Refused(f"{relative}: symlink loop") from None
    # O_NONBLOCK: opening a FIFO must not block the request thread; O_NOFOLLOW: the path was just resolved, a
    # symlink there now was swapped in since
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Refused(f"{relative} is not a regular file")
        if info.st_size > limit:
            raise Refused(f"{relative} is larger than {limit >> 20} MiB")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_inside(base: Path, relative: str, limit: int) -> bytes:
    """The bytes of ``base / relative`` through :func:`open_inside` (a file that grew past ``limit`` since it was
    opened is refused too)."""
    with open_inside(base, relative, limit) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"{relative} is larger than {limit >> 20} MiB")
    return data


def read_json(path: Path) -> dict:
    """A JSON object from ``path`` (read through :func:`open_inside` of its folder, at most
    :data:`MAX_JSON_BYTES`), or {} when it is missing, half-written or not an object; a refused file raises."""
    try:
        value = json.loads(read_inside(path.parent, path.name, MAX_JSON_BYTES))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def finite(value):
    """JSON-safe copy: NaN/inf become None (browsers' JSON.parse rejects them), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _no_constant(_name: str) -> None:
    return None  # NaN / Infinity / -Infinity in a record -> None (browsers' JSON.parse rejects them)


def parse_jsonl_line(line: bytes) -> dict | None:
    """One record, or None for a malformed or non-object line (skipped, never fatal)."""
    try:
        record = json.loads(line, parse_constant=_no_constant)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def parse_jsonl_lines(lines: list[bytes]) -> list[dict]:
    """The object records among ``lines``: all in one decoder call when every line is valid (the common case,
    ~10x faster for a long metrics.jsonl), else line by line, skipping the bad ones."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return []
    try:
        records = json.loads(b"[" + b",".join(lines) + b"]", parse_constant=_no_constant)
    except ValueError:
        records = [parse_jsonl_line(line) for line in lines]
    else:
        if len(records) != len(lines):  # a line held two values ("1, 2"): decode one by one
            records = [parse_jsonl_line(line) for line in lines]
    return [r for r in records if isinstance(r, dict)]


@dataclass
class _Tail:
    inode: int = -1
    offset: int = 0
    records: list[dict] = field(default_factory=list)


class MetricsCache:
    """Incremental reader of metrics.jsonl files: each call reads only the bytes appended since the last one.

    A line counts once its newline is written (a half-written last line waits for the next call); a malformed
    line is skipped. A file that shrank or was replaced (``--resume`` cuts it back atomically) is read again.
    """

    def __init__(self) -> None:
        self._tails: dict[Path, _Tail] = {}
        self._lock = threading.Lock()

    def records(self, path: Path) -> list[dict]:
        """Every complete record of ``path`` so far (a new list; [] when there is no file)."""
        try:
            handle = open_inside(path.parent, path.name, MAX_JSONL_BYTES)
        except OSError:
            return []
        with handle, self._lock:
            info = os.fstat(handle.fileno())
            tail = self._tails.get(path)
            if tail is None or tail.inode != info.st_ino or info.st_size < tail.offset:
                tail = self._tails[path] = _Tail(inode=info.st_ino)
            if info.st_size > tail.offset:
                handle.seek(tail.offset)
                chunk = handle.read(min(info.st_size, MAX_JSONL_BYTES) - tail.offset)
                complete = chunk.rfind(b"\n") + 1
                tail.records += parse_jsonl_lines(chunk[:complete].splitlines())
                tail.offset += complete
            return list(tail.records)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OSError, OverflowError):
        return False
    return True


def checkpoints(folder: Path) -> list[dict]:
    """Every ``checkpoints/step-N`` folder, oldest first: step, complete, reason, saved_at, size in bytes."""
    root = folder / CHECKPOINTS
    found = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    for entry in entries:
        match = _STEP_DIR.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        state = read_json(path / TRAINER_STATE)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        found.append({"step": int(match.group(1)), "name": entry.name, "complete": (path / COMPLETE).is_file(),
                      "reason": state.get("reason"), "saved_at": state.get("saved_at"), "bytes": size})
    return sorted(found, key=lambda c: c["step"])


def prediction_steps(folder: Path) -> list[int]:
    """Steps that have ``eval_predictions/step-N.jsonl``, ascending."""
    try:
        names = os.listdir(folder / PREDICTIONS)
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(_PREDICTIONS_FILE.match, names) if m)


def has_final_model(folder: Path) -> bool:
    model = (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()
    return model and (folder / EASYSFT_META).is_file()


def run_state(folder: Path, status: dict, now: float) -> str:
    """running / finished / preempted / failed, from the files (see the module docstring)."""
    if has_final_model(folder):
        return "finished"
    state = status.get("state")
    if state in ("preempted", "failed", "finished"):
        return state
    if state == "running":
        same_host = status.get("host") == socket.gethostname()
        if same_host and isinstance(status.get("pid"), int) and not pid_alive(status["pid"]):
            return "failed"  # killed outright (SIGKILL, out of memory): nothing wrote the final state
        return "running"
    saved = [c for c in checkpoints(folder) if c["complete"]]
    if saved and saved[-1]["reason"] == "preempted":
        return "preempted"
    if saved and saved[-1]["reason"] == "nonfinite":
        return "failed"
    try:
        changed = (folder / METRICS).stat().st_mtime
    except OSError:
        changed = 0.0
    return "running" if now - changed < STALE_SECONDS else "failed"


def _start_time(folder: Path, status: dict) -> float | None:
    """When the run (or its latest resume) started: run_status.json, else when train_config.json was written."""
    if isinstance(status.get("started_at"), (int, float)):
        return float(status["started_at"])
    try:
        return (folder / TRAIN_CONFIG).stat().st_mtime
    except OSError:
        return None


def _end_time(folder: Path, status: dict, state: str, now: float) -> float:
    if state == "running":
        return now
    if status.get("state") == state and isinstance(status.get("updated_at"), (int, float)):
        return float(status["updated_at"])
    times = []
    for name in (METRICS, "config.json", "adapter_config.json"):
        try:
            times.append((folder / name).stat().st_mtime)
        except OSError:
            pass
    return max(times, default=now)


def best_eval(records: list[dict]) -> dict | None:
    """The lowest eval_loss and its step, or None before the first eval."""
    evals = [r for r in records if isinstance(r.get("eval_loss"), (int, float))]
    if not evals:
        return None
    best = min(evals, key=lambda r: r["eval_loss"])
    return {"key": "eval_loss", "value": best["eval_loss"], "step": best.get("step")}


def summarize(run_id: str, folder: Path, cache: MetricsCache, now: float | None = None) -> dict:
    """One row of the runs list."""
    now = time.time() if now is None else now
    config = read_json(folder / TRAIN_CONFIG)
    status = read_json(folder / RUN_STATUS)
    records = cache.records(folder / METRICS)
    train = [r for r in records if isinstance(r.get("loss"), (int, float)) and "event" not in r]
    state = run_state(folder, status, now)
    started = _start_time(folder, status)
    data = config.get("data_path")
    return {
        "id": run_id,
        "name": folder.name,
        "path": str(folder),
        "status": state,
        "error": status.get("error") if state in ("failed", "preempted") else None,
        "model": config.get("model_name_or_path"),
        "data": " ".join(data) if isinstance(data, list) else data,
        "lora_dim": config.get("lora_dim"),
        "steps_done": max((r.get("step", 0) for r in records if isinstance(r.get("step"), int)), default=0),
        "total_steps": config.get("total_steps"),
        "last_loss": train[-1]["loss"] if train else None,
        "best_eval": best_eval(records),
        "started": started,
        "wall_seconds": (_end_time(folder, status, state, now) - started) if started else None,
        "has_model": has_final_model(folder),
    }


def unreadable(run_id: str, folder: Path, exc: BaseException) -> dict:
    """The runs-list row of a run whose files could not be read or summarised (any exception, e.g. a
    RecursionError from JSON nested 200 000 deep): listed as ``unreadable`` with a short reason, so one bad
    folder never takes the others' rows down with it."""
    if isinstance(exc, NotFound) and str(exc):
        reason = str(exc)
    else:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return {"id": run_id, "name": folder.name, "path": str(folder), "status": "unreadable",
            "error": "cannot read this run: " + reason[:200], "model": None, "data": None, "lora_dim": None,
            "steps_done": 0, "total_steps": None, "last_loss": None, "best_eval": None, "started": None,
            "wall_seconds": None, "has_model": False}
