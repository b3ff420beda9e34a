"""prepare_data: skip reasons and their counts, --strict, the data report, row limits, rendered samples."""

import json

import pytest

from easysft.config import DataConfig
from easysft.data.dataset import prepare_data
from easysft.data.report import format_report, percentiles, write_report
from easysft.data.templates import Template
from easysft.data.tokenize import IGNORE_INDEX, SKIP_REASONS, tokenize_example
from easysft.errors import DataError

# One row per skip reason of the prompt/answer layout, plus good rows (line numbers matter: strict errors).
PA_LINES = [
    '{"prompt": "What is 2+2?", "answer": "4"}',  # 1 good
    '{"prompt": "broken',  # 2 invalid_json_line
    '{"prompt": "no answer here"}',  # 3 missing_key
    '{"prompt": 12, "answer": "twelve"}',  # 4 non_string_prompt
    '{"prompt": "null answer", "answer": null}',  # 5 non_string_answer
    '{"prompt": "   ", "answer": "x"}',  # 6 empty_prompt
    '{"prompt": "empty answer", "answer": ""}',  # 7 empty_answer
    '{"prompt": "vanishing answer", "answer": "<VANISH>"}',  # 8 no_supervised_tokens (see VanishingTokenizer)
    '{"prompt": "Capital of France?", "answer": "Paris"}',  # 9 good
]
EXPECTED_LINE = {"invalid_json_line": 2, "missing_key": 3, "non_string_prompt": 4, "non_string_answer": 5,
                 "empty_prompt": 6, "empty_answer": 7, "no_supervised_tokens": 8}
CHAT_LINES = [
    json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
    json.dumps({"messages": [{"role": "user", "content": "no reply"}]}),  # 2 unparseable_dialogue
]


class VanishingTokenizer:
    """The real tokenizer, except that the text '<VANISH>' encodes to no token at all.

    A byte-level BPE tokenizer never maps non-blank text to zero tokens, so this is how the
    ``no_supervised_tokens`` path is reached with a real vocabulary."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __call__(self, text, **kwargs):
        if isinstance(text, list):  # batched calls: each text on its own
            return {"input_ids": [self(one, **kwargs)["input_ids"] for one in text]}
        if text == "<VANISH>":
            return {"input_ids": []}
        return self._inner(text, **kwargs)


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture
def mixed_sources(tmp_path):
    return [write_lines(tmp_path / "rows.jsonl", PA_LINES), write_lines(tmp_path / "chat.jsonl", CHAT_LINES)]


def cfg(paths, **kw):
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(data_path=list(paths) if not isinstance(paths, str) else [paths], **kw)


def supervised_text(tokenizer, sample):
    return tokenizer.decode([t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True)
                             if lab != IGNORE_INDEX])


# ---------------------------------------------------------------------------------------------- skip reasons

def test_every_skip_reason_is_counted_in_the_report(tokenizer, mixed_sources):
    data = prepare_data(cfg(mixed_sources), VanishingTokenizer(tokenizer))
    train = data.report["train"]
    # the two conversation-only reasons are counted by tests/unit/test_conversations.py (--template chat)
    assert train["skipped"] == {**dict.fromkeys(SKIP_REASONS, 1), "too_long": 0, "control_token_in_text": 0}
    assert set(train["skipped"]) == set(SKIP_REASONS)
    assert train["rows"] == len(PA_LINES) + len(CHAT_LINES) == 11
    assert train["kept"] == len(data.train) == 3
    assert train["skipped_total"] == 8
    rows_src, chat_src = data.report["sources"]
    assert rows_src["layout"] == "prompt/answer" and chat_src["layout"] == "messages"
    assert rows_src["train"]["kept"] == 2 and chat_src["train"]["kept"] == 1
    assert chat_src["train"]["skipped"]["unparseable_dialogue"] == 1
    for reason, line in EXPECTED_LINE.items():
        assert train["first_skipped"][reason].startswith(f"{mixed_sources[0]}:{line}")
    assert train["first_skipped"]["unparseable_dialogue"].startswith(f"{mixed_sources[1]}:2")


@pytest.mark.parametrize("reason", sorted(EXPECTED_LINE))
def test_strict_names_file_line_and_reason(tokenizer, tmp_path, reason):
    line = EXPECTED_LINE[reason]
    path = write_lines(tmp_path / "rows.jsonl", [PA_LINES[0], PA_LINES[line - 1]])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path, strict=True), VanishingTokenizer(tokenizer))
    message = str(info.value)
    assert message.startswith(f"{path}:2: {reason}") and "--strict" in message and "\n" not in message


def test_strict_unparseable_dialogue_names_dataset_row(tokenizer, tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"chosen": "\n\nHuman: hi\n\nAssistant: yo"}, {"chosen": "no markers"}]).save_to_disk(
        str(tmp_path / "hh"))
    with pytest.raises(DataError, match=r"\[train\] row 1: unparseable_dialogue"):
        prepare_data(cfg(str(tmp_path / "hh"), strict=True), tokenizer)


def test_strict_passes_on_clean_data(tokenizer, qa_data_dir):
    data = prepare_data(cfg(qa_data_dir, strict=True), tokenizer)
    assert len(data.train) == 8 and len(data.eval) == 4


def test_all_rows_skipped_is_an_error_with_counts(tokenizer, tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", [PA_LINES[4], PA_LINES[4], PA_LINES[6], PA_LINES[1]])
    with pytest.raises(DataError) as info:
        prepare_data(cfg(path), tokenizer)
    message = str(info.value)
    assert "no training sample left" in message and "4 rows read" in message
    assert "non_string_answer 2" in message and "empty_answer 1" in message and "invalid_json_line 1" in message
    assert f"first non_string_answer: {path}:1" in message


def test_empty_list_is_an_error(tokenizer, tmp_path):
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(DataError, match="no training rows found"):
        prepare_data(cfg(str(tmp_path / "rows.json")), tokenizer)


# ---------------------------------------------------------------------------------------------- samples

def test_samples_match_tokenize_example_and_supervise_exactly_the_answer(tokenizer, qa_data_dir):
    from tests.conftest import QA_ROWS

    data = prepare_data(cfg(qa_data_dir), tokenizer)
    assert data.template == Template.from_name("qa")
    for row, sample in zip(QA_ROWS, data.train, strict=True):
        assert set(sample) == {"input_ids", "labels"}
        direct = tokenize_example(tokenizer, row["prompt"], row["answer"], max_prompt_len=256, max_ans_len=256)
        assert sample["input_ids"] == direct["input_ids"] and sample["labels"] == direct["labels"]
        assert supervised_text(tokenizer, sample) == row["answer"] + tokenizer.eos_token


def test_qa_template_renders_dialogue_context_as_lines(tokenizer, tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: 3+3?\n\nAssistant: 6"}]).save_to_disk(
        str(tmp_path / "hh"))
    (sample,) = prepare_data(cfg(str(tmp_path / "hh")), tokenizer).train
    prompt_ids = [t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True) if lab == IGNORE_INDEX]
    assert tokenizer.decode(prompt_ids) == "user: 2+2?\nassistant: 4\nQ: 3+3? A: "
    assert supervised_text(tokenizer, sample) == "6" + tokenizer.eos_token


def test_chat_template_renders_context_as_turns(tokenizer, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye"}]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})])
    (sample,) = prepare_data(cfg(path, template="chat", train_on="last"), tokenizer).train
    expected = Template.from_name("chat").prompt_ids(tokenizer, "Bye", msgs[:3])
    assert sample["input_ids"][: len(expected)] == expected
    assert supervised_text(tokenizer, sample) == "Goodbye" + tokenizer.eos_token


def test_multi_turn_makes_one_sample_per_assistant_turn(tokenizer, tmp_path):
    msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "b?"}, {"role": "assistant", "content": "B"}]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})])
    single = prepare_data(cfg(path), tokenizer)
    multi = prepare_data(cfg(path, multi_turn=True), tokenizer)
    assert [supervised_text(tokenizer, s) for s in single.train] == ["B" + tokenizer.eos_token]
    assert [supervised_text(tokenizer, s) for s in multi.train] == ["A" + tokenizer.eos_token,
                                                                  "B" + tokenizer.eos_token]
    assert multi.report["train"]["rows"] == 1 and multi.report["train"]["kept"] == 2


def test_chat_conversation_is_one_sample_supervising_every_turn_after_its_own_prompt(tokenizer, tmp_path):
    """--template chat: the conversation is ONE sample, the tokenizer's rendering of the whole conversation; each
    assistant turn is supervised from right after its own generation prompt through its end token, and nothing
    else is (--multi_turn no longer repeats the conversation once per turn)."""
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."},
            {"role": "user", "content": "And times three?"}, {"role": "assistant", "content": "12\nDone."},
            {"role": "user", "content": "Hi in Japanese?"}, {"role": "assistant", "content": " こんにちは!"}]
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps({"messages": msgs})])
    samples = prepare_data(cfg(path, template="chat", multi_turn=True), tokenizer).train

    def rendered(messages, **kwargs):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    (sample,) = samples
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids == rendered(msgs)
    expected = [IGNORE_INDEX] * len(ids)
    for i in [i for i, m in enumerate(msgs) if m["role"] == "assistant"]:
        start = len(rendered(msgs[:i], add_generation_prompt=True))
        turn = tokenizer(msgs[i]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert ids[start:start + len(turn)] == turn
        expected[start:start + len(turn)] = turn
    assert labels == expected


# ---------------------------------------------------------------------------------------------- report

def test_report_truncation_lengths_and_supervised_share(tokenizer, tmp_path):
    rows = [{"prompt": "one two three four five six seven eight nine ten eleven twelve", "answer": "short"},
            {"prompt": "hi", "answer": "alpha beta gamma delta epsilon zeta eta theta iota kappa"}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    data = prepare_data(cfg(str(path), max_prompt_len=8, max_ans_len=4), tokenizer)
    train = data.report["train"]
    assert train["truncated_prompts"] == 1 and train["truncated_answers"] == 1
    direct = [tokenize_example(tokenizer, r["prompt"], r["answer"], max_prompt_len=8, max_ans_len=4) for r in rows]
    assert train["prompt_tokens"]["max"] == max(d["num_prompt_tokens"] for d in direct) > 8  # before truncation
    assert train["answer_tokens"]["max"] == max(d["num_answer_tokens"] for d in direct) > 4
    assert train["sample_tokens"]["max"] == max(len(s["input_ids"]) for s in data.train) <= 12  # after truncation
    tokens = sum(len(s["input_ids"]) for s in data.train)
    supervised = sum(lab != IGNORE_INDEX for s in data.train for lab in s["labels"])
    assert train["num_tokens"] == tokens and train["num_supervised_tokens"] == supervised
    assert train["supervised_share"] == round(supervised / tokens, 4)
    assert data.report["max_prompt_len"] == 8 and data.report["template"] == "qa"


def test_percentiles_nearest_rank():
    assert percentiles([]) == {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    assert percentiles(list(range(1, 101))) == {"p50": 50, "p90": 90, "p99": 99, "max": 100}
    assert percentiles([7]) == {"p50": 7, "p90": 7, "p99": 7, "max": 7}


def test_format_and_write_report(tokenizer, mixed_sources, tmp_path):
    data = prepare_data(cfg(mixed_sources), VanishingTokenizer(tokenizer))
    text = format_report(data.report)
    assert text.startswith("data report: template qa")
    assert "skipped (train): invalid_json_line 1" in text
    assert f"first missing_key: {mixed_sources[0]}:3" in text
    assert "[messages]" in text and "cache: built" in text
    written = write_report(data.report, str(tmp_path / "out" / "data_report.json"))
    assert json.loads(open(written, encoding="utf-8").read()) == data.report


def test_eval_split_and_hold_out_are_reported_per_source(tokenizer, qa_data_dir, tmp_path):
    single = tmp_path / "single.json"
    single.write_text(json.dumps([{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(20)]))
    data = prepare_data(cfg([qa_data_dir, str(single)], eval_fraction=0.1), tokenizer)
    folder_src, single_src = data.report["sources"]
    assert folder_src["eval_origin"] == "eval split" and folder_src["eval"]["kept"] == 4
    assert single_src["eval_origin"].startswith("held out 2 of 20") and single_src["eval"]["kept"] == 2
    assert data.report["eval"]["kept"] == len(data.eval) == 6
    assert data.report["train"]["kept"] == len(data.train) == 8 + 18


# ---------------------------------------------------------------------------------------------- row limits

def test_debug_takes_first_64_train_and_32_eval_rows(tokenizer, tmp_path):
    from tests.conftest import write_qa_folder

    train = [{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(70)]
    folder = write_qa_folder(tmp_path / "d", train_rows=train, eval_rows=train[:40])
    data = prepare_data(cfg(folder), tokenizer, debug=True)
    assert len(data.train) == 64 and len(data.eval) == 32
    assert supervised_text(tokenizer, data.train[-1]) == "a63" + tokenizer.eos_token


def test_max_rows_count_across_sources_in_order(tokenizer, tmp_path):
    a = tmp_path / "a.json"
    b = tmp_path / "b.json"
    a.write_text(json.dumps([{"prompt": f"a{i}", "answer": "x"} for i in range(3)]))
    b.write_text(json.dumps([{"prompt": f"b{i}", "answer": "y"} for i in range(3)]))
    data = prepare_data(cfg([str(a), str(b)], max_train_rows=4), tokenizer)
    assert [s["train"]["rows"] for s in data.report["sources"]] == [3, 1]
    assert len(data.train) == 4


def test_data_split_share_of_train(tokenizer, tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": f"p{i}", "answer": f"a{i}"} for i in range(10)]))
    data = prepare_data(cfg(str(path), data_split="2,4,4"), tokenizer)
    assert len(data.train) == 2
