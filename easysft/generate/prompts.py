"""Prompt ids for generation: exactly the training prompt (template + END-keeping truncation) minus the answer."""

from __future__ import annotations

from easysft.data.templates import Template
from easysft.data.tokenize import keep_prompt_end


def build_prompt_ids(tokenizer, template: Template, prompt: str, context: list[dict] | None,
                     max_prompt_len: int) -> list[int]:
    """The ids the model saw before the answer at training time: template, then keep the prompt's END."""
    ids = template.prompt_ids(tokenizer, prompt, context or None)
    return keep_prompt_end(ids, max_prompt_len, tokenizer)[0]
