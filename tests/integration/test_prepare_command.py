"""`easysft prepare`: builds the cache, prints the report, writes data_report.json; one-line errors."""

import json
import os
import subprocess
import sys

from easysft.cli import main


def test_prepare_prints_report_writes_json_and_hits_cache_second_time(tiny_model_dir, qa_data_dir, tmp_path,
                                                                     capsys):
    out = tmp_path / "run"
    argv = ["prepare", "--data_path", qa_data_dir, "--model_name_or_path", tiny_model_dir,
            "--max_ans_len", "32", "--output_dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("data report: template qa, max_prompt_len 256, max_ans_len 32")
    assert "cache: built" in printed
    report = json.loads((out / "data_report.json").read_text(encoding="utf-8"))
    assert report["train"]["kept"] == 8 and report["eval"]["kept"] == 4
    assert main(argv[:-2]) == 0
    assert "cache: hit" in capsys.readouterr().out


def test_prepare_bad_data_is_one_line_with_exit_code(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "train.json"
    bad.write_text('[{"prompt": "a", "answer": "b"}')
    assert main(["prepare", "--data_path", str(bad), "--model_name_or_path", tiny_model_dir]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"easysft: error: {bad}:1:") and "\n" not in err


def test_prepare_requires_data_path(tiny_model_dir, capsys):
    assert main(["prepare", "--model_name_or_path", tiny_model_dir]) == 2
    assert "--data_path is required" in capsys.readouterr().err


def test_prepare_help_does_not_import_torch_or_datasets():
    code = ("import sys; from easysft.cli import build_parser; build_parser('prepare').format_help(); "
            "print(sorted(m for m in ('torch', 'datasets', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.stdout.strip() == "[]"


def test_prepare_show_marks_what_is_trained_and_jsonl_round_trips(tiny_model_dir, tool_data_file, tmp_path, capsys):
    data, template = tool_data_file
    argv = ["prepare", "--data_path", data, "--model_name_or_path", tiny_model_dir, "--template", "chat",
            "--chat_template", template, "--eval_fraction", "0", "--cache_dir", str(tmp_path / "c"), "--show", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample ") == 2
    assert ('[[<think>\nLook up Paris.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>]]\n<|im_start|>user\n<tool_response>') in out
    assert main(argv + ["--show_format", "jsonl"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert [line["sample"] for line in lines] == [0, 1] and "data report" in captured.err
    from easysft.models.load import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    first = lines[0]
    supervised = tok.decode([t for t, lab in zip(first["input_ids"], first["labels"], strict=True) if lab != -100])
    assert supervised.endswith("It is 10C in Paris.<|im_end|>") and "What is the weather" not in supervised


def test_chat_template_travels_with_the_trained_model(tiny_model_dir, tool_data_file, tmp_path):
    from easysft.models.load import load_tokenizer

    data, template = tool_data_file
    out = tmp_path / "run"
    assert main(["train", "--data_path", data, "--model_name_or_path", tiny_model_dir, "--template", "chat",
                 "--chat_template", template, "--max_steps", "1", "--output_dir", str(out), "--tensorboard",
                 "false", "--cache_dir", str(tmp_path / "c")]) == 0
    assert load_tokenizer(str(out)).chat_template == open(template, encoding="utf-8").read()
    assert main(["prepare", "--data_path", data, "--model_name_or_path", tiny_model_dir, "--template", "chat",
                 "--chat_template", str(tmp_path / "missing.jinja")]) == 2


def test_a_bad_chat_template_file_is_one_line_naming_it(tiny_model_dir, tool_data_file, tmp_path, capsys):
    data, _ = tool_data_file
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}\n")
    binary = tmp_path / "binary.jinja"
    binary.write_bytes(b"\xff\xfe{{ x }}")
    cases = [(str(broken), rf"--chat_template {broken}:2: not a valid Jinja template"),
             (str(binary), rf"--chat_template {binary}:1: not UTF-8 text"),
             ("/dev/null", "--chat_template /dev/null: not a regular file")]
    for path, expected in cases:
        code = main(["prepare", "--data_path", data, "--model_name_or_path", tiny_model_dir, "--template", "chat",
                     "--chat_template", path, "--cache_dir", str(tmp_path / "c")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("easysft: error: ") and "\n" not in err and expected in err, err
    assert not (tmp_path / "c").exists()
