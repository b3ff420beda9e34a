"""Which model to load, and where the rows come from and how they become tokens."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from easysft.config.fields import _help
from easysft.config.values import normalise_fields
from easysft.errors import ConfigError

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
SHIPPED_CHAT_TEMPLATES = ("chatml_tools",)  # easysft/assets/<name>.jinja


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
    chat_template: str | None = field(
        default=None,
        metadata=_help("A Jinja chat template file that replaces the tokenizer's own (prepare, train, eval, infer, "
                       "chat), or a template shipped with easysft: 'chatml_tools' (ChatML with tools and tool "
                       "calls). It is saved with the trained model, so inference renders as training did.",
                       resume_sensitive=True),
    )

    def __post_init__(self) -> None:
        normalise_fields(self)
        if not self.model_name_or_path:
            raise ConfigError("--model_name_or_path is empty: give a folder, a hub id, or 'bundled'.")
        if self.chat_template is not None and os.path.exists(self.chat_template) and not os.path.isfile(
                self.chat_template):
            raise ConfigError(f"--chat_template {self.chat_template}: not a regular file; give a Jinja chat "
                              "template file.")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            shipped = os.path.join(ASSETS_DIR, f"{self.chat_template}.jinja")
            if self.chat_template not in SHIPPED_CHAT_TEMPLATES:
                raise ConfigError(f"--chat_template {self.chat_template}: no such file; give a Jinja chat template "
                                  f"file or one of: {', '.join(SHIPPED_CHAT_TEMPLATES)}.")
            self.chat_template = shipped


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
        default=False, metadata=_help("Chat data with --template qa or a custom string: one sample per assistant "
                                      "turn. (With --template chat a conversation is always one sample: "
                                      "see --train_on.)")
    )
    train_on: str = field(
        default="all",
        metadata=_help("Conversations (--template chat): supervise 'all' assistant turns of the one sample, or "
                       "only the 'last'. An assistant message with \"weight\": 0 is never supervised.",
                       resume_sensitive=True),
    )
    reasoning: str = field(
        default="train",
        metadata=_help("Reasoning of assistant turns (reasoning_content/reasoning/thinking, or <think> blocks): "
                       "'train' renders and supervises it, 'mask' renders it unsupervised, 'drop' removes it.",
                       resume_sensitive=True),
    )
    max_seq_len: int | None = field(
        default=None,
        metadata=_help("Most tokens of a conversation sample (default: --max_prompt_len + --max_ans_len); longer "
                       "conversations drop whole rounds from the front, keeping the system prompt and tools.",
                       resume_sensitive=True),
    )
    cache_dir: str | None = field(
        default=None,
        metadata=_help("Tokenized-data cache folder (default: $EASYSFT_DATA_CACHE or ~/.cache/easysft/data)."),
    )
    max_train_rows: int | None = field(default=None, metadata=_help("Use at most this many training rows."))
    max_eval_rows: int | None = field(default=None, metadata=_help("Use at most this many eval rows."))
    num_proc: int | None = field(
        default=None,
        metadata=_help("Processes that tokenize (default: the cores available, at most 8; small data uses 1). "
                       "The cache is byte-identical for any value."),
    )
    data_weights: list[float] | None = field(
        default=None,
        metadata=_help("One positive weight per --data_path source: its share of the training samples of every "
                       "epoch (e.g. 0.7 0.3); default: every sample once, sources concatenated.", nargs="+",
                       resume_sensitive=True),
    )
    mixing: str = field(
        default="downsample",
        metadata=_help("With --data_weights: 'downsample' (no sample repeats in an epoch; the epoch shrinks to "
                       "fit the weights) or 'upsample' (smaller sources repeat; the epoch grows to fit them).",
                       resume_sensitive=True),
    )

    def __post_init__(self) -> None:
        normalise_fields(self)
        if isinstance(self.data_path, str):
            self.data_path = [self.data_path]
        self._check_scale_and_mixing()
        if self.max_prompt_len is None or self.max_prompt_len < 1:
            raise ConfigError(f"--max_prompt_len must be at least 1, got {self.max_prompt_len}.")
        if self.max_ans_len is None or self.max_ans_len < 1:
            raise ConfigError(f"--max_ans_len must be at least 1 (it counts the EOS token), got {self.max_ans_len}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"--eval_fraction must be in [0, 1), got {self.eval_fraction}.")
        parse_data_split(self.data_split)
        if self.train_on not in ("all", "last"):
            raise ConfigError(f"--train_on must be 'all' or 'last', got {self.train_on!r}.")
        if self.reasoning not in ("train", "mask", "drop"):
            raise ConfigError(f"--reasoning must be 'train', 'mask' or 'drop', got {self.reasoning!r}.")
        if self.max_seq_len is not None and self.max_seq_len < 2:
            raise ConfigError(f"--max_seq_len must be at least 2, got {self.max_seq_len}.")
        for name in ("max_train_rows", "max_eval_rows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")


    def _check_scale_and_mixing(self) -> None:
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"--num_proc must be at least 1, got {self.num_proc}.")
        if self.mixing not in ("downsample", "upsample"):
            raise ConfigError(f"--mixing must be 'downsample' or 'upsample', got {self.mixing!r}.")
        if self.data_weights is None:
            return
        if isinstance(self.data_weights, int | float):
            self.data_weights = [self.data_weights]
        try:
            self.data_weights = [float(w) for w in self.data_weights]
        except (TypeError, ValueError):
            raise ConfigError(f"--data_weights {' '.join(map(str, self.data_weights))}: give numbers, one per "
                              "--data_path source (e.g. --data_weights 0.7 0.3).") from None
        if len(self.data_weights) != len(self.data_path):
            raise ConfigError(f"--data_weights has {len(self.data_weights)} value(s) for {len(self.data_path)} "
                              "--data_path source(s); give one weight per source, in the same order.")
        bad = [w for w in self.data_weights if not w > 0 or w != w or w == float("inf")]
        if bad:
            raise ConfigError(f"--data_weights {bad[0]:g}: every weight must be a positive number; drop a source "
                              "from --data_path instead of giving it weight 0.")


def conversation_max_len(data_cfg) -> int:
    """``--max_seq_len``, or by default ``--max_prompt_len + --max_ans_len``."""
    return data_cfg.max_seq_len or data_cfg.max_prompt_len + data_cfg.max_ans_len


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


