"""Every 2-process training run the selected distributed tests compare, trained in as few launches as possible.

Starting a launcher and 2 Python processes with torch, transformers and DeepSpeed costs more than most of the
tiny runs themselves. So a test module that compares launched runs declares them in ``add_runs(plan)`` instead of
launching its own jobs, and the session fixture ``launched`` (tests/conftest.py) trains the declared runs of every
selected module together: the single-process references in the test process itself, then ONE torchrun job and
ONE deepspeed job, each running its command lines one after another through tests/distributed/driver.py (the
same ``easysft.cli.main`` a user's command line reaches). A module then reads its outputs under
``launched.folder(name)``. Runs that must crash a job (test_faults.py) keep their own launches.

A run that does not end as expected (an unexpected exit code, an exception, a crash on one rank) does not stop
its job: the driver records it and goes on with the next run (driver.py says how a failure on one rank is kept
from hanging the others and from leaving a broken process group to the next run). Runs are grouped by the first
folder under the plan's root in their ``--output_dir`` (a module's ``folder(name)``): the runs of a group that all
ended as expected serve their tests as usual, and ``folder(name)`` of a group with a failed run fails its tests
with a message naming that run, how it ended on each rank, and the output it wrote. Runs that never started (the
job ran out of time) fail their group's tests with the job's output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.dist_launch import deepspeed_cmd, launch_env, run_many, torchrun_cmd

LAUNCHERS = ("single", "torchrun", "deepspeed")
LAUNCH_TIMEOUT_S = 1800  # all the modules' runs in one job; a loaded 2-core machine can be 3x slower


class Plan:
    """Runs declared per launcher, in declaration order; each module writes under its own folder."""

    def __init__(self, root: Path, model_dir: str):
        self.root, self.model_dir = root, model_dir
        self.runs: dict[str, list] = {name: [] for name in LAUNCHERS}
        self.failures: dict[str, list[tuple[str, str, str]]] = {}  # group (folder) -> [(run, how, its output)]
        self.ran = False

    def folder(self, name: str) -> Path:
        """``root/name`` (created); once the runs have been trained, a test fails here if one of its runs did not
        finish as expected."""
        if self.ran and name in self.failures:
            (run, _, output), failures = self.failures[name][0], self.failures[name]
            pytest.fail("\n".join(f"{r} {how}" for r, how, _ in failures) + f"\n--- the output of {run}:\n{output}",
                        pytrace=False)
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def group(self, spec: dict) -> str:
        """The folder name a run belongs to: the first part of its ``--output_dir`` under the plan's root."""
        output_dir = Path(spec["argv"][spec["argv"].index("--output_dir") + 1])
        return output_dir.relative_to(self.root).parts[0]

    def add(self, launcher: str, argv: list[str], env: dict[str, str] | None = None, expect: int = 0) -> None:
        """One ``easysft train`` command line for ``launcher`` ("single": 1 process; "torchrun"; "deepspeed")."""
        self.runs[launcher].append({"argv": list(argv), "env": dict(env or {}), "expect": expect})

    def run(self) -> None:
        from tests.distributed.driver import run_one

        cache = self.root / "data-cache"
        for spec in self.runs["single"]:  # in this process: one failing reference does not stop the others
            spec["env"].setdefault("EASYSFT_DATA_CACHE", str(cache))
            outcome = run_one(spec)
            if not outcome.ok:
                self._fail(spec, "single-process run", f"{spec['argv']} did not end as expected: {outcome.why}",
                           "(in the test process: see the captured stderr of the test's set-up)")
        env = launch_env(cache)
        for launcher, cmd in (("torchrun", torchrun_cmd), ("deepspeed", deepspeed_cmd)):
            if not self.runs[launcher]:
                continue
            job = run_many(cmd(2), self.runs[launcher], self.root, env, LAUNCH_TIMEOUT_S)
            for index, spec in enumerate(self.runs[launcher]):
                if index in job.failed:
                    self._fail(spec, f"{launcher} run {index}", f"{spec['argv']} did not end as expected: "
                                     f"{job.failed[index]}", job.run_output(index)[-6000:])
                elif index not in job.done:
                    self._fail(spec, f"{launcher} run {index}", f"{spec['argv']} did not start: the job (exit "
                                     f"{job.finished.returncode}) ended before it", job.finished.output[-6000:])
        self.ran = True

    def _fail(self, spec: dict, run: str, how: str, output: str) -> None:
        """Every failed run of a group is named in its tests' message; the first one's output follows."""
        self.failures.setdefault(self.group(spec), []).append((run, how, output))


def launch_all(modules, root: Path, model_dir: str) -> Plan:
    """Collect ``add_runs`` of each module (sorted by name, so the jobs do not depend on collection order), run."""
    plan = Plan(root, model_dir)
    for module in sorted({m for m in modules if hasattr(m, "add_runs")}, key=lambda m: m.__name__):
        module.add_runs(plan)
    plan.run()
    return plan
