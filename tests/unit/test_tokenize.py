"""Labels and truncation rules of easysft.data.tokenize (docs/ARCHITECTURE.md rules 1-2)."""

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


@pytest.mark.parametrize("template", TEMPLATES)
def test_batched_tokenization_equals_one_row_at_a_time(tokenizer, template):
    """tokenize_examples (one tokenizer call per batch, what data preparation uses) gives every row exactly the
    sample -- or the skip -- that the row gets alone, with the order kept and invalid rows in between."""
    from easysft.data.tokenize import build_sample, tokenize_examples

    context = [{"role": "user", "content": "Earlier question"}, {"role": "assistant", "content": "Earlier answer"}]
    rows = [(f"Prompt number {i}: " + "word " * (i * 7 % 40), answer, context if i % 3 == 0 else None)
            for i, answer in enumerate(ANSWERS)]
    rows[2:2] = [(None, "an answer", None), ("a prompt", "   ", None), ("x " * 300, "y " * 80, None)]
    limits = dict(max_prompt_len=48, max_ans_len=16, template=template)
    batched = tokenize_examples(tokenizer, rows, **limits)
    assert batched == [tokenize_examples(tokenizer, [row], **limits)[0] for row in rows]
    # An independent reference: transformers' own one-conversation / one-text calls, then the same truncation.
    for (prompt, answer, ctx), out in zip(rows, batched, strict=True):
        if isinstance(out, Skip):
            continue
        spec = Template.from_name(template)
        if spec.kind == "chat":
            messages = [*(ctx or []), {"role": "user", "content": prompt}]
            reference_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            reference_prompt = list(reference_prompt["input_ids"] if hasattr(reference_prompt, "keys")
                                    else reference_prompt)
        else:
            reference_prompt = tokenizer(spec.render_text(prompt, ctx))["input_ids"]
        reference_answer = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert out == build_sample(reference_prompt, reference_answer, tokenizer, max_prompt_len=48, max_ans_len=16)
    assert [type(out).__name__ for out in batched[2:5]] == ["Skip", "Skip", "dict"]
