"""Format adapters: a record's columns -> (prompt, answer, context) turns.

A layout is recognised by its COLUMNS, never by the dataset's name. Layouts, tried in this order
(:data:`LAYOUTS`; the first whose columns are all present wins):

==================  =========================================  ===============================================
layout              columns                                    prompt / answer / context
==================  =========================================  ===============================================
messages            ``messages`` (OpenAI role/content)         see "Dialogues" below
sharegpt            ``conversations`` (ShareGPT from/value)    see "Dialogues" below
alpaca              ``instruction`` + ``output`` (+ ``input``)  prompt = instruction, or
                                                               ``instruction + "\\n\\n" + input`` when input is
                                                               a non-blank string; answer = output
prompt/answer       ``prompt`` + ``answer``                    as given (the original design's format)
prompt/response     ``prompt`` + ``response``                  as given
prompt/completion   ``prompt`` + ``completion``                as given
prompt/chosen       ``prompt`` + ``chosen`` (Dahoas/rm-static)  as given (the prompt text is used verbatim)
hh-rlhf             ``chosen`` (a ``\\n\\nHuman: ... \\n\\nAssistant: ...`` text)  see "Dialogues" below
==================  =========================================  ===============================================

Dialogues (messages, sharegpt, hh-rlhf) are first turned into a list of ``{role, content}`` turns with roles
``system``, ``user``, ``assistant`` (ShareGPT ``human``->user, ``gpt``->assistant; hh-rlhf ``Human:``->user,
``Assistant:``->assistant, each turn's text stripped of surrounding whitespace). Then:

1. the LAST assistant turn is the answer; turns after it are dropped;
2. the turn right before it must be a user turn: its content is the prompt;
3. every earlier turn, in order, is ``context`` (system turns keep role ``system``).

A dialogue without a final assistant turn, without a user turn right before it, with an unknown role, or with
non-text content in the context is skipped as ``unparseable_dialogue``. With ``multi_turn=True`` every
assistant turn that follows a user turn becomes its own example (its context = the turns before that user
turn), so every assistant turn is supervised.

Inference rows (:func:`inference_rows`, what ``easysft infer`` reads): the answer may be absent. A record with a
``prompt`` column and no answer column is read as layout ``prompt`` (answer None); a dialogue that ends with a
user turn asks for the next answer (prompt = that user turn, context = the turns before it, answer None).
Training never accepts these. (In a file whose layout has an answer column, a row without it is still skipped
as ``missing_key``: a misspelt key must not pass as "no reference".)

Adapters never judge the prompt/answer VALUES (None, numbers, empty text): they pass them on, and
:func:`easysft.data.tokenize.tokenize_example` skips them with the right reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from easysft.data.conversations import ROLES as CONVERSATION_ROLES, message_text
from easysft.data.tokenize import Skip
from easysft.errors import DataError


@dataclass(frozen=True)
class Turns:
    """What one record supervises: a prompt, its answer, and the earlier turns (role/content dicts)."""

    prompt: Any
    answer: Any
    context: tuple[dict, ...] = ()


Adapter = Callable[[dict, bool], "list[Turns] | Skip"]


@dataclass(frozen=True)
class Layout:
    """A named column layout: the columns that identify it and the adapter that reads one record."""

    name: str
    columns: tuple[str, ...]
    adapt: Adapter


# ------------------------------------------------------------------------------------------------------
# Inference rows: the answer may be absent

_INFERENCE_ROWS: ContextVar[bool] = ContextVar("easysft_inference_rows", default=False)


@contextmanager
def inference_rows() -> Iterator[None]:
    """Within this block layouts and adapters read rows to generate for: the answer may be absent (see the module
    docstring). Only ``easysft infer`` enters it; training always requires answers."""
    token = _INFERENCE_ROWS.set(True)
    try:
        yield
    finally:
        _INFERENCE_ROWS.reset(token)


# ------------------------------------------------------------------------------------------------------
# Flat layouts


def _pair(prompt_col: str, answer_col: str) -> Adapter:
    def adapt(record: dict, multi_turn: bool) -> list[Turns] | Skip:
        missing = [col for col in (prompt_col, answer_col) if col not in record]
        if missing:
            return Skip("missing_key", f"no {' or '.join(repr(m) for m in missing)} key")
        return [Turns(record[prompt_col], record[answer_col])]

    return adapt


def _alpaca(record: dict, multi_turn: bool) -> list[Turns] | Skip:
    missing = [col for col in ("instruction", "output") if col not in record]
    if missing:
        return Skip("missing_key", f"no {' or '.join(repr(m) for m in missing)} key")
    instruction, extra = record["instruction"], record.get("input")
    if extra is not None and not isinstance(extra, str):
        return Skip("non_string_prompt", f"input is {type(extra).__name__}")
    prompt = instruction
    if isinstance(instruction, str) and extra and extra.strip():
        prompt = f"{instruction}\n\n{extra}"
    return [Turns(prompt, record["output"])]


# ------------------------------------------------------------------------------------------------------
# Dialogues

# The conversation roles that prompt/answer dialogues know (tool turns need --template chat).
_ROLES = {name: role for name, role in CONVERSATION_ROLES.items() if role != "tool" and name != "function_call"}


def split_dialogue(turns: list[dict], multi_turn: bool = False) -> list[Turns] | Skip:
    """Normalised ``{role, content}`` turns -> the examples they supervise (rules in the module docstring)."""
    if _INFERENCE_ROWS.get() and turns and turns[-1]["role"] == "user":
        # Inference: a dialogue ending with a user turn asks for the next answer (there is no reference).
        context = turns[:-1]
        bad = [t for t in context if not isinstance(t["content"], str)]
        if bad:
            return Skip("unparseable_dialogue", f"a {bad[0]['role']} turn's content is {type(bad[0]['content']).__name__}")
        return [Turns(turns[-1]["content"], None, tuple(dict(t) for t in context))]
    answer_at = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    if not answer_at:
        return Skip("unparseable_dialogue", "no assistant turn")
    out: list[Turns] = []
    for i in answer_at if multi_turn else answer_at[-1:]:
        if i == 0 or turns[i - 1]["role"] != "user":
            continue  # e.g. an opening greeting: no question before it, so it supervises nothing
        context = turns[: i - 1]
        bad = [t for t in context if not isinstance(t["content"], str)]
        if bad:
            return Skip("unparseable_dialogue", f"a {bad[0]['role']} turn's content is {type(bad[0]['content']).__name__}")
        out.append(Turns(turns[i - 1]["content"], turns[i]["content"], tuple(dict(t) for t in context)))
    if not out:
        return Skip("unparseable_dialogue", "no user turn right before the final assistant turn")
    return out


def _chat_list(column: str, role_key: str, content_key: str) -> Adapter:
    def adapt(record: dict, multi_turn: bool) -> list[Turns] | Skip:
        if column not in record:
            return Skip("missing_key", f"no {column!r} key")
        raw = record[column]
        if not isinstance(raw, list):
            return Skip("unparseable_dialogue", f"{column} is {type(raw).__name__}, not a list of turns")
        turns = []
        for position, item in enumerate(raw):
            if not isinstance(item, dict):
                return Skip("unparseable_dialogue", f"{column}[{position}] is {type(item).__name__}, not an object")
            # ShareGPT files in the wild sometimes use role/content; accept either spelling in either layout.
            role = item.get(role_key, item.get("role", item.get("from")))
            content = item.get(content_key, item.get("content", item.get("value")))
            normal = _ROLES.get(str(role).lower()) if isinstance(role, str) else None
            if normal is None and isinstance(role, str) and role.lower() in CONVERSATION_ROLES:
                return Skip("unparseable_dialogue", f"{column}[{position}] is a {role!r} turn: tool calls and "
                                                    "results are read with --template chat only")
            if normal is None:
                return Skip("unparseable_dialogue", f"{column}[{position}] has unknown role {role!r}")
            if isinstance(content, list):  # OpenAI content parts: the conversations' one rule for content
                content = message_text(content, f"{column}[{position}]")
                if isinstance(content, Skip):
                    return content
            turns.append({"role": normal, "content": content})
        return split_dialogue(turns, multi_turn)

    return adapt


# "\n\nHuman:" / "\n\nAssistant:" separate hh-rlhf turns; a dialogue may also start with the bare marker.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


def parse_hh_dialogue(text: str) -> list[dict] | Skip:
    """An hh-rlhf ``chosen`` text -> ``{role, content}`` turns (content stripped of surrounding whitespace)."""
    if not isinstance(text, str):
        return Skip("non_string_answer", f"chosen is {type(text).__name__}")
    matches = list(_HH_MARKER.finditer(text))
    if not matches:
        return Skip("unparseable_dialogue", "no '\\n\\nHuman:' / '\\n\\nAssistant:' markers")
    if text[: matches[0].start()].strip():
        return Skip("unparseable_dialogue", "text before the first Human:/Assistant: marker")
    turns = []
    for k, match in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        role = "user" if match.group(1) == "Human" else "assistant"
        turns.append({"role": role, "content": text[match.end():end].strip()})
    return turns


def _hh_rlhf(record: dict, multi_turn: bool) -> list[Turns] | Skip:
    if "chosen" not in record:
        return Skip("missing_key", "no 'chosen' key")
    turns = parse_hh_dialogue(record["chosen"])
    if isinstance(turns, Skip):
        return turns
    return split_dialogue(turns, multi_turn)


def _prompt_only(record: dict, multi_turn: bool) -> list[Turns] | Skip:
    if "prompt" not in record:
        return Skip("missing_key", "no 'prompt' key")
    return [Turns(record["prompt"], None)]


# Inference rows only (never training): a list of prompts, no reference answers.
PROMPT_ONLY = Layout("prompt", ("prompt",), _prompt_only)

LAYOUTS: tuple[Layout, ...] = (
    Layout("messages", ("messages",), _chat_list("messages", "role", "content")),
    Layout("sharegpt", ("conversations",), _chat_list("conversations", "from", "value")),
    Layout("alpaca", ("instruction", "output"), _alpaca),
    Layout("prompt/answer", ("prompt", "answer"), _pair("prompt", "answer")),
    Layout("prompt/response", ("prompt", "response"), _pair("prompt", "response")),
    Layout("prompt/completion", ("prompt", "completion"), _pair("prompt", "completion")),
    Layout("prompt/chosen", ("prompt", "chosen"), _pair("prompt", "chosen")),
    Layout("hh-rlhf", ("chosen",), _hh_rlhf),
)


def describe_layouts() -> str:
    return "; ".join(f"{layout.name} ({' + '.join(layout.columns)})" for layout in LAYOUTS)


def detect_layout(columns, source: str) -> Layout:
    """The first layout of :data:`LAYOUTS` whose columns are all present; DataError listing both otherwise."""
    present = set(columns)
    for layout in LAYOUTS:
        if present.issuperset(layout.columns):
            return layout
    if _INFERENCE_ROWS.get() and present.issuperset(PROMPT_ONLY.columns):
        return PROMPT_ONLY
    found = ", ".join(sorted(present)) or "none"
    raise DataError(
        f"{source}: unrecognised data layout (columns found: {found}); accepted layouts: {describe_layouts()}. "
        "Rename the columns to one of these."
    )
