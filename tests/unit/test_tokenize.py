"""Labels and truncation rules of easysft.data.tokenize (ARCHITECTURE rules 1-2)."""

import pytest

from easysft.data.templates import Template
from easysft.data.tokenize import IGNORE_INDEX, Skip, tokenize_example

ANSWERS = [
    "Paris",
    "  leading and trailing spaces  ",
    "line one\nline two\n",
    "\ttab first",
    "Ünïcödé — «guillemets» and 中文字符",
    "emoji 🎉👩‍👩‍👧 mix",
    "مرحبا بالعالم",
    "x",
]
TEMPLATES = ["qa", "chat", "### Instruction:\n{prompt}\n### Response:\n"]


def supervised(sample):
    return [t for t, label in zip(sample["input_ids"], sample["labels"], strict=True) if label != IGNORE_INDEX]


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("answer", ANSWERS)
def test_round_trip_supervised_tokens_decode_to_answer_plus_eos(tokenizer, template, answer):
    sample = tokenize_example(tokenizer, "Some prompt?", answer, max_prompt_len=512, max_ans_len=512,
                              template=template)
    assert not isinstance(sample, Skip)
    ids = supervised(sample)
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == answer
    # The prompt side is exactly the template's prompt ids and is never supervised.
    prompt_ids = Template.from_name(template).prompt_ids(tokenizer, "Some prompt?")
    assert sample["input_ids"][: len(prompt_ids)] == prompt_ids
    assert all(label == IGNORE_INDEX for label in sample["labels"][: len(prompt_ids)])
    assert len(sample["input_ids"]) == len(prompt_ids) + len(ids)


def test_qa_template_text_is_documented_format(tokenizer):
    assert Template.from_name("qa").render_text("hi") == "Q: hi A: "


def _lens(tokenizer, prompt, answer):
    p = Template.from_name("qa").prompt_ids(tokenizer, prompt)
    a = tokenizer(answer, add_special_tokens=False)["input_ids"]
    return p, a


ANSWER = "alpha beta gamma delta epsilon"
PROMPT = "one two three four five six seven eight nine ten"


@pytest.mark.parametrize(
    "delta_ans, expect_eos, expect_ans_tokens",
    [
        (+1, True, "all"),  # len + 1 == max: fits with EOS
        (+2, True, "all"),  # room to spare
        (0, False, "all"),  # len == max: every answer token kept, no room for EOS -> truncated, no EOS
        (-1, False, "cut"),  # answer longer than max: keep its start, no EOS
    ],
)
def test_answer_truncation_keeps_start_and_eos_only_when_complete(tokenizer, delta_ans, expect_eos, expect_ans_tokens):
    _, a = _lens(tokenizer, PROMPT, ANSWER)
    max_ans = len(a) + delta_ans
    s = tokenize_example(tokenizer, PROMPT, ANSWER, max_prompt_len=512, max_ans_len=max_ans)
    ids = supervised(s)
    assert len(ids) <= max_ans
    assert (ids[-1] == tokenizer.eos_token_id) is expect_eos
    body = ids[:-1] if expect_eos else ids
    assert body == (a if expect_ans_tokens == "all" else a[:max_ans])
    assert s["answer_truncated"] is (not expect_eos)


@pytest.mark.parametrize("delta", [0, -1, -5])
def test_prompt_truncation_keeps_end(tokenizer, delta):
    p, _ = _lens(tokenizer, PROMPT, ANSWER)
    max_prompt = len(p) + delta
    s = tokenize_example(tokenizer, PROMPT, ANSWER, max_prompt_len=max_prompt, max_ans_len=64)
    n_prompt = sum(1 for label in s["labels"] if label == IGNORE_INDEX)
    assert n_prompt == min(len(p), max_prompt)
    assert s["input_ids"][:n_prompt] == p[len(p) - n_prompt:]
    assert s["prompt_truncated"] is (delta < 0)


def test_prompt_100x_longer_than_limit_keeps_last_tokens(tokenizer):
    prompt = "word " * 2000 + "FINAL QUESTION"
    s = tokenize_example(tokenizer, prompt, "ok", max_prompt_len=8, max_ans_len=8)
    p = Template.from_name("qa").prompt_ids(tokenizer, prompt)
    assert s["input_ids"][:8] == p[-8:]
    assert s["prompt_truncated"]


@pytest.mark.parametrize(
    "prompt, answer, reason",
    [
        ("p", None, "non_string_answer"),
        ("p", 42, "non_string_answer"),
        (None, "a", "non_string_prompt"),
        ("p", "", "empty_answer"),
        ("p", "  \n\t ", "empty_answer"),
        ("", "a", "empty_prompt"),
        ("   ", "a", "empty_prompt"),
    ],
)
def test_skip_reasons(tokenizer, prompt, answer, reason):
    out = tokenize_example(tokenizer, prompt, answer, max_prompt_len=16, max_ans_len=16)
    assert isinstance(out, Skip) and out.reason == reason


def test_max_ans_len_one_keeps_one_answer_token_without_eos(tokenizer):
    s = tokenize_example(tokenizer, "p", "hello world", max_prompt_len=16, max_ans_len=1)
    ids = supervised(s)
    assert len(ids) == 1 and ids[0] != tokenizer.eos_token_id


def test_custom_template_with_bad_field_is_a_clear_error():
    from easysft.errors import ConfigError

    with pytest.raises(ConfigError, match="only the field"):
        Template.from_name("{prompt} {other}")
    with pytest.raises(ConfigError, match="unknown"):
        Template.from_name("nonsense")
