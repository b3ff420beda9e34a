"""Multi-turn chat on a model's saved template: :class:`ChatSession` (state) and :func:`repl` (the terminal loop).

The conversation is a list of ``{"role", "content"}`` turns rendered by the model's
:class:`~easysft.data.templates.Template` exactly as training renders context: a chat template receives them as
messages before the new user turn; a 'qa'/custom template writes them as ``role: content`` lines before the
prompt. When the rendered prompt exceeds ``max_prompt_len``, the OLDEST user/assistant pair is dropped until it
fits; a single prompt still too long is cut keeping its end, as in training.

With ``--tools FILE`` (a JSON list of function schemas) and a chat template, the tools are passed to the template
(rendered exactly as training renders conversations, :mod:`easysft.data.chat_render`); an answer that holds tool
calls is shown as such and kept in the conversation as an assistant turn with ``tool_calls``, and ``/tool <result>``
adds the tool's result and generates the next turn.

REPL commands: ``/reset`` (forget the conversation), ``/system <text>`` (set the system prompt; ``/system``
alone clears it; the conversation is kept), ``/tool <result>`` (with --tools), ``/exit``. Ctrl-D or Ctrl-C at the prompt leave quietly; Ctrl-C
while an answer streams stops that answer (it is not added to the conversation).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable

from easysft.data.tokenize import keep_prompt_end
from easysft.errors import ConfigError
from easysft.generate import SavedSettings, build_prompt_ids, generate_ids
from easysft.scoring import parse_tool_calls


def is_text(value: str) -> bool:
    """Whether ``value`` is real text: bytes that were not UTF-8 reach Python as lone surrogates (argv and,
    under surrogateescape, stdin), which no tokenizer accepts."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


NOT_TEXT_LINE = "(that line is not UTF-8 text (undecodable bytes); it was ignored: type it again)\n"

HELP = "commands: /reset  /system <text>  /tool <result>  /exit  (Ctrl-D also exits)"
USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "


class ChatSession:
    """One model, its settings and the conversation so far."""

    def __init__(self, model, tokenizer, settings: SavedSettings, system: str | None = None,
                 tools: list[dict] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.system = system if system is not None else settings.template.system
        self.tools = tools  # normalised function schemas (--tools): conversations go through the chat template
        self.history: list[dict] = []
        self.last_calls: list[dict] = []  # the tool calls of the last answer

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def prompt_ids(self, user_text: str | None) -> list[int]:
        """Ids for the next answer: system + as many recent turns as fit in ``max_prompt_len`` + ``user_text``
        (None: answer the conversation as it stands, after a tool result)."""
        if self.tools is not None:
            return self._conversation_prompt_ids(user_text)
        template = dataclasses.replace(self.settings.template, system=self.system)
        history = list(self.history)
        while history:
            ids = template.prompt_ids(self.tokenizer, user_text, history)
            if len(ids) <= self.settings.max_prompt_len:
                return ids
            history = history[2:]  # drop the oldest user turn and the answer to it
        return build_prompt_ids(self.tokenizer, template, user_text, None, self.settings.max_prompt_len)

    def _conversation_prompt_ids(self, user_text: str | None) -> list[int]:
        from easysft.generate.prompts import conversation_renderer

        head = [{"role": "system", "content": self.system}] if self.system else []
        tail = [{"role": "user", "content": user_text}] if user_text is not None else []
        history = list(self.history)
        renderer = conversation_renderer(self.tokenizer)
        while True:
            ids = renderer.prompt_ids(head + history + tail, self.tools)
            users = [i for i, m in enumerate(history) if m["role"] == "user"]
            if len(ids) <= self.settings.max_prompt_len or not users:
                return keep_prompt_end(ids, self.settings.max_prompt_len, self.tokenizer)[0]
            # drop the oldest round: a user turn and what answered it (tool calls and results included)
            history = history[users[1]:] if len(users) > 1 else []

    def add_tool_result(self, result: str) -> None:
        """A tool's result for the last answer's calls (--tools): the next :meth:`reply` answers from it."""
        self.history.append({"role": "tool", "content": result})

    def reply(self, user_text: str | None, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the answer to ``user_text`` (streamed to ``on_text`` piece by piece) and record the turn;
        ``None`` answers the conversation as it stands (after :meth:`add_tool_result`)."""
        streamer = callback_streamer(self.tokenizer, on_text) if on_text is not None else None
        ids = generate_ids(self.model, self.tokenizer, [self.prompt_ids(user_text)], self.settings.generation,
                           max_new_tokens=self.settings.max_new_tokens, batch_size=1, streamer=streamer)[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        # Recorded only after generation returns: an interrupted answer leaves the conversation unchanged.
        self.record(user_text, answer)
        return answer

    def record(self, user_text: str | None, answer: str) -> None:
        """Add ``user_text`` (unless None) and ``answer`` to the conversation; with --tools an answer holding tool
        calls is kept as a tool-call turn (``last_calls``), so the template renders it as one next time."""
        turn: dict = {"role": "assistant", "content": answer}
        self.last_calls = parse_tool_calls(answer) if self.tools is not None else []
        if self.last_calls:
            turn = {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": call} for call in self.last_calls]}
        self.history += ([{"role": "user", "content": user_text}] if user_text is not None else []) + [turn]


def callback_streamer(tokenizer, on_text: Callable[[str], None]):
    """A transformers TextStreamer that hands decoded text to ``on_text`` instead of printing it."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def repl(session: ChatSession, *, read: Callable[[str], str] = input, out=None) -> int:
    """Read lines, answer them with streaming, handle the slash commands; returns the exit code (0)."""
    out = out or sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    write(HELP + "\n")
    while True:
        try:
            line = read(USER_PROMPT)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return 0
        except UnicodeDecodeError as exc:  # a strict stdin: the stream cannot be resynchronised, so stop
            raise ConfigError(f"stdin: not UTF-8 text (undecodable byte at position {exc.start} of a read); "
                              "type or pipe UTF-8 text.") from None
        if not is_text(line):  # refused, not repaired: the model must answer what was typed, not a guess
            write(NOT_TEXT_LINE)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, argument = text.partition(" ")
            if command in ("/exit", "/quit"):
                return 0
            if command == "/reset":
                session.reset()
                write("(conversation cleared)\n")
            elif command == "/system":
                session.set_system(argument.strip())
                write(f"(system prompt {'set' if session.system else 'cleared'})\n")
            elif command == "/tool" and session.tools is not None:
                session.add_tool_result(argument.strip())
                answer_turn(session, None, write)
            else:
                write(f"unknown command {command}; {HELP}\n")
            continue
        answer_turn(session, text, write)


def answer_turn(session: ChatSession, text: str | None, write: Callable[[str], None]) -> None:
    """Stream one answer; name the tool calls it made (with --tools)."""
    write(ASSISTANT_PREFIX)
    try:
        session.reply(text, on_text=write)
    except KeyboardInterrupt:
        write("\n(answer interrupted)\n")
        return
    write("\n")
    for call in session.last_calls:
        write(f"(tool call: {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}; "
              "give its result with /tool <result>)\n")


def read_tools(path: str) -> list[dict]:
    """``--tools FILE``: a JSON list of function schemas (wrapped or bare), normalised as training reads them."""
    from easysft.data.conversations import normalise_tools
    from easysft.data.tokenize import Skip

    try:
        with open(path, encoding="utf-8") as handle:
            raw = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--tools {path}: cannot read it as UTF-8 text ({exc}).") from None
    tools = normalise_tools(raw)
    if isinstance(tools, Skip) or not tools:
        why = tools.detail if isinstance(tools, Skip) else "it holds no tool"
        raise ConfigError(f"--tools {path}: {why}; give a JSON list of function schemas.")
    return list(tools)


def run_chat(model_cfg, chat_cfg, given: dict) -> int:
    """`easysft chat`: load the model with its saved settings (``given``: the flags typed), then answer
    ``chat_cfg.prompt`` on stdout, or run the REPL."""
    import torch
    from transformers.utils import logging as hf_logging

    from easysft.dtypes import dtype_for_device
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path
    from easysft.models.meta import resolve_settings

    for flag in ("prompt", "system"):  # checked before the model loads: one line, never a tokenizer traceback
        value = getattr(chat_cfg, flag)
        if isinstance(value, str) and not is_text(value):
            raise ConfigError(f"--{flag}: not UTF-8 text (undecodable bytes); give the text in UTF-8.")
    hf_logging.disable_progress_bar()  # no weight-loading bars in front of the first prompt
    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code,
                               chat_template=model_cfg.chat_template)
    settings = resolve_settings(resolved.meta, tokenizer, given)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(resolved.path, dtype=dtype_for_device(chat_cfg.dtype, device),
                       trust_remote_code=model_cfg.trust_remote_code, adapter_path=resolved.adapter_path)
    model.eval().to(device)
    torch.manual_seed(chat_cfg.seed)
    tools = read_tools(chat_cfg.tools) if chat_cfg.tools else None
    if tools is not None and settings.template.kind != "chat":
        raise ConfigError("--tools needs a chat template (--template chat): the tools are passed to it.")
    session = ChatSession(model, tokenizer, settings, system=chat_cfg.system, tools=tools)
    if chat_cfg.prompt is None:
        return repl(session)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    session.reply(chat_cfg.prompt, on_text=write)
    write("\n")
    return 0
