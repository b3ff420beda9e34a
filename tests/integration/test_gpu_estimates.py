"""The estimate column of the H200 memory table in docs/memory.md is what easysft's memory check computes for those runs
(`python -m bench.bench_memory --gpu --estimate_only`: the runs' own flags and data, the model configs, no GPU),
so the prediction printed next to the pending measurements cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from bench.bench_memory import GPU_ROWS, estimate_gpu_modes, write_data

README = Path(__file__).resolve().parents[2] / "docs" / "memory.md"  # the memory page (was in README.md)


def test_readme_gpu_memory_estimates_are_the_code_s(tmp_path):
    rows = estimate_gpu_modes(write_data(tmp_path / "data", GPU_ROWS, long_rows=True), tmp_path)
    section = README.read_text(encoding="utf-8").split("<!-- SECTION:memory -->")[1].split("<!-- /SECTION:memory")[0]
    cells = [float(m.group(1)) for m in re.finditer(r"^\| [^|]+\| ([0-9.]+) \| pending \|", section, re.M)]
    assert cells == [round(row["estimate_gib"], 2) for row in rows], (cells, rows)
    by_mode = {row["mode"]: row["estimate_gib"] for row in rows}
    assert by_mode["1.7B full, adamw_8bit"] < by_mode["1.7B full, adamw"]
