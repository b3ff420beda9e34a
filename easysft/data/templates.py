"""Prompt templates: how a prompt (and its earlier turns) becomes the token ids that precede the answer.

A template only renders the PROMPT side. The answer is always tokenized on its own and appended
(see :mod:`easysft.data.tokenize`), so the ids the model sees before the answer at training time are exactly
the ids :meth:`Template.prompt_ids` gives at inference time.

Templates (``--template``):

- ``qa`` (default, the original design): the text ``"Q: {prompt} A: "`` -- one space after ``Q:``, one space
  before ``A:``, and ONE trailing space after ``A:``; the answer follows with no extra whitespace. Earlier turns
  (``context``) are rendered before it, one per line, as ``"{role}: {content}\\n"``.
- ``chat``: the tokenizer's own chat template (prompt = user turn, ``add_generation_prompt=True``); earlier
  turns are passed as messages. The answer is followed by the tokenizer's EOS token.
- anything else containing ``{prompt}``: a custom format string (the answer follows the rendered string).
  Literal braces are written ``{{`` and ``}}`` as in :meth:`str.format`.

The template travels with the model in ``easysft.json`` (:meth:`Template.to_dict` / :meth:`Template.from_dict`)
so eval, infer and chat render prompts exactly as training did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from easysft.errors import ConfigError

QA_FORMAT = "Q: {prompt} A: "
TEMPLATE_NAMES = ("qa", "chat")


@dataclass(frozen=True)
class Template:
    """A prompt renderer. ``kind`` is 'format' (qa and custom strings) or 'chat'."""

    name: str
    kind: str
    format: str | None = None
    system: str | None = None

    @classmethod
    def from_name(cls, spec: str | Template | dict) -> Template:
        """'qa' | 'chat' | a custom string containing '{prompt}' | a saved dict -> Template."""
        if isinstance(spec, Template):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        if spec == "qa":
            return cls(name="qa", kind="format", format=QA_FORMAT)
        if spec == "chat":
            return cls(name="chat", kind="chat")
        if isinstance(spec, str) and "{prompt}" in spec:
            try:
                spec.format(prompt="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConfigError(
                    f"--template {spec!r}: only the field {{prompt}} may appear (write literal braces as "
                    f"{{{{ and }}}}): {exc}."
                ) from None
            return cls(name="custom", kind="format", format=spec)
        raise ConfigError(
            f"--template {spec!r} is unknown; choose 'qa', 'chat', or a custom string containing {{prompt}}."
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "format": self.format, "system": self.system}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Template:
        if data.get("kind") not in ("format", "chat"):
            raise ConfigError(f"saved template {data!r} has an unknown kind; expected 'format' or 'chat'.")
        return cls(name=data["name"], kind=data["kind"], format=data.get("format"), system=data.get("system"))

    def render_text(self, prompt: str, context: list[dict] | None = None) -> str:
        """The prompt side as text (format templates only; chat templates render through the tokenizer)."""
        if self.kind != "format":
            raise ValueError("render_text is only defined for format templates")
        lines = "".join(f"{turn['role']}: {turn['content']}\n" for turn in (context or []))
        head = f"{self.system}\n" if self.system else ""
        return head + lines + self.format.format(prompt=prompt)

    def prompt_ids(self, tokenizer, prompt: str, context: list[dict] | None = None) -> list[int]:
        """Token ids that precede the answer (special tokens such as BOS included)."""
        return self.prompt_ids_batch(tokenizer, [prompt], [context])[0]

    def prompt_ids_batch(self, tokenizer, prompts: list[str], contexts: list[list[dict] | None]) -> list[list[int]]:
        """:meth:`prompt_ids` for many prompts in one tokenizer call (the fast tokenizer batches in Rust)."""
        if not prompts:
            return []
        if self.kind == "format":
            texts = [self.render_text(prompt, context) for prompt, context in zip(prompts, contexts, strict=True)]
            return [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "--template chat: this tokenizer has no chat template; use --template qa or a custom string."
            )
        conversations = []
        for prompt, context in zip(prompts, contexts, strict=True):
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages.extend(context or [])
            messages.append({"role": "user", "content": prompt})
            conversations.append(messages)
        # A list of conversations renders and tokenizes as one batch (the same ids as one at a time).
        encoded = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True)
        if hasattr(encoded, "keys"):  # transformers 5 returns a BatchEncoding
            encoded = encoded["input_ids"]
        return [list(ids) for ids in encoded]
