"""Property-based tests (Hypothesis) of the conversation path: random conversations (roles, tool calls, reasoning,
weights, whitespace-leading text), four templates, train_on and reasoning options and length limits keep the
invariants of docs/ARCHITECTURE.md rule 8:

- the sample decodes to exactly the template's rendering of the (possibly front-truncated) conversation;
- the supervised tokens are exactly the located assistant turns, each decoded run ending with the turn's end;
- every supervised turn's inference prompt is a token prefix of the sample, followed by a supervised token;
- a sample never exceeds --max_seq_len, and truncation drops whole rounds only.
"""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from easysft.data.chat_render import ChatRenderer, ConversationOptions
from easysft.data.conversations import read_conversation
from easysft.data.tokenize import IGNORE_INDEX, Skip
from tests.unit.test_conversations import ASSETS, LLAMA_TOKENS, TEMPLATES

WORDS = st.sampled_from(["Paris", "rain", "  two", "\n\nlist", "42", "¿qué?", "東京", "a-b", "x\ty", " ", "ok."])
TEXT = st.lists(WORDS, min_size=1, max_size=6).map(" ".join)
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


@st.composite
def conversations(draw):
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(TEXT)})
    for k in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(TEXT)})
        if draw(st.booleans()):  # a tool round first
            arguments = {"q": draw(TEXT)}
            messages.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "lookup", "arguments": draw(
                    st.sampled_from([arguments, json.dumps(arguments)]))}}]})
            messages.append({"role": "tool", "content": draw(TEXT)})
        answer = {"role": "assistant", "content": draw(TEXT)}
        if draw(st.booleans()):
            answer["reasoning_content"] = draw(TEXT).strip() or "think"
        if k == 0 and draw(st.booleans()):
            answer["weight"] = 0
        messages.append(answer)
    return {"messages": messages, "tools": TOOLS}


def _tokenizer_for(base, name: str):
    tok = copy.deepcopy(base)
    if name == "llama3_ipython.jinja":
        tok.add_special_tokens({"additional_special_tokens": LLAMA_TOKENS})
    folder = ASSETS if (ASSETS / name).is_file() else TEMPLATES
    tok.chat_template = (folder / name).read_text()
    return tok


@pytest.fixture(scope="module")
def tokenizers(tokenizer):
    names = ("chatml_tools.jinja", "llama3_ipython.jinja", "thinking_drops_history.jinja")
    return {name: _tokenizer_for(tokenizer, name) for name in names}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=conversations(), template=st.sampled_from(["chatml_tools.jinja", "llama3_ipython.jinja",
                                                         "thinking_drops_history.jinja"]),
       train_on=st.sampled_from(["all", "last"]), reasoning=st.sampled_from(["train", "mask", "drop"]),
       max_seq_len=st.sampled_from([64, 160, 4096]))
def test_conversation_samples_keep_their_invariants(tokenizers, record, template, train_on, reasoning, max_seq_len):
    tok = tokenizers[template]
    conversation = read_conversation(record, "messages", "role", "content")
    assert not isinstance(conversation, Skip)
    renderer = ChatRenderer(tok, ConversationOptions(train_on, reasoning, max_seq_len))
    sample = renderer.tokenize(conversation)
    if isinstance(sample, Skip):
        assert sample.reason in ("too_long", "no_supervised_tokens"), sample
        return
    ids, labels = sample["input_ids"], sample["labels"]
    assert len(ids) == len(labels) <= max_seq_len
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(ids, labels, strict=True))
    # the kept messages: the conversation minus whole rounds from the front (system kept)
    messages = list(conversation.messages)
    if reasoning == "drop":
        messages = [{k: v for k, v in m.items() if k not in ("reasoning_content", "_content_with_reasoning")}
                    for m in messages]
    kept = messages
    while tok.decode(ids) != renderer.render(kept, conversation.tools):
        users = [i for i, m in enumerate(kept) if m["role"] == "user"]
        head = [m for m in kept[: users[0]] if m["role"] == "system"]
        assert len(users) > 1, "the sample is not the rendering of any front-truncation of the conversation"
        kept = head + kept[users[1]:]
    # every supervised turn: its inference prompt is a token prefix, followed by a supervised token
    assistant = [i for i, m in enumerate(kept) if m["role"] == "assistant"]
    supervised = [i for i in (assistant[-1:] if train_on == "last" else assistant) if kept[i].get("train", True)]
    text = renderer.render(kept, conversation.tools)
    for i in supervised:
        prompt_text = renderer.render(kept[:i], conversation.tools, generation_prompt=True)
        if not text.startswith(prompt_text):
            continue  # a template that rewrites history (counted as prefix_mismatches, warned)
        prompt = renderer.prompt_ids(kept[:i], conversation.tools)
        assert ids[: len(prompt)] == prompt
        assert labels[len(prompt) - 1] == IGNORE_INDEX
        if reasoning != "mask" or not kept[i].get("reasoning_content"):
            assert labels[len(prompt)] != IGNORE_INDEX
    assert sample["conversation"]["turns_supervised"] == len(supervised)
