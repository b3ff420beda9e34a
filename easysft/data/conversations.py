"""Conversation rows -> :class:`Conversation`: one normalised dialogue with its tools, ready for a chat template.

Accepted shapes (a record of the ``messages`` or ``sharegpt`` layout):

- **OpenAI messages**: ``{"messages": [{"role", "content", ...}], "tools": [...]}``. Roles ``system``
  (also ``developer``), ``user``, ``assistant``, ``tool`` (also ``ipython``, ``function``, ``observation``).
  An assistant message may carry ``tool_calls`` (``[{"id"?, "type": "function", "function": {"name",
  "arguments"}}]`` or bare ``{"name", "arguments"}``; ``arguments`` an object or a JSON string), reasoning
  (``reasoning_content``, ``reasoning`` or ``thinking``, or a leading ``<think>...</think>`` block in
  ``content``) and ``weight`` (0: rendered but not supervised; 1: supervised; OpenAI's fine-tuning format).
  A tool message may carry ``tool_call_id`` and ``name``. ``content`` is a string, null (a tool-call turn), or a
  list of ``{"type": "text", "text": ...}`` parts (joined).
- **ShareGPT**: ``{"conversations": [{"from", "value"}], "tools": ..., "system": ...}`` with ``human``/``gpt``
  turns, ``function_call`` turns (the value is a JSON call ``{"name", "arguments"}`` or a list of them: an
  assistant turn with ``tool_calls``) and ``observation`` turns (a tool result). A ``system`` column becomes the
  first message.

Normalised form (what templates expect, so that equal data renders to equal tokens whatever its spelling):
``tools`` is a list of ``{"type": "function", "function": {...}}`` (bare schemas are wrapped; a JSON string is
parsed); tool-call ``arguments`` are always objects (a JSON string is parsed, so string and object arguments
give identical ids); reasoning is always the ``reasoning_content`` field (a ``<think>`` block is moved there);
``content`` is always a string. A row that cannot be read this way is a :class:`~easysft.data.tokenize.Skip`
with reason ``unparseable_dialogue`` and a detail naming the message and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from easysft.data.tokenize import Skip

ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "ipython": "tool",
    "function": "tool",
    "observation": "tool",
    "function_call": "assistant",  # ShareGPT: the value is the call itself
}
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
# A reasoning block written into the content: "<think>...</think>" before the answer (DeepSeek-R1, Qwen3 data).
# Private message keys (never passed to a template): the content as written when a <think> block was moved out of
# it, and False for an assistant turn with "weight": 0.
CONTENT_WITH_REASONING = "_content_with_reasoning"
PRIVATE_KEYS = (CONTENT_WITH_REASONING, "train")
_THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


@dataclass(frozen=True)
class Conversation:
    """A normalised dialogue (module docstring). ``messages``: dicts with ``role`` and ``content`` (str), and
    optionally ``reasoning_content``, ``tool_calls``, ``tool_call_id``, ``name``; an assistant message whose
    data said ``weight: 0`` carries ``"train": False``. ``tools``: wrapped function schemas, or None."""

    messages: tuple[dict, ...]
    tools: tuple[dict, ...] | None = None

    def assistant_indices(self) -> list[int]:
        return [i for i, message in enumerate(self.messages) if message["role"] == "assistant"]


def _skip(detail: str) -> Skip:
    return Skip("unparseable_dialogue", detail)


def _load_json(value: Any, what: str) -> Any | Skip:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return _skip(f"{what} is not valid JSON")


def normalise_tools(raw: Any) -> tuple[dict, ...] | None | Skip:
    """A ``tools`` value (list, JSON string of a list, None) -> wrapped function schemas (module docstring)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    raw = _load_json(raw, "tools")
    if isinstance(raw, Skip):
        return raw
    if not isinstance(raw, list):
        return _skip(f"tools is {type(raw).__name__}, not a list of function schemas")
    tools = []
    for k, tool in enumerate(raw):
        if not isinstance(tool, dict):
            return _skip(f"tools[{k}] is {type(tool).__name__}, not an object")
        function = tool.get("function") if tool.get("type", "function") == "function" and "function" in tool else tool
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            return _skip(f"tools[{k}] has no function name")
        tools.append({"type": "function", "function": dict(function)})
    return tuple(tools) or None


def _tool_call(raw: Any, where: str) -> dict | Skip:
    if not isinstance(raw, dict):
        return _skip(f"{where} is {type(raw).__name__}, not an object")
    function = raw.get("function", raw)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        return _skip(f"{where} has no function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    arguments = {} if arguments is None or arguments == "" else _load_json(arguments, f"{where}.arguments")
    if isinstance(arguments, Skip):
        return arguments
    if not isinstance(arguments, dict):
        return _skip(f"{where}.arguments is {type(arguments).__name__}, not an object")
    call = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(raw.get("id"), str):
        call["id"] = raw["id"]
    return call


def message_text(content: Any, where: str) -> str | Skip:
    """A message's ``content`` as one string: a string as is, null as "" (a tool-call turn), OpenAI content parts
    (``[{"type": "text", "text": ...}, ...]``) joined; any other part or type is a Skip naming ``where``. The ONE
    rule for message content, used by conversations and by the prompt/answer dialogue layouts alike."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text parts can be trained on
        texts = []
        for k, part in enumerate(content):
            if isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                return _skip(f"{where}.content[{k}] is a {kind!r} part; only text parts can be trained on")
        return "".join(texts)
    return _skip(f"{where}.content is {type(content).__name__}; message content must be a string")


def _message(item: Any, where: str, role_key: str, content_key: str) -> dict | Skip:
    if not isinstance(item, dict):
        return _skip(f"{where} is {type(item).__name__}, not an object")
    # ShareGPT files in the wild sometimes use role/content; accept either spelling in either layout.
    raw_role = item.get(role_key, item.get("role", item.get("from")))
    role = ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
    if role is None:
        return _skip(f"{where} has unknown role {raw_role!r} (known: {', '.join(sorted(set(ROLES)))})")
    raw_content = item.get(content_key, item.get("content", item.get("value")))
    message: dict = {"role": role}
    if isinstance(raw_role, str) and raw_role.lower() == "function_call":  # ShareGPT: the value is the call
        calls = _load_json(raw_content, f"{where}.value")
        if isinstance(calls, Skip):
            return calls
        raw_calls, raw_content = (calls if isinstance(calls, list) else [calls]), ""
    else:
        raw_calls = item.get("tool_calls")
    content = message_text(raw_content, where)
    if isinstance(content, Skip):
        return content
    if role == "assistant":
        reasoning = next((item[key] for key in REASONING_FIELDS if item.get(key) is not None), None)
        if reasoning is not None and not isinstance(reasoning, str):
            return _skip(f"{where}.reasoning_content is {type(reasoning).__name__}, not a string")
        block = _THINK_BLOCK.match(content)
        if block and reasoning is None:
            # Kept as written: a template that renders no reasoning field renders this text unchanged.
            message[CONTENT_WITH_REASONING] = content
            reasoning, content = block.group(1).strip("\n"), content[block.end():]
        if reasoning:
            message["reasoning_content"] = reasoning
        if raw_calls:
            if not isinstance(raw_calls, list):
                return _skip(f"{where}.tool_calls is {type(raw_calls).__name__}, not a list")
            calls = [_tool_call(call, f"{where}.tool_calls[{k}]") for k, call in enumerate(raw_calls)]
            bad = next((c for c in calls if isinstance(c, Skip)), None)
            if bad is not None:
                return bad
            message["tool_calls"] = calls
        weight = item.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            return _skip(f"{where}.weight is {weight!r}; use 0 (not supervised) or 1")
        if weight == 0:
            message["train"] = False
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(item.get(key), str):
                message[key] = item[key]
    message["content"] = content
    return message


def read_conversation(record: dict, column: str, role_key: str, content_key: str, *,
                      require_assistant: bool = True) -> Conversation | Skip:
    """One record of the ``messages`` / ``sharegpt`` layout -> :class:`Conversation` or a Skip saying why not.
    ``require_assistant=False`` (inference) accepts a conversation that has no assistant turn yet."""
    raw = record.get(column)
    if not isinstance(raw, list):
        return _skip(f"{column} is {type(raw).__name__}, not a list of turns")
    tools = normalise_tools(record.get("tools"))
    if isinstance(tools, Skip):
        return tools
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for position, item in enumerate(raw):
        message = _message(item, f"{column}[{position}]", role_key, content_key)
        if isinstance(message, Skip):
            return message
        messages.append(message)
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        return _skip("no assistant turn")
    if not any(m["role"] == "user" for m in messages):
        return _skip("no user turn")
    return Conversation(tuple(messages), tools)


def without_reasoning(message: dict) -> dict:
    return {key: value for key, value in message.items() if key not in ("reasoning_content", CONTENT_WITH_REASONING)}


def generation_turns(conversation: Conversation, which: str) -> list[tuple[list[dict], dict | None]]:
    """``(messages before the turn, the turn or None)`` for each assistant turn to generate.

    ``which``: 'all' = every assistant turn with ``"weight"`` other than 0 (generation eval: each turn from the
    conversation before it, as the data has it); 'next' = the turn after the last message when the conversation
    ends with a user or tool turn, else its last assistant turn (inference)."""
    messages = list(conversation.messages)
    if which == "next":
        if messages[-1]["role"] != "assistant":
            return [(messages, None)]
        return [(messages[:-1], messages[-1])]
    return [(messages[:i], messages[i]) for i in conversation.assistant_indices()
            if messages[i].get("train", True)]
