"""Every 2-process training run the selected distributed tests compare, trained in as few launches as possible.

Starting a launcher and 2 Python processes with torch, transformers and DeepSpeed costs more than most of the
tiny runs themselves. So a test module that compares launched runs declares them in ``add_runs(plan)`` instead of
launching its own jobs, and the session fixture ``launched`` (tests/conftest.py) trains the declared runs of every
selected module together: the single-process references in the test process itself, then ONE torchrun job and
ONE deepspeed job, each running its command lines one after another through tests/distributed/driver.py (the
same ``easysft.cli.main`` a user's command line reaches). A module then reads its outputs under
``launched.folder(name)``. Runs that must crash a job (test_faults.py) keep their own launches.

A run that ends with an unexpected exit code stops its job, and every test that needs that job fails with the
job's output (the failing run is named by the driver's last line).
"""

from __future__ import annotations

from pathlib import Path

from tests.distributed.dist_launch import deepspeed_cmd, launch_env, run_many, torchrun_cmd

LAUNCHERS = ("single", "torchrun", "deepspeed")
LAUNCH_TIMEOUT_S = 1800  # all the modules' runs in one job; a loaded 2-core machine can be 3x slower


class Plan:
    """Runs declared per launcher, in declaration order; each module writes under its own folder."""

    def __init__(self, root: Path, model_dir: str):
        self.root, self.model_dir = root, model_dir
        self.runs: dict[str, list] = {name: [] for name in LAUNCHERS}

    def folder(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, launcher: str, argv: list[str], env: dict[str, str] | None = None, expect: int = 0) -> None:
        """One ``easysft train`` command line for ``launcher`` ("single": 1 process; "torchrun"; "deepspeed")."""
        self.runs[launcher].append({"argv": list(argv), "env": dict(env or {}), "expect": expect})

    def run(self) -> None:
        from tests.distributed.driver import run_all

        cache = self.root / "data-cache"
        if self.runs["single"]:
            for spec in self.runs["single"]:
                spec["env"].setdefault("EASYSFT_DATA_CACHE", str(cache))
            assert run_all(self.runs["single"]) == 0, "a single-process reference run failed (see captured stderr)"
        env = launch_env(cache)
        if self.runs["torchrun"]:
            run_many(torchrun_cmd(2), self.runs["torchrun"], self.root, env, LAUNCH_TIMEOUT_S)
        if self.runs["deepspeed"]:
            run_many(deepspeed_cmd(2), self.runs["deepspeed"], self.root, env, LAUNCH_TIMEOUT_S)


def launch_all(modules, root: Path, model_dir: str) -> Plan:
    """Collect ``add_runs`` of each module (sorted by name, so the jobs do not depend on collection order), run."""
    plan = Plan(root, model_dir)
    for module in sorted({m for m in modules if hasattr(m, "add_runs")}, key=lambda m: m.__name__):
        module.add_runs(plan)
    plan.run()
    return plan
