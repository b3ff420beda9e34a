"""Dashboard start-up: `easysft dashboard` from process start to its first page and runs list, vs TensorBoard.

    python -m bench.bench_dashboard                  # 50 runs of 400 steps, 3 repeats
    python -m bench.bench_dashboard --runs 10 --repeats 1

Writes ``--runs`` run folders the way training writes them (metrics.jsonl with train and eval records,
train_config.json, data_report.json, run_status.json, two checkpoints' trainer_state.json, TensorBoard events of
the same scalars). Then, side by side (interleaved, fastest of ``--repeats``):
- easysft: ``python -m easysft dashboard --runs DIR --port P``, timed until ``/`` AND ``/api/runs`` (every run's
  status, steps, last loss and best eval: all metrics files read) have answered;
- TensorBoard (the peer most fine-tuning tools leave users with): ``python -m tensorboard.main --logdir DIR``,
  timed until ``/`` and ``/data/runs`` answer (it lists runs as it loads them in the background).
Prints the table and the ratio; writes ``bench/results/dashboard.md``. Never pass/fail: on a shared machine
absolute times move.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_runs(root: Path, count: int, steps: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from dashboard_runs import write_run
    from torch.utils.tensorboard import SummaryWriter

    for index in range(count):
        folder = write_run(root / f"run-{index:03d}", state="finished" if index % 2 else "running", steps=steps,
                           total=steps, checkpoint_steps=(steps // 2, steps))
        writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            for key, value in record.items():
                if key != "step" and isinstance(value, float):
                    writer.add_scalar(key, value, record["step"])
        writer.close()


def wait_ok(url: str, deadline: float) -> bytes:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read()
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(url)


def time_server(command: list[str], urls: list[str], check) -> float:
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        bodies = [wait_ok(url, started + 120) for url in urls]
        elapsed = time.monotonic() - started
        check(bodies)
        return elapsed
    finally:
        process.terminate()
        process.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_runs(root, args.runs, args.steps)

        def easysft_check(bodies):
            runs = json.loads(bodies[1])["runs"]
            assert len(runs) == args.runs and all(r["steps_done"] == args.steps for r in runs)

        def tensorboard_check(bodies):
            json.loads(bodies[1])

        times: dict[str, list[float]] = {"easysft dashboard": [], "tensorboard": []}
        for _ in range(args.repeats):
            port = free_port()
            times["easysft dashboard"].append(time_server(
                [sys.executable, "-m", "easysft", "dashboard", "--runs", str(root), "--port", str(port)],
                [f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/api/runs"], easysft_check))
            port = free_port()
            times["tensorboard"].append(time_server(
                [sys.executable, "-m", "tensorboard.main", "--logdir", str(root), "--port", str(port),
                 "--host", "127.0.0.1"],
                [f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/data/runs"], tensorboard_check))
    best = {name: min(values) for name, values in times.items()}
    lines = [
        f"# Dashboard start-up ({args.runs} runs x {args.steps} steps)", "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f} (shared machine: read the ratio)", "",
        "| server | start-up to first page + runs list (fastest) | all runs |", "|---|---:|---|",
    ]
    lines += [f"| {name} | {best[name]:.2f} s | {', '.join(f'{v:.2f}' for v in times[name])} |" for name in times]
    lines += ["", f"easysft dashboard / TensorBoard: {best['easysft dashboard'] / best['tensorboard']:.2f}x the time"]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dashboard.md").write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
