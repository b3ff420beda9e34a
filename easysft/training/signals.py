"""Preemption (SIGTERM / SIGINT -> finish the step, checkpoint, exit); testing hooks live in easysft/testing_hooks.py.

Contract of :class:`StopSignals`:
- the FIRST SIGTERM or SIGINT only sets a flag; the loop checks it after each optimizer step, writes a complete
  checkpoint and raises :class:`Preempted` (exit code :data:`PREEMPTED_EXIT_CODE`, documented in the README);
- a SECOND signal restores the default action and re-sends itself: the process dies at once. Checkpoints are
  atomic (see easysft/checkpoint.py), so the previous complete one stays loadable;
- in a distributed run the flag is max-reduced over ranks every step, so all ranks stop at the same step even
  when the signal reached only one of them (a rank stopping alone would hang the others in a collective).

The stop hook ``EASYSFT_STOP_AFTER_STEP=N`` (behave as if SIGTERM arrived during step N) is read, with every other
testing hook, in easysft/testing_hooks.py :func:`~easysft.testing_hooks.testing_hooks`.
"""

from __future__ import annotations

import os
import signal
import threading
import weakref

from easysft.errors import EasySFTError
from easysft.testing_hooks import TestingHooks, testing_hooks

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry" -- i.e. rerun with --resume.
# Distinct from 128+15 (killed by SIGTERM without saving) so job scripts can tell "saved, resume me" apart.
PREEMPTED_EXIT_CODE = 75


class Preempted(EasySFTError):
    """Stopped by a signal (or the stop hook) after writing a complete checkpoint; rerun with --resume."""

    exit_code = PREEMPTED_EXIT_CODE


class StopSignals:
    """Catch SIGTERM/SIGINT for the training loop; ``should_stop(step)`` says whether to checkpoint and exit.

    Handlers are installed only from the main thread (Python allows no other) and are put back by
    :meth:`restore`, or, if an exception leaves the loop first, when this object is garbage-collected.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, hooks: TestingHooks | None = None) -> None:
        self.hooks = hooks or testing_hooks()
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            ref = weakref.ref(self)

            def handle(signum, frame, ref=ref):  # holds only a weak reference, so self can be collected
                owner = ref()
                if owner is not None:
                    owner._on_signal(signum)

            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, handle)
            self._handle = handle
            self._finalizer = weakref.finalize(self, _restore_handlers, dict(self._previous), handle)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            # Second signal: the user (or the scheduler) means "now". Die the default way; the last complete
            # checkpoint is intact because an unfinished save has no COMPLETE marker.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = name
        # os.write, not print: a handler may run while the main thread is inside a stderr write (tqdm), and a
        # re-entrant write on a buffered stream raises.
        os.write(2, f"\neasysft: {name} received: finishing the current step, then saving a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def should_stop(self, step: int) -> str | None:
        """After optimizer step ``step``: the reason to stop (signal name or hook), identical on every rank."""
        from easysft.distributed import all_reduce_max

        if self.requested is None and self.hooks.stop_after_step == step:
            self.requested = "EASYSFT_STOP_AFTER_STEP"
        if all_reduce_max(1.0 if self.requested else 0.0) > 0:
            return self.requested or "a signal on another rank"
        return None

    def restore(self) -> None:
        if self._previous:
            self._finalizer.detach()
            _restore_handlers(self._previous, self._handle)
            self._previous = {}


def _restore_handlers(previous: dict, ours) -> None:
    """Put the previous handlers back where ours is still installed (never undo a later installer's)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, handler in previous.items():
        if signal.getsignal(sig) is ours:
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def stopped_message(reason: str, step: int, checkpoint_path) -> str:
    """The one line printed when a signal (or the stop hook) ended the run."""
    if checkpoint_path is None:
        return f"stopped by {reason} after step {step}; this engine cannot write checkpoints, nothing to resume."
    return (f"stopped by {reason} after step {step}; checkpoint {checkpoint_path} is complete: rerun the same "
            "command with --resume to continue.")
