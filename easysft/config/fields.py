"""What every config module shares: the choice lists, the field-metadata helper, and the resume-sensitive mark.

No torch import anywhere in ``easysft.config``: ``easysft --help`` and flag errors must stay fast.
"""

from __future__ import annotations

from typing import Any

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
ENGINES = ("auto", "single", "ddp", "fsdp", "deepspeed")
BACKENDS = ("hf", "vllm")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "adamw_4bit")
QUANTIZATIONS = ("none", "4bit", "8bit")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flex", "varlen", "flash_attention_2", "eager")


# Field metadata key: a setting that decides which samples each step sees or which weights exist. A resume that
# changes one is no longer the run it continues, so the checkpoint protocol reports it (the user may mean it,
# e.g. a smaller batch after an out-of-memory error).
RESUME_SENSITIVE = "resume_sensitive"

# Field metadata key: the interval (``"(0, inf)"``, ``"[0, 1)"``) a numeric field's value, or each item of a list
# field, must lie in; checked with the type and finiteness in ``easysft.config.values.normalise_fields``.
BOUNDS = "bounds"


def _help(text: str, *, resume_sensitive: bool = False, bounds: str | None = None, **extra: Any) -> dict:
    """Field metadata: the flag's help text, argparse extras, whether changing it breaks a resume, and the
    interval its value must lie in (``bounds``, see :data:`BOUNDS`)."""
    return ({"help": text, **extra} | ({RESUME_SENSITIVE: True} if resume_sensitive else {})
            | ({BOUNDS: bounds} if bounds is not None else {}))
