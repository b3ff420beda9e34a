"""`easysft chat`: a streaming multi-turn REPL, or one answer on stdout with ``--prompt``.

The template, max lengths and generation defaults saved with the model (easysft.json) apply unless the flag
is given; the generation flags are those of `easysft infer`.
"""

from __future__ import annotations

from easysft.config import (
    DTYPES,
    GenerateConfig,
    ModelConfig,
    add_dataclass_flags,
    convert_value,
    from_flat_dict,
)


def add_arguments(parser) -> None:
    add_dataclass_flags(parser, ModelConfig, GenerateConfig)
    group = parser.add_argument_group("chat")
    group.add_argument("--prompt", help="Answer this one prompt on stdout and exit (no REPL).")
    group.add_argument("--system", help="System prompt (default: the one saved with the template, if any).")
    group.add_argument("--template", help="Override the saved template: 'qa', 'chat' or a string with {prompt}.")
    group.add_argument("--max_prompt_len", type=int, help="Prompt tokens kept; older turns are dropped first.")
    group.add_argument("--max_ans_len", type=int, help="Default for --max_new_tokens (saved value, else 256).")
    group.add_argument("--dtype", choices=DTYPES, help="Model dtype (default fp32).")
    group.add_argument("--seed", type=int, help="Sampling seed (default 1234).")


def run(values: dict) -> int:
    import sys

    model_cfg = from_flat_dict(ModelConfig, values)
    from_flat_dict(GenerateConfig, values)  # validate the generation flags before any model loads
    seed = convert_value("seed", "int", values.get("seed", 1234))

    import torch
    from transformers.utils import logging as hf_logging

    from easysft.chat import ChatSession, repl
    from easysft.generate import resolve_settings
    from easysft.models.load import load_model, load_tokenizer, resolve_model_path

    hf_logging.disable_progress_bar()  # no weight-loading bars in front of the first prompt
    resolved = resolve_model_path(model_cfg.model_name_or_path)
    tokenizer = load_tokenizer(resolved.tokenizer_path, trust_remote_code=model_cfg.trust_remote_code)
    settings = resolve_settings(resolved.meta, tokenizer, values)
    model = load_model(resolved.path, dtype=values.get("dtype", "fp32"),
                       trust_remote_code=model_cfg.trust_remote_code, adapter_path=resolved.adapter_path)
    model.eval()
    if torch.cuda.is_available():
        model.to("cuda")
    torch.manual_seed(seed)
    session = ChatSession(model, tokenizer, settings, system=values.get("system"))

    if values.get("prompt") is not None:
        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        session.reply(values["prompt"], on_text=write)
        write("\n")
        return 0
    return repl(session)
