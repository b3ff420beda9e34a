"""Column layouts -> prompt/answer/context (easysft.data.adapters), on hand-written rows."""

import pytest

from easysft.data.adapters import LAYOUTS, Turns, detect_layout, parse_hh_dialogue
from easysft.data.tokenize import Skip
from easysft.errors import DataError


def adapt(record, multi_turn=False):
    return detect_layout(record.keys(), "test").adapt(record, multi_turn)


# ---------------------------------------------------------------------------------------------- detection

@pytest.mark.parametrize(
    "columns, layout",
    [
        (["prompt", "answer"], "prompt/answer"),
        (["prompt", "response"], "prompt/response"),
        (["prompt", "completion"], "prompt/completion"),
        (["prompt", "response", "chosen", "rejected"], "prompt/response"),  # Dahoas/rm-static columns
        (["prompt", "chosen", "rejected"], "prompt/chosen"),
        (["chosen", "rejected"], "hh-rlhf"),
        (["instruction", "input", "output"], "alpaca"),
        (["instruction", "output"], "alpaca"),
        (["messages"], "messages"),
        (["prompt", "prompt_id", "messages"], "messages"),  # ultrachat-style: the full dialogue wins
        (["conversations", "id"], "sharegpt"),
    ],
)
def test_layout_is_recognised_by_columns(columns, layout):
    assert detect_layout(columns, "x").name == layout


def test_unrecognised_layout_lists_columns_and_layouts():
    with pytest.raises(DataError) as info:
        detect_layout(["question", "reply"], "data/x.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data/x.json: unrecognised data layout")
    assert "question, reply" in message
    for layout in LAYOUTS:
        assert layout.name in message


def test_dataset_name_does_not_matter_only_columns():
    # A layout is never guessed from a name such as 'hh-rlhf' in the path.
    with pytest.raises(DataError):
        detect_layout(["text"], "Anthropic/hh-rlhf")


# ---------------------------------------------------------------------------------------------- flat layouts

def test_prompt_answer_values_pass_through_unjudged():
    # null/numeric values are tokenize_example's business (non_string_* reasons), not the adapter's.
    assert adapt({"prompt": "p", "answer": None}) == [Turns("p", None)]
    assert adapt({"prompt": 3, "answer": "a"}) == [Turns(3, "a")]


def test_prompt_chosen_uses_text_verbatim():
    row = {"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " hello", "rejected": "no"}
    assert adapt(row) == [Turns("\n\nHuman: hi\n\nAssistant:", " hello")]


def test_alpaca_without_input():
    assert adapt({"instruction": "Name a colour.", "input": "", "output": "Red"}) == [Turns("Name a colour.", "Red")]
    assert adapt({"instruction": "Name a colour.", "output": "Red"}) == [Turns("Name a colour.", "Red")]
    assert adapt({"instruction": "Name a colour.", "input": None, "output": "Red"}) == [Turns("Name a colour.", "Red")]
    assert adapt({"instruction": "Name a colour.", "input": "  ", "output": "Red"}) == [Turns("Name a colour.", "Red")]


def test_alpaca_with_input_joins_with_blank_line():
    row = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}
    assert adapt(row) == [Turns("Translate to French.\n\ncat", "chat")]


def test_alpaca_non_string_input_is_non_string_prompt():
    out = adapt({"instruction": "x", "input": 5, "output": "y"})
    assert isinstance(out, Skip) and out.reason == "non_string_prompt"


def test_missing_key_in_one_row():
    layout = detect_layout(["prompt", "answer"], "x")
    out = layout.adapt({"prompt": "only"}, False)
    assert isinstance(out, Skip) and out.reason == "missing_key" and "'answer'" in out.detail


# ---------------------------------------------------------------------------------------------- hh-rlhf

HH = "\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6."


def test_hh_single_turn():
    out = adapt({"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?", "rejected": "x"})
    assert out == [Turns("Hi there", "Hello! How can I help?", ())]


def test_hh_multi_turn_last_assistant_is_answer_earlier_turns_are_context():
    (out,) = adapt({"chosen": HH, "rejected": "x"})
    assert out.prompt == "And 3+3?"
    assert out.answer == "6."
    assert list(out.context) == [{"role": "user", "content": "What is 2+2?"},
                                 {"role": "assistant", "content": "4."}]


def test_hh_turn_text_keeps_inner_newlines():
    text = "\n\nHuman: line one\nline two\n\nAssistant: a\nb\n"
    (out,) = adapt({"chosen": text})
    assert (out.prompt, out.answer) == ("line one\nline two", "a\nb")


def test_hh_without_leading_newlines():
    (out,) = adapt({"chosen": "Human: hi\n\nAssistant: yo"})
    assert (out.prompt, out.answer) == ("hi", "yo")


@pytest.mark.parametrize(
    "text",
    [
        "just some text",  # no markers
        "\n\nHuman: only a question",  # no assistant turn
        "\n\nAssistant: hello\n\nAssistant: again",  # no human turn before the answer
        "preamble\n\nHuman: hi\n\nAssistant: yo",  # text before the first marker
    ],
)
def test_hh_unparseable(text):
    out = adapt({"chosen": text})
    assert isinstance(out, Skip) and out.reason == "unparseable_dialogue"


def test_hh_trailing_human_turn_is_dropped():
    (out,) = adapt({"chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: thanks"})
    assert (out.prompt, out.answer) == ("hi", "yo")


def test_hh_empty_final_answer_is_left_to_tokenize():
    (out,) = adapt({"chosen": "\n\nHuman: hi\n\nAssistant:"})
    assert out.answer == ""  # tokenize_example skips it as empty_answer


def test_hh_non_string_chosen():
    out = adapt({"chosen": None})
    assert isinstance(out, Skip) and out.reason == "non_string_answer"


def test_hh_multi_turn_flag_supervises_every_assistant_turn():
    out = adapt({"chosen": HH}, multi_turn=True)
    assert [(t.prompt, t.answer, len(t.context)) for t in out] == [("What is 2+2?", "4.", 0), ("And 3+3?", "6.", 2)]


def test_parse_hh_dialogue_roles():
    assert [t["role"] for t in parse_hh_dialogue(HH)] == ["user", "assistant", "user", "assistant"]


# ---------------------------------------------------------------------------------------------- chat lists

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome."},
]


def test_messages_system_goes_to_context():
    (out,) = adapt({"messages": MESSAGES})
    assert out.prompt == "And of Italy?"
    assert out.answer == "Rome."
    assert list(out.context) == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]


def test_messages_after_last_assistant_are_dropped():
    (out,) = adapt({"messages": MESSAGES[:3] + [{"role": "user", "content": "thanks"}]})
    assert (out.prompt, out.answer, len(out.context)) == ("Capital of France?", "Paris.", 1)


def test_messages_multi_turn():
    out = adapt({"messages": MESSAGES}, multi_turn=True)
    assert [(t.prompt, t.answer) for t in out] == [("Capital of France?", "Paris."), ("And of Italy?", "Rome.")]
    assert [t["role"] for t in out[0].context] == ["system"]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hi"}],  # no assistant
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],  # no user before answer
        [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}],  # unknown role
        ["not a dict"],
        "not a list",
        [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"},
         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],  # non-text context
    ],
)
def test_messages_unparseable(messages):
    out = adapt({"messages": messages})
    assert isinstance(out, Skip) and out.reason == "unparseable_dialogue"


def test_messages_non_string_final_answer_is_left_to_tokenize():
    (out,) = adapt({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]})
    assert out.answer is None


def test_sharegpt_from_value():
    conv = [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Goodbye!"},
    ]
    (out,) = adapt({"conversations": conv, "id": "x1"})
    assert (out.prompt, out.answer) == ("Bye", "Goodbye!")
    assert list(out.context) == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello!"}]


def test_sharegpt_unknown_speaker():
    out = adapt({"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]})
    assert isinstance(out, Skip) and out.reason == "unparseable_dialogue" and "narrator" in out.detail
