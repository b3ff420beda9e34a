"""Generation-eval overhead: the demo's training run with and without ``--eval_generate N`` (issue 15).

    python -m bench.bench_geneval                                   # 28 steps, an eval at step 0 and 28, 32 rows
    python -m bench.bench_geneval --max_steps 84                    # the whole demo (evals at 0, 28, 56, 84)
    python -m bench.bench_geneval --components                      # on a busy machine: the parts, interleaved

``--components`` sets up the demo's run once (easysft.training.run.setup) and times, interleaved in one process,
``--repeats`` rounds of: ``--steps_per_round`` optimizer steps (train_step), one perplexity eval, and one
generation eval of ``--num_eval`` rows (measure_extras, as the loop calls it). It prints the demo's projected
overhead, 4 generation evals / (84 steps + 4 perplexity evals), from the median of each part.

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


def components(args) -> None:
    import statistics

    from easysft.demo import demo_configs, write_dataset
    from easysft.dtypes import autocast_dtype
    from easysft.evaluation import evaluate
    from easysft.training.eval_extras import measure_extras
    from easysft.training.run import setup
    from easysft.training.step import train_step

    root = Path(tempfile.mkdtemp(prefix="bench-geneval-"))
    data_dir = write_dataset(root / "data", num_eval=args.num_eval)
    model_cfg, data_cfg, train_cfg, _, gen_cfg = demo_configs(root, data_dir, max_steps=84, learning_rate=1e-4,
                                                              row_tokens=384, num_eval=args.num_eval)
    from easysft.config import LoraConfig

    run = setup(model_cfg, data_cfg, train_cfg, LoraConfig(), gen_cfg)
    plan = run.epoch_plan(0)
    parts: dict[str, list[float]] = {"step": [], "ppl_eval": [], "gen_eval": []}
    step = 0
    for _ in range(args.repeats):
        started = time.perf_counter()
        for _ in range(args.steps_per_round):
            train_step(run, plan.batches[step:step + 1], step + 1)
            step += 1
        parts["step"].append((time.perf_counter() - started) / args.steps_per_round)
        started = time.perf_counter()
        evaluate(run.engine.model, run.data.eval, batch_size=train_cfg.per_device_eval_batch_size,
                 pad_token_id=run.tokenizer.pad_token_id, autocast_dtype=autocast_dtype(train_cfg.dtype))
        parts["ppl_eval"].append(time.perf_counter() - started)
        started = time.perf_counter()
        measure_extras(run, step)
        parts["gen_eval"].append(time.perf_counter() - started)
    med = {name: statistics.median(values) for name, values in parts.items()}
    base = 84 * med["step"] + 4 * med["ppl_eval"]
    print("| part | median s | runs |\n|---|---:|---:|")
    for name, values in parts.items():
        print(f"| {name} | {med[name]:.2f} | {len(values)} |")
    print(f"demo projection (84 steps, evals at 0/28/56/84): plain {base:.0f} s, + --eval_generate {args.num_eval} "
          f"{base + 4 * med['gen_eval']:.0f} s: overhead {100 * 4 * med['gen_eval'] / base:.1f}%")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_steps", type=int, default=28)
    parser.add_argument("--eval_steps", type=int, default=None, help="default 28: the demo's (84 steps // 3)")
    parser.add_argument("--num_eval", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--components", action="store_true", help="time the parts interleaved (see above)")
    parser.add_argument("--steps_per_round", type=int, default=3)
    args = parser.parse_args(argv)
    if args.components:
        components(args)
        return 0

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
