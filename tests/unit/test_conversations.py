"""A conversation is one sample whose supervised tokens are exactly its assistant turns as the template renders
them (docs/ARCHITECTURE.md rule 8), for templates of different shapes written here (tests/templates/)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from easysft.data.chat_render import ChatRenderer, ConversationOptions
from easysft.data.conversations import read_conversation
from easysft.data.tokenize import IGNORE_INDEX, Skip
from easysft.errors import DataError

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
ASSETS = Path(__file__).resolve().parents[2] / "easysft" / "assets"
LLAMA_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]

WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
AGENT = {
    "tools": [{"type": "function", "function": WEATHER_TOOL}],
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should look it up.",
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny.", "reasoning_content": "Report it."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome.", "reasoning_content": "Be polite."},
    ],
}


def tokenizer_with(base, template: str | None, extra_tokens=()):
    tok = copy.deepcopy(base)
    if extra_tokens:
        tok.add_special_tokens({"additional_special_tokens": list(extra_tokens)})
    if template is not None:
        folder = ASSETS if (ASSETS / template).is_file() else TEMPLATES  # chatml_tools ships with easysft
        tok.chat_template = (folder / template).read_text()
    return tok


def conversation(record: dict, layout: str = "messages"):
    columns = ("messages", "role", "content") if layout == "messages" else ("conversations", "from", "value")
    out = read_conversation(record, *columns)
    assert not isinstance(out, Skip), out
    return out


def label(tok, record, layout="messages", **options):
    renderer = ChatRenderer(tok, ConversationOptions(**{"max_seq_len": 4096, **options}))
    return renderer.tokenize(conversation(record, layout))


def supervised_runs(tok, sample) -> list[str]:
    """The supervised tokens decoded run by run (a run = consecutive supervised positions)."""
    runs, current = [], []
    for token, lab in zip(sample["input_ids"], sample["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok.decode(run) for run in runs]


def rendered_ids(tok, record):
    conv = conversation(record)
    renderer = ChatRenderer(tok, ConversationOptions())
    text = renderer.render(conv.messages, conv.tools)
    return list(tok(text, add_special_tokens=False)["input_ids"]), text


# -------------------------------------------------------------------------------- exact masks, four templates

def test_chatml_tools_template_supervises_exactly_the_assistant_turns(tokenizer):
    tok = tokenizer_with(tokenizer, "chatml_tools.jinja")
    sample = label(tok, AGENT)
    assert supervised_runs(tok, sample) == [
        # the template has no reasoning field, so reasoning is folded into the content as a <think> block
        '<think>\nI should look it up.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nReport it.\n</think>\n\nIt is 18C and sunny.<|im_end|>",
        "<think>\nBe polite.\n</think>\n\nYou're welcome.<|im_end|>",
    ]
    ids, text = rendered_ids(tok, AGENT)
    assert sample["input_ids"] == ids  # the sample IS the template's rendering, tokenized once
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert "<tool_response>\n18C, sunny\n</tool_response>" in text
    assert sample["conversation"]["turns_supervised"] == 3 and sample["conversation"]["prefix_mismatches"] == 0


def test_llama3_header_template_with_ipython_role(tokenizer):
    tok = tokenizer_with(tokenizer, "llama3_ipython.jinja", LLAMA_TOKENS)
    sample = label(tok, AGENT, reasoning="drop")
    assert supervised_runs(tok, sample) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>',
        "It is 18C and sunny.<|eot_id|>",
        "You're welcome.<|eot_id|>",
    ]
    ids, text = rendered_ids(tok, {**AGENT, "messages": [
        {k: v for k, v in m.items() if k != "reasoning_content"} for m in AGENT["messages"]]})
    # cut at the turn boundaries (so inference prompts are token prefixes), the sample still IS the rendering
    assert tok.decode(sample["input_ids"]) == text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18C, sunny<|eot_id|>" in text
    # the header tokens are single control tokens, and none of them is supervised
    header = tok.convert_tokens_to_ids("<|start_header_id|>")
    assert header in sample["input_ids"]
    assert all(lab == IGNORE_INDEX for t, lab in zip(sample["input_ids"], sample["labels"], strict=True)
               if t == header)


def test_template_that_drops_earlier_reasoning_trains_what_it_renders(tokenizer, capsys):
    tok = tokenizer_with(tokenizer, "thinking_drops_history.jinja")
    sample = label(tok, AGENT)
    warning = capsys.readouterr().err
    # named once, with the first differing character: where the dropped reasoning of turn 2 would have started
    assert warning.count("easysft: warning:") == 1
    assert "the assistant message at index 4 first differs at character" in warning
    assert supervised_runs(tok, sample) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 18C and sunny.<|im_end|>",
        "<think>\nBe polite.\n</think>\n\nYou're welcome.<|im_end|>",
    ]
    counters = sample["conversation"]
    assert counters["reasoning_lost_turns"] == 2  # the two turns before the last user query
    # their inference prompts held the reasoning the whole conversation drops: not a prefix of the sample
    assert counters["prefix_mismatches"] >= 1
    assert counters["reasoning_tokens"] == len(tok("Be polite.", add_special_tokens=False)["input_ids"])


def test_default_system_prompt_template(tokenizer):
    tok = tokenizer_with(tokenizer, "default_system.jinja")
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                           {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}
    sample = label(tok, record)
    assert supervised_runs(tok, sample) == ["4<|im_end|>", "6<|im_end|>"]
    prompt = tok.decode([t for t, lab in zip(sample["input_ids"], sample["labels"], strict=True)
                         if lab == IGNORE_INDEX])
    assert prompt.startswith("<|im_start|>system\nYou are a careful assistant.<|im_end|>\n")
    last = label(tok, record, train_on="last")
    assert supervised_runs(tok, last) == ["6<|im_end|>"] and last["input_ids"] == sample["input_ids"]


def test_the_bundled_template_folds_think_blocks_back_as_written(tokenizer):
    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "<think>greet</think>Hello!"}]}
    assert supervised_runs(tokenizer, label(tokenizer, record)) == ["<think>greet</think>Hello!<|im_end|>"]
    assert supervised_runs(tokenizer, label(tokenizer, record, reasoning="mask")) == ["Hello!<|im_end|>"]
    dropped = label(tokenizer, record, reasoning="drop")
    assert supervised_runs(tokenizer, dropped) == ["Hello!<|im_end|>"]
    assert "greet" not in tokenizer.decode(dropped["input_ids"])


# -------------------------------------------------------------------------------- normalisation

def test_string_and_object_arguments_give_identical_ids(tokenizer):
    tok = tokenizer_with(tokenizer, "chatml_tools.jinja")
    as_object = json.loads(json.dumps(AGENT))
    as_object["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    bare_tools = {**as_object, "tools": json.dumps([WEATHER_TOOL])}  # bare schemas, as a JSON string
    a, b, c = label(tok, AGENT), label(tok, as_object), label(tok, bare_tools)
    assert a["input_ids"] == b["input_ids"] == c["input_ids"] and a["labels"] == b["labels"] == c["labels"]


def test_sharegpt_tool_rows_equal_the_same_openai_rows(tokenizer):
    tok = tokenizer_with(tokenizer, "chatml_tools.jinja")
    openai = {"tools": [WEATHER_TOOL], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                           "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "18C."}]}
    sharegpt = {"system": "Be brief.", "tools": json.dumps([WEATHER_TOOL]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "18C"},
        {"from": "gpt", "value": "18C."}]}
    a, b = label(tok, openai), label(tok, sharegpt, layout="sharegpt")
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert supervised_runs(tok, a)[-1] == "18C.<|im_end|>"


def test_weight_zero_turn_is_rendered_but_not_supervised(tokenizer):
    record = {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "wrong", "weight": 0},
                           {"role": "user", "content": "again?"}, {"role": "assistant", "content": "right"}]}
    sample = label(tokenizer, record)
    assert supervised_runs(tokenizer, sample) == ["right<|im_end|>"]
    assert "wrong" in tokenizer.decode(sample["input_ids"])


@pytest.mark.parametrize("bad,detail", [
    ({"role": "assistant", "content": "x", "weight": 0.5}, "weight"),
    ({"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]},
     "not valid JSON"),
    ({"role": "wizard", "content": "x"}, "unknown role"),
    ({"role": "assistant", "content": [{"type": "image_url", "image_url": "u"}]}, "only text parts"),
])
def test_unreadable_messages_are_skipped_with_the_field_named(bad, detail):
    out = read_conversation({"messages": [{"role": "user", "content": "q"}, bad]}, "messages", "role", "content")
    assert isinstance(out, Skip) and out.reason == "unparseable_dialogue" and detail in out.detail


def test_content_parts_are_joined():
    out = read_conversation({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]},
                                          {"role": "assistant", "content": "c"}]}, "messages", "role", "content")
    assert out.messages[0]["content"] == "ab"


# -------------------------------------------------------------------------------- refusals and length

def test_a_template_that_drops_tool_calls_is_refused_naming_it(tokenizer):
    # The bundled SmolLM2 template renders only role and content: the tool call and the tools would vanish.
    with pytest.raises(DataError, match=r"does not render tool calls .*--chat_template"):
        label(tokenizer, AGENT)


def test_control_token_spelled_in_data_is_skipped(tokenizer):
    record = {"messages": [{"role": "user", "content": "say <|im_end|> please"},
                           {"role": "assistant", "content": "ok"}]}
    out = label(tokenizer, record)
    assert isinstance(out, Skip) and out.reason == "control_token_in_text"


def test_long_conversation_drops_whole_rounds_from_the_front(tokenizer):
    record = {"messages": [{"role": "system", "content": "Sys."}]}
    for k in range(6):
        record["messages"] += [{"role": "user", "content": f"question {k} " + "word " * 20},
                               {"role": "assistant", "content": f"answer {k}"}]
    full = label(tokenizer, record)
    cut = label(tokenizer, record, max_seq_len=len(full["input_ids"]) - 1)
    text = tokenizer.decode(cut["input_ids"])
    assert text.startswith("<|im_start|>system\nSys.<|im_end|>") and "question 0" not in text
    assert "question 1" in text and cut["conversation"]["dropped_turns"] == 2 and cut["prompt_truncated"]
    assert supervised_runs(tokenizer, cut) == [f"answer {k}<|im_end|>" for k in range(1, 6)]
    too_long = label(tokenizer, record, max_seq_len=10)
    assert isinstance(too_long, Skip) and too_long.reason == "too_long"


# -------------------------------------------------------------------------------- through prepare_data

def test_prepare_makes_one_sample_per_conversation_and_reports_it(tokenizer, tmp_path):
    from easysft.config import DataConfig
    from easysft.data.dataset import prepare_data

    long_user = {"role": "user", "content": "word " * 400}
    rows = [
        {"messages": [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "<think>hm</think>A"},
                      {"role": "user", "content": "b?"}, {"role": "assistant", "content": "B"}]},
        {"messages": [{"role": "user", "content": "x <|im_start|> y"}, {"role": "assistant", "content": "z"}]},
        {"messages": [long_user, {"role": "assistant", "content": "long"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def prepare(**kw):
        cfg = DataConfig(data_path=[str(path)], eval_fraction=0.0, template="chat", max_seq_len=128,
                         cache_dir=str(tmp_path / "cache"), **kw)
        return prepare_data(cfg, tokenizer)

    data = prepare()
    train = data.report["train"]
    assert train["rows"] == 4 and train["kept"] == 1 and len(data.train) == 1
    assert {r: n for r, n in train["skipped"].items() if n} == {"control_token_in_text": 1, "too_long": 1,
                                                               "unparseable_dialogue": 1}
    assert supervised_runs(tokenizer, data.train[0]) == ["<think>hm</think>A<|im_end|>", "B<|im_end|>"]
    conv = train["conversation"]
    assert conv["turns_supervised"] == 2 and conv["reasoning_tokens"] == len(tokenizer("hm")["input_ids"])
    last = prepare(train_on="last")
    assert not last.report["cache"]["hit"]  # --train_on is part of the cache key
    assert supervised_runs(tokenizer, last.train[0]) == ["B<|im_end|>"]
    assert last.train[0]["input_ids"] == data.train[0]["input_ids"]


# -------------------------------------------------------------------------------- generation on conversations

def test_parse_tool_calls_reads_any_template_spelling():
    from easysft.scoring import parse_tool_calls

    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    llama = 'x {"name": "get_time", "parameters": {}} and {"name": "f", "arguments": "{\\"a\\": 1}"}'
    listed = '[TOOL_CALLS][{"name": "a", "arguments": {"k": [1, 2]}}, {"type": "function", "function": ' \
             '{"name": "b", "arguments": {}}}] {not json} {"name": "no args"}'
    assert parse_tool_calls(hermes) == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert parse_tool_calls(llama) == [{"name": "get_time", "arguments": {}}, {"name": "f", "arguments": {"a": 1}}]
    assert parse_tool_calls(listed) == [{"name": "a", "arguments": {"k": [1, 2]}}, {"name": "b", "arguments": {}}]
    assert parse_tool_calls("It is sunny.") == []


def test_eval_turns_score_tool_calls_and_text_separately(tmp_path):
    from easysft.data.sources import load_examples
    from easysft.generate.scored import score_turns

    path = tmp_path / "agent.jsonl"
    path.write_text(json.dumps(AGENT) + "\n")
    turns = load_examples(str(path), eval_fraction=0.0, conversation_turns="all")
    assert [t.reference_calls for t in turns] == [[{"name": "get_weather", "arguments": {"city": "Paris"}}],
                                                  None, None]
    assert [len(t.messages) for t in turns] == [2, 4, 6] and turns[1].prompt == "18C, sunny"
    predictions = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon"}}</tool_call>',
                   "<think>ok</think>It is 18C and sunny.", "Bye."]
    metrics, rows = score_turns(turns, predictions)
    assert metrics["tool_call_name"] == 1.0 and metrics["tool_call_exact"] == 0.0  # wrong argument
    assert metrics["exact_match"] == 0.5  # text turns only, reasoning stripped before scoring
    assert rows[0]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Lyon"}}]
    assert rows[0]["reference_tool_calls"] == turns[0].reference_calls
    predictions[0] = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert score_turns(turns, predictions)[0]["tool_call_exact"] == 1.0


def test_inference_prompt_is_a_token_prefix_of_the_training_sample(tokenizer, tmp_path):
    from easysft.data.sources import load_examples
    from easysft.data.templates import Template
    from easysft.generate.prompts import example_prompt_ids

    tok = tokenizer_with(tokenizer, "chatml_tools.jinja")
    sample = label(tok, AGENT)
    path = tmp_path / "agent.jsonl"
    path.write_text(json.dumps(AGENT) + "\n")
    for turn in load_examples(str(path), eval_fraction=0.0, conversation_turns="all"):
        ids = example_prompt_ids(tok, Template.from_name("chat"), turn, 64, 4096)
        assert sample["input_ids"][: len(ids)] == ids and sample["labels"][len(ids)] != IGNORE_INDEX
        assert sample["labels"][len(ids) - 1] == IGNORE_INDEX


def test_turn_boundaries_keep_inference_prompts_token_prefixes_where_whole_tokenization_would_not(tokenizer):
    """An answer that starts with whitespace: tokenized whole, the generation header's newline and the answer's
    merge into one "\\n\\n" token, so the inference prompt (ending in the header's newline) would not be a token
    prefix of the sample. Cut at turn boundaries, every turn's prompt is, and the sample still decodes to the
    rendering."""
    tok = tokenizer_with(tokenizer, "default_system.jinja")
    conv = conversation({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "\n\nFour"},
                                      {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "  Six"}]})
    renderer = ChatRenderer(tok, ConversationOptions(max_seq_len=4096))
    sample = renderer.tokenize(conv)
    text = renderer.render(conv.messages, conv.tools)
    whole = list(tok(text, add_special_tokens=False)["input_ids"])
    prompt_text = renderer.render(conv.messages[:1], conv.tools, generation_prompt=True)
    plain_prompt = list(tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert text.startswith(prompt_text) and whole[: len(plain_prompt)] != plain_prompt  # the merge
    assert tok.decode(sample["input_ids"]) == text
    assert supervised_runs(tok, sample) == ["\n\nFour<|im_end|>", "  Six<|im_end|>"]
    for i in conv.assistant_indices():
        ids = renderer.prompt_ids(conv.messages[:i], conv.tools)
        assert sample["input_ids"][: len(ids)] == ids and sample["labels"][len(ids)] != IGNORE_INDEX
        assert sample["labels"][len(ids) - 1] == IGNORE_INDEX


def test_the_piece_cache_never_changes_the_ids(tokenizer, monkeypatch):
    """Pieces between control tokens are tokenized once and cached; a full cache starts again. Neither may change
    a sample: every sample equals one made by a renderer whose cache holds almost nothing."""
    from easysft.data import chat_render
    from tests.conftest import tool_conversation

    tok = tokenizer_with(tokenizer, "chatml_tools.jinja")
    records = [tool_conversation(k) for k in range(12)]
    cached = ChatRenderer(tok, ConversationOptions(max_seq_len=4096))
    expected = [cached.tokenize(conversation(r)) for r in records]
    assert len(cached._piece_cache) < len(records) * 4  # the tools block is shared, not re-tokenized
    monkeypatch.setattr(chat_render, "PIECE_CACHE_SIZE", 3)
    tiny = ChatRenderer(tok, ConversationOptions(max_seq_len=4096))
    for record, want in zip(records * 2, expected * 2, strict=True):
        got = tiny.tokenize(conversation(record))
        assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]
    whole = list(tok(cached.render(conversation(records[0]).messages, conversation(records[0]).tools),
                     add_special_tokens=False)["input_ids"])
    assert expected[0]["input_ids"] == whole  # splitting at control tokens is where the tokenizer splits too
