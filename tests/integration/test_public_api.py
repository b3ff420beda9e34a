"""The public API stays callable: the Python API block of docs/python-api.md runs as written, twice in one process, after
every easysft submodule has been imported (a submodule named like a public function would shadow it)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import easysft

README = Path(__file__).resolve().parents[2] / "docs" / "python-api.md"  # was in README.md


def readme_api_example() -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- API-EXAMPLE -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, "docs/python-api.md lost its <!-- API-EXAMPLE --> python block"
    return match.group(1)


def import_every_submodule() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(easysft.__path__, prefix="easysft."):
        if info.name.endswith("__main__"):
            continue  # runs the CLI when imported
        importlib.import_module(info.name)
        names.append(info.name)
    return names


def test_public_names_survive_importing_every_submodule():
    imported = import_every_submodule()
    assert "easysft.training.loop" in imported and "easysft.evaluation" in imported
    for name in easysft.__all__:
        value = getattr(easysft, name)
        assert not isinstance(value, type(easysft)), f"easysft.{name} is a module, not the public object"
    assert callable(easysft.train) and callable(easysft.evaluate)


@pytest.mark.slow
def test_readme_python_api_runs_twice(tmp_path, monkeypatch, capsys):
    import_every_submodule()
    rows = [{"prompt": f"Reverse: {a} {b}", "answer": f"{b} {a}"}
            for a, b in (("cat", "dog"), ("sun", "moon"), ("red", "blue"), ("up", "down"))]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.json").write_text(json.dumps(rows), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    code = readme_api_example()
    for run in range(2):
        namespace: dict = {}
        exec(compile(code, f"docs/python-api.md API example (run {run + 1})", "exec"), namespace)  # noqa: S102
        assert len(namespace["result"].losses) == 2
        assert namespace["result"].final_eval.num_tokens > 0
    assert (tmp_path / "runs" / "x" / "model.safetensors").is_file()
    assert capsys.readouterr().out.count("EvalResult(") == 4
