"""Bad-input hunt, round three (/work/shared/hunt3.md): values from flags, YAML files and user functions are
checked for type, range and finiteness in one place; every file read is decoded with an error that names the flag
or the file. Each case: the right exit code, ONE `easysft: error:` line, no traceback, and nothing written in
--output_dir (or, for input that is fine, a correct result)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from easysft.cli import main
from tests.conftest import QA_ROWS

CONFIG, DATA = 2, 3


def train(model_dir, data_path, out, *extra):
    data = [str(p) for p in data_path] if isinstance(data_path, (list, tuple)) else [str(data_path)]
    return main(["train", "--data_path", *data, "--model_name_or_path", str(model_dir), "--output_dir", str(out),
                 "--per_device_train_batch_size", "2", "--max_steps", "1", "--tensorboard", "false",
                 "--max_prompt_len", "32", "--max_ans_len", "16", *extra])


def prepare(model_dir, *data, extra=()):
    return main(["prepare", "--model_name_or_path", str(model_dir), "--data_path", *map(str, data), *extra])


def files_in(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def assert_clean_failure(code, capsys, expected_code, pattern, out: Path | None = None) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err[-2000:]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("easysft: error: "), lines[-3:]
    assert len([line for line in lines if line.startswith("easysft: error:")]) == 1
    assert re.search(pattern, lines[-1]), lines[-1]
    if out is not None:
        assert files_in(out) == [], f"half-written output: {files_in(out)}"
    return lines[-1]


def jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def two_sources(tmp_path) -> list[Path]:
    return [jsonl(tmp_path / "srcA.jsonl", (QA_ROWS * 3)[:20]), jsonl(tmp_path / "srcB.jsonl", QA_ROWS[:5])]


# ---- 1. values: type, range and finiteness in one validator ------------------------------------------------------

@pytest.mark.parametrize("weights", [["1e-300", "1"], ["1e-12", "1"], ["1e-300", "1e300"]])
def test_m6_m7_upsample_epoch_too_large_is_refused(weights, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = train(tiny_model_dir, two_sources(tmp_path), out, "--data_weights", *weights, "--mixing", "upsample")
    assert_clean_failure(code, capsys, DATA, r"--data_weights .*--mixing upsample: an epoch would hold .* samples",
                         out)
    assert not out.exists()


def test_m6_prepare_refuses_too(tiny_model_dir, tmp_path, capsys):
    code = prepare(tiny_model_dir, *two_sources(tmp_path), extra=["--data_weights", "1e-300", "1",
                                                                  "--mixing", "upsample"])
    assert_clean_failure(code, capsys, DATA, r"--data_weights 1e-300 1 with --mixing upsample")


def test_uneven_downsample_weights_still_work(tiny_model_dir, tmp_path, capsys):
    # Downsampling never grows the epoch: the same weights are fine there (the tiny source gives one sample).
    code = prepare(tiny_model_dir, *two_sources(tmp_path), extra=["--data_weights", "1e-300", "1",
                                                                  "--eval_fraction", "0"])
    assert code == 0, capsys.readouterr().err[-2000:]
    assert "data mixing (downsample): 6 training samples per epoch" in capsys.readouterr().out


LORA_CASES = {
    "alpha_zero": (("--lora_dim", "4", "--lora_alpha", "0"), r"--lora_alpha must be greater than 0, got 0"),
    "alpha_negative": (("--lora_dim", "4", "--lora_alpha", "-2"), r"--lora_alpha must be greater than 0"),
    "alpha_inf": (("--lora_dim", "4", "--lora_alpha", "inf"), r"--lora_alpha must be a finite number"),
    "dim_negative": (("--lora_dim", "-1",), r"--lora_dim must be at least 0, got -1"),
    "dropout_one": (("--lora_dim", "4", "--lora_dropout", "1"), r"--lora_dropout must be in \[0, 1\), got 1"),
    "dropout_negative": (("--lora_dim", "4", "--lora_dropout", "-0.1"), r"--lora_dropout must be in \[0, 1\)"),
    "dropout_nan": (("--lora_dim", "4", "--lora_dropout", "nan"), r"--lora_dropout must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_g6_lora_settings_are_range_checked(case, tiny_model_dir, qa_data_dir, tmp_path, capsys):
    flags, pattern = LORA_CASES[case]
    out = tmp_path / "out"
    assert_clean_failure(train(tiny_model_dir, qa_data_dir, out, *flags), capsys, CONFIG, pattern)
    assert not out.exists()


def test_g6_yaml_lora_alpha_zero_is_refused_the_same_way(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("lora_dim: 4\nlora_alpha: 0\n", encoding="utf-8")
    out = tmp_path / "out"
    assert_clean_failure(train(tiny_model_dir, qa_data_dir, out, "--config", str(config)), capsys, CONFIG,
                         r"--lora_alpha must be greater than 0")
    assert not out.exists()


@pytest.mark.parametrize("value", ['float("nan")', 'float("inf")', "-float('inf')", "10 ** 400"])
def test_f21_nonfinite_user_metric_is_refused(value, tiny_model_dir, qa_data_dir, tmp_path, capsys):
    metric = tmp_path / "mbad.py"
    metric.write_text(f"def m(p, r, q):\n    return {{'m': {value}}}\n", encoding="utf-8")
    out = tmp_path / "out"
    code = train(tiny_model_dir, qa_data_dir, out, "--eval_generate", "2", "--eval_max_new_tokens", "2",
                 "--eval_metric", f"{metric}:m")
    assert_clean_failure(code, capsys, CONFIG, r"--eval_metric .*mbad\.py:m: the value of 'm' must be a finite number")
    assert not out.exists()


def test_f21_nan_after_the_dry_run_never_reaches_metrics_jsonl(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    # The dry run passes; the real eval returns NaN: refused as one line, and metrics.jsonl stays valid JSON.
    metric = tmp_path / "mlate.py"
    metric.write_text("def m(p, r, q):\n    return {'m': 1.0 if p == ['a dry run'] else float('nan')}\n",
                      encoding="utf-8")
    out = tmp_path / "out"
    code = train(tiny_model_dir, qa_data_dir, out, "--eval_generate", "2", "--eval_max_new_tokens", "2",
                 "--eval_metric", f"{metric}:m", "--eval_steps", "1")
    assert_clean_failure(code, capsys, CONFIG, r"--eval_metric .*mlate\.py:m: the value of 'm' must be a finite")
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        text = metrics.read_text(encoding="utf-8")
        assert "NaN" not in text and "Infinity" not in text
        for line in text.splitlines():
            json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


def test_y2_duplicate_yaml_key_is_refused_with_file_and_line(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    config = tmp_path / "d.yaml"
    config.write_text("max_steps: 1\nlearning_rate: 1e-4\nmax_steps: 2\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
                 "--output_dir", str(out), "--tensorboard", "false"])
    line = assert_clean_failure(code, capsys, CONFIG, r"d\.yaml:3: .*'max_steps' is given twice \(first on line 1\)")
    assert str(config) in line
    assert not out.exists()


def test_y2_yaml_merge_keys_may_still_override(tmp_path):
    from easysft.config import load_yaml_config

    config = tmp_path / "m.yaml"
    config.write_text("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n", encoding="utf-8")
    assert load_yaml_config(str(config), {"base", "other"}) == {"base": {"x": 1, "y": 2},
                                                                "other": {"x": 3, "y": 2}}


def test_binary_yaml_config_names_the_file(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    config = tmp_path / "bin.yaml"
    config.write_bytes(b"max_steps: 1\n\xff\xfe\x00junk\n")
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
                 "--output_dir", str(out)])
    assert_clean_failure(code, capsys, CONFIG, r"--config .*bin\.yaml:2: not UTF-8 text")
    assert not out.exists()


def test_huge_yaml_number_is_a_config_error(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    config = tmp_path / "big.yaml"
    config.write_text("learning_rate: " + "9" * 400 + "\n", encoding="utf-8")
    out = tmp_path / "out"
    code = main(["train", "--config", str(config), "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
                 "--output_dir", str(out)])
    assert_clean_failure(code, capsys, CONFIG, r"--learning_rate must be a finite number")


# ---- 2. files: decoded with an error naming the flag or the file ----------------------------------------------

def test_f27_binary_probe_txt_names_probe_data(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    probe = tmp_path / "bin.txt"
    probe.write_bytes(b"fine first line\n" + bytes(range(128, 256)) * 20)
    out = tmp_path / "out"
    code = train(tiny_model_dir, qa_data_dir, out, "--probe_data", str(probe))
    assert_clean_failure(code, capsys, DATA, r"--probe_data .*bin\.txt:2: not UTF-8 text", out)


def test_f28_unloadable_probe_folder_names_probe_data(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    folder = tmp_path / "notdata"
    folder.mkdir()
    (folder / "notes.bin").write_bytes(b"\x00\x01")
    out = tmp_path / "out"
    code = train(tiny_model_dir, qa_data_dir, out, "--probe_data", str(folder))
    line = assert_clean_failure(code, capsys, DATA, r"--probe_data .*notdata: cannot load it", out)
    assert "--data_path" not in line


def test_f28_probe_file_of_unknown_type_names_probe_data(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    probe = tmp_path / "rows.xyz"
    probe.write_text("hello\n", encoding="utf-8")
    out = tmp_path / "out"
    line = assert_clean_failure(train(tiny_model_dir, qa_data_dir, out, "--probe_data", str(probe)), capsys, DATA,
                                r"--probe_data .*rows\.xyz: unsupported file type", out)
    assert "--data_path" not in line


def _empty_parquet(path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())}), path)
    return path


def test_d32_zero_row_parquet_says_no_rows(tiny_model_dir, tmp_path, capsys):
    code = prepare(tiny_model_dir, _empty_parquet(tmp_path / "e.parquet"))
    line = assert_clean_failure(code, capsys, DATA, r"e\.parquet: no training rows found")
    assert "cannot read" not in line
    # The same words as an empty JSON Lines file.
    (tmp_path / "e.jsonl").write_text("", encoding="utf-8")
    assert_clean_failure(prepare(tiny_model_dir, tmp_path / "e.jsonl"), capsys, DATA, r"no training rows found")


def test_d32_zero_row_parquet_in_train_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = train(tiny_model_dir, _empty_parquet(tmp_path / "e.parquet"), out)
    assert_clean_failure(code, capsys, DATA, r"no training rows found", out)


def _mixed_folder(tmp_path) -> Path:
    import pandas as pd

    folder = tmp_path / "mixdir"
    jsonl(folder / "a.jsonl", QA_ROWS[:5])
    pd.DataFrame(QA_ROWS[5:8]).to_csv(folder / "b.csv", index=False)
    pd.DataFrame(QA_ROWS[:4]).to_parquet(folder / "c.parquet")
    return folder


def test_d36_folder_of_mixed_formats_is_refused_listing_the_files(tiny_model_dir, tmp_path, capsys):
    folder = _mixed_folder(tmp_path)
    line = assert_clean_failure(prepare(tiny_model_dir, folder, extra=["--eval_fraction", "0"]), capsys, DATA,
                                r"mixdir: holds data files of 3 formats \(a\.jsonl, b\.csv, c\.parquet\)")
    assert "pass the files themselves" in line
    out = tmp_path / "out"
    assert_clean_failure(train(tiny_model_dir, folder, out), capsys, DATA, r"holds data files of 3 formats", out)


def test_d36_the_files_given_one_by_one_all_train(tiny_model_dir, tmp_path, capsys):
    folder = _mixed_folder(tmp_path)
    files = [folder / "a.jsonl", folder / "b.csv", folder / "c.parquet"]
    assert prepare(tiny_model_dir, *files, extra=["--eval_fraction", "0"]) == 0, capsys.readouterr().err[-2000:]
    report = capsys.readouterr().out
    assert "train 5/5 kept" in report and "train 3/3 kept" in report and "train 4/4 kept" in report


def test_d36_folder_of_one_format_still_loads(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "jsonl_only"
    jsonl(folder / "part1.jsonl", QA_ROWS[:5])
    jsonl(folder / "part2.jsonl", QA_ROWS[5:])
    assert prepare(tiny_model_dir, folder, extra=["--eval_fraction", "0"]) == 0, capsys.readouterr().err[-2000:]
    assert "train 8/8 kept" in capsys.readouterr().out


def test_values_module_bounds_and_finite_number():
    from easysft.config.values import check_bounds, finite_number
    from easysft.errors import ConfigError

    assert check_bounds("--x", 0.5, "[0, 1)") == 0.5 and check_bounds("--x", 0, "[0, inf)") == 0
    for value, bounds in ((1, "[0, 1)"), (0, "(0, inf)"), (-1, "[0, inf)"), (5, "[1, 4]")):
        with pytest.raises(ConfigError):
            check_bounds("--x", value, bounds)
    assert finite_number("v", "2.5") == 2.5
    for bad in (math.nan, math.inf, "nan", 10**400, True):
        with pytest.raises(ConfigError):
            finite_number("v", bad)


# ---- D23: OpenAI content parts are read by ONE rule in every dialogue layout ------------------------------------

_PARTS_ROW = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                           {"role": "assistant", "content": [{"type": "text", "text": "hello"},
                                                             {"type": "text", "text": " there"}]}]}


@pytest.mark.parametrize("template", ["qa", "chat"])
def test_d23_text_content_parts_are_joined_in_every_dialogue_layout(template, tiny_model_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    sharegpt = {"conversations": [{"from": m["role"].replace("user", "human").replace("assistant", "gpt"),
                                   "value": m["content"]} for m in _PARTS_ROW["messages"]]}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for row in (_PARTS_ROW, sharegpt):
        data = jsonl(tmp_path / "parts.jsonl", [row])
        code = prepare(tiny_model_dir, data, extra=["--eval_fraction", "0", "--template", template, "--show", "1",
                                                    "--show_format", "jsonl"])
        captured = capsys.readouterr()
        assert code == 0, captured.err[-2000:]
        sample = json.loads(captured.out.strip().splitlines()[-1])
        supervised = [t for t, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != -100]
        assert tokenizer.decode(supervised).startswith("hello there"), tokenizer.decode(supervised)
        assert "hi" in tokenizer.decode(sample["input_ids"])


def test_d23_a_non_text_part_is_skipped_naming_its_position(tiny_model_dir, tmp_path, capsys):
    row = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                        {"role": "assistant", "content": "a cat"}]}
    data = jsonl(tmp_path / "image.jsonl", [row])
    assert_clean_failure(prepare(tiny_model_dir, data, extra=["--eval_fraction", "0"]), capsys, DATA,
                         r"image\.jsonl:1 \(messages\[0\]\.content\[0\] is a 'image_url' part; only text parts")
