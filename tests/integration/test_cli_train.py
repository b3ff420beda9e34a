"""`easysft train` / `easysft eval` through the CLI: the original design's flags, --config YAML, one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from easysft.cli import main

ORIGINAL_FLAGS = [
    "--data_split", "10,0,0", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
    "--max_prompt_len", "64", "--max_ans_len", "32", "--learning_rate", "1e-3", "--weight_decay", "0.1",
    "--num_train_epochs", "1", "--gradient_accumulation_steps", "2", "--lr_scheduler_type", "cosine",
    "--num_warmup_steps", "0", "--seed", "1234", "--print_loss",
]


def test_original_design_command_line_trains_without_subcommand(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir, "--output_dir", str(out),
                 *ORIGINAL_FLAGS])
    assert code == 0
    err = capsys.readouterr().err
    assert "step 1: loss" in err and "step 2: loss" in err  # --print_loss; 8 rows / (2 x 2) = 2 steps
    config = json.loads((out / "train_config.json").read_text())
    assert config["weight_decay"] == 0.1 and config["gradient_accumulation_steps"] == 2
    assert config["dtype"] == "fp32"  # --dtype auto, resolved for this CPU machine, is what the run records
    assert (out / "model.safetensors").is_file()


def test_yaml_config_with_cli_override(tiny_model_dir, qa_data_dir, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data_path: [{qa_data_dir}]\nmodel_name_or_path: {tiny_model_dir}\nmax_steps: 3\n"
                   f"learning_rate: 0.5\nper_device_train_batch_size: 4\ntensorboard: false\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--learning_rate", "1e-4", "--output_dir", str(out)]) == 0
    config = json.loads((out / "train_config.json").read_text())
    assert config["learning_rate"] == 1e-4  # the flag wins
    assert config["max_steps"] == 3 and config["per_device_train_batch_size"] == 4  # from the file


def test_unknown_yaml_key_lists_valid_keys(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown key(s) learning_rat" in err and "learning_rate" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr_scheduler_type", "triangle"], "--lr_scheduler_type 'triangle' is unknown"),
        (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be at least 1"),
        (["--max_ans_len", "0"], "--max_ans_len must be at least 1"),
        (["--max_ans_len", "-3"], "--max_ans_len must be at least 1"),
        (["--dtype", "fp8"], "--dtype 'fp8' is unknown"),
    ],
)
def test_bad_flags_are_one_line_errors(qa_data_dir, tmp_path, capsys, flags, message):
    code = main(["train", "--data_path", qa_data_dir, "--output_dir", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_help_lists_commands_without_heavy_imports():
    code = ("import sys; from easysft.cli import main; main(['--help']);"
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "train" in out and "infer" in out and "chat" in out
    assert out.strip().endswith("[]"), out


def test_train_help_and_flag_errors_do_not_import_torch():
    """`train --help` and a flag error import nothing heavy (the data-error case: test_bad_input.py's real-process
    test, which also checks that peft and deepspeed stay unimported)."""
    code = (
        "import sys, contextlib, io\n"
        "from easysft.cli import main\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): main(['train', '--help'])\n"
        "print('exit', main(['train', '--data_path', 'x', '--learning_rate', 'nan']),"
        " sorted(m for m in ('torch', 'transformers', 'peft', 'deepspeed') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "exit 2 []" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "--learning_rate must be a finite number" in proc.stderr


def test_eval_command_prints_one_json_line(tiny_model_dir, qa_data_dir, capsys):
    assert main(["eval", "--model_name_or_path", tiny_model_dir, "--data_path", qa_data_dir]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert set(record) == {"eval_loss", "eval_ppl", "num_tokens"} and record["num_tokens"] > 0


def test_eval_uses_the_template_saved_with_the_model(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir, "--output_dir",
                 str(out), "--max_steps", "1", "--template", "chat", "--max_prompt_len", "48"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model_name_or_path", str(out), "--data_path", qa_data_dir]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert main(["eval", "--model_name_or_path", str(out), "--data_path", qa_data_dir, "--template", "qa"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert saved["num_tokens"] == other["num_tokens"]  # same answers supervised...
    assert saved["eval_loss"] != other["eval_loss"]  # ...behind different prompts


@pytest.mark.slow
def test_train_the_real_bundled_model_end_to_end(qa_data_dir, tmp_path):
    """`easysft train` with no --model_name_or_path: the bundled SmolLM2-135M, a few steps, a loadable result.
    It runs in this process (a fresh interpreter would add ~10 s of imports): real `easysft train` processes on
    the bundled model are test_memory_estimate_rss.py's, and the CLI's process start-up is tested here and in
    test_bad_input.py / test_signals.py."""
    out = tmp_path / "out"
    assert main(["train", "--data_path", qa_data_dir, "--output_dir", str(out), "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--learning_rate", "1e-5", "--print_loss",
                 "--tensorboard", "false"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 2
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # learning the 'Q: A:' format lowers the loss at once

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(out))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_packing_with_group_by_length_is_refused(qa_data_dir, tmp_path, capsys):
    assert main(["train", "--data_path", qa_data_dir, "--output_dir", str(tmp_path / "o"), "--packing",
                 "--group_by_length"]) == 2
    assert "--group_by_length does nothing with --packing" in capsys.readouterr().err


def test_packing_is_on_by_default_and_group_by_length_pads():
    """The exact fast path is the default; --group_by_length alone means padded batches; --packing false pads."""
    from easysft.config import TrainConfig

    assert TrainConfig().packing is True
    assert TrainConfig(group_by_length=True).packing is False
    assert TrainConfig(packing=False).packing is False


def test_env_prints_versions_machine_and_defaults(capsys):
    from importlib import metadata

    import torch

    from easysft.dtypes import dtype_for_device

    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"transformers: {metadata.version('transformers')}" in out and f"torch: {torch.__version__}" in out
    assert f"deepspeed {metadata.version('deepspeed')}" in out and "vllm not installed" in out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"default dtype (--dtype auto): {dtype_for_device('auto', device)} (" in out
    assert ("CPU only" in out) != torch.cuda.is_available()


# What a plain run may print: easysft's own lines and progress bars (ours and transformers' weight loading/saving).
OWN_LINE = re.compile(
    r"^(memory estimate per device|trainable parameters:|eval step \d+:|trained \d+ steps|saved the model to|"
    r"easysft: note:|data report|\s+|(Loading weights|Writing model shards|train|tokenizing):\s+\d+%.*)")


def test_a_plain_training_run_prints_no_third_party_noise(tiny_model_dir, qa_data_dir, tmp_path):
    """Optional packages imported on the way (torchao, deepspeed, bitsandbytes through transformers/peft) must not
    print on a run that uses none of them: every output line is one of easysft's own, or a progress bar."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "easysft", "train", "--model_name_or_path", tiny_model_dir,
                           "--data_path", qa_data_dir, "--max_steps", "1", "--output_dir", str(tmp_path / "run"),
                           "--cache_dir", str(tmp_path / "cache"), "--tensorboard", "false"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in re.split(r"[\r\n]", done.stdout + done.stderr) if line.strip()]
    noise = [line for line in lines if not OWN_LINE.match(line)]
    assert not noise, noise
    assert any(line.startswith("saved the model to") for line in lines)


def test_every_entry_point_gets_the_filters_by_importing_easysft():
    """`python -m easysft.demo` and the Python API do not pass through the CLI: importing the package alone must
    drop the known-harmless lines (and only them)."""
    code = ("import logging, easysft\n"
            "logging.getLogger('DeepSpeed').warning('Setting accelerator to CPU. If you have GPU ...')\n"
            "logging.getLogger('torchao').warning('Failed to load /x/_C_mxfp8.so')\n"
            "logging.getLogger('torchao').warning('something else')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stderr.strip() == "something else"
