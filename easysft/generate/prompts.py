"""Prompt ids for generation: exactly the training prompt (template + END-keeping truncation) minus the answer."""

from __future__ import annotations

from easysft.data.chat_render import ChatRenderer, ConversationOptions
from easysft.data.templates import Template
from easysft.data.tokenize import keep_prompt_end


def build_prompt_ids(tokenizer, template: Template, prompt: str, context: list[dict] | None,
                     max_prompt_len: int) -> list[int]:
    """The ids the model saw before the answer at training time: template, then keep the prompt's END."""
    ids = template.prompt_ids(tokenizer, prompt, context or None)
    return keep_prompt_end(ids, max_prompt_len, tokenizer)[0]


def example_prompt_ids(tokenizer, template: Template, example, max_prompt_len: int, max_seq_len: int) -> list[int]:
    """Prompt ids for an :class:`~easysft.data.sources.Example`: a conversation turn (``example.messages`` set)
    is the chat template's rendering of the messages before it with the generation prompt, tokenized as the
    training sample was, so it is a token prefix of it (its END kept within ``max_seq_len``); any other example
    goes through :func:`build_prompt_ids`."""
    if example.messages is None:
        return build_prompt_ids(tokenizer, template, example.prompt, example.context, max_prompt_len)
    messages = list(example.messages)
    if template.system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": template.system})
    ids = conversation_renderer(tokenizer).prompt_ids(messages, example.tools)
    return keep_prompt_end(ids, max_seq_len, tokenizer)[0]


def conversation_renderer(tokenizer) -> ChatRenderer:
    """One renderer per tokenizer object (its construction renders a probe)."""
    renderer = getattr(tokenizer, "_easysft_renderer", None)
    if renderer is None or renderer.tokenizer is not tokenizer:
        renderer = ChatRenderer(tokenizer, ConversationOptions())
        tokenizer._easysft_renderer = renderer
    return renderer
