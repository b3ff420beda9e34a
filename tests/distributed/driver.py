"""Run several ``easysft train`` command lines one after another inside ONE launched job.

    torchrun --nproc_per_node 2 tests/distributed/driver.py runs.json
    deepspeed --num_gpus 2 tests/distributed/driver.py runs.json
    python tests/distributed/driver.py runs.json            (no launcher: single process)

``runs.json`` is a list of argument lists for ``easysft train``; an entry may instead be
``{"argv": [...], "env": {"NAME": "value"}, "expect": 75}``: environment variables set for that run only (e.g. a
testing hook) and the exit code it must end with (default 0). Starting 2 Python processes with torch,
transformers and DeepSpeed costs far more than a 10-step run of a tiny model on 2 cores, so the distributed tests
start each launcher once and train every configuration in it (tests/distributed/launches.py), through the same
``easysft.cli.main`` a user's command line reaches (the process group is created by the first run and reused by
the next ones). ``run_all`` is also called in the test process itself for the single-process references.

With ``--done FILE`` each rank appends the index of every run that ended as expected to ``FILE.rank<R>``: a run
counts as done only when every rank wrote it (tests/distributed/launches.py), so the runs before a failing one
still serve their tests.
"""

from __future__ import annotations

import json
import os
import sys


def run_all(runs: list, done_file: str | None = None) -> int:
    """Run each entry in order; 0 when all ended as expected, else the first unexpected exit code (or 1), and the
    runs after it are not started (a rank that failed alone would leave the others waiting in a collective)."""
    from easysft.cli import main as easysft_main

    for index, run in enumerate(runs):
        spec = run if isinstance(run, dict) else {"argv": run}
        env = spec.get("env", {})
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            code = easysft_main(["train", *spec["argv"]])
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        if code != spec.get("expect", 0):
            print(f"driver: run {spec['argv']} exited {code}, expected {spec.get('expect', 0)}", file=sys.stderr)
            return code or 1
        if done_file:
            with open(f"{done_file}.rank{os.environ.get('RANK', '0')}", "a", encoding="utf-8") as handle:
                handle.write(f"{index}\n")
    return 0


def main() -> int:
    # The deepspeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too); the rest is ours.
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    done_file = args[args.index("--done") + 1] if "--done" in args else None
    with open(args[0], encoding="utf-8") as handle:
        return run_all(json.load(handle), done_file)


if __name__ == "__main__":
    sys.exit(main())
