"""Testing hooks: the ONE place easysft reads its fault-injection environment variables.

All unset in normal use (every hook off). The test suite sets them to drive the fault paths for real, in
subprocesses and multi-process launches, without special flags on the command line:

- ``EASYSFT_STOP_AFTER_STEP=N``: behave as if SIGTERM arrived during optimizer step N (complete checkpoint, exit
  code 75; easysft/signals.py). Tests stop a run this way rather than with a smaller --max_steps, which would
  change the LR schedule.
- ``EASYSFT_INJECT_NAN_AT_STEP=3,5-7``: multiply those steps' loss by NaN (the non-finite guard; training/loop.py).
- ``EASYSFT_PAUSE_BEFORE_COMPLETE=N``: hold the checkpoint save of step N open before its COMPLETE marker, so a
  test can kill the process mid-save (easysft/checkpoint/protocol.py).
- ``EASYSFT_FAIL_AT_STEP=N`` with ``EASYSFT_FAIL_RANK=R`` (default 0): rank R raises :class:`InjectedFailure`
  right after optimizer step N (1-based). The distributed tests check that a crash on one rank ends the whole
  job promptly with a non-zero exit naming the rank, instead of leaving the other ranks waiting in a collective.

Steps are optimizer steps, counted from 1. The training loop calls :func:`testing_hooks` once per run and passes
the result down (signals, checkpoint saves, the step), so a process that runs several trainings
(tests/distributed/driver.py) sees each run's own settings. Bottom layer: imports nothing from easysft.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class TestingHooks:
    __test__ = False  # not a pytest test class, despite the name

    stop_after_step: int | None = None
    nan_steps: frozenset[int] = frozenset()
    pause_before_complete: int | None = None
    fail_at_step: int | None = None
    fail_rank: int = 0


class InjectedFailure(RuntimeError):
    """The crash asked for by EASYSFT_FAIL_AT_STEP (never raised otherwise)."""


def _parse_steps(text: str) -> frozenset[int]:
    """``"3,5-7"`` -> {3, 5, 6, 7}."""
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        low, _, high = part.partition("-")
        steps.update(range(int(low), int(high or low) + 1))
    return frozenset(steps)


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text else None


def testing_hooks() -> TestingHooks:
    """Every testing hook, read from the environment now (see the module docstring)."""
    env = os.environ
    return TestingHooks(
        stop_after_step=_int_or_none(env.get("EASYSFT_STOP_AFTER_STEP")),
        nan_steps=_parse_steps(env.get("EASYSFT_INJECT_NAN_AT_STEP", "")),
        pause_before_complete=_int_or_none(env.get("EASYSFT_PAUSE_BEFORE_COMPLETE")),
        fail_at_step=_int_or_none(env.get("EASYSFT_FAIL_AT_STEP")),
        fail_rank=int(env.get("EASYSFT_FAIL_RANK") or 0),
    )


def pause_for_test(message: str, seconds: float = 300) -> None:
    """EASYSFT_PAUSE_BEFORE_COMPLETE: say so on stderr, then hold the save open so a test can kill the process."""
    os.write(2, message.encode())
    time.sleep(seconds)


def maybe_fail(hooks: TestingHooks, step: int, rank: int) -> None:
    """Raise :class:`InjectedFailure` on rank ``rank`` after step ``step`` if EASYSFT_FAIL_AT_STEP asks for it."""
    if hooks.fail_at_step != step or hooks.fail_rank != rank:
        return
    # The wall-clock time lets a test measure how long the job takes to end after the crash.
    raise InjectedFailure(f"injected failure at step {step} (EASYSFT_FAIL_AT_STEP) at time {time.time():.3f}")
