"""Which model to load, and where the rows come from and how they become tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from easysft.config.fields import _help
from easysft.errors import ConfigError


@dataclass
class ModelConfig:
    """Which model to load and how."""

    model_name_or_path: str = field(
        default="bundled",
        metadata=_help(
            "Local HF checkpoint folder, LoRA adapter folder, hub id, or 'bundled' for the embedded "
            "SmolLM2-135M-Instruct (default).",
            resume_sensitive=True,
        ),
    )
    trust_remote_code: bool = field(
        default=False, metadata=_help("Allow model code from the checkpoint to run (off unless given).")
    )

    def __post_init__(self) -> None:
        if not self.model_name_or_path:
            raise ConfigError("--model_name_or_path is empty: give a folder, a hub id, or 'bundled'.")


@dataclass
class DataConfig:
    """Where the rows come from and how they become tokens."""

    data_path: list[str] = field(
        default_factory=list,
        metadata=_help(
            "One or more data sources: a folder with train.json/eval.json, a .json/.jsonl/.parquet/.csv file, "
            "or a Hugging Face dataset (hub name or saved folder).",
            nargs="+",
            resume_sensitive=True,
        ),
    )
    data_split: str = field(
        default="10,0,0",
        metadata=_help("Original design's phase weights 'sft,reward,rl'; SFT uses the first share of the rows."),
    )
    eval_fraction: float = field(
        default=0.05,
        metadata=_help("Share of rows held out for evaluation when a source has no eval split (at least 1 row)."),
    )
    template: str = field(
        default="qa",
        metadata=_help(
            "'qa' ('Q: {prompt} A: ' + answer), 'chat' (the tokenizer's chat template), or a custom string "
            "containing {prompt} after which the answer follows.",
            resume_sensitive=True,
        ),
    )
    max_prompt_len: int = field(default=256, metadata=_help("Prompt tokens kept (the END of the prompt).", resume_sensitive=True))
    max_ans_len: int = field(
        default=256, metadata=_help("Answer tokens kept, EOS included (the START of the answer).", resume_sensitive=True)
    )
    strict: bool = field(default=False, metadata=_help("Fail on the first row that cannot make a sample."))
    multi_turn: bool = field(
        default=False, metadata=_help("Chat data: supervise every assistant turn, not only the last one.")
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help("Tokenized-data cache folder (default: $EASYSFT_DATA_CACHE or ~/.cache/easysft/data)."),
    )
    max_train_rows: int | None = field(default=None, metadata=_help("Use at most this many training rows."))
    max_eval_rows: int | None = field(default=None, metadata=_help("Use at most this many eval rows."))

    def __post_init__(self) -> None:
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        if self.max_prompt_len is None or self.max_prompt_len < 1:
            raise ConfigError(f"--max_prompt_len must be at least 1, got {self.max_prompt_len}.")
        if self.max_ans_len is None or self.max_ans_len < 1:
            raise ConfigError(f"--max_ans_len must be at least 1 (it counts the EOS token), got {self.max_ans_len}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        parse_data_split(self.data_split)
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")


def parse_data_split(text: str) -> list[float]:
    """'10,0,0' -> [1.0, 0.0, 0.0]: normalised phase weights of the original design."""
    try:
        weights = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--data_split {text!r} must be comma-separated numbers such as '10,0,0'.") from None
    if any(w < 0 for w in weights) or sum(weights) <= 0 or weights[0] <= 0:
        raise ConfigError(
            f"--data_split {text!r}: weights must be non-negative and the first (SFT) share positive, e.g. '2,4,4'."
        )
    total = sum(weights)
    return [w / total for w in weights]


