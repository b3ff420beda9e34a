"""The clocks the training benchmark uses, the same for both tools (see ``bench/bench_train.py``'s docstring).

- :class:`StepClock`: end-of-step time stamps and token counts; the loop window is steps 2..N;
- :func:`run_easysft_timed`: ``easysft train`` in this process with the clock around the loop's ``train_step``
  (TRL's side stamps in its ``on_step_end`` callback, at the same point of the step);
- :func:`run_process`: a whole process timed from outside, with its own peak resident memory;
- :func:`matmul_peak_gflops`: the machine's practical fp32 matmul peak, the MFU denominator.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


class StepClock:
    """End-of-step time stamps and each step's token counts, the same for both tools."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.supervised: list[int] = []

    def step_end(self) -> None:
        self.ends.append(time.perf_counter())

    def summary(self, begin: float) -> dict:
        """``timed_*`` over steps 2..N (see the module docstring) plus the raw stamps for the JSON."""
        steps = len(self.ends)
        return {"steps": steps, "timed_steps": max(steps - 1, 0),
                "timed_s": self.ends[-1] - self.ends[0] if steps > 1 else 0.0,
                "timed_tokens": sum(self.tokens[1:steps]), "timed_supervised_tokens": sum(self.supervised[1:steps]),
                "tokens": sum(self.tokens[:steps]), "supervised_tokens": sum(self.supervised[:steps]),
                "extra": {"first_step_s": self.ends[0] - begin if steps else 0.0,
                          "step_ends_s": [round(t - begin, 3) for t in self.ends],
                          "step_tokens": self.tokens[:steps]}}


def matmul_peak_gflops(size: int = 1024, repeats: int = 8) -> float:
    """Best fp32 ``size^3`` matmul throughput (GFLOP/s) over ``repeats`` tries: the machine's practical peak."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b  # warm-up (thread pool, caches)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        best = min(best, (time.perf_counter() - started) / 4)
    return 2 * size**3 / best / 1e9


def run_process(cmd: list[str], log_path: Path, env: dict, timeout_s: float) -> tuple[int, float, float]:
    """Run ``cmd`` to completion; ``(exit code, wall seconds, peak RSS in MB of that process alone)``."""
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = started + timeout_s
        while True:
            # wait4 (not Popen.wait) returns the rusage of THIS child only: its own peak resident set.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024  # KiB on Linux


def run_easysft_timed(argv: list[str]) -> tuple[int, dict]:
    """Run ``easysft train argv`` in this process with the step clock around ``train_step``:
    ``(exit code, StepClock summary)``. The loop's ``train_step`` is restored afterwards."""
    import easysft.training.loop as loop
    from easysft.cli import main as easysft_main

    clock, begin = StepClock(), time.perf_counter()
    untimed_train_step = loop.train_step

    def timed_train_step(*a, **k):  # returns after the optimizer step, before the loop logs the step
        record = untimed_train_step(*a, **k)
        clock.step_end()
        clock.tokens.append(record.total_tokens)
        clock.supervised.append(record.num_tokens)
        return record

    loop.train_step = timed_train_step
    try:
        code = easysft_main(["train", *argv])
    finally:
        loop.train_step = untimed_train_step
    return code, clock.summary(begin)
