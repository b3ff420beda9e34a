"""Typed run settings.

Every command-line flag is a field of one of the dataclasses below; the field name IS the flag name (the
original design's names are kept verbatim: ``--per_device_train_batch_size``, ``--max_prompt_len`` ...).
The CLI and ``--config run.yaml`` both fill these dataclasses through :func:`build_parser` and
:func:`from_flat_dict`; validation happens in ``__post_init__`` so a bad value fails before any model loads.

Library functions take the sub-config they need (``DataConfig``, ``TrainConfig`` ...), never the whole
``argparse.Namespace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any

from easysft.errors import ConfigError

LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
)
DTYPES = ("fp32", "bf16", "fp16")
ENGINES = ("auto", "single", "ddp", "fsdp", "deepspeed")
BACKENDS = ("hf", "vllm")


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


@dataclass
class ModelConfig:
    """Which model to load and how."""

    model_name_or_path: str = field(
        default="bundled",
        metadata=_help(
            "Local HF checkpoint folder, LoRA adapter folder, hub id, or 'bundled' for the embedded "
            "SmolLM2-135M-Instruct (default)."
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
            "containing {prompt} after which the answer follows."
        ),
    )
    max_prompt_len: int = field(default=256, metadata=_help("Prompt tokens kept (the END of the prompt)."))
    max_ans_len: int = field(
        default=256, metadata=_help("Answer tokens kept, EOS included (the START of the answer).")
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


@dataclass
class LoraConfig:
    """LoRA through PEFT (rank 0 = off)."""

    lora_dim: int = field(default=0, metadata=_help("LoRA rank; 0 disables LoRA."))
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA alpha (default: 2 x lora_dim)."))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA path."))
    lora_module_name: str = field(
        default="all-linear",
        metadata=_help(
            "Which linear layers get adapters: 'all-linear', a comma list such as 'q_proj,v_proj', or a name "
            "pattern as in the original design (e.g. 'layers.')."
        ),
    )
    only_optimize_lora: bool = field(
        default=True, metadata=_help("Freeze everything but the LoRA weights (original flag).")
    )

    def __post_init__(self) -> None:
        if self.lora_dim < 0:
            raise ConfigError(f"--lora_dim must be 0 (off) or a positive rank, got {self.lora_dim}.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}.")

    @property
    def enabled(self) -> bool:
        return self.lora_dim > 0


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging, saving and the distributed engine."""

    output_dir: str | None = field(default=None, metadata=_help("Where the model, metrics and checkpoints go."))
    per_device_train_batch_size: int = field(default=8, metadata=_help("Samples per micro-batch per device."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Samples per eval batch per device."))
    learning_rate: float = field(default=5e-5, metadata=_help("Peak learning rate."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (never on biases and norms)."))
    num_train_epochs: float = field(default=1, metadata=_help("Epochs over the training split."))
    max_steps: int | None = field(default=None, metadata=_help("Stop after this many optimizer steps."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Micro-batches per optimizer step."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("One of: " + ", ".join(LR_SCHEDULERS)))
    num_warmup_steps: int = field(default=0, metadata=_help("Linear warmup steps."))
    max_grad_norm: float = field(default=1.0, metadata=_help("Gradient clipping norm (0 = off)."))
    seed: int = field(default=1234, metadata=_help("Seed for shuffling, dropout and init."))
    dtype: str = field(default="fp32", metadata=_help("fp32, bf16 or fp16 (autocast where supported)."))
    gradient_checkpointing: bool = field(default=False, metadata=_help("Recompute activations to save memory."))
    packing: bool = field(
        default=False, metadata=_help("Pack samples into rows (attention never crosses samples).")
    )
    packing_max_tokens: int | None = field(
        default=None,
        metadata=_help("With --packing: best-fit rows of at most this many tokens. Default: each row packs exactly the "
                       "per_device_train_batch_size samples of an unpacked micro-batch (same steps, no padding)."),
    )
    group_by_length: bool = field(
        default=False, metadata=_help("Batch samples of similar length together (seeded) to cut padding.")
    )
    torch_compile: bool = field(default=False, metadata=_help("Compile the model with torch.compile."))
    lean_activations: bool = field(
        default=True,
        metadata=_help("Single process or DDP, Llama-style models: RMSNorm and SwiGLU MLP keep only their inputs "
                       "for the backward pass and recompute the rest, norm outputs included (about 45% less "
                       "activation memory, same outputs); single process: the LM head's weight gradient is added "
                       "after the backward pass."),
    )
    release_cpu_memory: bool = field(
        default=True,
        metadata=_help("CPU (single process or DDP): give memory freed by each training step back to the OS "
                       "(glibc malloc_trim after each training forward and during the backward pass), lowering peak "
                       "resident memory. Changes no numbers."),
    )
    eval_steps: int | None = field(default=None, metadata=_help("Evaluate every N optimizer steps."))
    print_loss: bool = field(default=False, metadata=_help("Print each step's loss."))
    debug: bool = field(default=False, metadata=_help("Quick debug run: 64 train / 32 eval rows, a few steps."))
    save_steps: int | None = field(default=None, metadata=_help("Write a resumable checkpoint every N steps."))
    save_total_limit: int | None = field(default=None, metadata=_help("Keep at most K checkpoints."))
    resume: str | None = field(
        default=None,
        metadata=_help("Resume: 'latest' (newest complete checkpoint in output_dir) or a checkpoint path.",
                       nargs="?", const="latest"),
    )
    overwrite_output_dir: bool = field(default=False, metadata=_help("Allow writing into a used output_dir."))
    max_nonfinite_steps: int = field(
        default=5, metadata=_help("Stop after this many non-finite steps in a row.")
    )
    engine: str = field(default="auto", metadata=_help("One of: " + ", ".join(ENGINES)))
    deepspeed: bool = field(default=False, metadata=_help("Train with DeepSpeed (original flag)."))
    zero_stage: int = field(default=0, metadata=_help("DeepSpeed ZeRO stage 0-3 (original flag)."))
    offload: bool = field(default=False, metadata=_help("DeepSpeed: offload optimizer (and ZeRO-3 params) to CPU."))
    deepspeed_config: str | None = field(default=None, metadata=_help("A DeepSpeed JSON config to pass through."))
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher; leave alone."))
    tensorboard: bool = field(default=True, metadata=_help("Write TensorBoard event files."))

    def __post_init__(self) -> None:
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be at least 1, got {getattr(self, name)}.")
        if self.learning_rate is None or self.learning_rate < 0:
            raise ConfigError(f"--learning_rate must be non-negative, got {self.learning_rate}.")
        if self.num_train_epochs <= 0:
            raise ConfigError(f"--num_train_epochs must be positive, got {self.num_train_epochs}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max_steps must be at least 1, got {self.max_steps}.")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ConfigError(
                f"--lr_scheduler_type {self.lr_scheduler_type!r} is unknown; choose one of: {', '.join(LR_SCHEDULERS)}."
            )
        if self.num_warmup_steps < 0:
            raise ConfigError(f"--num_warmup_steps must be non-negative, got {self.num_warmup_steps}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine!r} is unknown; choose one of: {', '.join(ENGINES)}.")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}.")
        for name in ("eval_steps", "save_steps", "save_total_limit", "packing_max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name} must be at least 1, got {value}.")
        if self.max_grad_norm < 0:
            raise ConfigError(f"--max_grad_norm must be non-negative, got {self.max_grad_norm}.")
        if self.packing and self.group_by_length:
            raise ConfigError(
                "--group_by_length does nothing with --packing (packed rows are filled best-fit by length); drop one."
            )
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"--max_nonfinite_steps must be at least 1, got {self.max_nonfinite_steps}.")


@dataclass
class GenerateConfig:
    """Sampling settings for infer and chat (the original design's defaults)."""

    max_new_tokens: int | None = field(default=None, metadata=_help("Tokens to generate (default: max_ans_len)."))
    temperature: float = field(default=0.7, metadata=_help("Sampling temperature."))
    do_sample: bool = field(default=True, metadata=_help("Sample (true) or greedy (false)."))
    top_p: float = field(default=1.0, metadata=_help("Nucleus sampling mass."))
    top_k: int = field(default=50, metadata=_help("Top-k sampling."))
    repetition_penalty: float = field(default=2.0, metadata=_help("Repetition penalty (original default 2.0)."))
    num_beams: int = field(default=1, metadata=_help("Beam search width."))

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ConfigError(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature <= 0 and self.do_sample:
            raise ConfigError("--temperature must be positive when sampling; use --do_sample false for greedy.")
        if self.num_beams < 1:
            raise ConfigError(f"--num_beams must be at least 1, got {self.num_beams}.")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"--repetition_penalty must be positive, got {self.repetition_penalty}.")


@dataclass
class InferConfig:
    """Where `easysft infer` reads and writes."""

    split: str = field(default="eval", metadata=_help("Which split to generate for: eval or train."))
    inference_output_path: str = field(default="predictions.csv", metadata=_help("Output file."))
    output_format: str = field(default="csv", metadata=_help("csv or jsonl."))
    backend: str = field(default="hf", metadata=_help("hf (transformers generate) or vllm."))
    per_device_eval_batch_size: int = field(default=8, metadata=_help("Prompts per generation batch."))
    seed: int = field(default=1234, metadata=_help("Sampling seed."))
    debug: bool = field(default=False, metadata=_help("Only the first 32 rows."))
    dtype: str = field(default="fp32", metadata=_help("fp32, bf16 or fp16."))
    local_rank: int = field(default=-1, metadata=_help("Set by the deepspeed launcher; leave alone."))
    tensor_parallel: bool = field(
        default=False,
        metadata=_help(
            "Under `deepspeed --num_gpus N` on CUDA: split the model across the GPUs (DeepSpeed init_inference) "
            "for models that do not fit one GPU. Off: each process generates its share of the prompts."
        ),
    )

    def __post_init__(self) -> None:
        if self.split not in ("eval", "train"):
            raise ConfigError(f"--split must be 'eval' or 'train', got {self.split!r}.")
        if self.output_format not in ("csv", "jsonl"):
            raise ConfigError(f"--output_format must be 'csv' or 'jsonl', got {self.output_format!r}.")
        if self.backend not in BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is unknown; choose one of: {', '.join(BACKENDS)}.")
        if self.per_device_eval_batch_size < 1:
            raise ConfigError(f"--per_device_eval_batch_size must be at least 1, got {self.per_device_eval_batch_size}.")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}.")


# ----------------------------------------------------------------------------------------------------------
# Flag plumbing: dataclass fields -> argparse flags, YAML keys -> dataclass fields.


def parse_bool(text: str | bool) -> bool:
    """Accept true/false/1/0/yes/no so that `--do_sample false` reads as written."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(f: dataclasses.Field) -> str:
    return str(f.type).replace(" ", "")


def add_dataclass_flags(parser: argparse.ArgumentParser, *config_classes: type, title: str | None = None) -> None:
    """Add one ``--name`` flag per dataclass field (defaults are left to the dataclass: argparse gives None)."""
    seen = {action.dest for action in parser._actions}
    for cls in config_classes:
        group = parser.add_argument_group(title or cls.__name__)
        for f in fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            meta = dict(f.metadata)
            kwargs: dict[str, Any] = {"help": meta.pop("help", None), "default": argparse.SUPPRESS}
            ftype = _field_type(f)
            if ftype.startswith("bool"):
                kwargs.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
            elif ftype.startswith("int"):
                kwargs["type"] = int
            elif ftype.startswith("float"):
                kwargs["type"] = float
            elif ftype.startswith("list"):
                kwargs["nargs"] = "+"
            kwargs.update(meta)
            flag = "--" + f.name
            aliases = [flag]
            if f.name == "local_rank":
                aliases.append("--local-rank")  # torch.distributed.launch spells it with a dash
            group.add_argument(*aliases, dest=f.name, **kwargs)


def from_flat_dict(cls: type, values: dict[str, Any]):
    """Build ``cls`` from the subset of ``values`` that names its fields."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def load_yaml_config(path: str, valid_keys: set[str]) -> dict[str, Any]:
    """Read ``--config run.yaml``; keys are flag names; an unknown key is an error listing the valid ones."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file.")
    try:
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)}).") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of flag names to values.")
    unknown = sorted(set(values) - valid_keys)
    if unknown:
        raise ConfigError(
            f"{path}: unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(sorted(valid_keys))}."
        )
    return values


def to_jsonable(*configs: Any) -> dict[str, Any]:
    """Flatten several config dataclasses into one JSON-ready dict (for train_config.json)."""
    merged: dict[str, Any] = {}
    for config in configs:
        merged.update(dataclasses.asdict(config))
    return merged
