"""Generation-eval overhead: the demo's training run with and without ``--eval_generate N`` (issue 15).

    python -m bench.bench_geneval                                   # 28 steps, an eval at step 0 and 28, 32 rows
    python -m bench.bench_geneval --max_steps 84                    # the whole demo (evals at 0, 28, 56, 84)

Both sides train the bundled SmolLM2-135M-Instruct on the demo's word-reversal data with the demo's flags
(easysft/demo.py ``demo_configs``) and its default eval frequency (every ``max_steps // 3`` steps, at least 28 with
the defaults below); one side also generates and scores ``--num_eval`` held-out answers at every eval. Runs alternate
(plain, generating, plain, ...) and the fastest of each side counts; prints wall times and the ratio. On a machine
shared with other jobs, read the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def timed_run(out: Path, data_dir: Path, args, num_eval: int) -> float:
    from easysft.demo import demo_configs
    from easysft.training.loop import train

    configs = demo_configs(out, data_dir, max_steps=args.max_steps, learning_rate=1e-4, row_tokens=384,
                           num_eval=num_eval, eval_steps=args.eval_steps or max(1, 84 // 3))
    started = time.perf_counter()
    train(*configs)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=28)
    parser.add_argument("--eval_steps", type=int, default=None, help="default 28: the demo's (84 steps // 3)")
    parser.add_argument("--num_eval", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)

    from easysft.demo import write_dataset

    root = Path(tempfile.mkdtemp(prefix="bench-geneval-"))
    data_dir = write_dataset(root / "data", num_eval=args.num_eval)
    times: dict[str, list[float]] = {"plain": [], "generate": []}
    for _ in range(args.repeats):
        times["plain"].append(timed_run(root / "plain", data_dir, args, 0))
        times["generate"].append(timed_run(root / "generate", data_dir, args, args.num_eval))
    plain, generate = min(times["plain"]), min(times["generate"])
    print(f"| run | wall s (fastest of {args.repeats}) |\n|---|---:|\n| {args.max_steps} steps, eval every "
          f"{args.eval_steps or 28} | {plain:.1f} |\n| same + --eval_generate {args.num_eval} | {generate:.1f} |")
    print(f"overhead of --eval_generate {args.num_eval}: {100 * (generate / plain - 1):.1f}% (ratio {generate / plain:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
