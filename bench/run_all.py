"""``make bench``: every benchmark in turn (today: training speed against TRL, see bench/bench_train.py)."""

from __future__ import annotations

import sys

from bench import bench_train


def main() -> int:
    return bench_train.main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
