"""Helpers for the multi-process tests: start 2 CPU processes with torchrun or the deepspeed launcher, then read
what rank 0 wrote (per-step losses from metrics.jsonl, the saved weights).

Every launch uses ``OMP_NUM_THREADS=1`` (2 processes share 2 cores), offline Hugging Face, a private data cache,
and a free port, so parallel test sessions on one machine do not collide on 29500.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
DRIVER = HERE / "driver.py"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_env(cache_dir: str | Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # never inherit a launcher's
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
               EASYSFT_DATA_CACHE=str(cache_dir), PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, *script_and_args: str) -> list[str]:
    """``torchrun --nproc_per_node N --master_port P <script or -m module> ...`` (one node)."""
    return [str(BIN / "torchrun"), "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *script_and_args]


def deepspeed_cmd(nproc: int, *script_and_args: str) -> list[str]:
    """``deepspeed --num_gpus N --master_port P <script or --module module> ...`` (CPU processes here)."""
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *script_and_args]


@dataclass
class Finished:
    returncode: int
    output: str  # stdout + stderr
    ended_at: float  # time.time() when the launcher exited


def run(cmd: list[str], env: dict[str, str], timeout_s: float = 900) -> Finished:
    proc = subprocess.run(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout_s)
    return Finished(proc.returncode, proc.stdout, time.time())


@dataclass
class Job:
    """What ``run_many`` learned: the launches' result, and how each run ended."""

    finished: Finished  # the last launch's exit code; the output of every launch of the job
    done: set[int]  # the runs every rank ended as expected
    failed: dict[int, str]  # run index -> why it did not end as expected, per rank (for runs that started)
    launches: int  # 1 unless the job ended early and a new launch ran the remaining runs

    def run_output(self, index: int) -> str:
        """The part of the output that run ``index`` wrote (from its first "started" line to the next run's)."""
        lines = self.finished.output.splitlines()
        starts = [n for n, line in enumerate(lines) if re.search(rf"driver: rank \d+: run {index} started", line)]
        if not starts:
            return ""
        after = [n for n, line in enumerate(lines[starts[0]:], starts[0])
                 if (m := re.search(r"driver: rank \d+: run (\d+) started", line)) and int(m.group(1)) > index]
        return "\n".join(lines[starts[0]:after[0] if after else len(lines)])


def run_many(launcher: list[str], runs: list, workdir: Path, env: dict[str, str], timeout_s: float = 900,
             nproc: int = 2) -> Job:
    """Run several ``easysft train`` argument lists one after another in ONE launch (see driver.py): a run that
    fails is recorded and the next one starts. Should the job itself end early (a rank died outright, or did not
    report after a failure), a new launch runs the runs that had not started, while the job's time lasts. A job
    past ``timeout_s`` is killed and reported as exit code -9 with the output it had written."""
    from tests.distributed.driver import read_records

    runs_file = workdir / f"runs-{len(list(workdir.glob('runs-*.json')))}.json"
    runs_file.write_text(json.dumps(runs), encoding="utf-8")
    record = runs_file.with_suffix(".record")
    deadline = time.monotonic() + timeout_s
    start, outputs, launches = 0, [], 0
    while True:
        launches += 1
        cmd = [*launcher, str(DRIVER), str(runs_file), "--driver-record", str(record),
               "--driver-launch", str(launches), "--driver-start", str(start)]
        left = deadline - time.monotonic()
        try:
            finished = run(cmd, env, left)
        except subprocess.TimeoutExpired as exc:
            output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
            finished = Finished(-9, f"{output}\n(killed after {timeout_s:.0f} s)", time.time())
        outputs.append(finished.output)
        records = read_records(str(record), nproc)
        started = [e["index"] for entries in records for e in entries if e.get("event") == "start"]
        nxt = max(started, default=start - 1) + 1
        if nxt >= len(runs) or nxt <= start or finished.returncode == -9 or deadline - time.monotonic() < 60:
            break  # all started; or no progress, or no time left: what did not start is reported as such
        outputs.append(f"run_many: the job ended (exit {finished.returncode}) before run {nxt} started; "
                       f"launching runs {nxt}.. again")
        start = nxt
    finished = Finished(finished.returncode, "\n".join(outputs), finished.ended_at)
    ends = [{e["index"]: e for e in entries if e.get("event") == "end"} for entries in records]
    starts = {e["index"] for entries in records for e in entries if e.get("event") == "start"}
    done = {i for i in range(len(runs)) if all(i in per_rank and per_rank[i]["ok"] for per_rank in ends)}
    failed = {}
    for index in sorted(starts - done):
        why = [f"rank {rank}: " + (per_rank[index]["why"] if index in per_rank
                                   else f"did not end it (the launch ended with exit {finished.returncode})")
               for rank, per_rank in enumerate(ends) if not per_rank.get(index, {}).get("ok")]
        failed[index] = "; ".join(why)
    return Job(finished, done, failed, launches)


def read_losses(output_dir: str | Path) -> list[float]:
    """Per-optimizer-step training losses rank 0 logged."""
    lines = Path(output_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["loss"] for record in map(json.loads, filter(None, lines)) if "loss" in record]


def read_grad_norms(output_dir: str | Path) -> list[float]:
    """Per-optimizer-step gradient norms (before clipping) rank 0 logged."""
    lines = Path(output_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [record["grad_norm"] for record in map(json.loads, filter(None, lines)) if "grad_norm" in record]


def read_final_eval(output_dir: str | Path) -> float:
    lines = Path(output_dir, "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["eval_loss"] for r in map(json.loads, filter(None, lines)) if "eval_loss" in r][-1]


def load_weights(output_dir: str | Path) -> dict:
    """The saved model loaded with plain transformers (what a user would do), as a state dict."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(output_dir), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    return max(float((a[k] - b[k]).abs().max()) for k in a)
