"""Testing hook: make one rank crash at a chosen optimizer step (the ONE place these variables are read).

``EASYSFT_FAIL_AT_STEP=N`` (1-based optimizer step) with ``EASYSFT_FAIL_RANK=R`` (default 0) raises a
RuntimeError on rank R right after step N. The distributed tests use it to check that a crash on one rank ends
the whole job promptly with a non-zero exit that names the rank, instead of leaving the other ranks waiting in
a collective. Unset (the normal case), it does nothing.
"""

from __future__ import annotations

import os
import time


class InjectedFailure(RuntimeError):
    """The crash asked for by EASYSFT_FAIL_AT_STEP (never raised otherwise)."""


def maybe_fail(step: int, rank: int) -> None:
    at_step = os.environ.get("EASYSFT_FAIL_AT_STEP")
    if not at_step or int(at_step) != step or int(os.environ.get("EASYSFT_FAIL_RANK", "0")) != rank:
        return
    # The wall-clock time lets a test measure how long the job takes to end after the crash.
    raise InjectedFailure(f"injected failure at step {step} (EASYSFT_FAIL_AT_STEP) at time {time.time():.3f}")
