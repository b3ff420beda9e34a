"""Run the easysft CLI in this process and record the process's peak memory.

    python -m bench.high_water PEAKS.json train --model_name_or_path ...

Writes ``{"rss_high_water": bytes}`` to ``PEAKS.json`` when the process exits (whatever the exit code), and on a
CUDA machine ``cuda_max_allocated`` / ``cuda_max_reserved`` (torch's allocator peaks: what easysft's memory
estimate predicts, the CUDA context excluded). Why not
``ru_maxrss`` from ``wait4``: that high-water mark survives exec, so a child forked from a parent that is larger at
that moment (a benchmark that has just hashed a cache, a pytest process that loaded models) reports the parent's
size. ``VmHWM`` counts from the exec, so it is this process's own peak. Forked workers (``--num_proc``) are separate
processes with their own marks; this records the main process only.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys
from pathlib import Path


def rss_high_water() -> int:
    """This process's peak resident memory in bytes since its exec (``VmHWM`` in ``/proc/self/status``); 0 when
    the kernel does not report it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cuda_peaks() -> dict:
    """torch's CUDA allocator peaks of this process, when it used CUDA (never imports torch itself)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_max_allocated": torch.cuda.max_memory_allocated(),
            "cuda_max_reserved": torch.cuda.max_memory_reserved()}


def main() -> None:
    peaks_file, argv = sys.argv[1], sys.argv[2:]
    owner = os.getpid()

    def record() -> None:
        if os.getpid() == owner:  # not in a forked worker that happens to exit through atexit
            Path(peaks_file).write_text(json.dumps({"rss_high_water": rss_high_water(), **cuda_peaks()}))

    atexit.register(record)
    sys.argv = ["easysft", *argv]
    runpy.run_module("easysft", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
