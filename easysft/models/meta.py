"""The one rule for settings saved with a model (``easysft.json``) against the flags a user typed.

Lowest priority first: built-in defaults, the values saved in ``easysft.json``, the flags actually given.
``given`` holds only the flags the user typed (the CLI's flat dict, never argparse defaults), so a saved value is
never overridden by a mere default. A model easysft did not train (no ``easysft.json``) gets template 'chat' when
its tokenizer has a chat template, else 'qa'. eval, infer and chat all resolve their settings here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from easysft.config import DataConfig, GenerateConfig
from easysft.data.templates import Template
from easysft.errors import ConfigError


@dataclass
class SavedSettings:
    """How to render prompts and generate for a model: its template, max lengths and generation settings."""

    template: Template
    max_prompt_len: int
    max_ans_len: int
    generation: GenerateConfig

    @property
    def max_new_tokens(self) -> int:
        """``--max_new_tokens`` when given, else ``max_ans_len`` (the answer length the model was trained on)."""
        return self.generation.max_new_tokens or self.max_ans_len

    @property
    def template_spec(self) -> str | dict:
        """The template as ``DataConfig.template`` takes it (a name, or a custom format string)."""
        return self.template.format if self.template.name == "custom" else self.template.name


def resolve_settings(meta: dict, tokenizer, given: dict) -> SavedSettings:
    """Merge defaults < ``meta`` (easysft.json) < ``given`` (typed flags); see the module docstring."""
    if "template" in given:
        template_spec = given["template"]
    elif meta.get("template"):
        template_spec = meta["template"]
    else:
        template_spec = "chat" if getattr(tokenizer, "chat_template", None) else "qa"
    lengths = {}
    defaults = DataConfig()
    for name in ("max_prompt_len", "max_ans_len"):
        value = given.get(name, meta.get(name, getattr(defaults, name)))
        if value is None or int(value) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}.")
        lengths[name] = int(value)
    names = {f.name for f in dataclasses.fields(GenerateConfig)}
    gen_values = {k: v for k, v in (meta.get("generation") or {}).items() if k in names}
    gen_values.update({k: v for k, v in given.items() if k in names})
    return SavedSettings(Template.from_name(template_spec), generation=GenerateConfig(**gen_values), **lengths)
