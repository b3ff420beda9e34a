"""Bad input to `easysft infer` / `easysft chat` (hunt 3: I4, I5, I7, I14, CH3, CH4) and a damaged optimizer.pt
on resume (R2): each gives the right exit code and ONE `easysft: error:` line with nothing written, or a correct
result. Run in-process through ``easysft.cli.main``."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys

import pytest

from easysft import checkpoint
from easysft.cli import main
from tests.conftest import make_tiny_model
from tests.integration.test_bad_input import assert_clean_failure

CONFIG, DATA, CHECKPOINT = 2, 3, 5


def infer(model_dir, data_path, out_path, *extra):
    return main(["infer", "--model_name_or_path", str(model_dir), "--data_path", *map(str, data_path if isinstance(
        data_path, list) else [data_path]), "--inference_output_path", str(out_path), "--split", "train",
                 "--eval_fraction", "0", "--max_new_tokens", "2", "--do_sample", "false", *extra])


def error_line(code, capsys, expected_code, pattern) -> str:
    return assert_clean_failure(code, capsys, expected_code, pattern)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def csv_rows(path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


# ---- I4: a prompt-only file (no answer column) -----------------------------------------------------------------


def test_infer_reads_a_prompt_only_file_with_empty_references(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "po.jsonl", [{"prompt": "only prompt"}, {"prompt": "another"}])
    out = tmp_path / "po.csv"
    assert infer(tiny_model_dir, data, out) == 0, capsys.readouterr().err[-2000:]
    rows = csv_rows(out)
    assert [(r["prompt"], r["answer"]) for r in rows] == [("only prompt", ""), ("another", "")]
    # Training still requires answers: the same file is no training data.
    code = main(["train", "--model_name_or_path", tiny_model_dir, "--data_path", data, "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "1", "--tensorboard", "false"])
    error_line(code, capsys, DATA, r"unrecognised data layout \(columns found: prompt\)")


# ---- I5: chat rows that end with a user turn (template qa) -------------------------------------------------------


def test_infer_generates_for_dialogues_ending_with_a_user_turn(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "mu.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                      {"role": "user", "content": "Another?"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ])
    out = tmp_path / "mu.csv"
    assert infer(tiny_model_dir, data, out, "--template", "qa") == 0, capsys.readouterr().err[-2000:]
    rows = csv_rows(out)
    assert [(r["prompt"], r["answer"]) for r in rows] == [("hi", ""), ("Another?", ""), ("2+2?", "4")]


def test_infer_with_no_usable_row_names_the_paths_without_a_list_repr(tiny_model_dir, tmp_path, capsys):
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "", "answer": "x"}])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "  ", "answer": "y"}])
    out = tmp_path / "p.csv"
    line = error_line(infer(tiny_model_dir, [first, second], out), capsys, DATA,
                      r"a\.jsonl, .*b\.jsonl: split 'train' has no row with a non-empty prompt")
    assert "[" not in line and "'" + str(tmp_path) not in line
    assert not out.exists()


# ---- I7: --max_new_tokens far past the model's context -----------------------------------------------------------


def test_max_new_tokens_is_clamped_to_the_model_context(tokenizer, tmp_path, capsys):
    from easysft import generate as G
    from easysft.config import GenerateConfig

    model = make_tiny_model(tokenizer, max_position_embeddings=48).eval()
    prompts = [list(range(100, 110)), list(range(200, 230))]
    # 300 (finite: without the bound this still ends); the CLI run below asks for 10^8, which only the bound ends.
    out = G.generate_ids(model, tokenizer, prompts, GenerateConfig(do_sample=False), max_new_tokens=300)
    assert all(len(ids) <= 48 - 10 for ids in out) and len(out[1]) <= 48 - 30
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "does not fit the model's context (48 positions)" in line]
    assert len(notes) == 1, err
    # End to end: infer finishes (it ran until a timeout killed it), one note, every row written.
    folder = tmp_path / "short"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "answer": "hi"}, {"prompt": "Two?", "answer": "2"}])
    target = tmp_path / "h.csv"
    assert infer(folder, data, target, "--max_new_tokens", "100000000") == 0
    assert len(csv_rows(target)) == 2
    assert capsys.readouterr().err.count("does not fit the model's context") == 1


# ---- I14: the output format follows the file's extension ----------------------------------------------------------


@pytest.mark.parametrize("name", ["x.jsonl", "x.json"])
def test_output_format_follows_a_json_extension(tiny_model_dir, qa_data_dir, tmp_path, name, capsys):
    out = tmp_path / name
    assert infer(tiny_model_dir, qa_data_dir, out, "--max_train_rows", "2") == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and set(rows[0]) == {"prompt", "answer", "prediction"}


def test_output_format_contradicting_the_extension_is_refused(tiny_model_dir, qa_data_dir, tmp_path, capsys):
    out = tmp_path / "x.csv"
    error_line(infer(tiny_model_dir, qa_data_dir, out, "--output_format", "jsonl"), capsys, CONFIG,
               r"--inference_output_path .*x\.csv names a \.csv file but --output_format is jsonl")
    assert not out.exists()


# ---- CH3 / CH4: undecodable bytes typed or piped into chat -------------------------------------------------------
# Refused, not replaced with U+FFFD: the model must answer what was typed, and a guessed repair would hide that
# the input was mangled (wrong encoding in the terminal or the pipe).


def chat(model_dir, *extra):
    return main(["chat", "--model_name_or_path", str(model_dir), "--max_new_tokens", "2", "--do_sample", "false",
                 *extra])


def test_chat_prompt_flag_with_undecodable_bytes_is_one_line(tiny_model_dir, capsys):
    undecodable = os.fsdecode(b"\xff\xfe")  # what argv holds for $'\xff\xfe'
    error_line(chat(tiny_model_dir, "--prompt", undecodable), capsys, CONFIG, r"--prompt: not UTF-8 text")
    error_line(chat(tiny_model_dir, "--prompt", "hi", "--system", undecodable), capsys, CONFIG,
               r"--system: not UTF-8 text")


def test_chat_stdin_with_undecodable_bytes_never_raises(tiny_model_dir, capsys, monkeypatch):
    piped = b"\xff\xfe junk\nhello\n"
    # Python reads a pipe with surrogateescape under a C/POSIX locale (lone surrogates reach the tokenizer) ...
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), encoding="utf-8",
                                                       errors="surrogateescape"))
    assert chat(tiny_model_dir) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.out.count("not UTF-8 text") == 1 and captured.out.count("assistant> ") == 1  # "hello" answered
    # ... and strictly under a UTF-8 locale: one line, exit 2.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(piped), encoding="utf-8", errors="strict"))
    error_line(chat(tiny_model_dir), capsys, CONFIG, r"stdin: not UTF-8 text")


# ---- R2: a zero-filled optimizer.pt on resume --------------------------------------------------------------------


def test_zero_filled_optimizer_state_is_damaged_never_an_unsafe_load_hint(tiny_model_dir, qa_data_dir, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"

    def train(*extra):
        return main(["train", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir, "--output_dir",
                     str(out), "--per_device_train_batch_size", "2", "--tensorboard", "false", "--save_steps", "1",
                     "--max_prompt_len", "32", "--max_ans_len", "16", *extra])

    assert train("--max_steps", "2") == 0
    os.remove(out / "model.safetensors")
    optimizer = checkpoint.step_dir(out, 2) / "optimizer.pt"
    optimizer.write_bytes(b"\0" * optimizer.stat().st_size)
    capsys.readouterr()
    line = error_line(train("--max_steps", "3", "--resume"), capsys, CHECKPOINT,
                      re.escape(str(optimizer)) + r" is corrupted .*damaged")
    assert "weights_only" not in line and "legacy" not in line and "False" not in line
    assert "earlier checkpoint" in line
    assert not (out / "model.safetensors").exists()
