"""Multi-turn chat on a model's saved template: :class:`ChatSession` (state) and :func:`repl` (the terminal loop).

The conversation is a list of ``{"role", "content"}`` turns rendered by the model's
:class:`~easysft.data.templates.Template` exactly as training renders context: a chat template receives them as
messages before the new user turn; a 'qa'/custom template writes them as ``role: content`` lines before the
prompt. When the rendered prompt exceeds ``max_prompt_len``, the OLDEST user/assistant pair is dropped until it
fits; a single prompt still too long is cut keeping its end, as in training.

REPL commands: ``/reset`` (forget the conversation), ``/system <text>`` (set the system prompt; ``/system``
alone clears it; the conversation is kept), ``/exit``. Ctrl-D or Ctrl-C at the prompt leave quietly; Ctrl-C
while an answer streams stops that answer (it is not added to the conversation).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

from easysft.generate import SavedSettings, build_prompt_ids, generate_ids

HELP = "commands: /reset  /system <text>  /exit  (Ctrl-D also exits)"
USER_PROMPT = "you> "
ASSISTANT_PREFIX = "assistant> "


class ChatSession:
    """One model, its settings and the conversation so far."""

    def __init__(self, model, tokenizer, settings: SavedSettings, system: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.system = system if system is not None else settings.template.system
        self.history: list[dict] = []

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: str | None) -> None:
        self.system = text or None

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids for the next answer: system + as many recent turns as fit in ``max_prompt_len`` + ``user_text``."""
        template = dataclasses.replace(self.settings.template, system=self.system)
        history = list(self.history)
        while history:
            ids = template.prompt_ids(self.tokenizer, user_text, history)
            if len(ids) <= self.settings.max_prompt_len:
                return ids
            history = history[2:]  # drop the oldest user turn and the answer to it
        return build_prompt_ids(self.tokenizer, template, user_text, None, self.settings.max_prompt_len)

    def reply(self, user_text: str, on_text: Callable[[str], None] | None = None) -> str:
        """Generate the answer to ``user_text`` (streamed to ``on_text`` piece by piece) and record the turn."""
        streamer = callback_streamer(self.tokenizer, on_text) if on_text is not None else None
        ids = generate_ids(self.model, self.tokenizer, [self.prompt_ids(user_text)], self.settings.generation,
                           max_new_tokens=self.settings.max_new_tokens, batch_size=1, streamer=streamer)[0]
        answer = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        # Recorded only after generation returns: an interrupted answer leaves the conversation unchanged.
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer


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
            else:
                write(f"unknown command {command}; {HELP}\n")
            continue
        write(ASSISTANT_PREFIX)
        try:
            session.reply(text, on_text=write)
        except KeyboardInterrupt:
            write("\n(answer interrupted)\n")
            continue
        write("\n")


def run_chat(model_cfg, chat_cfg, given: dict) -> int:
    """`easysft chat`: load the model with its saved settings (``given``: the flags typed), then answer
    ``chat_cfg.prompt`` on stdout, or run the REPL."""
    import torch
    from transformers.utils import logging as hf_logging

    from easysft.dtypes import dtype_for_device
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path
    from easysft.models.meta import resolve_settings

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
    session = ChatSession(model, tokenizer, settings, system=chat_cfg.system)
    if chat_cfg.prompt is None:
        return repl(session)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    session.reply(chat_cfg.prompt, on_text=write)
    write("\n")
    return 0
