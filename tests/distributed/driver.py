"""Run several ``easysft train`` command lines one after another inside ONE launched job.

    torchrun --nproc_per_node 2 tests/distributed/driver.py runs.json --driver-record FILE
    deepspeed --num_gpus 2 tests/distributed/driver.py runs.json --driver-record FILE
    python tests/distributed/driver.py runs.json            (no launcher, no record: single process)

``runs.json`` is a list of argument lists for ``easysft train``; an entry may instead be
``{"argv": [...], "env": {"NAME": "value"}, "expect": 75}``: environment variables set for that run only (e.g. a
testing hook) and the exit code it must end with (default 0). Starting 2 Python processes with torch,
transformers and DeepSpeed costs far more than a 10-step run of a tiny model on 2 cores, so the distributed tests
start each launcher once and train every configuration in it (tests/distributed/launches.py), through the same
``easysft.cli.main`` a user's command line reaches. ``run_all`` / ``run_one`` also run the single-process
references in the test process itself.

A run that does not end as expected (another exit code, or an exception) does not stop the job: it is recorded
and the next run starts. With ``--driver-record FILE`` each rank appends one JSON line per run to
``FILE.rank<R>``: a ``start`` record before the run, an ``end`` record (``ok``, ``code``, ``why``) after it; a run
counts as done only when every rank ended it as expected (tests/distributed/dist_launch.py ``run_many`` reads
them). The driver's own options are spelled ``--driver-...``: torchrun's argument parser would take a prefix of
one of its options (``--start``) for that option.

With several ranks a failure must not leave the others waiting in a collective, and the next run must not start
on a process group (or DeepSpeed / torch state) that a failed run left behind:

1. The driver creates the process group itself (gloo on CPU, on a ``FileStore`` beside the record), so no run
   ever waits in a rendezvous; the runs' engines find it initialised and use it.
2. As soon as a rank knows that the run failed somewhere (its own run, or another rank's ``end`` record), it
   destroys its process group and shuts down its sockets: a rank waiting in one of that run's collectives gets
   "Connection closed by peer" from gloo instead of waiting for the 10-minute timeout, and fails the run too.
   (Destroying the group alone does not close its connections while the failed run's objects, a DDP reducer or
   the frames of the exception's traceback, still hold it.)
3. After each run every rank waits until every rank has written its ``end`` record (the filesystem, not the
   process group, so a broken group cannot hang it). If all ended as expected, the next run starts on the same
   process group. Otherwise every rank re-executes itself (``os.execv``: same process, so the launcher sees
   nothing) from the next run (``--driver-start``) with a new process-group generation: a fresh interpreter and
   a fresh group, nothing left over from the failed run.
4. When a run has failed somewhere and a rank has not reported within ``GRACE_S`` (stuck outside a collective),
   the ranks that are waiting give up and exit 1; the launcher then stops the job and ``run_many`` launches a new
   one for the runs not yet started (so does a rank that dies outright: a segfault, the OOM killer).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass

GRACE_S = 120.0  # once a run failed on some rank: how long the other ranks get to report how theirs ended
POLL_S = 0.1


@dataclass
class Outcome:
    ok: bool  # ended with the expected exit code
    code: int | None  # the exit code; None when the run raised
    why: str  # "" when ok, else "exited 2, expected 0" / "raised RuntimeError: ..."


def _spec(run) -> dict:
    return run if isinstance(run, dict) else {"argv": run}


def run_one(run) -> Outcome:
    """One entry through ``easysft.cli.main``, its environment variables set for it alone. An exception (its
    traceback goes to stderr) or ``SystemExit`` is an outcome like an exit code; Ctrl-C still stops everything."""
    from easysft.cli import main as easysft_main

    spec = _spec(run)
    expect = spec.get("expect", 0)
    env = spec.get("env", {})
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        code, error = easysft_main(["train", *spec["argv"]]), ""
    except KeyboardInterrupt:
        raise
    except SystemExit as exc:  # argparse and friends
        code, error = (exc.code if isinstance(exc.code, int) else int(exc.code is not None)), ""
    except BaseException as exc:  # noqa: BLE001 -- recorded; the job goes on with the next run
        traceback.print_exc()
        code, error = None, f"raised {type(exc).__name__}: {str(exc)[:500]}"
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if code == expect:
        return Outcome(True, code, "")
    return Outcome(False, code, error or f"exited {code}, expected {expect}")


def run_all(runs: list) -> int:
    """Run each entry in order in this process (no peers); a failed run does not stop the later ones. 0 when all
    ended as expected, else the first unexpected exit code (1 for an exception)."""
    first = 0
    for run in runs:
        outcome = run_one(run)
        if not outcome.ok:
            print(f"driver: run {_spec(run)['argv']} {outcome.why}", file=sys.stderr, flush=True)
            first = first or outcome.code or 1
    return first


# --------------------------------------------------------------------------------------------- launched job --


def _say(rank: int, text: str) -> None:
    print(f"driver: rank {rank}: {text}", file=sys.stderr, flush=True)


def _append(record: str, rank: int, entry: dict) -> None:
    with open(f"{record}.rank{rank}", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({**entry, "rank": rank}) + "\n")


def read_records(record: str, world: int) -> list[list[dict]]:
    """Every rank's records so far (a line being written is skipped)."""
    ranks = []
    for rank in range(world):
        entries = []
        try:
            with open(f"{record}.rank{rank}", encoding="utf-8") as handle:
                for line in handle:
                    try:
                        entries.append(json.loads(line))
                    except ValueError:
                        pass
        except FileNotFoundError:
            pass
        ranks.append(entries)
    return ranks


def _start_process_group(store_path: str, rank: int, world: int) -> None:
    """The job's process group (what easysft's engines would create: gloo on CPU, 10-minute timeout), on a file
    store of its own, so a new generation never reads an old one's keys."""
    import datetime

    import torch
    import torch.distributed as tdist

    backend = "gloo"
    if torch.cuda.is_available():
        backend = "nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    tdist.init_process_group(backend, store=tdist.FileStore(store_path, world), rank=rank, world_size=world,
                             timeout=datetime.timedelta(seconds=600))


def _stop_process_group() -> None:
    """Destroy every process group this rank has (the default one and its subgroups)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        try:
            tdist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 -- a broken group may complain; it is gone either way
            print(f"driver: destroying the process group: {exc}", file=sys.stderr, flush=True)


def _open_fds() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # not Linux: step 2 then relies on destroy_process_group, step 4 on GRACE_S
        return []


def _disconnect() -> None:
    """Step 2 of the module docstring: no process group, and every connected socket of this rank shut down (the
    rank re-executes itself or exits next, so nothing of the old connections is needed)."""
    import socket
    import stat

    _stop_process_group()
    for fd in _open_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            # Not a listening socket: gloo's listener thread aborts the process when its accept() fails.
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()


def _wait_for_ranks(record: str, index: int, world: int, failed_here: bool) -> list[dict] | None:
    """Every rank's ``end`` record of run ``index``; None when the run failed somewhere and a rank has not
    reported within GRACE_S of this rank learning that (without a failure, a rank still training is waited for).
    Disconnects (step 2) as soon as a failure is known."""
    deadline = None
    while True:
        ends = [next((e for e in entries if e.get("index") == index and e.get("event") == "end"), None)
                for entries in read_records(record, world)]
        if deadline is None and (failed_here or any(e is not None and not e["ok"] for e in ends)):
            _disconnect()
            deadline = time.monotonic() + GRACE_S
        if all(ends):
            return ends
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(POLL_S)


def _option(args: list[str], name: str, default: str | None = None) -> str | None:
    return args[args.index(name) + 1] if name in args else default


def _restart(start: int, generation: int) -> None:
    """Re-execute this rank (same process id: the launcher sees nothing) from run ``start``: a fresh interpreter
    and a fresh process group, nothing left over from the failed run."""
    args = sys.argv[1:]
    for name in ("--driver-start", "--driver-generation"):
        if name in args:
            at = args.index(name)
            del args[at:at + 2]
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in _open_fds():  # the new image starts with stdin, stdout and stderr only
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
    os.execv(sys.executable, [sys.executable, "-u", sys.argv[0], *args, "--driver-start", str(start),
                              "--driver-generation", str(generation)])


def run_job(runs: list, record: str, start: int = 0, generation: int = 0, launch: str = "0") -> int:
    """Runs ``start``... of a launched job on this rank (see the module docstring); the exit code is the job's:
    0 when every run ended as expected on every rank, else the first unexpected exit code (or 1)."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        _start_process_group(f"{record}.launch{launch}.pg{generation}", rank, world)
    for index in range(start, len(runs)):
        spec = _spec(runs[index])
        _append(record, rank, {"index": index, "event": "start"})
        _say(rank, f"run {index} started: {spec['argv']}")
        outcome = run_one(spec)
        _append(record, rank, {"index": index, "event": "end", "ok": outcome.ok, "code": outcome.code,
                               "why": outcome.why})
        _say(rank, f"run {index} " + ("ended as expected" if outcome.ok else f"did not end as expected: "
                                                                             f"{outcome.why}"))
        if world == 1:
            continue
        ends = _wait_for_ranks(record, index, world, failed_here=not outcome.ok)
        if ends is None:
            _say(rank, f"run {index} failed and a rank did not report within {GRACE_S:.0f} s; ending the job "
                       "(the launcher stops the other ranks; the later runs need a new launch)")
            os._exit(1)  # not sys.exit: a thread the failed run left behind must not keep this process alive
        if all(e["ok"] for e in ends):
            continue
        if index + 1 < len(runs):
            _say(rank, f"run {index} failed on rank(s) {[e['rank'] for e in ends if not e['ok']]}; restarting "
                       f"this rank for run {index + 1}")
            _restart(index + 1, generation + 1)
    _stop_process_group()
    return job_exit_code(read_records(record, world))


def job_exit_code(records: list[list[dict]]) -> int:
    """0, or the exit code of the earliest run that did not end as expected on some rank (1 if it raised)."""
    failed = sorted((e["index"], e["rank"], e["code"]) for entries in records for e in entries
                    if e.get("event") == "end" and not e["ok"])
    return (failed[0][2] or 1) if failed else 0


def main() -> int:
    # The deepspeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too); the rest is ours.
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    with open(args[0], encoding="utf-8") as handle:
        runs = json.load(handle)
    record = _option(args, "--driver-record")
    if record is None:
        return run_all(runs)
    return run_job(runs, record, int(_option(args, "--driver-start", "0")),
                   int(_option(args, "--driver-generation", "0")), _option(args, "--driver-launch", "0"))


if __name__ == "__main__":
    sys.exit(main())
