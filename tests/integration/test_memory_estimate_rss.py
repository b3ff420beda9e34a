"""The memory estimate printed before the weights load is within 20% of the measured peak resident memory of the
bundled SmolLM2-135M's full and LoRA runs (issue 18). Each run is its own `easysft train` process whose own
resident high-water mark (VmHWM) bench/high_water.py records: bench/bench_memory.py's runner, so the bench and
this test measure the same way."""

from __future__ import annotations

import pytest

from bench.bench_memory import SMOKE_MODES, run_one, write_data

pytestmark = pytest.mark.slow  # two bundled-model training processes


@pytest.mark.parametrize("mode", ["full, adamw", "lora r=8"])
def test_estimate_is_within_20_percent_of_the_measured_peak_rss(mode, tmp_path):
    data_dir = write_data(tmp_path / "data", 16, long_rows=False)
    result = run_one(mode, "bundled", data_dir, tmp_path / "run", steps=2, extra=SMOKE_MODES[mode])
    assert result["device"] == "cpu"
    ratio = result["estimate_gib"] / result["peak_gib"]
    assert 0.8 <= ratio <= 1.2, result
