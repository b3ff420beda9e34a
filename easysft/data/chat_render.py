"""A conversation -> ONE training sample, labelled from the chat template's own rendering (exact for any template).

The only place that labels conversations (prompt/answer pairs are labelled in :mod:`easysft.data.tokenize`).

How the supervised tokens are found, without generation markers or per-model patches:

1. ``T`` = the template's rendering of the whole conversation (``tools=`` passed). This text, tokenized once,
   IS the sample: whatever the template does (a default system prompt, earlier turns' reasoning dropped as
   Qwen3 does, a tools block) is what is trained.
2. For each assistant turn ``i`` to supervise, ``P`` = the rendering of the turns before it with the
   generation prompt (exactly what inference builds) and ``Q`` = the rendering of the turns up to and including
   it. ``Q[len(P):]``, without trailing whitespace, is the turn as the template renders it: its reasoning, its
   content, its tool calls and its end-of-turn token (the whitespace after that token belongs to the next turn's
   formatting and is never generated).
3. That text is located in ``T``: right after ``P`` when ``T`` starts with ``P`` (the usual case), otherwise
   after the template's generation header, searching forward from the previous turn (a template that renders
   earlier turns differently once later turns exist). When the template dropped the turn's reasoning in context,
   the reasoning-free rendering is located instead and the turn is counted in ``reasoning_lost_turns``.
4. ``T`` is tokenized piece by piece, cut at every assistant turn's start and end, with character offsets; a
   token is supervised when it STARTS inside a located span. Cutting there means no token spans a turn
   boundary, so the inference prompt of a turn (its text is ``T`` up to the turn, tokenized with the same cuts)
   is a token prefix of the sample even where a tokenizer would merge the generation header with the turn's
   first characters (``"\\n<"``); the sample still decodes to exactly ``T``.

``--reasoning mask`` leaves the reasoning (and the tags around it) of each turn unsupervised; ``drop`` removes it
before rendering. A template that does not render ``reasoning_content`` at all gets the reasoning folded into
the content as ``<think>\\n...\\n</think>\\n\\n``, so it is not lost.

Nothing the data holds may be lost silently: when the template does not render a message's content, a tool
call's name or argument, a tool result or a tool's name, preparation stops with a :class:`DataError` naming the
template and the field (fix: ``--chat_template FILE``). Text from the data that spells one of the tokenizer's
control tokens (``<|im_end|>``...) would become that token: such a row is skipped as ``control_token_in_text``.

Length: a conversation longer than ``max_seq_len`` tokens loses whole rounds (a user turn and everything up to the
next user turn) from the front, keeping system messages and tools; a turn is never cut. When even the last round
does not fit, the row is skipped as ``too_long``.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
from dataclasses import dataclass

from easysft.data.conversations import CONTENT_WITH_REASONING, PRIVATE_KEYS, Conversation, without_reasoning
from easysft.data.tokenize import IGNORE_INDEX, Skip
from easysft.errors import ConfigError, DataError

TRAIN_ON = ("all", "last")
REASONING = ("train", "mask", "drop")
# Fields of a sample's "conversation" counters (one int each; the data report sums them).
CONVERSATION_COUNTERS = ("turns_supervised", "reasoning_tokens", "reasoning_lost_turns", "prefix_mismatches",
                         "dropped_turns")
_PROBE_REASONING = "easysft-reasoning-probe-7f3a"
# Distinct text pieces whose tokenization is kept (a tools block or system prompt repeats across conversations).
PIECE_CACHE_SIZE = 4096
# After a reasoning text: the tag that closes it (</think>, </reasoning> ...) and the whitespace around it.
_REASONING_TAIL = re.compile(r"\s*(?:</[A-Za-z_|-]{1,40}>)?\s*")


@dataclass(frozen=True)
class ConversationOptions:
    """``train_on``: 'all' assistant turns or the 'last' one; ``reasoning``: 'train' | 'mask' | 'drop';
    ``max_seq_len``: most tokens per conversation sample."""

    train_on: str = "all"
    reasoning: str = "train"
    max_seq_len: int = 512


def template_label(tokenizer) -> str:
    """How errors name the template: the --chat_template file, or the model's own."""
    path = getattr(tokenizer, "easysft_chat_template_path", None)
    if path:
        return f"the chat template {path} (--chat_template)"
    return f"the chat template of {getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'}"


class ChatRenderer:
    """Renders and labels :class:`Conversation` objects with one tokenizer's chat template (module docstring)."""

    def __init__(self, tokenizer, options: ConversationOptions):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError("--template chat: this tokenizer has no chat template; pass --chat_template FILE "
                              "(a Jinja chat template) or use --template qa.")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("conversations need a fast tokenizer (character offsets); this one is slow.")
        self.tokenizer, self.options = tokenizer, options
        self.label = template_label(tokenizer)
        self._warned = False  # the prefix-mismatch warning is printed once
        self._newline_ids = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        self._control_ids, self._split_tokens = _exact_control_tokens(tokenizer)
        self._piece_cache: dict[tuple[bool, str], tuple[list[int], list[int]]] = {}
        self._control = _control_tokens(tokenizer)
        self._compiled = None
        self._compiled = self._fast_path()
        self.renders_reasoning = _PROBE_REASONING in self._render_raw(
            [{"role": "user", "content": "q"},
             {"role": "assistant", "content": "a", "reasoning_content": _PROBE_REASONING}], None, False)

    # -------------------------------------------------------------------------------------------- rendering

    def _render_raw(self, messages: list, tools, generation_prompt: bool):
        """The template's text for one message list (or a list of texts for a list of message lists)."""
        if self._compiled is not None:
            batch = messages if messages and isinstance(messages[0], list) else [messages]
            texts = [self._compiled.render(messages=[_aliased(m) for m in conversation], tools=tools,
                                           documents=None, add_generation_prompt=generation_prompt,
                                           **self._template_kwargs) for conversation in batch]
            return texts if batch is messages else texts[0]
        return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=generation_prompt)

    def _fast_path(self):
        """The tokenizer's chat template compiled by transformers itself, rendered directly with our already plain
        messages: what ``apply_chat_template`` does minus its per-call copying of messages and tools (most of
        the cost of a render). Used only when it renders a probe conversation (tools, a tool call, a tool
        result, reasoning) exactly as ``apply_chat_template`` does on this transformers version; else None."""
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(self.tokenizer.chat_template)
        except Exception:  # noqa: BLE001 -- not this transformers version's internals: the public path
            return None
        self._template_kwargs = dict(self.tokenizer.special_tokens_map)
        probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                 {"role": "assistant", "content": "", "reasoning_content": "r", "tool_calls": [
                     {"type": "function", "function": {"name": "f", "arguments": {"a": "1"}}}]},
                 {"role": "tool", "content": "t"}, {"role": "assistant", "content": "c"}]
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        compiled, self._compiled = self._compiled, None
        try:
            expected = [self._render_raw(probe[:k], tools, gen) for k in (2, 5) for gen in (False, True)]
            self._compiled = compiled
            if [self._render_raw(probe[:k], tools, gen) for k in (2, 5) for gen in (False, True)] == expected:
                return compiled
        except Exception:  # noqa: BLE001 -- a template that refuses the probe: keep the public path
            pass
        self._compiled = None
        return None

    def template_message(self, message: dict) -> dict:
        """A normalised message as the template receives it (reasoning folded when the template ignores it)."""
        out = {key: value for key, value in message.items() if key not in PRIVATE_KEYS}
        if "reasoning_content" in out and not self.renders_reasoning:
            reasoning = out.pop("reasoning_content")
            out["content"] = message.get(CONTENT_WITH_REASONING) or f"<think>\n{reasoning}\n</think>\n\n{out['content']}"
        return out

    def render(self, conversation_messages, tools, *, generation_prompt: bool = False) -> str:
        """The template's text for ``conversation_messages`` (normalised messages)."""
        return self._render_raw([self.template_message(m) for m in conversation_messages],
                                list(tools) if tools else None, generation_prompt)

    def render_many(self, conversations: list[list[dict]], tools, *, generation_prompt: bool) -> list[str]:
        """:meth:`render` for several message lists with the same tools, in ONE template call (the call's own
        overhead, copying the tools for the sandbox, costs more than rendering a short conversation)."""
        if not conversations:
            return []
        batch = [[self.template_message(m) for m in messages] for messages in conversations]
        return list(self._render_raw(batch, list(tools) if tools else None, generation_prompt))

    def prompt_ids(self, messages, tools) -> list[int]:
        """The ids inference feeds the model for the next assistant turn: the rendering of ``messages`` with the
        generation prompt, tokenized as the training sample is (cut at the same turn boundaries), so that it is a
        token prefix of the training sample of the whole conversation."""
        messages = list(messages)
        text = self.render(messages, tools, generation_prompt=True)
        try:
            _, _, cuts = self._spans(text, messages, tools, self._turn_renders(messages, tools, self._assistant(messages)))
        except Exception:  # noqa: BLE001 -- a turn the template will not locate: plain tokenization
            cuts = []
        return self._encode(text, cuts)[0]

    # -------------------------------------------------------------------------------------------- labelling

    def tokenize(self, conversation: Conversation) -> dict | Skip:
        """One conversation -> ``{input_ids, labels, num_prompt_tokens, num_answer_tokens, prompt_truncated,
        answer_truncated, conversation: {counter: int}}`` or a Skip (``too_long``, ``control_token_in_text``,
        ``no_supervised_tokens``, ``unparseable_dialogue`` when the template refuses the conversation)."""
        messages = list(conversation.messages)
        if self.options.reasoning == "drop":
            messages = [without_reasoning(m) for m in messages]
        if self._control is not None:
            found = self._control.search(json.dumps([messages, conversation.tools], ensure_ascii=False))
            if found:
                return Skip("control_token_in_text", f"the text holds the control token {found.group(0)!r}")
        first = self._sample(messages, conversation.tools, check_lost=True)
        if isinstance(first, Skip):
            return first
        sample, dropped = first, 0
        while len(sample["input_ids"]) > self.options.max_seq_len:
            shorter = drop_first_round(messages)
            if shorter is None:
                return Skip("too_long", f"{len(sample['input_ids'])} tokens > --max_seq_len "
                                        f"{self.options.max_seq_len} even with only its last round")
            dropped += len(messages) - len(shorter)
            messages = shorter
            sample = self._sample(messages, conversation.tools, check_lost=False)
            if isinstance(sample, Skip):
                return sample
        supervised = sum(1 for label in first["labels"] if label != IGNORE_INDEX)
        sample["num_prompt_tokens"] = len(first["input_ids"]) - supervised
        sample["num_answer_tokens"] = supervised
        sample["prompt_truncated"] = dropped > 0
        sample["answer_truncated"] = False
        sample["conversation"]["dropped_turns"] = dropped
        return sample

    @staticmethod
    def _assistant(messages: list[dict]) -> list[int]:
        return [i for i, m in enumerate(messages) if m["role"] == "assistant"]

    def _to_supervise(self, messages: list[dict]) -> set[int]:
        assistant = self._assistant(messages)
        if self.options.train_on == "last":
            assistant = assistant[-1:]
        return {i for i in assistant if messages[i].get("train", True)}

    def _turn_renders(self, messages: list[dict], tools, turns: list[int]) -> list[tuple[int, str, str]]:
        """``(i, prompt, turn)`` renderings for assistant turns ``turns``, in two template calls."""
        prompts = self.render_many([messages[:i] for i in turns], tools, generation_prompt=True)
        bodies = self.render_many([messages[: i + 1] for i in turns], tools, generation_prompt=False)
        return list(zip(turns, prompts, bodies, strict=True))

    def _encode(self, text: str, cuts: list[int]) -> tuple[list[int], list[int]]:
        """``text`` tokenized piece by piece between the ``cuts`` (turn boundaries), so that no token spans a
        boundary and the text before any boundary tokenizes the same alone (inference) as inside the whole (the
        sample): ids and each token's start character.

        The text is also split around the tokenizer's exact-match control tokens (``<|im_start|>``...), which is
        where the tokenizer itself splits, so the ids do not change; what this buys is that the pieces between
        them (a tools block, a system prompt) repeat across conversations and are tokenized once
        (:attr:`_piece_cache`). A piece after the first is encoded after a newline that is then removed (as
        transformers' ``encode_marked_chat`` does), so SentencePiece tokenizers add no prefix space at a cut."""
        bounds = {c for c in cuts if 0 < c < len(text)}
        if self._split_tokens is not None:
            for found in self._split_tokens.finditer(text):
                bounds.update(found.span())
        bounds = [0, *sorted(b for b in bounds if 0 < b < len(text)), len(text)]
        pieces = [(a, text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
        keys = {(k > 0, piece) for k, (_, piece) in enumerate(pieces) if piece not in self._control_ids}
        missing = keys - self._piece_cache.keys()
        if len(self._piece_cache) + len(missing) > PIECE_CACHE_SIZE:
            # full: start again (the pieces worth keeping, the ones every conversation repeats, come back at once)
            self._piece_cache.clear()
            missing = keys
        if missing:
            self._encode_pieces(sorted(missing))
        ids, starts = [], []
        for k, (base, piece) in enumerate(pieces):
            if piece in self._control_ids:
                ids.append(self._control_ids[piece])
                starts.append(base)
                continue
            piece_ids, piece_starts = self._piece_cache[(k > 0, piece)]
            ids += piece_ids
            starts += [base + start for start in piece_starts]
        return ids, starts

    def _encode_pieces(self, keys: list[tuple[bool, str]]) -> None:
        """Tokenize ``(after_a_cut, piece)`` keys in one call into :attr:`_piece_cache`."""
        tok, newline = self.tokenizer, self._newline_ids
        encoded = tok(["\n" + piece if after else piece for after, piece in keys], add_special_tokens=False,
                      return_offsets_mapping=True)
        for k, (after, piece) in enumerate(keys):
            piece_ids, offsets = list(encoded["input_ids"][k]), list(encoded["offset_mapping"][k])
            shift = 0
            if after:
                if piece_ids[: len(newline)] == newline and all(end <= 1 for _, end in offsets[: len(newline)]):
                    piece_ids, offsets, shift = piece_ids[len(newline):], offsets[len(newline):], 1
                else:  # the newline merged into the piece: encode it alone
                    alone = tok(piece, add_special_tokens=False, return_offsets_mapping=True)
                    piece_ids, offsets = list(alone["input_ids"]), list(alone["offset_mapping"])
            self._piece_cache[(after, piece)] = (piece_ids, [start - shift for start, _ in offsets])

    def _sample(self, messages: list[dict], tools, *, check_lost: bool) -> dict | Skip:
        try:
            # Every rendering this sample needs, in three template calls: the whole conversation; each assistant
            # turn with what precedes it; each turn's inference prompt.
            text = self.render(messages, tools)
            if check_lost:
                self._check_nothing_lost(text, messages, tools)
            renders = self._turn_renders(messages, tools, self._assistant(messages))
            spans, counters, cuts = self._spans(text, messages, tools, renders, self._to_supervise(messages))
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a template's raise_exception or a Jinja error on this row
            return Skip("unparseable_dialogue", f"{self.label} refused it: {str(exc).splitlines()[0][:200]}")
        ids, starts = self._encode(text, cuts)
        labels = [IGNORE_INDEX] * len(ids)
        for start, end, kind in spans:
            first, last = bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)
            for k in range(first, last):
                if kind == "train":
                    labels[k] = ids[k]
                elif kind == "reasoning":
                    counters["reasoning_tokens"] += 1
        if not any(label != IGNORE_INDEX for label in labels):
            return Skip("no_supervised_tokens", "no assistant turn to supervise")
        return {"input_ids": ids, "labels": labels, "conversation": counters}

    def _spans(self, text: str, messages: list[dict], tools, renders: list[tuple[int, str, str]],
               supervise: set[int] | None = None) -> tuple[list[tuple[int, int, str]], dict, list[int]]:
        """Where each assistant turn of ``renders`` (``(i, prompt, turn)``, module docstring) lies in ``text``:
        the spans of the turns in ``supervise`` (('train', start, end) supervised, ('reasoning', ...) counted),
        the counters, and the cuts (every turn's start and end, where :meth:`_encode` splits the text)."""
        counters = dict.fromkeys(CONVERSATION_COUNTERS, 0)
        spans: list[tuple[int, int, str]] = []
        cuts: list[int] = []
        cursor = 0
        for i, prompt, turn in renders:
            if not turn.startswith(prompt):
                raise DataError(f"{self.label}: its generation prompt is not how it starts an assistant turn, so "
                                "inference could never reproduce training; pass --chat_template FILE.")
            body = turn[len(prompt):].rstrip()
            reasoning = messages[i].get("reasoning_content")
            if text.startswith(prompt) and text.startswith(body, len(prompt)):
                start = len(prompt)
            else:
                if not text.startswith(prompt):  # what inference feeds the model is not what training shows
                    counters["prefix_mismatches"] += 1
                    at = next((k for k, (a, b) in enumerate(zip(prompt, text, strict=False)) if a != b),
                              min(len(prompt), len(text)))
                    self._warn_mismatch(f"the prompt of the assistant message at index {i} first differs at "
                                        f"character {at}", text, at)
                start, body = self._locate(text, messages, tools, i, prompt, body, cursor)
                if reasoning and reasoning not in body and (supervise is None or i in supervise):
                    counters["reasoning_lost_turns"] += 1
            end = start + len(body)
            cuts += [start, end]
            cursor = end
            if supervise is not None and i not in supervise:
                continue
            train_from = start
            at = text.find(reasoning, start, end) if reasoning else -1
            if at >= 0 and self.options.reasoning == "mask":
                train_from = _REASONING_TAIL.match(text, at + len(reasoning)).end()
            elif at >= 0:
                spans.append((at, at + len(reasoning), "reasoning"))
            spans.append((train_from, end, "train"))
            counters["turns_supervised"] += 1
        return spans, counters, cuts

    def _warn_mismatch(self, what: str, text: str, at: int) -> None:
        """One stderr line, the first time (per process) an inference prompt is not a token prefix of the sample
        (the data report counts every case: ``prefix_mismatches``)."""
        if self._warned:
            return
        self._warned = True
        print(f"easysft: warning: {self.label}: inference would not see what training saw: {what} of the "
              f"training rendering (...{text[max(0, at - 40):at]!r} | {text[at:at + 40]!r}...); see "
              "`easysft prepare --show`.", file=sys.stderr)

    def _locate(self, text, messages, tools, i, prompt, body, cursor) -> tuple[int, str]:
        """Where turn ``i`` starts in ``text`` when ``text`` does not start with its prompt (module docstring)."""
        history = self.render(messages[:i], tools)
        header = prompt[len(history):] if prompt.startswith(history) else ""
        candidates = [body]
        if messages[i].get("reasoning_content"):
            plain = self.render(messages[:i] + [without_reasoning(messages[i])], tools)
            if plain.startswith(prompt):
                candidates.append(plain[len(prompt):].rstrip())
        for candidate in candidates:
            at = text.find(header + candidate, cursor)
            if at >= 0:
                return at + len(header), candidate
        raise DataError(f"{self.label} renders assistant turn {i} differently inside the whole conversation than "
                        "on its own, so its tokens cannot be located; pass --chat_template FILE.")

    def _check_nothing_lost(self, text: str, messages: list[dict], tools) -> None:
        """DataError when the rendering lacks something the data holds (module docstring)."""
        def lost(field: str) -> DataError:
            return DataError(f"{self.label} does not render {field}, so training would see a shortened "
                             "conversation; pass --chat_template FILE with a template that renders it.")

        for k, message in enumerate(messages):
            content = message["content"].strip()
            if content and content not in text:
                what = "tool results" if message["role"] == "tool" else f"{message['role']} message content"
                raise lost(f"{what} (message {k})")
            for call in message.get("tool_calls", ()):
                function = call["function"]
                if function["name"] not in text:
                    raise lost(f"tool calls (the name {function['name']!r} of message {k})")
                for key, value in function["arguments"].items():
                    if not _rendered(key, text) or (isinstance(value, str) and value and not _rendered(value, text)):
                        raise lost(f"tool-call arguments (argument {key!r} of message {k})")
        for tool in tools or ():
            if tool["function"]["name"] not in text:
                raise lost(f"tools (the schema of {tool['function']['name']!r})")


def _rendered(value: str, text: str) -> bool:
    """Whether ``value`` appears in ``text`` as written or as a JSON string body (templates write arguments with
    ``tojson``, which escapes newlines and quotes, and keeps or escapes non-ASCII letters)."""
    return any(form in text for form in (value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1]))


def drop_first_round(messages: list[dict]) -> list[dict] | None:
    """``messages`` without its first round (a user turn and what follows up to the next user turn); leading
    system messages are kept. None when only one round is left."""
    head = 0
    while head < len(messages) and messages[head]["role"] == "system":
        head += 1
    users = [i for i in range(head, len(messages)) if messages[i]["role"] == "user"]
    if len(users) < 2:
        return None
    return messages[:head] + messages[users[1]:]


def _aliased(message: dict) -> dict:
    """The message with its reasoning also under ``thinking`` (gpt-oss templates read that name), as
    ``apply_chat_template`` passes it."""
    if "reasoning_content" in message and "thinking" not in message:
        return {"thinking": message["reasoning_content"], **message}
    return message


def _exact_control_tokens(tokenizer) -> tuple[dict[str, int], re.Pattern | None]:
    """The added tokens the tokenizer splits text around exactly (no lstrip/rstrip/single_word, not normalized):
    ``{text: id}`` and a regex matching any of them (longest first), or None."""
    exact = {}
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.content and not (added.lstrip or added.rstrip or added.single_word or added.normalized):
            exact[added.content] = token_id
    if not exact:
        return exact, None
    return exact, re.compile("|".join(map(re.escape, sorted(exact, key=len, reverse=True))))


def _control_tokens(tokenizer):
    """A regex of the tokenizer's control tokens (special and added tokens), or None when it has none."""
    tokens = sorted({t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None
