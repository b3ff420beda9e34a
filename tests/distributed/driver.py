"""Run several ``easysft train`` command lines one after another inside ONE launched job.

    torchrun --nproc_per_node 2 tests/distributed/driver.py runs.json
    deepspeed --num_gpus 2 tests/distributed/driver.py runs.json
    python tests/distributed/driver.py runs.json            (no launcher: single process)

``runs.json`` is a list of argument lists for ``easysft train``. Starting 2 Python processes with torch,
transformers and DeepSpeed costs far more than a 10-step run of a tiny model on 2 cores, so the parity tests
start each launcher once and train every configuration in it, through the same ``easysft.cli.main`` a user's
command line reaches (the process group is created by the first run and reused by the next ones).
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    # The deepspeed launcher adds --local_rank=N (LOCAL_RANK is in the environment too); the rest is ours.
    args = [a for a in sys.argv[1:] if not a.startswith(("--local_rank", "--local-rank"))]
    with open(args[0], encoding="utf-8") as handle:
        runs = json.load(handle)
    from easysft.cli import main as easysft_main

    for argv in runs:
        code = easysft_main(["train", *argv])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
