"""``run_status.json``: what a run is doing, written atomically by rank 0 so that readers (the dashboard) never
have to guess from file ages.

Shape: ``{"state": "running" | "finished" | "preempted" | "failed", "pid": int, "host": str,
"started_at": float (unix time), "updated_at": float, "error": str (failed only)}``.
``running`` is written once training starts (after the set-up accepted the input: rejected input writes
nothing); the other states when ``train()`` returns or raises. A process killed outright (SIGKILL, out of
memory) leaves ``running`` behind: readers check whether ``pid`` is still alive on ``host``.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from easysft.files import write_json_atomic

RUN_STATUS = "run_status.json"


class RunStatus:
    """Writes ``run_status.json`` into ``output_dir`` (does nothing when ``enabled`` is false: other ranks)."""

    def __init__(self, output_dir: str | Path, enabled: bool) -> None:
        self.path = Path(output_dir) / RUN_STATUS
        self.enabled = enabled
        self.started_at = time.time()

    def write(self, state: str, **extra) -> None:
        if not self.enabled:
            return
        record = {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": self.started_at, "updated_at": time.time(), **extra}
        try:
            write_json_atomic(self.path, record)
        except OSError:  # a status file must never be the reason a run fails
            self._write_in_place(record)

    def _write_in_place(self, record: dict) -> None:
        """Fallback when the atomic write failed (a full disk has no room for the temporary copy): rewrite the
        existing file's own blocks, so that a failed run does not keep saying "running"."""
        import json

        data = (json.dumps(record, indent=2, ensure_ascii=False, default=str) + "\n").encode()
        try:
            with open(self.path, "r+b") as handle:
                handle.write(data)
                handle.truncate()
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            pass

    def stopped(self, exc: BaseException) -> None:
        """Record how training ended by an exception: preempted (signal, checkpoint saved) or failed."""
        from easysft.files import Terminated
        from easysft.training.signals import Preempted

        if isinstance(exc, Preempted):
            self.write("preempted", error=str(exc))
        elif isinstance(exc, Terminated):  # SIGTERM outside the loop (the final save): no checkpoint of it
            self.write("failed", error="terminated by SIGTERM")
        else:
            self.write("failed", error=(str(exc).splitlines() or [type(exc).__name__])[0][:500])
