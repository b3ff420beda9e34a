"""Data sources: every format, the eval hold-out, --data_split, and one-line errors for bad input."""

import json

import pytest

from easysft.data.sources import Example, hold_out_count, load_examples, read_source, to_rows
from easysft.errors import DataError

ROWS = [{"prompt": f"question {i}", "answer": f"answer {i}"} for i in range(20)]


def pairs(examples):
    return [(e.prompt, e.answer) for e in examples]


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------- formats

def test_folder_train_eval_json(qa_data_dir):
    from tests.conftest import QA_ROWS

    train = load_examples(qa_data_dir, "train")
    evals = load_examples(qa_data_dir, "eval")
    assert pairs(train) == [(r["prompt"], r["answer"]) for r in QA_ROWS]
    assert pairs(evals) == [(r["prompt"], r["answer"]) for r in QA_ROWS[:4]]
    assert train[0].source.endswith("train.json") and train[0].row == 1  # one-line file: every object on line 1
    assert train[0].context == []


def test_folder_jsonl_and_missing_eval_holds_out(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS), encoding="utf-8")
    source = read_source(str(folder), eval_fraction=0.1, seed=1)
    assert len(source.train.records) == 18 and len(source.eval.records) == 2
    assert "held out 2 of 20" in source.eval_origin


def test_folder_with_both_json_and_jsonl_is_ambiguous(tmp_path):
    (tmp_path / "train.json").write_text("[]")
    (tmp_path / "train.jsonl").write_text("")
    assert "keep one of them" in one_line_error(load_examples, str(tmp_path))


def test_json_list_file_locations_are_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a", "answer": "b"},\n\n  {"prompt": "c",\n   "answer": "d"}\n]\n')
    rows = to_rows(read_source(str(path), eval_fraction=0).train)
    assert [(r.prompt, r.row) for r in rows] == [("a", 2), ("c", 4)]
    assert rows[1].location == f"{path}:4"


def test_jsonl_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]) + "\n\n")  # blank lines ignored
    assert pairs(load_examples(str(path), eval_fraction=0)) == [(r["prompt"], r["answer"]) for r in ROWS[:3]]


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    assert len(load_examples(str(path), eval_fraction=0)) == 3


def test_parquet_file(tmp_path):
    from datasets import Dataset

    path = str(tmp_path / "rows.parquet")
    Dataset.from_list(ROWS[:5]).to_parquet(path)
    examples = load_examples(path, eval_fraction=0)
    assert pairs(examples) == [(r["prompt"], r["answer"]) for r in ROWS[:5]]
    assert examples[2].location == f"{path} row 2"


def test_csv_file_reads_cells_as_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,answer\n"What is 6*7?",42\n"multi\nline",ok\nempty,\n', encoding="utf-8")
    examples = load_examples(str(path), eval_fraction=0)
    assert pairs(examples) == [("What is 6*7?", "42"), ("multi\nline", "ok"), ("empty", "")]


def test_csv_with_bom_and_crlf(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufeffprompt,answer\r\nhi,hello\r\n".encode())
    assert pairs(load_examples(str(path), eval_fraction=0)) == [("hi", "hello")]


def test_saved_dataset_dict_with_test_split_as_eval(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"prompt": f"p{i}", "response": f"r{i}", "chosen": f"r{i}", "rejected": "no"} for i in range(6)]
    DatasetDict({"train": Dataset.from_list(rows[:4]), "test": Dataset.from_list(rows[4:])}).save_to_disk(
        str(tmp_path / "rm-static"))
    source = read_source(str(tmp_path / "rm-static"))
    assert source.train.layout.name == "prompt/response" and source.eval_origin == "eval split"
    assert pairs(to_rows(source.eval)) == [("p4", "r4"), ("p5", "r5")]
    assert to_rows(source.eval)[0].location == f"{tmp_path / 'rm-static'}[test] row 0"


def test_saved_single_dataset_hh_rlhf_holds_out(tmp_path):
    from datasets import Dataset

    rows = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}", "rejected": "\n\nHuman: q\n\nAssistant: no"}
            for i in range(10)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "hh"))
    train = load_examples(str(tmp_path / "hh"), eval_fraction=0.2, seed=3)
    evals = load_examples(str(tmp_path / "hh"), "eval", eval_fraction=0.2, seed=3)
    assert len(train) == 8 and len(evals) == 2
    assert sorted(pairs(train + evals)) == sorted((f"q{i}", f"a{i}") for i in range(10))


def test_folder_of_parquet_files_loads_with_load_dataset(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "hub-copy" / "data"
    folder.mkdir(parents=True)
    rows = [{"instruction": "Say hi", "input": "", "output": "hi"}, {"instruction": "Echo", "input": "x", "output": "x"}]
    Dataset.from_list(rows).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    examples = load_examples(str(tmp_path / "hub-copy"), eval_fraction=0)
    assert pairs(examples) == [("Say hi", "hi"), ("Echo\n\nx", "x")]


def test_messages_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    (example,) = load_examples(str(path), eval_fraction=0)
    assert (example.prompt, example.answer, example.context) == ("q", "a", [{"role": "system", "content": "s"}])


def test_several_sources_concatenate_in_order(tmp_path, qa_data_dir):
    path = tmp_path / "extra.jsonl"
    path.write_text(json.dumps({"prompt": "extra", "answer": "row"}) + "\n")
    examples = load_examples([qa_data_dir, str(path)], eval_fraction=0)
    assert examples[-1].prompt == "extra" and examples[-1].source == str(path)
    assert len(examples) == 9


# ---------------------------------------------------------------------------------------------- splits

def test_hold_out_count():
    assert hold_out_count(100, 0.05) == 5
    assert hold_out_count(10, 0.05) == 1  # at least one row
    assert hold_out_count(1, 0.5) == 0  # never the only row
    assert hold_out_count(3, 0.9) == 2  # never every row
    assert hold_out_count(50, 0.0) == 0


def test_hold_out_is_seeded_and_disjoint(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))  # row = line number, distinct per row
    first = read_source(str(path), eval_fraction=0.25, seed=7)
    again = read_source(str(path), eval_fraction=0.25, seed=7)
    other = read_source(str(path), eval_fraction=0.25, seed=8)
    rows_of = lambda split: [r.row for r in split.records]  # noqa: E731
    assert rows_of(first.eval) == rows_of(again.eval) and len(first.eval.records) == 5
    assert rows_of(first.eval) != rows_of(other.eval)
    assert not set(rows_of(first.eval)) & set(rows_of(first.train))
    assert rows_of(first.train) == sorted(rows_of(first.train))  # file order kept


def test_data_split_keeps_first_share_by_seed(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    full = read_source(str(path), eval_fraction=0, data_split="10,0,0")
    share = read_source(str(path), eval_fraction=0, data_split="2,4,4", seed=5)
    again = read_source(str(path), eval_fraction=0, data_split="2,4,4", seed=5)
    assert len(full.train.records) == 20
    assert len(share.train.records) == 4
    assert [r.row for r in share.train.records] == [r.row for r in again.train.records]


# ---------------------------------------------------------------------------------------------- bad input

def test_missing_path():
    message = one_line_error(load_examples, "no/such/dir/data.json")
    assert message.startswith("--data_path no/such/dir/data.json: no such file or folder")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("x")
    assert "unsupported file type" in one_line_error(load_examples, str(path))


def test_invalid_json_file_names_line_and_column(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"prompt": "a", "answer": "b"},\n  {"prompt": "c" "answer": "d"}\n]\n')
    message = one_line_error(load_examples, str(path))
    assert message.startswith(f"{path}:3:18: invalid JSON (Expecting ',' delimiter)")


def test_truncated_json_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"prompt": "a", "answer": "b"},')
    assert message_has(one_line_error(load_examples, str(path)), f"{path}:1:")


def message_has(message, text):
    return text in message


@pytest.mark.parametrize("content, kind", [('{"prompt": "a", "answer": "b"}', "object"), ('"text"', "string"),
                                           ("42", "number"), ("null", "null")])
def test_wrong_top_level_type(tmp_path, content, kind):
    path = tmp_path / "train.json"
    path.write_text(content)
    message = one_line_error(load_examples, str(path))
    assert message.startswith(f"{path}: the top level is a{'n' if kind == 'object' else ''} {kind}")
    assert "list of objects" in message


def test_empty_json_file(tmp_path):
    path = tmp_path / "train.json"
    path.write_text("  \n")
    assert "the file is empty" in one_line_error(load_examples, str(path))


def test_json_not_utf8(tmp_path):
    path = tmp_path / "train.json"
    path.write_bytes(b'[\n{"prompt": "caf\xe9", "answer": "x"}]')
    assert one_line_error(load_examples, str(path)).startswith(f"{path}:2: not UTF-8")


def test_unreadable_parquet(tmp_path):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"this is not parquet at all")
    message = one_line_error(load_examples, str(path))
    assert message.startswith(f"{path}: cannot read it as parquet")


def test_unknown_hub_name_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    message = one_line_error(load_examples, "no-such-org/no-such-dataset-xyz")
    assert message.startswith("--data_path no-such-org/no-such-dataset-xyz: cannot load it")


def test_unrecognised_layout_in_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "reply": "r"}\n')
    message = one_line_error(load_examples, str(path))
    assert "columns found: question, reply" in message and "prompt/answer (prompt + answer)" in message


def test_bom_and_crlf_json_and_jsonl(tmp_path):
    rows = [{"prompt": "p1", "answer": "a1"}, {"prompt": "p2", "answer": "a2"}]
    as_json = tmp_path / "rows.json"
    as_json.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).replace("\n", "\r\n").encode())
    as_jsonl = tmp_path / "rows.jsonl"
    as_jsonl.write_bytes(b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\r\n" for r in rows))
    for path in (as_json, as_jsonl):
        examples = load_examples(str(path), eval_fraction=0)
        assert pairs(examples) == [("p1", "a1"), ("p2", "a2")]
    assert [e.row for e in load_examples(str(as_jsonl), eval_fraction=0)] == [1, 2]


def test_jsonl_unicode_line_separator_inside_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "rows.jsonl"
    answer = "one\u2028two\u0085three"
    path.write_text(json.dumps({"prompt": "p", "answer": answer}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_examples(str(path), eval_fraction=0)[0].answer == answer


def test_invalid_jsonl_line_is_a_skip_and_strict_names_file_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": oops}\n{"prompt": "c", "answer": "d"}\n')
    assert pairs(load_examples(str(path), eval_fraction=0)) == [("a", "b"), ("c", "d")]
    message = one_line_error(load_examples, str(path), eval_fraction=0, strict=True)
    assert message.startswith(f"{path}:2: invalid_json_line")


def test_null_and_numeric_answers_reach_tokenize(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": None}, {"prompt": "b", "answer": 7}]))
    assert [e.answer for e in load_examples(str(path), eval_fraction=0)] == [None, 7]


def test_non_object_row_is_missing_key(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a", "answer": "b"}, ["a", "b"]]))
    rows = to_rows(read_source(str(path), eval_fraction=0).train)
    assert rows[1].reason == "missing_key" and "list" in rows[1].detail


def test_public_api_reexport():
    import easysft

    assert easysft.load_examples is load_examples
    assert easysft.Example is Example
