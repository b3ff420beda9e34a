"""Helpers for the multi-process tests: start 2 CPU processes with torchrun or the deepspeed launcher, then read
what rank 0 wrote (per-step losses from metrics.jsonl, the saved weights).

Every launch uses ``OMP_NUM_THREADS=1`` (2 processes share 2 cores), offline Hugging Face, a private data cache,
and a free port, so parallel test sessions on one machine do not collide on 29500.
"""

from __future__ import annotations

import json
import os
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


def run_many(launcher: list[str], runs: list, workdir: Path, env: dict[str, str], timeout_s: float = 900,
             nproc: int = 2) -> tuple[Finished, set[int]]:
    """Run several ``easysft train`` argument lists one after another in ONE launch (see driver.py); the job's
    result and the indexes of the runs every one of the ``nproc`` ranks finished as expected. A job past
    ``timeout_s`` is killed and reported as exit code -9 with the output it had written."""
    runs_file = workdir / f"runs-{len(list(workdir.glob('runs-*.json')))}.json"
    runs_file.write_text(json.dumps(runs), encoding="utf-8")
    done_file = runs_file.with_suffix(".done")
    try:
        finished = run([*launcher, str(DRIVER), str(runs_file), "--done", str(done_file)], env, timeout_s)
    except subprocess.TimeoutExpired as exc:
        output = exc.output.decode(errors="replace") if isinstance(exc.output, bytes) else exc.output or ""
        finished = Finished(-9, f"{output}\n(killed after {timeout_s:.0f} s)", time.time())
    per_rank = []
    for rank in range(nproc):
        path = Path(f"{done_file}.rank{rank}")
        per_rank.append({int(line) for line in path.read_text().split()} if path.is_file() else set())
    return finished, set.intersection(*per_rank)


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
