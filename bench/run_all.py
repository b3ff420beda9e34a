"""``make bench``: every benchmark in turn, each in its own process; they print tables, never pass/fail.

Arguments are passed to the training benchmark (``bench/bench_train.py``, easysft vs TRL), which runs first;
the others (present ones of :data:`OTHERS`) run with their defaults. Each writes its ``bench/results/*.json``;
the README's benchmark blocks are then re-rendered from those files (``bench/readme_tables.py``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

OTHERS = ("bench.bench_infer", "bench.bench_lora", "bench.bench_dashboard")


def main() -> int:
    codes = [subprocess.call([sys.executable, "-m", "bench.bench_train", *sys.argv[1:]])]
    for module in OTHERS:
        if importlib.util.find_spec(module) is not None:
            codes.append(subprocess.call([sys.executable, "-m", module]))
    codes.append(subprocess.call([sys.executable, "-m", "bench.readme_tables"]))
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
